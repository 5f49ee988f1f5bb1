"""Zero-copy buffers of accelerator jobs: adopting caller memory as arrays, and overlap rules.

A job reads its input and writes its output in the caller's memory (its own
NumPy arrays, or a ``memoryview`` of mapped guest memory, a ``bytearray``...),
never in a copy: :func:`adopt` checks that a buffer can be used as it lies
(dtype, shape, C-contiguous, aligned, writable when it is an output, not empty)
and views it as an ndarray. :func:`check_overlap` says whether an output may
share memory with its input: never partially; entirely only where the
operation runs in place (the FFT). Both raise the typed errors of
:mod:`accel_core.errors` naming the bad value. Pure: no I/O.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from accel_core.errors import DtypeError, LayoutError, ShapeError

__all__ = ["adopt", "has_buffer", "check_overlap"]


def has_buffer(obj: Any) -> bool:
    """True if ``obj`` exports the buffer protocol."""
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def adopt(buf: Any, dtype: np.dtype, shape: tuple[int, ...] | None, *, what: str,
          writable: bool) -> np.ndarray:
    """A C-contiguous, aligned, non-empty ndarray of ``dtype`` over ``buf`` without copying.

    ``buf`` is an ndarray (its shape is kept; ``shape`` is checked if given) or
    any object with the buffer protocol (reshaped to ``shape``, which is then
    required). ``what`` names the buffer in errors ("fft input", ...).
    """
    if isinstance(buf, np.ndarray):
        arr = buf
        if arr.dtype != dtype:
            raise DtypeError(f"{what} dtype {arr.dtype} is not supported here; need {dtype}",
                             argument=what, value=arr.dtype)
        if shape is not None and arr.shape != shape:
            raise ShapeError(f"{what} shape {arr.shape} does not match the job; need {shape}",
                             argument=what, value=arr.shape)
    else:
        try:
            mv = memoryview(buf)
        except TypeError:
            raise DtypeError(f"{what} of type {type(buf).__name__} is neither an ndarray nor a buffer",
                             argument=what, value=type(buf)) from None
        if shape is None:
            raise ShapeError(f"{what} is a raw buffer: the job's shape parameters are required",
                             argument=what)
        if not mv.c_contiguous:
            raise LayoutError(f"{what} buffer is not contiguous", argument=what)
        need = math.prod(shape) * dtype.itemsize
        if mv.nbytes != need:
            raise LayoutError(f"{what} buffer is {mv.nbytes} bytes; the job needs {need} "
                              f"({'x'.join(map(str, shape))} {dtype})", argument=what, value=mv.nbytes)
        if writable and mv.readonly:
            raise LayoutError(f"{what} buffer is read-only", argument=what)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        arr = np.frombuffer(mv, dtype=dtype).reshape(shape)
    if not arr.flags.c_contiguous:
        raise LayoutError(f"{what} must be C-contiguous (strides {arr.strides}); jobs never copy",
                          argument=what, value=arr.strides)
    if not arr.flags.aligned:
        raise LayoutError(f"{what} is not aligned to {dtype.alignment} bytes for {dtype}", argument=what)
    if writable and not arr.flags.writeable:
        raise LayoutError(f"{what} is read-only", argument=what)
    if arr.size == 0:
        raise LayoutError(f"{what} is empty (shape {arr.shape})", argument=what, value=arr.shape)
    return arr


def check_overlap(inp: np.ndarray, out: np.ndarray, *, in_place_ok: bool, what: str = "output") -> None:
    """Refuse an ``out`` sharing memory with ``inp``, unless it is the very same array
    memory (same start, shape and dtype) and the operation runs in place."""
    if out is inp and in_place_ok:
        return
    if not np.may_share_memory(inp, out):
        return
    same = (inp.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and inp.shape == out.shape and inp.dtype == out.dtype)
    if same and in_place_ok:
        return
    if same:
        raise LayoutError(f"{what} is the input buffer; this operation cannot run in place", argument=what)
    hint = " (use out=x for in-place)" if in_place_ok else ""
    raise LayoutError(f"{what} overlaps the input without being the same array{hint}", argument=what)
