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
