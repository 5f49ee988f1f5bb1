"""BTH opcodes of RoCEv2 and their static properties (IBTA vol. 1, 9.2.1 and
table 35 "OpCode field"; the same facts as rxe's ``rxe_opcode_info`` table).

The opcode byte is ``transport << 5 | operation``: transport 0 = RC, 1 = UC,
3 = UD (RD, 2, is not supported). For every opcode :func:`opinfo` gives which
extension headers follow the BTH and in which order, whether a payload follows,
the packet's place in a message (first / middle / last / only), whether it is
a request or a response, and the total header length. An opcode not in the
table raises :class:`roce.errors.UnknownOpcode`, never ``KeyError``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import UnknownOpcode

BTH_LEN = 12
ICRC_LEN = 4


class Opcode(enum.IntEnum):
    RC_SEND_FIRST = 0x00
    RC_SEND_MIDDLE = 0x01
    RC_SEND_LAST = 0x02
    RC_SEND_LAST_WITH_IMMEDIATE = 0x03
    RC_SEND_ONLY = 0x04
    RC_SEND_ONLY_WITH_IMMEDIATE = 0x05
    RC_RDMA_WRITE_FIRST = 0x06
    RC_RDMA_WRITE_MIDDLE = 0x07
    RC_RDMA_WRITE_LAST = 0x08
    RC_RDMA_WRITE_LAST_WITH_IMMEDIATE = 0x09
    RC_RDMA_WRITE_ONLY = 0x0A
    RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE = 0x0B
    RC_RDMA_READ_REQUEST = 0x0C
    RC_RDMA_READ_RESPONSE_FIRST = 0x0D
    RC_RDMA_READ_RESPONSE_MIDDLE = 0x0E
    RC_RDMA_READ_RESPONSE_LAST = 0x0F
    RC_RDMA_READ_RESPONSE_ONLY = 0x10
    RC_ACKNOWLEDGE = 0x11
    RC_ATOMIC_ACKNOWLEDGE = 0x12
    RC_COMPARE_SWAP = 0x13
    RC_FETCH_ADD = 0x14
    RC_SEND_LAST_WITH_INVALIDATE = 0x16
    RC_SEND_ONLY_WITH_INVALIDATE = 0x17

    UC_SEND_FIRST = 0x20
    UC_SEND_MIDDLE = 0x21
    UC_SEND_LAST = 0x22
    UC_SEND_LAST_WITH_IMMEDIATE = 0x23
    UC_SEND_ONLY = 0x24
    UC_SEND_ONLY_WITH_IMMEDIATE = 0x25
    UC_RDMA_WRITE_FIRST = 0x26
    UC_RDMA_WRITE_MIDDLE = 0x27
    UC_RDMA_WRITE_LAST = 0x28
    UC_RDMA_WRITE_LAST_WITH_IMMEDIATE = 0x29
    UC_RDMA_WRITE_ONLY = 0x2A
    UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE = 0x2B

    UD_SEND_ONLY = 0x64
    UD_SEND_ONLY_WITH_IMMEDIATE = 0x65


class Transport(enum.IntEnum):
    RC = 0
    UC = 1
    UD = 3


class Ext(enum.Enum):
    """Extension headers (IBTA 9.3); ``size`` is the length in bytes."""

    DETH = "deth"                  # Datagram: Q_Key, source QP (8)
    RETH = "reth"                  # RDMA: VA, R_Key, DMA length (16)
    ATOMIC_ETH = "atomic_eth"      # Atomic: VA, R_Key, swap/add, compare (28)
    AETH = "aeth"                  # ACK: syndrome, MSN (4)
    ATOMIC_ACK_ETH = "atomic_ack_eth"  # Atomic ACK: original remote data (8)
    IMMDT = "immdt"                # Immediate data (4)
    IETH = "ieth"                  # Invalidate: R_Key (4)

    @property
    def size(self) -> int:
        return _EXT_SIZE[self]


_EXT_SIZE = {Ext.DETH: 8, Ext.RETH: 16, Ext.ATOMIC_ETH: 28, Ext.AETH: 4,
             Ext.ATOMIC_ACK_ETH: 8, Ext.IMMDT: 4, Ext.IETH: 4}


class Kind(enum.Enum):
    SEND = "send"
    WRITE = "write"
    READ_REQUEST = "read_request"
    READ_RESPONSE = "read_response"
    ATOMIC = "atomic"
    ACK = "ack"
    ATOMIC_ACK = "atomic_ack"


class Position(enum.Enum):
    FIRST = "first"
    MIDDLE = "middle"
    LAST = "last"
    ONLY = "only"


@dataclass(frozen=True, slots=True)
class OpInfo:
    opcode: Opcode
    transport: Transport
    kind: Kind
    position: Position
    exts: tuple[Ext, ...]          # in wire order after the BTH
    has_payload: bool
    has_imm: bool
    has_inv: bool
    offsets: dict = field(hash=False, compare=False)  # Ext -> offset from start of BTH
    length: int = 0                # BTH + extension headers
    # Derived facts, computed once by the table (the packet path reads them per packet):
    #: a request (SEND, WRITE, READ request, atomic) rather than a response
    is_request: bool = field(default=False, compare=False)
    is_response: bool = field(default=False, compare=False)
    #: first or only packet of its message / last or only
    starts: bool = field(default=False, compare=False)
    ends: bool = field(default=False, compare=False)
    #: the responder generates a receive completion for this packet (the last
    #: packet of a SEND, or of a WRITE with immediate)
    completes: bool = field(default=False, compare=False)


# Wire order of extension headers (IBTA 9.2, figure 38).
_ORDER = (Ext.DETH, Ext.RETH, Ext.ATOMIC_ETH, Ext.AETH, Ext.ATOMIC_ACK_ETH, Ext.IMMDT, Ext.IETH)

# operation (low 5 bits) -> (kind, position, extension headers, payload)
_OPS: dict[int, tuple[Kind, Position, frozenset, bool]] = {
    0x00: (Kind.SEND, Position.FIRST, frozenset(), True),
    0x01: (Kind.SEND, Position.MIDDLE, frozenset(), True),
    0x02: (Kind.SEND, Position.LAST, frozenset(), True),
    0x03: (Kind.SEND, Position.LAST, frozenset({Ext.IMMDT}), True),
    0x04: (Kind.SEND, Position.ONLY, frozenset(), True),
    0x05: (Kind.SEND, Position.ONLY, frozenset({Ext.IMMDT}), True),
    0x06: (Kind.WRITE, Position.FIRST, frozenset({Ext.RETH}), True),
    0x07: (Kind.WRITE, Position.MIDDLE, frozenset(), True),
    0x08: (Kind.WRITE, Position.LAST, frozenset(), True),
    0x09: (Kind.WRITE, Position.LAST, frozenset({Ext.IMMDT}), True),
    0x0A: (Kind.WRITE, Position.ONLY, frozenset({Ext.RETH}), True),
    0x0B: (Kind.WRITE, Position.ONLY, frozenset({Ext.RETH, Ext.IMMDT}), True),
    0x0C: (Kind.READ_REQUEST, Position.ONLY, frozenset({Ext.RETH}), False),
    0x0D: (Kind.READ_RESPONSE, Position.FIRST, frozenset({Ext.AETH}), True),
    0x0E: (Kind.READ_RESPONSE, Position.MIDDLE, frozenset(), True),
    0x0F: (Kind.READ_RESPONSE, Position.LAST, frozenset({Ext.AETH}), True),
    0x10: (Kind.READ_RESPONSE, Position.ONLY, frozenset({Ext.AETH}), True),
    0x11: (Kind.ACK, Position.ONLY, frozenset({Ext.AETH}), False),
    0x12: (Kind.ATOMIC_ACK, Position.ONLY, frozenset({Ext.AETH, Ext.ATOMIC_ACK_ETH}), False),
    0x13: (Kind.ATOMIC, Position.ONLY, frozenset({Ext.ATOMIC_ETH}), False),
    0x14: (Kind.ATOMIC, Position.ONLY, frozenset({Ext.ATOMIC_ETH}), False),
    0x16: (Kind.SEND, Position.LAST, frozenset({Ext.IETH}), True),
    0x17: (Kind.SEND, Position.ONLY, frozenset({Ext.IETH}), True),
}


def _build_table() -> dict[int, OpInfo]:
    table: dict[int, OpInfo] = {}
    for op in Opcode:
        transport = Transport(op >> 5)
        kind, pos, exts, payload = _OPS[op & 0x1F]
        if transport is Transport.UD:
            exts = exts | {Ext.DETH}
        ordered = tuple(e for e in _ORDER if e in exts)
        offsets, off = {}, BTH_LEN
        for e in ordered:
            offsets[e] = off
            off += e.size
        is_request = kind in (Kind.SEND, Kind.WRITE, Kind.READ_REQUEST, Kind.ATOMIC)
        ends = pos in (Position.LAST, Position.ONLY)
        has_imm = Ext.IMMDT in exts
        table[int(op)] = OpInfo(
            opcode=op, transport=transport, kind=kind, position=pos, exts=ordered,
            has_payload=payload, has_imm=has_imm, has_inv=Ext.IETH in exts,
            offsets=offsets, length=off, is_request=is_request, is_response=not is_request,
            starts=pos in (Position.FIRST, Position.ONLY), ends=ends,
            completes=ends and (kind is Kind.SEND or (kind is Kind.WRITE and has_imm)),
        )
    return table


OPCODE_TABLE: dict[int, OpInfo] = _build_table()


def opinfo(opcode: int) -> OpInfo:
    """Static facts about ``opcode``; raises :class:`UnknownOpcode`."""
    try:
        return OPCODE_TABLE[opcode]
    except (KeyError, TypeError):
        raise UnknownOpcode(opcode if isinstance(opcode, int) else -1) from None
