"""Constructors of RoCEv2 packets and headers for the packet path.

The RC engine (:mod:`roce.rc`) builds a few headers and a packet per packet
it sends. The native constructors of :mod:`roce._codec` fill the frozen
dataclasses' slots directly and return the same objects as the Python
fallbacks here (used when the extension is not built). This module imports
both :mod:`roce.packet` and :mod:`roce._codec`, so that neither imports the
other's importer (``_codec`` needs :class:`~roce.packet.RocePacket`).
"""
from __future__ import annotations

from roce.headers import Aeth, AtomicAckEth, AtomicEth, Bth, Ieth, ImmDt, Reth
from roce.packet import Payload, RocePacket

# Constructors for the packet path (the RC engine builds a few per packet):
# the native ones fill the frozen dataclasses' slots directly; same objects.
try:
    from roce._codec import (
        aeth as make_aeth,
        bth as make_bth,
        ieth as make_ieth,
        immdt as make_immdt,
        packet as make_packet,
        reth as make_reth,
    )
except ImportError:  # pragma: no cover - extension not built
    def make_reth(va: int, rkey: int, dma_len: int) -> Reth:
        return Reth(va, rkey, dma_len)

    def make_immdt(imm: int) -> ImmDt:
        return ImmDt(imm)

    def make_ieth(rkey: int) -> Ieth:
        return Ieth(rkey)

    def make_bth(opcode: int, dest_qp: int, psn: int, se: bool = False, ackreq: bool = False,
                 pkey: int = 0xFFFF) -> Bth:
        return Bth(opcode=opcode, dest_qp=dest_qp, psn=psn, se=se, ackreq=ackreq, pkey=pkey)

    def make_aeth(syndrome: int, msn: int) -> Aeth:
        return Aeth(syndrome, msn)

    def make_packet(bth: Bth, payload: Payload = b"", reth: Reth | None = None, aeth: Aeth | None = None,
                    immdt: ImmDt | None = None, atomic_eth: AtomicEth | None = None,
                    atomic_ack_eth: AtomicAckEth | None = None, ieth: Ieth | None = None) -> RocePacket:
        return RocePacket(bth, reth=reth, aeth=aeth, immdt=immdt, atomic_eth=atomic_eth,
                          atomic_ack_eth=atomic_ack_eth, ieth=ieth, payload=payload)
