"""The import graph of the project's own modules, read from the source (nothing is imported).

Every ``import`` statement counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (never executed). Used by the import-cycle test and by the trigger bundle
(cloudbuild/bundle_trigger.py), which ships the modules ``ctloop.launching`` needs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sys.path roots -> the top-level packages (or modules) found there that belong to the project.
SOURCE_ROOTS: dict[Path, tuple[str, ...]] = {
    REPO: ("ctloop", "components", "pipelines", "serving"),
    REPO / "cloud_functions" / "trigger": ("main", "ctloop_trigger"),
}


@dataclass
class ImportGraph:
    files: dict[str, Path] = field(default_factory=dict)  # module name -> source file
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> project modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level names of other imports

    def closure(self, start: str) -> list[str]:
        """``start`` and every project module it imports, directly or not, sorted."""
        seen, todo = {start}, [start]
        while todo:
            for dep in self.edges.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return sorted(seen)

    def cycles(self) -> list[list[str]]:
        """Every set of two or more modules that import each other, directly or not."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(node: str) -> None:  # Tarjan; the graph is a few hundred modules, recursion is fine
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for dep in sorted(self.edges.get(node, ())):
                if dep not in index:
                    visit(dep)
                    low[node] = min(low[node], low[dep])
                elif dep in on_stack:
                    low[node] = min(low[node], index[dep])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for node in sorted(self.edges):
            if node not in index:
                visit(node)
        return found


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files(roots: dict[Path, tuple[str, ...]]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for root, tops in roots.items():
        for top in tops:
            single = root / f"{top}.py"
            paths = [single] if single.is_file() else sorted((root / top).rglob("*.py"))
            for path in paths:
                if "__pycache__" not in path.parts:
                    files[_module_name(root, path)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from (i for child in node.orelse for i in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads (``from a import b`` -> ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def build_graph(roots: dict[Path, tuple[str, ...]] = SOURCE_ROOTS) -> ImportGraph:
    """The graph of ``roots``' modules (default: ctloop, components, pipelines, serving and the trigger)."""
    graph = ImportGraph(files=_project_files(roots))
    for module, path in graph.files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        external: set[str] = set()
        for node in _imports(tree):
            targets = _targets(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom) and targets[0] in graph.files:
                # ``from pkg import mod`` loads pkg.mod when it is a module, else takes a name from pkg.
                names = [t for t in targets[1:] if t in graph.files]
                deps.update(names or [targets[0]])
                if len(names) < len(targets) - 1:
                    deps.add(targets[0])
                continue
            for target in targets[:1] if isinstance(node, ast.ImportFrom) else targets:
                if target in graph.files:
                    deps.add(target)
                elif target and target != "__future__":
                    external.add(target.split(".")[0])
        # A component's body imports its own module: the executor runs the body on its own, not as a cycle.
        deps.discard(module)
        graph.edges[module] = deps
        graph.external[module] = external
    return graph
