/* The first (s == 1) radix-4 and radix-8 stages of accel_core's Stockham FFT with
 * explicit shuffles, for the AVX2 and AVX-512 builds of accel_core/_fft_impl.pxi
 * (both run the same 256-bit code: see the end of this comment).
 *
 * The first stage reads the interleaved complex input row x[p + j*m] (j < r) and writes
 * the split arrays yr/yi at r*p + k: contiguous loads that must be de-interleaved, and a
 * store that is an r x W transpose (W = vector lanes). gcc vectorises the Cython loop
 * (one p per iteration) with long permute chains; here the loop takes W values of p at
 * a time:
 *   - de-interleave: one in-lane shuffle per vector (shuffle_ps / unpack_pd), which
 *     leaves the lanes in a fixed order pi (float [0 1 4 5 2 3 6 7], double [0 2 1 3]);
 *     the twiddles are loaded in the same order (one permute4x64 each), so the butterfly
 *     works on lanes in order pi and the transposed store puts each p back in place.
 *   - butterfly: split real / imaginary vectors, the same arithmetic as the Cython
 *     loop (GCC vector extensions, contracted to FMA as there).
 *   - transposed store: in-lane 4x4 transposes (unpack + shuffle) and 128-bit lane
 *     swaps (permute2f128).
 * Each function returns how many p it did (a multiple of W, at most m); the Cython loop
 * does the rest. Without AVX2 they do nothing (return 0), so the scalar build runs the
 * Cython loop alone. The direction's sign is a compile-time constant in each loop
 * (``fwd`` picks one of two inlined copies).
 * Measured against the Cython loops gcc vectorises (whole transforms of 128-4096 points,
 * old and new kernels interleaved, AMD EPYC Zen 4): AVX2 1.12-1.23x faster for complex64,
 * 1.19-1.39x for complex128. On the AVX-512 build a 512-bit version (two-source
 * vpermt2ps/pd for the de-interleave, log2(r) zip rounds for the transpose) was no faster
 * than the old loops, while this 256-bit code with AVX-512's 32 vector registers (no
 * spills in the radix-8 butterfly) is 1.0-1.17x faster: Zen 4 runs 512-bit shuffles as
 * two 256-bit ones. Tried and dropped on measurement: first-stage twiddles stored in
 * lane order pi (no permute per load: 1-7% slower), an explicit last radix-4 stage
 * (+-3%: noise), the output row as one of the ping-pong buffers (slower: yr and yi of
 * the row sit a power of two apart), the explicit radix-8 loop below at s == 4 for
 * complex128 on AVX-512 (-5% to +3% by size).
 * The last radix-2 stage (below) as an explicit loop: 128/512/2048-point complex128 on
 * AVX2 (4*4*4*2 ...) 3%, 5.5%, 0.5% faster, measured interleaved against the Cython loop;
 * the same loop for the last radix-4 stage (retried) was again no faster: -3% to +9% by
 * size and path (2048 complex64 AVX2 +5%, 1024 complex128 +3-6%), two runs.
 * A last radix-8 stage (m == 1) as such a loop writes the output row itself (before, a
 * last radix-8 stage stayed split and a join pass followed), which lets the schedules end
 * with one: 512 points (4*4*4*8) 0.91-0.97 and complex64 2048 (4*4*4*4*8) 0.92-0.99 of the
 * time of the best earlier schedule on AVX2 / AVX-512 (see accel_core.dft.schedule_for).
 * Tried and dropped: a split radix-16 stage (4 x 4 in registers, one pass for two radix-4
 * ones; GCC vector extensions over q, any s and m): every schedule using it was slower,
 * on AVX2 and AVX-512 (128-point complex128 8*16 1.34x / 1.20x the time of 4*4*4*2 /
 * 4*8*4, 2048 complex64 8*16*16 1.44x and 8*4*16*4 1.12x of 8*4*4*4*4, 1024 complex64
 * 8*8*16 1.17x): 32 legs' addresses (run-time s and m) and 32 data vectors spill
 * (350 ymm stack moves in the AVX2 loop). A version worth retrying stages the 4 x 4 through
 * an explicit L1 buffer with one base pointer per leg group.
 * A last radix-16 stage (m == 1: no twiddles, one base per array, csrc/fft_last16.h) is
 * kept. With a run-time s it won only on AVX-512 (32 registers: 0.94-0.99 of the time of
 * the radix-4 schedules at 128 / 1024 points); on AVX2 its 32 live vectors spill (about
 * 120 ymm stack moves per iteration), and staging the columns through memory explicitly
 * (an asm barrier between the column and row passes) was no faster. With s a compile-time
 * constant (s = 8 ... 128: every leg a constant offset from one base, no address
 * registers to spill) it wins on both: 0.89-0.96 of the time on AVX-512 and 0.91-0.97 on
 * AVX2 at 128-1024 points (see accel_core.dft._MEASURED). For 2048 points it is no faster
 * and for 4096 1.04-1.34x slower on both (16 input and 16 output streams a power of two
 * apart). The same compile-time constants tried elsewhere and dropped: the first radix-4 /
 * radix-8 stage with constant m (a C harness: only the AVX2 radix-8 at m == 16 was
 * faster, 5% of the stage, too little to resolve in whole transforms on the shared
 * machine) and the last radix-8 stage with constant s (no faster: its 8 legs fit). Where the time goes in a 128-point complex64
 * row on AVX2 (8*4*4, perf): the first radix-8 stage 47%, the s == 8 radix-4 stage 14%,
 * the last radix-4 stage and the row loop 28%: the first stage is shuffle-bound (per 8 p:
 * 16 de-interleave shuffles, 14 twiddle permutes, two 8 x 8 transposes of 24 each), not
 * spill-bound (it spills on AVX2, yet takes 43% on AVX-512 too). Its twiddles stored in
 * lane order pi (no permute per load) were retried: 2-9% faster first stages alone (a C
 * harness), but whole transforms measured against the old build ranged from 0.96
 * (4096 complex64) to 1.09 (128 complex64 on AVX-512) of the time: dropped again. * Tried and dropped: 128-point rows vectorised across rows (one row per lane: 8 complex64
 * or 4 complex128 rows per 256-bit vector; an 8 x 8 / 4 x 4 transpose per 4 / 2 elements
 * fused into the first stage's loads and the last stage's stores, every stage between
 * them vertical arithmetic with broadcast twiddles, no shuffle; the plan's radix-2/4/8
 * schedule; 16 KiB of scratch; also as separate transpose passes). Exact (within the
 * tolerances on all three builds), but slower, interleaved in one process against the
 * per-row kernel, three runs: complex64 1.10-1.15x the time on AVX2 (its best schedule
 * against 8*4*4) and 1.27-1.32x on AVX-512 (against 8*16), complex128 1.22-1.36x on AVX2
 * and 1.32-1.6x on AVX-512. The transposes cost about as many shuffles as the per-row first stage
 * (24 per 64 floats at each end against its 39 per 64), and perf puts the time in the
 * transposed loads from 8 rows 1 KiB apart (L2: the batch, 256 KiB, does not fit L1 and
 * a software prefetch of the next group did not help), with the scratch and 8 rows in and
 * out filling the 32 KiB L1.
 * A middle radix-16 stage (#17): the 4 x 4 of the last radix-16 with twiddled split outputs
 * (csrc/fft_mid16.h, s a compile-time constant 8 ... 128, run-time m) is kept for complex64
 * 2048 = 8*16*16 on AVX2 (0.95-0.995 of 4*4*4*4*8) and AVX-512 (0.87-0.95); at 4096 and for
 * complex128 2048 no schedule with it won beyond noise (see accel_core.dft._MEASURED). Its
 * fallback, two radix-4 stages in a blocked order (per group of the second stage and q
 * chunk, the first stage's 16 legs through a 16 x 256-byte L1 buffer: the row crosses L2
 * once for two passes), is exact; at s >= 32 it is 0.95-1.07 of the time of the two passes
 * (kept for complex64 4096 on AVX2 at s = 64: 0.96-0.97 in three runs of four, see
 * accel_core.dft._BLOCKED16) and at s = 4 / 16 slower (1.1-2.5x: short q chunks lose the
 * s = 4, 8, 16 loops): so at these sizes the middle passes are barely L2-bound (Zen 4's L2
 * keeps up). It is also the scalar build's and odd strides' form of a middle radix 16.
 */
#ifndef VRDMA_FFT_FIRST_H
#define VRDMA_FFT_FIRST_H

#include <stddef.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define VRDMA_INLINE static inline __attribute__((always_inline))

/* ---- the butterflies, generic over the vector type V (GCC vector extensions) ---- */

#define VRDMA_CMUL_STORE(yr_, yi_, cr, ci, wr_, wi_) \
    do { __typeof__(cr) w_r = (wr_), w_i = (wi_);                                                  \
         (yr_) = (cr) * w_r - (ci) * w_i; (yi_) = (cr) * w_i + (ci) * w_r; } while (0)
#define VRDMA_CMUL_TW(yr_, yi_, cr, ci, LDW, k) VRDMA_CMUL_TW_(yr_, yi_, cr, ci, VRDMA_TW(LDW, k))
#define VRDMA_CMUL_TW_(yr_, yi_, cr, ci, ...) VRDMA_CMUL_STORE(yr_, yi_, cr, ci, __VA_ARGS__)

/* The butterflies name the loop's wr, wi, p and m: twiddle k (k = 1 .. r-1) is
 * LDW(wr + p + (k-1)*m), loaded where it is used (loading all of them first made gcc
 * spill them: 16 vector registers on AVX2). */
#define VRDMA_TW(LDW, k) LDW(wr + p + ((k) - 1) * m), LDW(wi + p + ((k) - 1) * m)

/* radix 4: a[0..3] (re, im) -> c[0..3] twiddled by w_1..w_3; sg = +1 forward, -1 inverse */
#define VRDMA_BFLY4(V, sg, ar, ai, LDW, cr, ci) do {                                 \
    V t0r = ar[0] + ar[2], t0i = ai[0] + ai[2];                                         \
    V t1r = ar[0] - ar[2], t1i = ai[0] - ai[2];                                         \
    V t2r = ar[1] + ar[3], t2i = ai[1] + ai[3];                                         \
    V t3r = (sg) > 0 ? ai[1] - ai[3] : ai[3] - ai[1];                                   \
    V t3i = (sg) > 0 ? ar[3] - ar[1] : ar[1] - ar[3];                                   \
    V u1r = t1r + t3r, u1i = t1i + t3i, u2r = t0r - t2r, u2i = t0i - t2i;               \
    V u3r = t1r - t3r, u3i = t1i - t3i;                                                 \
    cr[0] = t0r + t2r; ci[0] = t0i + t2i;                                               \
    VRDMA_CMUL_TW(cr[1], ci[1], u1r, u1i, LDW, 1);                             \
    VRDMA_CMUL_TW(cr[2], ci[2], u2r, u2i, LDW, 2);                             \
    VRDMA_CMUL_TW(cr[3], ci[3], u3r, u3i, LDW, 3);                             \
} while (0)

/* radix 8 as two radix-4 halves (even / odd legs) and the W8 rotations; legs are read
 * (LD: de-interleaving loads of x at p + j*m) where used: the odd ones after the even half */
#define VRDMA_LEG(LD, j) LD(x + 2 * (p + (j) * m), &ar[j], &ai[j])
#define VRDMA_BFLY8(V, sg, h, ar, ai, LD, LDW, cr, ci) do {                             \
    VRDMA_LEG(LD, 0); VRDMA_LEG(LD, 2); VRDMA_LEG(LD, 4); VRDMA_LEG(LD, 6);             \
    VRDMA_BFLY8_(V, sg, h, ar, ai, LDW, cr, ci, VRDMA_CMUL_TW,                          \
                 VRDMA_LEG(LD, 1); VRDMA_LEG(LD, 3);                                    \
                 VRDMA_LEG(LD, 5); VRDMA_LEG(LD, 7));                                   \
} while (0)
/* the radix-8 body after the even legs are in ar/ai; ODD loads the odd legs; MUL twiddles
 * output k (VRDMA_CMUL_TW, or VRDMA_NO_TW for a stage with m == 1) */
#define VRDMA_NO_TW(yr_, yi_, cr, ci, LDW, k) do { (yr_) = (cr); (yi_) = (ci); } while (0)
#define VRDMA_BFLY8_(V, sg, h, ar, ai, LDW, cr, ci, MUL, ODD) do {                           \
    V t0r = ar[0] + ar[4], t0i = ai[0] + ai[4];                                         \
    V t1r = ar[0] - ar[4], t1i = ai[0] - ai[4];                                         \
    V t2r = ar[2] + ar[6], t2i = ai[2] + ai[6];                                         \
    V t3r = (sg) > 0 ? ai[2] - ai[6] : ai[6] - ai[2];                                   \
    V t3i = (sg) > 0 ? ar[6] - ar[2] : ar[2] - ar[6];                                   \
    V e0r = t0r + t2r, e0i = t0i + t2i, e2r = t0r - t2r, e2i = t0i - t2i;               \
    V e1r = t1r + t3r, e1i = t1i + t3i, e3r = t1r - t3r, e3i = t1i - t3i;               \
    ODD;                                                                                \
    V v0r = ar[1] + ar[5], v0i = ai[1] + ai[5];                                         \
    V v1r = ar[1] - ar[5], v1i = ai[1] - ai[5];                                         \
    V v2r = ar[3] + ar[7], v2i = ai[3] + ai[7];                                         \
    V v3r = (sg) > 0 ? ai[3] - ai[7] : ai[7] - ai[3];                                   \
    V v3i = (sg) > 0 ? ar[7] - ar[3] : ar[3] - ar[7];                                   \
    V o0r = v0r + v2r, o0i = v0i + v2i, q2r = v0r - v2r, q2i = v0i - v2i;               \
    V q1r = v1r + v3r, q1i = v1i + v3i, q3r = v1r - v3r, q3i = v1i - v3i;               \
    V o1r, o1i, o2r, o2i, o3r, o3i;                                                     \
    if ((sg) > 0) {                                                                     \
        o1r = (h) * (q1r + q1i); o1i = (h) * (q1i - q1r);                               \
        o2r = q2i; o2i = -q2r;                                                          \
        o3r = (h) * (q3i - q3r); o3i = -(h) * (q3i + q3r);                              \
    } else {                                                                            \
        o1r = (h) * (q1r - q1i); o1i = (h) * (q1i + q1r);                               \
        o2r = -q2i; o2i = q2r;                                                          \
        o3r = (h) * (-q3i - q3r); o3i = -(h) * (q3i - q3r);                             \
    }                                                                                   \
    V d1r = e1r + o1r, d1i = e1i + o1i, d2r = e2r + o2r, d2i = e2i + o2i;               \
    V d3r = e3r + o3r, d3i = e3i + o3i, d4r = e0r - o0r, d4i = e0i - o0i;               \
    V d5r = e1r - o1r, d5i = e1i - o1i, d6r = e2r - o2r, d6i = e2i - o2i;               \
    V d7r = e3r - o3r, d7i = e3i - o3i;                                                 \
    cr[0] = e0r + o0r; ci[0] = e0i + o0i;                                               \
    MUL(cr[1], ci[1], d1r, d1i, LDW, 1);                                       \
    MUL(cr[2], ci[2], d2r, d2i, LDW, 2);                                       \
    MUL(cr[3], ci[3], d3r, d3i, LDW, 3);                                       \
    MUL(cr[4], ci[4], d4r, d4i, LDW, 4);                                       \
    MUL(cr[5], ci[5], d5r, d5i, LDW, 5);                                       \
    MUL(cr[6], ci[6], d6r, d6i, LDW, 6);                                       \
    MUL(cr[7], ci[7], d7r, d7i, LDW, 7);                                       \
} while (0)

/* One first-stage loop: W values of p per iteration. Needs per (type, ISA):
 * LD(x, &re, &im) de-interleaving 2W reals, LDW(w) twiddles in the same lane order,
 * ST4(y, c) / ST8(y, c) writing c[k][lane] to y[r*p(lane) + k] (rW reals). */
#define VRDMA_FIRST_LOOP(R, V, W, T, LD, LDW, ST, SG)                                  \
    for (; p + (W) <= m; p += (W)) {                                                    \
        V ar[R], ai[R], cr[R], ci[R];                                                   \
        if ((R) == 4) {                                                                 \
            for (int j = 0; j < (R); j++) LD(x + 2 * (p + j * m), &ar[j], &ai[j]);      \
            VRDMA_BFLY4(V, SG, ar, ai, LDW, cr, ci);                                    \
        } else {                                                                        \
            VRDMA_BFLY8(V, SG, h, ar, ai, LD, LDW, cr, ci);                             \
        }                                                                               \
        ST(yr + (R) * p, cr); ST(yi + (R) * p, ci);                                     \
    }

#define VRDMA_FIRST_FN(NAME, R, V, W, T, LD, LDW, ST, SET1)                             \
static Py_ssize_t NAME(T *__restrict yr, T *__restrict yi, const T *__restrict x,      \
                       Py_ssize_t m, const T *__restrict wr, const T *__restrict wi,    \
                       T hs, int fwd) {                                                 \
    Py_ssize_t p = 0;                                                                   \
    V h = SET1(hs);                                                                     \
    (void)h;                                                                            \
    if (fwd) { VRDMA_FIRST_LOOP(R, V, W, T, LD, LDW, ST, 1) }                           \
    else { VRDMA_FIRST_LOOP(R, V, W, T, LD, LDW, ST, -1) }                              \
    return p;                                                                           \
}

#if defined(__AVX2__) && defined(__FMA__)
/* ---- AVX2 and AVX-512 builds: 256-bit vectors, in-lane shuffles, lanes in order pi ---- */

/* float: re = [r0 r1 r4 r5 | r2 r3 r6 r7] (pi = 0 1 4 5 2 3 6 7) */
VRDMA_INLINE void vrdma_ld_ps(const float* x, __m256* re, __m256* im) {
    __m256 lo = _mm256_loadu_ps(x), hi = _mm256_loadu_ps(x + 8);
    *re = _mm256_shuffle_ps(lo, hi, 0x88);
    *im = _mm256_shuffle_ps(lo, hi, 0xDD);
}
VRDMA_INLINE __m256 vrdma_ldw_ps(const float* w) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(w)), 0xD8));
}
/* in-lane 4x4 transpose of c[0..3]: A[a] = [c0..3 at lane position a | at a + 4] */
VRDMA_INLINE void vrdma_tr4_ps(const __m256* c, __m256* A) {
    __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
    __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
    A[0] = _mm256_shuffle_ps(t0, t2, 0x44); A[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    A[2] = _mm256_shuffle_ps(t1, t3, 0x44); A[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}
/* positions 0..7 hold p = 0 1 4 5 2 3 6 7: A0 = [p0|p2], A1 = [p1|p3], A2 = [p4|p6], A3 = [p5|p7] */
VRDMA_INLINE void vrdma_st4_ps(float* y, __m256* c) {
    __m256 A[4];
    vrdma_tr4_ps(c, A);
    _mm256_storeu_ps(y, _mm256_permute2f128_ps(A[0], A[1], 0x20));
    _mm256_storeu_ps(y + 8, _mm256_permute2f128_ps(A[0], A[1], 0x31));
    _mm256_storeu_ps(y + 16, _mm256_permute2f128_ps(A[2], A[3], 0x20));
    _mm256_storeu_ps(y + 24, _mm256_permute2f128_ps(A[2], A[3], 0x31));
}
VRDMA_INLINE void vrdma_st8_ps(float* y, __m256* c) {
    __m256 A[4], B[4];
    static const int pl[4] = {0, 1, 4, 5}, ph[4] = {2, 3, 6, 7};
    vrdma_tr4_ps(c, A);
    vrdma_tr4_ps(c + 4, B);
    for (int a = 0; a < 4; a++) {
        _mm256_storeu_ps(y + 8 * pl[a], _mm256_permute2f128_ps(A[a], B[a], 0x20));
        _mm256_storeu_ps(y + 8 * ph[a], _mm256_permute2f128_ps(A[a], B[a], 0x31));
    }
}

/* double: re = [r0 r2 | r1 r3] (pi = 0 2 1 3) */
VRDMA_INLINE void vrdma_ld_pd(const double* x, __m256d* re, __m256d* im) {
    __m256d lo = _mm256_loadu_pd(x), hi = _mm256_loadu_pd(x + 4);
    *re = _mm256_unpacklo_pd(lo, hi);
    *im = _mm256_unpackhi_pd(lo, hi);
}
VRDMA_INLINE __m256d vrdma_ldw_pd(const double* w) {
    return _mm256_permute4x64_pd(_mm256_loadu_pd(w), 0xD8);
}
/* the four p of c[0..3] as [c0 c1 c2 c3 at p], p = 0..3, stored at y + step * p */
VRDMA_INLINE void vrdma_tr4_pd(double* y, const __m256d* c, int step) {
    __m256d t0 = _mm256_unpacklo_pd(c[0], c[1]), t1 = _mm256_unpackhi_pd(c[0], c[1]);
    __m256d t2 = _mm256_unpacklo_pd(c[2], c[3]), t3 = _mm256_unpackhi_pd(c[2], c[3]);
    _mm256_storeu_pd(y, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(y + step, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(y + 2 * step, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(y + 3 * step, _mm256_permute2f128_pd(t1, t3, 0x31));
}
VRDMA_INLINE void vrdma_st4_pd(double* y, __m256d* c) { vrdma_tr4_pd(y, c, 4); }
VRDMA_INLINE void vrdma_st8_pd(double* y, __m256d* c) {
    vrdma_tr4_pd(y, c, 8);
    vrdma_tr4_pd(y + 4, c + 4, 8);
}

VRDMA_FIRST_FN(vrdma_first4_f32, 4, __m256, 8, float, vrdma_ld_ps, vrdma_ldw_ps, vrdma_st4_ps, _mm256_set1_ps)
VRDMA_FIRST_FN(vrdma_first8_f32, 8, __m256, 8, float, vrdma_ld_ps, vrdma_ldw_ps, vrdma_st8_ps, _mm256_set1_ps)
VRDMA_FIRST_FN(vrdma_first4_f64, 4, __m256d, 4, double, vrdma_ld_pd, vrdma_ldw_pd, vrdma_st4_pd, _mm256_set1_pd)
VRDMA_FIRST_FN(vrdma_first8_f64, 8, __m256d, 4, double, vrdma_ld_pd, vrdma_ldw_pd, vrdma_st8_pd, _mm256_set1_pd)
#define VRDMA_FIRST_SIMD 256

/* A radix-4 stage at s == 4 for float (split in and out, forward only: see _run): gcc
 * vectorises its compile-time loop of 4 butterflies per p with 128-bit vectors; here one
 * 256-bit vector holds two p (4 q each): legs x[4p + q + j*4m] are contiguous, the
 * twiddles of p and p + 1 fill a half each, and the outputs y[16p + 4k + q] are the
 * halves of c_k recombined by permute2f128. Returns how many p it did (even, <= m). */
VRDMA_INLINE __m256 vrdma_tw2_ps(const float* w) {
    return _mm256_set_m128(_mm_broadcast_ss(w + 1), _mm_broadcast_ss(w));
}
VRDMA_INLINE void vrdma_st_s4_ps(float* y, const __m256* c) {
    _mm256_storeu_ps(y, _mm256_permute2f128_ps(c[0], c[1], 0x20));
    _mm256_storeu_ps(y + 8, _mm256_permute2f128_ps(c[2], c[3], 0x20));
    _mm256_storeu_ps(y + 16, _mm256_permute2f128_ps(c[0], c[1], 0x31));
    _mm256_storeu_ps(y + 24, _mm256_permute2f128_ps(c[2], c[3], 0x31));
}
static Py_ssize_t vrdma_s4_radix4_f32(float *__restrict yr, float *__restrict yi,
                                      const float *__restrict xr, const float *__restrict xi,
                                      Py_ssize_t m, const float *__restrict wr,
                                      const float *__restrict wi) {
    Py_ssize_t p = 0;
    for (; p + 2 <= m; p += 2) {
        __m256 ar[4], ai[4], cr[4], ci[4];
        for (int j = 0; j < 4; j++) {
            ar[j] = _mm256_loadu_ps(xr + 4 * p + j * 4 * m);
            ai[j] = _mm256_loadu_ps(xi + 4 * p + j * 4 * m);
        }
        VRDMA_BFLY4(__m256, 1, ar, ai, vrdma_tw2_ps, cr, ci);
        vrdma_st_s4_ps(yr + 16 * p, cr);
        vrdma_st_s4_ps(yi + 16 * p, ci);
    }
    return p;
}
#define VRDMA_S4_SIMD 256

/* A split radix-8 stage at s == 8 for float (forward only, see _run): one 256-bit
 * vector per leg (x[8p + q + j*8m], q < 8), the twiddles w_k(p) broadcast where they are
 * used, y[64p + 8k + q] stored whole. gcc hoisted all 14 broadcasts and the 16 legs out
 * of its compile-time loop over q and spilled them. Returns how many p it did: m on the
 * AVX-512 build (32 vector registers: 2-5% faster whole transforms at 1024-4096 points),
 * 0 on the AVX2 one (16 registers: it spills too, and measured no faster). */
#define VRDMA_S8_LEG(j) do { ar[j] = _mm256_loadu_ps(xr + 8 * p + (j) * 8 * m);        \
                             ai[j] = _mm256_loadu_ps(xi + 8 * p + (j) * 8 * m); } while (0)
static Py_ssize_t vrdma_s8_radix8_f32(float *__restrict yr, float *__restrict yi,
                                      const float *__restrict xr, const float *__restrict xi,
                                      Py_ssize_t m, const float *__restrict wr,
                                      const float *__restrict wi, float hs) {
    Py_ssize_t p = 0;
    __m256 h = _mm256_set1_ps(hs);
#ifndef __AVX512F__
    m = 0;
#endif
    for (; p < m; p++) {
        __m256 ar[8], ai[8], cr[8], ci[8];
        VRDMA_S8_LEG(0); VRDMA_S8_LEG(2); VRDMA_S8_LEG(4); VRDMA_S8_LEG(6);
        VRDMA_BFLY8_(__m256, 1, h, ar, ai, _mm256_broadcast_ss, cr, ci, VRDMA_CMUL_TW,
                     VRDMA_S8_LEG(1); VRDMA_S8_LEG(3); VRDMA_S8_LEG(5); VRDMA_S8_LEG(7));
        for (int k = 0; k < 8; k++) {
            _mm256_storeu_ps(yr + 64 * p + 8 * k, cr[k]);
            _mm256_storeu_ps(yi + 64 * p + 8 * k, ci[k]);
        }
    }
    return p;
}

/* The last radix-2 stage (m == 1, no twiddles): split xr/xi at q and q + s to the
 * interleaved output row y (times the inverse's 1/n scale when !fwd), W values of q per
 * iteration: the re / im vectors are interleaved by unpacklo/hi and one 128-bit lane
 * swap per output vector (gcc's loop used cross-lane permutes). Returns how many q it
 * did (a multiple of W, <= s); the Cython loop does the rest. */
VRDMA_INLINE void vrdma_st_il_pd(double* y, __m256d re, __m256d im) {
    __m256d lo = _mm256_unpacklo_pd(re, im), hi = _mm256_unpackhi_pd(re, im);
    _mm256_storeu_pd(y, _mm256_permute2f128_pd(lo, hi, 0x20));
    _mm256_storeu_pd(y + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
}
VRDMA_INLINE void vrdma_st_il_ps(float* y, __m256 re, __m256 im) {
    __m256 lo = _mm256_unpacklo_ps(re, im), hi = _mm256_unpackhi_ps(re, im);
    _mm256_storeu_ps(y, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(y + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
#define VRDMA_LAST2_FN(NAME, V, W, T, LDU, ST, SET1)                                    \
static Py_ssize_t NAME(T *__restrict y, const T *__restrict xr, const T *__restrict xi, \
                       Py_ssize_t s, T scale, int fwd) {                                \
    Py_ssize_t q = 0;                                                                   \
    V sc = SET1(scale);                                                                 \
    for (; q + (W) <= s; q += (W)) {                                                    \
        V a0r = LDU(xr + q), a0i = LDU(xi + q), a1r = LDU(xr + q + s), a1i = LDU(xi + q + s); \
        V c0r = a0r + a1r, c0i = a0i + a1i, c1r = a0r - a1r, c1i = a0i - a1i;           \
        if (!fwd) { c0r *= sc; c0i *= sc; c1r *= sc; c1i *= sc; }                       \
        ST(y + 2 * q, c0r, c0i);                                                        \
        ST(y + 2 * (q + s), c1r, c1i);                                                  \
    }                                                                                   \
    return q;                                                                           \
}
VRDMA_LAST2_FN(vrdma_last2_f64, __m256d, 4, double, _mm256_loadu_pd, vrdma_st_il_pd, _mm256_set1_pd)
VRDMA_LAST2_FN(vrdma_last2_f32, __m256, 8, float, _mm256_loadu_ps, vrdma_st_il_ps, _mm256_set1_ps)

/* The last radix-8 stage (m == 1) the same way, whole rows only: returns 1 if it wrote
 * the row (s a multiple of W), else 0 and touches nothing (the plan then runs the split
 * radix-8 stage and a join pass). */
#define VRDMA_LAST8_LOOP(V, W, LDU, ST, SG)                                             \
    for (Py_ssize_t q = 0; q < s; q += (W)) {                                           \
        V ar[8], ai[8], cr[8], ci[8];                                                   \
        VRDMA_L8_LEG(LDU, 0); VRDMA_L8_LEG(LDU, 2); VRDMA_L8_LEG(LDU, 4); VRDMA_L8_LEG(LDU, 6);             \
        VRDMA_BFLY8_(V, SG, h, ar, ai, LDU, cr, ci, VRDMA_NO_TW,                        \
                     VRDMA_L8_LEG(LDU, 1); VRDMA_L8_LEG(LDU, 3); VRDMA_L8_LEG(LDU, 5); VRDMA_L8_LEG(LDU, 7)); \
        for (int k = 0; k < 8; k++) {                                                   \
            if ((SG) < 0) { cr[k] *= sc; ci[k] *= sc; }                                 \
            ST(y + 2 * (q + k * s), cr[k], ci[k]);                                      \
        }                                                                               \
    }
#define VRDMA_L8_LEG(LDU, j) do { ar[j] = LDU(xr + q + (j) * s); ai[j] = LDU(xi + q + (j) * s); } while (0)
#define VRDMA_LAST8_FN(NAME, V, W, T, LDU, ST, SET1)                                    \
static int NAME(T *__restrict y, const T *__restrict xr, const T *__restrict xi,        \
                Py_ssize_t s, T scale, T hs, int fwd) {                                 \
    if (s % (W)) return 0;                                                              \
    V sc = SET1(scale), h = SET1(hs);                                                   \
    if (fwd) { VRDMA_LAST8_LOOP(V, W, LDU, ST, 1) }                                     \
    else { VRDMA_LAST8_LOOP(V, W, LDU, ST, -1) }                                        \
    return 1;                                                                           \
}
VRDMA_LAST8_FN(vrdma_last8_f64, __m256d, 4, double, _mm256_loadu_pd, vrdma_st_il_pd, _mm256_set1_pd)
VRDMA_LAST8_FN(vrdma_last8_f32, __m256, 8, float, _mm256_loadu_ps, vrdma_st_il_ps, _mm256_set1_ps)

#else
/* baseline x86-64: the Cython loops do every p */
#define VRDMA_FIRST_NONE(NAME, T) \
static Py_ssize_t NAME(T* yr, T* yi, const T* x, Py_ssize_t m, const T* wr, const T* wi, T hs, int fwd) { \
    (void)yr; (void)yi; (void)x; (void)m; (void)wr; (void)wi; (void)hs; (void)fwd; return 0; }
VRDMA_FIRST_NONE(vrdma_first4_f32, float)
VRDMA_FIRST_NONE(vrdma_first8_f32, float)
VRDMA_FIRST_NONE(vrdma_first4_f64, double)
VRDMA_FIRST_NONE(vrdma_first8_f64, double)
static Py_ssize_t vrdma_s4_radix4_f32(float* yr, float* yi, const float* xr, const float* xi,
                                      Py_ssize_t m, const float* wr, const float* wi) {
    (void)yr; (void)yi; (void)xr; (void)xi; (void)m; (void)wr; (void)wi; return 0; }
#define VRDMA_S4_SIMD 0
static Py_ssize_t vrdma_s8_radix8_f32(float* yr, float* yi, const float* xr, const float* xi,
                                      Py_ssize_t m, const float* wr, const float* wi, float hs) {
    (void)yr; (void)yi; (void)xr; (void)xi; (void)m; (void)wr; (void)wi; (void)hs; return 0; }
static Py_ssize_t vrdma_last2_f64(double* y, const double* xr, const double* xi, Py_ssize_t s,
                                  double scale, int fwd) {
    (void)y; (void)xr; (void)xi; (void)s; (void)scale; (void)fwd; return 0; }
static Py_ssize_t vrdma_last2_f32(float* y, const float* xr, const float* xi, Py_ssize_t s,
                                  float scale, int fwd) {
    (void)y; (void)xr; (void)xi; (void)s; (void)scale; (void)fwd; return 0; }
static int vrdma_last8_f64(double* y, const double* xr, const double* xi, Py_ssize_t s,
                           double scale, double hs, int fwd) {
    (void)y; (void)xr; (void)xi; (void)s; (void)scale; (void)hs; (void)fwd; return 0; }
static int vrdma_last8_f32(float* y, const float* xr, const float* xi, Py_ssize_t s,
                           float scale, float hs, int fwd) {
    (void)y; (void)xr; (void)xi; (void)s; (void)scale; (void)hs; (void)fwd; return 0; }
#define VRDMA_FIRST_SIMD 0
#endif

/* The last radix-16 stage (m == 1): csrc/fft_last16.h, 4 x 4 in registers, one pass for
 * the last two radix-4 ones. Every build has the scalar instance (the scalar build's whole
 * stage, the wide builds' tail of q); the AVX2 / AVX-512 builds run whole 256-bit vectors
 * of q first (one vector per leg, the output interleaved as vrdma_st_il_*). */
#define R16_LDU(p) (*(p))
#define R16_SET1(v) (v)
#define R16_W 1
#define R16_NAME vrdma_r16_f32_1
#define R16_T float
#define R16_V float
#define R16_ST(yy, re, im) do { float* y_ = (yy); y_[0] = (re); y_[1] = (im); } while (0)
#include "fft_last16.h"
#define R16_LDU(p) (*(p))
#define R16_SET1(v) (v)
#define R16_W 1
#define R16_NAME vrdma_r16_f64_1
#define R16_T double
#define R16_V double
#define R16_ST(yy, re, im) do { double* y_ = (yy); y_[0] = (re); y_[1] = (im); } while (0)
#include "fft_last16.h"
#if defined(__AVX2__) && defined(__FMA__)
#define R16_NAME vrdma_r16_f32_v
#define R16_T float
#define R16_V __m256
#define R16_W 8
#define R16_LDU _mm256_loadu_ps
#define R16_ST vrdma_st_il_ps
#define R16_SET1 _mm256_set1_ps
#include "fft_last16.h"
#define R16_NAME vrdma_r16_f64_v
#define R16_T double
#define R16_V __m256d
#define R16_W 4
#define R16_LDU _mm256_loadu_pd
#define R16_ST vrdma_st_il_pd
#define R16_SET1 _mm256_set1_pd
#include "fft_last16.h"
/* s a compile-time constant for the sizes the schedules use (every leg's address a
 * constant offset from one base: no run-time multiples of s in the loop) */
#define VRDMA_R16_S(F, S) case S: F(y, xr, xi, S, 0, S, scale, fwd); return
#define VRDMA_R16_VEC(T, F) Py_ssize_t v = s - s % (32 / (Py_ssize_t)sizeof(T));      \
    switch (s) { VRDMA_R16_S(F, 8); VRDMA_R16_S(F, 16); VRDMA_R16_S(F, 32);            \
                 VRDMA_R16_S(F, 64); VRDMA_R16_S(F, 128); default: break; }             \
    F(y, xr, xi, s, 0, v, scale, fwd)
#else
#define VRDMA_R16_VEC(T, F) Py_ssize_t v = 0
#endif
/* the split row xr / xi (stride s = n / 16) -> the interleaved output row y, times scale
 * when !fwd (the inverse) */
static void vrdma_last16_f32(float *__restrict y, const float *__restrict xr,
                             const float *__restrict xi, Py_ssize_t s, float scale, int fwd) {
    VRDMA_R16_VEC(float, vrdma_r16_f32_v);
    vrdma_r16_f32_1(y, xr, xi, s, v, s, scale, fwd);
}
static void vrdma_last16_f64(double *__restrict y, const double *__restrict xr,
                             const double *__restrict xi, Py_ssize_t s, double scale, int fwd) {
    VRDMA_R16_VEC(double, vrdma_r16_f64_v);
    vrdma_r16_f64_1(y, xr, xi, s, v, s, scale, fwd);
}

/* A middle radix-16 stage in registers (csrc/fft_mid16.h), AVX2 / AVX-512 builds, s a
 * compile-time constant (8 ... 128) and a multiple of the 256-bit lanes: returns 1 if it
 * ran the stage, else 0 (nothing written: the caller runs the blocked radix-4 pair). */
#if defined(__AVX2__) && defined(__FMA__)
#define M16_NAME vrdma_m16_f32_v
#define M16_T float
#define M16_V __m256
#define M16_W 8
#define M16_LDU _mm256_loadu_ps
#define M16_STU _mm256_storeu_ps
#define M16_SET1 _mm256_set1_ps
#include "fft_mid16.h"
#define M16_NAME vrdma_m16_f64_v
#define M16_T double
#define M16_V __m256d
#define M16_W 4
#define M16_LDU _mm256_loadu_pd
#define M16_STU _mm256_storeu_pd
#define M16_SET1 _mm256_set1_pd
#include "fft_mid16.h"
#define VRDMA_M16_S(F, S) case S: F(yr, yi, xr, xi, S, m, wr, wi); return 1
#define VRDMA_M16(F) switch (s) { VRDMA_M16_S(F, 8); VRDMA_M16_S(F, 16); VRDMA_M16_S(F, 32); \
                                  VRDMA_M16_S(F, 64); VRDMA_M16_S(F, 128); default: return 0; }
#else
#define VRDMA_M16(F) (void)yr; (void)yi; (void)xr; (void)xi; (void)s; (void)m; (void)wr; \
    (void)wi; return 0
#endif
static int vrdma_mid16_f32(float *__restrict yr, float *__restrict yi, const float *__restrict xr,
                           const float *__restrict xi, Py_ssize_t s, Py_ssize_t m,
                           const float *__restrict wr, const float *__restrict wi) {
    VRDMA_M16(vrdma_m16_f32_v);
}
static int vrdma_mid16_f64(double *__restrict yr, double *__restrict yi, const double *__restrict xr,
                           const double *__restrict xi, Py_ssize_t s, Py_ssize_t m,
                           const double *__restrict wr, const double *__restrict wi) {
    VRDMA_M16(vrdma_m16_f64_v);
}

#endif /* VRDMA_FFT_FIRST_H */
