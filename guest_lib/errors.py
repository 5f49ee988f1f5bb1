"""Errors of guest_lib, shaped like pyverbs'.

:class:`RDMAError` is a failure the device reported (it carries the errno the
device returned, like ``PyverbsRDMAError``); :class:`UserError` is a misuse
caught before anything reached the device (like ``PyverbsUserError``).

When the back-end daemon is gone (it exited, was killed, or broke the
vhost-user connection), every call on the Context and its objects that needs
the device raises :class:`RDMAError` with errno ``ENOTCONN``, within
milliseconds of the death for a call that is waiting (``guest_lib.context``).
"""
from __future__ import annotations

import errno as _errno
import os


class VerbsError(Exception):
    """Base of every guest_lib error."""


class RDMAError(VerbsError):
    def __init__(self, msg: str, error_code: int = _errno.EIO):
        super().__init__(f"{msg}. Errno: {error_code}, {os.strerror(error_code)}")
        self.error_code = error_code

    @property
    def errno(self) -> int:
        return self.error_code


class UserError(VerbsError):
    """Invalid arguments or use of a closed object."""


# pyverbs spellings, for code written against pyverbs
PyverbsError = VerbsError
PyverbsRDMAError = RDMAError
PyverbsUserError = UserError
