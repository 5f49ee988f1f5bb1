"""LTE turbo code kernels (3GPP TS 36.212 §5.1.3.2): PCCC encoder and max-log-MAP decoder.

Thin Python wrappers (accel_core.turbo) validate and allocate; everything here runs
without the GIL on C-contiguous memoryviews.

Constituent code: 8-state RSC, g0 = 1 + D^2 + D^3 (feedback), g1 = 1 + D + D^3.
State index s = 4*D1 + 2*D2 + D3 (D1 = most recent register). From state s with
input u: feedback a = u ^ D2 ^ D3, parity p = u ^ D1 ^ D2, next state (a, D1, D2).

Decoder layout ("batch interleaving"): code blocks are decoded LANES at a time,
every per-step quantity stored as [step][lane] (and state metrics as
[step][state][lane]). All lanes share K, hence the trellis and the QPP
permutation, so each inner loop is a fixed-width loop over lanes that the C
compiler turns into SIMD float32 arithmetic, and the interleaver gathers whole
lane vectors. With a = (Ls + La)/2 and b = Lp/2 (LLR = log P(0)/P(1), bit 0 -> +1)
the branch metrics are ±G0 = ±(a + b) and ±G1 = ±(a - b); the extrinsic output
needs no a at all: Le = max(M00 + b, M01 - b) - max(M10 + b, M11 - b), where Mup
is the best alpha + beta over the branches with input u and parity p.
State metrics are normalised each step by subtracting state 0's metric.
"""
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport free

from accel_core._crc cimport crc24_remainder

cdef extern from "stdlib.h" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

cdef enum:
    LANES = 16
    NSTATES = 8

cdef float NEG_BIG = -1.0e30
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


def encode_batch(const uint8_t[:, ::1] bits, const int32_t[::1] pi, uint8_t[:, :, ::1] out):
    """out[b] = (d0, d1, d2) of bits[b]; shapes [B, K], [K], [B, 3, K + 4] (checked by caller)."""
    cdef Py_ssize_t b, B = bits.shape[0], K = bits.shape[1]
    if pi.shape[0] != K or out.shape[0] != B or out.shape[1] != 3 or out.shape[2] != K + 4:
        raise ValueError("encode_batch: inconsistent shapes")
    with nogil:
        for b in range(B):
            _encode_one(&bits[b, 0], &pi[0], K, &out[b, 0, 0], &out[b, 1, 0], &out[b, 2, 0])


# ---------------------------------------------------------------------------------------------
# Max-log-MAP constituent decoder on LANES interleaved code blocks
# ---------------------------------------------------------------------------------------------

cdef void _alpha_pass(const float* A, const float* Bv, float* alpha, Py_ssize_t K) noexcept nogil:
    """alpha[k] (k = 0..K-1) for the information part; alpha_0 = state 0."""
    cdef float[NSTATES][LANES] al
    cdef Py_ssize_t k, l, s
    cdef float g0, g1, n0, n1, n2, n3, n4, n5, n6, n7
    cdef float* out
    for l in range(LANES):
        al[0][l] = 0.0
        for s in range(1, NSTATES):
            al[s][l] = NEG_BIG
    for k in range(K):
        out = alpha + k * (NSTATES * LANES)
        for l in range(LANES):
            out[0 * LANES + l] = al[0][l]
            out[1 * LANES + l] = al[1][l]
            out[2 * LANES + l] = al[2][l]
            out[3 * LANES + l] = al[3][l]
            out[4 * LANES + l] = al[4][l]
            out[5 * LANES + l] = al[5][l]
            out[6 * LANES + l] = al[6][l]
            out[7 * LANES + l] = al[7][l]
        if k == K - 1:
            break
        for l in range(LANES):
            g0 = A[k * LANES + l] + Bv[k * LANES + l]
            g1 = A[k * LANES + l] - Bv[k * LANES + l]
            n0 = fmax2(al[0][l] + g0, al[1][l] - g0)
            n1 = fmax2(al[2][l] - g1, al[3][l] + g1)
            n2 = fmax2(al[4][l] + g1, al[5][l] - g1)
            n3 = fmax2(al[6][l] - g0, al[7][l] + g0)
            n4 = fmax2(al[0][l] - g0, al[1][l] + g0)
            n5 = fmax2(al[2][l] + g1, al[3][l] - g1)
            n6 = fmax2(al[4][l] - g1, al[5][l] + g1)
            n7 = fmax2(al[6][l] + g0, al[7][l] - g0)
            al[0][l] = 0.0
            al[1][l] = n1 - n0
            al[2][l] = n2 - n0
            al[3][l] = n3 - n0
            al[4][l] = n4 - n0
            al[5][l] = n5 - n0
            al[6][l] = n6 - n0
            al[7][l] = n7 - n0


cdef inline void _beta_step(float (*be)[LANES], const float* A, const float* Bv,
                            Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t l
    cdef float g0, g1, m0, m1, m2, m3, m4, m5, m6, m7
    for l in range(LANES):
        g0 = A[k * LANES + l] + Bv[k * LANES + l]
        g1 = A[k * LANES + l] - Bv[k * LANES + l]
        m0 = fmax2(be[0][l] + g0, be[4][l] - g0)
        m1 = fmax2(be[4][l] + g0, be[0][l] - g0)
        m2 = fmax2(be[5][l] + g1, be[1][l] - g1)
        m3 = fmax2(be[1][l] + g1, be[5][l] - g1)
        m4 = fmax2(be[2][l] + g1, be[6][l] - g1)
        m5 = fmax2(be[6][l] + g1, be[2][l] - g1)
        m6 = fmax2(be[7][l] + g0, be[3][l] - g0)
        m7 = fmax2(be[3][l] + g0, be[7][l] - g0)
        be[0][l] = 0.0
        be[1][l] = m1 - m0
        be[2][l] = m2 - m0
        be[3][l] = m3 - m0
        be[4][l] = m4 - m0
        be[5][l] = m5 - m0
        be[6][l] = m6 - m0
        be[7][l] = m7 - m0


cdef void _beta_llr_pass(const float* A, const float* Bv, const float* alpha, Py_ssize_t K,
                         float scale, const int32_t* idx, float* ext_out,
                         uint8_t* hard_out) noexcept nogil:
    """Backward recursion from the terminated end (steps K+2..0) with the extrinsic output.

    ext_out[j] = scale * Le_k with j = idx[k] (k when idx is NULL); hard_out[j] = hard
    decision on the a-posteriori LLR 2a + Le when hard_out is not NULL.
    """
    cdef float[NSTATES][LANES] be
    cdef float[LANES] raw
    cdef Py_ssize_t k, l, s, j
    cdef float bk, m00, m01, m10, m11, le
    cdef const float* al
    cdef float* eo
    cdef uint8_t* ho
    for l in range(LANES):
        be[0][l] = 0.0
        for s in range(1, NSTATES):
            be[s][l] = NEG_BIG
    for k in range(K + 2, K - 1, -1):
        _beta_step(be, A, Bv, k)
    for k in range(K - 1, -1, -1):
        al = alpha + k * (NSTATES * LANES)
        j = idx[k] if idx != NULL else k
        eo = ext_out + j * LANES
        for l in range(LANES):
            bk = Bv[k * LANES + l]
            m00 = fmax2(fmax2(al[0 * LANES + l] + be[0][l], al[1 * LANES + l] + be[4][l]),
                        fmax2(al[6 * LANES + l] + be[7][l], al[7 * LANES + l] + be[3][l]))
            m01 = fmax2(fmax2(al[2 * LANES + l] + be[5][l], al[3 * LANES + l] + be[1][l]),
                        fmax2(al[4 * LANES + l] + be[2][l], al[5 * LANES + l] + be[6][l]))
            m10 = fmax2(fmax2(al[2 * LANES + l] + be[1][l], al[3 * LANES + l] + be[5][l]),
                        fmax2(al[4 * LANES + l] + be[6][l], al[5 * LANES + l] + be[2][l]))
            m11 = fmax2(fmax2(al[0 * LANES + l] + be[4][l], al[1 * LANES + l] + be[0][l]),
                        fmax2(al[6 * LANES + l] + be[3][l], al[7 * LANES + l] + be[7][l]))
            le = fmax2(m00 + bk, m01 - bk) - fmax2(m10 + bk, m11 - bk)
            le = fmin2(fmax2(le, -EXT_LIMIT), EXT_LIMIT)
            raw[l] = le
            eo[l] = scale * le
        if hard_out != NULL:
            ho = hard_out + j * LANES
            for l in range(LANES):
                ho[l] = (2.0 * A[k * LANES + l] + raw[l]) < 0.0
        _beta_step(be, A, Bv, k)


# ---------------------------------------------------------------------------------------------
# Turbo iterations
# ---------------------------------------------------------------------------------------------

cdef struct Work:
    float* xs       # systematic LLR, natural order [K][LANES]
    float* xt1      # tail systematic of encoder 1 [3][LANES]
    float* xt2      # tail systematic of encoder 2 [3][LANES]
    float* b1       # half parity LLR of encoder 1 [K+3][LANES]
    float* b2       # half parity LLR of encoder 2 [K+3][LANES]
    float* a        # half (systematic + a priori) of the current decoder [K+3][LANES]
    float* le12     # extrinsic decoder 1 -> 2, natural order [K][LANES]
    float* le21     # extrinsic decoder 2 -> 1, natural order [K][LANES]
    float* alpha    # forward metrics [K][NSTATES][LANES]
    uint8_t* hard   # hard decisions, natural order [K][LANES]


cdef void _load_group(const float* llr, Py_ssize_t B, Py_ssize_t K, Py_ssize_t b0,
                      Work* w) noexcept nogil:
    """Transpose code blocks b0 .. b0+LANES-1 into lane layout (missing blocks are zeros)."""
    cdef Py_ssize_t l, k, n = K + 4, b
    cdef const float* d0
    cdef const float* d1
    cdef const float* d2
    for l in range(LANES):
        b = b0 + l
        if b >= B:
            for k in range(K):
                w.xs[k * LANES + l] = 0.0
            for k in range(K + 3):
                w.b1[k * LANES + l] = 0.0
                w.b2[k * LANES + l] = 0.0
            for k in range(3):
                w.xt1[k * LANES + l] = 0.0
                w.xt2[k * LANES + l] = 0.0
            continue
        d0 = llr + b * 3 * n
        d1 = d0 + n
        d2 = d1 + n
        for k in range(K):
            w.xs[k * LANES + l] = d0[k]
            w.b1[k * LANES + l] = 0.5 * d1[k]
            w.b2[k * LANES + l] = 0.5 * d2[k]
        # Tail (§5.1.3.2.2): d0 = x_K z_K+1 x'_K z'_K+1, d1 = z_K x_K+2 z'_K x'_K+2,
        #                    d2 = x_K+1 z_K+2 x'_K+1 z'_K+2.
        w.xt1[0 * LANES + l] = d0[K]
        w.b1[K * LANES + l] = 0.5 * d1[K]
        w.xt1[1 * LANES + l] = d2[K]
        w.b1[(K + 1) * LANES + l] = 0.5 * d0[K + 1]
        w.xt1[2 * LANES + l] = d1[K + 1]
        w.b1[(K + 2) * LANES + l] = 0.5 * d2[K + 1]
        w.xt2[0 * LANES + l] = d0[K + 2]
        w.b2[K * LANES + l] = 0.5 * d1[K + 2]
        w.xt2[1 * LANES + l] = d2[K + 2]
        w.b2[(K + 1) * LANES + l] = 0.5 * d0[K + 3]
        w.xt2[2 * LANES + l] = d1[K + 3]
        w.b2[(K + 2) * LANES + l] = 0.5 * d2[K + 3]


cdef void _store_lane(const Work* w, Py_ssize_t K, Py_ssize_t l, uint8_t* out) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(K):
        out[k] = w.hard[k * LANES + l]


cdef void _decode_group(const float* llr, Py_ssize_t B, Py_ssize_t K, Py_ssize_t b0,
                        const int32_t* pi, int iterations, float scale, int crc_kind,
                        Work* w, uint8_t* out_bits, int32_t* out_iters) noexcept nogil:
    cdef Py_ssize_t k, l, j, t
    cdef int it
    cdef bint[LANES] done
    cdef int active = 0
    _load_group(llr, B, K, b0, w)
    memset(w.le21, 0, K * LANES * sizeof(float))
    for l in range(LANES):
        done[l] = b0 + l >= B
        if not done[l]:
            active += 1
    for it in range(iterations):
        # Decoder 1: natural order, a priori from decoder 2.
        for k in range(K):
            for l in range(LANES):
                w.a[k * LANES + l] = 0.5 * (w.xs[k * LANES + l] + w.le21[k * LANES + l])
        for t in range(3):
            for l in range(LANES):
                w.a[(K + t) * LANES + l] = 0.5 * w.xt1[t * LANES + l]
        _alpha_pass(w.a, w.b1, w.alpha, K)
        _beta_llr_pass(w.a, w.b1, w.alpha, K, scale, NULL, w.le12, NULL)
        # Decoder 2: interleaved order c'_k = c_pi(k); extrinsic scattered back to natural order.
        for k in range(K):
            j = pi[k]
            for l in range(LANES):
                w.a[k * LANES + l] = 0.5 * (w.xs[j * LANES + l] + w.le12[j * LANES + l])
        for t in range(3):
            for l in range(LANES):
                w.a[(K + t) * LANES + l] = 0.5 * w.xt2[t * LANES + l]
        _alpha_pass(w.a, w.b2, w.alpha, K)
        _beta_llr_pass(w.a, w.b2, w.alpha, K, scale, pi, w.le21, w.hard)
        if crc_kind >= 0:
            for l in range(LANES):
                if not done[l] and crc24_remainder(w.hard + l, K, LANES, crc_kind) == 0:
                    done[l] = True
                    active -= 1
                    _store_lane(w, K, l, out_bits + (b0 + l) * K)
                    out_iters[b0 + l] = it + 1
            if active == 0:
                return
    for l in range(LANES):
        if not done[l]:
            _store_lane(w, K, l, out_bits + (b0 + l) * K)
            out_iters[b0 + l] = iterations


def decode_batch(const float[:, :, ::1] llr, const int32_t[::1] pi, int iterations,
                 float scale, int crc_kind, uint8_t[:, ::1] out_bits, int32_t[::1] out_iters):
    """Turbo-decode llr[B, 3, K + 4] into out_bits[B, K] and out_iters[B].

    crc_kind: -1 = fixed iteration count, 0 / 1 = stop a block once CRC24A / CRC24B
    of its hard decision checks. The caller validates values; shapes are checked here.
    """
    cdef Py_ssize_t B = llr.shape[0], K = llr.shape[2] - 4, b0
    cdef Work w
    cdef size_t fsz = sizeof(float)
    cdef size_t per_k = (K + 3) * LANES * fsz
    cdef size_t nbytes
    cdef char* mem
    if llr.shape[1] != 3 or K < 1 or pi.shape[0] != K:
        raise ValueError("decode_batch: llr must be [B, 3, K + 4] with pi of length K")
    if out_bits.shape[0] != B or out_bits.shape[1] != K or out_iters.shape[0] != B:
        raise ValueError("decode_batch: output shapes do not match llr")
    if iterations < 1 or crc_kind < -1 or crc_kind > 1 or not scale > 0.0:
        raise ValueError("decode_batch: bad iterations, crc_kind or scale")
    if B == 0:
        return
    # Seven [K+3][LANES] float planes, the alpha store and the hard decisions, each
    # rounded up to 64 bytes.
    per_k = ((per_k + 63) // 64) * 64
    nbytes = 7 * per_k + <size_t>K * NSTATES * LANES * fsz + ((K * LANES + 63) // 64) * 64
    mem = <char*>aligned_alloc(64, nbytes)
    if mem == NULL:
        raise MemoryError(f"turbo decoder scratch of {nbytes} bytes")
    try:
        w.xs = <float*>mem
        w.xt1 = <float*>(mem + per_k)
        w.xt2 = w.xt1 + 3 * LANES
        w.b1 = <float*>(mem + 2 * per_k)
        w.b2 = <float*>(mem + 3 * per_k)
        w.a = <float*>(mem + 4 * per_k)
        w.le12 = <float*>(mem + 5 * per_k)
        w.le21 = <float*>(mem + 6 * per_k)
        w.alpha = <float*>(mem + 7 * per_k)
        w.hard = <uint8_t*>(mem + 7 * per_k + <size_t>K * NSTATES * LANES * fsz)
        with nogil:
            b0 = 0
            while b0 < B:
                _decode_group(&llr[0, 0, 0], B, K, b0, &pi[0], iterations, scale, crc_kind,
                              &w, &out_bits[0, 0], &out_iters[0])
                b0 += LANES
    finally:
        free(mem)
