"""RoCEv2 over a plain UDP socket (IBTA vol. 1 annex A17: UDP destination
port 4791), as a thin asyncio/uvloop adapter around the pure codecs.

Sending: the socket is unconnected and has ``IP_MTU_DISCOVER =
IP_PMTUDISC_DO``, so Linux sets DF and writes IPv4 ID 0 (``ip_select_ident``
gives DF datagrams of unconnected sockets ID 0); the ICRC computed in
userspace for ID 0 is then the one on the wire. The socket must be bound to
a concrete local address: the ICRC covers the source address.

Receiving: a UDP socket does not show the IP header. Senders such as kernel
rxe put a non-zero IPv4 ID in it; :func:`roce.icrc.solve_ipv4_id` recovers
the only ID that makes the ICRC valid (the ICRC is affine in the ID), so the
packet is still fully verified. DF is assumed set (rxe and this module set
it); a packet only valid without DF is accepted too. IPv6 sockets set
``UDP_NO_CHECK6_RX`` because rxe sends IPv6/UDP with a zero checksum.

Authentication (:mod:`roce.auth`, optional: :meth:`RoceUdpEndpoint.set_auth`):
every datagram to a peer that is not a plaintext peer is sealed as it is
built in the TX ring, and every datagram from such a peer is verified,
checked against its sender's replay window and stripped right after
``recvmmsg``, before any decoding or the fast path; one that fails never
goes further. Datagrams from plaintext peers are plain RoCEv2.

Sending through UDP GSO (:mod:`roce._udpio`): each flush sends runs of
equal datagrams to one peer as one message with ``UDP_SEGMENT`` (one skb
through the stack instead of one per packet); the kernel cuts the same
datagrams from it, segment ``k`` with IPv4 ID ``k``, for which its ICRC was
computed. Off with ``VRDMA_UDP_GSO=0`` in the environment (or
:attr:`RoceUdpEndpoint.gso`), and by itself on a socket whose kernel path
refuses it (counted in ``tx_gso_fallbacks``).

Receiving through UDP GRO (``UDP_GRO``, Linux >= 5.0): the kernel may hand
over several datagrams of one sender in one buffer (a GSO send that crossed
a veth whole, or datagrams a NIC's GRO coalesced); the RX ring splits them
back into datagrams before anything else looks at them (counted in
``rx_gro_buffers`` / ``rx_gro_packets``). Off with ``VRDMA_UDP_GRO=0``.

Bad datagrams are counted in :class:`UdpMetrics` and dropped.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import auth as auth_codec
from .errors import IcrcMismatch, MalformedPacket
from .icrc import ROCE_UDP_PORT, IpContext
from .opcodes import Opcode
from .packet import PacketRun, RocePacket, decode

if TYPE_CHECKING:
    from ._auth import RxAuth, TxAuth

# linux/in.h, linux/in6.h, linux/udp.h (not exported by the socket module)
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
UDP_NO_CHECK6_TX = 101
UDP_NO_CHECK6_RX = 102
UDP_GRO = 104
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
#: Socket buffers: a QP keeps up to 128 unacknowledged packets in flight
#: (512 KiB at MTU 4096, about twice that in kernel accounting), and a
#: datagram dropped for want of buffer costs a go-back-N retransmission of
#: everything after it, so leave room for several busy QPs.
SOCKET_BUFFER = 16 << 20

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UdpMetrics:
    tx_packets: int = 0
    tx_errors: int = 0
    rx_packets: int = 0
    rx_errors: int = 0             # recvmmsg failures (not counted as packets)
    rx_malformed: int = 0
    rx_icrc_errors: int = 0
    rx_id_recovered: int = 0       # IPv4 packets whose non-zero ID had to be solved for
    # authentication (set_auth): datagrams verified, and dropped for a bad tag
    # (or too short for a trailer), a replayed counter; from plaintext peers
    rx_authenticated: int = 0
    rx_auth_failed: int = 0
    rx_replayed: int = 0
    rx_plaintext: int = 0
    tx_sealed: int = 0
    tx_acks_parked: int = 0        # ACK-only output of a SEND's batch held for the reply (PARK_BATCH)
    # UDP GSO: sends of a run of datagrams, the datagrams they carried, sends
    # the kernel refused (then sent one by one, and GSO off on the socket)
    tx_gso_calls: int = 0
    tx_gso_datagrams: int = 0
    tx_gso_fallbacks: int = 0
    # UDP GRO: received buffers holding several datagrams, the datagrams split from them
    rx_gro_buffers: int = 0
    rx_gro_packets: int = 0


def make_socket(host: str, port: int = ROCE_UDP_PORT) -> socket.socket:
    """A bound, non-blocking UDP socket configured for RoCEv2 (see module doc)."""
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        raise ValueError(f"bind RoCE to a concrete address, not {host}: the ICRC covers it")
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            s.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_RX, 1)
        if GRO:
            s.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
        _size_buffers(s, SOCKET_BUFFER)
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _size_buffers(s: socket.socket, size: int) -> None:
    """Ask for ``size``-byte buffers; beyond net.core.[rw]mem_max only root
    (CAP_NET_ADMIN) gets them, through SO_*BUFFORCE; otherwise the capped size."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, plain, size)


#: Datagrams per recvmmsg / sendmmsg call, and receive calls per readiness
#: callback (then the loop runs other callbacks before reading more).
BATCH = 64
ROUNDS = 4
#: send runs of equal datagrams through UDP GSO, take coalesced buffers with
#: UDP GRO (see the module doc)
GSO = os.environ.get("VRDMA_UDP_GSO", "1") != "0"
GRO = os.environ.get("VRDMA_UDP_GRO", "1") != "0"
#: envelopes (per peer address and port) cached in each direction
MAX_PEERS = 4096
#: ACK parking (off unless :attr:`RoceUdpEndpoint.park_acks` is set): when a
#: batch of at most this many datagrams brought the end of a SEND and all it
#: left to send is ACKs, those wait (parked) for whatever leaves next -- the
#: reply the guest is about to post, in the same sendmmsg -- for at most two
#: more polls that find nothing (or until the event loop runs its next
#: callbacks): the request-reply pattern then costs one system call and one
#: receive wakeup per message instead of two. Larger batches (streams) flush
#: at once. Measured on a shared 2-vCPU VM (bench.suite fabric_lat, daemons
#: --poll-us 50): the half round trip's tail shrinks (p99 ~150 us instead of
#: 1.7-2.9 ms, fewer blocked waits) but its typical value grows from ~64 to
#: ~105 us -- the early ACK was what kept the peer daemon's busy-poll window
#: open while the reply was being made -- hence off by default. Measured again
#: with the fast path's own ACKs and wire_settle (bench.fabric_bench send_lat,
#: pinned per host, three interleaved rounds each): parked as here 101-102 us
#: against 55-57 unparked; held for one poll only (the ACK leaves right after
#: the daemon's yield to its guest, with the reply if the guest posted it)
#: 60-72 against 54-56; and with the sending daemon kept polling past its
#: window while an answer is due, 60-73: the early ACK stays.
PARK_BATCH = 4
_SEND_ENDS = bytes([Opcode.RC_SEND_LAST, Opcode.RC_SEND_LAST_WITH_IMMEDIATE,
                    Opcode.RC_SEND_ONLY, Opcode.RC_SEND_ONLY_WITH_IMMEDIATE,
                    Opcode.RC_SEND_LAST_WITH_INVALIDATE, Opcode.RC_SEND_ONLY_WITH_INVALIDATE])
_ACKNOWLEDGE = int(Opcode.RC_ACKNOWLEDGE)


class RoceUdpEndpoint:
    """One RoCEv2 UDP endpoint over a bound non-blocking socket, which it owns
    (closed by :meth:`aclose`). ``on_packet(pkt, peer_ip)`` gets every valid
    packet; demultiplexing by destination QP is the caller's job.

    Receiving: each readiness callback (or :meth:`poll`, for a busy-polling
    loop) drains the socket with ``recvmmsg``, up to ``BATCH * ROUNDS``
    datagrams, checks each natively (:mod:`roce._codec`; a packet whose ICRC
    needs the IPv4 ID solved goes through the reference :meth:`decode`), and
    calls ``on_packet`` for each, then ``on_batch_end()`` once per batch.
    Packets queued while a batch is delivered leave together at its end.

    Sending: :meth:`send` sends one packet now; :meth:`transmit` queues
    packets and sends them with one ``sendmmsg`` (at once, or at the end of
    the batch being delivered). Payloads are not copied: they must stay valid
    until then. What the socket buffer cannot take waits for writability, in
    order."""

    def __init__(self, sock: socket.socket, on_packet: Callable[..., None],
                 loop: asyncio.AbstractEventLoop | None = None, *, ports: bool = False) -> None:
        from ._udpio import RxRing, TxRing

        self.sock = sock
        #: ``on_packet(pkt, peer_ip)``, or ``on_packet(pkt, peer_ip, peer_port)`` with ``ports``
        self.on_packet = on_packet
        self._ports = ports
        self.on_batch_end: Callable[[], None] | None = None
        #: ``fast(ring, i, n, envelopes) -> j`` takes slots ``i .. j-1`` itself
        #: (e.g. :class:`roce.rc._fastrx.RequestFastPath`); the rest are decoded
        self.fast: Callable[..., int] | None = None
        self.metrics = UdpMetrics()
        self.local: tuple[str, int] = sock.getsockname()[:2]
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._rx = RxRing(BATCH)
        self._tx = TxRing(BATCH, gso=GSO)
        #: native senders (run_wire_sq) flush on our socket: TxRing.flush_direct
        self._tx.owner = self
        self._rx_envs: dict = {}          # peer key -> Envelope(peer -> local)
        self._tx_envs: dict = {}          # (peer ip, port) -> Envelope(local -> peer)
        self._backlog: deque = deque()    # (bytes, (ip, port)) waiting for the socket buffer
        self._holding = False
        self._parked = 0                  # polls finding nothing before parked ACKs leave
        #: park the ACKs of a lone SEND until the reply leaves (see PARK_BATCH)
        self.park_acks = False
        self._closed = False
        self._rx_auth: RxAuth | None = None
        self._tx_auth: TxAuth | None = None
        self._mac_key: bytes | None = None
        self._plain: frozenset[str] = frozenset()
        self._windows: dict = {}          # reference path (datagram_received): peer -> window
        self.loop.add_reader(self._fd, self.poll)

    @property
    def gso(self) -> bool:
        """Are runs of datagrams sent through UDP GSO?"""
        return self._tx.gso

    @gso.setter
    def gso(self, on: bool) -> None:
        self._tx.gso = on

    @property
    def delivering(self) -> bool:
        """Is a received batch being delivered (its handlers are running)?"""
        return self._holding

    def set_auth(self, mac_key: bytes, plaintext_peers=(), counter: int | None = None) -> None:
        """Seal and verify every datagram (roce.auth), except to and from the
        addresses in ``plaintext_peers``. ``counter``: the first counter
        (default: the wall clock in nanoseconds, see roce.auth)."""
        import time

        from ._auth import RxAuth, TxAuth

        plain = frozenset(str(ipaddress.ip_address(p)) for p in plaintext_peers)
        self._rx_auth = RxAuth(mac_key, self.local[0], self.local[1], plain)
        self._tx_auth = TxAuth(mac_key, time.time_ns() if counter is None else counter)
        self._tx.set_auth(self._tx_auth)
        self._mac_key, self._plain = mac_key, plain
        self._tx_envs.clear()

    def _sync_auth_metrics(self, a: RxAuth) -> None:
        m = self.metrics
        m.rx_authenticated, m.rx_auth_failed = a.opened, a.failed + a.short
        m.rx_replayed, m.rx_plaintext = a.replayed, a.plaintext

    # ------------------------------------------------------------ receiving
    def poll(self) -> bool:
        """Receive and deliver what is queued on the socket now; True if
        anything was."""
        if self._closed:
            return False
        rx = self._rx
        got = False
        for _ in range(ROUNDS):
            try:
                n = rx.recv(self._fd)
            except OSError:
                self.metrics.rx_errors += 1
                break
            if not n:
                break
            got = True
            m = self.metrics
            m.rx_gro_buffers, m.rx_gro_packets = rx.gro_buffers, rx.gro_packets
            self._holding = True
            try:
                self._deliver(n)
                if self.on_batch_end is not None:
                    self.on_batch_end()
            except Exception:  # the I/O boundary: a bug in a handler must not stop the socket
                log.exception("RoCE UDP endpoint %s:%d: error delivering a batch", *self.local)
            finally:
                self._holding = False
                if self.park_acks and n <= PARK_BATCH and not self._parked and not self._closed \
                        and self._tx.only_opcode(_ACKNOWLEDGE) and rx.any_opcode(n, _SEND_ENDS):
                    self._park()
                else:
                    self.flush()
            if rx.slots < BATCH:
                break
        if not got and self._parked:
            self._parked -= 1
            if not self._parked:
                self.flush()
        return got

    def _park(self) -> None:
        """Hold the queued ACKs (see PARK_BATCH); the event loop's next
        callbacks send them if nothing did before."""
        self._parked = 2
        self.metrics.tx_acks_parked += 1
        self.loop.call_soon(self._unpark)

    def _unpark(self) -> None:
        if self._parked and not self._closed:
            self.flush()

    def _deliver(self, n: int) -> None:
        m = self.metrics
        rx, envs, on_packet, fast = self._rx, self._rx_envs, self.on_packet, self.fast
        dropped = None
        if self._rx_auth is not None:
            dropped = rx.open_sealed(n, self._rx_auth)
            self._sync_auth_metrics(self._rx_auth)
        ports = self._ports
        i = 0
        while i < n:
            if fast is not None:
                j = fast(rx, i, n, envs)
                m.rx_packets += j - i
                if j >= n:
                    return
                i = j
            m.rx_packets += 1
            if dropped is not None and i in dropped:     # failed authentication: counted
                i += 1
                continue
            key = rx.peer_key(i)
            env = envs.get(key)
            if env is None:
                env = self._rx_env(i, key)
            status, pkt = rx.packet(i, env)
            i += 1
            if status == 1:
                m.rx_malformed += 1
                continue
            if status == 2:                 # maybe a sender's non-zero IPv4 ID: the reference
                ctx = IpContext(env.src, env.dst, sport=env.sport, dport=env.dport)
                try:
                    pkt = self.decode(rx.datagram(i - 1), ctx)
                except IcrcMismatch:
                    m.rx_icrc_errors += 1
                    continue
                except MalformedPacket:
                    m.rx_malformed += 1
                    continue
            if ports:
                on_packet(pkt, env.src, env.sport)
            else:
                on_packet(pkt, env.src)

    def _rx_env(self, i: int, key):
        from ._codec import Envelope

        if len(self._rx_envs) >= MAX_PEERS:   # any source may send: keep the cache bounded
            self._rx_envs.clear()
        ip, port = self._rx.peer(i)
        env = self._rx_envs[key] = Envelope(ip, self.local[0], port, self.local[1])
        return env

    def datagram_received(self, data: bytes, addr) -> None:
        """One datagram from ``addr`` through the reference decoder (tools)."""
        m = self.metrics
        m.rx_packets += 1
        ctx = IpContext(addr[0], self.local[0], sport=addr[1], dport=self.local[1])
        if self._mac_key is not None and str(ipaddress.ip_address(addr[0])) not in self._plain:
            try:
                counter, data = auth_codec.open_sealed(self._mac_key, data, addr[0],
                                                       self.local[0], addr[1], self.local[1])
            except auth_codec.AuthError:
                m.rx_auth_failed += 1
                return
            if not self._windows.setdefault(addr, auth_codec.ReplayWindow()).accept(counter):
                m.rx_replayed += 1
                return
        try:
            pkt = self.decode(data, ctx)
        except IcrcMismatch:
            m.rx_icrc_errors += 1
            return
        except MalformedPacket:
            m.rx_malformed += 1
            return
        if self._ports:
            self.on_packet(pkt, addr[0], addr[1])
        else:
            self.on_packet(pkt, addr[0])

    def decode(self, data: bytes, ctx: IpContext) -> RocePacket:
        """The reference decode of a datagram from ``ctx.src``, solving for a
        non-zero IPv4 ID and trying without DF (see module doc)."""
        if ctx.version == 6:
            return decode(data, ctx)
        try:
            pkt = decode(data, ctx, recover_ipv4_id=True)
        except IcrcMismatch:
            pkt = decode(data, IpContext(ctx.src, ctx.dst, ctx.sport, ctx.dport, df=False),
                         recover_ipv4_id=True)
        if pkt.ip_id:
            self.metrics.rx_id_recovered += 1
        return pkt

    # -------------------------------------------------------------- sending
    def _tx_env(self, peer: str, port: int):
        """``(envelope, seal)`` of a destination."""
        e = self._tx_envs.get((peer, port))
        if e is None:
            from ._codec import Envelope

            if len(self._tx_envs) >= MAX_PEERS:
                self._tx_envs.clear()
            env = Envelope(self.local[0], peer, self.local[1], port)
            seal = self._tx_auth is not None and env.dst not in self._plain
            e = self._tx_envs[(peer, port)] = (env, seal)
        return e

    def transmit(self, packets, peer: str, port: int = ROCE_UDP_PORT) -> None:
        """Queue ``packets`` (:class:`RocePacket` s and
        :class:`~roce.packet.PacketRun` s) for ``peer``; they leave at once,
        or at the end of the batch being delivered."""
        if self._closed:
            raise ConnectionError("RoCE UDP endpoint is closed")
        env, seal = self._tx_env(peer, port)
        tx = self._tx
        m = self.metrics
        for pkt in packets:
            if type(pkt) is PacketRun:
                j = 0
                while True:
                    j = tx.add_run(pkt, env, j, seal)
                    if j == pkt.count:
                        break
                    self.flush()
                m.tx_packets += pkt.count
                continue
            if not tx.add(pkt, env, seal):
                if tx.full:
                    self.flush()
                    if tx.add(pkt, env, seal):
                        m.tx_packets += 1
                        continue
                # not encodable natively: the reference raises, or gives the bytes
                data = pkt.encode(IpContext(env.src, env.dst, env.sport, env.dport))
                if seal:
                    assert self._mac_key is not None and self._tx_auth is not None   # seal: set_auth ran
                    data = auth_codec.seal(self._mac_key, data, self._tx_auth.take(), env.src,
                                           env.dst, env.sport, env.dport)
                self._send_bytes(data, (peer, port))
            m.tx_packets += 1
        if seal:
            m.tx_sealed = self._tx_auth.sealed  # type: ignore[union-attr]  # seal: set_auth ran
        if not self._holding:
            self.flush()

    def transmit_ack(self, peer: str, port: int, dest_qp: int, pkey: int, psn: int,
                     syndrome: int, msn: int) -> None:
        """Queue the ACKNOWLEDGE with these fields for ``peer`` (the datagram
        :meth:`transmit` makes of the responder's ACK packet, built in the TX
        ring without one: :meth:`TxRing.add_ack`)."""
        if self._closed:
            raise ConnectionError("RoCE UDP endpoint is closed")
        e = self._tx_envs.get((peer, port))
        env, seal = e if e is not None else self._tx_env(peer, port)
        tx = self._tx
        if not tx.add_ack(env, dest_qp, pkey, psn, syndrome, msn, seal):
            self.flush()                    # full
            tx.add_ack(env, dest_qp, pkey, psn, syndrome, msn, seal)
        m = self.metrics
        m.tx_packets += 1
        if seal:
            m.tx_sealed = self._tx_auth.sealed  # type: ignore[union-attr]  # seal: set_auth ran
        if not self._holding:
            self.flush()

    def tx_ring(self, peer: str, port: int = ROCE_UDP_PORT):
        """``(ring, envelope, seal)`` of ``peer``: for a sender that encodes
        its packets into the TX ring itself (``TxRing.add_msg``:
        ``virtio_rdma._datapath.run_wire_sq``), calls :meth:`flush` when the
        ring is full and :meth:`tx_added` after, as :meth:`transmit` does."""
        if self._closed:
            raise ConnectionError("RoCE UDP endpoint is closed")
        env, seal = self._tx_env(peer, port)
        return self._tx, env, seal

    def tx_added(self, n: int, seal: bool) -> None:
        """``n`` packets went into the TX ring through :meth:`tx_ring`:
        counted as :meth:`transmit` counts them; they leave at once, or at
        the end of the batch being delivered. On a closed endpoint they are
        dropped and ConnectionError raised, as :meth:`transmit` raises."""
        if self._closed:
            self._tx.clear()
            raise ConnectionError("RoCE UDP endpoint is closed")
        m = self.metrics
        m.tx_packets += n
        if seal:
            m.tx_sealed = self._tx_auth.sealed  # type: ignore[union-attr]  # seal: set_auth ran
        if not self._holding:
            self.flush()

    def send(self, pkt: RocePacket, peer: str, port: int = ROCE_UDP_PORT) -> None:
        """Send one packet now."""
        self.transmit((pkt,), peer, port)
        self.flush()

    def flush(self) -> None:
        """Send everything queued."""
        self._parked = 0
        tx = self._tx
        if not tx.count:
            return
        if self._backlog:                   # keep the order: behind what already waits
            for item in tx.flush_bytes():
                self._backlog.append(item)
            self._on_writable()
            return
        _sent, errors, left = tx.flush(self._fd)
        m = self.metrics
        m.tx_errors += errors
        m.tx_gso_calls, m.tx_gso_datagrams, m.tx_gso_fallbacks = \
            tx.gso_calls, tx.gso_datagrams, tx.gso_fallbacks
        if left:
            self._tx_left(left)

    def _tx_left(self, left: list) -> None:
        """Datagrams the socket buffer had no room for: sent once it is
        writable (also from ``TxRing.flush_direct``)."""
        self._backlog.extend(left)
        self.loop.add_writer(self._fd, self._on_writable)

    def _send_bytes(self, data: bytes, addr) -> None:
        self.flush()
        if self._backlog:
            self._backlog.append((data, addr))
            return
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self._backlog.append((data, addr))
            self.loop.add_writer(self._fd, self._on_writable)
        except OSError:
            self.metrics.tx_errors += 1

    def _on_writable(self) -> None:
        q = self._backlog
        while q:
            data, addr = q[0]
            try:
                self.sock.sendto(data, addr)
            except BlockingIOError:
                self.loop.add_writer(self._fd, self._on_writable)
                return
            except OSError:
                self.metrics.tx_errors += 1
            q.popleft()
        self.loop.remove_writer(self._fd)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._fd)
        self.loop.remove_writer(self._fd)
        self._tx.clear()
        self._tx.owner = None
        self._backlog.clear()
        self.sock.close()


async def open_endpoint(host: str, on_packet: Callable[..., None],
                        port: int = ROCE_UDP_PORT, *, ports: bool = False) -> RoceUdpEndpoint:
    """Bind ``host:port`` and return the endpoint (owner of the socket;
    close it with :meth:`RoceUdpEndpoint.aclose`)."""
    loop = asyncio.get_running_loop()
    sock = make_socket(host, port)
    try:
        return RoceUdpEndpoint(sock, on_packet, loop, ports=ports)
    except BaseException:
        sock.close()
        raise
