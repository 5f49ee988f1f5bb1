"""Errors of the ``roce`` package.

One base, :class:`RoceError`. Syntax problems of a received datagram are
:class:`MalformedPacket` subclasses (the receive path drops the packet and
counts it); semantic problems found by the RC transport carry the NAK code the
responder must answer with (IBTA 9.7.5.2.8, rxe ``enum aeth_syndrome``).
Every error names the offending value.
"""
from __future__ import annotations


class RoceError(Exception):
    """Base of every error raised by the roce package."""


# --------------------------------------------------------------- codec errors
class MalformedPacket(RoceError):
    """A datagram that is not a syntactically valid RoCEv2 packet.

    ``field`` names what was wrong and ``value`` carries the bad value.
    """

    def __init__(self, msg: str, *, field: str = "", value: object = None) -> None:
        super().__init__(msg)
        self.field = field
        self.value = value


class UnknownOpcode(MalformedPacket):
    def __init__(self, opcode: int) -> None:
        super().__init__(f"unknown BTH opcode 0x{opcode:02x}", field="opcode", value=opcode)
        self.opcode = opcode


class TruncatedPacket(MalformedPacket):
    def __init__(self, what: str, have: int, need: int) -> None:
        super().__init__(f"{what}: {have} bytes, need at least {need}", field="length", value=have)
        self.have = have
        self.need = need


class BadPadCount(MalformedPacket):
    def __init__(self, pad_count: int, payload_len: int) -> None:
        super().__init__(
            f"BTH PadCnt {pad_count} invalid for {payload_len} bytes of payload+pad",
            field="pad_count", value=pad_count,
        )


class BadTransportVersion(MalformedPacket):
    def __init__(self, tver: int) -> None:
        super().__init__(f"BTH TVer {tver} is not 0", field="tver", value=tver)


class UnexpectedPayload(MalformedPacket):
    def __init__(self, opcode: int, length: int) -> None:
        super().__init__(
            f"opcode 0x{opcode:02x} carries no payload but {length} bytes follow the headers",
            field="payload", value=length,
        )


class IcrcMismatch(MalformedPacket):
    def __init__(self, received: int, expected: int | None) -> None:
        exp = "no IPv4 ID makes it valid" if expected is None else f"expected 0x{expected:08x}"
        super().__init__(f"ICRC 0x{received:08x} invalid ({exp})", field="icrc", value=received)
        self.received = received
        self.expected = expected


class BadIpHeader(MalformedPacket):
    """The IP/UDP context given for the ICRC is not a plain IPv4/IPv6 + UDP header."""


class FieldRange(RoceError, ValueError):
    """A value given to an encoder does not fit its wire field."""

    def __init__(self, field: str, value: object, bits: int) -> None:
        super().__init__(f"{field}={value!r} does not fit in {bits} bits")
        self.field = field
        self.value = value


# ----------------------------------------------------------- transport errors
class TransportError(RoceError):
    """A problem of the RC transport layer (sans-I/O QP)."""


class InvalidWorkRequest(TransportError, ValueError):
    """A work request that the QP cannot accept (bad length, opcode, state)."""


class QpStateError(TransportError):
    """An operation illegal in the current QP state (e.g. post_send in RESET)."""


class RemoteAccessError(TransportError):
    """Raised by a :class:`roce.rc.memory.RemoteMemory` when an R_Key, range or
    access right check fails; the responder answers NAK remote access error."""

    def __init__(self, msg: str, *, rkey: int = 0, va: int = 0, length: int = 0) -> None:
        super().__init__(msg)
        self.rkey = rkey
        self.va = va
        self.length = length


class RemoteOperationalError(TransportError):
    """The responder could not carry out a valid request (NAK remote op error)."""
