"""Errors of accel_core: one base for the package, one class per kind of bad input.

Every error accel_core raises on purpose is an :class:`AccelError`::

    AccelError
    +-- JobRejected (ValueError)        a request was refused; the message names the bad value
    |   +-- UnsupportedOperation        unknown operation, or the accelerator does not serve it
    |   +-- InvalidInput                bad input to a kernel call or a job (.argument, .value)
    |       +-- DtypeError (TypeError)  wrong Python type or array dtype
    |       +-- ShapeError              wrong number of axes or shape, or a shape mismatch
    |       +-- UnsupportedSize         FFT size that is not 2**a * 3**b * 5**c in 1..65536
    |       |   +-- BlockSizeError      Turbo K that is not a size of TS 36.212 Table 5.1.3-3
    |       +-- ParameterError          scalar parameter out of its range or set
    |       |   +-- ParameterTypeError (TypeError)   ... or of the wrong type
    |       +-- ElementError            an element out of its domain (a bit not 0/1, an LLR not finite)
    |       +-- LayoutError             buffer layout: contiguity, alignment, read-only, byte size,
    |                                   overlap with the input, empty
    +-- ServiceClosed                   submit() on a closing or closed accelerator or service
    +-- JobStateError                   illegal job state transition (a bug)
    +-- ModelError                      the service-time model cannot estimate, or a saved model is bad

Each input check is written once, in the module that owns the concept (FFT sizes
and dtypes in :mod:`accel_core.dft`, block sizes K in :mod:`accel_core.qpp`, bits
in :mod:`accel_core.crc`, LLRs and decoder parameters in :mod:`accel_core.turbo`,
zero-copy buffers in :mod:`accel_core.buffers`); direct kernel calls and
:meth:`accel_core.jobs.Job.create` both go through it. Because every
:class:`InvalidInput` is a :class:`JobRejected`, the service refuses a bad job at
``submit()`` with the very error a direct call would raise, and counts it.
Wrong-type errors are also ``TypeError`` and all others ``ValueError``, as the
kernels raised before these classes existed. (The compiled kernels ``_fft``,
``_turbo`` and ``_crc`` keep plain ``ValueError`` for their own memory-safety
checks of shapes and permutations; only a direct call of those private modules
can reach them.)

A job that was accepted but whose kernel raised is *not* reported at submit: it
ends in state FAILED and its future carries the kernel's exception (element
values, such as 0/1 bits and finite LLRs, are checked when the job runs, since
guest memory may change until then).
"""
from __future__ import annotations

__all__ = [
    "AccelError", "JobRejected", "UnsupportedOperation", "InvalidInput", "DtypeError", "ShapeError",
    "UnsupportedSize", "BlockSizeError", "ParameterError", "ParameterTypeError", "ElementError",
    "LayoutError", "ServiceClosed", "JobStateError", "ModelError",
]


class AccelError(Exception):
    """Base of every error raised by accel_core."""


class JobRejected(AccelError, ValueError):
    """A request was refused (a job at submit, or a direct kernel call); the message says which value."""


class UnsupportedOperation(JobRejected):
    """The operation is unknown, or the chosen accelerator does not serve it."""


class InvalidInput(JobRejected):
    """Bad input to a kernel or a job.

    ``argument`` names the input ("llr", "iterations", "fft input", ...) and
    ``value`` holds the bad value (a dtype, a shape, a size, a parameter, an
    element), when there is one.
    """

    def __init__(self, message: str, *, argument: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.value = value


class DtypeError(InvalidInput, TypeError):
    """An input has the wrong Python type or array dtype."""


class ShapeError(InvalidInput):
    """An input has the wrong number of axes or shape, or does not match a shape parameter."""


class UnsupportedSize(InvalidInput):
    """An FFT size the kernel cannot plan (not 2**a * 3**b * 5**c in 1..65536)."""


class BlockSizeError(UnsupportedSize):
    """A Turbo block size K that is not one of the 188 sizes of TS 36.212 Table 5.1.3-3."""


class ParameterError(InvalidInput):
    """A scalar parameter is outside its range or set (iterations, scaling, early_stop, n, k, batch...)."""


class ParameterTypeError(ParameterError, TypeError):
    """A scalar parameter has the wrong type (e.g. ``iterations=2.0`` or ``True``)."""


class ElementError(InvalidInput):
    """An element is outside its domain: a bit that is not 0 or 1, an LLR that is not finite."""


class LayoutError(InvalidInput):
    """A buffer cannot be used as it lies: not contiguous, misaligned, read-only, wrong byte size,
    overlapping the input, or empty."""


class ServiceClosed(AccelError):
    """submit() on an accelerator or service that is closing or closed."""


class JobStateError(AccelError):
    """An illegal job state transition (a bug in the caller or the service)."""


class ModelError(AccelError):
    """The service-time model cannot estimate a job, or a saved model is invalid."""
