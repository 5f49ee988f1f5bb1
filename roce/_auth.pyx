# cython: language_level=3
"""Native half of :mod:`roce.auth`: HMAC-SHA256 (OpenSSL libcrypto's EVP_MAC)
truncated to 128 bits over a datagram and its pseudo header, and the RFC 4303
anti-replay window. The layout, key derivation and window semantics are the
reference's (roce/auth.py); tests/roce/test_auth.py checks both against each
other. Used by :class:`roce._udpio.RxRing` (verify, strip) and
:class:`roce._udpio.TxRing` (seal as a datagram is built).

The MAC context is keyed once; each datagram re-initialises it with the same
key (``EVP_MAC_init`` with a NULL key), which costs a copy of the precomputed
inner and outer hash states, not a key schedule.
"""
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

import ipaddress

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct OSSL_PARAM:
        pass
    EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties)
    void EVP_MAC_free(EVP_MAC *mac)
    EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac)
    void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx)
    int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                     const OSSL_PARAM *params)
    int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen)
    int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize)

cdef extern from "<openssl/params.h>" nogil:
    OSSL_PARAM OSSL_PARAM_construct_utf8_string(const char *key, char *buf, size_t bsize)
    OSSL_PARAM OSSL_PARAM_construct_end()

cdef extern from "<openssl/crypto.h>" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t n)


cdef class MacKey:
    """HMAC-SHA256 keyed with the derived MAC key (32 bytes: roce.auth.derive_mac_key)."""

    def __cinit__(self, bytes key):
        cdef OSSL_PARAM params[2]
        cdef char digest[8]
        if len(key) != 32:
            raise ValueError(f"MAC key of {len(key)} bytes, not 32")
        memcpy(digest, b"SHA256\0", 7)
        self.mac = EVP_MAC_fetch(NULL, b"HMAC", NULL)
        if self.mac == NULL:
            raise RuntimeError("libcrypto has no HMAC")
        self.ctx = EVP_MAC_CTX_new(self.mac)
        if self.ctx == NULL:
            raise MemoryError()
        params[0] = OSSL_PARAM_construct_utf8_string(b"digest", digest, 0)
        params[1] = OSSL_PARAM_construct_end()
        if EVP_MAC_init(self.ctx, <const unsigned char *><const char *>key, 32, params) != 1:
            raise RuntimeError("EVP_MAC_init(HMAC-SHA256) failed")

    def __dealloc__(self):
        if self.ctx != NULL:
            EVP_MAC_CTX_free(self.ctx)
        if self.mac != NULL:
            EVP_MAC_free(self.mac)

    cdef int begin(self) noexcept nogil:
        return EVP_MAC_init(self.ctx, NULL, 0, NULL)

    cdef int update(self, const uint8_t *p, size_t n) noexcept nogil:
        if n == 0:
            return 1
        return EVP_MAC_update(self.ctx, p, n)

    cdef int finish(self, uint64_t counter, uint8_t *tag) noexcept nogil:
        """Absorb the counter, write the 16-byte tag; 1 on success."""
        cdef uint8_t c[8]
        cdef uint8_t full[32]
        cdef size_t outl = 0
        cdef int k
        for k in range(8):
            c[k] = <uint8_t>(counter >> (56 - 8 * k))
        if EVP_MAC_update(self.ctx, c, 8) != 1 or EVP_MAC_final(self.ctx, full, &outl, 32) != 1:
            return 0
        memcpy(tag, full, TAG_LEN)
        return 1

    def tag(self, bytes pseudo, packet, unsigned long long counter) -> bytes:
        """The tag of ``packet`` (for tests: compare with roce.auth.tag)."""
        cdef const uint8_t[::1] v = memoryview(packet).cast("B")
        cdef uint8_t out[TAG_LEN]
        cdef int ok
        ok = self.begin() == 1 and self.update(<const uint8_t *><const char *>pseudo, len(pseudo)) == 1
        if ok and v.shape[0]:
            ok = self.update(&v[0], v.shape[0]) == 1
        if not (ok and self.finish(counter, out) == 1):
            raise RuntimeError("HMAC failed")
        return bytes(out[:TAG_LEN])


cdef class Window:
    """RFC 4303 3.4.3 sliding window of 256 counters (roce.auth.ReplayWindow)."""

    cdef bint ok(self, uint64_t c) noexcept nogil:
        cdef uint64_t d
        if not self.started or c > self.top:
            return True
        d = self.top - c
        if d >= 64 * WINDOW_WORDS:
            return False
        return not ((self.bits[d >> 6] >> (d & 63)) & 1)

    cdef void record(self, uint64_t c) noexcept nogil:
        cdef uint64_t shift, d
        cdef int w, k, words
        if not self.started:
            self.started = True
            self.top = c
            memset(self.bits, 0, sizeof(self.bits))
            self.bits[0] = 1
            return
        if c > self.top:
            shift = c - self.top
            if shift >= 64 * WINDOW_WORDS:
                memset(self.bits, 0, sizeof(self.bits))
            else:
                words = <int>(shift >> 6)
                k = <int>(shift & 63)
                for w in range(WINDOW_WORDS - 1, -1, -1):
                    if w - words < 0:
                        self.bits[w] = 0
                    elif k == 0:
                        self.bits[w] = self.bits[w - words]
                    elif w - words - 1 >= 0:
                        self.bits[w] = (self.bits[w - words] << k) | (self.bits[w - words - 1] >> (64 - k))
                    else:
                        self.bits[w] = self.bits[w - words] << k
            self.bits[0] |= 1
            self.top = c
            return
        d = self.top - c
        self.bits[d >> 6] |= (<uint64_t>1) << (d & 63)

    def accept(self, unsigned long long c) -> bool:
        """check then update (for tests against roce.auth.ReplayWindow)."""
        if not self.ok(c):
            return False
        self.record(c)
        return True


def _addr16(ip) -> bytes:
    a = ipaddress.ip_address(ip)
    return a.packed.ljust(16, b"\0")


cdef class RxAuth:
    """Receive side: the key, this endpoint's address and port (the pseudo
    header's destination), the source addresses that send plain RoCEv2, and
    the replay window of every authenticated sender (created when its first
    datagram verifies, so only key holders add entries). Counters:
    ``opened`` (verified and stripped), ``failed`` (bad tag), ``replayed``,
    ``short`` (too short to carry a trailer), ``plaintext`` (from a plain peer)."""

    def __cinit__(self, bytes mac_key, str local_ip, int local_port, plain=()):
        self.key = MacKey(mac_key)
        a = ipaddress.ip_address(local_ip)
        self.version = a.version
        b = _addr16(a)
        memcpy(self.local, <const char *>b, 16)
        self.local[16] = <uint8_t>(local_port >> 8)
        self.local[17] = <uint8_t>local_port
        self.plain = frozenset(_addr16(p) for p in plain)
        self.windows = {}


cdef class TxAuth:
    """Send side: the key and the counter of the next sealed datagram (start
    it at ``time.time_ns()``: see roce.auth)."""

    def __cinit__(self, bytes mac_key, unsigned long long counter):
        self.key = MacKey(mac_key)
        self.counter = counter

    def take(self) -> int:
        """The next counter, for a datagram sealed outside the ring (reference path)."""
        c = self.counter
        self.counter += 1
        self.sealed += 1
        return c
