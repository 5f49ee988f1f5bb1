"""Type stubs of accel_core._turbo_avx2: the same kernels as accel_core._turbo, built for avx2."""
from accel_core._turbo import (
    BATCH_LANES as BATCH_LANES,
    LLR_LIMIT as LLR_LIMIT,
    LLR_SCALE as LLR_SCALE,
    MAX_SEGMENTS as MAX_SEGMENTS,
    decode_batch as decode_batch,
    encode_batch as encode_batch,
    segments_for as segments_for,
)

SIMD_PATH: str
