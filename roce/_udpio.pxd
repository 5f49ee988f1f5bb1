# cython: language_level=3
"""C-level view of roce._udpio's receive ring, cimported by roce.rc._fastrx."""
from libc.stdint cimport uint8_t


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
    SLOT = 65536          # bytes per receive slot: any UDP datagram fits
    NAMELEN = 28          # sockaddr_in6; sockaddr_in is 16


cdef class RxRing:
    cdef int nslots
    cdef readonly int count
    cdef uint8_t *buf
    cdef uint8_t *names
    cdef iovec *iovs
    cdef mmsghdr *msgs

    cdef object _key(self, int i)
    cdef void _check(self, int i) except *
