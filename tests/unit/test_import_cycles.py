"""No import circles in ``gateway``: every module's imports, read from its source, form no cycle.

An import counts wherever it is written (a function-level import is a dependency too, only a
later one), except under ``if TYPE_CHECKING:``, which never runs. Importing ``a.b.c`` runs the
packages ``a`` and ``a.b`` first, so those count as well, unless the importer is inside them.
The layers this keeps apart are drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


def _modules() -> dict[str, Path]:
    out = {}
    for path in GATEWAY.rglob("*.py"):
        parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path) -> Iterator[str]:
    """Every module name an import statement of the file may load (TYPE_CHECKING blocks left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    yield from walk(other)
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                yield base
                yield from (f"{base}.{alias.name}" for alias in child.names)
            yield from walk(child)

    yield from walk(ast.parse(path.read_text(encoding="utf-8")))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for written in _imported(name, path):
            target = written
            while target and target not in modules:  # ``from pkg import name`` names an attribute
                target = target.rpartition(".")[0]
            if not target:
                continue
            edges.add(target)
            parent = target.rpartition(".")[0]
            while parent:  # the packages that run first, unless the importer is inside them
                if not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
                parent = parent.rpartition(".")[0]
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_graph_sees_the_modules_and_their_imports() -> None:
    graph = _graph()
    assert {"gateway.runtime", "gateway.supervisor", "gateway.admin.port", "gateway.reload.reloader"} <= set(graph)
    assert "gateway.supervisor" in graph["gateway.runtime"]
    # a TYPE_CHECKING import is not an edge: the reloader names the Supervisor only for mypy
    assert "gateway.supervisor" not in graph["gateway.reload.reloader"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_gateway_has_no_import_cycle() -> None:
    cycles = [sorted(c) for c in _cycles(_graph())]
    assert not cycles, "import cycles in gateway/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_admin_api_imports_only_its_port_of_the_running_gateway() -> None:
    graph = _graph()
    admin = {name for name in graph if name == "gateway.admin" or name.startswith("gateway.admin.")}
    runtime_side = {"gateway.runtime", "gateway.supervisor", "gateway.reload.reloader", "gateway.delivery.engine"}
    reached = {(name, target) for name in admin for target in graph[name] & runtime_side}
    assert not reached, f"the admin API imports the running gateway directly: {sorted(reached)}"
