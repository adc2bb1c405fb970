"""Build the trigger function's deployable source: cloud_functions/trigger plus the runtime modules it imports.

    python cloudbuild/bundle_trigger.py --out build/trigger-function

The function launches runs with the project's own launch library (``ctloop.launching``, ``ctloop.local_launch``
and what they import), not a copy of it. Cloud Functions builds install ``requirements.txt`` and put the source
directory on ``sys.path``; a package directory next to ``main.py`` is the documented way to ship local code
("Package local dependencies"). So the bundle is the function directory plus a ``ctloop/`` package holding
exactly the modules the function's import graph reaches (cloudbuild/import_graph.py), and nothing else of the
project. The bundle is checked before it is written: the function must reach no project package but ``ctloop``,
and every third-party package the bundled code imports must be pinned in the function's requirements.txt.
The output is written next to ``--out`` and moved into place whole.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib.metadata import packages_distributions
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `cloudbuild` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudbuild.import_graph import REPO, SOURCE_ROOTS, build_graph  # noqa: E402

TRIGGER_DIR = REPO / "cloud_functions" / "trigger"
ENTRY_MODULE = "main"
SHIPPED_PACKAGE = "ctloop"
BUNDLE_MARKER = ".ctloop-trigger-bundle"  # only a directory holding it is replaced by the next bundle


class BundleError(RuntimeError):
    """The bundle cannot be built as asked; the message names the module or file at fault."""


def _pins(requirements: Path) -> set[str]:
    names = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==", requirements.read_text(), re.M)
    return {n.lower().replace("_", "-") for n in names}


def bundled_modules() -> dict[str, Path]:
    """Module name -> source file of every runtime module the function imports (its ``ctloop`` part)."""
    graph = build_graph(SOURCE_ROOTS)
    reached = graph.closure(ENTRY_MODULE)
    own = {m for m in reached if m == ENTRY_MODULE or m.split(".")[0] == "ctloop_trigger"}
    foreign = [m for m in reached if m not in own and m.split(".")[0] != SHIPPED_PACKAGE]
    if foreign:
        raise BundleError(f"the trigger function imports {foreign}: only the {SHIPPED_PACKAGE} runtime package "
                          "ships in its bundle")
    shipped = {m for m in reached if m not in own}
    shipped |= {".".join(m.split(".")[:i]) for m in shipped for i in range(1, m.count(".") + 1)}  # packages
    _check_requirements(graph.external, reached)
    return {m: graph.files[m] for m in sorted(shipped)}


def _check_requirements(external: dict[str, set[str]], modules: list[str]) -> None:
    pins = _pins(TRIGGER_DIR / "requirements.txt")
    dists = packages_distributions()
    for module in modules:
        for name in sorted(external[module] - set(sys.stdlib_module_names)):
            provided = {d.lower().replace("_", "-") for d in dists.get(name, [])}
            if not provided & pins:
                raise BundleError(f"{module} imports {name!r} (distribution {sorted(provided) or '?'}), which "
                                  f"{TRIGGER_DIR / 'requirements.txt'} does not pin")


def build_bundle(out: Path) -> list[str]:
    """Write the bundle to ``out`` (replacing a previous bundle there); returns the shipped module names."""
    modules = bundled_modules()
    out = out.resolve()
    if out.exists() and not (out / BUNDLE_MARKER).is_file() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty and holds no {BUNDLE_MARKER}: refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        shutil.copytree(TRIGGER_DIR, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        for name, source in modules.items():
            target = tmp.joinpath(*name.split("."), "__init__.py") if source.name == "__init__.py" \
                else tmp.joinpath(*name.split(".")).with_suffix(".py")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        (tmp / BUNDLE_MARKER).write_text("".join(f"{m}\n" for m in modules))
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return list(modules)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the bundle directory to (re)write")
    args = parser.parse_args(argv)
    try:
        shipped = build_bundle(args.out)
    except BundleError as exc:
        print(f"bundle_trigger: {exc}", file=sys.stderr)
        return 1
    print(f"trigger bundle: {args.out} ({len(shipped)} runtime modules: {', '.join(shipped)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
