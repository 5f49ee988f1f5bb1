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

#define R16_TWID_(r, i, nr, ni) do { R16_V r_ = (r), i_ = (i); (r) = (nr); (i) = (ni); } while (0)
/* multiply (r, i) by W16^e (forward: exp(-2 pi i e / 16)) */
#define R16_W1(r, i) R16_TWID_(r, i, r_ * c1 + i_ * s1, i_ * c1 - r_ * s1)
#define R16_W2(r, i) R16_TWID_(r, i, h * (r_ + i_), h * (i_ - r_))
#define R16_W3(r, i) R16_TWID_(r, i, r_ * s1 + i_ * c1, i_ * s1 - r_ * c1)
#define R16_W4(r, i) R16_TWID_(r, i, i_, -r_)
#define R16_W6(r, i) R16_TWID_(r, i, h * (i_ - r_), -h * (r_ + i_))
#define R16_W9(r, i) R16_TWID_(r, i, -(r_ * c1) - i_ * s1, r_ * s1 - i_ * c1)
#define R16_NONE(r, i) do { } while (0)

/* column j1: legs j1 + 4*j2 of (XR, XI) -> ur / ui[4*j1 + k1], twiddled by W16^(j1*k1) */
#define R16_COL(XR, XI, j1, TW1, TW2, TW3) do {                                          \
    R16_V a0r = R16_LDU(XR + q + (j1) * s), a0i = R16_LDU(XI + q + (j1) * s);           \
    R16_V a2r = R16_LDU(XR + q + ((j1) + 8) * s), a2i = R16_LDU(XI + q + ((j1) + 8) * s); \
    R16_V a1r = R16_LDU(XR + q + ((j1) + 4) * s), a1i = R16_LDU(XI + q + ((j1) + 4) * s); \
    R16_V a3r = R16_LDU(XR + q + ((j1) + 12) * s), a3i = R16_LDU(XI + q + ((j1) + 12) * s); \
    R16_V t0r = a0r + a2r, t0i = a0i + a2i, t1r = a0r - a2r, t1i = a0i - a2i;           \
    R16_V t2r = a1r + a3r, t2i = a1i + a3i, t3r = a1i - a3i, t3i = a3r - a1r;           \
    ur[4 * (j1)] = t0r + t2r; ui[4 * (j1)] = t0i + t2i;                                 \
    ur[4 * (j1) + 1] = t1r + t3r; ui[4 * (j1) + 1] = t1i + t3i;                         \
    ur[4 * (j1) + 2] = t0r - t2r; ui[4 * (j1) + 2] = t0i - t2i;                         \
    ur[4 * (j1) + 3] = t1r - t3r; ui[4 * (j1) + 3] = t1i - t3i;                         \
    TW1(ur[4 * (j1) + 1], ui[4 * (j1) + 1]);                                            \
    TW2(ur[4 * (j1) + 2], ui[4 * (j1) + 2]);                                            \
    TW3(ur[4 * (j1) + 3], ui[4 * (j1) + 3]);                                            \
} while (0)

/* row k1: the radix-4 over j1 of ur / ui[4*j1 + k1] -> outputs k1 + 4*k2, stored by
 * OUT(k, re, im) */
#define R16_ROW(k1, OUT) do {                                                             \
    R16_V b0r = ur[(k1)], b0i = ui[(k1)], b1r = ur[4 + (k1)], b1i = ui[4 + (k1)];       \
    R16_V b2r = ur[8 + (k1)], b2i = ui[8 + (k1)], b3r = ur[12 + (k1)], b3i = ui[12 + (k1)]; \
    R16_V t0r = b0r + b2r, t0i = b0i + b2i, t1r = b0r - b2r, t1i = b0i - b2i;           \
    R16_V t2r = b1r + b3r, t2i = b1i + b3i, t3r = b1i - b3i, t3i = b3r - b1r;           \
    OUT((k1), t0r + t2r, t0i + t2i);                                                     \
    OUT((k1) + 4, t1r + t3r, t1i + t3i);                                                 \
    OUT((k1) + 8, t0r - t2r, t0i - t2i);                                                 \
    OUT((k1) + 12, t1r - t3r, t1i - t3i);                                                \
} while (0)

#define R16_OUT_FWD(k, re, im) R16_ST(y + 2 * (q + (k) * s), (re), (im))
#define R16_OUT_INV(k, re, im) R16_ST(y + 2 * (q + (k) * s), (im) * sc, (re) * sc)

#define R16_LOOP(XR, XI, OUT)                                                             \
    for (Py_ssize_t q = q0; q < q1; q += R16_W) {                                        \
        R16_V ur[16], ui[16];                                                            \
        R16_COL(XR, XI, 0, R16_NONE, R16_NONE, R16_NONE);                                \
        R16_COL(XR, XI, 1, R16_W1, R16_W2, R16_W3);                                      \
        R16_COL(XR, XI, 2, R16_W2, R16_W4, R16_W6);                                      \
        R16_COL(XR, XI, 3, R16_W3, R16_W6, R16_W9);                                      \
        R16_ROW(0, OUT); R16_ROW(1, OUT); R16_ROW(2, OUT); R16_ROW(3, OUT);              \
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

#undef R16_TWID_
#undef R16_W1
#undef R16_W2
#undef R16_W3
#undef R16_W4
#undef R16_W6
#undef R16_W9
#undef R16_NONE
#undef R16_COL
#undef R16_ROW
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
