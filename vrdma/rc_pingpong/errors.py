"""Errors of vrdma.rc_pingpong.

Every error carries the line ibv_rc_pingpong prints to stderr for the same
failure (``str(e)``), and optionally a ``detail`` line printed before it, as
rc_pingpong prints a perror() line or a verbs call's own complaint first.
"""
from __future__ import annotations


class PingpongError(Exception):
    """Base of the package's errors; the command exits 1 on any of them."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail

    def lines(self) -> list[str]:
        """What to print to stderr, in order."""
        return (self.detail.split("\n") if self.detail else []) + [self.message]


class MessageFormatError(PingpongError):
    """An address message that is not ``%04x:%06x:%06x:<32 hex>`` + NUL, or a
    destination that does not fit it. Names the bad field and value."""

    def __init__(self, field: str, value):
        super().__init__(f"bad {field} in the address message: {value!r}")
        self.field = field
        self.value = value


class OobError(PingpongError):
    """The TCP exchange failed (refused, reset, short, garbage, timed out)."""


class OobTimeout(OobError):
    """The peer did not connect or answer within the timeout."""


class SetupError(PingpongError):
    """A verbs resource could not be made or the QP could not be connected."""


class CompletionError(PingpongError):
    """A failed or unexpected completion, or no completion within the timeout."""
