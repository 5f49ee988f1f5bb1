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

#define M16_TWID_(r, i, nr, ni) do { M16_V r_ = (r), i_ = (i); (r) = (nr); (i) = (ni); } while (0)
#define M16_W1(r, i) M16_TWID_(r, i, r_ * c1 + i_ * s1, i_ * c1 - r_ * s1)
#define M16_W2(r, i) M16_TWID_(r, i, h * (r_ + i_), h * (i_ - r_))
#define M16_W3(r, i) M16_TWID_(r, i, r_ * s1 + i_ * c1, i_ * s1 - r_ * c1)
#define M16_W4(r, i) M16_TWID_(r, i, i_, -r_)
#define M16_W6(r, i) M16_TWID_(r, i, h * (i_ - r_), -h * (r_ + i_))
#define M16_W9(r, i) M16_TWID_(r, i, -(r_ * c1) - i_ * s1, r_ * s1 - i_ * c1)
#define M16_NONE(r, i) do { } while (0)

#define M16_COL(j1, TW1, TW2, TW3) do {                                                  \
    M16_V a0r = M16_LDU(xr0 + (j1) * L), a0i = M16_LDU(xi0 + (j1) * L);                 \
    M16_V a2r = M16_LDU(xr0 + ((j1) + 8) * L), a2i = M16_LDU(xi0 + ((j1) + 8) * L);     \
    M16_V a1r = M16_LDU(xr0 + ((j1) + 4) * L), a1i = M16_LDU(xi0 + ((j1) + 4) * L);     \
    M16_V a3r = M16_LDU(xr0 + ((j1) + 12) * L), a3i = M16_LDU(xi0 + ((j1) + 12) * L);   \
    M16_V t0r = a0r + a2r, t0i = a0i + a2i, t1r = a0r - a2r, t1i = a0i - a2i;           \
    M16_V t2r = a1r + a3r, t2i = a1i + a3i, t3r = a1i - a3i, t3i = a3r - a1r;           \
    ur[4 * (j1)] = t0r + t2r; ui[4 * (j1)] = t0i + t2i;                                 \
    ur[4 * (j1) + 1] = t1r + t3r; ui[4 * (j1) + 1] = t1i + t3i;                         \
    ur[4 * (j1) + 2] = t0r - t2r; ui[4 * (j1) + 2] = t0i - t2i;                         \
    ur[4 * (j1) + 3] = t1r - t3r; ui[4 * (j1) + 3] = t1i - t3i;                         \
    TW1(ur[4 * (j1) + 1], ui[4 * (j1) + 1]);                                            \
    TW2(ur[4 * (j1) + 2], ui[4 * (j1) + 2]);                                            \
    TW3(ur[4 * (j1) + 3], ui[4 * (j1) + 3]);                                            \
} while (0)

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

#define M16_ROW(k1) do {                                                                  \
    M16_V b0r = ur[(k1)], b0i = ui[(k1)], b1r = ur[4 + (k1)], b1i = ui[4 + (k1)];       \
    M16_V b2r = ur[8 + (k1)], b2i = ui[8 + (k1)], b3r = ur[12 + (k1)], b3i = ui[12 + (k1)]; \
    M16_V t0r = b0r + b2r, t0i = b0i + b2i, t1r = b0r - b2r, t1i = b0i - b2i;           \
    M16_V t2r = b1r + b3r, t2i = b1i + b3i, t3r = b1i - b3i, t3i = b3r - b1r;           \
    M16_OUT((k1), t0r + t2r, t0i + t2i);                                                 \
    M16_OUT((k1) + 4, t1r + t3r, t1i + t3i);                                             \
    M16_OUT((k1) + 8, t0r - t2r, t0i - t2i);                                             \
    M16_OUT((k1) + 12, t1r - t3r, t1i - t3i);                                            \
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
            M16_COL(0, M16_NONE, M16_NONE, M16_NONE);
            M16_COL(1, M16_W1, M16_W2, M16_W3);
            M16_COL(2, M16_W2, M16_W4, M16_W6);
            M16_COL(3, M16_W3, M16_W6, M16_W9);
            M16_ROW(0); M16_ROW(1); M16_ROW(2); M16_ROW(3);
        }
    }
}

#undef M16_TWID_
#undef M16_W1
#undef M16_W2
#undef M16_W3
#undef M16_W4
#undef M16_W6
#undef M16_W9
#undef M16_NONE
#undef M16_COL
#undef M16_OUT
#undef M16_ROW
#undef M16_NAME
#undef M16_T
#undef M16_V
#undef M16_W
#undef M16_LDU
#undef M16_STU
#undef M16_SET1
