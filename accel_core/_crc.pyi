"""Type stubs of the CRC24 kernel (accel_core/_crc.pyx)."""
import numpy as np
import numpy.typing as npt

CRC24A_ID: int
CRC24B_ID: int

def crc24_rows(bits: npt.NDArray[np.uint8], which: int, out: npt.NDArray[np.uint32]) -> None: ...
