"""Type stubs of the mixed-radix Stockham FFT kernel (accel_core/_fft.pyx).

Plans are built and cached by :mod:`accel_core.dft`; ``FFTCore.execute`` trusts
that its arrays were validated there (C-contiguous, the plan's dtype, same shape).
"""
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

_Y = TypeVar("_Y")

@disjoint_base
class FFTCore:
    """One planned transform: size, precision, direction, stage schedule, twiddles."""

    @property
    def n(self) -> int: ...
    @property
    def double(self) -> bool: ...
    @property
    def inverse(self) -> bool: ...
    @property
    def radices(self) -> tuple[int, ...]: ...
    @property
    def regs16(self) -> bool: ...
    def __init__(self, n: int, double: bool, inverse: bool, radices: Iterable[int],
                 twr: npt.NDArray[np.floating], twi: npt.NDArray[np.floating],
                 kc: npt.NDArray[np.floating], offsets: Iterable[int], regs16: bool = True) -> None: ...
    def execute(self, x: npt.NDArray[np.complexfloating],
                y: npt.NDArray[np.complexfloating]) -> npt.NDArray[np.complexfloating]: ...

def noop(x: object, y: _Y) -> _Y: ...

SIMD_PATH: str
#: vector width in bits of the first radix-4 / radix-8 stage's explicit loops (0: Cython loop)
FIRST_STAGE_BITS: int

def cpu_features() -> frozenset[str]: ...
def fast_args(x: object, out: object) -> int: ...
