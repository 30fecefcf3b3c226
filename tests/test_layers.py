"""The package's import graph: no cycles (the layer contracts run as `lint-imports`); and
the tests': no test module imports another, they share helpers through `tests.fixtures`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp

TESTS = Path(__file__).resolve().parent


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_in_the_package():
    graph = grimp.build_graph("modecl", exclude_type_checking_imports=True)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def imported_test_modules(source: str) -> set[str]:
    """The `tests.test_*` modules (or top-level `test_*`) that `source` imports, anywhere in
    the file (lazy imports in functions too); relative imports are read from `tests`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .x import y: inside the tests package
                base = f"tests.{base}" if base else "tests"
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from tests import x
    return {name for name in names if re.fullmatch(r"(tests\.)?test_\w+", name)}


def test_no_test_module_imports_another():
    imports = {path.name: imported_test_modules(path.read_text()) for path in TESTS.rglob("*.py")}
    assert {name: sorted(found) for name, found in imports.items() if found} == {}
    assert not (TESTS / "tiny_hosts.py").exists()  # its helpers are in fixtures.py


def test_the_test_import_finder_finds_every_form():
    source = """
import test_a
import tests.fixtures
from tests.test_b import helper
from tests.fixtures import test_like_name
from . import fixtures, test_c
from .test_d import helper

def lazy():
    from tests import test_e
"""
    expected = {"test_a", "tests.test_b", "tests.test_c", "tests.test_d", "tests.test_e"}
    assert imported_test_modules(source) == expected
