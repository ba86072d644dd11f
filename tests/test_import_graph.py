"""Package layout rules: every module of largefr imports, its imports (lazy ones included) form no cycle, and
largefr.distributed imports nothing from heads/, train/ or data/ (at any level, lazy imports included)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "largefr"
FORBIDDEN_FOR_DISTRIBUTED = ("largefr.heads", "largefr.train", "largefr.data")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: module level and inside functions (lazy imports close circles too),
    not those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not _is_type_checking(node):
            pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """The largefr modules an import statement loads (``from pkg import sub`` counts as ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    base = node.module or ""
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.add(sub)
        elif base in MODULES:
            out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set().union(*(imported_modules(n, name) for n in runtime_imports(tree))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_runtime_imports_include_lazy_ones_and_skip_type_checking():
    tree = ast.parse("import largefr.config\nif TYPE_CHECKING:\n    import largefr.cli\n"
                     "try:\n    from largefr import heads\nexcept ImportError:\n    pass\n"
                     "def f():\n    from .train import run\n")
    names = set().union(*(imported_modules(n, "largefr.memory_plan") for n in runtime_imports(tree)))
    assert names == {"largefr.config", "largefr.heads", "largefr.train.run"}


def test_no_import_cycle_among_largefr_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_distributed_imports_nothing_from_heads_train_or_data():
    offending = []
    for name, path in MODULES.items():
        if not name.startswith("largefr.distributed"):
            continue
        for node in runtime_imports(ast.parse(path.read_text())):
            for target in imported_modules(node, name) | {getattr(node, "module", None) or ""}:
                if target.startswith(FORBIDDEN_FOR_DISTRIBUTED):
                    offending.append(f"{name} imports {target}")
    assert not offending, offending


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"largefr.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name: str):
    importlib.import_module(name)
