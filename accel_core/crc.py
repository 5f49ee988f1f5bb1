"""LTE CRC24A / CRC24B (3GPP TS 36.212 §5.1.1), on arrays of bits.

The CRC parity bits p_0..p_23 of a block a_0..a_{A-1} are chosen so that
a_0·D^(A+23) + ... + a_{A-1}·D^24 + p_0·D^23 + ... + p_23 is divisible by the
generator (register starts at zero, no final inversion):

* gCRC24A(D) = D^24+D^23+D^18+D^17+D^14+D^11+D^10+D^7+D^6+D^5+D^4+D^3+D+1
  (transport block CRC),
* gCRC24B(D) = D^24+D^23+D^6+D^5+D+1 (code block CRC).

Bits are numpy arrays of 0/1 (any integer or bool dtype); a 1-D array is one
block, a 2-D array [B, A] is B blocks of equal length handled in one call.
The arithmetic is the table-driven kernel in ``accel_core._crc``; this module
only validates and shapes. It owns the check of bit arrays (:func:`as_bits`,
:func:`check_bit_array`, :func:`check_bit_values`), which the Turbo encoder uses too; bad input raises
:class:`~accel_core.errors.DtypeError` (a ``TypeError``),
:class:`~accel_core.errors.ShapeError` or :class:`~accel_core.errors.ElementError`
(``ValueError`` s) naming the bad value. Pure: no I/O.
"""
from __future__ import annotations

import numpy as np

from accel_core import _crc
from accel_core.errors import DtypeError, ElementError, ShapeError

__all__ = [
    "CRC_LENGTH", "GCRC24A", "GCRC24B", "CRC24A_ID", "CRC24B_ID", "as_bits", "check_bit_array",
    "check_bit_values",
    "crc24a", "crc24b", "attach_crc24a", "attach_crc24b", "check_crc24a", "check_crc24b",
]

CRC_LENGTH = 24
#: Generator polynomials as integers (bit i = coefficient of D^i).
GCRC24A = 0x1864CFB
GCRC24B = 0x1800063

#: Kernel ids of the two CRCs (``which`` of ``accel_core._crc``; the early-stop ids of the
#: Turbo decoder), defined once in ``_crc.pxd``.
CRC24A_ID = _crc.CRC24A_ID
CRC24B_ID = _crc.CRC24B_ID
_A, _B = CRC24A_ID, CRC24B_ID
_SHIFTS = np.arange(CRC_LENGTH - 1, -1, -1, dtype=np.uint32)


def check_bit_values(arr: np.ndarray, name: str = "bits") -> None:
    """ElementError naming the first element of an integer array that is not 0 or 1."""
    if arr.dtype != np.bool_ and arr.size:
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ElementError(f"{name}{list(where)} = {arr[where]} is not a bit (0 or 1)",
                               argument=name, value=arr[where])


def check_bit_array(arr: np.ndarray, name: str = "bits") -> None:
    """DtypeError unless an integer or bool array, ShapeError unless 1-D [A] or 2-D [B, A]
    (element values are :func:`check_bit_values`' business)."""
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise DtypeError(f"{name} must be an integer or bool array of 0/1, got dtype {arr.dtype}",
                         argument=name, value=arr.dtype)
    if arr.ndim not in (1, 2):
        raise ShapeError(f"{name} must be 1-D [A] or 2-D [B, A], got shape {arr.shape}",
                         argument=name, value=arr.shape)


def as_bits(bits: object, name: str = "bits") -> np.ndarray:
    """Validate a 1-D or 2-D array of 0/1 values; return it as C-contiguous uint8."""
    arr = np.asarray(bits)
    check_bit_array(arr, name)
    check_bit_values(arr, name)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _remainders(bits: np.ndarray, which: int) -> np.ndarray:
    rows = bits.reshape(bits.shape[0] if bits.ndim == 2 else 1, bits.shape[-1])
    out = np.empty(rows.shape[0], dtype=np.uint32)
    _crc.crc24_rows(rows, which, out)
    return out


def _crc_bits(bits: object, which: int) -> np.ndarray:
    arr = as_bits(bits)
    rem = _remainders(arr, which)
    par = ((rem[:, None] >> _SHIFTS) & 1).astype(np.uint8)
    return par[0] if arr.ndim == 1 else par


def _attach(bits: object, which: int) -> np.ndarray:
    arr = as_bits(bits)
    return np.concatenate([arr, _crc_bits(arr, which)], axis=-1)


def _check(bits: object, which: int) -> bool | np.ndarray:
    arr = as_bits(bits, "bits_with_crc")
    if arr.shape[-1] < CRC_LENGTH:
        raise ShapeError(f"bits_with_crc has {arr.shape[-1]} bits per block, "
                         f"fewer than the {CRC_LENGTH} CRC bits", argument="bits_with_crc", value=arr.shape)
    ok = _remainders(arr, which) == 0
    return bool(ok[0]) if arr.ndim == 1 else ok


def crc24a(bits: object) -> np.ndarray:
    """CRC24A parity bits p_0..p_23 (uint8[24], or [B, 24] for 2-D input)."""
    return _crc_bits(bits, _A)


def crc24b(bits: object) -> np.ndarray:
    """CRC24B parity bits p_0..p_23 (uint8[24], or [B, 24] for 2-D input)."""
    return _crc_bits(bits, _B)


def attach_crc24a(bits: object) -> np.ndarray:
    """``bits`` followed by their CRC24A (length A + 24 along the last axis)."""
    return _attach(bits, _A)


def attach_crc24b(bits: object) -> np.ndarray:
    """``bits`` followed by their CRC24B (length A + 24 along the last axis)."""
    return _attach(bits, _B)


def check_crc24a(bits_with_crc: object) -> bool | np.ndarray:
    """True when a block ending in its CRC24A checks (bool array [B] for 2-D input)."""
    return _check(bits_with_crc, _A)


def check_crc24b(bits_with_crc: object) -> bool | np.ndarray:
    """True when a block ending in its CRC24B checks (bool array [B] for 2-D input)."""
    return _check(bits_with_crc, _B)
