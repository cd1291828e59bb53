"""The shape of ``server/``: its modules import one another without a cycle,
never import the tests, keep the contract's errors out of the database
layer, and stay small enough to hold one idea each.

Every import statement counts, wherever it is: at the top, inside a
function, or under ``if TYPE_CHECKING:``. A cycle that only the type checker
follows is still two modules that each need the other; where a module
needs only the shape of another's objects, it declares a ``Protocol``
instead (``server.rpc.Socket``, ``server.services.ServedSocket``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, as written (relative ones resolved).
    For ``from a.b import c`` both ``a.b`` and ``a.b.c`` are named: ``c``
    may be a module or a name in ``a.b``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _server_graph() -> dict[str, set[str]]:
    """Module -> the modules of ``server`` it imports."""
    paths = {_module_name(p): p for p in SERVER.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for name in _imported(path):
            while name and name not in paths:  # a name inside a module: that module
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_server_modules_import_one_another_without_a_cycle():
    assert _cycles(_server_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_server_never_imports_the_tests():
    importing = sorted(
        _module_name(p) for p in SERVER.rglob("*.py")
        if any(name == "tests" or name.startswith("tests.") for name in _imported(p))
    )
    assert importing == []


def test_the_database_layer_raises_its_own_errors_not_the_contracts():
    importing = sorted(
        _module_name(p) for p in (SERVER / "db").rglob("*.py")
        if any(name == "protocol.errors" or name.startswith("protocol.errors.") for name in _imported(p))
    )
    assert importing == []


def test_no_server_module_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in SERVER.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
