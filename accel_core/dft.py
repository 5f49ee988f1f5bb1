"""Batched complex DFT by mixed-radix FFT: the shared FFT accelerator's thin Python layer.

``fft(x)`` / ``ifft(x)`` (re-exported as ``accel_core.fft`` / ``accel_core.ifft``) transform
along the last axis of a complex64 or complex128 array, batched over the leading axes, with
numpy.fft conventions:
forward ``X[k] = sum_j x[j] exp(-2*pi*i*j*k/n)``, inverse with ``exp(+...)``
and a ``1/n`` scale. The dtype is preserved (no silent upcast).

Supported sizes are every ``n = 2**a * 3**b * 5**c`` with ``1 <= n <= 65536``:
all LTE / 5G NR FFT sizes (128, 256, 512, 1024, 1536, 2048, 3072, 4096) and
every power of two 2..65536. :func:`radices_for` is the canonical factorisation
(radix-8 stages first, then 4, 5, 3 and 2: 2048 = 8*8*8*4), whose length is the
spec's pass count (:func:`accel_core.estimate.fft_passes`); the kernels run
:func:`schedule_for`, mostly radix 4 (4096 = 4**6, 2048 complex64 = 8*4*4*4*4),
measured faster on every SIMD path (see there).

The arithmetic is the Stockham autosort kernel in :mod:`accel_core._fft`
(``noexcept nogil``, GIL released for the whole batch), built once per SIMD
path (``_fft``, ``_fft_avx2``, ``_fft_avx512``); :mod:`accel_core.simd` picks the
path (the best the CPU has, or ``VRDMA_SIMD``). This module validates arrays,
builds plans (stage schedule + twiddle tables, computed in double precision)
and caches them per (size, dtype, direction, SIMD path) in an LRU;
``FFTPlan(n, dtype)`` holds them explicitly (on the path in use when it was made).

Validation is here and only here: :func:`check_dtype`, :func:`check_size`,
:func:`check_shape`, :func:`check_input` and :func:`check_out` raise the typed errors of
:mod:`accel_core.errors` naming the bad value (:class:`DtypeError`, also a
``TypeError``; :class:`ShapeError`, :class:`UnsupportedSize`,
:class:`LayoutError`, ``ValueError`` s). Jobs (:mod:`accel_core.jobs`) call the
same checks at ``Job.create`` and then run :func:`transform_into`, which trusts
them. :func:`fft` / :func:`ifft` first ask one C call (``_fft.fast_args``) whether the
arrays pass those checks as they are, and run the checks only when it says no (it names
no error: the checks raise). Pure: no I/O.
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import numpy as np

from accel_core import _fft, simd
from accel_core.buffers import check_overlap
from accel_core.errors import DtypeError, LayoutError, ShapeError, UnsupportedSize

__all__ = [
    "MAX_SIZE", "DTYPES", "FFTPlan", "fft", "ifft", "supported_sizes", "is_supported", "radices_for",
    "schedule_for", "check_dtype", "check_size", "check_shape", "check_input", "check_out", "transform_into",
]

#: Largest supported transform size.
MAX_SIZE = 65536
#: Plans kept by the LRU (each holds its twiddle tables, about 2*n reals).
PLAN_CACHE_SIZE = 64

#: Supported dtypes -> double precision?
_DTYPES = {np.dtype(np.complex64): False, np.dtype(np.complex128): True}
#: The supported dtypes, single precision first.
DTYPES = tuple(_DTYPES)
_REAL = {False: np.float32, True: np.float64}


def _smooth_sizes(limit: int) -> tuple[int, ...]:
    sizes = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                sizes.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return tuple(sorted(sizes))


_SIZES = _smooth_sizes(MAX_SIZE)
_SIZE_SET = frozenset(_SIZES)


def supported_sizes() -> tuple[int, ...]:
    """Every supported transform size, ascending (the 5-smooth sizes <= 65536)."""
    return _SIZES


def is_supported(n) -> bool:
    """True if ``n`` is an int transform size this module can plan."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and int(n) in _SIZE_SET


def check_size(n: Any) -> int:
    """``n`` as an int if it is a supported transform size, else :class:`UnsupportedSize`."""
    if is_supported(n):
        return int(n)
    msg = f"fft size {n!r} is not supported; supported: 2**a * 3**b * 5**c in 1..{MAX_SIZE}"
    if isinstance(n, (int, np.integer)) and 1 <= n <= MAX_SIZE:
        i = bisect.bisect_left(_SIZES, int(n))
        msg += f" (nearest: {_SIZES[i - 1]}, {_SIZES[i]})"
    raise UnsupportedSize(msg, argument="n", value=n)


def check_dtype(dtype: Any, what: str = "fft input") -> bool:
    """True for complex128, False for complex64; :class:`DtypeError` for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DtypeError(f"{what} dtype {dtype!r} is not a numpy dtype", argument=what, value=dtype) from None
    double = _DTYPES.get(dt)
    if double is None:
        raise DtypeError(f"{what} dtype {dt} is not supported; expected complex64 or complex128 "
                         f"(convert explicitly, e.g. x.astype(np.complex64))", argument=what, value=dt)
    return double


def radices_for(n: int) -> tuple[int, ...]:
    """The canonical stage schedule for size n: radix-8 stages first, then 4, 5, 3, 2.

    Its length is the spec's pass count (:func:`accel_core.estimate.fft_passes`); the
    kernels run :func:`schedule_for` (same factors, tuned per path)."""
    n = check_size(n)
    a = b = c = 0
    while n % 2 == 0:
        n //= 2
        a += 1
    while n % 3 == 0:
        n //= 3
        b += 1
    while n % 5 == 0:
        n //= 5
        c += 1
    q, rem = divmod(a, 3)
    if rem == 0:
        twos = [8] * q
    elif rem == 2:
        twos = [8] * q + [4]
    elif q >= 1:
        twos = [8] * (q - 1) + [4, 4]
    else:
        twos = [2]
    fours = [r for r in twos if r == 4]
    rest = [r for r in twos if r == 2]
    return tuple([r for r in twos if r == 8] + fours + [5] * c + [3] * b + rest)


def schedule_for(n: int, double: bool, path: str) -> tuple[int, ...]:
    """The stage schedule the kernels run for size n = 2**a * 3**b * 5**c, precision and
    SIMD path. A radix-16 stage appears last (the fused, in-register 4 x 4 stage of
    csrc/fft_last16.h, which writes the interleaved output row) and, on the wide paths,
    at s = 8 in complex64 2048 = 8*16*16 (csrc/fft_mid16.h, see ``_MEASURED``) and, as two
    radix-4 stages blocked through L1, at s = 64 in complex64 4096 on AVX2 (``_BLOCKED16``).

    An even power of two is all radix 4 (4096 = 4**6; complex64 on AVX-512 from
    1024 on: 8*8*4*4...); an odd one (a >= 5) starts with one radix-8 stage for complex64
    (2048 = 8*4*4*4*4) and for complex128 ends its radix-4 stages with a radix-2 one
    (2048 = 4*4*4*4*4*2), or has a radix-8 second stage on AVX-512 (4*8*4*4*4) and a
    radix-8 third stage on the scalar path from 512 on (4*4*8*4*4); on AVX2 / AVX-512,
    512 points and complex64 2048 end with a radix-8 stage instead (4*4*4*8, 4*4*4*4*8;
    complex64 256 on AVX-512: 8*4*8),
    which writes the interleaved output row itself there (csrc/fft_first.h); then 5s and 3s
    (1536 complex128 = 4*4*4*4*2*3; 8*4*4*4*3 on AVX2: 0.96-0.99 of its time, five
    interleaved runs). A radix-8 stage with a stride s other than
    1, 4, 8 or 16 keeps 32 array streams live (eight legs, real and imaginary, in and
    out): more than x86-64's 16 general registers, so its loop reloads pointers and
    spills; at s = 4, 8, 16 the radix-4 and radix-8 stages index from one base per array
    with loops of a compile-time trip count (and a last one on the wide paths, with s a
    multiple of the vector width, is that explicit loop from one base per array).
    Re-timed with the explicit last radix-2 / radix-8 loops (interleaved, two runs each, a
    shared machine): AVX2 complex64 1024 / 3072 / 4096 all radix 4 0.91-0.93 / 0.97-0.98 /
    0.96-0.98 of the time of 8*8*4*4...; 512 4*4*4*8 0.91-0.94 (complex64 AVX2 and AVX-512),
    0.92-0.97 (complex128); complex64 2048 4*4*4*4*8 0.92-0.95 (AVX2), 0.98-0.99 (AVX-512);
    complex64 256 8*4*8 0.92 on AVX-512 (1.01 on AVX2); the powers of two in
    ``_MEASURED`` run the schedule measured faster on that path (mostly a last radix-16
    stage: 128 to 1024 points on AVX-512, 256 to 1024 on AVX2, see there).
    Not taken: complex64 4096 8*8*8*8 on AVX-512 (0.96 of 8*8*4*4*4, two runs) has radix-8
    stages at s = 64 (see above).
    Chosen by timing every ordering of 8s, 4s and at most one 2 on every path
    (``python -m vrdma.accel_bench.fft_bench --simd all`` for the figures): 4096-point
    complex128 on the scalar path went from 0.77-0.80x to 1.1-1.2x scipy.fft.
    """
    n = check_size(n)
    a = (n & -n).bit_length() - 1          # n = 2**a * odd
    tail = list(radices_for(n >> a))       # the 5s and 3s, in radices_for's order
    if a < 3 or (a == 3 and not tail):
        return radices_for(n)
    wide = path in ("avx2", "avx512")
    if not tail and (path, a, double) in _MEASURED:
        return _MEASURED[path, a, double]
    if a % 2 == 0:
        if not double and path == "avx512" and a == 8 and not tail:
            return (8, 4, 8)
        if not double and path == "avx512" and a >= 10:
            return tuple([8, 8] + [4] * ((a - 6) // 2) + tail)
        return tuple([4] * (a // 2) + tail)
    if a == 3:
        return (8, *tail)
    if wide and not tail and (a == 9 or (a == 11 and not double)):
        return tuple([4] * ((a - 3) // 2) + [8])
    if double and path == "avx512":
        return tuple([4, 8] + [4] * ((a - 5) // 2) + tail)
    if double and path == "scalar" and a >= 9 and not tail:
        return tuple([4, 4, 8] + [4] * ((a - 7) // 2))
    if double and path == "avx2" and a == 9 and tail == [3]:
        # 1536: a first radix-8 stage, as complex64 (0.96-0.99 of 4*4*4*4*2*3, five runs)
        return (8, 4, 4, 4, 3)
    if double:
        return tuple([4] * (a // 2) + [2] + tail)
    return tuple([8] + [4] * ((a - 3) // 2) + tail)


#: Schedules of powers of two 2**a, by (path, a, double), measured faster than the rules of
#: schedule_for (interleaved, the same build, 2-6 runs each on a shared machine, AMD EPYC
#: Zen 4; fractions of the time of the rule's schedule). Most end with the last radix-16
#: stage (4 x 4 in registers, csrc/fft_last16.h; its stride s a compile-time constant for
#: s = 8 ... 128). AVX-512: complex64 128 8*16 (0.91-0.92 of 8*4*4), 512 8*4*16 (0.89-0.93
#: of 4*4*4*8), 1024 8*8*16 (0.94-1.01 of 8*8*4*4, median 0.98); complex128 128 8*16
#: (0.93-0.96 of 4*4*8, itself 0.97-1.0 of 4*8*4), 256 4*4*16 (0.96-0.98 of 4**4), 512
#: 8*4*16 (0.97-0.98), 1024 8*8*16 (0.95-0.99 of 4**5); complex64 2048 8*8*4*8 (0.94-0.95
#: of 4*4*4*4*8; since replaced by 8*16*16, below). AVX2 (16 registers: the radix-16 stage
#: spills, so less often): complex64
#: 256 4*4*16 (0.96-1.0 of 4**4), 512 8*4*16 (0.97-1.0 of 4*4*4*8), 1024 4*4*4*16 (0.94 of
#: 4**5); complex128 256 4*4*16 (0.94-0.96), 1024 4*4*4*16 (0.91-0.95 of 4**5), 128 4*4*8
#: (0.95-0.96 of 4*4*4*2 in four runs, 1.0 in two; 8*16 0.96-1.0 of it). Not taken: a last
#: radix-16 stage at 2048 (1.0-1.15) and 4096 points (1.04-1.34: 16 input and 16 output
#: streams a power of two apart), 8*16 for complex64 128 on AVX2 (0.98-1.01).
#: complex64 2048 8*16*16 (a middle radix-16 stage in registers at s = 8, csrc/fft_mid16.h,
#: then the last radix-16 at s = 128): AVX2 0.95-0.995 of 4*4*4*4*8 in five of six runs
#: (1.08 in one), AVX-512 0.87-0.90 of 4*4*4*4*8 and 0.90-0.95 of 8*8*4*8. Middle radix-16
#: stages measured and not taken (same build, interleaved, 3-7 runs): complex64 4096 AVX2
#: 8*16*8*4 0.97-1.10 of 4**6 (and 8*16*16*2, 8*8*16*4, 4*4*4*16*4 0.98-1.10), AVX-512
#: 8*16*8*4 / 8*8*16*4 0.92-1.01 of 4**6, 0.97-1.01 of 8*8*4*4*4; complex128 2048 AVX2
#: 4*8*16*4 0.98-1.01, 8*16*4*4 1.02-1.09, 8*16*16 1.04-1.11 of 4*4*4*4*4*2, AVX-512
#: 4*8*16*4 0.99-1.03 of 4*8*4*4*4; at s = 2, 4, 16 (the blocked radix-4 pair, or s = 16
#: with a run-time m) 1.05-2.5x; a last radix-16 with s = 256 a compile-time constant
#: (4096 4*4*16*16, 4*4*4*4*16, 8*8*4*16) 0.96-1.04 for complex64, 1.3-1.5x for complex128;
#: the in-register middle stage at s = 4 (complex64 on 128-bit vectors, complex128 one
#: 256-bit vector per leg): complex64 4096 4*16*16*4 / 4*16*4*4*4 1.16-1.23x of 4**6,
#: complex128 2048 4*16*4*4*2 / 4*16*16*2 1.01-1.05x on AVX2 (0.94-0.99 on AVX-512, where
#: 4*8*4*4*4 is 0.92). Nor elsewhere (one run of five): 1024 8*16*8 1.03-1.16x of
#: 4*4*4*16, complex128 4096 8*16*8*4 / 8*16*16*2 / 4*8*16*8 1.04-1.24x of 4**6.
#: Plans whose middle radix-16 stage runs as the blocked radix-4 pair (_stage44), not in
#: registers, by (path, n, double): complex64 4096 4*4*4*16*4 on AVX2, the pair at s = 64,
#: 0.96-0.97 of the time of 4**6 in three of four runs (1.01 in one), through fft() against
#: the 4**6 kernel 0.99-1.0 of it (fft()'s own ~0.5 us a batch counted against it: 1.4%);
#: in registers 0.98-1.03.
_BLOCKED16 = frozenset({("avx2", 4096, False)})

_MEASURED = {
    ("avx512", 7, False): (8, 16), ("avx512", 9, False): (8, 4, 16), ("avx512", 10, False): (8, 8, 16),
    ("avx512", 11, False): (8, 16, 16),
    ("avx512", 7, True): (8, 16), ("avx512", 8, True): (4, 4, 16), ("avx512", 9, True): (8, 4, 16),
    ("avx512", 10, True): (8, 8, 16),
    ("avx2", 8, False): (4, 4, 16), ("avx2", 9, False): (8, 4, 16), ("avx2", 10, False): (4, 4, 4, 16),
    ("avx2", 11, False): (8, 16, 16), ("avx2", 12, False): (4, 4, 4, 16, 4),
    ("avx2", 7, True): (4, 4, 8), ("avx2", 8, True): (4, 4, 16), ("avx2", 10, True): (4, 4, 4, 16),
}


def _core(n: int, double: bool, inverse: bool, path: str | None = None) -> _fft.FFTCore:
    """The cached kernel plan for one size/precision/direction on ``path`` (default: the
    SIMD path in use, :func:`accel_core.simd.simd_path`)."""
    return _plan(n, double, inverse, simd.simd_path() if path is None else path)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(n: int, double: bool, inverse: bool, path: str) -> _fft.FFTCore:
    """Build (once per LRU entry) the kernel plan for one size/precision/direction/path."""
    return _build_core(n, double, inverse, path, schedule_for(n, double, path),
                       regs16=(path, n, double) not in _BLOCKED16)


def _build_core(n: int, double: bool, inverse: bool, path: str, radices: tuple[int, ...],
                regs16: bool = True) -> _fft.FFTCore:
    """A kernel plan running the stage schedule ``radices`` (its product n; tests run
    every stage variant of the kernels through this). A middle radix-16 stage runs in
    registers where the wide builds' loop takes its stride (``regs16``), else as two
    radix-4 stages in a blocked order (always, with ``regs16=False``)."""
    if math.prod(radices) != n:  # before the tables (a zero m would divide by zero there)
        raise ValueError(f"radices {tuple(radices)!r} do not multiply to {n}")
    sg = -1.0 if inverse else 1.0
    tw_parts = []
    offsets = []
    off = 0
    s = 1
    for i, r in enumerate(radices):
        m = n // (s * r)
        offsets.append(off)
        # a middle radix 16 runs as two radix-4 stages in a blocked order (_stage44): their
        # two tables (m' = 4m at stride s, then m at 4s), one after the other
        # and the radix-16 table of the in-register stage (csrc/fft_mid16.h)
        mid = r == 16 and 0 < i < len(radices) - 1
        for rr, mm in ((4, 4 * m), (4, m), (16, m)) if mid else ((r, m),):
            k = np.arange(1, rr, dtype=np.float64)[:, None]
            p = np.arange(mm, dtype=np.float64)[None, :]
            # w_k(p) = exp(-sg * 2*pi*i * k*p / (r*m)); reduce k*p mod r*m for accuracy
            ang = (-sg * 2.0 * math.pi / (rr * mm)) * np.mod(k * p, rr * mm)
            tw_parts.append(np.exp(1j * ang).ravel())
        off += (r - 1) * m * (2 if mid else 1)
        s *= r
    tw = np.concatenate(tw_parts) if tw_parts else np.zeros(0, np.complex128)
    real = _REAL[double]
    twr = np.ascontiguousarray(tw.real, dtype=real)
    twi = np.ascontiguousarray(tw.imag, dtype=real)
    if twr.size == 0:  # keep a valid data pointer
        twr = np.zeros(1, real)
        twi = np.zeros(1, real)
    kc = np.array([
        sg,
        math.sqrt(0.5),
        0.5,
        sg * math.sqrt(3.0) / 2.0,
        math.cos(2 * math.pi / 5),
        math.cos(4 * math.pi / 5),
        sg * math.sin(2 * math.pi / 5),
        sg * math.sin(4 * math.pi / 5),
        1.0 / n if inverse else 1.0,
    ], dtype=real)
    core: _fft.FFTCore = simd.kernel_module("fft", path).FFTCore(n, double, inverse, radices, twr, twi, kc,
                                                                 offsets, regs16)
    return core


def check_shape(shape: tuple[int, ...], what: str = "fft input") -> int:
    """The transform size (last axis) of an input of ``shape``; ShapeError / UnsupportedSize."""
    if not shape:
        raise ShapeError(f"{what} is 0-d; need at least one axis (the transform axis is the last)",
                         argument=what, value=shape)
    n = shape[-1]
    return n if n in _SIZE_SET else check_size(n)  # shape entries are ints: skip the type checks


def check_input(x: Any) -> tuple[np.ndarray, int, bool]:
    """Return (C-contiguous array, n, double) for a valid fft input, else raise.

    A non-contiguous array is copied (the kernel needs C-contiguous rows); other
    array-likes are converted with ``np.asarray`` but never cast.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes)) or x is None:
            raise DtypeError(f"fft input must be an array of complex64/complex128, got {type(x).__name__}",
                             argument="fft input", value=type(x))
        x = np.asarray(x)
    double = _DTYPES.get(x.dtype)
    if double is None:
        double = check_dtype(x.dtype)  # raises
    n = check_shape(x.shape)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # a copy: the kernel needs C-contiguous rows
    return x, n, double


def check_out(x: np.ndarray, out: Any) -> np.ndarray:
    """Check a caller's ``out`` for input ``x``: ndarray of x's dtype and shape, C-contiguous,
    writable, and either disjoint from x or x's very memory (in place)."""
    if not isinstance(out, np.ndarray):
        raise DtypeError(f"out must be a numpy array, got {type(out).__name__}", argument="out",
                         value=type(out))
    if out.dtype != x.dtype:
        raise DtypeError(f"out dtype {out.dtype} does not match input dtype {x.dtype}",
                         argument="out", value=out.dtype)
    if out.shape != x.shape:
        raise ShapeError(f"out shape {out.shape} does not match input shape {x.shape}",
                         argument="out", value=out.shape)
    if not out.flags.c_contiguous:
        raise LayoutError("out must be C-contiguous", argument="out", value=out.strides)
    if not out.flags.writeable:
        raise LayoutError("out is read-only", argument="out")
    if out is not x and np.may_share_memory(x, out):
        check_overlap(x, out, in_place_ok=True, what="out")
    return out


def transform_into(x: np.ndarray, out: np.ndarray, inverse: bool) -> np.ndarray:
    """Transform the rows of ``x`` into ``out``, both already checked (:func:`check_input`,
    :func:`check_out` or the job's equivalents). Returns ``out``."""
    return _core(x.shape[-1], _DTYPES[x.dtype], inverse).execute(x, out)


def _execute(core, x, out):
    if out is None:
        out = np.empty_like(x)
    else:
        check_out(x, out)
    return core.execute(x, out)


def _fast(x, out, inverse: bool):
    """The plan for (x, out) when they pass every check as they are (one C call,
    :func:`accel_core._fft.fast_args`, and the size), else None: then the checks above
    run (they convert, or raise the typed error). Saves about 0.8 us of the 1.2 us the
    checks took per call: per row of a 128-row batch, 5% of a 128-point transform."""
    k = _fft.fast_args(x, out)
    if k < 0 or (k >> 1) not in _SIZE_SET:
        return None
    return _plan(k >> 1, bool(k & 1), inverse, simd.simd_path())


def fft(x, out=None):
    """Forward FFT along the last axis (numpy.fft.fft convention, no scaling).

    ``out`` may be a preallocated C-contiguous array of x's shape and dtype, or
    ``x`` itself (in-place). Returns the output array.
    """
    core = _fast(x, out, False)
    if core is not None:
        return core.execute(x, np.empty_like(x) if out is None else out)
    x, n, double = check_input(x)
    return _execute(_core(n, double, False), x, out)


def ifft(x, out=None):
    """Inverse FFT along the last axis, scaled by 1/n (numpy.fft.ifft convention)."""
    core = _fast(x, out, True)
    if core is not None:
        return core.execute(x, np.empty_like(x) if out is None else out)
    x, n, double = check_input(x)
    return _execute(_core(n, double, True), x, out)


class FFTPlan:
    """An explicit, reusable plan for size-n transforms of one dtype.

    ``plan.forward(x, out=None)`` / ``plan.inverse(x, out=None)`` behave like
    :func:`fft` / :func:`ifft` but require ``x.shape[-1] == n`` and the plan's
    dtype. The kernel tables are shared with the module-level plan cache.
    """

    __slots__ = ("n", "dtype", "_double", "_fwd", "_inv")

    def __init__(self, n, dtype=np.complex64):
        self.n = check_size(n)
        double = check_dtype(dtype, "FFTPlan")
        self.dtype = np.dtype(dtype)
        self._double = double
        self._fwd = _core(self.n, double, False)
        self._inv = None

    @property
    def radices(self) -> tuple[int, ...]:
        return self._fwd.radices

    def _check(self, x):
        x, n, double = check_input(x)
        if n != self.n:
            raise ShapeError(f"plan is for n={self.n} {self.dtype}; got last axis {n} {x.dtype}",
                             argument="x", value=x.shape)
        if double != self._double:
            raise DtypeError(f"plan is for n={self.n} {self.dtype}; got last axis {n} {x.dtype}",
                             argument="x", value=x.dtype)
        return x

    def forward(self, x, out=None):
        """Forward transform along the last axis with this plan."""
        return _execute(self._fwd, self._check(x), out)

    def inverse(self, x, out=None):
        """Inverse transform (scaled by 1/n) along the last axis with this plan."""
        if self._inv is None:
            self._inv = _core(self.n, self._double, True)
        return _execute(self._inv, self._check(x), out)

    def __repr__(self) -> str:
        return f"FFTPlan(n={self.n}, dtype={self.dtype}, radices={self.radices})"
