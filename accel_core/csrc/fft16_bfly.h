/* The 4 x 4 radix-16 butterfly of accel_core's Stockham FFT, shared by the last radix-16
 * stage (csrc/fft_last16.h) and the middle one (csrc/fft_mid16.h), which differ only in
 * where the 16 legs come from and where the 16 outputs go. With j = j1 + 4*j2 and
 * k = k1 + 4*k2,
 *   X[k1 + 4*k2] = sum_j1 W4^(j1*k2) * W16^(j1*k1) * (sum_j2 x[j1 + 4*j2] * W4^(j2*k1)):
 * F16_COL runs the radix-4 butterfly of column j1 (legs j1, j1+4, j1+8, j1+12, read by
 * LD(j, re, im)) into ur / ui[4*j1 + k1] and applies the fixed twiddles W16^(j1*k1)
 * (exponents 1, 2, 3, 4, 6, 9: multiplies by cos / sin(pi/8) and sqrt(1/2), or a swap);
 * F16_ROW runs the radix-4 butterfly of row k1 over j1 and hands output k1 + 4*k2 to
 * OUT(k, re, im). V is the vector (or scalar) type; the caller has c1 = cos(pi/8),
 * s1 = sin(pi/8), h = sqrt(1/2) broadcast in V, and ur / ui[16] of V in scope.
 */
#ifndef VRDMA_FFT16_BFLY_H
#define VRDMA_FFT16_BFLY_H

#define F16_TWID_(V, r, i, nr, ni) do { V r_ = (r), i_ = (i); (r) = (nr); (i) = (ni); } while (0)
/* multiply (r, i) by W16^e (forward: exp(-2 pi i e / 16)) */
#define F16_W1(V, r, i) F16_TWID_(V, r, i, r_ * c1 + i_ * s1, i_ * c1 - r_ * s1)
#define F16_W2(V, r, i) F16_TWID_(V, r, i, h * (r_ + i_), h * (i_ - r_))
#define F16_W3(V, r, i) F16_TWID_(V, r, i, r_ * s1 + i_ * c1, i_ * s1 - r_ * c1)
#define F16_W4(V, r, i) F16_TWID_(V, r, i, i_, -r_)
#define F16_W6(V, r, i) F16_TWID_(V, r, i, h * (i_ - r_), -h * (r_ + i_))
#define F16_W9(V, r, i) F16_TWID_(V, r, i, -(r_ * c1) - i_ * s1, r_ * s1 - i_ * c1)
#define F16_NONE(V, r, i) do { } while (0)

#define F16_COL(V, LD, j1, TW1, TW2, TW3) do {                                            \
    V a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i;                                             \
    LD((j1), a0r, a0i); LD((j1) + 8, a2r, a2i); LD((j1) + 4, a1r, a1i);                   \
    LD((j1) + 12, a3r, a3i);                                                              \
    V t0r = a0r + a2r, t0i = a0i + a2i, t1r = a0r - a2r, t1i = a0i - a2i;                 \
    V t2r = a1r + a3r, t2i = a1i + a3i, t3r = a1i - a3i, t3i = a3r - a1r;                 \
    ur[4 * (j1)] = t0r + t2r; ui[4 * (j1)] = t0i + t2i;                                   \
    ur[4 * (j1) + 1] = t1r + t3r; ui[4 * (j1) + 1] = t1i + t3i;                           \
    ur[4 * (j1) + 2] = t0r - t2r; ui[4 * (j1) + 2] = t0i - t2i;                           \
    ur[4 * (j1) + 3] = t1r - t3r; ui[4 * (j1) + 3] = t1i - t3i;                           \
    TW1(V, ur[4 * (j1) + 1], ui[4 * (j1) + 1]);                                           \
    TW2(V, ur[4 * (j1) + 2], ui[4 * (j1) + 2]);                                           \
    TW3(V, ur[4 * (j1) + 3], ui[4 * (j1) + 3]);                                           \
} while (0)

#define F16_ROW(V, k1, OUT) do {                                                          \
    V b0r = ur[(k1)], b0i = ui[(k1)], b1r = ur[4 + (k1)], b1i = ui[4 + (k1)];             \
    V b2r = ur[8 + (k1)], b2i = ui[8 + (k1)], b3r = ur[12 + (k1)], b3i = ui[12 + (k1)];   \
    V t0r = b0r + b2r, t0i = b0i + b2i, t1r = b0r - b2r, t1i = b0i - b2i;                 \
    V t2r = b1r + b3r, t2i = b1i + b3i, t3r = b1i - b3i, t3i = b3r - b1r;                 \
    OUT((k1), t0r + t2r, t0i + t2i);                                                      \
    OUT((k1) + 4, t1r + t3r, t1i + t3i);                                                  \
    OUT((k1) + 8, t0r - t2r, t0i - t2i);                                                  \
    OUT((k1) + 12, t1r - t3r, t1i - t3i);                                                 \
} while (0)

/* the whole 16-point DFT: the four columns, then the four rows */
#define F16_DFT(V, LD, OUT) do {                                                          \
    F16_COL(V, LD, 0, F16_NONE, F16_NONE, F16_NONE);                                      \
    F16_COL(V, LD, 1, F16_W1, F16_W2, F16_W3);                                            \
    F16_COL(V, LD, 2, F16_W2, F16_W4, F16_W6);                                            \
    F16_COL(V, LD, 3, F16_W3, F16_W6, F16_W9);                                            \
    F16_ROW(V, 0, OUT); F16_ROW(V, 1, OUT); F16_ROW(V, 2, OUT); F16_ROW(V, 3, OUT);       \
} while (0)

#endif
