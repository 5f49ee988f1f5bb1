/* One instance of the last radix-16 stage of accel_core's Stockham FFT (m == 1, no
 * twiddles), included by csrc/fft_first.h once per (element type, vector type):
 *
 *   R16_NAME   the function's name        R16_T    float or double
 *   R16_V      the vector (or scalar) type the butterfly runs on, R16_W lanes of R16_T
 *   R16_LDU(p) an unaligned load of R16_W reals
 *   R16_ST(y, re, im)  store re / im interleaved to y[0 .. 2*R16_W)
 *   R16_SET1(v)        broadcast
 *
 * The stage reads the split row xr / xi at q + j*s (j < 16) and writes the interleaved
 * output y[2*(q + k*s)] for k < 16, W values of q per iteration over [q0, q1) (a multiple
 * of W apart). The radix-16 DFT is 4 x 4 in registers: j = j1 + 4*j2, k = k1 + 4*k2,
 *   X[k1 + 4*k2] = sum_j1 W4^(j1*k2) * W16^(j1*k1) * (sum_j2 x[j1 + 4*j2] * W4^(j2*k1)),
 * so four radix-4 butterflies over the legs j1, j1+4, j1+8, j1+12 (the columns), the
 * fixed twiddles W16^(j1*k1) (exponents 1, 2, 3, 4, 6, 9: multiplies by cos / sin(pi/8)
 * and sqrt(1/2), or a swap), and four radix-4 butterflies over j1 (the rows), which write
 * the output: one pass where two radix-4 stages took two.
 * Forward only: the inverse (fwd == 0) reads the row with re and im exchanged and writes
 * it exchanged back (conj(A) z = swap(A swap(z)), as the split stages do, see _run in
 * accel_core/_fft_impl.pxi), times the 1/n scale.
 */

#include "fft16_bfly.h"

/* leg j of the row being read (lr / li: xr / xi, exchanged for the inverse) */
#define R16_LD(j, re, im) do { (re) = R16_LDU(lr + q + (j) * s); (im) = R16_LDU(li + q + (j) * s); } while (0)

#define R16_OUT_FWD(k, re, im) R16_ST(y + 2 * (q + (k) * s), (re), (im))
#define R16_OUT_INV(k, re, im) R16_ST(y + 2 * (q + (k) * s), (im) * sc, (re) * sc)

#define R16_LOOP(XR, XI, OUT)                                                             \
    for (Py_ssize_t q = q0; q < q1; q += R16_W) {                                        \
        const R16_T *__restrict lr = (XR), *__restrict li = (XI);                        \
        R16_V ur[16], ui[16];                                                            \
        F16_DFT(R16_V, R16_LD, OUT);                                                     \
    }

VRDMA_INLINE void R16_NAME(R16_T *__restrict y, const R16_T *__restrict xr,
                           const R16_T *__restrict xi, Py_ssize_t s, Py_ssize_t q0,
                           Py_ssize_t q1, R16_T scale, int fwd) {
    /* cos(pi/8), sin(pi/8), sqrt(1/2) */
    const R16_V c1 = R16_SET1((R16_T)0.92387953251128675612818318939678829L);
    const R16_V s1 = R16_SET1((R16_T)0.38268343236508977172845998403039887L);
    const R16_V h = R16_SET1((R16_T)0.70710678118654752440084436210484904L);
    const R16_V sc = R16_SET1(scale);
    (void)sc;
    if (fwd) { R16_LOOP(xr, xi, R16_OUT_FWD) }
    else { R16_LOOP(xi, xr, R16_OUT_INV) }
}

#undef R16_LD
#undef R16_OUT_FWD
#undef R16_OUT_INV
#undef R16_LOOP
#undef R16_NAME
#undef R16_T
#undef R16_V
#undef R16_W
#undef R16_LDU
#undef R16_ST
#undef R16_SET1
