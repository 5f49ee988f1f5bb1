# cython: infer_types=True
"""Mixed-radix Stockham FFT kernels built for baseline x86-64 (SSE2): the scalar path, runs anywhere.

The source is accel_core/_fft_impl.pxi (its docstring describes the algorithm);
setup.py compiles it once per instruction set (_fft, _fft_avx2, _fft_avx512) and
accel_core.simd picks the module the CPU runs best.
"""
#: The instruction set this module was compiled for (accel_core.simd.PATHS).
SIMD_PATH = "scalar"

include "_fft_impl.pxi"


cdef extern from *:
    """
    static int vrdma_cpu_has(const char* what) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        if (!strcmp(what, "avx2")) return __builtin_cpu_supports("avx2");
        if (!strcmp(what, "fma")) return __builtin_cpu_supports("fma");
        if (!strcmp(what, "avx512f")) return __builtin_cpu_supports("avx512f");
        if (!strcmp(what, "avx512bw")) return __builtin_cpu_supports("avx512bw");
        if (!strcmp(what, "avx512vl")) return __builtin_cpu_supports("avx512vl");
        if (!strcmp(what, "avx512dq")) return __builtin_cpu_supports("avx512dq");
    #endif
        return 0;
    }
    """
    int vrdma_cpu_has(const char* what) nogil


#: The CPU features cpu_features() asks about (what the SIMD paths need).
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")


def cpu_features():
    """The features of avx2, fma, avx512f/bw/vl/dq this CPU and OS support (gcc's CPUID + XGETBV check), as a frozenset."""
    return frozenset(f for f in _CPU_FEATURES if vrdma_cpu_has(f.encode()))


def fast_args(x, out):
    """(n << 1) | double if ``x`` and ``out`` need nothing from accel_core.dft's checks but
    the size check of n (the last axis): x an ndarray of native complex64 / complex128,
    at least 1-d and C-contiguous; ``out`` None, or an ndarray of x's dtype and shape,
    C-contiguous, writable, and x's very memory or disjoint from it. Else -1: the caller
    runs dft's own checks, which convert or raise the typed error (this only answers
    yes quickly; it names no error)."""
    cdef cnp.ndarray a, o
    cdef int t, nd, i
    cdef char* ap
    cdef char* op
    cdef Py_ssize_t nb
    if not cnp.PyArray_Check(x):
        return -1
    a = <cnp.ndarray>x
    t = cnp.PyArray_TYPE(a)
    nd = cnp.PyArray_NDIM(a)
    if (t != cnp.NPY_CFLOAT and t != cnp.NPY_CDOUBLE) or nd < 1 or not cnp.PyArray_ISNOTSWAPPED(a) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        return -1
    if out is not None:
        if not cnp.PyArray_Check(out):
            return -1
        o = <cnp.ndarray>out
        if cnp.PyArray_TYPE(o) != t or cnp.PyArray_NDIM(o) != nd or not cnp.PyArray_ISNOTSWAPPED(o) \
                or not cnp.PyArray_IS_C_CONTIGUOUS(o) or not cnp.PyArray_ISWRITEABLE(o):
            return -1
        for i in range(nd):
            if cnp.PyArray_DIM(o, i) != cnp.PyArray_DIM(a, i):
                return -1
        ap = <char*>cnp.PyArray_DATA(a)
        op = <char*>cnp.PyArray_DATA(o)
        nb = cnp.PyArray_NBYTES(a)
        if op != ap and nb > 0 and op < ap + nb and ap < op + nb:
            return -1
    return (cnp.PyArray_DIM(a, nd - 1) << 1) | (t == cnp.NPY_CDOUBLE)
