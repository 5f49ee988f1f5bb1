"""No import cycles in the product packages, function-level imports included.

A cycle is two modules that need each other: one of them must run with the
other half-initialised, and the usual way out, an import inside a function,
hides the cycle and puts an import statement on whatever path calls that
function (in ``virtio_rdma/qp.py`` it was the fabric's per-request hot path).

The graph is built from the source with :mod:`ast`: every ``import`` and
``from ... import`` anywhere in a module (top level, functions, methods, try
blocks), relative ones resolved; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``; importing ``a.b``
is also an edge to the package ``a`` (its ``__init__`` runs first) unless
the importer is inside ``a``. Imports under
``if TYPE_CHECKING:`` are not run and are not edges. Cython sources
(``.pyx``) are read line by line for their ``import``/``cimport``
statements (a ``cimport`` of a project module imports it at run time too).
"""
from __future__ import annotations

import ast
import re
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("vrdma", "virtio", "vhost_user", "virtio_rdma", "fabric", "guest_lib", "accel_core",
           "roce", "verbs")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path, packages=PRODUCT) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        base = root / pkg
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*")):
            if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts:
                out[_module_name(root, path)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_py(source: str, module: str, is_package: bool):
    """Yield (imported module, name or None, line) for every run-time import."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    skip.add(id(inner))
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                yield target, alias.name, node.lineno


_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+(.+)|c?import\s+([\w.]+))")


def _imports_pyx(source: str):
    for lineno, line in enumerate(source.splitlines(), 1):
        m = _PYX_IMPORT.match(line)
        if not m:
            continue
        if m.group(3):
            yield m.group(3), None, lineno
        else:
            for name in m.group(2).split(","):
                yield m.group(1), name.strip().split(" ")[0].strip("()"), lineno


def import_graph(root: Path = ROOT, packages=PRODUCT) -> dict[str, dict[str, int]]:
    """module -> {imported product module: line of the first such import}."""
    mods = _modules(root, packages)
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        src = path.read_text()
        if path.suffix == ".pyx":
            imports = _imports_pyx(src)
        else:
            imports = _imports_py(src, mod, path.name == "__init__.py")
        for target, name, line in imports:
            if name is not None and f"{target}.{name}" in mods:
                dst = f"{target}.{name}"
            elif target in mods:
                dst = target
            else:
                continue  # not a product module (stdlib, third party)
            if dst != mod:
                graph[mod].setdefault(dst, line)
            # importing a.b.c first runs a/__init__ and a/b/__init__ (the
            # importer's own packages are initialising already: not edges)
            parts = dst.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in mods and not (mod == pkg or mod.startswith(pkg + ".")):
                    graph[mod].setdefault(pkg, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> tuple[list[list[str]], list[list[str]]]:
    """One cycle (as a module path that returns to its start) per strongly
    connected component of more than one module (Tarjan), and the components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in sccs:  # a shortest way back to the first module, inside the component
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, seen = [start], {start}
        path = None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        path = [v]
                        while path[-1] != start:
                            path.append(prev[path[-1]])
                        path.reverse()
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if path is not None:
                    break
            frontier = nxt
        cycles.append([*path, start])
    return cycles, sccs


def _describe(graph, cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in pairwise(cycle)) + f" -> {cycle[-1]}"


def test_product_packages_have_no_import_cycle():
    graph = import_graph()
    assert graph.get("virtio_rdma.core"), "the graph is empty: wrong root?"
    cycles, sccs = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{_describe(graph, c)}   [modules on cycles together: {', '.join(s)}]"
        for c, s in zip(cycles, sccs, strict=True))


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a cycle closed only inside a function is found and
    named; the same import under TYPE_CHECKING is not a cycle."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import B\n",
        "pkg/b.py": "class B:\n    def f(self):\n        from pkg import a\n        return a\n",
        "pkg/c.py": "from . import d\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import X\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a": 3} and graph["pkg.c"] == {"pkg.d": 1}
    assert graph["pkg"] == {} and graph["pkg.d"] == {}
    cycles, sccs = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]] and sccs == [["pkg.a", "pkg.b"]]
    assert _describe(graph, cycles[0]) == "pkg.a (line 1) -> pkg.b (line 3) -> pkg.a"


def test_a_package_init_is_run_by_importing_its_modules(tmp_path):
    """``import lib.x`` from outside ``lib`` runs ``lib/__init__``: a cycle
    through a package's re-exports is a cycle."""
    _write(tmp_path, {
        "lib/__init__.py": "from lib.x import X\n",
        "lib/x.py": "from app.y import Y\n",
        "app/__init__.py": "",
        "app/y.py": "import lib.z\n",
        "lib/z.py": "",
    })
    graph = import_graph(tmp_path, ("lib", "app"))
    assert graph["app.y"] == {"lib.z": 1, "lib": 1} and graph["lib.x"] == {"app.y": 1, "app": 1}
    assert find_cycles(graph)[0] == [["app.y", "lib", "lib.x", "app.y"]]


def test_reads_cython_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/_fast.pyx": "cimport cython\nfrom pkg.mem cimport Table\nfrom pkg.slow import f, g\n",
        "pkg/mem.py": "",
        "pkg/slow.py": "from pkg import _fast\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg._fast"] == {"pkg.mem": 2, "pkg.slow": 3}
    assert find_cycles(graph)[0] == [["pkg._fast", "pkg.slow", "pkg._fast"]]


if __name__ == "__main__":  # pragma: no cover
    g = import_graph()
    for c in find_cycles(g)[0]:
        print(_describe(g, c))
    pytest.main([__file__])
