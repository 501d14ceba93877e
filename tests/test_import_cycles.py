"""The `vlp` package's imports form no cycle, lazy imports inside functions included.

A lazy import can hide a cycle from Python (the module is complete by the time a function
runs) but not from a reader: two modules that need each other are one module in two files.
The graph is read statically from the source, as tests/test_dvc_deps.py reads it, imports
under `if TYPE_CHECKING:` included: a type a module names is part of what it depends on.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vlp"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The vlp module `name` refers to: itself, or the package holding `name` (an attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The vlp modules that the module at `path` imports, at module level or in functions."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        found |= {m for n in names if (m := _resolve(n, modules)) and m != me}
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the vlp modules it imports (a `from pkg import name` edge goes to `pkg.name`
    when that is a module, else to `pkg`)."""
    files = {_module_name(p): p for p in root.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    # imported inside a function only, and for type checking only: both are edges
    assert "vlp.tasks.predictor" in graph["vlp.evaluate"]
    assert "vlp.config" in graph["vlp.data.images"]


def test_vlp_imports_form_no_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )
