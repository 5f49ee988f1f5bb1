"""RoCEv2 transport headers: BTH and the extension headers (IBTA vol. 1,
9.2 "Base Transport Header" and 9.3 "Extended Transport Headers"; the same
layouts as rxe_hdr.h and ib_pack.h). All fields are big-endian.

Each header is a small frozen dataclass with:

* ``CODEC``: the ``construct`` description of the wire layout, the reference
  definition of the format (tests check the fast path against it);
* ``pack()`` / ``pack_into(buf, off)`` and ``unpack_from(buf, off)``: a
  ``struct``-based fast path used on the packet hot path (construct costs about
  20 us per header, far too much per packet).

``pack`` validates every field and raises :class:`roce.errors.FieldRange`
naming the field; ``unpack_from`` raises :class:`roce.errors.TruncatedPacket`.
Pure codecs: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import construct as c

from verbs import AethType, NakCode

from .errors import FieldRange, TruncatedPacket

_U64 = (1 << 64) - 1


def _check(obj, spec) -> None:
    for name, bits in spec:
        v = getattr(obj, name)
        if not isinstance(v, int) or v < 0 or v >> bits:
            raise FieldRange(f"{type(obj).__name__}.{name}", v, bits)


def _need(buf, off: int, size: int, what: str) -> None:
    if len(buf) - off < size:
        raise TruncatedPacket(what, max(0, len(buf) - off), size)


# ------------------------------------------------------------------- BTH
BTH_CODEC = c.Struct(
    "opcode" / c.Int8ub,
    "_b1" / c.BitStruct(
        "se" / c.Flag, "m" / c.Flag, "pad_count" / c.BitsInteger(2), "tver" / c.BitsInteger(4)
    ),
    "pkey" / c.Int16ub,
    "_b4" / c.BitStruct("fecn" / c.Flag, "becn" / c.Flag, "resv6" / c.BitsInteger(6)),
    "dest_qp" / c.Int24ub,
    "_b8" / c.BitStruct("ackreq" / c.Flag, "resv7" / c.BitsInteger(7)),
    "psn" / c.Int24ub,
)
_BTH = struct.Struct("!BBHII")


@dataclass(frozen=True, slots=True)
class Bth:
    """Base Transport Header, 12 bytes (IBTA 9.2)."""

    opcode: int
    dest_qp: int
    psn: int
    se: bool = False
    m: bool = False
    pad_count: int = 0
    tver: int = 0
    pkey: int = 0xFFFF
    fecn: bool = False
    becn: bool = False
    resv6: int = 0
    ackreq: bool = False
    resv7: int = 0

    SIZE = 12
    CODEC = BTH_CODEC
    _SPEC = (("opcode", 8), ("pad_count", 2), ("tver", 4), ("pkey", 16), ("resv6", 6),
             ("dest_qp", 24), ("resv7", 7), ("psn", 24))

    def pack(self) -> bytes:
        buf = bytearray(12)
        self.pack_into(buf, 0)
        return bytes(buf)

    def pack_into(self, buf, off: int) -> None:
        _check(self, self._SPEC)
        _BTH.pack_into(
            buf, off, self.opcode,
            (bool(self.se) << 7) | (bool(self.m) << 6) | (self.pad_count << 4) | self.tver,
            self.pkey,
            (bool(self.fecn) << 31) | (bool(self.becn) << 30) | (self.resv6 << 24) | self.dest_qp,
            (bool(self.ackreq) << 31) | (self.resv7 << 24) | self.psn,
        )

    @classmethod
    def unpack_from(cls, buf, off: int = 0) -> Bth:
        _need(buf, off, 12, "BTH")
        op, b1, pkey, w2, w3 = _BTH.unpack_from(buf, off)
        return cls(
            opcode=op, dest_qp=w2 & 0xFFFFFF, psn=w3 & 0xFFFFFF,
            se=bool(b1 & 0x80), m=bool(b1 & 0x40), pad_count=(b1 >> 4) & 3, tver=b1 & 0xF,
            pkey=pkey, fecn=bool(w2 >> 31), becn=bool((w2 >> 30) & 1), resv6=(w2 >> 24) & 0x3F,
            ackreq=bool(w3 >> 31), resv7=(w3 >> 24) & 0x7F,
        )

    def to_construct(self) -> dict:
        return dict(
            opcode=self.opcode, pkey=self.pkey, dest_qp=self.dest_qp, psn=self.psn,
            _b1=dict(se=self.se, m=self.m, pad_count=self.pad_count, tver=self.tver),
            _b4=dict(fecn=self.fecn, becn=self.becn, resv6=self.resv6),
            _b8=dict(ackreq=self.ackreq, resv7=self.resv7),
        )

    @classmethod
    def from_construct(cls, d) -> Bth:
        return cls(
            opcode=d.opcode, dest_qp=d.dest_qp, psn=d.psn, se=d._b1.se, m=d._b1.m,
            pad_count=d._b1.pad_count, tver=d._b1.tver, pkey=d.pkey, fecn=d._b4.fecn,
            becn=d._b4.becn, resv6=d._b4.resv6, ackreq=d._b8.ackreq, resv7=d._b8.resv7,
        )


# ------------------------------------------------------- simple ext headers
class _Simple:
    """Mixin for headers whose fields map 1:1 to a struct format."""

    __slots__ = ()
    _FMT: struct.Struct
    _SPEC: tuple
    SIZE: int

    def pack(self) -> bytes:
        buf = bytearray(self.SIZE)
        self.pack_into(buf, 0)
        return bytes(buf)

    def pack_into(self, buf, off: int) -> None:
        _check(self, self._SPEC)
        self._FMT.pack_into(buf, off, *self._wire())

    def _wire(self) -> tuple:
        return tuple(getattr(self, n) for n, _ in self._SPEC)

    @classmethod
    def unpack_from(cls, buf, off: int = 0):
        _need(buf, off, cls.SIZE, cls.__name__.upper())
        return cls(*cls._FMT.unpack_from(buf, off))

    def to_construct(self) -> dict:
        return {n: getattr(self, n) for n, _ in self._SPEC}

    @classmethod
    def from_construct(cls, d):
        return cls(*(d[n] for n, _ in cls._SPEC))


@dataclass(frozen=True, slots=True)
class Reth(_Simple):
    """RDMA Extended Transport Header, 16 bytes (IBTA 9.3.3)."""

    va: int
    rkey: int
    dma_len: int

    SIZE = 16
    _FMT = struct.Struct("!QII")
    _SPEC = (("va", 64), ("rkey", 32), ("dma_len", 32))
    CODEC = c.Struct("va" / c.Int64ub, "rkey" / c.Int32ub, "dma_len" / c.Int32ub)


@dataclass(frozen=True, slots=True)
class AtomicEth(_Simple):
    """Atomic Extended Transport Header, 28 bytes (IBTA 9.3.4)."""

    va: int
    rkey: int
    swap_add: int
    compare: int

    SIZE = 28
    _FMT = struct.Struct("!QIQQ")
    _SPEC = (("va", 64), ("rkey", 32), ("swap_add", 64), ("compare", 64))
    CODEC = c.Struct("va" / c.Int64ub, "rkey" / c.Int32ub, "swap_add" / c.Int64ub,
                     "compare" / c.Int64ub)


@dataclass(frozen=True, slots=True)
class AtomicAckEth(_Simple):
    """Atomic Acknowledge Extended Transport Header, 8 bytes (IBTA 9.5.3)."""

    orig: int

    SIZE = 8
    _FMT = struct.Struct("!Q")
    _SPEC = (("orig", 64),)
    CODEC = c.Struct("orig" / c.Int64ub)


@dataclass(frozen=True, slots=True)
class ImmDt(_Simple):
    """Immediate Data Extended Transport Header, 4 bytes (IBTA 9.3.5).
    Opaque to the transport: carried as the 32-bit big-endian word."""

    imm: int

    SIZE = 4
    _FMT = struct.Struct("!I")
    _SPEC = (("imm", 32),)
    CODEC = c.Struct("imm" / c.Int32ub)


@dataclass(frozen=True, slots=True)
class Ieth(_Simple):
    """Invalidate Extended Transport Header, 4 bytes (IBTA 9.3.6)."""

    rkey: int

    SIZE = 4
    _FMT = struct.Struct("!I")
    _SPEC = (("rkey", 32),)
    CODEC = c.Struct("rkey" / c.Int32ub)


@dataclass(frozen=True, slots=True)
class Deth(_Simple):
    """Datagram Extended Transport Header, 8 bytes (IBTA 9.3.2): Q_Key, 8
    reserved bits, 24-bit source QP."""

    qkey: int
    src_qp: int

    SIZE = 8
    _FMT = struct.Struct("!II")
    _SPEC = (("qkey", 32), ("src_qp", 24))
    CODEC = c.Struct("qkey" / c.Int32ub, c.Padding(1),
                     "src_qp" / c.Int24ub)

    @classmethod
    def unpack_from(cls, buf, off: int = 0) -> Deth:
        _need(buf, off, 8, "DETH")
        qkey, w = cls._FMT.unpack_from(buf, off)
        return cls(qkey, w & 0xFFFFFF)

    def to_construct(self) -> dict:
        return dict(qkey=self.qkey, src_qp=self.src_qp)


# ------------------------------------------------------------------ AETH
#: credit count value meaning "no end-to-end flow control credits" (9.7.7.2)
CREDITS_INVALID = 0x1F


@dataclass(frozen=True, slots=True)
class Aeth(_Simple):
    """ACK Extended Transport Header, 4 bytes: syndrome u8 + MSN 24 bits
    (IBTA 9.3.7). Build with :meth:`ack`, :meth:`rnr_nak`, :meth:`nak`."""

    syndrome: int
    msn: int

    SIZE = 4
    _FMT = struct.Struct("!I")
    _SPEC = (("syndrome", 8), ("msn", 24))
    CODEC = c.Struct("syndrome" / c.Int8ub, "msn" / c.Int24ub)

    def _wire(self) -> tuple:
        return ((self.syndrome << 24) | self.msn,)

    @classmethod
    def unpack_from(cls, buf, off: int = 0) -> Aeth:
        _need(buf, off, 4, "AETH")
        (w,) = cls._FMT.unpack_from(buf, off)
        return cls(w >> 24, w & 0xFFFFFF)

    @classmethod
    def ack(cls, msn: int, credits: int = CREDITS_INVALID) -> Aeth:
        if not 0 <= credits < 32:
            raise FieldRange("credits", credits, 5)
        return cls((AethType.ACK << 5) | credits, msn)

    @classmethod
    def rnr_nak(cls, msn: int, timer: int) -> Aeth:
        if not 0 <= timer < 32:
            raise FieldRange("rnr_timer", timer, 5)
        return cls((AethType.RNR_NAK << 5) | timer, msn)

    @classmethod
    def nak(cls, msn: int, code: NakCode) -> Aeth:
        if not 0 <= code < 32:
            raise FieldRange("nak_code", code, 5)
        return cls((AethType.NAK << 5) | int(code), msn)

    @property
    def type(self) -> AethType:
        return AethType((self.syndrome >> 5) & 3)

    @property
    def value(self) -> int:
        """Low 5 bits: credit count, RNR timer or NAK code depending on type."""
        return self.syndrome & 0x1F

    @property
    def credits(self) -> int:
        return self.syndrome & 0x1F

    @property
    def rnr_timer(self) -> int:
        return self.syndrome & 0x1F

    @property
    def nak_code(self) -> int:
        return self.syndrome & 0x1F


EXT_CLASSES = {"reth": Reth, "aeth": Aeth, "immdt": ImmDt, "atomic_eth": AtomicEth,
               "atomic_ack_eth": AtomicAckEth, "deth": Deth, "ieth": Ieth}
