"""The project's packages import each other without cycles, and components never import the CLI package.

The graph is read from the source (cloudbuild/import_graph.py): module-level and function-level imports count."""

from __future__ import annotations

from pathlib import Path

from cloudbuild.import_graph import SOURCE_ROOTS, build_graph


def test_the_walk_covers_every_package() -> None:
    graph = build_graph()
    tops = {name.split(".")[0] for name in graph.files}
    assert {"ctloop", "components", "pipelines", "serving", "ctloop_trigger", "main"} <= tops
    assert set(SOURCE_ROOTS.values()) == {("ctloop", "components", "pipelines", "serving"), ("main", "ctloop_trigger")}
    # A function-level import is an edge too (the CLI imports its commands' modules inside the commands).
    assert "pipelines.submit" in graph.edges["pipelines.cli"]


def test_no_import_cycle_among_the_project_packages() -> None:
    assert build_graph().cycles() == []


def test_components_do_not_depend_on_the_cli_package() -> None:
    graph = build_graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] == "pipelines")
             for m, deps in graph.edges.items() if m.split(".")[0] in ("components", "ctloop", "serving")}
    assert {m: d for m, d in wrong.items() if d} == {}


def _package(root: Path, files: dict[str, str]) -> dict[Path, tuple[str, ...]]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {root: ("pkg",)}


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    roots = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    from pkg import c\n    return c\n",
        "pkg/c.py": "import json\n\ndef late():\n    from .a import helper\n    return helper\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import helper\n",
        "pkg/e.py": "from pkg.d import x\n",
    })
    graph = build_graph(roots)
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph.edges["pkg.d"] == set()  # TYPE_CHECKING imports never run
    assert graph.external["pkg.c"] == {"json"}
    assert graph.closure("pkg.e") == ["pkg.d", "pkg.e"]


def test_the_cycle_the_monitoring_launch_step_had_is_found(tmp_path: Path) -> None:
    """monitoring -> launch step -> main job -> compile -> monitoring, held together by imports in functions."""
    roots = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/monitoring.py": "from pkg.launch import launch_training\n",
        "pkg/launch.py": "def launch_training():\n    from pkg.main_job import submit\n",
        "pkg/main_job.py": "def submit():\n    from pkg.compile import compile_pipeline\n",
        "pkg/compile.py": "def all_pipelines():\n    from pkg.monitoring import monitoring_pipeline\n",
    })
    assert build_graph(roots).cycles() == [["pkg.compile", "pkg.launch", "pkg.main_job", "pkg.monitoring"]]
