# cython: language_level=3
"""C-level CRC-32 and RoCEv2 ICRC kernels, cimported by roce._codec.

``crc32_raw`` is the bare reflected CRC-32 register update (polynomial
0xEDB88320, no pre/post inversion): ``crc32_raw(~v, p, n) ^ 0xFFFFFFFF`` is
``zlib.crc32(bytes, v)``, and a message may be fed in pieces.
``icrc_seed`` is the raw register after the masked LRH, IP and UDP headers
and the masked BTH of one packet (annex A17.3.3); continuing it over the rest
of the packet and inverting gives the ICRC.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef uint32_t crc32_raw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
cdef uint32_t icrc_seed(int version, const uint8_t *src, const uint8_t *dst, uint16_t sport,
                        uint16_t dport, uint16_t ip_id, bint df, size_t udp_payload_len,
                        const uint8_t *bth) noexcept nogil
