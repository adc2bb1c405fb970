"""The runtime package and the development tools stay apart: the runtime never imports ``devtools``, the CLI's
development commands work from the development install and fail in one line without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("ctloop", "components", "pipelines", "serving")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return names


def test_runtime_packages_never_import_the_development_tools() -> None:
    files = [p for package in RUNTIME_PACKAGES for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "devtools")
                 for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}
    for moved in ("ctloop/emulators.py", "ctloop/sample_data.py", "pipelines/demo.py"):
        assert not (ROOT / moved).exists(), f"{moved} belongs in devtools/"


def test_sample_data_command_runs_from_the_development_install(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--workdir", str(tmp_path), "sample-data", "--rows", "500"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "landing").rglob("*.parquet"))


def test_development_commands_without_the_tools_fail_in_one_line(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['devtools'] = None\n"
              "from pipelines.cli import main\n"
              f"sys.argv = ['ctloop', '--workdir', {str(tmp_path)!r}, 'sample-data', '--rows', '100']\n"
              "main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "needs the development tools (devtools.sample_data)" in line and "make setup" in line
    assert not (tmp_path / "landing").exists()


def test_sql_templates_are_the_runtime_package_data() -> None:
    from ctloop.sql import load_template, sql_dir

    assert sql_dir() == ROOT / "ctloop" / "queries"
    assert "components" not in {m.split(".")[0] for m in _imports(ROOT / "ctloop" / "sql.py")}
    source, text = load_template("extract.sql")
    assert source.endswith("ctloop/queries/extract.sql") and "{{" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"queries/*.sql"' in pyproject
