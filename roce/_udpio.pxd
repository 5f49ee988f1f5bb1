# cython: language_level=3
"""C-level view of roce._udpio's rings: the receive ring, cimported by
roce.rc._fastrx; the transmit ring's message entry point (TxRing.add_msg),
cimported by virtio_rdma._datapath."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from roce._auth cimport TxAuth
from roce._codec cimport Envelope


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

cdef enum:
    SLOT = 65536          # bytes per receive slot: any UDP datagram (or coalesced buffer) fits
    NAMELEN = 28          # sockaddr_in6; sockaddr_in is 16
    PER_SLOT = 128        # datagrams split from one coalesced slot at most (UDP_MAX_SEGMENTS)


cdef class RxRing:
    cdef int nslots
    cdef readonly int count         # datagrams: entries of pkt / plen / pslot
    cdef readonly int slots         # slots recvmmsg filled
    cdef uint8_t *buf
    cdef uint8_t *names
    cdef iovec *iovs
    cdef mmsghdr *msgs
    cdef uint8_t *ctl
    # per datagram i: its bytes, length (0: dropped), and slot (sender's address)
    cdef uint8_t **pkt
    cdef uint32_t *plen
    cdef uint16_t *pslot
    cdef readonly unsigned long long gro_buffers, gro_packets, gro_dropped

    cdef object _key(self, int i)
    cdef void _check(self, int i) except *
    cdef void _split(self, int r) noexcept


cdef class TxRing:
    cdef readonly int nslots
    cdef readonly int count
    cdef uint8_t *hdrs
    cdef uint8_t *trailers
    cdef uint8_t *names
    cdef iovec *iovs
    cdef mmsghdr *msgs
    cdef list keep              # memoryviews (buffer exports) the queued iovecs point into
    cdef TxAuth auth            # seals datagrams added with seal=True
    # per slot: UDP payload length, ICRC for IPv4 ID 0, index in its GSO run
    # (0: the run starts here), the seal counter, its envelope
    cdef uint32_t *dlen
    cdef uint32_t *crc0
    cdef uint16_t *seg
    cdef uint64_t *ctr
    cdef uint8_t *sealed
    cdef list envs
    # the messages of one flush: a slot alone, or a GSO run of slots
    cdef mmsghdr *out
    cdef iovec *oiov
    cdef uint8_t *ctl
    cdef int *ofirst
    cdef int *ocount
    #: send runs of equal datagrams through UDP GSO (off after a refusal)
    cdef public bint gso
    cdef readonly unsigned long long gso_calls, gso_datagrams, gso_fallbacks
    #: packets whose payload had more pieces than a datagram's iovecs: copied (add_msg)
    cdef readonly unsigned long long gathered

    #: the endpoint whose socket flush_direct sends on (roce.udp.RoceUdpEndpoint), or None
    cdef public object owner
    #: flushes flush_direct did (the endpoint's Python tx_added skipped)
    cdef readonly unsigned long long direct_flushes

    cdef int flush_direct(self, uint32_t n, bint seal) except -1
    cdef list _flush(self, int fd, int *res)
    cdef void _release(self) noexcept
    cdef int _hold(self, object obj, const uint8_t **buf, Py_ssize_t *length) except -1
    cdef void _finish(self, int i, Envelope env, Py_ssize_t hlen, Py_ssize_t plen,
                      int npieces, bint seal) noexcept nogil
    cdef void _seal(self, Envelope env, iovec *iov, int niov, uint8_t *out,
                    uint64_t counter) noexcept nogil
    cdef int add_msg(self, int first_op, int mid_op, int last_op, int only_op, int npkts,
                     int first, int count, uint32_t psn0, uint32_t dest_qp, int pkey,
                     uint64_t mtu, uint64_t length, list views, list starts, bint has_reth,
                     uint64_t va, uint32_t rkey, bint has_imm, uint32_t imm, bint has_ieth,
                     uint32_t ieth, bint se, uint32_t noack, uint32_t ack_every, Envelope env,
                     int start, bint seal) except -1
    cdef void _alone(self, int i) noexcept
    cdef int _plan(self, int o, int i, int n) noexcept
    cdef bytes _slot_bytes(self, int i)
    cdef tuple _slot_addr(self, int i)
