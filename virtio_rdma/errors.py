"""Errors of the virtio-rdma package.

Every error raised by this package derives from :class:`VirtioRdmaError`.
Errors that a guest can cause carry a :class:`~virtio_rdma.constants.Status`
(a Linux errno number, see docs/virtio-rdma.md "Status codes"), so the core
can turn them into a control-queue status and guest_lib can raise them again
with the same errno.

A number that is not a member of an enumeration (a verbs number or one of
the device ABI) raises :class:`verbs.UnknownValueError`, re-exported here as
:class:`UnknownValueError` (the same class; a ``ValueError`` with ``status``
EINVAL, but not a :class:`VirtioRdmaError`: code that turns malformed guest
input into a status catches both).
"""
from __future__ import annotations

from verbs.errors import UnknownValueError


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


class WireError(VirtioRdmaError, ValueError):
    """A wire structure that is syntactically invalid (length, reserved bits, counts)."""


class CommandError(VirtioRdmaError):
    """A well-formed control command that the device refuses (semantic error)."""


class MemoryAccessError(VirtioRdmaError):
    """An MR lookup/bounds/rights check failed (bad key, range or access)."""


class FabricError(VirtioRdmaError):
    """Fabric misuse: duplicate endpoint, QPN space exhausted, unknown endpoint."""

__all__ = ["VirtioRdmaError", "UnknownValueError", "WireError", "CommandError", "MemoryAccessError",
           "FabricError"]
