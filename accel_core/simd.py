"""Run-time choice of the SIMD path of accel_core's kernels (FFT and Turbo).

Each kernel is compiled three times from one source (setup.py): ``accel_core._fft``
/ ``_turbo`` for baseline x86-64 (the ``scalar`` path: SSE2 at most, runs on any
x86-64), ``_fft_avx2`` / ``_turbo_avx2`` for AVX2 + FMA, ``_fft_avx512`` /
``_turbo_avx512`` for AVX-512 F/BW/VL/DQ. None is built with -march=native, so a
wheel built anywhere (VRDMA_NATIVE=0 or not) runs the best path its CPU has.

:func:`available_paths` asks the CPU (gcc's ``__builtin_cpu_supports``: CPUID and
the OS's XGETBV state) which paths it can run; :func:`simd_path` is the one in use:
the best available, or the one the environment variable ``VRDMA_SIMD``
(``scalar`` | ``avx2`` | ``avx512``) names, read at first use; :func:`use` switches it
for the process (tests and benchmarks run every path so). Asking for a path the CPU
lacks raises :class:`~accel_core.errors.ParameterError` naming it: a module compiled
for an instruction set the CPU lacks is never imported (its first vector instruction
would kill the process). Pure: no I/O beyond reading the environment.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from accel_core import _fft
from accel_core.errors import ParameterError

__all__ = ["PATHS", "ENV", "available_paths", "simd_path", "use", "forced", "kernel_module"]

#: Every SIMD path, slowest first.
PATHS = ("scalar", "avx2", "avx512")
#: Environment variable that forces a path.
ENV = "VRDMA_SIMD"
#: CPU features each path needs.
_NEEDS = {"scalar": frozenset(), "avx2": frozenset({"avx2", "fma"}),
          "avx512": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})}
_SUFFIX = {"scalar": "", "avx2": "_avx2", "avx512": "_avx512"}
_KERNELS = ("fft", "turbo")

#: the path in use (None until first asked: then VRDMA_SIMD or the best available)
_state: dict[str, str] = {}
_modules: dict[tuple[str, str], ModuleType] = {}


@functools.cache
def available_paths() -> tuple[str, ...]:
    """The paths this CPU can run, slowest first (always starts with ``scalar``)."""
    have = _fft.cpu_features()
    return tuple(p for p in PATHS if _NEEDS[p] <= have)


def _check(path: object, where: str) -> str:
    if not isinstance(path, str) or path not in PATHS:
        raise ParameterError(f"{where}={path!r} is not a SIMD path; expected one of {', '.join(PATHS)}",
                             argument=where, value=path)
    if path not in available_paths():
        missing = sorted(_NEEDS[path] - _fft.cpu_features())
        raise ParameterError(f"{where}={path!r}: this CPU lacks {', '.join(missing)} "
                             f"(available: {', '.join(available_paths())})", argument=where, value=path)
    return path


def simd_path() -> str:
    """The path in use: ``VRDMA_SIMD`` if set (checked), else the best the CPU has."""
    path = _state.get("path")
    if path is None:
        env = os.environ.get(ENV)
        path = _state["path"] = _check(env, ENV) if env else available_paths()[-1]
    return path


def use(path: str) -> str:
    """Switch every kernel to ``path`` for this process; returns the previous path."""
    prev = simd_path()
    _state["path"] = _check(path, "path")
    return prev


@contextmanager
def forced(path: str) -> Iterator[str]:
    """``with forced("avx2"):`` runs the kernels on that path inside the block."""
    prev = use(path)
    try:
        yield path
    finally:
        use(prev)


def kernel_module(kernel: str, path: str | None = None) -> ModuleType:
    """The compiled module of ``kernel`` (``"fft"`` or ``"turbo"``) for ``path`` (default:
    :func:`simd_path`)."""
    if kernel not in _KERNELS:
        raise ParameterError(f"kernel={kernel!r} has no SIMD paths; expected one of {', '.join(_KERNELS)}",
                             argument="kernel", value=kernel)
    p = simd_path() if path is None else path
    mod = _modules.get((kernel, p))
    if mod is None:
        name = f"accel_core._{kernel}{_SUFFIX[_check(p, 'path')]}"
        mod = _modules[kernel, p] = importlib.import_module(name)
    return mod
