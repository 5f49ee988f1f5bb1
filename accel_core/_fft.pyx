# cython: infer_types=True
"""Mixed-radix (2, 3, 4, 5, 8) Stockham autosort FFT kernels.

Algorithm: iterative decimation-in-frequency Stockham (Van Loan, "Computational
Frameworks for the FFT", §1.7 / Stockham 1966). A size-n transform is split into
stages with radices r_0, r_1, ... whose product is n. Stage i has a stride
``s = r_0 * ... * r_{i-1}`` and ``m = n / (s * r_i)`` butterflies per stride
element; it reads ``x[q + s*(p + j*m)]`` for j < r, computes a radix-r DFT and
writes ``y[q + s*(r*p + k)] = c_k * exp(-+2*pi*i*k*p/(r*m))``. Ping-ponging two
buffers, the result comes out in natural order (no bit reversal).

Data layout: every row is first split into separate real / imaginary arrays
(so butterflies are plain float arithmetic that gcc vectorises without
shuffles), transformed, then interleaved back into the complex output (the
1/n scale of the inverse transform is folded into that last pass).

Kernels are ``noexcept nogil`` on ``__restrict__`` pointers, fused over float
and double; the batch loop runs entirely without the GIL. Two loop orders per
radix: for the first stage (s == 1) the vector loop runs over p (contiguous
loads, interleaving stores); for the others it runs over q with the twiddles
hoisted. Validation, dtype/shape checks, allocation and plan caching live in
:mod:`accel_core.fft`; this module trusts its caller.
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

cdef enum:
    MAX_STAGES = 40

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


# ---------------------------------------------------------------- butterflies
# Each butterfly reads r inputs x[j*xs], writes r outputs y[k*ys], multiplying
# output k > 0 by twiddle w[(k-1)*ws] when ``tw`` is true. Callers pass
# literal ``tw``/``ys`` so the inlined copies specialise.

cdef inline void _bf2(rptr yr, rptr yi, Py_ssize_t ys, rptr xr, rptr xi, Py_ssize_t xs,
                      rptr wr, rptr wi, Py_ssize_t ws, bint tw, rptr kc) noexcept nogil:
    a0r = xr[0]; a0i = xi[0]
    a1r = xr[xs]; a1i = xi[xs]
    yr[0] = a0r + a1r; yi[0] = a0i + a1i
    c1r = a0r - a1r; c1i = a0i - a1i
    if tw:
        w1r = wr[0]; w1i = wi[0]
        yr[ys] = c1r * w1r - c1i * w1i; yi[ys] = c1r * w1i + c1i * w1r
    else:
        yr[ys] = c1r; yi[ys] = c1i


cdef inline void _bf3(rptr yr, rptr yi, Py_ssize_t ys, rptr xr, rptr xi, Py_ssize_t xs,
                      rptr wr, rptr wi, Py_ssize_t ws, bint tw, rptr kc) noexcept nogil:
    half = kc[K_HALF]; s3 = kc[K_S3]
    a0r = xr[0]; a0i = xi[0]
    a1r = xr[xs]; a1i = xi[xs]
    a2r = xr[2 * xs]; a2i = xi[2 * xs]
    tr = a1r + a2r; ti = a1i + a2i
    ur = a0r - half * tr; ui = a0i - half * ti
    # v = (a1 - a2) * (-i * sg * sqrt(3)/2)
    vr = s3 * (a1i - a2i); vi = s3 * (a2r - a1r)
    yr[0] = a0r + tr; yi[0] = a0i + ti
    c1r = ur + vr; c1i = ui + vi
    c2r = ur - vr; c2i = ui - vi
    if tw:
        w1r = wr[0]; w1i = wi[0]
        w2r = wr[ws]; w2i = wi[ws]
        yr[ys] = c1r * w1r - c1i * w1i; yi[ys] = c1r * w1i + c1i * w1r
        yr[2 * ys] = c2r * w2r - c2i * w2i; yi[2 * ys] = c2r * w2i + c2i * w2r
    else:
        yr[ys] = c1r; yi[ys] = c1i
        yr[2 * ys] = c2r; yi[2 * ys] = c2i


cdef inline void _bf4(rptr yr, rptr yi, Py_ssize_t ys, rptr xr, rptr xi, Py_ssize_t xs,
                      rptr wr, rptr wi, Py_ssize_t ws, bint tw, rptr kc) noexcept nogil:
    sg = kc[K_SG]
    a0r = xr[0]; a0i = xi[0]
    a1r = xr[xs]; a1i = xi[xs]
    a2r = xr[2 * xs]; a2i = xi[2 * xs]
    a3r = xr[3 * xs]; a3i = xi[3 * xs]
    t0r = a0r + a2r; t0i = a0i + a2i
    t1r = a0r - a2r; t1i = a0i - a2i
    t2r = a1r + a3r; t2i = a1i + a3i
    # t3 = (a1 - a3) * (-i * sg)
    t3r = sg * (a1i - a3i); t3i = sg * (a3r - a1r)
    yr[0] = t0r + t2r; yi[0] = t0i + t2i
    c1r = t1r + t3r; c1i = t1i + t3i
    c2r = t0r - t2r; c2i = t0i - t2i
    c3r = t1r - t3r; c3i = t1i - t3i
    if tw:
        w1r = wr[0]; w1i = wi[0]
        w2r = wr[ws]; w2i = wi[ws]
        w3r = wr[2 * ws]; w3i = wi[2 * ws]
        yr[ys] = c1r * w1r - c1i * w1i; yi[ys] = c1r * w1i + c1i * w1r
        yr[2 * ys] = c2r * w2r - c2i * w2i; yi[2 * ys] = c2r * w2i + c2i * w2r
        yr[3 * ys] = c3r * w3r - c3i * w3i; yi[3 * ys] = c3r * w3i + c3i * w3r
    else:
        yr[ys] = c1r; yi[ys] = c1i
        yr[2 * ys] = c2r; yi[2 * ys] = c2i
        yr[3 * ys] = c3r; yi[3 * ys] = c3i


cdef inline void _bf5(rptr yr, rptr yi, Py_ssize_t ys, rptr xr, rptr xi, Py_ssize_t xs,
                      rptr wr, rptr wi, Py_ssize_t ws, bint tw, rptr kc) noexcept nogil:
    c1 = kc[K_C1]; c2 = kc[K_C2]; s1 = kc[K_S1]; s2 = kc[K_S2]
    a0r = xr[0]; a0i = xi[0]
    a1r = xr[xs]; a1i = xi[xs]
    a2r = xr[2 * xs]; a2i = xi[2 * xs]
    a3r = xr[3 * xs]; a3i = xi[3 * xs]
    a4r = xr[4 * xs]; a4i = xi[4 * xs]
    p1r = a1r + a4r; p1i = a1i + a4i
    m1r = a1r - a4r; m1i = a1i - a4i
    p2r = a2r + a3r; p2i = a2i + a3i
    m2r = a2r - a3r; m2i = a2i - a3i
    yr[0] = a0r + p1r + p2r; yi[0] = a0i + p1i + p2i
    # c1,c4 = A +- B; c2,c3 = A' +- B' with B = -i*(s1*m1 + s2*m2), B' = -i*(s2*m1 - s1*m2)
    ar_ = a0r + c1 * p1r + c2 * p2r; ai_ = a0i + c1 * p1i + c2 * p2i
    br_ = s1 * m1i + s2 * m2i; bi_ = -(s1 * m1r + s2 * m2r)
    er_ = a0r + c2 * p1r + c1 * p2r; ei_ = a0i + c2 * p1i + c1 * p2i
    fr_ = s2 * m1i - s1 * m2i; fi_ = s1 * m2r - s2 * m1r
    o1r = ar_ + br_; o1i = ai_ + bi_
    o4r = ar_ - br_; o4i = ai_ - bi_
    o2r = er_ + fr_; o2i = ei_ + fi_
    o3r = er_ - fr_; o3i = ei_ - fi_
    if tw:
        w1r = wr[0]; w1i = wi[0]
        w2r = wr[ws]; w2i = wi[ws]
        w3r = wr[2 * ws]; w3i = wi[2 * ws]
        w4r = wr[3 * ws]; w4i = wi[3 * ws]
        yr[ys] = o1r * w1r - o1i * w1i; yi[ys] = o1r * w1i + o1i * w1r
        yr[2 * ys] = o2r * w2r - o2i * w2i; yi[2 * ys] = o2r * w2i + o2i * w2r
        yr[3 * ys] = o3r * w3r - o3i * w3i; yi[3 * ys] = o3r * w3i + o3i * w3r
        yr[4 * ys] = o4r * w4r - o4i * w4i; yi[4 * ys] = o4r * w4i + o4i * w4r
    else:
        yr[ys] = o1r; yi[ys] = o1i
        yr[2 * ys] = o2r; yi[2 * ys] = o2i
        yr[3 * ys] = o3r; yi[3 * ys] = o3i
        yr[4 * ys] = o4r; yi[4 * ys] = o4i


cdef inline void _bf8(rptr yr, rptr yi, Py_ssize_t ys, rptr xr, rptr xi, Py_ssize_t xs,
                      rptr wr, rptr wi, Py_ssize_t ws, bint tw, rptr kc) noexcept nogil:
    sg = kc[K_SG]; h = kc[K_H]
    a0r = xr[0]; a0i = xi[0]
    a1r = xr[xs]; a1i = xi[xs]
    a2r = xr[2 * xs]; a2i = xi[2 * xs]
    a3r = xr[3 * xs]; a3i = xi[3 * xs]
    a4r = xr[4 * xs]; a4i = xi[4 * xs]
    a5r = xr[5 * xs]; a5i = xi[5 * xs]
    a6r = xr[6 * xs]; a6i = xi[6 * xs]
    a7r = xr[7 * xs]; a7i = xi[7 * xs]
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
    yr[0] = e0r + o0r; yi[0] = e0i + o0i
    c1r = e1r + o1r; c1i = e1i + o1i
    c2r = e2r + o2r; c2i = e2i + o2i
    c3r = e3r + o3r; c3i = e3i + o3i
    c4r = e0r - o0r; c4i = e0i - o0i
    c5r = e1r - o1r; c5i = e1i - o1i
    c6r = e2r - o2r; c6i = e2i - o2i
    c7r = e3r - o3r; c7i = e3i - o3i
    if tw:
        w1r = wr[0]; w1i = wi[0]
        w2r = wr[ws]; w2i = wi[ws]
        w3r = wr[2 * ws]; w3i = wi[2 * ws]
        w4r = wr[3 * ws]; w4i = wi[3 * ws]
        w5r = wr[4 * ws]; w5i = wi[4 * ws]
        w6r = wr[5 * ws]; w6i = wi[5 * ws]
        w7r = wr[6 * ws]; w7i = wi[6 * ws]
        yr[ys] = c1r * w1r - c1i * w1i; yi[ys] = c1r * w1i + c1i * w1r
        yr[2 * ys] = c2r * w2r - c2i * w2i; yi[2 * ys] = c2r * w2i + c2i * w2r
        yr[3 * ys] = c3r * w3r - c3i * w3i; yi[3 * ys] = c3r * w3i + c3i * w3r
        yr[4 * ys] = c4r * w4r - c4i * w4i; yi[4 * ys] = c4r * w4i + c4i * w4r
        yr[5 * ys] = c5r * w5r - c5i * w5i; yi[5 * ys] = c5r * w5i + c5i * w5r
        yr[6 * ys] = c6r * w6r - c6i * w6i; yi[6 * ys] = c6r * w6i + c6i * w6r
        yr[7 * ys] = c7r * w7r - c7i * w7i; yi[7 * ys] = c7r * w7i + c7i * w7r
    else:
        yr[ys] = c1r; yi[ys] = c1i
        yr[2 * ys] = c2r; yi[2 * ys] = c2i
        yr[3 * ys] = c3r; yi[3 * ys] = c3i
        yr[4 * ys] = c4r; yi[4 * ys] = c4i
        yr[5 * ys] = c5r; yi[5 * ys] = c5i
        yr[6 * ys] = c6r; yi[6 * ys] = c6i
        yr[7 * ys] = c7r; yi[7 * ys] = c7i


# ---------------------------------------------------------------- stages
# One function per radix; three loop orders (see the module docstring).
# The tw/ys arguments are literals so each inlined copy is specialised.

cdef void _stage2(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, rptr kc) noexcept nogil:
    cdef Py_ssize_t p, q, sm = s * m
    if m == 1:
        for q in range(s):
            _bf2(yr + q, yi + q, s, xr + q, xi + q, s, wr, wi, 0, 0, kc)
    elif s == 1:
        for p in range(m):
            _bf2(yr + 2 * p, yi + 2 * p, 1, xr + p, xi + p, m, wr + p, wi + p, m, 1, kc)
    else:
        for p in range(m):
            for q in range(s):
                _bf2(yr + q + 2 * s * p, yi + q + 2 * s * p, s, xr + q + s * p, xi + q + s * p, sm,
                     wr + p, wi + p, m, 1, kc)


cdef void _stage3(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, rptr kc) noexcept nogil:
    cdef Py_ssize_t p, q, sm = s * m
    if m == 1:
        for q in range(s):
            _bf3(yr + q, yi + q, s, xr + q, xi + q, s, wr, wi, 0, 0, kc)
    elif s == 1:
        for p in range(m):
            _bf3(yr + 3 * p, yi + 3 * p, 1, xr + p, xi + p, m, wr + p, wi + p, m, 1, kc)
    else:
        for p in range(m):
            for q in range(s):
                _bf3(yr + q + 3 * s * p, yi + q + 3 * s * p, s, xr + q + s * p, xi + q + s * p, sm,
                     wr + p, wi + p, m, 1, kc)


cdef void _stage4(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, rptr kc) noexcept nogil:
    cdef Py_ssize_t p, q, sm = s * m
    if m == 1:
        for q in range(s):
            _bf4(yr + q, yi + q, s, xr + q, xi + q, s, wr, wi, 0, 0, kc)
    elif s == 1:
        for p in range(m):
            _bf4(yr + 4 * p, yi + 4 * p, 1, xr + p, xi + p, m, wr + p, wi + p, m, 1, kc)
    else:
        for p in range(m):
            for q in range(s):
                _bf4(yr + q + 4 * s * p, yi + q + 4 * s * p, s, xr + q + s * p, xi + q + s * p, sm,
                     wr + p, wi + p, m, 1, kc)


cdef void _stage5(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, rptr kc) noexcept nogil:
    cdef Py_ssize_t p, q, sm = s * m
    if m == 1:
        for q in range(s):
            _bf5(yr + q, yi + q, s, xr + q, xi + q, s, wr, wi, 0, 0, kc)
    elif s == 1:
        for p in range(m):
            _bf5(yr + 5 * p, yi + 5 * p, 1, xr + p, xi + p, m, wr + p, wi + p, m, 1, kc)
    else:
        for p in range(m):
            for q in range(s):
                _bf5(yr + q + 5 * s * p, yi + q + 5 * s * p, s, xr + q + s * p, xi + q + s * p, sm,
                     wr + p, wi + p, m, 1, kc)


cdef void _stage8(rptr yr, rptr yi, rptr xr, rptr xi, Py_ssize_t s, Py_ssize_t m,
                  rptr wr, rptr wi, rptr kc) noexcept nogil:
    cdef Py_ssize_t p, q, sm = s * m
    if m == 1:
        for q in range(s):
            _bf8(yr + q, yi + q, s, xr + q, xi + q, s, wr, wi, 0, 0, kc)
    elif s == 1:
        for p in range(m):
            _bf8(yr + 8 * p, yi + 8 * p, 1, xr + p, xi + p, m, wr + p, wi + p, m, 1, kc)
    else:
        for p in range(m):
            for q in range(s):
                _bf8(yr + q + 8 * s * p, yi + q + 8 * s * p, s, xr + q + s * p, xi + q + s * p, sm,
                     wr + p, wi + p, m, 1, kc)


cdef void _split(rptr dr, rptr di, rptr src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dr[i] = src[2 * i]
        di[i] = src[2 * i + 1]


cdef void _join(rptr dst, rptr sr, rptr si, Py_ssize_t n, rptr kc) noexcept nogil:
    cdef Py_ssize_t i
    scale = kc[K_SCALE]
    if scale == 1:
        for i in range(n):
            dst[2 * i] = sr[i]
            dst[2 * i + 1] = si[i]
    else:
        for i in range(n):
            dst[2 * i] = sr[i] * scale
            dst[2 * i + 1] = si[i] * scale


cdef int _run(rptr x, rptr y, Py_ssize_t batch, Py_ssize_t n, int nstages,
              const int* radix, const Py_ssize_t* stride, const Py_ssize_t* toff,
              rptr twr, rptr twi, rptr kc) noexcept nogil:
    """Transform ``batch`` rows of n interleaved complex values x -> y.

    x and y are either disjoint or identical (in-place); each row is fully
    read into scratch before its output is written. Returns -1 if the scratch
    allocation fails, else 0.
    """
    cdef Py_ssize_t b, s, m
    cdef int i, r
    # Two split (re, im) ping-pong buffers. The pointers are derived from the
    # allocation below; malloc returns memory suitably aligned for double.
    cdef void* mem = malloc(4 * n * sizeof(kc[0]) + 64)
    if mem == NULL:
        return -1
    ar = <rptr>mem
    ai = ar + n
    br = ai + n
    bi = br + n
    for b in range(batch):
        _split(ar, ai, x + 2 * n * b, n)
        for i in range(nstages):
            r = radix[i]
            s = stride[i]
            m = n // (s * r)
            if r == 8:
                _stage8(br, bi, ar, ai, s, m, twr + toff[i], twi + toff[i], kc)
            elif r == 4:
                _stage4(br, bi, ar, ai, s, m, twr + toff[i], twi + toff[i], kc)
            elif r == 2:
                _stage2(br, bi, ar, ai, s, m, twr + toff[i], twi + toff[i], kc)
            elif r == 3:
                _stage3(br, bi, ar, ai, s, m, twr + toff[i], twi + toff[i], kc)
            else:
                _stage5(br, bi, ar, ai, s, m, twr + toff[i], twi + toff[i], kc)
            # swap ping-pong buffers
            ar, br = br, ar
            ai, bi = bi, ai
        _join(y + 2 * n * b, ar, ai, n, kc)
    free(mem)
    return 0


cdef class FFTCore:
    """One planned transform: size, precision, direction, stage schedule, twiddles.

    Built by :mod:`accel_core.fft` (which computes the schedule and twiddles
    and caches instances); ``execute`` trusts that its arrays were validated.
    """
    cdef readonly Py_ssize_t n
    cdef readonly bint double
    cdef readonly bint inverse
    cdef readonly tuple radices
    cdef int nstages
    cdef int radix_[MAX_STAGES]
    cdef Py_ssize_t stride_[MAX_STAGES]
    cdef Py_ssize_t toff_[MAX_STAGES]
    cdef cnp.ndarray twr_
    cdef cnp.ndarray twi_
    cdef cnp.ndarray kc_

    def __init__(self, Py_ssize_t n, bint double, bint inverse, radices,
                 cnp.ndarray twr not None, cnp.ndarray twi not None,
                 cnp.ndarray kc not None, offsets):
        cdef Py_ssize_t s = 1, prod = 1
        cdef int i
        radices = tuple(int(r) for r in radices)
        offsets = tuple(int(o) for o in offsets)
        if len(radices) > MAX_STAGES or len(offsets) != len(radices):
            raise ValueError(f"bad stage schedule {radices!r} / {offsets!r}")
        for r in radices:
            if r not in (2, 3, 4, 5, 8):
                raise ValueError(f"unsupported radix {r}")
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
        self.nstages = len(radices)
        for i in range(self.nstages):
            self.radix_[i] = radices[i]
            self.stride_[i] = s
            self.toff_[i] = offsets[i]
            if offsets[i] < 0 or offsets[i] + (radices[i] - 1) * (n // (s * radices[i])) > twr.shape[0] \
                    or twi.shape[0] != twr.shape[0]:
                raise ValueError(f"twiddle table too short for stage {i}")
            s *= radices[i]
        self.twr_ = twr
        self.twi_ = twi
        self.kc_ = kc

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
        if batch == 0:
            return y
        if self.double:
            with nogil:
                rc = _run(<dptr>xp, <dptr>yp, batch, self.n, self.nstages, self.radix_,
                          self.stride_, self.toff_, <dptr>twr, <dptr>twi, <dptr>kc)
        else:
            with nogil:
                rc = _run(<fptr>xp, <fptr>yp, batch, self.n, self.nstages, self.radix_,
                          self.stride_, self.toff_, <fptr>twr, <fptr>twi, <fptr>kc)
        if rc != 0:
            raise MemoryError(f"fft scratch of {4 * self.n} reals")
        return y


def noop(x, y):
    """Empty Cython call with the same arity as execute (call-overhead baseline)."""
    return y
