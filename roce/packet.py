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
from typing import Any

from verbs import PSN_MASK

from .errors import (
    BadPadCount,
    BadTransportVersion,
    IcrcMismatch,
    MalformedPacket,
    TruncatedPacket,
    UnexpectedPayload,
)
from .headers import Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth
from .icrc import IpContext, compute_icrc, icrc_from_bytes, icrc_to_bytes, solve_ipv4_id
from .opcodes import ICRC_LEN, Ext, opinfo

Payload = bytes | bytearray | memoryview

_EXT_ATTR: dict[Ext, tuple[str, Any]] = {Ext.DETH: ("deth", Deth), Ext.RETH: ("reth", Reth),
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
    payload: Payload = b""         # a memoryview after decode
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



@dataclass(slots=True)
class PacketRun:
    """Consecutive data packets of one SEND or RDMA WRITE message, described
    once instead of built one by one (the RC requester's segmentation; IBTA
    9.7.1 packet sequencing): packets ``first .. first + count - 1`` of a
    message of ``npkts`` packets and ``length`` bytes, with PSNs from ``psn``.

    :meth:`packets` is the reference: the :class:`RocePacket` objects the run
    stands for. A sender may instead encode the run directly
    (:meth:`roce._udpio.TxRing.add_run`), with the same bytes.

    * opcodes: ``ops`` = (FIRST, MIDDLE, LAST, ONLY) of the message;
    * payload of packet ``i``: bytes ``[i * mtu, min((i + 1) * mtu, length))``
      of ``sgl`` (an object with ``gather(offset, n)``, ``views`` and
      ``starts``, like :class:`roce.rc.sgl.SgList`);
    * RETH ``(va, rkey, length)`` on packet 0 if ``reth`` is ``(va, rkey)``;
      ImmDt ``imm`` or IETH ``ieth`` and SolicitedEvent ``se`` on the last;
    * AckReq on the last packet and whenever ``noack`` (packets since the
      previous AckReq, counting this one) reaches ``ack_every``.
    """

    ops: tuple
    npkts: int
    first: int
    count: int
    psn: int
    dest_qp: int
    pkey: int
    mtu: int
    length: int
    sgl: Any          # gather(offset, n), views, starts: a roce.rc.sgl.SgList
    reth: tuple | None = None
    imm: int | None = None
    ieth: int | None = None
    se: bool = False
    noack: int = 0
    ack_every: int = 64

    def packets(self) -> list[RocePacket]:
        out = []
        first_op, mid_op, last_op, only_op = self.ops
        n, mtu, length = self.npkts, self.mtu, self.length
        noack = self.noack
        for j in range(self.count):
            i = self.first + j
            last = i == n - 1
            opcode = only_op if n == 1 else first_op if i == 0 else last_op if last else mid_op
            noack += 1
            ackreq = last or noack >= self.ack_every
            if ackreq:
                noack = 0
            off = i * mtu
            pkt = RocePacket(Bth(opcode=opcode, dest_qp=self.dest_qp,
                                 psn=(self.psn + j) & PSN_MASK, se=last and self.se,
                                 pkey=self.pkey, ackreq=ackreq),
                             payload=self.sgl.gather(off, min(mtu, length - off)))
            if i == 0 and self.reth is not None:
                pkt.reth = Reth(self.reth[0], self.reth[1], length)
            if last:
                if self.imm is not None:
                    pkt.immdt = ImmDt(self.imm)
                elif self.ieth is not None:
                    pkt.ieth = Ieth(self.ieth)
            out.append(pkt)
        return out


def expand(items) -> list[RocePacket]:
    """Packets and :class:`PacketRun` s -> the packets, in order."""
    out = []
    for p in items:
        if type(p) is PacketRun:
            out += p.packets()
        else:
            out.append(p)
    return out
