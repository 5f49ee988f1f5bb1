"""The RoCEv2 fabric: this host's QPs reach QPs on other hosts over UDP 4791.

:class:`RoceFabric` is a :class:`~fabric.local.LocalFabric` (QPs of
guests on this host still meet on the synchronous message path) whose GID is
the IPv4-mapped (or IPv6) address of this host's RoCE interface, as kernel
rxe derives its GIDs. A QP whose destination GID is another host's gets a
:class:`~fabric.roce_qp.NetworkQp` at INIT -> RTR; from then on its
packets carry its real QPN, the peer's QPN and the PSNs the guest chose, so
any RoCEv2 peer (kernel rxe, an RDMA NIC, another vrdma host) sees an
ordinary RC QP.

Sans-I/O: packets leave through ``sink(packet, peer_ip)`` and arrive through
:meth:`RoceFabric.receive`. :class:`RoceFabricService` is the asyncio adapter
that owns the UDP socket (:mod:`roce.udp`) in the daemon's event loop.

Receive checks (rxe_recv.c's ``check_addr``/``check_keys`` order): a packet
for a QPN with no wire QP is dropped (``rx_unknown_qpn``); one whose source
address is not the QP's peer is dropped (``rx_addr_mismatch``); one whose
UDP source port is not one its peer sends that QP's packets from
(:mod:`roce.sport`: per peer ``daemon``, ``rxe``, ``auto`` or ``any``) is
dropped (``rx_port_mismatch``). The native fast path
(:mod:`roce.rc._fastrx`) makes the same checks and leaves any packet that
fails them to this path, which counts it. Authentication (a cluster key:
every peer not named plaintext must seal its datagrams) happens below, in
:mod:`roce.udp`; syntax, ICRC, PSN, rkey and length checks below (roce.udp)
and above (roce.rc), counted there.
"""
from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from time import monotonic
from typing import TYPE_CHECKING

from fabric.local import LocalFabric
from fabric.roce_qp import NetworkQp, wire_settle
from roce.icrc import ROCE_UDP_PORT
from roce.packet import PacketRun, RocePacket, expand
from roce.sport import PortCheck, allowed_source_ports, port_check
from verbs import GSI_QPN, QPN_MASK
from virtio_rdma.errors import FabricError

if TYPE_CHECKING:
    from roce.udp import RoceUdpEndpoint

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


#: bytes around a RoCEv2 payload on the wire besides the IB headers: IPv6
#: header (the larger), UDP, ICRC, and the cluster key's sealing trailer
_ENVELOPE = 40 + 8 + 4 + 24


def interface_mtu(address: str) -> int | None:
    """The MTU of the interface that holds ``address`` (Linux: the
    SIOCGIFADDR of each interface, then SIOCGIFMTU), or None if no interface
    has it or the system does not say."""
    import fcntl
    import socket
    import struct

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version != 4:
        return None  # IPv6 addresses are not reported by SIOCGIFADDR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16s16x", name.encode()[:15])
            try:
                got = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
            except OSError:
                continue
            if got[20:24] == ip.packed:
                try:
                    mtu = fcntl.ioctl(s.fileno(), 0x8921, req)  # SIOCGIFMTU
                except OSError:
                    return None
                return struct.unpack_from("i", mtu, 16)[0]
    return None


def roce_mtu(address: str, ceiling: int = 4096) -> int:
    """The largest IBTA path MTU (256..``ceiling``) whose packets fit the
    interface of ``address`` unfragmented (with the largest headers: RETH,
    IPv6, a sealing trailer), as rxe derives its active MTU from the netdev's
    MTU; 1024 if the interface's MTU cannot be learned."""
    mtu = interface_mtu(address)
    if mtu is None:
        return min(1024, ceiling)
    best = 256
    for m in (256, 512, 1024, 2048, 4096):
        if m <= ceiling and m + 12 + 16 + _ENVELOPE <= mtu:
            best = m
    return best


@dataclass(slots=True)
class RoceFabricMetrics:
    rx_packets: int = 0
    rx_unknown_qpn: int = 0       # no wire QP with the BTH destination QPN
    rx_addr_mismatch: int = 0     # source address is not the QP's peer
    rx_port_mismatch: int = 0     # source UDP port is not one the QP's peer sends from
    tx_packets: int = 0
    tx_unroutable: int = 0        # no socket, or a peer of the other address family
    wire_qps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class TxRoute:
    """The end of :meth:`RoceFabric.transmit` for one peer, for a sender
    that encodes its packets itself (``virtio_rdma._datapath.run_wire_sq``:
    ``TxRing.add_msg``, the bytes ``TxRing.add_run`` makes of the PacketRun
    it does not build): the TX ring of the UDP endpoint, the peer's
    envelope and whether its datagrams are sealed. The sender calls
    :meth:`full` when the ring fills up mid-message and :meth:`done` after
    adding ``n`` packets: counted as ``transmit`` counts them (the fabric's
    and the endpoint's ``tx_packets``), flushed as it flushes.

    ``endpoint`` has ``flush()`` and ``tx_added(n, seal)``
    (:class:`roce.udp.RoceUdpEndpoint`)."""

    __slots__ = ("fabric", "endpoint", "ring", "env", "seal")

    def __init__(self, fabric: RoceFabric, endpoint, ring, env, seal: bool) -> None:
        self.fabric = fabric
        self.endpoint = endpoint
        self.ring = ring
        self.env = env
        self.seal = seal

    def full(self) -> None:
        self.endpoint.flush()

    def done(self, n: int) -> None:
        self.endpoint.tx_added(n, self.seal)
        self.fabric.metrics.tx_packets += n


#: peers whose TxRoute a fabric keeps (more: the cache starts again)
_MAX_ROUTES = 1024


def _norm(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise FabricError(f"peer address {address!r} is not an IP address") from None


class RoceFabric(LocalFabric):
    """``port``: the UDP port of this host's socket, which is also the port
    every vrdma peer sends from. ``port_checks``: per peer address, how its
    source ports are checked (:class:`roce.sport.PortCheck`);
    ``default_port_check`` for the others. ``mac_key`` (from the cluster key
    file, :func:`roce.auth.load_key_file`): seal and verify every datagram
    except to and from ``plaintext_peers``; sealed peers are then checked as
    ``daemon`` unless named in ``port_checks``."""

    def __init__(self, address: str, *, port: int = ROCE_UDP_PORT,
                 port_checks: dict[str, str] | None = None,
                 default_port_check: str = PortCheck.AUTO, mac_key: bytes | None = None,
                 plaintext_peers=()):
        super().__init__(gid_of_address(address))
        self.address = str(ipaddress.ip_address(address))
        self._version = ipaddress.ip_address(address).version
        self.port = port
        self.mac_key = mac_key
        self.plaintext_peers = frozenset(_norm(p) for p in plaintext_peers)
        self.port_checks = {_norm(a): port_check(m) for a, m in (port_checks or {}).items()}
        self.default_port_check = port_check(default_port_check)
        self.wire: dict[int, NetworkQp] = {}
        #: per packet: ``sink(packet, peer_ip)`` (sans-I/O users and tests)
        self.sink: Callable[[RocePacket, str], None] | None = None
        #: per batch, preferred when set: ``wire_sink(packets, peer_ip)`` (the UDP service)
        self.wire_sink: Callable[[list, str], None] | None = None
        #: set by the I/O adapter with ``wire_sink``: ``tx_direct(peer_ip)`` makes the
        #: :class:`TxRoute` of a peer (:meth:`tx_route`)
        self.tx_direct: Callable[[str], TxRoute] | None = None
        self._tx_routes: dict[str, TxRoute] = {}
        self.metrics = RoceFabricMetrics()
        self._routable: dict[str, bool] = {}
        self._deferred: dict[NetworkQp, float | None] = {}  # QP -> its deadline before the batch
        #: set by the I/O adapter: receive what is queued on the socket now (None:
        #: nothing to drain); a wire QP's retransmission timer calls it before it
        #: fires, so that an ACK already here is not taken for a lost one
        self.drain: Callable[[], object] | None = None
        #: packets for QPN 1, the GSI QP (connection management between daemons:
        #: :mod:`peering`): ``gsi(packet, peer_ip, sport, now)``; None: dropped
        self.gsi: Callable[[RocePacket, str, int, float], None] | None = None

    # ---- Fabric ------------------------------------------------------------
    def open_wire_qp(self, dev, qp, now: float) -> NetworkQp | None:
        dgid = bytes(qp.attr.dgid)
        if dgid == self.gid:
            return None
        peer = address_of_gid(dgid)
        if peer is None:
            return None  # nothing to reach: the message path drops, the retry timer reports it
        n = NetworkQp(self, dev, qp, peer)
        n.sports = allowed_source_ports(self.port_check_of(peer), self.port,
                                        qp.attr.dest_qp_num & QPN_MASK, qp.qpn)
        self.wire[qp.qpn] = n
        self.metrics.wire_qps += 1
        return n

    def describe(self) -> str:
        auth = " (authenticated)" if self.mac_key is not None else ""
        return f"RoCEv2 on {self.address}:{self.port}{auth}"

    def port_check_of(self, peer: str) -> PortCheck:
        """How ``peer``'s source ports are checked (see the class doc)."""
        mode = self.port_checks.get(peer)
        if mode is not None:
            return mode
        if self.mac_key is not None and peer not in self.plaintext_peers:
            return PortCheck.DAEMON
        return self.default_port_check

    def attach_wire(self, qpn: int, target) -> None:
        """A daemon-owned QP (:class:`peering.link.PeerLink`) with an allocated
        QPN takes that QPN's packets; it has the wire QP face the receive path
        uses (``peer``, ``sports``, ``rc``, ``receive``, ``pump``, ``deadline``,
        ``closed``, ``dev.notify``)."""
        if qpn not in self._allocated or qpn in self.wire:
            raise FabricError(f"QPN {qpn:#x} is not allocated, or already has a wire QP")
        self.wire[qpn] = target

    def detach_wire(self, qpn: int) -> None:
        n = self.wire.pop(qpn, None)
        if n is not None:
            self._deferred.pop(n, None)

    def free_qpn(self, qpn: int) -> None:
        self.detach_wire(qpn)
        super().free_qpn(qpn)

    # ---- packets -------------------------------------------------------------
    def _is_routable(self, peer: str) -> bool:
        ok = self._routable.get(peer)
        if ok is None:
            try:
                ok = ipaddress.ip_address(peer).version == self._version
            except ValueError:
                ok = False
            self._routable[peer] = ok
        return ok

    def tx_route(self, peer: str) -> TxRoute | None:
        """Where a sender may encode ``peer``'s packets itself (see
        :class:`TxRoute`); None: through :meth:`transmit` (no I/O adapter
        route, or a peer of the other address family: transmit counts it
        unroutable)."""
        r = self._tx_routes.get(peer)
        if r is None:
            make = self.tx_direct
            if make is None or not self._is_routable(peer):
                return None
            if len(self._tx_routes) >= _MAX_ROUTES:
                self._tx_routes.clear()
            r = self._tx_routes[peer] = make(peer)
        return r

    def set_tx_direct(self, make: Callable[[str], TxRoute] | None) -> None:
        """The I/O adapter's :class:`TxRoute` maker (None: none; the routes made
        before are forgotten)."""
        self.tx_direct = make
        self._tx_routes.clear()

    def transmit(self, packets: list, peer: str) -> None:
        """Send ``packets`` (:class:`RocePacket` s and
        :class:`~roce.packet.PacketRun` s) to ``peer``."""
        wire_sink, sink = self.wire_sink, self.sink
        n = 0
        for p in packets:
            n += p.count if type(p) is PacketRun else 1
        if wire_sink is not None and self._is_routable(peer):
            wire_sink(packets, peer)
        elif sink is not None and self._is_routable(peer):
            for p in expand(packets):
                sink(p, peer)
        else:  # no sink, or a peer of the other IP version
            self.metrics.tx_unroutable += n
            return
        self.metrics.tx_packets += n

    def receive(self, pkt: RocePacket, src: str, now: float, *, defer: bool = False,
                sport: int = ROCE_UDP_PORT) -> None:
        """One valid RoCEv2 packet from ``src``, UDP source port ``sport``.
        With ``defer`` the QP's engine takes the packet but is pumped (packets
        out, CQEs written) only by :meth:`flush_deferred`, once for a whole
        batch of arrivals."""
        m = self.metrics
        m.rx_packets += 1
        n = self.wire.get(pkt.bth.dest_qp)
        if n is None:
            if pkt.bth.dest_qp == GSI_QPN and self.gsi is not None:
                self.gsi(pkt, src, sport, now)
                return
            m.rx_unknown_qpn += 1
            return
        if src != n.peer:
            m.rx_addr_mismatch += 1
            return
        sports = n.sports
        if sports is not None and sport not in sports:
            m.rx_port_mismatch += 1
            return
        if defer:
            if n not in self._deferred:
                self._deferred[n] = n.deadline()
            n.receive(pkt, now, pump=False)
            return
        before = n.deadline()
        n.receive(pkt, now)
        self._rearm(n, before)

    def fast_received(self, n: NetworkQp, packets: int) -> None:
        """A native fast path gave ``n``'s engine ``packets`` packets (checked
        as :meth:`receive` would): count them, pump the QP after the batch,
        or settle it now where the pump could not do otherwise."""
        self.metrics.rx_packets += packets
        if n not in self._deferred:
            # what its pump would do, now, when that cannot differ (_datapath.wire_settle)
            if type(n) is NetworkQp and wire_settle is not None and wire_settle(n.dev, n.qp, n):
                return
            self._deferred[n] = n.deadline()

    @property
    def pumps_pending(self) -> bool:
        """Did QPs take deferred packets that :meth:`flush_deferred` has not pumped yet?"""
        return bool(self._deferred)

    def flush_deferred(self, now: float) -> None:
        """Pump every QP that took deferred packets."""
        deferred = self._deferred
        while deferred:
            n, before = deferred.popitem()
            if n.closed:
                continue
            n.pump(now)
            self._rearm(n, before)

    @staticmethod
    def _rearm(n: NetworkQp, before: float | None) -> None:
        after = n.deadline()
        if after is not None and (before is None or after < before):
            notify = n.dev.notify  # the device re-arms its timer
            if notify is not None:
                notify()


class RoceFabricService:
    """Owns the UDP socket of a :class:`RoceFabric` in the running event loop.

    Each batch of datagrams the endpoint drains is handed to the fabric with
    deferred pumping, then every QP that received is pumped once and
    everything it sends leaves in one ``sendmmsg``. :meth:`poll` drains the
    socket from a busy-polling loop (the daemon's ``--poll-us`` spin)."""

    def __init__(self, fabric: RoceFabric, port: int | None = None):
        self.fabric = fabric
        self.port = fabric.port if port is None else port
        fabric.port = self.port
        self.endpoint: RoceUdpEndpoint | None = None
        #: set by the daemon: starts its busy-poll loop (arrivals bring the
        #: guests' next doorbells)
        self.on_busy: Callable[[], object] | None = None
        self._now = 0.0

    async def start(self) -> None:
        from roce.udp import open_endpoint

        self.endpoint = await open_endpoint(self.fabric.address, self._on_packet, self.port,
                                            ports=True)
        self.endpoint.on_batch_end = self._on_batch_end
        if self.fabric.mac_key is not None:
            self.endpoint.set_auth(self.fabric.mac_key, self.fabric.plaintext_peers)
        try:
            from roce.rc._fastrx import RequestFastPath
        except ImportError:  # pragma: no cover - extension not built: every packet decoded
            pass
        else:
            # ACKs complete WQEs with the clock's now (the engine's timers run on monotonic())
            fast = self.endpoint.fast = RequestFastPath(self.fabric.wire,
                                                        self.fabric.fast_received, monotonic)
            fast.ack_sink = self._ack_sink
        port = self.port

        def wire_sink(packets, peer, _transmit=self.endpoint.transmit):
            _transmit(packets, peer, port)
        self.fabric.wire_sink = wire_sink
        fabric, ep = self.fabric, self.endpoint

        def tx_direct(peer: str) -> TxRoute:
            return TxRoute(fabric, ep, *ep.tx_ring(peer, port))
        fabric.set_tx_direct(tx_direct)
        self.fabric.drain = self._drain
        log.info("RoCEv2 fabric on %s:%d, GID %s, %s", self.fabric.address, self.port,
                 ipaddress.IPv6Address(self.fabric.gid),
                 "authenticated (plaintext peers: %s)" % (
                     ", ".join(sorted(self.fabric.plaintext_peers)) or "none")
                 if self.fabric.mac_key is not None else "not authenticated")

    def _ack_sink(self, peer: str, dest_qp: int, pkey: int, psn: int, syndrome: int,
                  msn: int) -> None:
        """The fast path's ACKs (``RequestFastPath.ack_sink``): straight into the
        TX ring, counted as :meth:`RoceFabric.transmit` counts the ACK packet."""
        fabric, ep = self.fabric, self.endpoint
        ok = fabric._routable.get(peer)     # _is_routable's cache, without its frame
        if ok is None:
            ok = fabric._is_routable(peer)
        if ep is None or fabric.wire_sink is None or not ok:
            fabric.metrics.tx_unroutable += 1
            return
        ep.transmit_ack(peer, self.port, dest_qp, pkey, psn, syndrome, msn)
        fabric.metrics.tx_packets += 1

    def poll(self) -> bool:
        """Drain the socket now (busy-poll hook); True if datagrams came."""
        ep = self.endpoint
        return ep is not None and ep.poll()

    def _drain(self) -> None:
        """The fabric's ``drain``: take what the socket holds before a
        retransmission timer fires. The event loop runs due timers before it
        looks at the sockets, so after the daemon lost the CPU for a while the
        ACK timer would fire on ACKs sitting in the socket buffer (a spurious
        go-back-N of the whole window). Not while a batch is being delivered."""
        ep = self.endpoint
        if ep is not None and not ep.delivering:
            ep.poll()

    def _on_packet(self, pkt: RocePacket, src: str, sport: int) -> None:
        # read the clock for every packet that comes this way: one the native fast path
        # took before it in the batch made pumps_pending true without reading it, and an
        # ACK handled with an old ``now`` arms the retransmission timer already expired
        self._now = now = monotonic()
        try:
            self.fabric.receive(pkt, src, now, defer=True, sport=sport)
        except Exception:  # the daemon boundary: one bad packet must not stop the fabric
            log.exception("RoCE fabric: internal error on a packet from %s", src)

    def _on_batch_end(self) -> None:
        fabric = self.fabric
        if fabric._deferred:            # pumps_pending, without the property's frame
            # the clock of the pumps: the native fast path takes most packets without
            # _on_packet, so _now may be from long ago; a pump that starts WQEs with
            # it arms their ACK timer already expired (a spurious go-back-N)
            self._now = monotonic()
            while fabric._deferred:     # a QP whose pump raised is already off the list
                try:
                    fabric.flush_deferred(self._now)
                except Exception:
                    log.exception("RoCE fabric: internal error pumping after a batch")
        if self.on_busy is not None:
            self.on_busy()

    async def aclose(self) -> None:
        self.fabric.sink = None
        self.fabric.wire_sink = None
        self.fabric.set_tx_direct(None)
        self.fabric.drain = None
        if self.endpoint is not None:
            ep, self.endpoint = self.endpoint, None
            await ep.aclose()
