"""Errors of the ``netlab`` package: one base, each error names what failed."""
from __future__ import annotations


class NetlabError(Exception):
    """Base of every error raised by netlab."""


class CommandFailed(NetlabError):
    """An external command (ip, iptables, tshark, ...) exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr.strip()}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class AddressNotAllowed(NetlabError, ValueError):
    """A lab address outside the documentation ranges (RFC 5737)."""

    def __init__(self, addr: str) -> None:
        super().__init__(f"lab address {addr} is not in 192.0.2.0/24, 198.51.100.0/24 "
                         "or 203.0.113.0/24")
        self.addr = addr


class ProcessFailed(NetlabError):
    """A helper process died or did not report ready in time."""

    def __init__(self, what: str, argv: list[str], detail: str) -> None:
        super().__init__(f"{what}: {' '.join(argv)!r}: {detail}")
        self.argv = argv
        self.detail = detail


class IptablesUnavailable(NetlabError):
    """No iptables backend accepts the rule inside the namespace."""
