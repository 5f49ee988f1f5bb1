"""Table-driven CRC24A/CRC24B kernel of 3GPP TS 36.212 §5.1.1 (see accel_core.crc).

Bits are uint8 0/1 values, a_0 first (highest-order coefficient). Eight bits are
packed into a byte and folded with one 256-entry table lookup; the n % 8 leftover
bits go bit-serially. No Python objects in the loops; validation lives in crc.py.
"""
from libc.stdint cimport uint8_t, uint32_t

#: The ``which`` ids of the two CRCs for Python callers: the ``cdef enum`` of _crc.pxd, the one
#: definition (the Turbo decoder's early stop passes them straight to crc24_remainder).
CRC24A_ID = CRC24A
CRC24B_ID = CRC24B

# Generator polynomials without the D^24 term.
cdef uint32_t[2] _POLY = [0x864CFB, 0x800063]
cdef uint32_t[2][256] _TABLE


cdef void _build_tables() noexcept nogil:
    cdef int which, v, i
    cdef uint32_t r
    for which in range(2):
        for v in range(256):
            r = (<uint32_t>v) << 16
            for i in range(8):
                if r & 0x800000:
                    r = ((r << 1) ^ _POLY[which]) & 0xFFFFFF
                else:
                    r = (r << 1) & 0xFFFFFF
            _TABLE[which][v] = r


_build_tables()


cdef uint32_t crc24_remainder(const uint8_t* bits, Py_ssize_t n, Py_ssize_t stride,
                              int which) noexcept nogil:
    cdef const uint32_t* tab = _TABLE[which]
    cdef uint32_t poly = _POLY[which]
    cdef uint32_t crc = 0, byte, fb
    cdef Py_ssize_t nbytes = n >> 3, i, j
    cdef const uint8_t* p = bits
    for i in range(nbytes):
        byte = 0
        for j in range(8):
            byte = (byte << 1) | (p[0] & 1)
            p += stride
        crc = ((crc << 8) & 0xFFFFFF) ^ tab[((crc >> 16) ^ byte) & 0xFF]
    for i in range(n & 7):
        fb = ((crc >> 23) ^ p[0]) & 1
        crc = (crc << 1) & 0xFFFFFF
        if fb:
            crc ^= poly
        p += stride
    return crc


def crc24_rows(const uint8_t[:, ::1] bits, int which, uint32_t[::1] out):
    """out[r] = CRC24 remainder of row r of ``bits`` (which: 0 = CRC24A, 1 = CRC24B)."""
    cdef Py_ssize_t r, rows = bits.shape[0], n = bits.shape[1]
    if which != CRC24A and which != CRC24B:
        raise ValueError(f"which must be 0 (CRC24A) or 1 (CRC24B), got {which}")
    if out.shape[0] != rows:
        raise ValueError(f"out has {out.shape[0]} entries for {rows} rows")
    if n == 0:
        out[:] = 0
        return
    with nogil:
        for r in range(rows):
            out[r] = crc24_remainder(&bits[r, 0], n, 1, which)
