"""Errors of the vhost_user package.

One base, :class:`VhostUserError`. Each error says whether the connection it
happened on can go on (:meth:`should_reconnect` is the front-end's view: a
transport failure can be retried on a new connection; a protocol violation
by the peer cannot be fixed by reconnecting with the same peer software).
"""
from __future__ import annotations

import errno as _errno


class VhostUserError(Exception):
    """Base of every vhost_user error."""

    errno: int = _errno.EPROTO

    def should_reconnect(self) -> bool:
        return False


class MessageError(VhostUserError):
    """A message is malformed: bad header, size, payload or fd count."""

    errno = _errno.EBADMSG


class ProtocolError(VhostUserError):
    """A well-formed message arrived in a state where it is not allowed, or
    names something that does not exist (ring index, memory region...)."""

    errno = _errno.EPROTO


class DeviceError(VhostUserError):
    """The device refused a request (bad config write, unsupported status)."""

    errno = _errno.EINVAL


class TransportError(VhostUserError):
    """The socket failed or the peer went away."""

    def __init__(self, message: str, errno: int = _errno.EPIPE):
        super().__init__(message)
        self.errno = errno

    def should_reconnect(self) -> bool:
        return True


class ReplyError(VhostUserError):
    """The back-end answered a request with a failure (REPLY_ACK non-zero)."""

    def __init__(self, request: str, code: int):
        super().__init__(f"back-end failed {request} with status {code}")
        self.request = request
        self.code = code
