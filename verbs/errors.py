"""Errors of the :mod:`verbs` package.

One base, :class:`VerbsNumberError` (not guest_lib.VerbsError, the guests'
verbs API error). A number that is not a member of a verbs or
IBTA enumeration (an untrusted WQE opcode, access mask, QP state, RNR timer
code...) raises :class:`UnknownValueError`, naming the bad value; it is a
``ValueError`` too, and carries ``status`` EINVAL, the errno a device reports
for it (``virtio_rdma.errors.VirtioRdmaError`` has the same attribute).
"""
from __future__ import annotations

import errno


class VerbsNumberError(Exception):
    """Base of every error raised by :mod:`verbs`."""

    #: errno reported when the error ends a command (pyverbs' PyverbsRDMAError carries one too)
    status: int = errno.EINVAL


class UnknownValueError(VerbsNumberError, ValueError):
    """A number that is not a member of one of the verbs/IBTA enumerations."""
