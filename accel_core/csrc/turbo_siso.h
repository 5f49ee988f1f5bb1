/* Max-log-MAP SISO pass of the LTE turbo decoder in int16 lanes, one source for every SIMD path.
 *
 * Included by accel_core/_turbo_impl.pxi, which setup.py compiles once per instruction set,
 * picked here by the compiler's own target macros. A row is VRDMA_TURBO_LANES = 16 int16
 * lanes on every path (so every path decodes every block to the same bits): one __m256i on
 * AVX2 and on AVX-512 (where the EVEX encoding gives 32 vector registers, so the 16 state
 * metric vectors of the two recursions stay in registers, and the interleaver gathers use
 * 512-bit vpgatherdd), two __m128i on the SSE2 baseline of the scalar path. Measured on an
 * AMD Zen 4, 32 lanes in __m512i were slower: the same speed on full batches, half the lanes
 * idle for a single K = 6144 block (16 segments). The layout is the one the .pxi documents:
 * per-step planes [step][lane], state metrics [state][lane]. Saturating int16 adds and
 * subtracts everywhere (the metric bounds in the .pxi's docstring mean they never saturate).
 */
#ifndef VRDMA_TURBO_SISO_H
#define VRDMA_TURBO_SISO_H

#include <stdint.h>
#include <stddef.h>
#include <immintrin.h>

#if defined(__AVX2__)
#define VRDMA_TURBO_LANES 16
typedef __m256i vt_v;
#define VT_VW 16
#define vt_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vt_store(p, x) _mm256_storeu_si256((__m256i *)(p), (x))
#define vt_adds _mm256_adds_epi16
#define vt_subs _mm256_subs_epi16
#define vt_max _mm256_max_epi16
#define vt_min _mm256_min_epi16
#define vt_set1 _mm256_set1_epi16
#define vt_zero _mm256_setzero_si256
#else
#define VRDMA_TURBO_LANES 16
typedef __m128i vt_v;
#define VT_VW 8
#define vt_load(p) _mm_loadu_si128((const __m128i *)(p))
#define vt_store(p, x) _mm_storeu_si128((__m128i *)(p), (x))
#define vt_adds _mm_adds_epi16
#define vt_subs _mm_subs_epi16
#define vt_max _mm_max_epi16
#define vt_min _mm_min_epi16
#define vt_set1 _mm_set1_epi16
#define vt_zero _mm_setzero_si128
#endif

#define VT_L VRDMA_TURBO_LANES
#define VT_NV (VT_L / VT_VW)
#define VT_NS 8

/* alpha_t -> alpha_t+1 for one vector of lanes (al[s] = state s), normalised to state 0. */
static inline void vt_alpha(vt_v *al, vt_v g0, vt_v g1)
{
    vt_v n0 = vt_max(vt_adds(al[0], g0), vt_subs(al[1], g0));
    vt_v n1 = vt_max(vt_subs(al[2], g1), vt_adds(al[3], g1));
    vt_v n2 = vt_max(vt_adds(al[4], g1), vt_subs(al[5], g1));
    vt_v n3 = vt_max(vt_subs(al[6], g0), vt_adds(al[7], g0));
    vt_v n4 = vt_max(vt_subs(al[0], g0), vt_adds(al[1], g0));
    vt_v n5 = vt_max(vt_adds(al[2], g1), vt_subs(al[3], g1));
    vt_v n6 = vt_max(vt_subs(al[4], g1), vt_adds(al[5], g1));
    vt_v n7 = vt_max(vt_adds(al[6], g0), vt_subs(al[7], g0));
    al[0] = vt_zero();
    al[1] = vt_subs(n1, n0);
    al[2] = vt_subs(n2, n0);
    al[3] = vt_subs(n3, n0);
    al[4] = vt_subs(n4, n0);
    al[5] = vt_subs(n5, n0);
    al[6] = vt_subs(n6, n0);
    al[7] = vt_subs(n7, n0);
}

/* beta_t+1 -> beta_t for one vector of lanes, normalised to state 0. */
static inline void vt_beta(vt_v *be, vt_v g0, vt_v g1)
{
    vt_v m0 = vt_max(vt_adds(be[0], g0), vt_subs(be[4], g0));
    vt_v m1 = vt_max(vt_adds(be[4], g0), vt_subs(be[0], g0));
    vt_v m2 = vt_max(vt_adds(be[5], g1), vt_subs(be[1], g1));
    vt_v m3 = vt_max(vt_adds(be[1], g1), vt_subs(be[5], g1));
    vt_v m4 = vt_max(vt_adds(be[2], g1), vt_subs(be[6], g1));
    vt_v m5 = vt_max(vt_adds(be[6], g1), vt_subs(be[2], g1));
    vt_v m6 = vt_max(vt_adds(be[7], g0), vt_subs(be[3], g0));
    vt_v m7 = vt_max(vt_adds(be[3], g0), vt_subs(be[7], g0));
    be[0] = vt_zero();
    be[1] = vt_subs(m1, m0);
    be[2] = vt_subs(m2, m0);
    be[3] = vt_subs(m3, m0);
    be[4] = vt_subs(m4, m0);
    be[5] = vt_subs(m5, m0);
    be[6] = vt_subs(m6, m0);
    be[7] = vt_subs(m7, m0);
}

/* Le2 from alpha_t and beta_t+1 and parity b, saturated to +-lim. */
static inline vt_v vt_ext(const vt_v *al, const vt_v *be, vt_v b, vt_v lim)
{
    vt_v m00 = vt_max(vt_max(vt_adds(al[0], be[0]), vt_adds(al[1], be[4])),
                      vt_max(vt_adds(al[6], be[7]), vt_adds(al[7], be[3])));
    vt_v m01 = vt_max(vt_max(vt_adds(al[2], be[5]), vt_adds(al[3], be[1])),
                      vt_max(vt_adds(al[4], be[2]), vt_adds(al[5], be[6])));
    vt_v m10 = vt_max(vt_max(vt_adds(al[2], be[1]), vt_adds(al[3], be[5])),
                      vt_max(vt_adds(al[4], be[6]), vt_adds(al[5], be[2])));
    vt_v m11 = vt_max(vt_max(vt_adds(al[0], be[4]), vt_adds(al[1], be[0])),
                      vt_max(vt_adds(al[6], be[3]), vt_adds(al[7], be[7])));
    vt_v le = vt_subs(vt_max(vt_adds(m00, b), vt_subs(m01, b)),
                      vt_max(vt_adds(m10, b), vt_subs(m11, b)));
    return vt_min(vt_max(le, vt_subs(vt_zero(), lim)), lim);
}

static inline void vt_load_row(vt_v (*dst)[VT_NS], const int16_t *src)
{
    for (int v = 0; v < VT_NV; v++)
        for (int s = 0; s < VT_NS; s++)
            dst[v][s] = vt_load(src + s * VT_L + v * VT_VW);
}

static inline void vt_store_row(int16_t *dst, vt_v (*src)[VT_NS])
{
    for (int v = 0; v < VT_NV; v++)
        for (int s = 0; s < VT_NS; s++)
            vt_store(dst + s * VT_L + v * VT_VW, src[v][s]);
}

/* One max-log-MAP pass over S steps (S even) of every lane; A = systematic + a priori,
 * B = parity, per step [S][VT_L]. Forward and backward recursions run in the same loop
 * (two independent dependency chains): the first half stores alpha_0..alpha_H-1 and
 * beta_H+1..beta_S (H = S/2) in `store` ([S][VT_NS][VT_L]); in the second half each step
 * emits Le2 at i (running alpha, stored beta) and at S-1-i (stored alpha, running beta).
 * init_a / init_b are alpha_0 / beta_S; fin_a / fin_b receive alpha_S / beta_0. */
static void vt_siso(const int16_t *A, const int16_t *B, int16_t *store, ptrdiff_t S,
                    const int16_t *init_a, const int16_t *init_b, int16_t *fin_a,
                    int16_t *fin_b, int16_t *ext, int16_t ext_limit)
{
    vt_v al[VT_NV][VT_NS], be[VT_NV][VT_NS], tmp[VT_NV][VT_NS];
    const ptrdiff_t H = S / 2, NL = VT_NS * VT_L;
    int16_t *astore = store, *bstore = store + H * NL;
    const vt_v lim = vt_set1(ext_limit);
    vt_load_row(al, init_a);
    vt_load_row(be, init_b);
    for (ptrdiff_t i = 0; i < H; i++) {
        ptrdiff_t j = S - 1 - i;
        vt_store_row(astore + i * NL, al);
        vt_store_row(bstore + (j - H) * NL, be);
        for (int v = 0; v < VT_NV; v++) {
            vt_v a = vt_load(A + i * VT_L + v * VT_VW), b = vt_load(B + i * VT_L + v * VT_VW);
            vt_alpha(al[v], vt_adds(a, b), vt_subs(a, b));
            a = vt_load(A + j * VT_L + v * VT_VW);
            b = vt_load(B + j * VT_L + v * VT_VW);
            vt_beta(be[v], vt_adds(a, b), vt_subs(a, b));
        }
    }
    for (ptrdiff_t i = H; i < S; i++) {
        ptrdiff_t j = S - 1 - i;
        vt_load_row(tmp, bstore + (i - H) * NL);
        for (int v = 0; v < VT_NV; v++) {
            vt_v a = vt_load(A + i * VT_L + v * VT_VW), b = vt_load(B + i * VT_L + v * VT_VW);
            vt_store(ext + i * VT_L + v * VT_VW, vt_ext(al[v], tmp[v], b, lim));
            vt_alpha(al[v], vt_adds(a, b), vt_subs(a, b));
        }
        vt_load_row(tmp, astore + j * NL);
        for (int v = 0; v < VT_NV; v++) {
            vt_v a = vt_load(A + j * VT_L + v * VT_VW), b = vt_load(B + j * VT_L + v * VT_VW);
            vt_store(ext + j * VT_L + v * VT_VW, vt_ext(tmp[v], be[v], b, lim));
            vt_beta(be[v], vt_adds(a, b), vt_subs(a, b));
        }
    }
    vt_store_row(fin_a, al);
    vt_store_row(fin_b, be);
}

/* dst = round(src * scale) saturated to +-lim (src finite), half up: the truncation of a
 * positive number is its floor. */
static void vt_quantize(int16_t *__restrict__ dst, const float *__restrict__ src, ptrdiff_t n,
                        float scale, int lim)
{
    const float hi = (float)lim, lo = -(float)lim, off = (float)lim + 1.5f;
    for (ptrdiff_t i = 0; i < n; i++) {
        float f = src[i] * scale;
        f = f < hi ? f : hi;
        f = f > lo ? f : lo;
        dst[i] = (int16_t)((int)(f + off) - (lim + 1));
    }
}

/* dst[i] = src[idx[i]] for i < n (n a multiple of VT_L; every idx[i] < n). The vector
 * paths gather 32-bit words at byte offset 2 idx and keep their low half, so `src` must
 * have 2 readable bytes past src[n - 1] (the decoder's planes are padded). */
static void vt_gather(int16_t *__restrict__ dst, const int16_t *__restrict__ src,
                      const int32_t *__restrict__ idx, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(__AVX512BW__)
    for (; i + 32 <= n; i += 32) {
        __m512i i0 = _mm512_loadu_si512((const void *)(idx + i));
        __m512i i1 = _mm512_loadu_si512((const void *)(idx + i + 16));
        __m512i w0 = _mm512_i32gather_epi32(i0, (const void *)src, 2);
        __m512i w1 = _mm512_i32gather_epi32(i1, (const void *)src, 2);
        __m256i h0 = _mm512_cvtepi32_epi16(w0), h1 = _mm512_cvtepi32_epi16(w1);
        _mm256_storeu_si256((__m256i *)(dst + i), h0);
        _mm256_storeu_si256((__m256i *)(dst + i + 16), h1);
    }
#elif defined(__AVX2__)
    const __m256i lowmask = _mm256_set1_epi32(0xffff);
    for (; i + 16 <= n; i += 16) {
        __m256i i0 = _mm256_loadu_si256((const __m256i *)(idx + i));
        __m256i i1 = _mm256_loadu_si256((const __m256i *)(idx + i + 8));
        __m256i w0 = _mm256_and_si256(_mm256_i32gather_epi32((const int *)src, i0, 2), lowmask);
        __m256i w1 = _mm256_and_si256(_mm256_i32gather_epi32((const int *)src, i1, 2), lowmask);
        /* packus works within 128-bit halves: fix the order with a 64-bit permute */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(w0, w1), 0xd8);
        _mm256_storeu_si256((__m256i *)(dst + i), p);
    }
#endif
    for (; i < n; i++)
        dst[i] = src[idx[i]];
}

#endif
