"""Type stubs of accel_core._fft_avx512: the same kernel as accel_core._fft, built for avx512."""
from accel_core._fft import FFTCore as FFTCore, noop as noop

SIMD_PATH: str
FIRST_STAGE_BITS: int
