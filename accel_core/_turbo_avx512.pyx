"""LTE turbo kernels (16-bit fixed-point max-log-MAP) built for AVX-512 F/BW/VL/DQ (512-bit vectors).

The source is accel_core/_turbo_impl.pxi (its docstring describes the decoder);
setup.py compiles it once per instruction set (_turbo, _turbo_avx2, _turbo_avx512)
and accel_core.simd picks the module the CPU runs best.
"""
#: The instruction set this module was compiled for (accel_core.simd.PATHS).
SIMD_PATH = "avx512"

include "_turbo_impl.pxi"
