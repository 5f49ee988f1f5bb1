# cython: language_level=3
"""Native CRC-32 for the RoCEv2 ICRC (IBTA vol. 1 annex A17.3.3; the
reference is :mod:`roce.icrc`, which uses ``zlib.crc32``).

Two kernels compute the same function:

* slice-by-8 tables (any CPU): eight 256-entry tables, eight bytes per step;
* carry-less multiplication folding (x86 with PCLMULQDQ, chosen at build
  time by ``-march=native``): four 128-bit lanes are folded 64 bytes at a
  time, then into one lane, whose 16 bytes finish through the tables. The
  fold constants are ``x^k mod P`` computed here at import time, not copied
  from anywhere: a 64-bit half ``a`` of a lane, carry-less multiplied by the
  bit-reflected 32-bit constant ``x^(d-1) mod P``, is congruent to ``a``
  moved ``d`` bits further down the message (the ``-1`` absorbs the one-bit
  shift of a reflected product).

:func:`crc32` is ``zlib.crc32``; :func:`compute_icrc` is
:func:`roce.icrc.compute_icrc` (same arguments, same checks left to the
caller). Both release the GIL. Tests compare them with zlib and the Python
reference over random lengths and alignments.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__PCLMUL__) && defined(__SSE4_1__)
    #include <immintrin.h>
    #define RI_HAVE_CLMUL 1
    #else
    #define RI_HAVE_CLMUL 0
    #endif
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define RI_LITTLE 1
    #else
    #define RI_LITTLE 0
    #endif

    static uint32_t ri_tab[8][256];
    #if RI_HAVE_CLMUL
    static __m128i ri_k4;   /* fold by 512 bits (four lanes) */
    static __m128i ri_k1;   /* fold by 128 bits (one lane) */
    #endif

    /* x^n mod P, P = 0x104C11DB7, in normal order (bit d = coefficient of x^d). */
    static uint32_t ri_xpow(unsigned n) {
        uint64_t r = 1;
        for (unsigned i = 0; i < n; i++) {
            r <<= 1;
            if (r & 0x100000000ull) r ^= 0x104C11DB7ull;
        }
        return (uint32_t)r;
    }

    /* A 32-bit polynomial as a reflected 64-bit lane: x^d at bit 63 - d. */
    static uint64_t ri_lane(uint32_t k) {
        uint64_t v = 0;
        for (int d = 0; d < 32; d++)
            if ((k >> d) & 1) v |= 1ull << (63 - d);
        return v;
    }

    static void ri_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
            ri_tab[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = ri_tab[0][i];
            for (int t = 1; t < 8; t++) {
                c = ri_tab[0][c & 0xFF] ^ (c >> 8);
                ri_tab[t][i] = c;
            }
        }
    #if RI_HAVE_CLMUL
        /* low qword (higher-degree half) moves d + 64 bits, high qword d bits */
        ri_k4 = _mm_set_epi64x((long long)ri_lane(ri_xpow(512 - 1)),
                               (long long)ri_lane(ri_xpow(512 + 64 - 1)));
        ri_k1 = _mm_set_epi64x((long long)ri_lane(ri_xpow(128 - 1)),
                               (long long)ri_lane(ri_xpow(128 + 64 - 1)));
    #endif
    }

    static uint32_t ri_table(uint32_t crc, const uint8_t *p, size_t n) {
    #if RI_LITTLE
        while (n >= 8) {
            uint32_t lo, hi;
            memcpy(&lo, p, 4);
            memcpy(&hi, p + 4, 4);
            lo ^= crc;
            crc = ri_tab[7][lo & 0xFF] ^ ri_tab[6][(lo >> 8) & 0xFF] ^
                  ri_tab[5][(lo >> 16) & 0xFF] ^ ri_tab[4][lo >> 24] ^
                  ri_tab[3][hi & 0xFF] ^ ri_tab[2][(hi >> 8) & 0xFF] ^
                  ri_tab[1][(hi >> 16) & 0xFF] ^ ri_tab[0][hi >> 24];
            p += 8;
            n -= 8;
        }
    #endif
        while (n--) crc = ri_tab[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        return crc;
    }

    #if RI_HAVE_CLMUL
    static inline __m128i ri_fold(__m128i x, __m128i k) {
        return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
    }
    #endif

    static uint32_t ri_crc_raw(uint32_t crc, const uint8_t *p, size_t n) {
    #if RI_HAVE_CLMUL
        if (n >= 128) {
            __m128i x0 = _mm_loadu_si128((const __m128i *)p);
            __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
            __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
            __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
            x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)crc));
            p += 64;
            n -= 64;
            while (n >= 64) {
                x0 = _mm_xor_si128(ri_fold(x0, ri_k4), _mm_loadu_si128((const __m128i *)p));
                x1 = _mm_xor_si128(ri_fold(x1, ri_k4), _mm_loadu_si128((const __m128i *)(p + 16)));
                x2 = _mm_xor_si128(ri_fold(x2, ri_k4), _mm_loadu_si128((const __m128i *)(p + 32)));
                x3 = _mm_xor_si128(ri_fold(x3, ri_k4), _mm_loadu_si128((const __m128i *)(p + 48)));
                p += 64;
                n -= 64;
            }
            x0 = _mm_xor_si128(ri_fold(x0, ri_k1), x1);
            x0 = _mm_xor_si128(ri_fold(x0, ri_k1), x2);
            x0 = _mm_xor_si128(ri_fold(x0, ri_k1), x3);
            while (n >= 16) {
                x0 = _mm_xor_si128(ri_fold(x0, ri_k1), _mm_loadu_si128((const __m128i *)p));
                p += 16;
                n -= 16;
            }
            uint8_t lane[16];
            _mm_storeu_si128((__m128i *)lane, x0);
            crc = ri_table(0, lane, 16);
        }
    #endif
        return ri_table(crc, p, n);
    }

    static const char *ri_kernel(void) { return RI_HAVE_CLMUL ? "pclmul" : "slice-by-8"; }
    """
    void ri_init() noexcept nogil
    uint32_t ri_crc_raw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    const char *ri_kernel() noexcept nogil

ri_init()

cdef uint8_t _FF8[8]
_FF8[:] = [0xFF] * 8


cdef uint32_t crc32_raw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil:
    return ri_crc_raw(crc, p, n)


cdef uint32_t icrc_seed(int version, const uint8_t *src, const uint8_t *dst, uint16_t sport,
                        uint16_t dport, uint16_t ip_id, bint df, size_t udp_payload_len,
                        const uint8_t *bth) noexcept nogil:
    """Raw register after LRH (8 x 0xFF), the masked IP and UDP headers of a
    datagram whose UDP payload is ``udp_payload_len`` bytes, and the BTH with
    its resv8a byte masked (the first 12 bytes at ``bth``)."""
    cdef uint8_t h[8 + 40 + 8 + 12]
    cdef size_t udp_len = 8 + udp_payload_len
    cdef size_t n, total
    memcpy(h, _FF8, 8)
    if version == 4:
        total = 20 + udp_len
        h[8] = 0x45
        h[9] = 0xFF                         # TOS
        h[10] = <uint8_t>(total >> 8)
        h[11] = <uint8_t>total
        h[12] = <uint8_t>(ip_id >> 8)
        h[13] = <uint8_t>ip_id
        h[14] = 0x40 if df else 0
        h[15] = 0
        h[16] = 0xFF                        # TTL
        h[17] = 17
        h[18] = 0xFF                        # header checksum
        h[19] = 0xFF
        memcpy(h + 20, src, 4)
        memcpy(h + 24, dst, 4)
        n = 28
    else:
        h[8] = 0x6F                         # version 6, traffic class and flow label masked
        h[9] = 0xFF
        h[10] = 0xFF
        h[11] = 0xFF
        h[12] = <uint8_t>(udp_len >> 8)
        h[13] = <uint8_t>udp_len
        h[14] = 17
        h[15] = 0xFF                        # hop limit
        memcpy(h + 16, src, 16)
        memcpy(h + 32, dst, 16)
        n = 48
    h[n] = <uint8_t>(sport >> 8)
    h[n + 1] = <uint8_t>sport
    h[n + 2] = <uint8_t>(dport >> 8)
    h[n + 3] = <uint8_t>dport
    h[n + 4] = <uint8_t>(udp_len >> 8)
    h[n + 5] = <uint8_t>udp_len
    h[n + 6] = 0xFF                         # UDP checksum
    h[n + 7] = 0xFF
    memcpy(h + n + 8, bth, 12)
    h[n + 8 + 4] = 0xFF                     # BTH resv8a: FECN, BECN, resv6
    return ri_crc_raw(0xFFFFFFFF, h, n + 20)


def kernel() -> str:
    """Which CRC kernel this build uses: ``"pclmul"`` or ``"slice-by-8"``."""
    return ri_kernel().decode()


def crc32(data, unsigned int value=0) -> int:
    """``zlib.crc32(data, value)``."""
    cdef Py_buffer view
    cdef uint32_t r
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            r = ri_crc_raw(~value, <const uint8_t *>view.buf, <size_t>view.len) ^ 0xFFFFFFFFu
    finally:
        PyBuffer_Release(&view)
    return r


def compute_icrc(ip_header, udp_header, ib_bytes) -> int:
    """:func:`roce.icrc.compute_icrc` on the same inputs: ``ip_header`` a
    20-byte IPv4 header without options or a 40-byte IPv6 header (copied, then
    TOS/TTL/checksum or traffic class/flow label/hop limit masked),
    ``udp_header`` 8 bytes (checksum masked), ``ib_bytes`` the UDP payload
    without its ICRC. The caller validates the shapes."""
    cdef const uint8_t[::1] ip = ip_header
    cdef const uint8_t[::1] udp = udp_header
    cdef Py_buffer ib
    cdef uint8_t h[8 + 40 + 8 + 12]
    cdef size_t n = ip.shape[0]
    cdef uint32_t crc
    if not ((n == 20 and ip[0] == 0x45) or (n == 40 and ip[0] >> 4 == 6)) or udp.shape[0] != 8:
        raise ValueError("need a 20-byte IPv4 header without options or a 40-byte IPv6 header, "
                         "and an 8-byte UDP header")
    memcpy(h, _FF8, 8)
    memcpy(h + 8, &ip[0], n)
    if n == 20:
        h[9] = 0xFF
        h[16] = 0xFF
        h[18] = 0xFF
        h[19] = 0xFF
    else:
        h[8] |= 0x0F
        h[9] = 0xFF
        h[10] = 0xFF
        h[11] = 0xFF
        h[15] = 0xFF
    memcpy(h + 8 + n, &udp[0], 8)
    h[8 + n + 6] = 0xFF
    h[8 + n + 7] = 0xFF
    PyObject_GetBuffer(ib_bytes, &ib, PyBUF_SIMPLE)
    try:
        if ib.len < 12:
            raise ValueError(f"IB part is {ib.len} bytes, shorter than a BTH")
        memcpy(h + 16 + n, ib.buf, 12)
        h[16 + n + 4] = 0xFF
        with nogil:
            crc = ri_crc_raw(0xFFFFFFFF, h, 28 + n)
            crc = ri_crc_raw(crc, <const uint8_t *>ib.buf + 12, <size_t>ib.len - 12)
    finally:
        PyBuffer_Release(&ib)
    return crc ^ 0xFFFFFFFFu


# ------------------------------------------------ the IPv4 ID in the ICRC
# The ICRC covers the IPv4 Identification field (annex A17.3.3 masks TOS,
# TTL and the checksums, not the ID), and the CRC is affine in it: the ICRC
# for ID ``k`` is the ICRC for ID 0 xor a linear function of ``k`` that
# depends only on the datagram's length. UDP GSO gives segment ``k`` of a
# send the ID ``k`` (see GSO_SEGMENTS), so a sender computes each segment's
# ICRC for its ID, and a receiver (which never sees the IP header) solves
# for it. Per UDP payload length, the 16 columns of that linear map and its
# row-reduced form are cached (a few lengths make up any stream).

cdef struct IdMap:
    size_t n                    # UDP payload length (0: empty entry)
    uint32_t col[16]            # ICRC change of ID bit b
    uint32_t vec[16]            # row-reduced basis: vector, its pivot bit, the ID bits it stands for
    uint8_t piv[16]
    uint16_t mask[16]
    int nrows

cdef enum:
    IDMAPS = 31                 # cache entries (direct-mapped by length)
    ZEROS = 4096

cdef IdMap _idmaps[IDMAPS]
cdef uint8_t _zeros[ZEROS]      # static storage: zero


cdef const IdMap *_idmap(size_t n) noexcept nogil:
    cdef IdMap *e = &_idmaps[n % IDMAPS]
    cdef IdMap m
    cdef uint8_t two[2]
    cdef uint32_t v, c
    cdef uint16_t mk
    cdef size_t tail, left
    cdef int b, r, p
    if e.n == n:
        return e
    # raw CRC (register 0, no inversion) of a message that is zero but for ID
    # bit b: zeros before the ID leave the register 0; after it come the rest
    # of the IP header (14 bytes), UDP (8) and the UDP payload less its ICRC
    tail = 14 + 8 + n - 4
    m.nrows = 0
    for b in range(16):
        two[0] = <uint8_t>((1 << b) >> 8)
        two[1] = <uint8_t>(1 << b)
        c = crc32_raw(0, two, 2)
        left = tail
        while left:
            c = crc32_raw(c, _zeros, ZEROS if left > ZEROS else left)
            left -= ZEROS if left > ZEROS else left
        m.col[b] = c
        v = c
        mk = <uint16_t>(1 << b)
        for r in range(m.nrows):
            if (v >> m.piv[r]) & 1:
                v ^= m.vec[r]
                mk ^= m.mask[r]
        if v == 0:              # cannot happen for CRC-32 (bursts of <= 32 bits are detected)
            continue
        p = 31
        while not (v >> p) & 1:
            p -= 1
        for r in range(m.nrows):
            if (m.vec[r] >> p) & 1:
                m.vec[r] ^= v
                m.mask[r] ^= mk
        m.vec[m.nrows] = v
        m.piv[m.nrows] = <uint8_t>p
        m.mask[m.nrows] = mk
        m.nrows += 1
    m.n = n
    e[0] = m
    return e


cdef uint32_t icrc_id_delta(size_t udp_payload_len, uint16_t ip_id) noexcept nogil:
    """ICRC(ID ``ip_id``) xor ICRC(ID 0) of an IPv4 datagram whose UDP payload
    is ``udp_payload_len`` bytes."""
    cdef const IdMap *m
    cdef uint32_t d = 0
    cdef int b
    if ip_id == 0:
        return 0
    m = _idmap(udp_payload_len)
    for b in range(16):
        if (ip_id >> b) & 1:
            d ^= m.col[b]
    return d


cdef int icrc_id_solve(size_t udp_payload_len, uint32_t delta) noexcept nogil:
    """The ID whose :func:`icrc_id_delta` is ``delta``, or -1 if none."""
    cdef const IdMap *m
    cdef int r, ident = 0
    if delta == 0:
        return 0
    m = _idmap(udp_payload_len)
    for r in range(m.nrows):
        if (delta >> m.piv[r]) & 1:
            delta ^= m.vec[r]
            ident ^= m.mask[r]
    return ident if delta == 0 else -1


def id_delta(unsigned int udp_payload_len, unsigned int ip_id) -> int:
    """ICRC(ID ``ip_id``) xor ICRC(ID 0) of an IPv4 datagram (tests)."""
    return icrc_id_delta(udp_payload_len, <uint16_t>ip_id)


def id_solve(unsigned int udp_payload_len, unsigned int delta) -> int:
    """The IPv4 ID that changes the ICRC by ``delta`` (-1 if none; tests)."""
    return icrc_id_solve(udp_payload_len, delta)
