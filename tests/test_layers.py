"""The packages form layers whose imports only point down (docs/ARCHITECTURE.md):

    formulations  <-  wire  <-  {planner_svc, engine_adapters}  <-  {lab, deploy}  <-  commands

`planner_svc` (the service) and `engine_adapters` (the engine side) are siblings: neither imports
the other, they meet only through `wire`. So are `lab` (the evaluation lab) and `deploy` (launching
and supervising a deployment). The test parses every module (imports inside functions
included) and fails on an upward or sideways edge, and on an import cycle between modules at
module scope (where a cycle breaks at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {
    "formulations": 0,
    "wire": 1,
    "planner_svc": 2,
    "engine_adapters": 2,
    "lab": 3,
    "deploy": 3,
    "commands": 4,
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in LAYER:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module scope) for every import of ours in the file."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = False
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, top))
                found.extend((f"{base}.{alias.name}", top) for alias in child.names)
            visit(child, inner)

    visit(tree, True)
    return [(name, top) for name, top in found if name.split(".")[0] in LAYER]


def test_imports_point_down_the_layers() -> None:
    bad = []
    for module, path in _modules().items():
        own = module.split(".")[0]
        for name, _ in _imports(module, path):
            other = name.split(".")[0]
            if other == own:
                continue
            if LAYER[other] > LAYER[own] or LAYER[other] == LAYER[own]:
                bad.append(f"{module} imports {name}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(set(bad)))


def test_no_import_cycles_at_module_scope() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name, top in _imports(module, path):
            if not top:
                continue
            while name and name not in modules:  # `from pkg.mod import Name` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                edges.add(name)
        graph[module] = edges
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_edge(tmp_path) -> None:
    """The walk is not vacuous: an upward import in a module of a lower layer is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from lab.simulator import simulate\n")
    assert ("lab.simulator", False) in _imports("wire.m", path)
