"""Type stubs of accel_core._turbo_avx512: the same kernels as accel_core._turbo, built for avx512."""
from accel_core._turbo import BATCH_LANES as BATCH_LANES
from accel_core._turbo import LLR_LIMIT as LLR_LIMIT
from accel_core._turbo import decode_batch as decode_batch
from accel_core._turbo import encode_batch as encode_batch
from accel_core._turbo import segments_for as segments_for

SIMD_PATH: str
