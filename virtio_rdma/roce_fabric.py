"""The RoCEv2 fabric: this host's QPs reach QPs on other hosts over UDP 4791.

:class:`RoceFabric` is a :class:`~virtio_rdma.fabric.LocalFabric` (QPs of
guests on this host still meet on the synchronous message path) whose GID is
the IPv4-mapped (or IPv6) address of this host's RoCE interface, as kernel
rxe derives its GIDs. A QP whose destination GID is another host's gets a
:class:`~virtio_rdma.netqp.NetworkQp` at INIT -> RTR; from then on its
packets carry its real QPN, the peer's QPN and the PSNs the guest chose, so
any RoCEv2 peer (kernel rxe, an RDMA NIC, another vrdma host) sees an
ordinary RC QP.

Sans-I/O: packets leave through ``sink(packet, peer_ip)`` and arrive through
:meth:`RoceFabric.receive`. :class:`RoceFabricService` is the asyncio adapter
that owns the UDP socket (:mod:`roce.udp`) in the daemon's event loop.

Receive checks (rxe_recv.c's ``check_addr``/``check_keys`` order): a packet
for a QPN with no wire QP is dropped (``rx_unknown_qpn``); one whose source
address is not the QP's peer is dropped (``rx_addr_mismatch``). Syntax,
ICRC, PSN, rkey and length checks happen below (roce.udp) and above
(roce.rc) and are counted there.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import asdict, dataclass
from time import monotonic
from typing import Callable

from roce.icrc import ROCE_UDP_PORT
from roce.packet import RocePacket
from virtio_rdma.errors import FabricError
from virtio_rdma.fabric import LocalFabric
from virtio_rdma.netqp import NetworkQp

log = logging.getLogger(__name__)


def gid_of_address(address: str) -> bytes:
    """The RoCEv2 GID of an IP address: IPv4-mapped for IPv4 (``::ffff:a.b.c.d``)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise FabricError(f"RoCE address {address!r} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise FabricError(f"RoCE address {address} must be a unicast address of this host")
    if ip.version == 4:
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def address_of_gid(gid: bytes) -> str | None:
    """The IP address a GID names (None for the zero GID and other non-addresses)."""
    if len(gid) != 16 or not any(gid):
        return None
    ip = ipaddress.IPv6Address(bytes(gid))
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.is_multicast or ip.is_unspecified:
        return None
    return str(ip)


@dataclass(slots=True)
class RoceFabricMetrics:
    rx_packets: int = 0
    rx_unknown_qpn: int = 0       # no wire QP with the BTH destination QPN
    rx_addr_mismatch: int = 0     # source address is not the QP's peer
    tx_packets: int = 0
    tx_unroutable: int = 0        # no socket, or a peer of the other address family
    wire_qps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class RoceFabric(LocalFabric):
    def __init__(self, address: str, *, first_qpn: int = 0x100):
        super().__init__(gid_of_address(address), first_qpn)
        self.address = str(ipaddress.ip_address(address))
        self._version = ipaddress.ip_address(address).version
        self.wire: dict[int, NetworkQp] = {}
        self.sink: Callable[[RocePacket, str], None] | None = None
        self.metrics = RoceFabricMetrics()

    # ---- Fabric ------------------------------------------------------------
    def open_wire_qp(self, dev, qp, now: float) -> NetworkQp | None:
        dgid = bytes(qp.attr["dgid"])
        if dgid == self.gid:
            return None
        peer = address_of_gid(dgid)
        if peer is None:
            return None  # nothing to reach: the message path drops, the retry timer reports it
        n = NetworkQp(self, dev, qp, peer)
        self.wire[qp.qpn] = n
        self.metrics.wire_qps += 1
        return n

    def detach_wire(self, qpn: int) -> None:
        self.wire.pop(qpn, None)

    def free_qpn(self, qpn: int) -> None:
        self.wire.pop(qpn, None)
        super().free_qpn(qpn)

    # ---- packets -------------------------------------------------------------
    def transmit(self, packets: list[RocePacket], peer: str) -> None:
        sink = self.sink
        if sink is None or ipaddress.ip_address(peer).version != self._version:
            self.metrics.tx_unroutable += len(packets)
            return
        for p in packets:
            sink(p, peer)
        self.metrics.tx_packets += len(packets)

    def receive(self, pkt: RocePacket, src: str, now: float) -> None:
        """One valid RoCEv2 packet from ``src``."""
        m = self.metrics
        m.rx_packets += 1
        n = self.wire.get(pkt.bth.dest_qp)
        if n is None:
            m.rx_unknown_qpn += 1
            return
        if src != n.peer:
            m.rx_addr_mismatch += 1
            return
        before = n.deadline()
        n.receive(pkt, now)
        after = n.deadline()
        if after is not None and (before is None or after < before):
            notify = n.dev.notify  # the device re-arms its timer
            if notify is not None:
                notify()


class RoceFabricService:
    """Owns the UDP socket of a :class:`RoceFabric` in the running event loop."""

    def __init__(self, fabric: RoceFabric, port: int = ROCE_UDP_PORT):
        self.fabric = fabric
        self.port = port
        self.endpoint = None

    async def start(self) -> None:
        from roce.udp import open_endpoint

        self.endpoint = await open_endpoint(self.fabric.address, self._on_packet, self.port)
        self.fabric.sink = self.endpoint.send
        log.info("RoCEv2 fabric on %s:%d, GID %s", self.fabric.address, self.port,
                 ipaddress.IPv6Address(self.fabric.gid))

    def _on_packet(self, pkt: RocePacket, src: str) -> None:
        try:
            self.fabric.receive(pkt, src, monotonic())
        except Exception:  # the daemon boundary: one bad packet must not stop the fabric
            log.exception("RoCE fabric: internal error on a packet from %s", src)

    async def aclose(self) -> None:
        self.fabric.sink = None
        if self.endpoint is not None:
            ep, self.endpoint = self.endpoint, None
            await ep.aclose()
