# cython: language_level=3
"""C-level view of roce._udpio's receive ring, cimported by roce.rc._fastrx."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t


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
