"""The trigger function's deployable bundle (cloudbuild/bundle_trigger.py): the function directory plus exactly the
runtime modules it imports, importable on its own, with every third-party import pinned."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cloudbuild import bundle_trigger
from cloudbuild.bundle_trigger import BUNDLE_MARKER, BundleError, build_bundle
from cloudbuild.import_graph import build_graph

REPO = Path(__file__).resolve().parents[1]
TRIGGER_DIR = REPO / "cloud_functions" / "trigger"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "trigger-function"
    build_bundle(out)
    return out


def test_bundle_holds_the_function_and_the_launch_library(bundle: Path) -> None:
    shipped = sorted(str(p.relative_to(bundle)) for p in (bundle / "ctloop").rglob("*.py"))
    reached = [m for m in build_graph().closure("main") if m.startswith("ctloop.")]
    assert shipped == sorted(["ctloop/__init__.py", *(f"{m.replace('.', '/')}.py" for m in reached)])
    assert {"ctloop/launching.py", "ctloop/local_launch.py", "ctloop/launch_ledger.py"} <= set(shipped)
    for name in shipped:  # the library itself, not a copy that can drift
        assert (bundle / name).read_bytes() == (REPO / name).read_bytes()
    assert (bundle / "requirements.txt").read_bytes() == (TRIGGER_DIR / "requirements.txt").read_bytes()
    assert (bundle / "main.py").read_bytes() == (TRIGGER_DIR / "main.py").read_bytes()
    assert not [p for p in ("components", "pipelines", "serving") if (bundle / p).exists()]
    assert not list(bundle.rglob("__pycache__"))


def test_bundle_imports_on_its_own(bundle: Path) -> None:
    """As the function runs: the bundle directory and the installed requirements on sys.path, nothing else of
    the project (-I -S: no working directory, no editable install of the project)."""
    probe = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(bundle)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import main, ctloop_trigger.vertex_launcher, ctloop_trigger.local_launcher, ctloop.launching\n"
        "missing = []\n"
        "for name in ('components', 'pipelines', 'serving'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        missing.append(name)\n"
        "print(json.dumps({'launching': ctloop.launching.__file__, 'missing': missing}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=bundle.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"launching": str(bundle / "ctloop" / "launching.py"),
                     "missing": ["components", "pipelines", "serving"]}


def test_an_unpinned_import_fails_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    function = tmp_path / "function"
    shutil.copytree(TRIGGER_DIR, function, ignore=shutil.ignore_patterns("__pycache__"))
    requirements = function / "requirements.txt"
    requirements.write_text("".join(line + "\n" for line in requirements.read_text().splitlines()
                                    if not line.startswith("pydantic==")))
    monkeypatch.setattr(bundle_trigger, "TRIGGER_DIR", function)
    with pytest.raises(BundleError, match=r"ctloop.config imports 'pydantic' .* does not pin"):
        build_bundle(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bundle_replaces_only_a_previous_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trigger-function"
    assert bundle_trigger.main(["--out", str(out)]) == 0
    (out / "stale.py").write_text("")
    assert bundle_trigger.main(["--out", str(out)]) == 0
    assert not (out / "stale.py").exists() and (out / BUNDLE_MARKER).is_file()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert bundle_trigger.main(["--out", str(other)]) == 1
    assert f"{other} is not empty and holds no {BUNDLE_MARKER}" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
