# cython: infer_types=True
"""Mixed-radix Stockham FFT kernels built for AVX-512 F/BW/VL/DQ (512-bit vectors).

The source is accel_core/_fft_impl.pxi (its docstring describes the algorithm);
setup.py compiles it once per instruction set (_fft, _fft_avx2, _fft_avx512) and
accel_core.simd picks the module the CPU runs best.
"""
#: The instruction set this module was compiled for (accel_core.simd.PATHS).
SIMD_PATH = "avx512"

include "_fft_impl.pxi"
