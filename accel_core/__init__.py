"""accel_core: software stand-ins for shared FPGA accelerators, and the service sharing them.

Kernels (Cython, GIL released, behind thin validating Python modules):

* :mod:`accel_core.dft` -- batched mixed-radix complex FFT / IFFT (LTE / NR sizes);
* :mod:`accel_core.turbo` -- LTE Turbo encoder and max-log-MAP decoder (TS 36.212 §5.1.3.2),
  with :mod:`accel_core.crc` (CRC24A/B, §5.1.1) and :mod:`accel_core.qpp` (QPP interleaver);

Service (:mod:`accel_core.service`): :class:`AcceleratorService` holding :class:`Accelerator` s,
each with a fair receive queue, a worker pool and a ready queue; :class:`Job` s
(:mod:`accel_core.jobs`) with zero-copy buffers; the calibrated :class:`ServiceTimeModel`
(:mod:`accel_core.estimate`); errors under :class:`AccelError` (:mod:`accel_core.errors`: one
class per kind of bad input, raised by the one check of each input, whether a kernel is called
directly or through a job; zero-copy buffer rules in :mod:`accel_core.buffers`).

``accel_core.fft`` / ``accel_core.ifft`` are the functions (defined in :mod:`accel_core.dft`);
no module of the package shares a name with one of its functions.
"""
from accel_core.crc import attach_crc24a, attach_crc24b, check_crc24a, check_crc24b, crc24a, crc24b
from accel_core.dft import FFTPlan, fft, ifft, is_supported, supported_sizes
from accel_core.errors import (
                            AccelError,
                            BlockSizeError,
                            DtypeError,
                            ElementError,
                            InvalidInput,
                            JobRejected,
                            JobStateError,
                            LayoutError,
                            ModelError,
                            ParameterError,
                            ParameterTypeError,
                            ServiceClosed,
                            ShapeError,
                            UnsupportedOperation,
                            UnsupportedSize,
)
from accel_core.estimate import LinearCost, ServiceTimeModel
from accel_core.jobs import Job, JobParams, JobState, Op
from accel_core.qpp import BLOCK_SIZES, qpp_interleaver, qpp_params
from accel_core.service import Accelerator, AcceleratorService, AcceleratorSpec, AcceleratorState
from accel_core.turbo import turbo_decode, turbo_encode

__all__ = [
    # kernels
   "fft", "ifft", "FFTPlan", "is_supported", "supported_sizes",
    "turbo_encode", "turbo_decode",
    "crc24a", "crc24b", "attach_crc24a", "attach_crc24b", "check_crc24a", "check_crc24b",
    "BLOCK_SIZES", "qpp_params", "qpp_interleaver",
    # service
    "AcceleratorService", "Accelerator", "AcceleratorSpec", "AcceleratorState",
    "Job", "JobParams", "JobState", "Op",
    "ServiceTimeModel", "LinearCost",
    "AccelError", "JobRejected", "UnsupportedOperation", "ServiceClosed", "JobStateError", "ModelError",
    "InvalidInput", "DtypeError", "ShapeError", "UnsupportedSize", "BlockSizeError", "ParameterError",
    "ParameterTypeError", "ElementError", "LayoutError",
]
