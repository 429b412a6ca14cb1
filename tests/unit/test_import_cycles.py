"""No import cycle in ``zetta_ray`` (in the manner of Ray's ``test_circular_imports``).

The modules are read with ``ast``, never imported: an edge ``a -> b`` is a module-level import in ``a``
of module ``b`` (``import b``, ``from b import x``, and ``from pkg import sub`` when ``pkg.sub`` is a
module). Importing ``a.b.c`` first runs ``a/__init__.py`` and ``a/b/__init__.py``, so an import of a
submodule is also an edge to each package above it. Imports inside functions run later and cannot form
a cycle at import time; imports under ``if TYPE_CHECKING:`` never run; both are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import zetta_ray

pytestmark = pytest.mark.unit

ROOT = Path(zetta_ray.__file__).parent
PACKAGE = "zetta_ray"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at module level, also inside ``try`` and ``if``
    (except the body of ``if TYPE_CHECKING:``), not inside functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _with_parents(name: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """``name`` and the packages above it (importing it runs each ``__init__.py``), except the
    importer's own packages: those are being imported already when the importer runs."""
    return (({name} | _ancestors(name)) - _ancestors(importer)) & set(modules)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of zetta_ray it imports at import time``."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _module_level_imports(tree):
            targets: set[str] = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets |= _with_parents(alias.name, module, modules)
            else:
                source = _resolve(module, node, path.name == "__init__.py")
                targets |= _with_parents(source, module, modules)
                for alias in node.names:  # ``from zetta_ray.api import parallelize``: a submodule
                    if f"{source}.{alias.name}" in modules:
                        targets.add(f"{source}.{alias.name}")
            graph[module] |= {t for t in targets if t.startswith(PACKAGE) and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, in name order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets}


def test_the_graph_sees_the_imports_it_should():
    """The walk finds known edges (so an empty graph cannot pass the next test)."""
    edges = _package_edges(import_graph())
    assert ("zetta_ray.actors.compute_unit", "zetta_ray.actors.snapshot") in edges
    assert ("zetta_ray.api.distributed", "zetta_ray.runtime") in edges  # from zetta_ray.runtime import X
    assert ("zetta_ray.runtime.engine", "zetta_ray.actors") in edges  # a package above the submodule
    assert ("zetta_ray", "zetta_ray.chaos") in edges  # from zetta_ray import chaos: a submodule


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_zetta_ray():
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        f"import cycle in zetta_ray: {' -> '.join(cycle)}. Imports must point one way (the package "
        "order in docs/architecture.md): move what both modules need into a lower module, or import it "
        "under `if TYPE_CHECKING:` when only a type annotation needs it"
    )
