"""Render the ctloop settings a deployed environment runs with: a base YAML plus ``KEY=VALUE`` overrides.

    python cloudbuild/render_config.py --base ctloop.yaml --out build/ctloop.cloud.yaml \
        --set backend=cloud --set gcp.project=my-project ...

The result is validated by ``ctloop.config.Settings`` (an unknown key or a bad value fails the build, naming
it) and written atomically, so the file the trigger function reads is always a complete, valid settings file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from ctloop.config import Settings, load_settings


def render(base: Path, overrides: list[str]) -> Settings:
    """``base`` with ``overrides`` applied, validated."""
    return load_settings(base, overrides)


def write_settings(settings: Settings, out: Path) -> Path:
    """Write ``settings`` as YAML to ``out`` via a temp file in the same directory, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(settings.to_param(), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="settings YAML to start from")
    parser.add_argument("--out", required=True, type=Path, help="where to write the rendered YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        settings = render(args.base, args.overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"render_config: {args.base}: {where}: {first['msg']}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"render_config: {exc}", file=sys.stderr)
        return 1
    write_settings(settings, args.out)
    print(f"render_config: wrote {args.out} (backend={settings.backend}, project={settings.gcp.project})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
