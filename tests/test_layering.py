"""The product stands on its own: no installed package imports a harness.

The wheel installs the packages that ``pyproject.toml``'s ``[tool.setuptools]``
finds (the product: vrdma, virtio, vhost_user, virtio_rdma, fabric, guest_lib,
accel_core, roce, ...). The harnesses (``bench/``, ``qemu_tests/``, ``tests/``)
stay in the repository and are not installed, so an installed ``vrdma`` that
imported one of them would fail at the first command that reached that import.
Every ``import`` and ``from ... import`` statement of every installed module
is checked, at any depth (function-level imports included), and so are
``importlib.import_module("...")`` / ``__import__("...")`` calls with a
literal name and the ``import``/``cimport`` lines of the Cython sources.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent

#: top-level packages of the repository that are harnesses, never installed
HARNESSES = frozenset({"bench", "qemu_tests", "tests"})

#: packages the product cannot be without (the check must not pass on an empty list)
PRODUCT_CORE = frozenset({"vrdma", "virtio", "vhost_user", "virtio_rdma", "fabric", "guest_lib",
                          "accel_core", "roce"})

_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def installed_packages() -> list[str]:
    """The packages the wheel installs, found the way setuptools finds them."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return sorted(find_packages(str(ROOT), include=conf.get("include", ("*",)), exclude=conf.get("exclude", ())))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


def imported_names(source: str, importer: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _absolute(node.module, node.level, importer, is_package)))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            found.append((node.lineno, node.args[0].value))
    return found


def harness_imports(source: str, importer: str, is_package: bool = False) -> list[tuple[int, str]]:
    return [(line, name) for line, name in imported_names(source, importer, is_package)
            if name.split(".")[0] in HARNESSES]


def test_the_wheel_installs_the_product_and_no_harness():
    pkgs = installed_packages()
    top = {p.split(".")[0] for p in pkgs}
    assert PRODUCT_CORE <= top, f"product packages missing from the wheel: {sorted(PRODUCT_CORE - top)}"
    assert not top & HARNESSES, f"harnesses installed as top-level packages: {sorted(top & HARNESSES)}"


def test_no_product_module_imports_a_harness():
    tops = sorted({p.split(".")[0] for p in installed_packages()})
    checked = 0
    offences = []
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = _module_name(path)
            for line, mod in harness_imports(path.read_text(), name, path.name == "__init__.py"):
                offences.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}")
            checked += 1
        for path in sorted([*(ROOT / top).rglob("*.pyx"), *(ROOT / top).rglob("*.pxd")]):
            for m in _CYTHON_IMPORT.finditer(path.read_text()):
                mod = m.group(1) or m.group(2)
                if mod.split(".")[0] in HARNESSES:
                    line = path.read_text().count("\n", 0, m.start()) + 1
                    offences.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}")
    assert checked > 100, f"only {checked} product modules found under {tops}"
    assert not offences, "the product imports its harnesses:\n" + "\n".join(offences)


# ---------------------------------------------------------------- the checker itself

CHEATS = '''
import os
from . import sibling
def serve(marker):
    from qemu_tests.bootsector import make_boot_sector
    return make_boot_sector(marker)
class Cmd:
    def run(self):
        import bench.perftest as p
        import importlib
        return importlib.import_module("tests.fabric"), __import__("bench")
'''


def test_the_checker_sees_imports_at_every_depth():
    assert harness_imports(CHEATS, "vrdma.commands.demo") == [
        (5, "qemu_tests.bootsector"), (9, "bench.perftest"), (11, "tests.fabric"), (11, "bench")]


@pytest.mark.parametrize("source, importer, is_package, name", [
    ("from . import x", "vrdma.commands.demo", False, "vrdma.commands"),
    ("from .x import y", "vrdma.commands", True, "vrdma.commands.x"),
    ("from ..perftest import run_pair", "vrdma.commands.demo", False, "vrdma.perftest"),
    ("from ...bench import x", "vrdma.commands.demo", False, "bench"),
])
def test_relative_imports_resolve(source, importer, is_package, name):
    assert imported_names(source, importer, is_package) == [(1, name)]
