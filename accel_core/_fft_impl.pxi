"""Mixed-radix (2, 3, 4, 5, 8; 16 as a middle or last stage) Stockham autosort FFT kernels.

Algorithm: iterative decimation-in-frequency Stockham (Van Loan, "Computational
Frameworks for the FFT", §1.7 / Stockham 1966). A size-n transform is split into
stages with radices r_0, r_1, ... whose product is n. Stage i has a stride
``s = r_0 * ... * r_{i-1}`` and ``m = n / (s * r_i)`` butterflies per stride
element; it reads ``x[q + s*(p + j*m)]`` for j < r, computes a radix-r DFT and
writes ``y[q + s*(r*p + k)] = c_k * exp(-+2*pi*i*k*p/(r*m))``. Ping-ponging two
buffers, the result comes out in natural order (no bit reversal).

Data layout: between stages a row lives in separate real / imaginary arrays
(so butterflies are plain float arithmetic that gcc vectorises without
shuffles); the first stage reads the interleaved complex input itself and a
last stage writes the interleaved output (a last radix-8 stage that the wide
builds' explicit loop cannot take is followed by a join pass); the 1/n scale of the inverse transform is folded
into that last write. The split stages are forward-only (the direction's sign
is the constant 1, no multiply by it in any butterfly): an inverse plan runs
them with the real and imaginary arrays exchanged on input and output (see
_run); the fused first radix-4/8 and last stages have one loop per direction,
the forward one with neither the sign nor (last stages) the 1/n scale. This source is compiled once per SIMD path (scalar /
AVX2+FMA / AVX-512, see accel_core.simd): the same loops, vectorised by gcc for
each instruction set.

Kernels are ``noexcept nogil`` on ``__restrict__`` pointers, fused over float
and double; the batch loop runs entirely without the GIL. Two loop orders per
radix: for the first stage (s == 1) the vector loop runs over p (contiguous
loads, interleaving stores); for the others it runs over q with the twiddles
hoisted. On the AVX2 and AVX-512 builds the fused first radix-4 / radix-8 stage
and the radix-4 stage at s == 4 (complex64) run explicit 256-bit loops over
whole vectors (accel_core/csrc/fft_first.h: in-lane shuffles instead of gcc's
permute chains), and so do the radix-8 stage at s == 8 (complex64) on AVX-512 and
the last radix-2 and radix-8 stages (a last radix-8 stage whose s is no multiple of the
vector width, and every one on the scalar build, stays split and is joined); a radix-16
stage exists as such a last stage (accel_core/csrc/fft_last16.h: 4 x 4 in registers,
one pass for two radix-4 ones; its one-q instance does the tails and the scalar build) and
as a middle one (csrc/fft_mid16.h: the same 4 x 4 with twiddled split outputs, on the wide
builds for s = 8 ... 128; otherwise, and on the scalar build, _stage44 runs it as two
radix-4 stages blocked through an L1 buffer);
the Cython loops do the remainder and everything on the scalar build.
Validation, dtype/shape checks, allocation and plan caching live in
:mod:`accel_core.dft`; this module trusts its caller.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    ctypedef float* fptr "float *__restrict__"
    ctypedef double* dptr "double *__restrict__"

ctypedef fused rptr:
    fptr
    dptr

# The scalar type of a kernel's locals. Cython would generate every (rptr,
# real_t) combination; only the matching pairs are called (gcc drops the rest).
# Locals are declared explicitly: type inference across fused specialisations
# silently widened float locals to double.
ctypedef fused real_t:
    float
    double

cdef extern from "csrc/fft_first.h" nogil:
    # the first radix-4 / radix-8 stage over whole vectors of p (AVX2 / AVX-512 builds;
    # 0 on the scalar one): returns how many p it did, the Cython loop does the rest
    Py_ssize_t vrdma_first4_f32(float* yr, float* yi, const float* x, Py_ssize_t m,
                                const float* wr, const float* wi, float h, int fwd)
    Py_ssize_t vrdma_first8_f32(float* yr, float* yi, const float* x, Py_ssize_t m,
                                const float* wr, const float* wi, float h, int fwd)
    Py_ssize_t vrdma_first4_f64(double* yr, double* yi, const double* x, Py_ssize_t m,
                                const double* wr, const double* wi, double h, int fwd)
    Py_ssize_t vrdma_first8_f64(double* yr, double* yi, const double* x, Py_ssize_t m,
                                const double* wr, const double* wi, double h, int fwd)
    int VRDMA_FIRST_SIMD  # vector width in bits of those loops (0: none)
    # the last radix-2 stage (m == 1) writing the interleaved output row (same contract, over q)
    Py_ssize_t vrdma_last2_f32(float* y, const float* xr, const float* xi, Py_ssize_t s,
                               float scale, int fwd)
    Py_ssize_t vrdma_last2_f64(double* y, const double* xr, const double* xi, Py_ssize_t s,
                               double scale, int fwd)
    # the last radix-8 stage writing the interleaved row: 1 if it did (whole vectors of q
    # only, AVX2 / AVX-512 builds), else 0 (nothing written: split stage + join instead)
    int vrdma_last8_f32(float* y, const float* xr, const float* xi, Py_ssize_t s,
                        float scale, float hs, int fwd)
    int vrdma_last8_f64(double* y, const double* xr, const double* xi, Py_ssize_t s,
                        double scale, double hs, int fwd)
    # the last radix-16 stage (m == 1, 4 x 4 in registers) writing the interleaved row:
    # whole 256-bit vectors of q on the AVX2 / AVX-512 builds, the rest (and the scalar
    # build's whole stage) one q at a time
    void vrdma_last16_f32(float* y, const float* xr, const float* xi, Py_ssize_t s,
                          float scale, int fwd)
    void vrdma_last16_f64(double* y, const double* xr, const double* xi, Py_ssize_t s,
                          double scale, int fwd)
    # a middle radix-16 stage in registers (csrc/fft_mid16.h): 1 if it ran (AVX2 / AVX-512
    # builds, s = 8 ... 128 and whole vectors), else 0 (nothing written)
    int vrdma_mid16_f32(float* yr, float* yi, const float* xr, const float* xi, Py_ssize_t s,
                        Py_ssize_t m, const float* wr, const float* wi)
    int vrdma_mid16_f64(double* yr, double* yi, const double* xr, const double* xi, Py_ssize_t s,
                        Py_ssize_t m, const double* wr, const double* wi)
    # a split radix-4 stage at s == 4, complex64: two p per 256-bit vector (same contract)
    Py_ssize_t vrdma_s4_radix4_f32(float* yr, float* yi, const float* xr, const float* xi,
                                   Py_ssize_t m, const float* wr, const float* wi)
    # a split radix-8 stage at s == 8, complex64: one vector per leg, twiddles broadcast
    # where used (same contract)
    Py_ssize_t vrdma_s8_radix8_f32(float* yr, float* yi, const float* xr, const float* xi,
                                   Py_ssize_t m, const float* wr, const float* wi, float h)

#: Vector width in bits of the first radix-4 / radix-8 stage's explicit loops
#: (accel_core/csrc/fft_first.h): 256 (AVX2), 512 (AVX-512), 0 (scalar build: Cython loop)
FIRST_STAGE_BITS = VRDMA_FIRST_SIMD

cdef enum:
    MAX_STAGES = 40
    PAD = 48          # scratch row padding, elements (multiple of 16)
    QB_BYTES = 256    # a blocked radix-4 pair's q chunk (_stage44), bytes per leg array

# Index of the per-plan constants in the ``kc`` array (see FFTCore.__init__).
cdef enum:
    K_SG = 0      # +1 forward (exp(-i...)), -1 inverse
    K_H = 1       # sqrt(1/2)
    K_HALF = 2    # 0.5
    K_S3 = 3      # sg * sqrt(3)/2
    K_C1 = 4      # cos(2 pi / 5)
    K_C2 = 5      # cos(4 pi / 5)
    K_S1 = 6      # sg * sin(2 pi / 5)
    K_S2 = 7      # sg * sin(4 pi / 5)
    K_SCALE = 8   # 1 (forward) or 1/n (inverse)
    K_LEN = 9


# ---------------------------------------------------------------- stages
# Per radix r: _stage<r> runs the first stage (s == 1) itself, the vector loop
# over p (contiguous loads and twiddles, interleaving stores), and otherwise
# calls _q<r> once per p for the loop over q. _q<r> takes one restrict
# pointer per leg: with a single base pointer and a run-time stride gcc needs
# more than 10 overlap checks and gives up vectorising. The butterfly is
# written out in both places (an inline helper was not inlined, so not
# vectorised, for radix 5 and 8).


cdef void _q2(Py_ssize_t s,
            rptr y0r, rptr y1r,
            rptr y0i, rptr y1i,
            rptr x0r, rptr x1r,
            rptr x0i, rptr x1i,
            rptr wr, rptr wi, Py_ssize_t m, const real_t* kc) noexcept nogil:
    """Inner loop of a radix-2 stage for one p: s butterflies, one
    restrict pointer per input/output leg (so gcc vectorises over q without
    run-time overlap checks); twiddles w_k = (wr, wi)[(k-1)*m]."""
    cdef Py_ssize_t q
    cdef real_t w1r, w1i, a0r, a0i, a1r, a1i, c1r, c1i
    w1r = wr[0]; w1i = wi[0]
    for q in range(s):
        a0r = x0r[q]; a0i = x0i[q]
        a1r = x1r[q]; a1i = x1i[q]
        y0r[q] = a0r + a1r; y0i[q] = a0i + a1i
        c1r = a0r - a1r; c1i = a0i - a1i
        y1r[q] = c1r * w1r - c1i * w1i; y1i[q] = c1r * w1i + c1i * w1r


cdef void _stage2(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t p, q, i, o, xs, ys
    cdef real_t w1r, w1i, a0r, a0i, a1r, a1i, c1r, c1i
    if s == 1:
        xs = m
        ys = 1
        for p in range(m):
            i = p
            o = 2 * p
            w1r = wr[p]; w1i = wi[p]
            a0r = xr[i]; a0i = xi[i]
            a1r = xr[i + xs]; a1i = xi[i + xs]
            yr[o] = a0r + a1r; yi[o] = a0i + a1i
            c1r = a0r - a1r; c1i = a0i - a1i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
    else:
        xs = s * m
        for p in range(m):
            _q2(s,
                yr + (2 * p + 0) * s, yr + (2 * p + 1) * s,
                yi + (2 * p + 0) * s, yi + (2 * p + 1) * s,
                xr + s * p + 0 * xs, xr + s * p + 1 * xs,
                xi + s * p + 0 * xs, xi + s * p + 1 * xs,
                wr + p, wi + p, m, kc)


cdef void _q3(Py_ssize_t s,
            rptr y0r, rptr y1r, rptr y2r,
            rptr y0i, rptr y1i, rptr y2i,
            rptr x0r, rptr x1r, rptr x2r,
            rptr x0i, rptr x1i, rptr x2i,
            rptr wr, rptr wi, Py_ssize_t m, const real_t* kc) noexcept nogil:
    """Inner loop of a radix-3 stage for one p: s butterflies, one
    restrict pointer per input/output leg (so gcc vectorises over q without
    run-time overlap checks); twiddles w_k = (wr, wi)[(k-1)*m]."""
    cdef Py_ssize_t q
    cdef real_t w1r, w1i, w2r, w2i, a0r, a0i, a1r, a1i, a2r, a2i, tr, ti, ur, ui, vr, vi
    cdef real_t c1r, c1i, c2r, c2i, half, s3
    half = kc[K_HALF]
    s3 = kc[K_S3]
    w1r = wr[0]; w1i = wi[0]
    w2r = wr[m]; w2i = wi[m]
    for q in range(s):
        a0r = x0r[q]; a0i = x0i[q]
        a1r = x1r[q]; a1i = x1i[q]
        a2r = x2r[q]; a2i = x2i[q]
        tr = a1r + a2r; ti = a1i + a2i
        ur = a0r - half * tr; ui = a0i - half * ti
        # v = (a1 - a2) * (-i * sg * sqrt(3)/2)
        vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
        y0r[q] = a0r + tr; y0i[q] = a0i + ti
        c1r = ur + vr; c1i = ui + vi
        c2r = ur - vr; c2i = ui - vi
        y1r[q] = c1r * w1r - c1i * w1i; y1i[q] = c1r * w1i + c1i * w1r
        y2r[q] = c2r * w2r - c2i * w2i; y2i[q] = c2r * w2i + c2i * w2r


cdef void _stage3(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t p, q, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, a0r, a0i, a1r, a1i, a2r, a2i, tr, ti, ur, ui, vr, vi
    cdef real_t c1r, c1i, c2r, c2i, half, s3
    half = kc[K_HALF]
    s3 = kc[K_S3]
    if s == 1:
        xs = m
        ys = 1
        for p in range(m):
            i = p
            o = 3 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            a0r = xr[i]; a0i = xi[i]
            a1r = xr[i + xs]; a1i = xi[i + xs]
            a2r = xr[i + 2 * xs]; a2i = xi[i + 2 * xs]
            tr = a1r + a2r; ti = a1i + a2i
            ur = a0r - half * tr; ui = a0i - half * ti
            # v = (a1 - a2) * (-i * sg * sqrt(3)/2)
            vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
            yr[o] = a0r + tr; yi[o] = a0i + ti
            c1r = ur + vr; c1i = ui + vi
            c2r = ur - vr; c2i = ui - vi
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
    else:
        xs = s * m
        for p in range(m):
            _q3(s,
                yr + (3 * p + 0) * s, yr + (3 * p + 1) * s, yr + (3 * p + 2) * s,
                yi + (3 * p + 0) * s, yi + (3 * p + 1) * s, yi + (3 * p + 2) * s,
                xr + s * p + 0 * xs, xr + s * p + 1 * xs, xr + s * p + 2 * xs,
                xi + s * p + 0 * xs, xi + s * p + 1 * xs, xi + s * p + 2 * xs,
                wr + p, wi + p, m, kc)


cdef void _q4(Py_ssize_t s,
            rptr y0r, rptr y1r, rptr y2r, rptr y3r,
            rptr y0i, rptr y1i, rptr y2i, rptr y3i,
            rptr x0r, rptr x1r, rptr x2r, rptr x3r,
            rptr x0i, rptr x1i, rptr x2i, rptr x3i,
            rptr wr, rptr wi, Py_ssize_t m, const real_t* kc) noexcept nogil:
    """Inner loop of a radix-4 stage for one p: s butterflies, one
    restrict pointer per input/output leg (so gcc vectorises over q without
    run-time overlap checks); twiddles w_k = (wr, wi)[(k-1)*m]."""
    cdef Py_ssize_t q
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, t0r, t0i, t1r, t1i
    cdef real_t t2r, t2i, t3r, t3i, c1r, c1i, c2r, c2i, c3r, c3i, sg
    sg = 1  # forward-only (a compile-time constant): see _run
    w1r = wr[0]; w1i = wi[0]
    w2r = wr[m]; w2i = wi[m]
    w3r = wr[2 * m]; w3i = wi[2 * m]
    for q in range(s):
        a0r = x0r[q]; a0i = x0i[q]
        a1r = x1r[q]; a1i = x1i[q]
        a2r = x2r[q]; a2i = x2i[q]
        a3r = x3r[q]; a3i = x3i[q]
        t0r = a0r + a2r; t0i = a0i + a2i
        t1r = a0r - a2r; t1i = a0i - a2i
        t2r = a1r + a3r; t2i = a1i + a3i
        # t3 = (a1 - a3) * (-i * sg)
        t3r = sg * (a1i - a3i); t3i = sg * (a3r - a1r)
        y0r[q] = t0r + t2r; y0i[q] = t0i + t2i
        c1r = t1r + t3r; c1i = t1i + t3i
        c2r = t0r - t2r; c2i = t0i - t2i
        c3r = t1r - t3r; c3i = t1i - t3i
        y1r[q] = c1r * w1r - c1i * w1i; y1i[q] = c1r * w1i + c1i * w1r
        y2r[q] = c2r * w2r - c2i * w2i; y2i[q] = c2r * w2i + c2i * w2r
        y3r[q] = c3r * w3r - c3i * w3i; y3i[q] = c3r * w3i + c3i * w3r


cdef void _stage4(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t p, p0, q, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, t0r, t0i, t1r, t1i
    cdef real_t t2r, t2i, t3r, t3i, c1r, c1i, c2r, c2i, c3r, c3i, sg
    sg = 1  # forward-only (a compile-time constant): see _run
    if s == 1:
        xs = m
        ys = 1
        for p in range(m):
            i = p
            o = 4 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            a0r = xr[i]; a0i = xi[i]
            a1r = xr[i + xs]; a1i = xi[i + xs]
            a2r = xr[i + 2 * xs]; a2i = xi[i + 2 * xs]
            a3r = xr[i + 3 * xs]; a3i = xi[i + 3 * xs]
            t0r = a0r + a2r; t0i = a0i + a2i
            t1r = a0r - a2r; t1i = a0i - a2i
            t2r = a1r + a3r; t2i = a1i + a3i
            # t3 = (a1 - a3) * (-i * sg)
            t3r = sg * (a1i - a3i); t3i = sg * (a3r - a1r)
            yr[o] = t0r + t2r; yi[o] = t0i + t2i
            c1r = t1r + t3r; c1i = t1i + t3i
            c2r = t0r - t2r; c2i = t0i - t2i
            c3r = t1r - t3r; c3i = t1i - t3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r
    elif s == 4:
        # s == 4, 8, 16 (the stages after a first radix-4 or radix-8 one): s butterflies
        # per p with a compile-time trip count (whole vectors, no per-p call, no loop
        # prologue / epilogue); the generic loop below calls _q4 once per p. At s == 4,
        # complex64, the AVX2 / AVX-512 builds take two p per vector (csrc/fft_first.h)
        xs = 4 * m
        p0 = 0
        if rptr is fptr:
            p0 = vrdma_s4_radix4_f32(yr, yi, xr, xi, m, wr, wi)
        for p in range(p0, m):
            i = 4 * p
            o = 16 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            for q in range(4):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                t0r = a0r + a2r; t0i = a0i + a2i
                t1r = a0r - a2r; t1i = a0i - a2i
                t2r = a1r + a3r; t2i = a1i + a3i
                t3r = a1i - a3i; t3i = a3r - a1r
                yr[o + q] = t0r + t2r; yi[o + q] = t0i + t2i
                c1r = t1r + t3r; c1i = t1i + t3i
                c2r = t0r - t2r; c2i = t0i - t2i
                c3r = t1r - t3r; c3i = t1i - t3i
                yr[o + 4 + q] = c1r * w1r - c1i * w1i; yi[o + 4 + q] = c1r * w1i + c1i * w1r
                yr[o + 8 + q] = c2r * w2r - c2i * w2i; yi[o + 8 + q] = c2r * w2i + c2i * w2r
                yr[o + 12 + q] = c3r * w3r - c3i * w3i; yi[o + 12 + q] = c3r * w3i + c3i * w3r
    elif s == 8:
        xs = 8 * m
        for p in range(m):
            i = 8 * p
            o = 32 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            for q in range(8):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                t0r = a0r + a2r; t0i = a0i + a2i
                t1r = a0r - a2r; t1i = a0i - a2i
                t2r = a1r + a3r; t2i = a1i + a3i
                t3r = a1i - a3i; t3i = a3r - a1r
                yr[o + q] = t0r + t2r; yi[o + q] = t0i + t2i
                c1r = t1r + t3r; c1i = t1i + t3i
                c2r = t0r - t2r; c2i = t0i - t2i
                c3r = t1r - t3r; c3i = t1i - t3i
                yr[o + 8 + q] = c1r * w1r - c1i * w1i; yi[o + 8 + q] = c1r * w1i + c1i * w1r
                yr[o + 16 + q] = c2r * w2r - c2i * w2i; yi[o + 16 + q] = c2r * w2i + c2i * w2r
                yr[o + 24 + q] = c3r * w3r - c3i * w3i; yi[o + 24 + q] = c3r * w3i + c3i * w3r
    elif s == 16:
        xs = 16 * m
        for p in range(m):
            i = 16 * p
            o = 64 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            for q in range(16):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                t0r = a0r + a2r; t0i = a0i + a2i
                t1r = a0r - a2r; t1i = a0i - a2i
                t2r = a1r + a3r; t2i = a1i + a3i
                t3r = a1i - a3i; t3i = a3r - a1r
                yr[o + q] = t0r + t2r; yi[o + q] = t0i + t2i
                c1r = t1r + t3r; c1i = t1i + t3i
                c2r = t0r - t2r; c2i = t0i - t2i
                c3r = t1r - t3r; c3i = t1i - t3i
                yr[o + 16 + q] = c1r * w1r - c1i * w1i; yi[o + 16 + q] = c1r * w1i + c1i * w1r
                yr[o + 32 + q] = c2r * w2r - c2i * w2i; yi[o + 32 + q] = c2r * w2i + c2i * w2r
                yr[o + 48 + q] = c3r * w3r - c3i * w3i; yi[o + 48 + q] = c3r * w3i + c3i * w3r
    else:
        xs = s * m
        for p in range(m):
            _q4(s,
                yr + (4 * p + 0) * s, yr + (4 * p + 1) * s,
                yr + (4 * p + 2) * s, yr + (4 * p + 3) * s,
                yi + (4 * p + 0) * s, yi + (4 * p + 1) * s,
                yi + (4 * p + 2) * s, yi + (4 * p + 3) * s,
                xr + s * p + 0 * xs, xr + s * p + 1 * xs, xr + s * p + 2 * xs, xr + s * p + 3 * xs,
                xi + s * p + 0 * xs, xi + s * p + 1 * xs, xi + s * p + 2 * xs, xi + s * p + 3 * xs,
                wr + p, wi + p, m, kc)


cdef void _q5(Py_ssize_t s,
            rptr y0r, rptr y1r, rptr y2r, rptr y3r, rptr y4r,
            rptr y0i, rptr y1i, rptr y2i, rptr y3i, rptr y4i,
            rptr x0r, rptr x1r, rptr x2r, rptr x3r, rptr x4r,
            rptr x0i, rptr x1i, rptr x2i, rptr x3i, rptr x4i,
            rptr wr, rptr wi, Py_ssize_t m, const real_t* kc) noexcept nogil:
    """Inner loop of a radix-5 stage for one p: s butterflies, one
    restrict pointer per input/output leg (so gcc vectorises over q without
    run-time overlap checks); twiddles w_k = (wr, wi)[(k-1)*m]."""
    cdef Py_ssize_t q
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, a4r, a4i
    cdef real_t p1r, p1i, m1r, m1i, p2r, p2i, m2r, m2i, ar_, ai_, br_, bi_, er_, ei_
    cdef real_t fr_, fi_, o1r, o1i, o4r, o4i, o2r, o2i, o3r, o3i, c1, c2, s1, s2
    c1 = kc[K_C1]
    c2 = kc[K_C2]
    s1 = kc[K_S1]
    s2 = kc[K_S2]
    w1r = wr[0]; w1i = wi[0]
    w2r = wr[m]; w2i = wi[m]
    w3r = wr[2 * m]; w3i = wi[2 * m]
    w4r = wr[3 * m]; w4i = wi[3 * m]
    for q in range(s):
        a0r = x0r[q]; a0i = x0i[q]
        a1r = x1r[q]; a1i = x1i[q]
        a2r = x2r[q]; a2i = x2i[q]
        a3r = x3r[q]; a3i = x3i[q]
        a4r = x4r[q]; a4i = x4i[q]
        p1r = a1r + a4r; p1i = a1i + a4i
        m1r = a1r - a4r; m1i = a1i - a4i
        p2r = a2r + a3r; p2i = a2i + a3i
        m2r = a2r - a3r; m2i = a2i - a3i
        y0r[q] = a0r + p1r + p2r; y0i[q] = a0i + p1i + p2i
        # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
        ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
        br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
        er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
        fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
        o1r = ar_ + br_; o1i = ai_ + bi_
        o4r = ar_ - br_; o4i = ai_ - bi_
        o2r = er_ + fr_; o2i = ei_ + fi_
        o3r = er_ - fr_; o3i = ei_ - fi_
        y1r[q] = o1r * w1r - o1i * w1i; y1i[q] = o1r * w1i + o1i * w1r
        y2r[q] = o2r * w2r - o2i * w2i; y2i[q] = o2r * w2i + o2i * w2r
        y3r[q] = o3r * w3r - o3i * w3i; y3i[q] = o3r * w3i + o3i * w3r
        y4r[q] = o4r * w4r - o4i * w4i; y4i[q] = o4r * w4i + o4i * w4r



cdef void _stage44(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                   rptr wr, rptr wi, rptr tr, rptr ti, const real_t* kc) noexcept nogil:
    """Two split radix-4 stages in a blocked order (a middle "radix 16" of the schedule):
    stage A at stride s with m butterflies per stride element, then stage B at stride
    4s with m/4, their twiddle tables one after the other (A's at wr[p + (k-1)*m], B's
    at wr[3*m + p' + (k-1)*m/4]). For each p' < m/4 and each chunk of at most QB values
    of q, A's four butterfly groups p = p' + j*m/4 feeding B's group p' run into the
    L1 buffer tr/ti (16 legs of QB), and B reads them from there: the row goes through
    L2 once for the two passes instead of twice. The same _q4 loops as _stage4 (and so
    the same arithmetic, bit for bit)."""
    cdef Py_ssize_t m4 = m // 4
    cdef Py_ssize_t p2, q0, qn, p, j, k, xs = s * m, s4 = 4 * s, o
    cdef Py_ssize_t qb = QB_BYTES // sizeof(kc[0])
    cdef rptr wr2 = wr + 3 * m
    cdef rptr wi2 = wi + 3 * m
    for p2 in range(m4):
        q0 = 0
        while q0 < s:
            qn = s - q0
            if qn > qb:
                qn = qb
            for j in range(4):
                p = p2 + j * m4
                _q4(qn,
                    tr + (4 * j + 0) * qb, tr + (4 * j + 1) * qb, tr + (4 * j + 2) * qb, tr + (4 * j + 3) * qb,
                    ti + (4 * j + 0) * qb, ti + (4 * j + 1) * qb, ti + (4 * j + 2) * qb, ti + (4 * j + 3) * qb,
                    xr + q0 + s * p, xr + q0 + s * p + xs, xr + q0 + s * p + 2 * xs, xr + q0 + s * p + 3 * xs,
                    xi + q0 + s * p, xi + q0 + s * p + xs, xi + q0 + s * p + 2 * xs, xi + q0 + s * p + 3 * xs,
                    wr + p, wi + p, m, kc)
            for k in range(4):
                o = q0 + s * k + s4 * 4 * p2
                _q4(qn,
                    yr + o, yr + o + s4, yr + o + 2 * s4, yr + o + 3 * s4,
                    yi + o, yi + o + s4, yi + o + 2 * s4, yi + o + 3 * s4,
                    tr + k * qb, tr + (4 + k) * qb, tr + (8 + k) * qb, tr + (12 + k) * qb,
                    ti + k * qb, ti + (4 + k) * qb, ti + (8 + k) * qb, ti + (12 + k) * qb,
                    wr2 + p2, wi2 + p2, m4, kc)
            q0 += qn


cdef void _stage5(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t p, q, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, a4r, a4i
    cdef real_t p1r, p1i, m1r, m1i, p2r, p2i, m2r, m2i, ar_, ai_, br_, bi_, er_, ei_
    cdef real_t fr_, fi_, o1r, o1i, o4r, o4i, o2r, o2i, o3r, o3i, c1, c2, s1, s2
    c1 = kc[K_C1]
    c2 = kc[K_C2]
    s1 = kc[K_S1]
    s2 = kc[K_S2]
    if s == 1:
        xs = m
        ys = 1
        for p in range(m):
            i = p
            o = 5 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            a0r = xr[i]; a0i = xi[i]
            a1r = xr[i + xs]; a1i = xi[i + xs]
            a2r = xr[i + 2 * xs]; a2i = xi[i + 2 * xs]
            a3r = xr[i + 3 * xs]; a3i = xi[i + 3 * xs]
            a4r = xr[i + 4 * xs]; a4i = xi[i + 4 * xs]
            p1r = a1r + a4r; p1i = a1i + a4i
            m1r = a1r - a4r; m1i = a1i - a4i
            p2r = a2r + a3r; p2i = a2i + a3i
            m2r = a2r - a3r; m2i = a2i - a3i
            yr[o] = a0r + p1r + p2r; yi[o] = a0i + p1i + p2i
            # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
            ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
            br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
            er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
            fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
            o1r = ar_ + br_; o1i = ai_ + bi_
            o4r = ar_ - br_; o4i = ai_ - bi_
            o2r = er_ + fr_; o2i = ei_ + fi_
            o3r = er_ - fr_; o3i = ei_ - fi_
            yr[o + ys] = o1r * w1r - o1i * w1i; yi[o + ys] = o1r * w1i + o1i * w1r
            yr[o + 2 * ys] = o2r * w2r - o2i * w2i; yi[o + 2 * ys] = o2r * w2i + o2i * w2r
            yr[o + 3 * ys] = o3r * w3r - o3i * w3i; yi[o + 3 * ys] = o3r * w3i + o3i * w3r
            yr[o + 4 * ys] = o4r * w4r - o4i * w4i; yi[o + 4 * ys] = o4r * w4i + o4i * w4r
    else:
        xs = s * m
        for p in range(m):
            _q5(s,
                yr + (5 * p + 0) * s, yr + (5 * p + 1) * s,
                yr + (5 * p + 2) * s, yr + (5 * p + 3) * s, yr + (5 * p + 4) * s,
                yi + (5 * p + 0) * s, yi + (5 * p + 1) * s,
                yi + (5 * p + 2) * s, yi + (5 * p + 3) * s, yi + (5 * p + 4) * s,
                xr + s * p + 0 * xs, xr + s * p + 1 * xs,
                xr + s * p + 2 * xs, xr + s * p + 3 * xs, xr + s * p + 4 * xs,
                xi + s * p + 0 * xs, xi + s * p + 1 * xs,
                xi + s * p + 2 * xs, xi + s * p + 3 * xs, xi + s * p + 4 * xs,
                wr + p, wi + p, m, kc)


cdef void _q8(Py_ssize_t s,
            rptr y0r, rptr y1r, rptr y2r, rptr y3r, rptr y4r, rptr y5r, rptr y6r, rptr y7r,
            rptr y0i, rptr y1i, rptr y2i, rptr y3i, rptr y4i, rptr y5i, rptr y6i, rptr y7i,
            rptr x0r, rptr x1r, rptr x2r, rptr x3r, rptr x4r, rptr x5r, rptr x6r, rptr x7r,
            rptr x0i, rptr x1i, rptr x2i, rptr x3i, rptr x4i, rptr x5i, rptr x6i, rptr x7i,
            rptr wr, rptr wi, Py_ssize_t m, const real_t* kc) noexcept nogil:
    """Inner loop of a radix-8 stage for one p: s butterflies, one
    restrict pointer per input/output leg (so gcc vectorises over q without
    run-time overlap checks); twiddles w_k = (wr, wi)[(k-1)*m]."""
    cdef Py_ssize_t q
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, w5r, w5i, w6r, w6i, w7r, w7i, a0r, a0i, a1r, a1i
    cdef real_t a2r, a2i, a3r, a3i, a4r, a4i, a5r, a5i, a6r, a6i, a7r, a7i, t0r, t0i, t1r, t1i, t2r, t2i
    cdef real_t t3r, t3i, e0r, e0i, e2r, e2i, e1r, e1i, e3r, e3i, u0r, u0i, u1r, u1i, u2r, u2i, u3r, u3i
    cdef real_t o0r, o0i, o2r_, o2i_, o1r_, o1i_, o3r_, o3i_, o1r, o1i, o2r, o2i, o3r, o3i
    cdef real_t c1r, c1i, c2r, c2i, c3r, c3i, c4r, c4i, c5r, c5i, c6r, c6i, c7r, c7i, sg, h
    sg = 1  # forward-only (a compile-time constant): see _run
    h = kc[K_H]
    w1r = wr[0]; w1i = wi[0]
    w2r = wr[m]; w2i = wi[m]
    w3r = wr[2 * m]; w3i = wi[2 * m]
    w4r = wr[3 * m]; w4i = wi[3 * m]
    w5r = wr[4 * m]; w5i = wi[4 * m]
    w6r = wr[5 * m]; w6i = wi[5 * m]
    w7r = wr[6 * m]; w7i = wi[6 * m]
    for q in range(s):
        a0r = x0r[q]; a0i = x0i[q]
        a1r = x1r[q]; a1i = x1i[q]
        a2r = x2r[q]; a2i = x2i[q]
        a3r = x3r[q]; a3i = x3i[q]
        a4r = x4r[q]; a4i = x4i[q]
        a5r = x5r[q]; a5i = x5i[q]
        a6r = x6r[q]; a6i = x6i[q]
        a7r = x7r[q]; a7i = x7i[q]
        # even half: radix-4 of a0, a2, a4, a6
        t0r = a0r + a4r; t0i = a0i + a4i
        t1r = a0r - a4r; t1i = a0i - a4i
        t2r = a2r + a6r; t2i = a2i + a6i
        t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
        e0r = t0r + t2r; e0i = t0i + t2i
        e2r = t0r - t2r; e2i = t0i - t2i
        e1r = t1r + t3r; e1i = t1i + t3i
        e3r = t1r - t3r; e3i = t1i - t3i
        # odd half: radix-4 of a1, a3, a5, a7
        u0r = a1r + a5r; u0i = a1i + a5i
        u1r = a1r - a5r; u1i = a1i - a5i
        u2r = a3r + a7r; u2i = a3i + a7i
        u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
        o0r = u0r + u2r; o0i = u0i + u2i
        o2r_ = u0r - u2r; o2i_ = u0i - u2i
        o1r_ = u1r + u3r; o1i_ = u1i + u3i
        o3r_ = u1r - u3r; o3i_ = u1i - u3i
        # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
        o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
        o2r = sg * o2i_; o2i = -sg * o2r_
        o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
        y0r[q] = e0r + o0r; y0i[q] = e0i + o0i
        c1r = e1r + o1r; c1i = e1i + o1i
        c2r = e2r + o2r; c2i = e2i + o2i
        c3r = e3r + o3r; c3i = e3i + o3i
        c4r = e0r - o0r; c4i = e0i - o0i
        c5r = e1r - o1r; c5i = e1i - o1i
        c6r = e2r - o2r; c6i = e2i - o2i
        c7r = e3r - o3r; c7i = e3i - o3i
        y1r[q] = c1r * w1r - c1i * w1i; y1i[q] = c1r * w1i + c1i * w1r
        y2r[q] = c2r * w2r - c2i * w2i; y2i[q] = c2r * w2i + c2i * w2r
        y3r[q] = c3r * w3r - c3i * w3i; y3i[q] = c3r * w3i + c3i * w3r
        y4r[q] = c4r * w4r - c4i * w4i; y4i[q] = c4r * w4i + c4i * w4r
        y5r[q] = c5r * w5r - c5i * w5i; y5i[q] = c5r * w5i + c5i * w5r
        y6r[q] = c6r * w6r - c6i * w6i; y6i[q] = c6r * w6i + c6i * w6r
        y7r[q] = c7r * w7r - c7i * w7i; y7i[q] = c7r * w7i + c7i * w7r


cdef void _stage8(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t p, p0, q, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, w5r, w5i, w6r, w6i, w7r, w7i, a0r, a0i, a1r, a1i
    cdef real_t a2r, a2i, a3r, a3i, a4r, a4i, a5r, a5i, a6r, a6i, a7r, a7i, t0r, t0i, t1r, t1i, t2r, t2i
    cdef real_t t3r, t3i, e0r, e0i, e2r, e2i, e1r, e1i, e3r, e3i, u0r, u0i, u1r, u1i, u2r, u2i, u3r, u3i
    cdef real_t o0r, o0i, o2r_, o2i_, o1r_, o1i_, o3r_, o3i_, o1r, o1i, o2r, o2i, o3r, o3i
    cdef real_t c1r, c1i, c2r, c2i, c3r, c3i, c4r, c4i, c5r, c5i, c6r, c6i, c7r, c7i, sg, h
    sg = 1  # forward-only (a compile-time constant): see _run
    h = kc[K_H]
    if s == 1:
        xs = m
        ys = 1
        for p in range(m):
            i = p
            o = 8 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            a0r = xr[i]; a0i = xi[i]
            a1r = xr[i + xs]; a1i = xi[i + xs]
            a2r = xr[i + 2 * xs]; a2i = xi[i + 2 * xs]
            a3r = xr[i + 3 * xs]; a3i = xi[i + 3 * xs]
            a4r = xr[i + 4 * xs]; a4i = xi[i + 4 * xs]
            a5r = xr[i + 5 * xs]; a5i = xi[i + 5 * xs]
            a6r = xr[i + 6 * xs]; a6i = xi[i + 6 * xs]
            a7r = xr[i + 7 * xs]; a7i = xi[i + 7 * xs]
            # even half: radix-4 of a0, a2, a4, a6
            t0r = a0r + a4r; t0i = a0i + a4i
            t1r = a0r - a4r; t1i = a0i - a4i
            t2r = a2r + a6r; t2i = a2i + a6i
            t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
            e0r = t0r + t2r; e0i = t0i + t2i
            e2r = t0r - t2r; e2i = t0i - t2i
            e1r = t1r + t3r; e1i = t1i + t3i
            e3r = t1r - t3r; e3i = t1i - t3i
            # odd half: radix-4 of a1, a3, a5, a7
            u0r = a1r + a5r; u0i = a1i + a5i
            u1r = a1r - a5r; u1i = a1i - a5i
            u2r = a3r + a7r; u2i = a3i + a7i
            u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
            o0r = u0r + u2r; o0i = u0i + u2i
            o2r_ = u0r - u2r; o2i_ = u0i - u2i
            o1r_ = u1r + u3r; o1i_ = u1i + u3i
            o3r_ = u1r - u3r; o3i_ = u1i - u3i
            # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
            o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
            o2r = sg * o2i_; o2i = -sg * o2r_
            o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
            yr[o] = e0r + o0r; yi[o] = e0i + o0i
            c1r = e1r + o1r; c1i = e1i + o1i
            c2r = e2r + o2r; c2i = e2i + o2i
            c3r = e3r + o3r; c3i = e3i + o3i
            c4r = e0r - o0r; c4i = e0i - o0i
            c5r = e1r - o1r; c5i = e1i - o1i
            c6r = e2r - o2r; c6i = e2i - o2i
            c7r = e3r - o3r; c7i = e3i - o3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r
            yr[o + 4 * ys] = c4r * w4r - c4i * w4i; yi[o + 4 * ys] = c4r * w4i + c4i * w4r
            yr[o + 5 * ys] = c5r * w5r - c5i * w5i; yi[o + 5 * ys] = c5r * w5i + c5i * w5r
            yr[o + 6 * ys] = c6r * w6r - c6i * w6i; yi[o + 6 * ys] = c6r * w6i + c6i * w6r
            yr[o + 7 * ys] = c7r * w7r - c7i * w7i; yi[o + 7 * ys] = c7r * w7i + c7i * w7r
    elif s == 4:
        # s == 4, 8, 16: whole-vector loops of a compile-time trip count indexed from one
        # base per array (the generic loop's 32 leg pointers do not fit the registers)
        xs = 4 * m
        for p in range(m):
            i = 4 * p
            o = 32 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            for q in range(4):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                a4r = xr[i + 4 * xs + q]; a4i = xi[i + 4 * xs + q]
                a5r = xr[i + 5 * xs + q]; a5i = xi[i + 5 * xs + q]
                a6r = xr[i + 6 * xs + q]; a6i = xi[i + 6 * xs + q]
                a7r = xr[i + 7 * xs + q]; a7i = xi[i + 7 * xs + q]
                # even half: radix-4 of a0, a2, a4, a6
                t0r = a0r + a4r; t0i = a0i + a4i
                t1r = a0r - a4r; t1i = a0i - a4i
                t2r = a2r + a6r; t2i = a2i + a6i
                t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
                e0r = t0r + t2r; e0i = t0i + t2i
                e2r = t0r - t2r; e2i = t0i - t2i
                e1r = t1r + t3r; e1i = t1i + t3i
                e3r = t1r - t3r; e3i = t1i - t3i
                # odd half: radix-4 of a1, a3, a5, a7
                u0r = a1r + a5r; u0i = a1i + a5i
                u1r = a1r - a5r; u1i = a1i - a5i
                u2r = a3r + a7r; u2i = a3i + a7i
                u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
                o0r = u0r + u2r; o0i = u0i + u2i
                o2r_ = u0r - u2r; o2i_ = u0i - u2i
                o1r_ = u1r + u3r; o1i_ = u1i + u3i
                o3r_ = u1r - u3r; o3i_ = u1i - u3i
                # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
                o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
                o2r = sg * o2i_; o2i = -sg * o2r_
                o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
                yr[o + q] = e0r + o0r; yi[o + q] = e0i + o0i
                c1r = e1r + o1r; c1i = e1i + o1i
                c2r = e2r + o2r; c2i = e2i + o2i
                c3r = e3r + o3r; c3i = e3i + o3i
                c4r = e0r - o0r; c4i = e0i - o0i
                c5r = e1r - o1r; c5i = e1i - o1i
                c6r = e2r - o2r; c6i = e2i - o2i
                c7r = e3r - o3r; c7i = e3i - o3i
                yr[o + 4 + q] = c1r * w1r - c1i * w1i; yi[o + 4 + q] = c1r * w1i + c1i * w1r
                yr[o + 8 + q] = c2r * w2r - c2i * w2i; yi[o + 8 + q] = c2r * w2i + c2i * w2r
                yr[o + 12 + q] = c3r * w3r - c3i * w3i; yi[o + 12 + q] = c3r * w3i + c3i * w3r
                yr[o + 16 + q] = c4r * w4r - c4i * w4i; yi[o + 16 + q] = c4r * w4i + c4i * w4r
                yr[o + 20 + q] = c5r * w5r - c5i * w5i; yi[o + 20 + q] = c5r * w5i + c5i * w5r
                yr[o + 24 + q] = c6r * w6r - c6i * w6i; yi[o + 24 + q] = c6r * w6i + c6i * w6r
                yr[o + 28 + q] = c7r * w7r - c7i * w7i; yi[o + 28 + q] = c7r * w7i + c7i * w7r
    elif s == 8:
        xs = 8 * m
        p0 = 0
        if rptr is fptr:  # complex64 on the AVX-512 build: csrc/fft_first.h
            p0 = vrdma_s8_radix8_f32(yr, yi, xr, xi, m, wr, wi, kc[K_H])
        for p in range(p0, m):
            i = 8 * p
            o = 64 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            for q in range(8):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                a4r = xr[i + 4 * xs + q]; a4i = xi[i + 4 * xs + q]
                a5r = xr[i + 5 * xs + q]; a5i = xi[i + 5 * xs + q]
                a6r = xr[i + 6 * xs + q]; a6i = xi[i + 6 * xs + q]
                a7r = xr[i + 7 * xs + q]; a7i = xi[i + 7 * xs + q]
                # even half: radix-4 of a0, a2, a4, a6
                t0r = a0r + a4r; t0i = a0i + a4i
                t1r = a0r - a4r; t1i = a0i - a4i
                t2r = a2r + a6r; t2i = a2i + a6i
                t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
                e0r = t0r + t2r; e0i = t0i + t2i
                e2r = t0r - t2r; e2i = t0i - t2i
                e1r = t1r + t3r; e1i = t1i + t3i
                e3r = t1r - t3r; e3i = t1i - t3i
                # odd half: radix-4 of a1, a3, a5, a7
                u0r = a1r + a5r; u0i = a1i + a5i
                u1r = a1r - a5r; u1i = a1i - a5i
                u2r = a3r + a7r; u2i = a3i + a7i
                u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
                o0r = u0r + u2r; o0i = u0i + u2i
                o2r_ = u0r - u2r; o2i_ = u0i - u2i
                o1r_ = u1r + u3r; o1i_ = u1i + u3i
                o3r_ = u1r - u3r; o3i_ = u1i - u3i
                # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
                o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
                o2r = sg * o2i_; o2i = -sg * o2r_
                o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
                yr[o + q] = e0r + o0r; yi[o + q] = e0i + o0i
                c1r = e1r + o1r; c1i = e1i + o1i
                c2r = e2r + o2r; c2i = e2i + o2i
                c3r = e3r + o3r; c3i = e3i + o3i
                c4r = e0r - o0r; c4i = e0i - o0i
                c5r = e1r - o1r; c5i = e1i - o1i
                c6r = e2r - o2r; c6i = e2i - o2i
                c7r = e3r - o3r; c7i = e3i - o3i
                yr[o + 8 + q] = c1r * w1r - c1i * w1i; yi[o + 8 + q] = c1r * w1i + c1i * w1r
                yr[o + 16 + q] = c2r * w2r - c2i * w2i; yi[o + 16 + q] = c2r * w2i + c2i * w2r
                yr[o + 24 + q] = c3r * w3r - c3i * w3i; yi[o + 24 + q] = c3r * w3i + c3i * w3r
                yr[o + 32 + q] = c4r * w4r - c4i * w4i; yi[o + 32 + q] = c4r * w4i + c4i * w4r
                yr[o + 40 + q] = c5r * w5r - c5i * w5i; yi[o + 40 + q] = c5r * w5i + c5i * w5r
                yr[o + 48 + q] = c6r * w6r - c6i * w6i; yi[o + 48 + q] = c6r * w6i + c6i * w6r
                yr[o + 56 + q] = c7r * w7r - c7i * w7i; yi[o + 56 + q] = c7r * w7i + c7i * w7r
    elif s == 16:
        xs = 16 * m
        for p in range(m):
            i = 16 * p
            o = 128 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            for q in range(16):
                a0r = xr[i + q]; a0i = xi[i + q]
                a1r = xr[i + xs + q]; a1i = xi[i + xs + q]
                a2r = xr[i + 2 * xs + q]; a2i = xi[i + 2 * xs + q]
                a3r = xr[i + 3 * xs + q]; a3i = xi[i + 3 * xs + q]
                a4r = xr[i + 4 * xs + q]; a4i = xi[i + 4 * xs + q]
                a5r = xr[i + 5 * xs + q]; a5i = xi[i + 5 * xs + q]
                a6r = xr[i + 6 * xs + q]; a6i = xi[i + 6 * xs + q]
                a7r = xr[i + 7 * xs + q]; a7i = xi[i + 7 * xs + q]
                # even half: radix-4 of a0, a2, a4, a6
                t0r = a0r + a4r; t0i = a0i + a4i
                t1r = a0r - a4r; t1i = a0i - a4i
                t2r = a2r + a6r; t2i = a2i + a6i
                t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
                e0r = t0r + t2r; e0i = t0i + t2i
                e2r = t0r - t2r; e2i = t0i - t2i
                e1r = t1r + t3r; e1i = t1i + t3i
                e3r = t1r - t3r; e3i = t1i - t3i
                # odd half: radix-4 of a1, a3, a5, a7
                u0r = a1r + a5r; u0i = a1i + a5i
                u1r = a1r - a5r; u1i = a1i - a5i
                u2r = a3r + a7r; u2i = a3i + a7i
                u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
                o0r = u0r + u2r; o0i = u0i + u2i
                o2r_ = u0r - u2r; o2i_ = u0i - u2i
                o1r_ = u1r + u3r; o1i_ = u1i + u3i
                o3r_ = u1r - u3r; o3i_ = u1i - u3i
                # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
                o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
                o2r = sg * o2i_; o2i = -sg * o2r_
                o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
                yr[o + q] = e0r + o0r; yi[o + q] = e0i + o0i
                c1r = e1r + o1r; c1i = e1i + o1i
                c2r = e2r + o2r; c2i = e2i + o2i
                c3r = e3r + o3r; c3i = e3i + o3i
                c4r = e0r - o0r; c4i = e0i - o0i
                c5r = e1r - o1r; c5i = e1i - o1i
                c6r = e2r - o2r; c6i = e2i - o2i
                c7r = e3r - o3r; c7i = e3i - o3i
                yr[o + 16 + q] = c1r * w1r - c1i * w1i; yi[o + 16 + q] = c1r * w1i + c1i * w1r
                yr[o + 32 + q] = c2r * w2r - c2i * w2i; yi[o + 32 + q] = c2r * w2i + c2i * w2r
                yr[o + 48 + q] = c3r * w3r - c3i * w3i; yi[o + 48 + q] = c3r * w3i + c3i * w3r
                yr[o + 64 + q] = c4r * w4r - c4i * w4i; yi[o + 64 + q] = c4r * w4i + c4i * w4r
                yr[o + 80 + q] = c5r * w5r - c5i * w5i; yi[o + 80 + q] = c5r * w5i + c5i * w5r
                yr[o + 96 + q] = c6r * w6r - c6i * w6i; yi[o + 96 + q] = c6r * w6i + c6i * w6r
                yr[o + 112 + q] = c7r * w7r - c7i * w7i; yi[o + 112 + q] = c7r * w7i + c7i * w7r
    else:
        xs = s * m
        for p in range(m):
            _q8(s,
                yr + (8 * p + 0) * s, yr + (8 * p + 1) * s, yr + (8 * p + 2) * s, yr + (8 * p + 3) * s,
                yr + (8 * p + 4) * s, yr + (8 * p + 5) * s, yr + (8 * p + 6) * s, yr + (8 * p + 7) * s,
                yi + (8 * p + 0) * s, yi + (8 * p + 1) * s, yi + (8 * p + 2) * s, yi + (8 * p + 3) * s,
                yi + (8 * p + 4) * s, yi + (8 * p + 5) * s, yi + (8 * p + 6) * s, yi + (8 * p + 7) * s,
                xr + s * p + 0 * xs, xr + s * p + 1 * xs, xr + s * p + 2 * xs, xr + s * p + 3 * xs,
                xr + s * p + 4 * xs, xr + s * p + 5 * xs, xr + s * p + 6 * xs, xr + s * p + 7 * xs,
                xi + s * p + 0 * xs, xi + s * p + 1 * xs, xi + s * p + 2 * xs, xi + s * p + 3 * xs,
                xi + s * p + 4 * xs, xi + s * p + 5 * xs, xi + s * p + 6 * xs, xi + s * p + 7 * xs,
                wr + p, wi + p, m, kc)


# ---------------------------------------------------------------- fused first / last stages
# The first stage of a plan with two or more stages reads the interleaved complex input
# itself (_first<r>: the s == 1 loop of _stage<r> with its loads from x[2i], x[2i + 1]) and
# a last radix-2/3/4/5 stage (m == 1, so no twiddles) writes the interleaved output times
# the plan's scale (_last<r>: the loop of _q<r> storing to y[2j], y[2j + 1]): two passes
# over the row fewer than splitting, transforming and joining. A last radix-8 stage stays
# split and is followed by the join: fused (eight interleaved output streams 4-8 KiB
# apart) it measured slower on AVX2 and AVX-512, both precisions.


cdef void _first2(rptr yr, rptr yi, rptr x, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    """The first radix-2 stage (s == 1) reading the interleaved complex input row x
    (the split into real / imaginary arrays folded into the stage's loads)."""
    cdef Py_ssize_t p, i, o, xs, ys
    cdef real_t w1r, w1i, a0r, a0i, a1r, a1i, c1r, c1i
    xs = m
    ys = 1
    for p in range(m):
        i = p
        o = 2 * p
        w1r = wr[p]; w1i = wi[p]
        a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
        a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
        yr[o] = a0r + a1r; yi[o] = a0i + a1i
        c1r = a0r - a1r; c1i = a0i - a1i
        yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r


cdef void _last2(rptr y, rptr xr, rptr xi, Py_ssize_t s, const real_t* kc) noexcept nogil:
    """The last radix-2 stage (m == 1: no twiddles) writing the interleaved complex output
    row y, times the plan's scale (the join folded into the stage's stores)."""
    cdef Py_ssize_t q, q0
    cdef real_t scale = kc[K_SCALE]
    cdef real_t a0r, a0i, a1r, a1i, c1r, c1i
    if rptr is fptr:
        q0 = vrdma_last2_f32(y, xr, xi, s, scale, kc[K_SG] > 0)
    else:
        q0 = vrdma_last2_f64(y, xr, xi, s, scale, kc[K_SG] > 0)
    if kc[K_SG] > 0:  # forward: sg == 1 and scale == 1, no multiply by either
        for q in range(q0, s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            y[2 * q] = (a0r + a1r); y[2 * q + 1] = (a0i + a1i)
            c1r = a0r - a1r; c1i = a0i - a1i
            y[2 * (q + 1 * s)] = c1r; y[2 * (q + 1 * s) + 1] = c1i
    else:
        for q in range(q0, s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            y[2 * q] = (a0r + a1r) * scale; y[2 * q + 1] = (a0i + a1i) * scale
            c1r = a0r - a1r; c1i = a0i - a1i
            y[2 * (q + 1 * s)] = c1r * scale; y[2 * (q + 1 * s) + 1] = c1i * scale


cdef void _first3(rptr yr, rptr yi, rptr x, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    """The first radix-3 stage (s == 1) reading the interleaved complex input row x
    (the split into real / imaginary arrays folded into the stage's loads)."""
    cdef Py_ssize_t p, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, a0r, a0i, a1r, a1i, a2r, a2i, tr, ti, ur, ui, vr, vi
    cdef real_t c1r, c1i, c2r, c2i, half, s3
    half = kc[K_HALF]
    s3 = kc[K_S3]
    xs = m
    ys = 1
    for p in range(m):
        i = p
        o = 3 * p
        w1r = wr[p]; w1i = wi[p]
        w2r = wr[p + m]; w2i = wi[p + m]
        a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
        a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
        a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
        tr = a1r + a2r; ti = a1i + a2i
        ur = a0r - half * tr; ui = a0i - half * ti
        # v = (a1 - a2) * (-i * sg * sqrt(3)/2)
        vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
        yr[o] = a0r + tr; yi[o] = a0i + ti
        c1r = ur + vr; c1i = ui + vi
        c2r = ur - vr; c2i = ui - vi
        yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
        yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r


cdef void _last3(rptr y, rptr xr, rptr xi, Py_ssize_t s, const real_t* kc) noexcept nogil:
    """The last radix-3 stage (m == 1: no twiddles) writing the interleaved complex output
    row y, times the plan's scale (the join folded into the stage's stores)."""
    cdef Py_ssize_t q
    cdef real_t scale = kc[K_SCALE]
    cdef real_t a0r, a0i, a1r, a1i, a2r, a2i, tr, ti, ur, ui, vr, vi
    cdef real_t c1r, c1i, c2r, c2i, half, s3
    half = kc[K_HALF]
    s3 = kc[K_S3]
    if kc[K_SG] > 0:  # forward: sg == 1 and scale == 1, no multiply by either
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            tr = a1r + a2r; ti = a1i + a2i
            ur = a0r - half * tr; ui = a0i - half * ti
            # v = (a1 - a2) * (-i * sqrt(3)/2)
            vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
            y[2 * q] = (a0r + tr); y[2 * q + 1] = (a0i + ti)
            c1r = ur + vr; c1i = ui + vi
            c2r = ur - vr; c2i = ui - vi
            y[2 * (q + 1 * s)] = c1r; y[2 * (q + 1 * s) + 1] = c1i
            y[2 * (q + 2 * s)] = c2r; y[2 * (q + 2 * s) + 1] = c2i
    else:
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            tr = a1r + a2r; ti = a1i + a2i
            ur = a0r - half * tr; ui = a0i - half * ti
            # v = (a1 - a2) * (-i * sg * sqrt(3)/2)
            vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
            y[2 * q] = (a0r + tr) * scale; y[2 * q + 1] = (a0i + ti) * scale
            c1r = ur + vr; c1i = ui + vi
            c2r = ur - vr; c2i = ui - vi
            y[2 * (q + 1 * s)] = c1r * scale; y[2 * (q + 1 * s) + 1] = c1i * scale
            y[2 * (q + 2 * s)] = c2r * scale; y[2 * (q + 2 * s) + 1] = c2i * scale


cdef void _first4(rptr yr, rptr yi, rptr x, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    """The first radix-4 stage (s == 1) reading the interleaved complex input row x
    (the split into real / imaginary arrays folded into the stage's loads)."""
    cdef Py_ssize_t p, p0, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, t0r, t0i, t1r, t1i
    cdef real_t t2r, t2i, t3r, t3i, c1r, c1i, c2r, c2i, c3r, c3i, sg
    sg = kc[K_SG]
    xs = m
    ys = 1
    if rptr is fptr:
        p0 = vrdma_first4_f32(yr, yi, x, m, wr, wi, kc[K_H], kc[K_SG] > 0)
    else:
        p0 = vrdma_first4_f64(yr, yi, x, m, wr, wi, kc[K_H], kc[K_SG] > 0)
    if kc[K_SG] > 0:  # forward: sg == 1, no multiply by it
        for p in range(p0, m):
            i = p
            o = 4 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
            a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
            a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
            a3r = x[2 * (i + 3 * xs)]; a3i = x[2 * (i + 3 * xs) + 1]
            t0r = a0r + a2r; t0i = a0i + a2i
            t1r = a0r - a2r; t1i = a0i - a2i
            t2r = a1r + a3r; t2i = a1i + a3i
            # t3 = (a1 - a3) * (-i * sg)
            t3r = (a1i - a3i); t3i = (a3r - a1r)
            yr[o] = t0r + t2r; yi[o] = t0i + t2i
            c1r = t1r + t3r; c1i = t1i + t3i
            c2r = t0r - t2r; c2i = t0i - t2i
            c3r = t1r - t3r; c3i = t1i - t3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r
    else:
        for p in range(p0, m):
            i = p
            o = 4 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
            a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
            a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
            a3r = x[2 * (i + 3 * xs)]; a3i = x[2 * (i + 3 * xs) + 1]
            t0r = a0r + a2r; t0i = a0i + a2i
            t1r = a0r - a2r; t1i = a0i - a2i
            t2r = a1r + a3r; t2i = a1i + a3i
            # t3 = (a1 - a3) * (-i * sg)
            t3r = sg * (a1i - a3i); t3i = sg * (a3r - a1r)
            yr[o] = t0r + t2r; yi[o] = t0i + t2i
            c1r = t1r + t3r; c1i = t1i + t3i
            c2r = t0r - t2r; c2i = t0i - t2i
            c3r = t1r - t3r; c3i = t1i - t3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r


cdef void _last4(rptr y, rptr xr, rptr xi, Py_ssize_t s, const real_t* kc) noexcept nogil:
    """The last radix-4 stage (m == 1: no twiddles) writing the interleaved complex output
    row y, times the plan's scale (the join folded into the stage's stores)."""
    cdef Py_ssize_t q
    cdef real_t scale = kc[K_SCALE]
    cdef real_t a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, t0r, t0i, t1r, t1i
    cdef real_t t2r, t2i, t3r, t3i, c1r, c1i, c2r, c2i, c3r, c3i, sg
    sg = kc[K_SG]
    if kc[K_SG] > 0:  # forward: sg == 1 and scale == 1, no multiply by either
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            a3r = xr[q + 3 * s]; a3i = xi[q + 3 * s]
            t0r = a0r + a2r; t0i = a0i + a2i
            t1r = a0r - a2r; t1i = a0i - a2i
            t2r = a1r + a3r; t2i = a1i + a3i
            # t3 = (a1 - a3) * (-i * sg)
            t3r = (a1i - a3i); t3i = (a3r - a1r)
            y[2 * q] = (t0r + t2r); y[2 * q + 1] = (t0i + t2i)
            c1r = t1r + t3r; c1i = t1i + t3i
            c2r = t0r - t2r; c2i = t0i - t2i
            c3r = t1r - t3r; c3i = t1i - t3i
            y[2 * (q + 1 * s)] = c1r; y[2 * (q + 1 * s) + 1] = c1i
            y[2 * (q + 2 * s)] = c2r; y[2 * (q + 2 * s) + 1] = c2i
            y[2 * (q + 3 * s)] = c3r; y[2 * (q + 3 * s) + 1] = c3i
    else:
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            a3r = xr[q + 3 * s]; a3i = xi[q + 3 * s]
            t0r = a0r + a2r; t0i = a0i + a2i
            t1r = a0r - a2r; t1i = a0i - a2i
            t2r = a1r + a3r; t2i = a1i + a3i
            # t3 = (a1 - a3) * (-i * sg)
            t3r = sg * (a1i - a3i); t3i = sg * (a3r - a1r)
            y[2 * q] = (t0r + t2r) * scale; y[2 * q + 1] = (t0i + t2i) * scale
            c1r = t1r + t3r; c1i = t1i + t3i
            c2r = t0r - t2r; c2i = t0i - t2i
            c3r = t1r - t3r; c3i = t1i - t3i
            y[2 * (q + 1 * s)] = c1r * scale; y[2 * (q + 1 * s) + 1] = c1i * scale
            y[2 * (q + 2 * s)] = c2r * scale; y[2 * (q + 2 * s) + 1] = c2i * scale
            y[2 * (q + 3 * s)] = c3r * scale; y[2 * (q + 3 * s) + 1] = c3i * scale


cdef void _first5(rptr yr, rptr yi, rptr x, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    """The first radix-5 stage (s == 1) reading the interleaved complex input row x
    (the split into real / imaginary arrays folded into the stage's loads)."""
    cdef Py_ssize_t p, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, a4r, a4i
    cdef real_t p1r, p1i, m1r, m1i, p2r, p2i, m2r, m2i, ar_, ai_, br_, bi_, er_, ei_
    cdef real_t fr_, fi_, o1r, o1i, o4r, o4i, o2r, o2i, o3r, o3i, c1, c2, s1, s2
    c1 = kc[K_C1]
    c2 = kc[K_C2]
    s1 = kc[K_S1]
    s2 = kc[K_S2]
    xs = m
    ys = 1
    for p in range(m):
        i = p
        o = 5 * p
        w1r = wr[p]; w1i = wi[p]
        w2r = wr[p + m]; w2i = wi[p + m]
        w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
        w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
        a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
        a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
        a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
        a3r = x[2 * (i + 3 * xs)]; a3i = x[2 * (i + 3 * xs) + 1]
        a4r = x[2 * (i + 4 * xs)]; a4i = x[2 * (i + 4 * xs) + 1]
        p1r = a1r + a4r; p1i = a1i + a4i
        m1r = a1r - a4r; m1i = a1i - a4i
        p2r = a2r + a3r; p2i = a2i + a3i
        m2r = a2r - a3r; m2i = a2i - a3i
        yr[o] = a0r + p1r + p2r; yi[o] = a0i + p1i + p2i
        # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
        ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
        br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
        er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
        fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
        o1r = ar_ + br_; o1i = ai_ + bi_
        o4r = ar_ - br_; o4i = ai_ - bi_
        o2r = er_ + fr_; o2i = ei_ + fi_
        o3r = er_ - fr_; o3i = ei_ - fi_
        yr[o + ys] = o1r * w1r - o1i * w1i; yi[o + ys] = o1r * w1i + o1i * w1r
        yr[o + 2 * ys] = o2r * w2r - o2i * w2i; yi[o + 2 * ys] = o2r * w2i + o2i * w2r
        yr[o + 3 * ys] = o3r * w3r - o3i * w3i; yi[o + 3 * ys] = o3r * w3i + o3i * w3r
        yr[o + 4 * ys] = o4r * w4r - o4i * w4i; yi[o + 4 * ys] = o4r * w4i + o4i * w4r


cdef void _last5(rptr y, rptr xr, rptr xi, Py_ssize_t s, const real_t* kc) noexcept nogil:
    """The last radix-5 stage (m == 1: no twiddles) writing the interleaved complex output
    row y, times the plan's scale (the join folded into the stage's stores)."""
    cdef Py_ssize_t q
    cdef real_t scale = kc[K_SCALE]
    cdef real_t a0r, a0i, a1r, a1i, a2r, a2i, a3r, a3i, a4r, a4i
    cdef real_t p1r, p1i, m1r, m1i, p2r, p2i, m2r, m2i, ar_, ai_, br_, bi_, er_, ei_
    cdef real_t fr_, fi_, o1r, o1i, o4r, o4i, o2r, o2i, o3r, o3i, c1, c2, s1, s2
    c1 = kc[K_C1]
    c2 = kc[K_C2]
    s1 = kc[K_S1]
    s2 = kc[K_S2]
    if kc[K_SG] > 0:  # forward: sg == 1 and scale == 1, no multiply by either
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            a3r = xr[q + 3 * s]; a3i = xi[q + 3 * s]
            a4r = xr[q + 4 * s]; a4i = xi[q + 4 * s]
            p1r = a1r + a4r; p1i = a1i + a4i
            m1r = a1r - a4r; m1i = a1i - a4i
            p2r = a2r + a3r; p2i = a2i + a3i
            m2r = a2r - a3r; m2i = a2i - a3i
            y[2 * q] = (a0r + p1r + p2r); y[2 * q + 1] = (a0i + p1i + p2i)
            # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
            ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
            br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
            er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
            fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
            o1r = ar_ + br_; o1i = ai_ + bi_
            o4r = ar_ - br_; o4i = ai_ - bi_
            o2r = er_ + fr_; o2i = ei_ + fi_
            o3r = er_ - fr_; o3i = ei_ - fi_
            y[2 * (q + 1 * s)] = o1r; y[2 * (q + 1 * s) + 1] = o1i
            y[2 * (q + 2 * s)] = o2r; y[2 * (q + 2 * s) + 1] = o2i
            y[2 * (q + 3 * s)] = o3r; y[2 * (q + 3 * s) + 1] = o3i
            y[2 * (q + 4 * s)] = o4r; y[2 * (q + 4 * s) + 1] = o4i
    else:
        for q in range(s):
            a0r = xr[q]; a0i = xi[q]
            a1r = xr[q + 1 * s]; a1i = xi[q + 1 * s]
            a2r = xr[q + 2 * s]; a2i = xi[q + 2 * s]
            a3r = xr[q + 3 * s]; a3i = xi[q + 3 * s]
            a4r = xr[q + 4 * s]; a4i = xi[q + 4 * s]
            p1r = a1r + a4r; p1i = a1i + a4i
            m1r = a1r - a4r; m1i = a1i - a4i
            p2r = a2r + a3r; p2i = a2i + a3i
            m2r = a2r - a3r; m2i = a2i - a3i
            y[2 * q] = (a0r + p1r + p2r) * scale; y[2 * q + 1] = (a0i + p1i + p2i) * scale
            # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
            ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
            br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
            er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
            fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
            o1r = ar_ + br_; o1i = ai_ + bi_
            o4r = ar_ - br_; o4i = ai_ - bi_
            o2r = er_ + fr_; o2i = ei_ + fi_
            o3r = er_ - fr_; o3i = ei_ - fi_
            y[2 * (q + 1 * s)] = o1r * scale; y[2 * (q + 1 * s) + 1] = o1i * scale
            y[2 * (q + 2 * s)] = o2r * scale; y[2 * (q + 2 * s) + 1] = o2i * scale
            y[2 * (q + 3 * s)] = o3r * scale; y[2 * (q + 3 * s) + 1] = o3i * scale
            y[2 * (q + 4 * s)] = o4r * scale; y[2 * (q + 4 * s) + 1] = o4i * scale


cdef void _first8(rptr yr, rptr yi, rptr x, Py_ssize_t m,
                  rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    """The first radix-8 stage (s == 1) reading the interleaved complex input row x
    (the split into real / imaginary arrays folded into the stage's loads)."""
    cdef Py_ssize_t p, p0, i, o, xs, ys
    cdef real_t w1r, w1i, w2r, w2i, w3r, w3i, w4r, w4i, w5r, w5i, w6r, w6i, w7r, w7i, a0r, a0i, a1r, a1i
    cdef real_t a2r, a2i, a3r, a3i, a4r, a4i, a5r, a5i, a6r, a6i, a7r, a7i, t0r, t0i, t1r, t1i, t2r, t2i
    cdef real_t t3r, t3i, e0r, e0i, e2r, e2i, e1r, e1i, e3r, e3i, u0r, u0i, u1r, u1i, u2r, u2i, u3r, u3i
    cdef real_t o0r, o0i, o2r_, o2i_, o1r_, o1i_, o3r_, o3i_, o1r, o1i, o2r, o2i, o3r, o3i
    cdef real_t c1r, c1i, c2r, c2i, c3r, c3i, c4r, c4i, c5r, c5i, c6r, c6i, c7r, c7i, sg, h
    sg = kc[K_SG]
    h = kc[K_H]
    xs = m
    ys = 1
    if rptr is fptr:
        p0 = vrdma_first8_f32(yr, yi, x, m, wr, wi, kc[K_H], kc[K_SG] > 0)
    else:
        p0 = vrdma_first8_f64(yr, yi, x, m, wr, wi, kc[K_H], kc[K_SG] > 0)
    if kc[K_SG] > 0:  # forward: sg == 1, no multiply by it
        for p in range(p0, m):
            i = p
            o = 8 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
            a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
            a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
            a3r = x[2 * (i + 3 * xs)]; a3i = x[2 * (i + 3 * xs) + 1]
            a4r = x[2 * (i + 4 * xs)]; a4i = x[2 * (i + 4 * xs) + 1]
            a5r = x[2 * (i + 5 * xs)]; a5i = x[2 * (i + 5 * xs) + 1]
            a6r = x[2 * (i + 6 * xs)]; a6i = x[2 * (i + 6 * xs) + 1]
            a7r = x[2 * (i + 7 * xs)]; a7i = x[2 * (i + 7 * xs) + 1]
            # even half: radix-4 of a0, a2, a4, a6
            t0r = a0r + a4r; t0i = a0i + a4i
            t1r = a0r - a4r; t1i = a0i - a4i
            t2r = a2r + a6r; t2i = a2i + a6i
            t3r = (a2i - a6i); t3i = (a6r - a2r)
            e0r = t0r + t2r; e0i = t0i + t2i
            e2r = t0r - t2r; e2i = t0i - t2i
            e1r = t1r + t3r; e1i = t1i + t3i
            e3r = t1r - t3r; e3i = t1i - t3i
            # odd half: radix-4 of a1, a3, a5, a7
            u0r = a1r + a5r; u0i = a1i + a5i
            u1r = a1r - a5r; u1i = a1i - a5i
            u2r = a3r + a7r; u2i = a3i + a7i
            u3r = (a3i - a7i); u3i = (a7r - a3r)
            o0r = u0r + u2r; o0i = u0i + u2i
            o2r_ = u0r - u2r; o2i_ = u0i - u2i
            o1r_ = u1r + u3r; o1i_ = u1i + u3i
            o3r_ = u1r - u3r; o3i_ = u1i - u3i
            # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
            o1r = h * (o1r_ + o1i_); o1i = h * (o1i_ - o1r_)
            o2r = o2i_; o2i = -o2r_
            o3r = h * (o3i_ - o3r_); o3i = -h * (o3i_ + o3r_)
            yr[o] = e0r + o0r; yi[o] = e0i + o0i
            c1r = e1r + o1r; c1i = e1i + o1i
            c2r = e2r + o2r; c2i = e2i + o2i
            c3r = e3r + o3r; c3i = e3i + o3i
            c4r = e0r - o0r; c4i = e0i - o0i
            c5r = e1r - o1r; c5i = e1i - o1i
            c6r = e2r - o2r; c6i = e2i - o2i
            c7r = e3r - o3r; c7i = e3i - o3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r
            yr[o + 4 * ys] = c4r * w4r - c4i * w4i; yi[o + 4 * ys] = c4r * w4i + c4i * w4r
            yr[o + 5 * ys] = c5r * w5r - c5i * w5i; yi[o + 5 * ys] = c5r * w5i + c5i * w5r
            yr[o + 6 * ys] = c6r * w6r - c6i * w6i; yi[o + 6 * ys] = c6r * w6i + c6i * w6r
            yr[o + 7 * ys] = c7r * w7r - c7i * w7i; yi[o + 7 * ys] = c7r * w7i + c7i * w7r
    else:
        for p in range(p0, m):
            i = p
            o = 8 * p
            w1r = wr[p]; w1i = wi[p]
            w2r = wr[p + m]; w2i = wi[p + m]
            w3r = wr[p + 2 * m]; w3i = wi[p + 2 * m]
            w4r = wr[p + 3 * m]; w4i = wi[p + 3 * m]
            w5r = wr[p + 4 * m]; w5i = wi[p + 4 * m]
            w6r = wr[p + 5 * m]; w6i = wi[p + 5 * m]
            w7r = wr[p + 6 * m]; w7i = wi[p + 6 * m]
            a0r = x[2 * (i)]; a0i = x[2 * (i) + 1]
            a1r = x[2 * (i + xs)]; a1i = x[2 * (i + xs) + 1]
            a2r = x[2 * (i + 2 * xs)]; a2i = x[2 * (i + 2 * xs) + 1]
            a3r = x[2 * (i + 3 * xs)]; a3i = x[2 * (i + 3 * xs) + 1]
            a4r = x[2 * (i + 4 * xs)]; a4i = x[2 * (i + 4 * xs) + 1]
            a5r = x[2 * (i + 5 * xs)]; a5i = x[2 * (i + 5 * xs) + 1]
            a6r = x[2 * (i + 6 * xs)]; a6i = x[2 * (i + 6 * xs) + 1]
            a7r = x[2 * (i + 7 * xs)]; a7i = x[2 * (i + 7 * xs) + 1]
            # even half: radix-4 of a0, a2, a4, a6
            t0r = a0r + a4r; t0i = a0i + a4i
            t1r = a0r - a4r; t1i = a0i - a4i
            t2r = a2r + a6r; t2i = a2i + a6i
            t3r = sg * (a2i - a6i); t3i = sg * (a6r - a2r)
            e0r = t0r + t2r; e0i = t0i + t2i
            e2r = t0r - t2r; e2i = t0i - t2i
            e1r = t1r + t3r; e1i = t1i + t3i
            e3r = t1r - t3r; e3i = t1i - t3i
            # odd half: radix-4 of a1, a3, a5, a7
            u0r = a1r + a5r; u0i = a1i + a5i
            u1r = a1r - a5r; u1i = a1i - a5i
            u2r = a3r + a7r; u2i = a3i + a7i
            u3r = sg * (a3i - a7i); u3i = sg * (a7r - a3r)
            o0r = u0r + u2r; o0i = u0i + u2i
            o2r_ = u0r - u2r; o2i_ = u0i - u2i
            o1r_ = u1r + u3r; o1i_ = u1i + u3i
            o3r_ = u1r - u3r; o3i_ = u1i - u3i
            # o1 *= W8, o2 *= W8^2 = -i*sg, o3 *= W8^3
            o1r = h * (o1r_ + sg * o1i_); o1i = h * (o1i_ - sg * o1r_)
            o2r = sg * o2i_; o2i = -sg * o2r_
            o3r = h * (sg * o3i_ - o3r_); o3i = -h * (o3i_ + sg * o3r_)
            yr[o] = e0r + o0r; yi[o] = e0i + o0i
            c1r = e1r + o1r; c1i = e1i + o1i
            c2r = e2r + o2r; c2i = e2i + o2i
            c3r = e3r + o3r; c3i = e3i + o3i
            c4r = e0r - o0r; c4i = e0i - o0i
            c5r = e1r - o1r; c5i = e1i - o1i
            c6r = e2r - o2r; c6i = e2i - o2i
            c7r = e3r - o3r; c7i = e3i - o3i
            yr[o + ys] = c1r * w1r - c1i * w1i; yi[o + ys] = c1r * w1i + c1i * w1r
            yr[o + 2 * ys] = c2r * w2r - c2i * w2i; yi[o + 2 * ys] = c2r * w2i + c2i * w2r
            yr[o + 3 * ys] = c3r * w3r - c3i * w3i; yi[o + 3 * ys] = c3r * w3i + c3i * w3r
            yr[o + 4 * ys] = c4r * w4r - c4i * w4i; yi[o + 4 * ys] = c4r * w4i + c4i * w4r
            yr[o + 5 * ys] = c5r * w5r - c5i * w5i; yi[o + 5 * ys] = c5r * w5i + c5i * w5r
            yr[o + 6 * ys] = c6r * w6r - c6i * w6i; yi[o + 6 * ys] = c6r * w6i + c6i * w6r
            yr[o + 7 * ys] = c7r * w7r - c7i * w7i; yi[o + 7 * ys] = c7r * w7i + c7i * w7r


cdef void _split(rptr dr, rptr di, rptr src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dr[i] = src[2 * i]
        di[i] = src[2 * i + 1]


cdef void _join(rptr dst, rptr sr, rptr si, Py_ssize_t n, const real_t* kc) noexcept nogil:
    cdef Py_ssize_t i
    cdef real_t scale
    scale = kc[K_SCALE]
    if scale == 1:
        for i in range(n):
            dst[2 * i] = sr[i]
            dst[2 * i + 1] = si[i]
    else:
        for i in range(n):
            dst[2 * i] = sr[i] * scale
            dst[2 * i + 1] = si[i] * scale


cdef inline void _stage(int r, rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                        rptr wr, rptr wi, const real_t* kc) noexcept nogil:
    if r == 8:
        _stage8(yr, yi, xr, xi, s, m, wr, wi, kc)
    elif r == 4:
        _stage4(yr, yi, xr, xi, s, m, wr, wi, kc)
    elif r == 2:
        _stage2(yr, yi, xr, xi, s, m, wr, wi, kc)
    elif r == 3:
        _stage3(yr, yi, xr, xi, s, m, wr, wi, kc)
    else:
        _stage5(yr, yi, xr, xi, s, m, wr, wi, kc)


cdef inline void _mid16(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                        rptr wr, rptr wi, rptr tr, rptr ti, const real_t* kc,
                        bint regs16) noexcept nogil:
    """A middle radix-16 stage (m butterflies per stride element): in registers
    (csrc/fft_mid16.h, the radix-16 table at wr[15*m]) where ``regs16`` and the wide
    builds' loop takes s, else the two radix-4 stages blocked (_stage44, their tables at
    wr[0])."""
    if regs16:
        if rptr is fptr:
            if vrdma_mid16_f32(yr, yi, xr, xi, s, m, wr + 15 * m, wi + 15 * m):
                return
        else:
            if vrdma_mid16_f64(yr, yi, xr, xi, s, m, wr + 15 * m, wi + 15 * m):
                return
    _stage44(yr, yi, xr, xi, s, 4 * m, wr, wi, tr, ti, kc)


cdef int _run(rptr x, rptr y, Py_ssize_t batch, Py_ssize_t n, int nstages,
              const int* radix, const Py_ssize_t* stride, const Py_ssize_t* toff,
              rptr twr, rptr twi, const real_t* kc, const real_t* kcf, bint inv,
              bint regs16) noexcept nogil:
    """Transform ``batch`` rows of n interleaved complex values x -> y.

    x and y are either disjoint or identical (in-place); each row is fully
    read into scratch before its output is written. Returns -1 if the scratch
    allocation fails, else 0.

    The split stages (_stage<r>) are forward-only: the direction sign is the
    constant 1, so no butterfly multiplies by it. An inverse stage is the
    forward stage with the real and imaginary parts of its input and output
    exchanged (conj(A) z = swap(A swap(z)) for swap(z) = i conj(z)), which on
    split arrays is exchanging two pointers: ``inv`` does that, with the
    forward constants ``kcf`` and the forward twiddles FFTCore keeps for
    those stages. The fused first and last stages read the direction's ``kc``.
    """
    cdef Py_ssize_t b, s, m
    cdef Py_ssize_t ms[MAX_STAGES]  # butterflies per stride element of each stage (no division per row)
    cdef int i, r, last
    cdef bint last8 = False
    cdef rptr ar, ai, br, bi
    # Two split (re, im) ping-pong buffers, each array 64-byte aligned and
    # followed by PAD extra elements so that the four arrays do not sit a
    # power of two apart (which costs L1 set conflicts and 4K store-load
    # aliasing stalls for n >= 1024).
    cdef Py_ssize_t ld = n + PAD
    # and the L1 buffer of a blocked radix-4 pair (_stage44): 16 legs of QB_BYTES, re and im
    cdef void* mem = malloc(4 * ld * sizeof(kc[0]) + 32 * QB_BYTES + 64)
    cdef rptr tr, ti
    if mem == NULL:
        return -1
    ar = <rptr>((<size_t>mem + 63) & ~(<size_t>63))
    ai = ar + ld
    br = ai + ld
    bi = br + ld
    tr = bi + ld
    ti = tr + 16 * (QB_BYTES // sizeof(kc[0]))
    for i in range(nstages):
        ms[i] = n // (stride[i] * radix[i])
    if nstages >= 2 and radix[nstages - 1] == 8 and VRDMA_FIRST_SIMD != 0:
        last8 = stride[nstages - 1] % (32 // sizeof(kc[0])) == 0  # 256-bit vectors of q
    for b in range(batch):
        if nstages < 2:
            _split(ar, ai, x + 2 * n * b, n)
            for i in range(nstages):
                if inv:
                    _stage(radix[i], bi, br, ai, ar, stride[i], ms[i],
                           twr + toff[i], twi + toff[i], kcf)
                else:
                    _stage(radix[i], br, bi, ar, ai, stride[i], ms[i],
                           twr + toff[i], twi + toff[i], kcf)
                ar, br = br, ar
                ai, bi = bi, ai
            _join(y + 2 * n * b, ar, ai, n, kc)
            continue
        r = radix[0]
        m = ms[0]
        if r == 8:
            _first8(ar, ai, x + 2 * n * b, m, twr, twi, kc)
        elif r == 4:
            _first4(ar, ai, x + 2 * n * b, m, twr, twi, kc)
        elif r == 2:
            _first2(ar, ai, x + 2 * n * b, m, twr, twi, kc)
        elif r == 3:
            _first3(ar, ai, x + 2 * n * b, m, twr, twi, kc)
        else:
            _first5(ar, ai, x + 2 * n * b, m, twr, twi, kc)
        # a last radix-8 stage stays split (see the fused stages above) unless the explicit
        # loop writes the row (AVX2 / AVX-512 builds, s a multiple of the vector width)
        last = nstages - 1
        if radix[last] == 8 and not last8:
            last = nstages
        for i in range(1, last):
            if radix[i] == 16:  # a middle radix 16: see _mid16
                if inv:
                    _mid16(bi, br, ai, ar, stride[i], ms[i], twr + toff[i], twi + toff[i],
                           tr, ti, kcf, regs16)
                else:
                    _mid16(br, bi, ar, ai, stride[i], ms[i], twr + toff[i], twi + toff[i],
                           tr, ti, kcf, regs16)
            elif inv:
                _stage(radix[i], bi, br, ai, ar, stride[i], ms[i],
                       twr + toff[i], twi + toff[i], kcf)
            else:
                _stage(radix[i], br, bi, ar, ai, stride[i], ms[i],
                       twr + toff[i], twi + toff[i], kcf)
            ar, br = br, ar
            ai, bi = bi, ai
        r = radix[nstages - 1]
        s = stride[nstages - 1]
        if last == nstages:
            _join(y + 2 * n * b, ar, ai, n, kc)
        elif r == 8:
            if rptr is fptr:
                vrdma_last8_f32(y + 2 * n * b, ar, ai, s, kc[K_SCALE], kc[K_H], kc[K_SG] > 0)
            else:
                vrdma_last8_f64(y + 2 * n * b, ar, ai, s, kc[K_SCALE], kc[K_H], kc[K_SG] > 0)
        elif r == 16:
            if rptr is fptr:
                vrdma_last16_f32(y + 2 * n * b, ar, ai, s, kc[K_SCALE], kc[K_SG] > 0)
            else:
                vrdma_last16_f64(y + 2 * n * b, ar, ai, s, kc[K_SCALE], kc[K_SG] > 0)
        elif r == 4:
            _last4(y + 2 * n * b, ar, ai, s, kc)
        elif r == 2:
            _last2(y + 2 * n * b, ar, ai, s, kc)
        elif r == 3:
            _last3(y + 2 * n * b, ar, ai, s, kc)
        else:
            _last5(y + 2 * n * b, ar, ai, s, kc)
    free(mem)
    return 0


cdef class FFTCore:
    """One planned transform: size, precision, direction, stage schedule, twiddles.

    Built by :mod:`accel_core.dft` (which computes the schedule and twiddles
    and caches instances); ``execute`` trusts that its arrays were validated.
    """
    cdef readonly Py_ssize_t n
    cdef readonly bint double
    cdef readonly bint inverse
    cdef readonly tuple radices
    cdef readonly bint regs16
    cdef int nstages
    cdef int radix_[MAX_STAGES]
    cdef Py_ssize_t stride_[MAX_STAGES]
    cdef Py_ssize_t toff_[MAX_STAGES]
    cdef cnp.ndarray twr_
    cdef cnp.ndarray twi_
    cdef cnp.ndarray kc_
    cdef cnp.ndarray kcf_

    def __init__(self, Py_ssize_t n, bint double, bint inverse, radices,
                 cnp.ndarray twr not None, cnp.ndarray twi not None,
                 cnp.ndarray kc not None, offsets, bint regs16=True):
        cdef Py_ssize_t s = 1, prod = 1
        cdef int i
        radices = tuple(int(r) for r in radices)
        offsets = tuple(int(o) for o in offsets)
        if len(radices) > MAX_STAGES or len(offsets) != len(radices):
            raise ValueError(f"bad stage schedule {radices!r} / {offsets!r}")
        for i, r in enumerate(radices):
            if r not in (2, 3, 4, 5, 8, 16):
                raise ValueError(f"unsupported radix {r}")
            if r == 16 and i == 0:
                raise ValueError(f"radix 16 not as a first stage, in {radices!r}")
            prod *= r
        if prod != n:
            raise ValueError(f"radices {radices!r} do not multiply to {n}")
        rdt = cnp.NPY_DOUBLE if double else cnp.NPY_FLOAT
        for name, a in (("twr", twr), ("twi", twi), ("kc", kc)):
            if cnp.PyArray_TYPE(a) != rdt or not cnp.PyArray_IS_C_CONTIGUOUS(a) or a.ndim != 1:
                raise ValueError(f"{name} must be a contiguous 1-D array of the plan's real dtype")
        if kc.shape[0] < K_LEN:
            raise ValueError("kc too short")
        self.n = n
        self.double = double
        self.inverse = inverse
        self.radices = radices
        self.regs16 = regs16
        self.nstages = len(radices)
        for i in range(self.nstages):
            self.radix_[i] = radices[i]
            self.stride_[i] = s
            self.toff_[i] = offsets[i]
            # a middle radix 16 has two tables: the blocked radix-4 pair's, the radix-16 one
            if offsets[i] < 0 or offsets[i] + (radices[i] - 1) * (n // (s * radices[i])) * (
                    2 if radices[i] == 16 and 0 < i < len(radices) - 1 else 1) > twr.shape[0] \
                    or twi.shape[0] != twr.shape[0]:
                raise ValueError(f"twiddle table too short for stage {i}")
            s *= radices[i]
        self.twr_ = twr
        self.kc_ = kc
        # the split stages run forward-only kernels (see _run): for an inverse plan they
        # take the forward twiddles (conjugated back; the first stage, fused when there
        # are two stages or more, keeps the inverse ones) and the forward constants
        kcf = kc.copy()
        if inverse:
            twi = twi.copy()
            twi[(self.toff_[1] if self.nstages >= 2 else 0):] *= -1
            for i in (K_SG, K_S3, K_S1, K_S2):
                kcf[i] = -kc[i]
        self.twi_ = twi
        self.kcf_ = kcf

    def execute(self, cnp.ndarray x not None, cnp.ndarray y not None):
        """Transform every length-n row of x into y (C-contiguous, plan dtype,
        same shape; y may be x). Validation is the caller's job."""
        cdef Py_ssize_t batch = cnp.PyArray_SIZE(x) // self.n
        cdef int rc
        cdef void* xp = cnp.PyArray_DATA(x)
        cdef void* yp = cnp.PyArray_DATA(y)
        cdef void* twr = cnp.PyArray_DATA(self.twr_)
        cdef void* twi = cnp.PyArray_DATA(self.twi_)
        cdef void* kc = cnp.PyArray_DATA(self.kc_)
        cdef void* kcf = cnp.PyArray_DATA(self.kcf_)
        cdef bint inv = self.inverse
        if batch == 0:
            return y
        if self.double:
            with nogil:
                rc = _run(<dptr>xp, <dptr>yp, batch, self.n, self.nstages, self.radix_,
                          self.stride_, self.toff_, <dptr>twr, <dptr>twi, <const double*>kc, <const double*>kcf, inv,
                          self.regs16)
        else:
            with nogil:
                rc = _run(<fptr>xp, <fptr>yp, batch, self.n, self.nstages, self.radix_,
                          self.stride_, self.toff_, <fptr>twr, <fptr>twi, <const float*>kc, <const float*>kcf, inv,
                          self.regs16)
        if rc != 0:
            raise MemoryError(f"fft scratch of {4 * self.n} reals")
        return y


def noop(x, y):
    """Empty Cython call with the same arity as execute (call-overhead baseline)."""
    return y
