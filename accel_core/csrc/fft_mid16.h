/* One instance of a middle radix-16 stage of accel_core's Stockham FFT (split arrays in
 * and out, twiddled outputs), included by csrc/fft_first.h once per (element type,
 * vector type), on the AVX2 / AVX-512 builds only:
 *
 *   M16_NAME   the function's name        M16_T    float or double
 *   M16_V      the vector type, M16_W lanes of M16_T
 *   M16_LDU(p) / M16_STU(p, v)  unaligned load / store of M16_W reals
 *   M16_SET1(v)                 broadcast
 *
 * For p < m and q in [0, s) (whole vectors: s a multiple of M16_W), the stage reads
 * x[q + s*p + j*s*m] (j < 16) and writes y[q + s*(16*p + k)] = w_k(p) * X_k, X the
 * forward 16-point DFT over j, w_k(p) = (wr, wi)[p + (k-1)*m] (the radix-16 table of
 * accel_core.dft._build_core, broadcast where used). The DFT is 4 x 4 in registers as in
 * csrc/fft_last16.h: four radix-4 butterflies over the legs j1, j1+4, j1+8, j1+12, the
 * fixed twiddles W16^(j1*k1), four radix-4 butterflies over j1; one pass where two
 * radix-4 stages took two. Forward only, like every split stage (the inverse exchanges
 * re / im pointers, see _run in accel_core/_fft_impl.pxi). With s a compile-time
 * constant (the caller's switch) every output leg is a constant offset from one base.
 */

#include "fft16_bfly.h"

/* leg j of the input at xr0 / xi0, legs L apart */
#define M16_LD(j, re, im) do { (re) = M16_LDU(xr0 + (j) * L); (im) = M16_LDU(xi0 + (j) * L); } while (0)

/* output k (k > 0) times w_k(p), split store at yr0 / yi0 + k*s */
#define M16_OUT(k, re, im) do {                                                          \
    M16_V o_r = (re), o_i = (im);                                                        \
    if ((k) == 0) { M16_STU(yr0, o_r); M16_STU(yi0, o_i); }                              \
    else {                                                                               \
        M16_V w_r = M16_SET1(wr[p + ((k) - 1) * m]), w_i = M16_SET1(wi[p + ((k) - 1) * m]); \
        M16_STU(yr0 + (k) * s, o_r * w_r - o_i * w_i);                                  \
        M16_STU(yi0 + (k) * s, o_r * w_i + o_i * w_r);                                   \
    }                                                                                    \
} while (0)

VRDMA_INLINE void M16_NAME(M16_T *__restrict yr, M16_T *__restrict yi,
                           const M16_T *__restrict xr, const M16_T *__restrict xi,
                           Py_ssize_t s, Py_ssize_t m,
                           const M16_T *__restrict wr, const M16_T *__restrict wi) {
    const M16_V c1 = M16_SET1((M16_T)0.92387953251128675612818318939678829L);
    const M16_V s1 = M16_SET1((M16_T)0.38268343236508977172845998403039887L);
    const M16_V h = M16_SET1((M16_T)0.70710678118654752440084436210484904L);
    const Py_ssize_t L = s * m;   /* leg stride of the input */
    for (Py_ssize_t p = 0; p < m; p++) {
        for (Py_ssize_t q = 0; q < s; q += M16_W) {
            const M16_T *xr0 = xr + q + s * p, *xi0 = xi + q + s * p;
            M16_T *yr0 = yr + q + 16 * s * p, *yi0 = yi + q + 16 * s * p;
            M16_V ur[16], ui[16];
            F16_DFT(M16_V, M16_LD, M16_OUT);
        }
    }
}

#undef M16_LD
#undef M16_OUT
#undef M16_NAME
#undef M16_T
#undef M16_V
#undef M16_W
#undef M16_LDU
#undef M16_STU
#undef M16_SET1
