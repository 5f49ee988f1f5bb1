"""Type stubs of accel_core._fft_avx2: the same kernel as accel_core._fft, built for avx2."""
from accel_core._fft import FFTCore as FFTCore, noop as noop

SIMD_PATH: str
FIRST_STAGE_BITS: int
