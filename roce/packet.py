"""A RoCEv2 packet: the UDP payload of port 4791 (IBTA vol. 1 annex A17.4).

Layout: BTH, the extension headers the opcode calls for (see
:mod:`roce.opcodes`), payload, 0-3 pad bytes (count in BTH.PadCnt), ICRC.

:meth:`RocePacket.encode` pads the payload to a multiple of 4, fills PadCnt and
appends the ICRC for a given :class:`roce.icrc.IpContext`.
:func:`decode` is the syntax check of the receive path (rxe_recv.c's
``hdr_check`` minus the QP lookup): known opcode, TVer 0, length against the
opcode's header length, pad count, no payload where the opcode has none, and
the ICRC; each failure is a typed :class:`roce.errors.MalformedPacket` naming
the value. The decoded payload is a zero-copy memoryview of the datagram.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import IcrcMismatch, MalformedPacket, BadPadCount, BadTransportVersion, \
    TruncatedPacket, UnexpectedPayload
from .headers import Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth
from .icrc import IpContext, compute_icrc, icrc_from_bytes, icrc_to_bytes, solve_ipv4_id
from .opcodes import ICRC_LEN, Ext, opinfo

_EXT_ATTR = {Ext.DETH: ("deth", Deth), Ext.RETH: ("reth", Reth),
             Ext.ATOMIC_ETH: ("atomic_eth", AtomicEth), Ext.AETH: ("aeth", Aeth),
             Ext.ATOMIC_ACK_ETH: ("atomic_ack_eth", AtomicAckEth),
             Ext.IMMDT: ("immdt", ImmDt), Ext.IETH: ("ieth", Ieth)}
_EXT_NAMES = tuple(a for a, _ in _EXT_ATTR.values())


@dataclass(slots=True)
class RocePacket:
    bth: Bth
    reth: Reth | None = None
    aeth: Aeth | None = None
    immdt: ImmDt | None = None
    atomic_eth: AtomicEth | None = None
    atomic_ack_eth: AtomicAckEth | None = None
    deth: Deth | None = None
    ieth: Ieth | None = None
    payload: object = b""          # bytes-like; a memoryview after decode
    icrc: int | None = None        # set by decode / encode
    ip_id: int | None = None       # IPv4 ID recovered by decode(recover_ipv4_id=True)

    @property
    def opcode(self) -> int:
        return self.bth.opcode

    @property
    def psn(self) -> int:
        return self.bth.psn

    def header_bytes(self) -> int:
        return opinfo(self.bth.opcode).length

    def wire_length(self) -> int:
        n = len(self.payload)
        return opinfo(self.bth.opcode).length + n + (-n % 4) + ICRC_LEN

    def encode(self, ctx: IpContext) -> bytes:
        """The UDP payload: headers, payload, pad, ICRC for envelope ``ctx``."""
        info = opinfo(self.bth.opcode)
        for e in info.exts:
            if getattr(self, _EXT_ATTR[e][0]) is None:
                raise MalformedPacket(f"{info.opcode.name} needs a {e.name} header",
                                      field=_EXT_ATTR[e][0], value=None)
        for name in _EXT_NAMES:
            if getattr(self, name) is not None and not any(
                    _EXT_ATTR[e][0] == name for e in info.exts):
                raise MalformedPacket(f"{info.opcode.name} carries no {name} header",
                                      field=name, value=getattr(self, name))
        plen = len(self.payload)
        if plen and not info.has_payload:
            raise UnexpectedPayload(self.bth.opcode, plen)
        pad = -plen % 4
        total = info.length + plen + pad + ICRC_LEN
        buf = bytearray(total)
        self.bth.pack_into(buf, 0)
        buf[1] = (buf[1] & 0xCF) | (pad << 4)
        for e in info.exts:
            getattr(self, _EXT_ATTR[e][0]).pack_into(buf, info.offsets[e])
        if plen:
            buf[info.length:info.length + plen] = self.payload
        ip, udp = ctx.headers(total)
        icrc = compute_icrc(ip, udp, memoryview(buf)[:-ICRC_LEN])
        buf[-ICRC_LEN:] = icrc_to_bytes(icrc)
        self.icrc = icrc
        return bytes(buf)


def decode(datagram, ctx: IpContext | None, *, recover_ipv4_id: bool = False) -> RocePacket:
    """Parse and validate a UDP payload. ``ctx`` is the IP/UDP envelope it
    arrived in (``None`` skips the ICRC check, for tests and tools only).
    With ``recover_ipv4_id`` an IPv4 packet whose ICRC only fails because the
    real IPv4 ID is unknown is accepted and the ID is reported in ``ip_id``."""
    mv = memoryview(datagram).cast("B")
    n = len(mv)
    if n < Bth.SIZE + ICRC_LEN:
        raise TruncatedPacket("RoCE packet", n, Bth.SIZE + ICRC_LEN)
    bth = Bth.unpack_from(mv, 0)
    info = opinfo(bth.opcode)
    if bth.tver != 0:
        raise BadTransportVersion(bth.tver)
    if n < info.length + ICRC_LEN:
        raise TruncatedPacket(info.opcode.name, n, info.length + ICRC_LEN)
    body = n - info.length - ICRC_LEN
    if not info.has_payload and body:
        raise UnexpectedPayload(bth.opcode, body)
    if bth.pad_count > body:
        raise BadPadCount(bth.pad_count, body)
    received = icrc_from_bytes(mv[n - ICRC_LEN:])
    ip_id = None
    if ctx is not None:
        ip, udp = ctx.headers(n)
        ib = mv[:n - ICRC_LEN]
        expected = compute_icrc(ip, udp, ib)
        if expected != received:
            if not (recover_ipv4_id and ctx.version == 4):
                raise IcrcMismatch(received, expected)
            ip_id = solve_ipv4_id(ip, udp, ib, received)
            if ip_id is None:
                raise IcrcMismatch(received, None)
        elif ctx.version == 4:
            ip_id = ctx.ip_id
    pkt = RocePacket(bth, payload=mv[info.length:n - ICRC_LEN - bth.pad_count],
                     icrc=received, ip_id=ip_id)
    for e in info.exts:
        attr, cls = _EXT_ATTR[e]
        setattr(pkt, attr, cls.unpack_from(mv, info.offsets[e]))
    return pkt
