# cython: language_level=3
"""C-level RoCEv2 codec, cimported by roce._udpio: the opcode table, the
IP/UDP envelope of a peer, syntax + ICRC checks of a received datagram, and
header encoding. The Python reference is roce.packet / roce.headers."""
from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t, uint64_t

# What an opcode's packet looks like (from roce.opcodes.OPCODE_TABLE).
cdef struct OpDesc:
    uint8_t valid
    uint8_t has_payload
    uint8_t hdr_len          # BTH + extension headers
    int16_t reth             # offset of each extension header, -1 if absent
    int16_t aeth
    int16_t immdt
    int16_t atomic_eth
    int16_t atomic_ack_eth
    int16_t deth
    int16_t ieth

# parse_verify results
cdef enum:
    PARSE_OK = 0
    PARSE_MALFORMED = 1      # syntax: the reference decode raises a MalformedPacket
    PARSE_ICRC = 2           # ICRC wrong for IPv4 ID 0 / the given ID (maybe a real ID)


cdef struct Parsed:
    int status
    uint8_t opcode
    uint8_t pad
    uint32_t hdr_len
    uint32_t payload_len     # without pad
    uint32_t icrc            # as received
    uint16_t ip_id           # IPv4 ID the ICRC was valid for: 0, or a UDP GSO segment's index


cdef class Envelope:
    """IP/UDP envelope between this host and one peer, as the ICRC needs it.
    ``src``/``dst`` are the sender's and receiver's addresses."""
    cdef readonly int version
    cdef uint8_t src_b[16]
    cdef uint8_t dst_b[16]
    cdef readonly uint16_t sport
    cdef readonly uint16_t dport
    cdef readonly str src
    cdef readonly str dst
    cdef uint8_t sockaddr[28]     # dst as a sockaddr_in / sockaddr_in6 (sending)
    cdef uint32_t sockaddr_len


cdef const OpDesc *opdesc(uint8_t opcode) noexcept nogil
cdef int parse_verify(const uint8_t *p, size_t n, Envelope env, Parsed *out) noexcept nogil
cdef object build_packet(const uint8_t *p, Parsed *ps, object ip_id)
cdef Py_ssize_t encode_header(object pkt, uint8_t *hdr, Py_ssize_t plen) except -2
cdef object new_bth(int opcode, uint32_t dest_qp, uint32_t psn, bint se, bint ackreq, int pkey)
