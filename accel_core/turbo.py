"""LTE turbo code (3GPP TS 36.212 §5.1.3.2): encoder and iterative max-log-MAP decoder.

Encoder (§5.1.3.2.1): a parallel concatenation of two 8-state recursive systematic
convolutional (RSC) encoders with transfer function G(D) = [1, g1(D)/g0(D)],
g0 = 1 + D^2 + D^3 (feedback, octal 13) and g1 = 1 + D + D^3 (octal 15); the second
encoder reads the information bits through the QPP interleaver (§5.1.3.2.3, see
accel_core.qpp). Each encoder is driven back to state zero with three tail bits;
the 12 tail bits x_K z_K x_K+1 z_K+1 x_K+2 z_K+2 x'_K z'_K x'_K+1 z'_K+1 x'_K+2 z'_K+2
are spread over d(0), d(1), d(2) as §5.1.3.2.2 prescribes. The output is
d(0), d(1), d(2), each K + 4 bits: shape [3, K + 4] ([B, 3, K + 4] for a batch).

Decoder: the classic iterative (turbo) decoder with two max-log-MAP (BCJR) component
decoders that use the tail bits to terminate both trellises. Input is float32 LLRs
shaped like the encoder output with LLR = log(P(bit=0) / P(bit=1)) (positive means 0;
for BPSK 0 -> +1 over AWGN, LLR = 2y/sigma^2). ``scaling`` multiplies the extrinsic
information exchanged between the decoders (None: plain max-log-MAP; ~0.7-0.75
recovers most of the gap to log-MAP). ``early_stop="crc24a"|"crc24b"`` stops a code
block once the CRC of its hard decision checks (the block's last 24 bits are its CRC).

Batches of code blocks of the same K are decoded together, the whole batch without
the GIL, by the Cython kernel of the SIMD path in use (accel_core._turbo, _turbo_avx2 or
_turbo_avx512, picked by :mod:`accel_core.simd`): a max-log-MAP decoder in 16-bit fixed
point (LLRs quantised to 1/``LLR_SCALE``, saturated to +-LLR_LIMIT; extrinsic values
saturated too) that keeps ``BATCH_LANES`` trellis segments side by side in int16 SIMD
lanes. A block is cut into P segments (P = the largest power of two <= MAX_SEGMENTS
with K/P >= MIN_SEGMENT, so P depends on K only and a block decodes identically alone,
in any batch and on every SIMD path); inner segment boundaries start from the metrics
of the previous iteration (next-iteration initialisation, the usual parallel-window
turbo decoder). The BER checks of tests/accel/test_turbo.py hold on every path. This
module validates and shapes; it does no I/O.

Input conversion policy: float32 LLRs are used as given; other real floating dtypes
are converted to float32; integer, bool and complex inputs are refused
(:class:`~accel_core.errors.DtypeError`, a TypeError). Non-finite LLRs are refused
(:class:`~accel_core.errors.ElementError` naming the first one). Finite LLRs are
clipped to +-LLR_LIMIT, the saturation bound of the decoder's metrics.

Validation is written once, here (:func:`check_llr`, :func:`check_iterations`,
:func:`check_scaling`, :func:`check_early_stop`; bits in :mod:`accel_core.crc`, K in
:mod:`accel_core.qpp`), raising the typed errors of :mod:`accel_core.errors`.
:func:`turbo_encode` / :func:`turbo_decode` run those checks and then the kernel;
jobs run them at ``Job.create`` and later call :func:`encode_into` /
:func:`decode_into`, which only check element values (guest memory may change
until the job runs) and write into the job's output.
"""
from __future__ import annotations

import numbers

import numpy as np

from accel_core import _turbo, simd
from accel_core.crc import CRC24A_ID, CRC24B_ID, as_bits, check_bit_values
from accel_core.errors import DtypeError, ElementError, ParameterError, ParameterTypeError, ShapeError
from accel_core.qpp import check_block_size, qpp_table

__all__ = [
    "turbo_encode", "turbo_decode", "TAIL_BITS", "MAX_ITERATIONS", "LLR_LIMIT", "EARLY_STOP_CRCS",
    "check_llr", "check_iterations", "check_scaling", "check_early_stop", "encode_into", "decode_into",
]

#: Tail bits per stream (d(0), d(1), d(2) each have K + TAIL_BITS entries).
TAIL_BITS = 4
#: Upper bound of the ``iterations`` argument.
MAX_ITERATIONS = 64
#: LLR magnitude at which the decoder saturates its inputs (the same on every SIMD path).
LLR_LIMIT = float(_turbo.LLR_LIMIT)
#: Shortest trellis segment: a block of K bits is decoded as the largest power-of-two
#: number of segments (at most the kernel's MAX_SEGMENTS) at least this long.
MIN_SEGMENT = 256
#: Accepted ``early_stop`` values -> CRC kind of the kernel.
EARLY_STOP_CRCS = {"crc24a": CRC24A_ID, "crc24b": CRC24B_ID}


def turbo_encode(bits: object) -> np.ndarray:
    """Turbo-encode uint8 0/1 ``bits`` [K] or [B, K] into d(0..2): uint8 [3, K+4] or [B, 3, K+4].

    K must be one of the 188 sizes of TS 36.212 Table 5.1.3-3 (``qpp.BLOCK_SIZES``).
    """
    arr = as_bits(bits)
    K = check_block_size(arr.shape[-1])
    out = np.empty((*arr.shape[:-1], 3, K + TAIL_BITS), dtype=np.uint8)
    _encode(arr, out)
    return out


def _encode(bits: np.ndarray, out: np.ndarray) -> None:
    K = bits.shape[-1]
    kernel = simd.kernel_module("turbo")
    kernel.encode_batch(bits.reshape(-1, K), qpp_table(K), out.reshape(-1, 3, K + TAIL_BITS))


def encode_into(bits: np.ndarray, out: np.ndarray) -> None:
    """Encode checked uint8 ``bits`` [K] / [B, K] (C-contiguous, K a table size) into the
    checked uint8 ``out`` [3, K+4] / [B, 3, K+4]; checks only that the bits are 0/1."""
    check_bit_values(bits)
    _encode(bits, out)


def check_iterations(iterations: object) -> int:
    """``iterations`` as an int in 1..MAX_ITERATIONS; ParameterTypeError / ParameterError."""
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise ParameterTypeError(f"iterations must be an int, got {type(iterations).__name__}",
                                 argument="iterations", value=iterations)
    if not 1 <= int(iterations) <= MAX_ITERATIONS:
        raise ParameterError(f"iterations={iterations} is outside 1..{MAX_ITERATIONS}",
                             argument="iterations", value=iterations)
    return int(iterations)


def check_scaling(scaling: object) -> float | None:
    """``scaling`` as None (plain max-log-MAP) or a float in (0, 1]; ParameterTypeError / ParameterError."""
    if scaling is None:
        return None
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ParameterTypeError(f"scaling must be None or a real number, got {type(scaling).__name__}",
                                 argument="scaling", value=scaling)
    value = float(scaling)
    if not 0.0 < value <= 1.0:
        raise ParameterError(f"scaling={scaling!r} is outside (0, 1]", argument="scaling", value=scaling)
    return value


def check_early_stop(early_stop: object) -> str | None:
    """``early_stop`` if it is None, 'crc24a' or 'crc24b'; else ParameterError."""
    if early_stop is not None and (not isinstance(early_stop, str) or early_stop not in EARLY_STOP_CRCS):
        raise ParameterError(f"early_stop={early_stop!r} must be None, 'crc24a' or 'crc24b'",
                             argument="early_stop", value=early_stop)
    return early_stop


def check_llr(llr: object) -> np.ndarray:
    """``llr`` as an ndarray (not copied) if it is a real float array [3, K+4] or [B, 3, K+4]
    with K a table size; DtypeError / ShapeError / BlockSizeError otherwise. Values are not
    looked at (see :func:`decode_into`)."""
    arr = np.asarray(llr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DtypeError(f"llr must be a float32 array (other real float dtypes are converted), "
                         f"got dtype {arr.dtype}", argument="llr", value=arr.dtype)
    if arr.ndim not in (2, 3) or arr.shape[-2] != 3:
        raise ShapeError(f"llr must be shaped [3, K + {TAIL_BITS}] or [B, 3, K + {TAIL_BITS}], "
                         f"got shape {arr.shape}", argument="llr", value=arr.shape)
    K = arr.shape[-1] - TAIL_BITS
    check_block_size(K, f"llr last dimension {arr.shape[-1]} gives K = {K}")
    return arr


def _finite_clipped(arr: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy of the LLRs clipped to +-LLR_LIMIT; ElementError naming the
    first non-finite one (in ``arr``'s own indices)."""
    with np.errstate(over="ignore"):      # float64 beyond float32 range -> inf, refused below
        out = np.array(arr, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(out)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ElementError(f"llr{list(where)} = {arr[where]} is not finite "
                           f"(as float32: {out[where]})", argument="llr", value=arr[where])
    np.clip(out, -LLR_LIMIT, LLR_LIMIT, out=out)
    return out


def decode_into(llr: np.ndarray, out: np.ndarray, *, iterations: int, scaling: float | None,
                early_stop: str | None) -> np.ndarray:
    """Decode checked LLRs (:func:`check_llr`) into the checked uint8 ``out`` [K] / [B, K]
    (C-contiguous) with checked parameters; checks only that the LLRs are finite.

    Returns the int32 iterations used per block, [B] (one entry for a single block).
    """
    x = _finite_clipped(llr)
    K = x.shape[-1] - TAIL_BITS
    blocks = x.reshape(-1, 3, K + TAIL_BITS)
    used = np.empty(blocks.shape[0], dtype=np.int32)
    kernel = simd.kernel_module("turbo")
    kernel.decode_batch(blocks, qpp_table(K), iterations, 1.0 if scaling is None else scaling,
                        -1 if early_stop is None else EARLY_STOP_CRCS[early_stop],
                        out.reshape(-1, K), used, kernel.segments_for(K, MIN_SEGMENT))
    return used


def turbo_decode(llr: object, *, iterations: int = 8, scaling: float | None = None,
                 early_stop: str | None = None) -> tuple[np.ndarray, int | np.ndarray]:
    """Decode LLRs [3, K+4] (or [B, 3, K+4]) of d(0), d(1), d(2); LLR = log P(0)/P(1).

    Returns ``(bits, iters_used)``: uint8 bits [K] and an int for one block, or
    bits [B, K] and int32 iters_used [B] for a batch. ``iterations`` is the number
    of full turbo iterations (both decoders), the maximum when ``early_stop`` is set.
    """
    its = check_iterations(iterations)
    scale = check_scaling(scaling)
    stop = check_early_stop(early_stop)
    arr = check_llr(llr)
    bits = np.empty((*arr.shape[:-2], arr.shape[-1] - TAIL_BITS), dtype=np.uint8)
    used = decode_into(arr, bits, iterations=its, scaling=scale, early_stop=stop)
    if arr.ndim == 2:
        return bits, int(used[0])
    return bits, used
