"""Packages import only downward, and nothing imports in a circle.

The layer table below is the import rule of docs/architecture.md ("Import
rule"); change both together. Every module of ``src/labgate`` is read with
``ast`` (nothing is imported), each ``labgate`` import is mapped to its
package (the top-level subpackage or module of ``labgate``), and the test
fails on:

1. an import from a higher layer, or by the router of anything but its
   allowed packages (``TYPE_CHECKING`` imports included: a type is a
   dependency too);
2. a cycle between packages;
3. a cycle between modules of one package (imports under
   ``if TYPE_CHECKING:`` are exempt here: they do not run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import labgate

SRC = Path(labgate.__file__).resolve().parent

# Lowest layer first. A package may import its own layer's packages only where
# the table lists them as one layer *and* no cycle results (test 2). See
# docs/architecture.md, "Import rule".
LAYERS: list[set[str]] = [
    {
        "wire",
        "db",
        "config",
        "configfile",
        "errors",
        "security",
        "units",
        "types",
        "datadir",
        "passwords",
        "aio",
        "gcpause",
        "safefs",
    },
    {"tools"},
    {"backends"},
    {"agent", "startup"},
    {"scheduler", "resolver", "identity"},
    {"portal"},
    {"router"},
    {"doctor", "backup"},
    {"serve"},
    {"client", "cli"},
    {"__init__", "__main__"},
]

# The router is a data plane: it never sees the database, the portal or the
# scheduler, only these (and its own modules).
ROUTER_MAY_IMPORT = {
    "router",
    "wire",
    "config",
    "errors",
    "security",
    "types",
    "units",
    "aio",
    "gcpause",
    "safefs",
}


def _layer_of(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"labgate.{package} is in no layer: add it to LAYERS in {__file__}")


@dataclass(frozen=True)
class Import:
    """One import of a labgate module by another."""

    source: str  # dotted module name, without "labgate."
    target: str  # dotted module name, without "labgate."
    line: int
    type_checking: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, under_type_checking: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, under_type_checking
                yield from _walk(stmt, under_type_checking)
            continue
        yield child, under_type_checking
        yield from _walk(child, under_type_checking)


def _imports_of(path: Path) -> Iterator[Import]:
    source = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, type_checking in _walk(tree, False):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # Relative import: resolve against this module's package.
                base = ["labgate", *source.split(".")] if source != "__init__" else ["labgate"]
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from labgate.x import y" may name a submodule y: count it as one.
            targets = [module]
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                if _exists(candidate):
                    targets.append(candidate)
        for target in targets:
            if target == "labgate" or not target.startswith("labgate."):
                continue
            yield Import(source, target.removeprefix("labgate."), node.lineno, type_checking)


def _exists(dotted: str) -> bool:
    if not dotted.startswith("labgate."):
        return False
    rel = Path(*dotted.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _all_imports() -> list[Import]:
    return [imp for path in sorted(SRC.rglob("*.py")) for imp in _imports_of(path)]


def _package(module: str) -> str:
    return module.split(".")[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_package_is_in_a_layer() -> None:
    """A new top-level package or module must be placed in the table."""
    packages = {_package(_module_name(path)) for path in SRC.rglob("*.py")}
    for package in sorted(packages):
        _layer_of(package)


def test_packages_import_only_downward() -> None:
    """No package imports one of a higher layer; the router only its allowed few."""
    wrong = []
    for imp in _all_imports():
        source, target = _package(imp.source), _package(imp.target)
        if source == target:
            continue
        if source == "router" and target not in ROUTER_MAY_IMPORT:
            wrong.append(f"labgate.{imp.source}:{imp.line} -> labgate.{imp.target} (router)")
        elif _layer_of(target) > _layer_of(source):
            wrong.append(f"labgate.{imp.source}:{imp.line} -> labgate.{imp.target} (upward)")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_cycle_between_packages() -> None:
    """Packages of one layer may use each other, but not both ways."""
    edges: dict[str, set[str]] = {}
    for imp in _all_imports():
        source, target = _package(imp.source), _package(imp.target)
        if source != target:
            edges.setdefault(source, set()).add(target)
    cycles = _cycles(edges)
    assert not cycles, f"package cycles: {cycles}"


def test_no_cycle_between_modules_of_a_package() -> None:
    """Inside a package, modules form a tree of imports (TYPE_CHECKING exempt)."""
    edges: dict[str, set[str]] = {}
    for imp in _all_imports():
        if imp.type_checking or _package(imp.source) != _package(imp.target):
            continue
        if imp.source == imp.target or imp.target == _package(imp.target):
            # A package's own __init__ re-exporting is not a module cycle.
            continue
        edges.setdefault(imp.source, set()).add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, f"module cycles: {cycles}"


def test_no_assert_in_the_package() -> None:
    """Runtime checks raise real errors: ``python -O`` strips ``assert`` statements."""
    found = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert not found, "assert statements in src/labgate:\n" + "\n".join(found)
