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

cdef enum:
    #: datagrams in one UDP GSO send (Linux's UDP_MAX_SEGMENTS is 64, 128 since
    #: 6.9: the smaller). The kernel gives segment k of a send IPv4 ID base + k,
    #: and a sender with DF on an unconnected socket has base 0, so the
    #: segments of a GSO send carry IDs 0 .. GSO_SEGMENTS - 1 (roce._udpio).
    GSO_SEGMENTS = 64

cdef uint32_t icrc_id_delta(size_t udp_payload_len, uint16_t ip_id) noexcept nogil
cdef int icrc_id_solve(size_t udp_payload_len, uint32_t delta) noexcept nogil
