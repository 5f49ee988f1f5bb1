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

Bad datagrams are counted in :class:`UdpMetrics` and dropped.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable

from .errors import IcrcMismatch, MalformedPacket
from .icrc import ROCE_UDP_PORT, IpContext
from .packet import RocePacket, decode

# linux/in.h, linux/in6.h, linux/udp.h (not exported by the socket module)
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
UDP_NO_CHECK6_TX = 101
UDP_NO_CHECK6_RX = 102
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
#: Socket buffers: a QP keeps up to 128 unacknowledged packets in flight
#: (512 KiB at MTU 4096, about twice that in kernel accounting), and a
#: datagram dropped for want of buffer costs a go-back-N retransmission of
#: everything after it, so leave room for several busy QPs.
SOCKET_BUFFER = 16 << 20


@dataclass(slots=True)
class UdpMetrics:
    tx_packets: int = 0
    tx_errors: int = 0
    rx_packets: int = 0
    rx_malformed: int = 0
    rx_icrc_errors: int = 0
    rx_id_recovered: int = 0       # IPv4 packets whose non-zero ID had to be solved for


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


class RoceUdpEndpoint(asyncio.DatagramProtocol):
    """One RoCEv2 UDP endpoint. ``on_packet(pkt, peer_ip)`` gets every valid
    packet; demultiplexing by destination QP is the caller's job."""

    def __init__(self, on_packet: Callable[[RocePacket, str], None]) -> None:
        self.on_packet = on_packet
        self.metrics = UdpMetrics()
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("", 0)
        self._closed: asyncio.Future | None = None

    # asyncio.DatagramProtocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.local = transport.get_extra_info("sockname")[:2]
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def error_received(self, exc) -> None:
        self.metrics.tx_errors += 1

    def datagram_received(self, data: bytes, addr) -> None:
        m = self.metrics
        m.rx_packets += 1
        ctx = IpContext(addr[0], self.local[0], sport=addr[1], dport=self.local[1])
        try:
            pkt = self.decode(data, ctx)
        except IcrcMismatch:
            m.rx_icrc_errors += 1
            return
        except MalformedPacket:
            m.rx_malformed += 1
            return
        self.on_packet(pkt, addr[0])

    def decode(self, data: bytes, ctx: IpContext) -> RocePacket:
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

    # sending
    def send(self, pkt: RocePacket, peer: str, port: int = ROCE_UDP_PORT) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("RoCE UDP endpoint is closed")
        ctx = IpContext(self.local[0], peer, sport=self.local[1], dport=port)
        self.transport.sendto(pkt.encode(ctx), (peer, port))
        self.metrics.tx_packets += 1

    async def aclose(self) -> None:
        if self.transport is not None:
            self.transport.close()
            if self._closed is not None:
                await self._closed


async def open_endpoint(host: str, on_packet: Callable[[RocePacket, str], None],
                        port: int = ROCE_UDP_PORT) -> RoceUdpEndpoint:
    """Bind ``host:port`` and return the endpoint (owner of the socket;
    close it with :meth:`RoceUdpEndpoint.aclose`)."""
    loop = asyncio.get_running_loop()
    sock = make_socket(host, port)
    try:
        _, proto = await loop.create_datagram_endpoint(lambda: RoceUdpEndpoint(on_packet),
                                                       sock=sock)
    except BaseException:
        sock.close()
        raise
    return proto
