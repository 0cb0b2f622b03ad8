"""The package's layout: its modules import one another one way, with no cycle.

Each module of ``pool_manager`` is parsed (not imported) with `ast`, and the
imports of the package's own modules make a graph. Two graphs are checked:

- at module level: the imports that run when a module is imported (in
  ``if``/``try``/``with`` blocks and class bodies too, but not under ``if
  TYPE_CHECKING:``, which never runs);
- with the imports inside functions as well (deferred: they run on a
  function's first call). A deferred import is how a module reaches one
  that is costly to load or needed on one path only; it must not be how a
  cycle is hidden, so these count too.

A cycle fails the test, which names it (``a -> b -> a``). A cycle known and
accepted goes in ``ALLOWED`` (or ``ALLOWED_DEFERRED``) with why; an entry
that no longer matches a cycle fails the test as well, so the list only
shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pool_manager

PACKAGE = pool_manager.__name__
ROOT = Path(pool_manager.__file__).parent

#: Cycles through module-level imports, known and accepted (the modules of
#: each, as a frozenset). None.
ALLOWED: set[frozenset[str]] = set()

#: Cycles through imports in functions, known and accepted. None.
ALLOWED_DEFERRED: set[frozenset[str]] = set()


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package (subpackages included): dotted name → file."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: list[ast.stmt], deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements in ``body`` that run on import (``deferred``: or in a function)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if deferred:
                yield from _import_nodes(node.body, deferred)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse, deferred)
        else:
            # Blocks that run as the module does: if, try, with, for, class bodies...
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, ()) or ():
                    if isinstance(child, (ast.ExceptHandler, ast.match_case)):
                        yield from _import_nodes(child.body, deferred)
                    elif isinstance(child, ast.stmt):
                        yield from _import_nodes([child], deferred)


def imports_of(name: str, path: Path, modules: dict[str, Path], deferred: bool) -> set[str]:
    """The package's modules that module ``name`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(tree.body, deferred):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import _process`` imports the submodule; ``from .pool
            # import X`` the module (and X is a name in it).
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            targets = [sub for sub in submodules if sub in modules] or [target]
        for target in targets:
            # ``import pool_manager.a.b`` imports the innermost module known.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(deferred: bool) -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules, deferred) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm (the graph is small)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_a_cycle(graph, component) for component in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path through ``component`` back to where it starts."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth first: the shortest way round
        node = queue.pop(0)
        for successor in sorted(graph[node] & component):
            if successor == start:
                return paths[node] + [start]
            if successor not in paths:
                paths[successor] = paths[node] + [successor]
                queue.append(successor)
    raise AssertionError(f"no cycle in {component}")  # (a component always has one)


def _check(graph: dict[str, set[str]], allowed: set[frozenset[str]], what: str) -> None:
    found = cycles(graph)
    new = [" -> ".join(cycle) for cycle in found if frozenset(cycle) not in allowed]
    assert not new, f"import cycle{'s' if len(new) > 1 else ''} {what}: " + "; ".join(new)
    gone = allowed - {frozenset(cycle) for cycle in found}
    assert not gone, f"no longer a cycle {what} (remove it from the allowed list): {gone}"


def test_no_import_cycle_at_module_level() -> None:
    _check(import_graph(deferred=False), ALLOWED, "at module level")


def test_no_import_cycle_counting_imports_in_functions() -> None:
    _check(import_graph(deferred=True), ALLOWED_DEFERRED, "counting imports in functions")


def test_protocol_imports_nothing_of_the_package() -> None:
    """The wire's module is the bottom layer: every other module may import it."""
    assert import_graph(deferred=False)[f"{PACKAGE}._protocol"] == set()


def test_the_graph_sees_the_imports() -> None:
    """(The checks above would pass on a graph that misses imports.)"""
    graph = import_graph(deferred=False)
    assert f"{PACKAGE}._protocol" in graph[f"{PACKAGE}._worker"]
    assert f"{PACKAGE}._process" in graph[f"{PACKAGE}.pool"]  # (from . import _process)
    assert f"{PACKAGE}.budget" in graph[f"{PACKAGE}.manager"]  # (from .budget import ...)
    assert f"{PACKAGE}.pool" not in graph[f"{PACKAGE}.budget"]  # (if TYPE_CHECKING:)
    assert f"{PACKAGE}._worker" not in graph[f"{PACKAGE}._process"]  # (in serve)
    deferred = import_graph(deferred=True)
    assert f"{PACKAGE}._worker" in deferred[f"{PACKAGE}._process"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# -- sizes -------------------------------------------------------------------

#: Issue 13's limits: a module a reader can hold, a class with one job.
MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 650

#: What is over a limit today, each with its ceiling (its size when it was
#: listed): it may shrink, never grow; an entry whose module or class is
#: back under the limit fails the test, so that it is taken off the list.
OVERSIZE_MODULES: dict[str, int] = {}
OVERSIZE_CLASSES: dict[str, int] = {}


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    modules: dict[str, int] = {}
    classes: dict[str, int] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        modules[path.relative_to(ROOT).as_posix()] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                classes[node.name] = node.end_lineno - node.lineno + 1
    return modules, classes


def test_no_module_or_class_grows_past_its_limit() -> None:
    modules, classes = _sizes()
    for kind, sizes, limit, known in (
        ("module", modules, MAX_MODULE_LINES, OVERSIZE_MODULES),
        ("class", classes, MAX_CLASS_LINES, OVERSIZE_CLASSES),
    ):
        over = {name: size for name, size in sizes.items() if size > limit}
        grown = {name: size for name, size in over.items() if size > known.get(name, limit)}
        assert not grown, f"{kind}s over {limit} lines (and their ceiling): {grown}"
        done = sorted(set(known) - set(over))
        assert not done, f"back under {limit} lines, take off the {kind} list: {done}"
