"""The wire path's direct transmit (``_datapath.run_wire_sq`` encoding the
packets of the WQEs it starts straight into the UDP endpoint's TX ring,
``TxRing.add_msg`` through ``RoceFabric.tx_route``) against the Python
engine, whose packets go the whole way (``RoceFabric.transmit``, RocePacket
by RocePacket, the reference encoder).

The harness is the sans-I/O one of tests/virtio_rdma/test_wire_fastpath.py
(two device cores, a channel that loses, duplicates and reorders, seeded
random WQE mixes and window-filling rounds), with each fabric given a
:class:`fabric.roce.TxRoute` over a real :class:`roce._udpio.TxRing` whose
datagrams (``flush_bytes``) go into that channel instead of a socket. Every
datagram's bytes (in order: retransmissions after loss included), guest
memory, CQEs, QP and engine state and every counter must be identical; a
small ring (3 slots) makes messages overflow it mid-run. The real endpoint
(``RoceUdpEndpoint.tx_ring`` / ``tx_added``, sockets on the loopback) is
checked at the end against ``RoceUdpEndpoint.transmit``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fabric.roce import TxRoute
from roce._codec import Envelope
from roce._udpio import TxRing
from roce.icrc import IpContext
from roce.packet import PacketRun
from roce.rc.requester import _SEND_OPS
from roce.rc.sgl import SgList
from tests.fabric.test_roce_fabric import Hosts, Wire
from tests.virtio_rdma.test_wire_fastpath import IMPAIRMENTS, _scenario, _window_scenario
from verbs import SendFlags, WrOpcode
from virtio_rdma import _datapath

PORT = 4791


class RingWire(Wire):
    """The test channel, also fed with whole datagrams (from TX rings);
    ``digest`` hashes every datagram handed to it, in order."""

    def __init__(self, fabrics, **kw):
        super().__init__(fabrics, **kw)
        self.digest = hashlib.sha256()
        for f in fabrics:
            f.sink = self._encoder_for(f.address)

    def _encoder_for(self, src):
        def sink(pkt, peer):
            self.put(src, peer, pkt.encode(IpContext(src, peer, sport=PORT, dport=PORT)))
        return sink

    def put(self, src: str, peer: str, data: bytes) -> None:
        """What Wire's sink does with a packet, for its bytes."""
        self.digest.update(len(data).to_bytes(4, "little") + data)
        self.sent += 1
        if self.cut or self.rng.random() < self.loss:
            return
        self.queue.append((src, peer, data))
        if self.rng.random() < self.dup:
            self.queue.append((src, peer, data))


class RingEndpoint:
    """What a TxRoute needs of the UDP endpoint (``flush``, ``tx_added``),
    over a real TX ring whose datagrams go into the test channel."""

    def __init__(self, wire: RingWire, src: str, nslots: int):
        self.wire, self.src = wire, src
        self.ring = TxRing(nslots)
        self.tx_packets = 0

    def flush(self) -> None:
        for data, (ip, port) in self.ring.flush_bytes():
            assert port == PORT
            self.wire.put(self.src, ip, data)

    def tx_added(self, n: int, seal: bool) -> None:
        assert not seal
        self.tx_packets += n
        self.flush()


def direct_hosts(nslots: int):
    def make(**kw):
        h = Hosts(**kw)
        h.wire = RingWire([h.fa, h.fb], **kw)
        h.endpoints = []
        for f in (h.fa, h.fb):
            ep = RingEndpoint(h.wire, f.address, nslots)
            h.endpoints.append(ep)
            f.set_tx_direct(lambda peer, f=f, ep=ep: TxRoute(
                f, ep, ep.ring, Envelope(f.address, peer, PORT, PORT), False))
        return h
    return make


@pytest.mark.parametrize("nslots", [3, 64])
@pytest.mark.parametrize("impair", IMPAIRMENTS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_direct_transmit_is_the_python_path(nslots, impair, seed):
    d0 = _datapath.wire_direct_msgs
    fast = _scenario(seed, IMPAIRMENTS[impair], True, direct_hosts(nslots))
    d1 = _datapath.wire_direct_msgs
    slow = _scenario(seed, IMPAIRMENTS[impair], False, direct_hosts(nslots))
    assert _datapath.wire_direct_msgs == d1, "Python run went native"
    assert fast == slow
    assert d1 >= d0


@pytest.mark.parametrize("impair", IMPAIRMENTS)
def test_direct_transmit_fixed_mixes(impair):
    """A fixed mix and window-filling rounds (messages longer than the
    3-slot ring, WQEs held for want of window, a bad lkey failing the QP):
    the same bytes and state, and the direct path really carried them."""
    d0 = _datapath.wire_direct_msgs
    assert _scenario(0, IMPAIRMENTS[impair], True, direct_hosts(3)) == \
        _scenario(0, IMPAIRMENTS[impair], False, direct_hosts(3))
    assert _window_scenario(1, IMPAIRMENTS[impair], True, direct_hosts(3)) == \
        _window_scenario(1, IMPAIRMENTS[impair], False, direct_hosts(3))
    assert _datapath.wire_direct_msgs - d0 > 30


def test_direct_and_packet_runs_are_the_same_bytes():
    """The native path with and without the direct route (PacketRuns through
    RoceFabric.transmit and the sink): the same datagrams."""
    prev = _datapath.wire_direct
    try:
        _datapath.wire_direct = False
        runs = _window_scenario(5, IMPAIRMENTS["impaired"], True, direct_hosts(3))
    finally:
        _datapath.wire_direct = prev
    d0 = _datapath.wire_direct_msgs
    direct = _window_scenario(5, IMPAIRMENTS["impaired"], True, direct_hosts(3))
    assert _datapath.wire_direct_msgs > d0
    assert runs == direct


def test_add_msg_is_add_run():
    """TxRing.add_run is add_msg of the run's fields: random runs (part of a
    message, any start, IMM/RETH/SE, AckReq cadence, many small SG entries)
    encoded by the ring are the reference packets' bytes."""
    rng = random.Random(3)
    gathered = 0
    for _ in range(200):
        op = rng.choice([WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                         WrOpcode.RDMA_WRITE_WITH_IMM])
        mtu = rng.choice([256, 1024])
        length = rng.randrange(0, 5 * mtu)
        npkts = max(1, -(-length // mtu))
        first = rng.randrange(npkts)
        count = rng.randrange(1, npkts - first + 1)
        data = rng.randbytes(length)
        # up to 20 SG entries: a packet of more pieces than a datagram's iovecs is copied
        cuts = sorted(rng.randrange(length + 1) for _ in range(rng.choice([1, 1, 19])))
        sgl = SgList([memoryview(data[x:y])
                      for x, y in zip([0, *cuts], [*cuts, length], strict=True)])
        run = PacketRun(_SEND_OPS[op], npkts, first, count, rng.getrandbits(24),
                        rng.getrandbits(24), rng.getrandbits(16), mtu, length, sgl,
                        (rng.getrandbits(64), rng.getrandbits(32))
                        if op in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM) else None,
                        rng.getrandbits(32) if op in (WrOpcode.SEND_WITH_IMM,
                                                      WrOpcode.RDMA_WRITE_WITH_IMM) else None,
                        None, rng.random() < 0.5, rng.randrange(3), rng.choice([2, 64]))
        env = Envelope("192.0.2.1", "192.0.2.2", PORT, PORT)
        ring = TxRing(3)
        got, j = [], rng.randrange(count + 1)
        while True:
            j2 = ring.add_run(run, env, j)
            got += [d for d, _ in ring.flush_bytes()]
            if j2 == count:
                break
            j = j2
        start = count - len(got)
        want = [p.encode(IpContext("192.0.2.1", "192.0.2.2", sport=PORT, dport=PORT))
                for p in run.packets()[start:]]
        assert got == want
        gathered += ring.gathered
    assert gathered >= 10     # packets of more than 8 pieces were copied, not refused


def test_real_endpoint_route_counts_as_transmit():
    """Two RoCE fabrics on the loopback, real sockets: plain SENDs went the
    direct way, arrived, and the fabric's and endpoint's tx_packets count
    every packet as RoceFabric.transmit counts them; flushed natively at the
    end of run_wire_sq (TxRing.flush_direct) or through the endpoint's
    Python tx_added, every counter of both endpoints and fabrics is the same."""
    port = random.randrange(40000, 60000)
    native = asyncio.run(_loopback(port, True))
    python = asyncio.run(_loopback(port, False))
    assert native["direct_flushes"] > 0 and python["direct_flushes"] == 0
    del native["direct_flushes"], python["direct_flushes"]
    assert native == python


def _completions(sa, sb, ga, ca, gb, cb, n: int) -> tuple[list, list]:
    """Poll both sockets and both CQs until each side has at least ``n`` CQEs (bounded)."""
    got_a: list = []
    got_b: list = []
    for _ in range(100000):
        sb.poll()
        sa.poll()
        got_a += ga.poll(ca)
        got_b += gb.poll(cb)
        if len(got_a) >= n and len(got_b) >= n:
            break
    return got_a, got_b


async def _loopback(port: int, direct: bool) -> dict:
    from tests.virtio_rdma.driver import fabric_sides, loopback_fabrics

    a_ip, b_ip = "127.0.0.51", "127.0.0.52"
    async with loopback_fabrics(a_ip, b_ip, port) as (fa, fb, sa, sb):
        if not direct:      # TxRing.flush_direct declines: TxRoute.done in Python
            sa.endpoint._tx.owner = sb.endpoint._tx.owner = None
        (ga, qa, ca, ma), (gb, qb, cb, mb) = fabric_sides(
            fa, fb, size=4 << 20, cq=64, mr=1 << 16, max_send_wr=32, max_recv_wr=32, max_send_sge=16)
        ga.connect(qa, qb.qpn, gid=fb.gid, path_mtu=1)        # 256 B: several packets
        gb.connect(qb, qa.qpn, gid=fa.gid, path_mtu=1)
        assert isinstance(fa.tx_route(b_ip), TxRoute)
        payload = random.Random(9).randbytes(3000)
        ga.write(ma.addr, payload)
        for i in range(6):
            gb.post_recv(qb, i, [(mb, 4096 * i, 4096)])
        d0 = _datapath.wire_direct_msgs
        for i in range(5):
            ga.write_send_wqe(qa, i, WrOpcode.SEND, [(ma.addr, 500 * i, ma.lkey)],
                              flags=SendFlags.SIGNALED)
        # a guest's SEND of 12 small SGEs: more pieces in a packet than a datagram's
        # iovecs take (the ring copies that packet)
        ga.write_send_wqe(qa, 5, WrOpcode.SEND, [(ma.addr + 5 * k, 5, ma.lkey)
                                                  for k in range(12)],
                          flags=SendFlags.SIGNALED)
        g0 = sa.endpoint._tx.gathered
        ga.ring_sq(qa)
        assert _datapath.wire_direct_msgs - d0 == 6
        assert sa.endpoint._tx.gathered - g0 == 1
        got_a, got_b = _completions(sa, sb, ga, ca, gb, cb, 6)
        assert [c.status for c in got_a + got_b] == [0] * 12
        for i in range(5):
            assert gb.read(mb.addr + 4096 * i, 500 * i) == payload[:500 * i]
        assert gb.read(mb.addr + 4096 * 5, 60) == payload[:60]
        pkts = sum(max(1, -(-500 * i // 256)) for i in range(5)) + 1
        assert fa.metrics.tx_packets == sa.endpoint.metrics.tx_packets == pkts
        assert fa.metrics.tx_unroutable == 0
        route = fa.tx_route(b_ip)
        out = {"direct_flushes": sa.endpoint._tx.direct_flushes
               + sb.endpoint._tx.direct_flushes}
        for k, m in (("ea", sa.endpoint.metrics), ("eb", sb.endpoint.metrics),
                     ("fa", fa.metrics), ("fb", fb.metrics)):
            out.update({f"{k}.{f}": v for f, v in dataclasses.asdict(m).items()})
    assert fa.tx_route(b_ip) is None         # the closed endpoint is no route
    with pytest.raises(ConnectionError):     # one kept from before fails as transmit does
        route.done(1)
    assert fa.metrics.tx_packets == pkts
    return out


def test_native_flush_keeps_a_backlog_first():
    """With datagrams waiting for the socket (the endpoint's backlog),
    run_wire_sq's native flush (TxRing.flush_direct) declines and the
    endpoint's Python path keeps the order (the SEND queued behind what
    waited, both sent); without one the next SEND is flushed natively; a
    closed endpoint drops the ring's owner, and the route raises as
    transmit does."""
    asyncio.run(_backlog(random.randrange(40000, 60000)))


async def _backlog(port: int) -> None:
    import socket

    from tests.virtio_rdma.driver import fabric_sides, loopback_fabrics

    a_ip, b_ip = "127.0.0.53", "127.0.0.54"
    async with loopback_fabrics(a_ip, b_ip, port) as (fa, fb, sa, sb):
        (ga, qa, ca, ma), (gb, qb, cb, mb) = fabric_sides(
            fa, fb, size=4 << 20, cq=64, mr=1 << 12, max_send_wr=16, max_recv_wr=16)
        ga.connect(qa, qb.qpn, gid=fb.gid)
        gb.connect(qb, qa.qpn, gid=fa.gid)
        gb.post_recv(qb, 0, [(mb, 0, 64)])
        gb.post_recv(qb, 1, [(mb, 64, 64)])
        # a listener where the backlog's datagram goes, and a backlog for it
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((b_ip, 0))
        probe.setblocking(False)
        ep, ring = sa.endpoint, sa.endpoint._tx
        ep._tx_left([(b"waited", probe.getsockname())])
        d0, f0 = _datapath.wire_direct_msgs, ring.direct_flushes
        ga.write(ma.addr, b"x" * 64)
        ga.post_send(qa, 0, WrOpcode.SEND, [(ma, 0, 64)], flags=SendFlags.SIGNALED)
        assert _datapath.wire_direct_msgs - d0 == 1        # encoded into the ring natively
        assert ring.direct_flushes == f0                   # but not flushed there
        # the endpoint's flush put the SEND behind what waited and sent both in order
        assert ring.count == 0 and not ep._backlog
        assert probe.recv(64) == b"waited"
        probe.close()
        got_a, got_b = _completions(sa, sb, ga, ca, gb, cb, 1)
        assert [c.status for c in got_a + got_b] == [0, 0]
        assert gb.read(mb.addr, 64) == b"x" * 64
        # no backlog now: the next SEND is flushed natively
        ga.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 64)], flags=SendFlags.SIGNALED)
        assert ring.direct_flushes == f0 + 1 and ring.count == 0
        assert fa.metrics.tx_packets == ep.metrics.tx_packets == 2
        route = fa.tx_route(b_ip)
    assert ring.owner is None                                  # the cycle is broken on close
    with pytest.raises(ConnectionError):
        route.done(1)
