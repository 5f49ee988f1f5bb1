"""Errors of the accelerator service (one base for the package's service layer).

``AccelError`` is the base. A job that is malformed (unsupported operation,
wrong buffer size, dtype, layout or parameter) is refused at ``submit()`` with
``JobRejected`` (also a ``ValueError``, so callers that treat bad input as a
value error keep working); the message names the bad value. A job that was
accepted but whose kernel raised is *not* reported with an exception at submit:
it ends in state FAILED and its future carries the kernel's own exception.

The kernel modules (:mod:`accel_core.fft`, :mod:`accel_core.turbo`) raise plain
``ValueError``/``TypeError`` for bad arrays; the service converts those into
``JobRejected`` when it validates a job up front.
"""
from __future__ import annotations


class AccelError(Exception):
    """Base of every error raised by the accelerator service layer."""


class JobRejected(AccelError, ValueError):
    """A job was refused at submit; the message says which value is wrong."""


class UnsupportedOperation(JobRejected):
    """The operation is unknown, or the chosen accelerator does not serve it."""


class ServiceClosed(AccelError):
    """submit() on an accelerator or service that is closing or closed."""


class JobStateError(AccelError):
    """An illegal job state transition (a bug in the caller or the service)."""


class ModelError(AccelError):
    """The service-time model cannot estimate a job, or a saved model is invalid."""
