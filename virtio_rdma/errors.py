"""Errors of the virtio-rdma package.

Every error raised by this package derives from :class:`VirtioRdmaError`.
Errors that a guest can cause carry a :class:`~virtio_rdma.constants.Status`
(a Linux errno number, see docs/virtio-rdma.md "Status codes"), so the core
can turn them into a control-queue status and guest_lib can raise them again
with the same errno.
"""
from __future__ import annotations


class VirtioRdmaError(Exception):
    """Base of every error raised by :mod:`virtio_rdma`.

    ``status`` is the :class:`~virtio_rdma.constants.Status` value (an errno)
    reported to the driver when the error ends a control command.
    """

    status: int = 22  # EINVAL

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = int(status)


class UnknownValueError(VirtioRdmaError, ValueError):
    """A number that is not a member of one of the spec's enumerations."""


class WireError(VirtioRdmaError, ValueError):
    """A wire structure that is syntactically invalid (length, reserved bits, counts)."""


class CommandError(VirtioRdmaError):
    """A well-formed control command that the device refuses (semantic error)."""


class MemoryAccessError(VirtioRdmaError):
    """An MR lookup/bounds/rights check failed (bad key, range or access)."""


class FabricError(VirtioRdmaError):
    """Fabric misuse: duplicate endpoint, QPN space exhausted, unknown endpoint."""
