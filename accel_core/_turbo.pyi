"""Type stubs of the LTE turbo kernels (accel_core/_turbo.pyx)."""
import numpy as np
import numpy.typing as npt

BATCH_LANES: int
LLR_LIMIT: float
LLR_SCALE: int
MAX_SEGMENTS: int

def encode_batch(bits: npt.NDArray[np.uint8], pi: npt.NDArray[np.int32],
                 out: npt.NDArray[np.uint8]) -> None: ...
def segments_for(K: int, min_segment: int) -> int: ...
def decode_batch(llr: npt.NDArray[np.float32], pi: npt.NDArray[np.int32], iterations: int,
                 scale: float, crc_kind: int, out_bits: npt.NDArray[np.uint8],
                 out_iters: npt.NDArray[np.int32], segments: int = 1) -> None: ...

SIMD_PATH: str
