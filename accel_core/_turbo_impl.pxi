"""LTE turbo code kernels (3GPP TS 36.212 §5.1.3.2): PCCC encoder and max-log-MAP decoder
in 16-bit fixed point.

Thin Python wrappers (accel_core.turbo) validate and allocate; everything here runs
without the GIL on C-contiguous memoryviews. This source is compiled once per SIMD path
(accel_core/_turbo.pyx, _turbo_avx2.pyx, _turbo_avx512.pyx; see accel_core.simd).

Constituent code: 8-state RSC, g0 = 1 + D^2 + D^3 (feedback), g1 = 1 + D + D^3.
State index s = 4*D1 + 2*D2 + D3 (D1 = most recent register). From state s with
input u: feedback a = u ^ D2 ^ D3, parity p = u ^ D1 ^ D2, next state (a, D1, D2).

Decoder layout ("batch interleaving", as the fastest software decoders do): LANES
trellis segments are decoded side by side in int16 lanes, every per-step quantity
stored as [step][lane] (state metrics as [step][state][lane]). A lane holds one segment
of a code block (a block has P <= MAX_SEGMENTS segments, a group LANES / P blocks, all
of the same K). The SISO pass (accel_core/csrc/turbo_siso.h) is written with intrinsics:
LANES = 16 on every path, one 256-bit vector per state on AVX2 and AVX-512, two SSE2
vectors on the scalar path; the QPP interleaver becomes a precomputed gather index over
the lane layout (vpgatherdd on AVX2 / AVX-512). P depends on K only, so every SIMD path
decodes every block to the same bits, alone or in any batch.

Fixed point: channel LLRs (LLR = log P(0)/P(1), bit 0 -> +1) are quantised to
round(LLR * LLR_SCALE) saturated to +-IN_MAX (LLR_LIMIT = IN_MAX / LLR_SCALE in LLR
units); extrinsic LLRs saturate at +-EXT_MAX. Metrics are kept doubled (no halving):
with a = Ls + La and b = Lp the branch metrics are +-G0 = +-(a + b) and +-G1 = +-(a - b),
and the extrinsic output Le2 = max(M00 + b, M01 - b) - max(M10 + b, M11 - b) is 2 Le,
where Mup is the best alpha + beta over the branches with input u and parity p. State
metrics are normalised each step by subtracting state 0's metric. Why int16 arithmetic
never wraps: |G| <= 2 IN_MAX + EXT_MAX = 1021; any state reaches any other in 3 steps,
so normalised metrics stay within +-6 |G| = 6126, alpha + beta within +-12252 and Le2
within +-25000 before it is saturated to +-2 EXT_MAX; unknown states start at NEG_BIG =
-8192, below any reachable metric and far from -32768. The scaled extrinsic passed on
is round(Le2 * scale / 2), computed as (Le2 * round(scale * 2^14) + 2^14) >> 15.
"""
from libc.stdint cimport int16_t, int32_t, uint8_t, uint32_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport free

from accel_core._crc cimport CRC24A, CRC24B, crc24_remainder

cdef extern from "csrc/turbo_siso.h" nogil:
    enum: VRDMA_TURBO_LANES
    void vt_siso(const int16_t* A, const int16_t* B, int16_t* store, Py_ssize_t S,
                 const int16_t* init_a, const int16_t* init_b, int16_t* fin_a, int16_t* fin_b,
                 int16_t* ext, int16_t ext_limit)
    void vt_quantize(int16_t* dst, const float* src, Py_ssize_t n, float scale, int lim)
    void vt_gather(int16_t* dst, const int16_t* src, const int32_t* idx, Py_ssize_t n)

cdef extern from "stdlib.h" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

ctypedef int16_t m16

cdef enum:
    LANES = VRDMA_TURBO_LANES
    NSTATES = 8
    MAX_SEGMENTS_ = 16      # (a divisor of every LANES)
    LLR_SCALE_ = 8          # quantisation steps per unit of LLR
    IN_MAX = 255            # channel LLR saturation, quantised
    EXT_MAX = 511           # extrinsic LLR saturation, quantised
    NEG_BIG = -8192         # metric of a state known not to be the one

#: Channel LLRs saturate here (accel_core.turbo clips them to it before quantising).
LLR_LIMIT = IN_MAX / <double>LLR_SCALE_
#: Quantisation steps per unit of LLR of the fixed-point decoder.
LLR_SCALE = LLR_SCALE_
#: int16 lanes of this build's kernel (trellis segments decoded side by side).
BATCH_LANES = LANES
#: Most segments a block is cut into (the same on every SIMD path).
MAX_SEGMENTS = MAX_SEGMENTS_


cdef inline m16 smax(m16 x, m16 y) noexcept nogil:
    return x if x > y else y


cdef inline m16 smin(m16 x, m16 y) noexcept nogil:
    return x if x < y else y


cdef extern from *:
    ctypedef int16_t* rp16 "int16_t *__restrict__"
    ctypedef const int16_t* crp16 "const int16_t *__restrict__"
    ctypedef const float* crpf "const float *__restrict__"
    ctypedef uint8_t* rpu8 "uint8_t *__restrict__"


# Whole-plane loops on restrict pointers, so that the compiler vectorises them.

cdef void _add(rp16 dst, crp16 x, crp16 y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = x[i] + y[i]


cdef void _scale(rp16 dst, crp16 src, int sc, Py_ssize_t n) noexcept nogil:
    """dst = round(src * sc / 2^15): the extrinsic Le2 scaled by sc / 2^14, halved."""
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = <m16>((src[i] * sc + 16384) >> 15)


cdef void _decide(rpu8 hard, rp16 le21, crp16 xs, crp16 le12, crp16 e, int sc,
                  Py_ssize_t n) noexcept nogil:
    """Hard decisions (sign of Ls + La + Le, doubled) and the scaled extrinsic for decoder 1."""
    cdef Py_ssize_t i
    for i in range(n):
        hard[i] = (2 * xs[i] + 2 * le12[i] + e[i]) < 0
        le21[i] = <m16>((e[i] * sc + 16384) >> 15)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------

cdef void _rsc(const uint8_t* c, const int32_t* perm, Py_ssize_t K,
               uint8_t* z, uint8_t* tail) noexcept nogil:
    """Encode c (c[perm[i]] when perm is not NULL) into parity z[0..K-1]; tail gets x0 z0 x1 z1 x2 z2."""
    cdef unsigned int d1 = 0, d2 = 0, d3 = 0, u, a
    cdef Py_ssize_t i
    for i in range(K):
        u = c[perm[i]] if perm != NULL else c[i]
        a = u ^ d2 ^ d3
        z[i] = <uint8_t>(a ^ d1 ^ d3)
        d3 = d2
        d2 = d1
        d1 = a
    for i in range(3):
        u = d2 ^ d3            # input that makes the feedback zero
        tail[2 * i] = <uint8_t>u
        tail[2 * i + 1] = <uint8_t>(d1 ^ d3)
        d3 = d2
        d2 = d1
        d1 = 0


cdef void _encode_one(const uint8_t* c, const int32_t* pi, Py_ssize_t K,
                      uint8_t* d0, uint8_t* d1, uint8_t* d2) noexcept nogil:
    cdef uint8_t[12] t   # x_K z_K x_K+1 z_K+1 x_K+2 z_K+2 x'_K z'_K x'_K+1 z'_K+1 x'_K+2 z'_K+2
    cdef Py_ssize_t i
    for i in range(K):
        d0[i] = c[i]
    _rsc(c, NULL, K, d1, t)
    _rsc(c, pi, K, d2, &t[6])
    # §5.1.3.2.2: the 12 tail bits go round-robin over d(0), d(1), d(2).
    for i in range(4):
        d0[K + i] = t[3 * i]
        d1[K + i] = t[3 * i + 1]
        d2[K + i] = t[3 * i + 2]


cdef int _check_permutation(const int32_t[::1] pi) except -1:
    """ValueError unless pi is a permutation of 0..len(pi)-1 (the kernels index with it)."""
    cdef Py_ssize_t K = pi.shape[0], i
    cdef int32_t v
    seen = bytearray(K)
    cdef unsigned char[::1] mark = seen
    for i in range(K):
        v = pi[i]
        if v < 0 or v >= K or mark[v]:
            raise ValueError(f"pi[{i}] = {v} breaks the permutation of 0..{K - 1}")
        mark[v] = 1
    return 0


def encode_batch(const uint8_t[:, ::1] bits, const int32_t[::1] pi, uint8_t[:, :, ::1] out):
    """out[b] = (d0, d1, d2) of bits[b]; shapes [B, K], [K], [B, 3, K + 4] (checked by caller)."""
    cdef Py_ssize_t b, B = bits.shape[0], K = bits.shape[1]
    if pi.shape[0] != K or out.shape[0] != B or out.shape[1] != 3 or out.shape[2] != K + 4:
        raise ValueError("encode_batch: inconsistent shapes")
    _check_permutation(pi)
    with nogil:
        for b in range(B):
            _encode_one(&bits[b, 0], &pi[0], K, &out[b, 0, 0], &out[b, 1, 0], &out[b, 2, 0])


# ---------------------------------------------------------------------------------------------
# Max-log-MAP constituent decoder on LANES trellis segments side by side
# ---------------------------------------------------------------------------------------------

cdef inline void _beta_step(m16* be, const m16* A, const m16* Bv,
                            Py_ssize_t t) noexcept nogil:
    """beta_t+1 -> beta_t in place, normalised to state 0."""
    cdef Py_ssize_t l
    cdef m16 g0, g1, m0, m1, m2, m3, m4, m5, m6, m7
    for l in range(LANES):
        g0 = A[t * LANES + l] + Bv[t * LANES + l]
        g1 = A[t * LANES + l] - Bv[t * LANES + l]
        m0 = smax(be[0 * LANES + l] + g0, be[4 * LANES + l] - g0)
        m1 = smax(be[4 * LANES + l] + g0, be[0 * LANES + l] - g0)
        m2 = smax(be[5 * LANES + l] + g1, be[1 * LANES + l] - g1)
        m3 = smax(be[1 * LANES + l] + g1, be[5 * LANES + l] - g1)
        m4 = smax(be[2 * LANES + l] + g1, be[6 * LANES + l] - g1)
        m5 = smax(be[6 * LANES + l] + g1, be[2 * LANES + l] - g1)
        m6 = smax(be[7 * LANES + l] + g0, be[3 * LANES + l] - g0)
        m7 = smax(be[3 * LANES + l] + g0, be[7 * LANES + l] - g0)
        be[0 * LANES + l] = 0
        be[1 * LANES + l] = m1 - m0
        be[2 * LANES + l] = m2 - m0
        be[3 * LANES + l] = m3 - m0
        be[4 * LANES + l] = m4 - m0
        be[5 * LANES + l] = m5 - m0
        be[6 * LANES + l] = m6 - m0
        be[7 * LANES + l] = m7 - m0


# ---------------------------------------------------------------------------------------------
# Turbo iterations
# ---------------------------------------------------------------------------------------------
#
# Geometry: every code block is cut into P segments of S = K / P trellis steps and a group
# of LANES / P blocks fills the LANES lanes; lane l holds segment l % P of block l // P.
# Natural bit n of the lane group's block j lives at plane index (n % S) * LANES + j*P + n / S.
# The first segment starts in state 0 and the last one ends in the state the tail bits
# reach; inner segment boundaries start each iteration from the metrics the neighbouring
# segment reached in the previous iteration (next-iteration initialisation), uniform in the
# first. P depends on K only (see segments_for), so a block decodes to the same result
# whatever batch it arrives in.

cdef struct Work:
    Py_ssize_t K, S, P
    m16* xs       # systematic LLR (quantised), natural layout [S][LANES]
    m16* b1       # parity LLR of encoder 1 [S][LANES]
    m16* b2       # parity LLR of encoder 2, interleaved order [S][LANES]
    m16* a        # systematic + a priori of the current decoder [S][LANES]
    m16* le12     # scaled extrinsic decoder 1 -> 2, natural layout [S][LANES]
    m16* le21     # scaled extrinsic decoder 2 -> 1, natural layout [S][LANES]
    m16* ext      # raw extrinsic output Le2 of the current decoder [S][LANES]
    m16* alpha    # forward metrics [S][NSTATES][LANES]
    int32_t* gidx   # plane index of the bit that interleaved position [t][l] reads
    int32_t* ginv   # inverse of gidx
    uint8_t* hard   # hard decisions, natural layout [S][LANES]
    m16* tail     # tail: x1, z1, x2, z2, each [3][LANES] (last segments only)
    m16* bnd      # boundary metrics alpha1, beta1, alpha2, beta2 + two final planes,
                    # each [NSTATES][LANES]


cdef inline m16* _plane8(m16* p, int i) noexcept nogil:
    return p + i * NSTATES * LANES


cdef void _load_group(const m16* llr, Py_ssize_t B, Py_ssize_t b0, Work* w) noexcept nogil:
    """Transpose the group's blocks into lane layout (blocks past B are zeros); reset the
    extrinsic planes and the segment boundaries."""
    cdef Py_ssize_t K = w.K, S = w.S, P = w.P, n = K + 4
    cdef Py_ssize_t l, t, b, p, i, s
    cdef const m16* d0
    cdef const m16* d1
    cdef const m16* d2
    cdef m16* x1 = w.tail
    cdef m16* z1 = w.tail + 3 * LANES
    cdef m16* x2 = w.tail + 6 * LANES
    cdef m16* z2 = w.tail + 9 * LANES
    cdef m16* a1 = _plane8(w.bnd, 0)
    cdef m16* be1 = _plane8(w.bnd, 1)
    cdef m16* a2 = _plane8(w.bnd, 2)
    cdef m16* be2 = _plane8(w.bnd, 3)
    memset(w.tail, 0, 12 * LANES * sizeof(m16))
    for l in range(LANES):
        b = b0 + l // P
        p = l % P
        if b >= B:
            for t in range(S):
                w.xs[t * LANES + l] = 0
                w.b1[t * LANES + l] = 0
                w.b2[t * LANES + l] = 0
            continue
        d0 = llr + b * 3 * n
        d1 = d0 + n
        d2 = d1 + n
        for t in range(S):
            i = p * S + t
            w.xs[t * LANES + l] = d0[i]
            w.b1[t * LANES + l] = d1[i]
            w.b2[t * LANES + l] = d2[i]
        if p == P - 1:
            # §5.1.3.2.2: d0 = x_K z_K+1 x'_K z'_K+1, d1 = z_K x_K+2 z'_K x'_K+2,
            #             d2 = x_K+1 z_K+2 x'_K+1 z'_K+2.
            x1[0 * LANES + l] = d0[K]
            z1[0 * LANES + l] = d1[K]
            x1[1 * LANES + l] = d2[K]
            z1[1 * LANES + l] = d0[K + 1]
            x1[2 * LANES + l] = d1[K + 1]
            z1[2 * LANES + l] = d2[K + 1]
            x2[0 * LANES + l] = d0[K + 2]
            z2[0 * LANES + l] = d1[K + 2]
            x2[1 * LANES + l] = d2[K + 2]
            z2[1 * LANES + l] = d0[K + 3]
            x2[2 * LANES + l] = d1[K + 3]
            z2[2 * LANES + l] = d2[K + 3]
    memset(w.le21, 0, S * LANES * sizeof(m16))
    # Boundaries: known start state 0 / terminated end for outer segments, uniform inside.
    memset(w.bnd, 0, 4 * NSTATES * LANES * sizeof(m16))
    for l in range(LANES):
        be1[0 * LANES + l] = 0
        be2[0 * LANES + l] = 0
        for s in range(1, NSTATES):
            be1[s * LANES + l] = NEG_BIG
            be2[s * LANES + l] = NEG_BIG
    for t in range(2, -1, -1):
        _beta_step(be1, x1, z1, t)
        _beta_step(be2, x2, z2, t)
    for l in range(LANES):
        p = l % P
        for s in range(NSTATES):
            if p == 0:
                a1[s * LANES + l] = 0 if s == 0 else NEG_BIG
                a2[s * LANES + l] = 0 if s == 0 else NEG_BIG
            if p != P - 1:
                be1[s * LANES + l] = 0
                be2[s * LANES + l] = 0


cdef void _pass_boundaries(Work* w, const m16* fin, m16* dst,
                           int forward) noexcept nogil:
    """Next-iteration initialisation: hand the final metrics of each segment to its neighbour."""
    cdef Py_ssize_t l, s, P = w.P
    if P == 1:
        return
    for l in range(LANES):
        if forward and l % P != P - 1:
            for s in range(NSTATES):
                dst[s * LANES + l + 1] = fin[s * LANES + l]
        elif not forward and l % P != 0:
            for s in range(NSTATES):
                dst[s * LANES + l - 1] = fin[s * LANES + l]


cdef void _block_bits(const Work* w, Py_ssize_t j, uint8_t* dst) noexcept nogil:
    """Hard decisions of the group's block j in natural order."""
    cdef Py_ssize_t p, t, S = w.S
    for p in range(w.P):
        for t in range(S):
            dst[p * S + t] = w.hard[t * LANES + j * w.P + p]


cdef void _decode_group(const m16* llr, Py_ssize_t B, Py_ssize_t b0, int iterations,
                        int sc, int crc_kind, Work* w, uint8_t* out_bits,
                        int32_t* out_iters) noexcept nogil:
    cdef Py_ssize_t K = w.K, n = w.S * LANES, i, j, g
    cdef Py_ssize_t bpg = LANES // w.P
    cdef int it
    cdef bint[LANES] done
    cdef int active = 0
    cdef const int32_t* gidx = w.gidx
    cdef const int32_t* ginv = w.ginv
    cdef int e
    cdef m16* fin = _plane8(w.bnd, 4)
    cdef m16* fin_b = _plane8(w.bnd, 5)
    _load_group(llr, B, b0, w)
    for j in range(bpg):
        done[j] = b0 + j >= B
        if not done[j]:
            active += 1
    for it in range(iterations):
        # Decoder 1: natural order, a priori from decoder 2.
        _add(w.a, w.xs, w.le21, n)
        vt_siso(w.a, w.b1, w.alpha, w.S, _plane8(w.bnd, 0), _plane8(w.bnd, 1), fin, fin_b, w.ext,
                2 * EXT_MAX)
        _pass_boundaries(w, fin, _plane8(w.bnd, 0), 1)
        _pass_boundaries(w, fin_b, _plane8(w.bnd, 1), 0)
        _scale(w.le12, w.ext, sc, n)
        # Decoder 2: interleaved order c'_k = c_pi(k), read through the gather index.
        _add(w.ext, w.xs, w.le12, n)
        vt_gather(w.a, w.ext, gidx, n)
        vt_siso(w.a, w.b2, w.alpha, w.S, _plane8(w.bnd, 2), _plane8(w.bnd, 3), fin, fin_b, w.ext,
                2 * EXT_MAX)
        _pass_boundaries(w, fin, _plane8(w.bnd, 2), 1)
        _pass_boundaries(w, fin_b, _plane8(w.bnd, 3), 0)
        # Back to natural order (a gather through the inverse index, not a scatter); the
        # hard decision is the sign of the a-posteriori LLR Ls + La2 + Le (all doubled here).
        vt_gather(w.a, w.ext, ginv, n)
        _decide(w.hard, w.le21, w.xs, w.le12, w.a, sc, n)
        if crc_kind >= 0:
            for j in range(bpg):
                if done[j]:
                    continue
                _block_bits(w, j, out_bits + (b0 + j) * K)
                if crc24_remainder(out_bits + (b0 + j) * K, K, 1, crc_kind) == 0:
                    done[j] = True
                    active -= 1
                    out_iters[b0 + j] = it + 1
            if active == 0:
                return
    for j in range(bpg):
        if not done[j]:
            _block_bits(w, j, out_bits + (b0 + j) * K)
            out_iters[b0 + j] = iterations


def segments_for(Py_ssize_t K, Py_ssize_t min_segment):
    """Segments per block: the largest power of two P <= MAX_SEGMENTS that cuts K into
    segments of even length >= min_segment (1 when no such P > 1 exists). The same on
    every SIMD path."""
    cdef Py_ssize_t P = MAX_SEGMENTS_
    while P > 1 and (K % P != 0 or (K // P) % 2 != 0 or K // P < min_segment):
        P //= 2
    return P


cdef void _build_index(const int32_t* pi, Py_ssize_t K, Py_ssize_t S, Py_ssize_t P,
                       int32_t* gidx, int32_t* ginv) noexcept nogil:
    """gidx[t][l] = plane index of the bit that interleaved position [t][l] reads; ginv its
    inverse. pi is a checked permutation of 0..K-1."""
    cdef Py_ssize_t l, t, q, nat, j
    # pos[nat] = plane index of natural bit nat of a group's first block, built
    # without divisions (in ginv, S * LANES >= K entries, rebuilt below)
    t = 0
    j = 0
    for nat in range(K):
        ginv[nat] = <int32_t>(t * LANES + j)
        t += 1
        if t == S:
            t = 0
            j += 1
    for l in range(LANES):
        q = (l % P) * S                      # interleaved position read by [0][l]
        j = (l // P) * P
        for t in range(S):
            gidx[t * LANES + l] = ginv[pi[q + t]] + <int32_t>j
    for q in range(S * LANES):
        ginv[gidx[q]] = <int32_t>q


#: (K, P) -> (pi, bytearray of gidx then ginv) for read-only interleaver tables (the shared
#: accel_core.qpp tables): building them is O(K) with scattered stores, a fixed cost of
#: every call otherwise. Our own arrays, built from a checked permutation, so a cached
#: entry can never index out of bounds.
_INDEX_CACHE = {}
cdef int INDEX_CACHE_SIZE = 64


def decode_batch(const float[:, :, ::1] llr, pi, int iterations,
                 float scale, int crc_kind, uint8_t[:, ::1] out_bits, int32_t[::1] out_iters,
                 Py_ssize_t segments=1):
    """Turbo-decode llr[B, 3, K + 4] into out_bits[B, K] and out_iters[B].

    crc_kind: -1 = fixed iteration count, CRC24A / CRC24B (the ids of _crc.pxd, exported as
    accel_core._crc.CRC24A_ID / CRC24B_ID) = stop a block once that CRC of its hard decision
    checks. ``segments``: trellis segments per block (a power of
    two dividing K, at most MAX_SEGMENTS). ``scale`` multiplies the extrinsic LLRs (in
    steps of 2^-14). The caller validates values; shapes are
    checked here.
    """
    cdef const int32_t[::1] piv = pi
    cdef Py_ssize_t B = llr.shape[0], K = llr.shape[2] - 4, b0, P = segments, S
    cdef Work w
    cdef unsigned char[::1] raw
    cdef int sc = <int>(scale * 16384.0 + 0.5)
    cdef size_t plane, nbytes
    cdef char* mem
    if llr.shape[1] != 3 or K < 1 or piv.shape[0] != K:
        raise ValueError("decode_batch: llr must be [B, 3, K + 4] with pi of length K")
    if out_bits.shape[0] != B or out_bits.shape[1] != K or out_iters.shape[0] != B:
        raise ValueError("decode_batch: output shapes do not match llr")
    if iterations < 1 or not (crc_kind == -1 or crc_kind == CRC24A or crc_kind == CRC24B) or not scale > 0.0:
        raise ValueError("decode_batch: bad iterations, crc_kind or scale")
    if P < 1 or P > MAX_SEGMENTS_ or MAX_SEGMENTS_ % P != 0 or K % P != 0 or (K // P) % 2 != 0:
        raise ValueError(f"decode_batch: segments={P} must divide {MAX_SEGMENTS_} and split K={K} "
                         f"into segments of even length")
    S = K // P
    entry = _INDEX_CACHE.get((K, P))
    if entry is not None and entry[0] is pi:
        index = entry[1]
    else:
        _check_permutation(piv)
        index = bytearray(2 * S * LANES * sizeof(int32_t))
        raw = index
        _build_index(&piv[0], K, S, P, <int32_t*>&raw[0], <int32_t*>&raw[0] + S * LANES)
        flags = getattr(pi, "flags", None)
        if flags is not None and not flags.writeable:
            if len(_INDEX_CACHE) >= INDEX_CACHE_SIZE:
                _INDEX_CACHE.clear()
            _INDEX_CACHE[K, P] = (pi, index)
    if B == 0:
        return
    raw = index
    # planes are sized for int32 (as the gather indices); the int16 planes use half of theirs
    plane = ((S * LANES * sizeof(int32_t) + 63) // 64) * 64
    nbytes = (7 * plane + <size_t>S * NSTATES * LANES * sizeof(m16) + 2 * plane
              + (12 + 6 * NSTATES) * LANES * sizeof(m16))
    cdef size_t qbytes = ((<size_t>B * 3 * (K + 4) * sizeof(m16) + 63) // 64) * 64
    mem = <char*>aligned_alloc(64, ((nbytes + 63) // 64) * 64 + qbytes)
    if mem == NULL:
        raise MemoryError(f"turbo decoder scratch of {nbytes + qbytes} bytes")
    cdef m16* qllr = <m16*>(mem + ((nbytes + 63) // 64) * 64)   # the quantised LLRs
    try:
        w.K = K
        w.S = S
        w.P = P
        w.xs = <m16*>mem
        w.b1 = <m16*>(mem + plane)
        w.b2 = <m16*>(mem + 2 * plane)
        w.a = <m16*>(mem + 3 * plane)
        w.le12 = <m16*>(mem + 4 * plane)
        w.le21 = <m16*>(mem + 5 * plane)
        w.ext = <m16*>(mem + 6 * plane)
        w.alpha = <m16*>(mem + 7 * plane)
        w.gidx = <int32_t*>&raw[0]
        w.ginv = w.gidx + S * LANES
        w.hard = <uint8_t*>(mem + 7 * plane + <size_t>S * NSTATES * LANES * sizeof(m16))
        w.tail = <m16*>(<char*>w.hard + plane)
        w.bnd = w.tail + 12 * LANES
        with nogil:
            vt_quantize(qllr, &llr[0, 0, 0], B * 3 * (K + 4), LLR_SCALE_, IN_MAX)
            b0 = 0
            while b0 < B:
                _decode_group(qllr, B, b0, iterations, sc, crc_kind, &w,
                              &out_bits[0, 0], &out_iters[0])
                b0 += LANES // P
    finally:
        free(mem)
