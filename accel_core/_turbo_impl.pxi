"""LTE turbo code kernels (3GPP TS 36.212 §5.1.3.2): PCCC encoder and max-log-MAP decoder.

Thin Python wrappers (accel_core.turbo) validate and allocate; everything here runs
without the GIL on C-contiguous memoryviews.

Constituent code: 8-state RSC, g0 = 1 + D^2 + D^3 (feedback), g1 = 1 + D + D^3.
State index s = 4*D1 + 2*D2 + D3 (D1 = most recent register). From state s with
input u: feedback a = u ^ D2 ^ D3, parity p = u ^ D1 ^ D2, next state (a, D1, D2).

Decoder layout ("batch interleaving"): LANES trellis segments are decoded side by
side, every per-step quantity stored as [step][lane] (state metrics as
[step][state][lane]). A lane holds one segment of a code block (a block has P
segments, a group LANES / P blocks, all of the same K), so every inner loop is a
fixed-width loop over lanes that the C compiler turns into SIMD float32 arithmetic;
the QPP interleaver becomes a precomputed gather/scatter index over the lane layout.
With a = (Ls + La)/2 and b = Lp/2 (LLR = log P(0)/P(1), bit 0 -> +1)
the branch metrics are ±G0 = ±(a + b) and ±G1 = ±(a - b); the extrinsic output
needs no a at all: Le = max(M00 + b, M01 - b) - max(M10 + b, M11 - b), where Mup
is the best alpha + beta over the branches with input u and parity p.
State metrics are normalised each step by subtracting state 0's metric.
"""
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport free

from accel_core._crc cimport CRC24A, CRC24B, crc24_remainder

cdef extern from "stdlib.h" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

cdef enum:
    LANES = 8
    NSTATES = 8

cdef float NEG_BIG = -1.0e30
cdef float HALF = 0.5       # float-typed, so C keeps these products in single precision
# Extrinsic LLRs saturate here: at high SNR they would otherwise grow geometrically
# over the iterations. Channel LLRs are clipped to the same bound by accel_core.turbo.
cdef float EXT_LIMIT = 1024.0
LLR_LIMIT = EXT_LIMIT

#: Number of code blocks decoded side by side (SIMD lanes of the kernel).
BATCH_LANES = LANES


cdef inline float fmax2(float x, float y) noexcept nogil:
    return x if x > y else y


cdef inline float fmin2(float x, float y) noexcept nogil:
    return x if x < y else y


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

cdef inline void _alpha_step(float* al, const float* A, const float* Bv,
                             Py_ssize_t t) noexcept nogil:
    """alpha_t -> alpha_t+1 in place, normalised to state 0."""
    cdef Py_ssize_t l
    cdef float g0, g1, n0, n1, n2, n3, n4, n5, n6, n7
    for l in range(LANES):
        g0 = A[t * LANES + l] + Bv[t * LANES + l]
        g1 = A[t * LANES + l] - Bv[t * LANES + l]
        n0 = fmax2(al[0 * LANES + l] + g0, al[1 * LANES + l] - g0)
        n1 = fmax2(al[2 * LANES + l] - g1, al[3 * LANES + l] + g1)
        n2 = fmax2(al[4 * LANES + l] + g1, al[5 * LANES + l] - g1)
        n3 = fmax2(al[6 * LANES + l] - g0, al[7 * LANES + l] + g0)
        n4 = fmax2(al[0 * LANES + l] - g0, al[1 * LANES + l] + g0)
        n5 = fmax2(al[2 * LANES + l] + g1, al[3 * LANES + l] - g1)
        n6 = fmax2(al[4 * LANES + l] - g1, al[5 * LANES + l] + g1)
        n7 = fmax2(al[6 * LANES + l] + g0, al[7 * LANES + l] - g0)
        al[0 * LANES + l] = 0.0
        al[1 * LANES + l] = n1 - n0
        al[2 * LANES + l] = n2 - n0
        al[3 * LANES + l] = n3 - n0
        al[4 * LANES + l] = n4 - n0
        al[5 * LANES + l] = n5 - n0
        al[6 * LANES + l] = n6 - n0
        al[7 * LANES + l] = n7 - n0


cdef inline void _beta_step(float* be, const float* A, const float* Bv,
                            Py_ssize_t t) noexcept nogil:
    """beta_t+1 -> beta_t in place, normalised to state 0."""
    cdef Py_ssize_t l
    cdef float g0, g1, m0, m1, m2, m3, m4, m5, m6, m7
    for l in range(LANES):
        g0 = A[t * LANES + l] + Bv[t * LANES + l]
        g1 = A[t * LANES + l] - Bv[t * LANES + l]
        m0 = fmax2(be[0 * LANES + l] + g0, be[4 * LANES + l] - g0)
        m1 = fmax2(be[4 * LANES + l] + g0, be[0 * LANES + l] - g0)
        m2 = fmax2(be[5 * LANES + l] + g1, be[1 * LANES + l] - g1)
        m3 = fmax2(be[1 * LANES + l] + g1, be[5 * LANES + l] - g1)
        m4 = fmax2(be[2 * LANES + l] + g1, be[6 * LANES + l] - g1)
        m5 = fmax2(be[6 * LANES + l] + g1, be[2 * LANES + l] - g1)
        m6 = fmax2(be[7 * LANES + l] + g0, be[3 * LANES + l] - g0)
        m7 = fmax2(be[3 * LANES + l] + g0, be[7 * LANES + l] - g0)
        be[0 * LANES + l] = 0.0
        be[1 * LANES + l] = m1 - m0
        be[2 * LANES + l] = m2 - m0
        be[3 * LANES + l] = m3 - m0
        be[4 * LANES + l] = m4 - m0
        be[5 * LANES + l] = m5 - m0
        be[6 * LANES + l] = m6 - m0
        be[7 * LANES + l] = m7 - m0


cdef inline void _ext_at(const float* al, const float* be, const float* Bv, Py_ssize_t t,
                         float* ext) noexcept nogil:
    """ext[t] from alpha_t and beta_t+1 (unscaled, clipped to +-EXT_LIMIT)."""
    cdef Py_ssize_t l
    cdef float bk, m00, m01, m10, m11, le
    for l in range(LANES):
        bk = Bv[t * LANES + l]
        m00 = fmax2(fmax2(al[0 * LANES + l] + be[0 * LANES + l], al[1 * LANES + l] + be[4 * LANES + l]),
                    fmax2(al[6 * LANES + l] + be[7 * LANES + l], al[7 * LANES + l] + be[3 * LANES + l]))
        m01 = fmax2(fmax2(al[2 * LANES + l] + be[5 * LANES + l], al[3 * LANES + l] + be[1 * LANES + l]),
                    fmax2(al[4 * LANES + l] + be[2 * LANES + l], al[5 * LANES + l] + be[6 * LANES + l]))
        m10 = fmax2(fmax2(al[2 * LANES + l] + be[1 * LANES + l], al[3 * LANES + l] + be[5 * LANES + l]),
                    fmax2(al[4 * LANES + l] + be[6 * LANES + l], al[5 * LANES + l] + be[2 * LANES + l]))
        m11 = fmax2(fmax2(al[0 * LANES + l] + be[4 * LANES + l], al[1 * LANES + l] + be[0 * LANES + l]),
                    fmax2(al[6 * LANES + l] + be[3 * LANES + l], al[7 * LANES + l] + be[7 * LANES + l]))
        le = fmax2(m00 + bk, m01 - bk) - fmax2(m10 + bk, m11 - bk)
        ext[t * LANES + l] = fmin2(fmax2(le, -EXT_LIMIT), EXT_LIMIT)


cdef void _siso(const float* A, const float* Bv, float* store, Py_ssize_t S,
                const float* init_a, const float* init_b, float* fin_a, float* fin_b,
                float* ext) noexcept nogil:
    """One max-log-MAP pass over S steps (S even) of every lane.

    The forward (alpha) and backward (beta) recursions run in the same loop, alpha
    from step 0 and beta from step S, so each loop iteration has two independent
    dependency chains. The first half stores alpha_0..alpha_H-1 and beta_H+1..beta_S
    (H = S/2); in the second half each iteration emits two extrinsic values, at i
    (running alpha, stored beta) and at S-1-i (stored alpha, running beta).
    init_a / init_b are alpha_0 / beta_S; fin_a / fin_b receive alpha_S / beta_0.
    """
    cdef float[NSTATES][LANES] al
    cdef float[NSTATES][LANES] be
    cdef Py_ssize_t H = S // 2, i, j
    cdef Py_ssize_t NL = NSTATES * LANES
    cdef float* astore = store
    cdef float* bstore = store + H * NL      # beta_t at bstore + (t - H - 1) * NL
    memcpy(al, init_a, sizeof(al))
    memcpy(be, init_b, sizeof(be))
    for i in range(H):
        j = S - 1 - i
        memcpy(astore + i * NL, al, sizeof(al))
        memcpy(bstore + (j - H) * NL, be, sizeof(be))
        _alpha_step(&al[0][0], A, Bv, i)
        _beta_step(&be[0][0], A, Bv, j)
    for i in range(H, S):
        j = S - 1 - i
        _ext_at(&al[0][0], bstore + (i - H) * NL, Bv, i, ext)
        _ext_at(astore + j * NL, &be[0][0], Bv, j, ext)
        _alpha_step(&al[0][0], A, Bv, i)
        _beta_step(&be[0][0], A, Bv, j)
    memcpy(fin_a, al, sizeof(al))
    memcpy(fin_b, be, sizeof(be))


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
    float* xs       # systematic LLR, natural layout [S][LANES]
    float* b1       # half parity LLR of encoder 1 [S][LANES]
    float* b2       # half parity LLR of encoder 2, interleaved order [S][LANES]
    float* a        # half (systematic + a priori) of the current decoder [S][LANES]
    float* le12     # scaled extrinsic decoder 1 -> 2, natural layout [S][LANES]
    float* le21     # scaled extrinsic decoder 2 -> 1, natural layout [S][LANES]
    float* ext      # raw extrinsic output of the current decoder [S][LANES]
    float* alpha    # forward metrics [S][NSTATES][LANES]
    int32_t* gidx   # plane index of the bit that interleaved position [t][l] reads
    int32_t* ginv   # inverse of gidx
    uint8_t* hard   # hard decisions, natural layout [S][LANES]
    float* tail     # tail: x1, z1/2, x2, z2/2, each [3][LANES] (last segments only)
    float* bnd      # boundary metrics alpha1, beta1, alpha2, beta2 + two final planes,
                    # each [NSTATES][LANES]


cdef inline float* _plane8(float* p, int i) noexcept nogil:
    return p + i * NSTATES * LANES


cdef void _load_group(const float* llr, Py_ssize_t B, Py_ssize_t b0, Work* w) noexcept nogil:
    """Transpose the group's blocks into lane layout (blocks past B are zeros); reset the
    extrinsic planes and the segment boundaries."""
    cdef Py_ssize_t K = w.K, S = w.S, P = w.P, n = K + 4
    cdef Py_ssize_t l, t, b, p, i, s
    cdef const float* d0
    cdef const float* d1
    cdef const float* d2
    cdef float* x1 = w.tail
    cdef float* z1 = w.tail + 3 * LANES
    cdef float* x2 = w.tail + 6 * LANES
    cdef float* z2 = w.tail + 9 * LANES
    cdef float* a1 = _plane8(w.bnd, 0)
    cdef float* be1 = _plane8(w.bnd, 1)
    cdef float* a2 = _plane8(w.bnd, 2)
    cdef float* be2 = _plane8(w.bnd, 3)
    memset(w.tail, 0, 12 * LANES * sizeof(float))
    for l in range(LANES):
        b = b0 + l // P
        p = l % P
        if b >= B:
            for t in range(S):
                w.xs[t * LANES + l] = 0.0
                w.b1[t * LANES + l] = 0.0
                w.b2[t * LANES + l] = 0.0
            continue
        d0 = llr + b * 3 * n
        d1 = d0 + n
        d2 = d1 + n
        for t in range(S):
            i = p * S + t
            w.xs[t * LANES + l] = d0[i]
            w.b1[t * LANES + l] = HALF * d1[i]
            w.b2[t * LANES + l] = HALF * d2[i]
        if p == P - 1:
            # §5.1.3.2.2: d0 = x_K z_K+1 x'_K z'_K+1, d1 = z_K x_K+2 z'_K x'_K+2,
            #             d2 = x_K+1 z_K+2 x'_K+1 z'_K+2.
            x1[0 * LANES + l] = d0[K]
            z1[0 * LANES + l] = HALF * d1[K]
            x1[1 * LANES + l] = d2[K]
            z1[1 * LANES + l] = HALF * d0[K + 1]
            x1[2 * LANES + l] = d1[K + 1]
            z1[2 * LANES + l] = HALF * d2[K + 1]
            x2[0 * LANES + l] = d0[K + 2]
            z2[0 * LANES + l] = HALF * d1[K + 2]
            x2[1 * LANES + l] = d2[K + 2]
            z2[1 * LANES + l] = HALF * d0[K + 3]
            x2[2 * LANES + l] = d1[K + 3]
            z2[2 * LANES + l] = HALF * d2[K + 3]
    for i in range(3 * LANES):
        x1[i] *= HALF
        x2[i] *= HALF
    memset(w.le21, 0, S * LANES * sizeof(float))
    # Boundaries: known start state 0 / terminated end for outer segments, uniform inside.
    memset(w.bnd, 0, 4 * NSTATES * LANES * sizeof(float))
    for l in range(LANES):
        be1[0 * LANES + l] = 0.0
        be2[0 * LANES + l] = 0.0
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
                a1[s * LANES + l] = 0.0 if s == 0 else NEG_BIG
                a2[s * LANES + l] = 0.0 if s == 0 else NEG_BIG
            if p != P - 1:
                be1[s * LANES + l] = 0.0
                be2[s * LANES + l] = 0.0


cdef void _pass_boundaries(Work* w, const float* fin, float* dst,
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


cdef void _decode_group(const float* llr, Py_ssize_t B, Py_ssize_t b0, int iterations,
                        float scale, int crc_kind, Work* w, uint8_t* out_bits,
                        int32_t* out_iters) noexcept nogil:
    cdef Py_ssize_t K = w.K, n = w.S * LANES, i, j, g
    cdef Py_ssize_t bpg = LANES // w.P
    cdef int it
    cdef bint[LANES] done
    cdef int active = 0
    cdef const int32_t* gidx = w.gidx
    cdef const int32_t* ginv = w.ginv
    cdef float e, zero = 0.0
    cdef float* fin = _plane8(w.bnd, 4)
    cdef float* fin_b = _plane8(w.bnd, 5)
    _load_group(llr, B, b0, w)
    for j in range(bpg):
        done[j] = b0 + j >= B
        if not done[j]:
            active += 1
    for it in range(iterations):
        # Decoder 1: natural order, a priori from decoder 2.
        for i in range(n):
            w.a[i] = HALF * (w.xs[i] + w.le21[i])
        _siso(w.a, w.b1, w.alpha, w.S, _plane8(w.bnd, 0), _plane8(w.bnd, 1), fin, fin_b, w.ext)
        _pass_boundaries(w, fin, _plane8(w.bnd, 0), 1)
        _pass_boundaries(w, fin_b, _plane8(w.bnd, 1), 0)
        for i in range(n):
            w.le12[i] = scale * w.ext[i]
        # Decoder 2: interleaved order c'_k = c_pi(k), read through the gather index.
        for i in range(n):
            g = gidx[i]
            w.a[i] = HALF * (w.xs[g] + w.le12[g])
        _siso(w.a, w.b2, w.alpha, w.S, _plane8(w.bnd, 2), _plane8(w.bnd, 3), fin, fin_b, w.ext)
        _pass_boundaries(w, fin, _plane8(w.bnd, 2), 1)
        _pass_boundaries(w, fin_b, _plane8(w.bnd, 3), 0)
        # Back to natural order (a gather through the inverse index, not a scatter); the
        # hard decision is the sign of the a-posteriori LLR Ls + La2 + Le2.
        for i in range(n):
            e = w.ext[ginv[i]]
            w.hard[i] = (w.xs[i] + w.le12[i] + e) < zero
            w.le21[i] = scale * e
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
    """Segments per block: the largest power of two P <= LANES that cuts K into segments
    of even length >= min_segment (1 when no such P > 1 exists)."""
    cdef Py_ssize_t P = LANES
    while P > 1 and (K % P != 0 or (K // P) % 2 != 0 or K // P < min_segment):
        P //= 2
    return P


def decode_batch(const float[:, :, ::1] llr, const int32_t[::1] pi, int iterations,
                 float scale, int crc_kind, uint8_t[:, ::1] out_bits, int32_t[::1] out_iters,
                 Py_ssize_t segments=1):
    """Turbo-decode llr[B, 3, K + 4] into out_bits[B, K] and out_iters[B].

    crc_kind: -1 = fixed iteration count, CRC24A / CRC24B (the ids of _crc.pxd, exported as
    accel_core._crc.CRC24A_ID / CRC24B_ID) = stop a block once that CRC of its hard decision
    checks. ``segments``: trellis segments per block (a power of
    two dividing K, at most BATCH_LANES). The caller validates values; shapes are
    checked here.
    """
    cdef Py_ssize_t B = llr.shape[0], K = llr.shape[2] - 4, b0, P = segments, S
    cdef Py_ssize_t l, t, q, nat, j
    cdef Work w
    cdef size_t plane, nbytes
    cdef char* mem
    if llr.shape[1] != 3 or K < 1 or pi.shape[0] != K:
        raise ValueError("decode_batch: llr must be [B, 3, K + 4] with pi of length K")
    if out_bits.shape[0] != B or out_bits.shape[1] != K or out_iters.shape[0] != B:
        raise ValueError("decode_batch: output shapes do not match llr")
    if iterations < 1 or not (crc_kind == -1 or crc_kind == CRC24A or crc_kind == CRC24B) or not scale > 0.0:
        raise ValueError("decode_batch: bad iterations, crc_kind or scale")
    if P < 1 or P > LANES or LANES % P != 0 or K % P != 0 or (K // P) % 2 != 0:
        raise ValueError(f"decode_batch: segments={P} must divide {LANES} and split K={K} "
                         f"into segments of even length")
    _check_permutation(pi)
    if B == 0:
        return
    S = K // P
    plane = ((S * LANES * sizeof(float) + 63) // 64) * 64
    nbytes = (7 * plane + <size_t>S * NSTATES * LANES * sizeof(float) + 3 * plane
              + (12 + 6 * NSTATES) * LANES * sizeof(float))
    mem = <char*>aligned_alloc(64, ((nbytes + 63) // 64) * 64)
    if mem == NULL:
        raise MemoryError(f"turbo decoder scratch of {nbytes} bytes")
    try:
        w.K = K
        w.S = S
        w.P = P
        w.xs = <float*>mem
        w.b1 = <float*>(mem + plane)
        w.b2 = <float*>(mem + 2 * plane)
        w.a = <float*>(mem + 3 * plane)
        w.le12 = <float*>(mem + 4 * plane)
        w.le21 = <float*>(mem + 5 * plane)
        w.ext = <float*>(mem + 6 * plane)
        w.alpha = <float*>(mem + 7 * plane)
        w.gidx = <int32_t*>(mem + 7 * plane + <size_t>S * NSTATES * LANES * sizeof(float))
        w.ginv = <int32_t*>(<char*>w.gidx + plane)
        w.hard = <uint8_t*>(<char*>w.ginv + plane)
        w.tail = <float*>(<char*>w.hard + plane)
        w.bnd = w.tail + 12 * LANES
        with nogil:
            for l in range(LANES):
                for t in range(S):
                    q = (l % P) * S + t              # interleaved position read by [t][l]
                    nat = pi[q]
                    j = l // P
                    w.gidx[t * LANES + l] = <int32_t>((nat % S) * LANES + j * P + nat // S)
            for q in range(S * LANES):
                w.ginv[w.gidx[q]] = <int32_t>q
            b0 = 0
            while b0 < B:
                _decode_group(&llr[0, 0, 0], B, b0, iterations, scale, crc_kind, &w,
                              &out_bits[0, 0], &out_iters[0])
                b0 += LANES // P
    finally:
        free(mem)
