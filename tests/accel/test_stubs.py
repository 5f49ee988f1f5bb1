"""The .pyi stubs of accel_core's Cython kernels name what the compiled modules export, with
the same parameters (names, order, defaults) and read-only attributes as properties.

A quick structural check that runs with the suite; the full check is mypy's stubtest
(types too): ``python -m mypy.stubtest accel_core._fft accel_core._turbo accel_core._crc
--allowlist tests/accel/stubtest_allowlist.txt`` (a few seconds; run it after changing a kernel).
A cdef class's ``__init__`` has no introspectable signature, so neither check sees its parameters.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import accel_core
from accel_core import dft

KERNELS = ["_fft", "_turbo", "_crc"]
#: a real instance of each class the kernels export
INSTANCES = {"FFTCore": lambda: dft._core(8, False, False)}


def _stub(name: str) -> dict[str, ast.AST]:
    tree = ast.parse((Path(accel_core.__file__).parent / f"{name}.pyi").read_text())
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _public(namespace) -> set[str]:
    return {n for n in vars(namespace) if not n.startswith("_")}


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str | None]]:
    args = fn.args.posonlyargs + fn.args.args
    defaults = [None] * (len(args) - len(fn.args.defaults)) + [ast.unparse(d) for d in fn.args.defaults]
    return [(a.arg, d) for a, d in zip(args, defaults)]


def _runtime_params(obj) -> list[tuple[str, str | None]]:
    return [(p.name, None if p.default is p.empty else repr(p.default))
            for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("name", KERNELS)
def test_stub_matches_the_compiled_module(name):
    mod = importlib.import_module(f"accel_core.{name}")
    stub = _stub(name)
    assert set(stub) == _public(mod)
    for n, node in stub.items():
        obj = getattr(mod, n)
        if isinstance(node, ast.FunctionDef):
            assert _stub_params(node) == _runtime_params(obj), n
        elif isinstance(node, ast.ClassDef):
            members = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef) and m.name != "__init__"}
            assert set(members) == _public(obj), n
            for m, fn in members.items():
                attr = inspect.getattr_static(obj, m)
                if [ast.unparse(d) for d in fn.decorator_list] == ["property"]:
                    assert type(attr).__name__ == "getset_descriptor", f"{n}.{m} is not an attribute"
                    with pytest.raises(AttributeError):   # read-only, as the stub's property says
                        setattr(INSTANCES[n](), m, getattr(INSTANCES[n](), m))
                else:
                    assert _stub_params(fn) == _runtime_params(attr), f"{n}.{m}"
        else:
            assert isinstance(node, ast.AnnAssign)
            assert type(obj).__name__ == ast.unparse(node.annotation), n
