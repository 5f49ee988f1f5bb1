# C-level interface of the LTE CRC24 kernel (accel_core/_crc.pyx), for cimport by other kernels.
from libc.stdint cimport uint8_t, uint32_t

cdef enum:
    CRC24A = 0
    CRC24B = 1

# Remainder (24 bits, p0 in bit 23) of the n bits bits[0], bits[stride], ... (each 0 or 1)
# divided by gCRC24A (which=CRC24A) or gCRC24B (which=CRC24B), register starting at zero.
cdef uint32_t crc24_remainder(const uint8_t* bits, Py_ssize_t n, Py_ssize_t stride,
                              int which) noexcept nogil
