# cython: language_level=3
"""C-level authentication of RoCEv2 datagrams (see roce/_auth.pyx, roce/auth.py),
cimported by roce._udpio."""
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_MAC:
        pass
    ctypedef struct EVP_MAC_CTX:
        pass

cdef enum:
    TAG_LEN = 16
    CTR_LEN = 8
    TRAILER_LEN = 24
    PSEUDO_LEN = 37
    WINDOW_WORDS = 4            # 256-bit replay window


cdef class MacKey:
    cdef EVP_MAC *mac
    cdef EVP_MAC_CTX *ctx
    cdef int begin(self) noexcept nogil
    cdef int update(self, const uint8_t *p, size_t n) noexcept nogil
    cdef int finish(self, uint64_t counter, uint8_t *tag) noexcept nogil


cdef class Window:
    cdef uint64_t top
    cdef uint64_t bits[WINDOW_WORDS]
    cdef bint started
    cdef bint ok(self, uint64_t c) noexcept nogil
    cdef void record(self, uint64_t c) noexcept nogil


cdef class RxAuth:
    cdef readonly MacKey key
    cdef uint8_t local[18]          # destination address (16) and port (2) of the pseudo header
    cdef readonly int version
    cdef readonly frozenset plain   # source addresses (16-byte form) sent to in plain RoCEv2
    cdef readonly dict windows      # peer key (address and port) -> Window
    cdef readonly unsigned long long opened, failed, replayed, short, plaintext


cdef class TxAuth:
    cdef readonly MacKey key
    cdef public uint64_t counter
    cdef readonly unsigned long long sealed
