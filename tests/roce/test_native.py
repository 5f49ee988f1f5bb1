"""The native packet path against the Python reference (and scapy):

* roce._icrc: CRC-32 against zlib, the ICRC against the zlib reference, for
  random lengths, alignments and seeds;
* roce._codec: decode/encode of every opcode give the reference's packets and
  bytes; wherever the reference raises (garbage, corruption, an ICRC only a
  non-zero IPv4 ID explains, fields out of range, missing or extra headers)
  the native call returns None; scapy decodes what it encodes;
* roce._udpio: TxRing/RxRing over real loopback sockets carry the reference's
  bytes, for single packets and for PacketRuns (scattered SG lists, a ring
  too small for a run);
* roce.rc._fastrx.RequestFastPath: the same datagram streams of WRITEs and of
  SENDs (in order, with gaps, duplicates, bad lengths and P_Keys, other QPs,
  strangers, receives that run short, are too small or wait unposted)
  through the fast path + engine and through the engine alone leave the same
  memory, completions, responder state, counters and ACKs.
"""
from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import zlib

import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import IP, UDP, raw
from scapy.contrib.roce import BTH as ScapyBTH

from roce import _codec, _icrc
from roce._udpio import RxRing, TxRing
from roce.errors import MalformedPacket, RoceError
from roce.headers import Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth
from roce.icrc import IpContext, compute_icrc, compute_icrc_reference
from roce.opcodes import OPCODE_TABLE, Ext, Opcode, opinfo
from roce.packet import PacketRun, RocePacket, decode, expand
from roce.rc import MemoryTable, RcQp
from verbs import PSN_MASK, Access, QpState
from roce.rc._fastrx import STOP_REASONS, RequestFastPath
from roce.rc.sgl import SgList
from roce.udp import RoceUdpEndpoint, make_socket

u = lambda bits: st.integers(0, (1 << bits) - 1)  # noqa: E731

A, B = "127.0.0.31", "127.0.0.32"
CTX4 = IpContext("192.0.2.1", "192.0.2.2", sport=50000, dport=4791)
CTX6 = IpContext("2001:db8::1", "2001:db8::2", sport=50001, dport=4791)
ENV4 = _codec.Envelope("192.0.2.1", "192.0.2.2", 50000, 4791)
ENV6 = _codec.Envelope("2001:db8::1", "2001:db8::2", 50001, 4791)
EXT = {Ext.RETH: st.builds(Reth, u(64), u(32), u(32)), Ext.AETH: st.builds(Aeth, u(8), u(24)),
       Ext.IMMDT: st.builds(ImmDt, u(32)), Ext.ATOMIC_ETH: st.builds(AtomicEth, u(64), u(32),
                                                                     u(64), u(64)),
       Ext.ATOMIC_ACK_ETH: st.builds(AtomicAckEth, u(64)), Ext.DETH: st.builds(Deth, u(32), u(24)),
       Ext.IETH: st.builds(Ieth, u(32))}


# ------------------------------------------------------------------- CRC
def test_kernel_is_named():
    assert _icrc.kernel() in ("pclmul", "slice-by-8")


@settings(max_examples=300)
@given(data=st.binary(max_size=700), seed=u(32), offset=st.integers(0, 15))
def test_crc32_is_zlib(data, seed, offset):
    buf = bytes(offset) + data
    assert _icrc.crc32(memoryview(buf)[offset:], seed) == zlib.crc32(data, seed)


@pytest.mark.parametrize("n", [63, 64, 127, 128, 129, 4096, 4111, 9000, 65536 + 5])
def test_crc32_folding_lengths(n):
    data = random.Random(n).randbytes(n)
    for seed in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert _icrc.crc32(data, seed) == zlib.crc32(data, seed)
    # fed in pieces, like a payload scattered over SG entries
    crc = 0
    for i in range(0, n, 1000):
        crc = _icrc.crc32(data[i:i + 1000], crc)
    assert crc == zlib.crc32(data)


@settings(max_examples=100)
@given(ident=u(16), tos=u(8), ttl=u(8), df=st.booleans(), flow=u(20), n=st.integers(12, 5000),
       v6=st.booleans())
def test_native_icrc_is_the_reference(ident, tos, ttl, df, flow, n, v6):
    if v6:
        ctx = IpContext("2001:db8::7", "2001:db8::9", 1000, tos=tos, ttl=ttl, flow_label=flow)
    else:
        ctx = IpContext("198.51.100.1", "203.0.113.9", 1000, ip_id=ident, df=df, tos=tos, ttl=ttl)
    ib = random.Random(n).randbytes(n)
    ip, udp = ctx.headers(n + 4)
    want = compute_icrc_reference(ip, udp, ib)
    assert _icrc.compute_icrc(ip, udp, ib) == want == compute_icrc(ip, udp, ib)


# ----------------------------------------------------------------- codec
def _packet(data, opcode):
    info = opinfo(opcode)
    p = RocePacket(data.draw(st.builds(Bth, opcode=st.just(opcode), dest_qp=u(24), psn=u(24),
                                       se=st.booleans(), m=st.booleans(), pkey=u(16),
                                       fecn=st.booleans(), becn=st.booleans(), resv6=u(6),
                                       ackreq=st.booleans(), resv7=u(7))))
    for e in info.exts:
        setattr(p, e.value, data.draw(EXT[e]))
    if info.has_payload:
        p.payload = data.draw(st.binary(max_size=300))
    return p


@pytest.mark.parametrize("opcode", sorted(OPCODE_TABLE))
@settings(max_examples=15)
@given(data=st.data())
def test_encode_decode_are_the_reference(opcode, data):
    for ctx, env in ((CTX4, ENV4), (CTX6, ENV6)):
        p = _packet(data, opcode)
        q = RocePacket(**{f: getattr(p, f) for f in p.__slots__})
        wire = p.encode(ctx)
        assert _codec.encode(q, env) == wire and q.icrc == p.icrc
        ref = decode(wire, ctx)
        got = _codec.decode(wire, env)
        assert got == ref and bytes(got.payload) == bytes(ref.payload)
        assert (got.icrc, got.ip_id) == (ref.icrc, ref.ip_id)


def _reference_or_none(data, ctx):
    try:
        return decode(data, ctx)
    except MalformedPacket:
        return None


@settings(max_examples=400)
@given(data=st.binary(max_size=120))
def test_decode_garbage_like_the_reference(data):
    assert _codec.decode(data, ENV4) == _reference_or_none(data, CTX4)


@settings(max_examples=200)
@given(opcode=st.sampled_from(sorted(OPCODE_TABLE)), flips=st.lists(st.tuples(u(16), u(8)),
                                                                    max_size=3),
       cut=st.integers(0, 8))
def test_decode_corruption_like_the_reference(opcode, flips, cut):
    info = opinfo(opcode)
    p = RocePacket(Bth(opcode=opcode, dest_qp=5, psn=7),
                   payload=b"abcdefg" if info.has_payload else b"")
    for e in info.exts:
        setattr(p, e.value, {Ext.RETH: Reth(1, 2, 3), Ext.AETH: Aeth(0x1F, 1), Ext.IMMDT: ImmDt(9),
                             Ext.ATOMIC_ETH: AtomicEth(8, 1, 2, 3), Ext.ATOMIC_ACK_ETH:
                             AtomicAckEth(4), Ext.DETH: Deth(1, 2), Ext.IETH: Ieth(3)}[e])
    wire = bytearray(p.encode(CTX4))
    for pos, val in flips:
        wire[pos % len(wire)] ^= val
    wire = bytes(wire[:len(wire) - cut])
    assert _codec.decode(wire, ENV4) == _reference_or_none(wire, CTX4)


def test_decode_leaves_nonzero_ipv4_id_to_the_reference():
    ctx = IpContext("192.0.2.1", "192.0.2.2", 50000, 4791, ip_id=0x1234)
    wire = RocePacket(Bth(opcode=4, dest_qp=1, psn=2), payload=b"rxe").encode(ctx)
    assert _codec.decode(wire, ENV4) is None
    assert decode(wire, CTX4, recover_ipv4_id=True).ip_id == 0x1234


@pytest.mark.parametrize("bad", [
    lambda p: setattr(p, "bth", Bth(opcode=4, dest_qp=1 << 24, psn=0)),
    lambda p: setattr(p, "bth", Bth(opcode=4, dest_qp=1, psn=-1)),
    lambda p: setattr(p, "bth", Bth(opcode=0x15, dest_qp=1, psn=0)),     # unknown opcode
    lambda p: setattr(p, "bth", Bth(opcode=4, dest_qp=1, psn=0, pkey=1 << 16)),
    lambda p: setattr(p, "reth", Reth(1, 2, 3)),                        # extra header
    lambda p: setattr(p, "bth", Bth(opcode=6, dest_qp=1, psn=0)),       # RETH missing
    lambda p: setattr(p, "bth", Bth(opcode=0x11, dest_qp=1, psn=0)),    # payload on an ACK
    lambda p: setattr(p, "payload", 5),
])
def test_encode_returns_none_where_the_reference_raises(bad):
    p = RocePacket(Bth(opcode=4, dest_qp=1, psn=0), payload=b"xy")
    bad(p)
    assert _codec.encode(p, ENV4) is None
    with pytest.raises((RoceError, TypeError)):
        p.encode(CTX4)


@pytest.mark.parametrize("opcode", [0x04, 0x0A, 0x0B, 0x11, 0x13])
def test_scapy_reads_native_bytes(opcode):
    p = RocePacket(Bth(opcode=opcode, dest_qp=0x123, psn=0x456, ackreq=True))
    for e in opinfo(opcode).exts:
        setattr(p, e.value, {Ext.RETH: Reth(0x1000, 7, 5), Ext.AETH: Aeth(0x1F, 9),
                             Ext.IMMDT: ImmDt(0xAB), Ext.ATOMIC_ETH: AtomicEth(8, 1, 2, 3)}[e])
    if opinfo(opcode).has_payload:
        p.payload = b"hello"
    wire = _codec.encode(p, ENV4)
    pkt = IP(raw(IP(src="192.0.2.1", dst="192.0.2.2", flags="DF", id=0)
                 / UDP(sport=50000, dport=4791) / wire))
    bth = pkt[ScapyBTH]
    assert (bth.opcode, bth.dqpn, bth.psn, bth.ackreq) == (opcode, 0x123, 0x456, 1)
    assert bth.icrc == int.from_bytes(bth.compute_icrc(b""), "big")    # scapy agrees with our ICRC


def test_fast_constructors_build_the_dataclasses():
    assert _codec.bth(4, 1, 2, True, True, 0x7FFF) == Bth(opcode=4, dest_qp=1, psn=2, se=True,
                                                          ackreq=True, pkey=0x7FFF)
    assert _codec.aeth(0x1F, 3) == Aeth(0x1F, 3) and _codec.reth(1, 2, 3) == Reth(1, 2, 3)
    assert _codec.packet(_codec.bth(0x11, 1, 2), aeth=Aeth(0, 1)) == \
        RocePacket(Bth(opcode=0x11, dest_qp=1, psn=2), aeth=Aeth(0, 1))


# ------------------------------------------------------------------- rings
@pytest.fixture
def socks():
    tx, rx = make_socket(A, 0), make_socket(B, 0)
    yield tx, rx
    tx.close()
    rx.close()


def _recv_all(rx_sock, ring, want):
    got = []
    for _ in range(200):
        n = ring.recv(rx_sock.fileno())
        got += [ring.datagram(i) for i in range(n)]
        if len(got) >= want:
            break
        select.select([rx_sock], [], [], 0.05)
    return got


def _ctx(tx, rx):
    return IpContext(A, B, sport=tx.getsockname()[1], dport=rx.getsockname()[1])


def _env(tx, rx):
    return _codec.Envelope(A, B, tx.getsockname()[1], rx.getsockname()[1])


def test_tx_ring_sends_reference_bytes(socks):
    tx, rx = socks
    ring = TxRing(8)
    pkts = [RocePacket(Bth(opcode=4, dest_qp=i, psn=i), payload=os.urandom(i * 37))
            for i in range(20)]
    env = _env(tx, rx)
    for p in pkts:
        if not ring.add(p, env):
            assert ring.full
            assert ring.flush(tx.fileno())[:2] == (8, 0)
            assert ring.add(p, env)
    ring.flush(tx.fileno())
    rring = RxRing(32)
    got = _recv_all(rx, rring, len(pkts))
    assert got == [p.encode(_ctx(tx, rx)) for p in pkts]


def _run(sgl, length, mtu, first, count, **kw):
    npkts = max(1, -(-length // mtu))
    return PacketRun((0x06, 0x07, 0x09, 0x0B), npkts, first, count, (0xFFFFF0 + first) & PSN_MASK,
                     0x22, 0xFFFF, mtu, length, sgl, **kw)


def _as_sent(got, pkts, tx, rx):
    """The reference encoding of ``pkts`` for the IPv4 ID each datagram of
    ``got`` carries (UDP GSO gives the segments of a send IDs 0, 1, ...)."""
    ids = []
    for d in got:
        try:
            ids.append(decode(d, _ctx(tx, rx), recover_ipv4_id=True).ip_id)
        except RoceError:
            ids.append(0)
    return [p.encode(IpContext(A, B, sport=tx.getsockname()[1], dport=rx.getsockname()[1], ip_id=k))
            for p, k in zip(pkts, ids)], ids


@pytest.mark.parametrize("gso", [False, True])
@pytest.mark.parametrize("nslots", [3, 64])
@pytest.mark.parametrize("pieces", [[5000], [100, 1, 2000, 2900], [4096, 904]])
def test_runs_are_their_packets(socks, nslots, pieces, gso):
    tx, rx = socks
    rng = random.Random(len(pieces))
    bufs = [bytearray(rng.randbytes(n)) for n in pieces]
    sgl = SgList([memoryview(b) for b in bufs])
    length = sum(pieces)
    runs = [_run(sgl, length, 1024, 0, 2, reth=(0x1000, 0x77), noack=62),
            _run(sgl, length, 1024, 2, 3, reth=(0x1000, 0x77), imm=0xABCD, se=True, noack=0,
                 ack_every=2)]
    env = _env(tx, rx)
    ring = TxRing(nslots, gso=gso)
    for r in runs:
        j = 0
        while j < r.count:
            j = ring.add_run(r, env, j)
            if j < r.count:
                ring.flush(tx.fileno())
    ring.flush(tx.fileno())
    ps = expand(runs)
    got = _recv_all(rx, RxRing(16), len(ps))
    want, ids = _as_sent(got, ps, tx, rx)
    assert got == want
    # GSO runs: FIRST and a (shorter) MIDDLE; then MIDDLE, MIDDLE, LAST (the
    # 3-slot ring flushes after the first MIDDLE of the second WQE)
    assert ids == ([0, 1, 0, 1, 2] if gso and nslots == 64 else [0, 1, 0, 0, 1] if gso else [0] * 5)
    assert ring.gso_datagrams == (5 if gso and nslots == 64 else 4 if gso else 0)
    assert ring.gso_calls == (2 if gso else 0) and ring.gso_fallbacks == 0
    assert [p.bth.ackreq for p in ps] == [False, True, False, True, True]
    assert ps[0].reth == Reth(0x1000, 0x77, length) and ps[-1].immdt == ImmDt(0xABCD)
    assert ps[-1].bth.se and ps[-1].bth.opcode == 0x09 and ps[2].bth.psn == 0xFFFFF2


def test_run_rejects_a_payload_beyond_its_sg_list(socks):
    tx, rx = socks
    sgl = SgList([memoryview(bytearray(100))])
    with pytest.raises(ValueError):
        TxRing(4).add_run(_run(sgl, 5000, 1024, 0, 2), _env(tx, rx))


def test_rx_ring_packets_and_peers(socks):
    tx, rx = socks
    pkt = RocePacket(Bth(opcode=0x0A, dest_qp=3, psn=4), reth=Reth(1, 2, 5), payload=b"hello")
    tx.sendto(pkt.encode(_ctx(tx, rx)), rx.getsockname())
    tx.sendto(b"junk", rx.getsockname())
    ring = RxRing(4)
    _recv_all(rx, ring, 2)
    env = _codec.Envelope(A, B, tx.getsockname()[1], rx.getsockname()[1])
    assert ring.peer(0) == (A, tx.getsockname()[1]) and ring.peer_key(0) == ring.peer_key(1)
    st0, p0 = ring.packet(0, env)
    assert st0 == 0 and p0 == decode(ring.datagram(0), _ctx(tx, rx))
    assert ring.packet(1, env) == (1, None)
    with pytest.raises(IndexError):
        ring.packet(2, env)


def test_endpoint_backlog_keeps_order_when_the_socket_buffer_is_full():
    async def main():
        got = []
        b = RoceUdpEndpoint(make_socket(B, 0), lambda p, ip: got.append(p.bth.psn))
        sa = make_socket(A, 0)
        sa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # a few datagrams at most
        a = RoceUdpEndpoint(sa, lambda p, ip: None)
        try:
            pkts = [RocePacket(Bth(opcode=4, dest_qp=1, psn=i), payload=bytes(3000))
                    for i in range(300)]
            for i in range(0, 300, 30):
                a.transmit(pkts[i:i + 30], B, b.local[1])
            for _ in range(200):
                if len(got) == 300:
                    break
                await asyncio.sleep(0.01)
        finally:
            await a.aclose()
            await b.aclose()
        return got, a.metrics
    got, m = asyncio.run(asyncio.wait_for(main(), 20))
    assert got == list(range(300)) and m.tx_packets == 300 and m.tx_errors == 0


# ------------------------------------------------------ WRITE fast path
class _Ring:
    """The guest ring index the fast path compares with (``qp.rq_pi``)."""

    def __init__(self, rq_pi: int):
        self.rq_pi = rq_pi


class _Target:
    def __init__(self, peer: str, mtu: int, size: int):
        self.peer = peer
        self.sports = None           # any source port (RoceFabric sets the allowed ones)
        self.mem = MemoryTable()
        self.buf = bytearray(size)
        self.rkey, self.va = self.mem.register(self.buf, Access.REMOTE_WRITE)
        self.rc = RcQp(0x44, self.mem)
        self.rc.modify(QpState.INIT)
        self.rc.modify(QpState.RTR, dest_qp_num=0x55, path_mtu=mtu, rq_psn=0xFFFFFA)
        self.done = 0
        self.rq_posted = 0           # NetworkQp's: every receive the guest posted is the engine's
        self.qp = _Ring(0)
        self.sent: list = []         # ACKs the fast path handed to its ack_sink (after transmit's)

    def ack_sink(self, peer, dest_qp, pkey, psn, syndrome, msn):
        assert (peer, dest_qp, pkey) == (self.peer, self.rc.cfg.dest_qp_num, self.rc.cfg.pkey)
        self.sent.append((Opcode.RC_ACKNOWLEDGE, psn, Aeth(syndrome, msn)))

    def state(self):
        r = self.rc.responder
        return (bytes(self.buf), r.psn, r.msn, r.nak_sent, r.cur_kind,
                None if r.cur is None else r.cur.offset, self.rc.metrics.as_dict(),
                [(p.bth.opcode, p.bth.psn, p.aeth) for p in self.rc.transmit(0.0)] + self.sent)


def _stream(seed: int, mtu: int, target: _Target):
    """Datagrams of a few WRITEs from the target's peer, with impairments."""
    rng = random.Random(seed)
    out, psn = [], 0xFFFFFA
    for _ in range(4):
        n = rng.randrange(1, 6)
        length = (n - 1) * mtu + rng.randrange(1, mtu + 1)
        va = target.va + rng.randrange(0, len(target.buf) - length + 1)
        data = rng.randbytes(length)
        for i in range(n):
            op = (0x0A if n == 1 else 0x06 if i == 0 else 0x08 if i == n - 1 else 0x07)
            p = RocePacket(Bth(opcode=op, dest_qp=0x44, psn=(psn + i) & PSN_MASK,
                               ackreq=i == n - 1 or rng.random() < 0.2),
                           payload=data[i * mtu:(i + 1) * mtu])
            if i == 0:
                p.reth = Reth(va, target.rkey, length)
                r = rng.random()
                if r < 0.05:                                    # an R_Key of no region
                    p.reth = Reth(va, target.rkey ^ 0x100, length)
                elif r < 0.1:                                   # beyond the region
                    p.reth = Reth(target.va + len(target.buf) - length + 1, target.rkey, length)
                elif r < 0.15 and n > 1:                        # a DMA length the packets miss
                    p.reth = Reth(va, target.rkey, length + mtu)
            out.append(p)
        psn = (psn + n) & PSN_MASK
    return _impair(rng, out)


def _impair(rng: random.Random, out: list) -> list:
    """Impairments of a packet stream, each with some probability: a
    duplicate, a swap, a loss, a wrong P_Key, a payload a byte short, a
    packet for another QP."""
    def redo(q, bth=None, payload=None):
        return RocePacket(bth or q.bth, reth=q.reth, immdt=q.immdt,
                          payload=q.payload if payload is None else payload)
    if rng.random() < 0.3 and len(out) > 3:
        k = rng.randrange(1, len(out))
        out.insert(k, out[k - 1])                               # duplicate
    if rng.random() < 0.3 and len(out) > 3:
        k = rng.randrange(1, len(out) - 1)
        out[k], out[k + 1] = out[k + 1], out[k]                 # reorder
    if rng.random() < 0.2 and len(out) > 3:
        del out[rng.randrange(1, len(out))]                     # loss
    if rng.random() < 0.2:
        k = rng.randrange(len(out))
        b = out[k].bth
        out[k] = redo(out[k], Bth(opcode=b.opcode, dest_qp=0x44, psn=b.psn, pkey=0x1234))
    if rng.random() < 0.2:
        k = rng.randrange(len(out))
        out[k] = redo(out[k], payload=bytes(out[k].payload)[:-1])
    if rng.random() < 0.2:
        k = rng.randrange(len(out))
        b = out[k].bth
        out[k] = redo(out[k], Bth(opcode=b.opcode, dest_qp=0x45, psn=b.psn))
    return out


def _feed(ring, n, envs, targets, fast):
    i = 0
    while i < n:
        if fast is not None:
            i = fast(ring, i, n, envs)
            if i >= n:
                break
        env = envs[ring.peer_key(i)]
        status, pkt = ring.packet(i, env)
        i += 1
        if status:
            continue
        t = targets.get(pkt.bth.dest_qp)
        if t is not None and t.peer == env.src:
            t.rc.receive(pkt, 0.0)


def _through_socket(socks, pkts):
    """Send ``pkts`` from the one peer and receive them into a ring: (ring,
    datagrams received, envelopes)."""
    tx, rx = socks
    for p in pkts:
        tx.sendto(p.encode(_ctx(tx, rx)), rx.getsockname())
    ring = RxRing(64)
    n = len(_recv_all(rx, ring, len(pkts)))
    ip, port = ring.peer(0)
    return ring, n, {ring.peer_key(0): _codec.Envelope(ip, B, port, rx.getsockname()[1])}


def _fast_and_engine_agree(ring, n, envs, ta, tb, sink=False) -> RequestFastPath:
    """Feed the ring to ``ta`` through the fast path and the engine, and to
    ``tb`` through the engine alone; both must end in the same state. With
    ``sink`` the fast path sends its ACKs itself (``ack_sink``, as the UDP
    service has it) when it takes the rest of the batch."""
    taken = []
    fast = RequestFastPath({0x44: ta}, lambda t, k: taken.append(k))
    if sink:
        fast.ack_sink = ta.ack_sink
    _feed(ring, n, envs, {0x44: ta}, fast)
    _feed(ring, n, envs, {0x44: tb}, None)
    assert ta.state() == tb.state()
    assert sum(taken) == fast.taken
    assert fast.acks_sent == len(ta.sent) and (sink or not ta.sent)
    return fast


@pytest.mark.parametrize("sink", [False, True], ids=["acks-to-engine", "acks-to-sink"])
@pytest.mark.parametrize("seed", range(40))
def test_fast_path_is_the_engine(socks, seed, sink):
    tx, rx = socks
    mtu = 256
    ta, tb = _Target(A, mtu, 8192), _Target(A, mtu, 8192)       # fast path / engine alone
    stranger = seed % 5 == 0
    if seed % 7 == 3:   # the guest posted receives the engine lacks: FIRST/ONLY are Python's
        ta.qp = _Ring(1)
    pkts = _stream(seed, mtu, ta)
    for p in pkts:
        tx.sendto(p.encode(_ctx(tx, rx)), rx.getsockname())
    if stranger:                                                # right QP, wrong source
        s = make_socket("127.0.0.33", 0)
        s.sendto(pkts[-1].encode(IpContext("127.0.0.33", B, s.getsockname()[1],
                                           rx.getsockname()[1])), rx.getsockname())
        s.close()
    ring = RxRing(64)
    n = len(_recv_all(rx, ring, len(pkts) + stranger))
    envs = {}
    for i in range(n):
        ip, port = ring.peer(i)
        envs.setdefault(ring.peer_key(i), _codec.Envelope(ip, B, port, rx.getsockname()[1]))
    fast = _fast_and_engine_agree(ring, n, envs, ta, tb, sink)
    assert STOP_REASONS[fast.stop]


def test_fast_path_takes_the_bulk(socks):
    t = _Target(A, 1024, 65536)
    data = os.urandom(65536)
    pkts = []
    for i in range(64):
        op = 0x06 if i == 0 else 0x08 if i == 63 else 0x07
        p = RocePacket(Bth(opcode=op, dest_qp=0x44, psn=(0xFFFFFA + i) & PSN_MASK,
                           ackreq=i % 16 == 15), payload=data[i * 1024:(i + 1) * 1024])
        if i == 0:
            p.reth = Reth(t.va, t.rkey, 65536)
        pkts.append(p)
    ring, n, envs = _through_socket(socks, pkts)
    fast = RequestFastPath({0x44: t}, lambda tg, k: None)
    _feed(ring, n, envs, {0x44: t}, fast)
    assert fast.taken == 64 and bytes(t.buf) == data     # the FIRST packet natively too
    acks = t.rc.transmit(0.0)
    assert [(p.bth.opcode, p.bth.psn) for p in acks] == [(Opcode.RC_ACKNOWLEDGE,
                                                          (0xFFFFFA + 63) & PSN_MASK)]
    assert t.rc.responder.msn == 1 and t.rc.metrics.rx_packets == 64


# ------------------------------------------------------- SEND fast path
class _SendTarget(_Target):
    """A _Target that also receives SENDs: receives of varied SG lists over
    its own buffer. ``rq_posted``/``qp.rq_pi`` as NetworkQp has them: equal
    unless the guest posted receives the engine has not been given."""

    def __init__(self, peer: str, mtu: int, rng: random.Random, receives: int, unposted: bool):
        super().__init__(peer, mtu, 8192)
        self.rbuf = bytearray(receives * 2 * mtu)
        view = memoryview(self.rbuf)
        for w in range(receives):
            base = w * 2 * mtu
            size = rng.choice([mtu, mtu // 2, 3, 0]) if rng.random() < 0.2 else mtu + 7
            cuts = sorted(rng.sample(range(1, size), min(2, size - 1))) if size > 2 and \
                rng.random() < 0.4 else []
            edges = [0, *cuts, size]
            self.rc.post_recv(w, [view[base + a:base + b] for a, b in zip(edges, edges[1:])])
        self.rq_posted = receives
        self.qp = _Ring(receives + 1 if unposted else receives)

    def state(self):
        return (*super().state(), bytes(self.rbuf), len(self.rc.responder.rq),
                [(c.wr_id, c.status, c.opcode, c.byte_len, c.imm_data, c.src_qp)
                 for c in self.rc.poll_recv_cq()])


def _send_stream(seed: int, mtu: int, target: _Target):
    """Datagrams of SENDs (mostly one packet, with and without immediate data,
    a few longer) and a WRITE, impaired."""
    rng = random.Random(seed)
    out, psn = [], 0xFFFFFA
    for _ in range(8):
        if rng.random() < 0.15:                                 # a WRITE between the SENDs
            length = rng.randrange(1, mtu + 1)
            out.append(RocePacket(Bth(opcode=0x0A, dest_qp=0x44, psn=psn, ackreq=True),
                                  reth=Reth(target.va, target.rkey, length),
                                  payload=rng.randbytes(length)))
            psn = (psn + 1) & PSN_MASK
            continue
        n = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
        length = rng.randrange(0, mtu + 1) if n == 1 else (n - 1) * mtu + rng.randrange(1, mtu + 1)
        data, imm = rng.randbytes(length), rng.random() < 0.4
        for i in range(n):
            last = i == n - 1
            op = ((0x05 if imm else 0x04) if n == 1 else 0x00 if i == 0
                  else (0x03 if imm else 0x02) if last else 0x01)
            p = RocePacket(Bth(opcode=op, dest_qp=0x44, psn=(psn + i) & PSN_MASK,
                               ackreq=last or rng.random() < 0.2, se=rng.random() < 0.1),
                           payload=data[i * mtu:(i + 1) * mtu])
            if last and imm:
                p.immdt = ImmDt(rng.getrandbits(32))
            out.append(p)
        psn = (psn + n) & PSN_MASK
    return _impair(rng, out)


@pytest.mark.parametrize("sink", [False, True], ids=["acks-to-engine", "acks-to-sink"])
@pytest.mark.parametrize("seed", range(60))
def test_send_fast_path_is_the_engine(socks, seed, sink):
    """SEND streams through the fast path + engine and through the engine
    alone: the same receive buffers and WRITE target, completions (status,
    length, immediate data), responder state, counters and ACKs. Receives
    run short (RNR), are sometimes too small (LOC_LEN_ERR) or scattered over
    several SGEs, and sometimes wait unposted (the fast path must not run)."""
    tx, rx = socks
    mtu = 256
    rng_a, rng_b = random.Random(seed), random.Random(seed)
    receives, unposted = 3 + seed % 7, seed % 9 == 4
    ta = _SendTarget(A, mtu, rng_a, receives, unposted)        # fast path
    tb = _SendTarget(A, mtu, rng_b, receives, unposted)        # engine alone
    ring, n, envs = _through_socket(socks, _send_stream(seed, mtu, ta))
    fast = _fast_and_engine_agree(ring, n, envs, ta, tb, sink)
    if unposted:
        assert fast.taken == 0


def _send_target(receives: int) -> _SendTarget:
    """A _SendTarget with ``receives`` 64-byte receives (wr_id 0, 1, ...) posted
    to the engine and counted in the ring, as NetworkQp has them."""
    t = _SendTarget(A, 1024, random.Random(0), 0, False)
    buf = memoryview(bytearray(64 * receives))
    for w in range(receives):
        t.rc.post_recv(w, [buf[w * 64:(w + 1) * 64]])
    t.rq_posted = t.qp.rq_pi = receives
    return t


def test_send_fast_path_takes_request_reply_traffic(socks):
    """Plain one-packet SENDs, with and without immediate data, are all taken
    natively; the completions and the coalesced ACK are the engine's."""
    tx, rx = socks
    t = _SendTarget(A, 1024, random.Random(0), 0, False)
    buf = memoryview(bytearray(64 * 16))
    for w in range(16):
        t.rc.post_recv(100 + w, [buf[w * 64:w * 64 + 40], buf[w * 64 + 40:(w + 1) * 64]])
    t.rq_posted = t.qp.rq_pi = 16
    msgs = [os.urandom(1 + i * 4) for i in range(16)]
    pkts = [RocePacket(Bth(opcode=0x05 if i % 2 else 0x04, dest_qp=0x44,
                           psn=(0xFFFFFA + i) & PSN_MASK, ackreq=True), payload=m,
                       immdt=ImmDt(0x01020304 + i) if i % 2 else None)
            for i, m in enumerate(msgs)]
    ring, n, envs = _through_socket(socks, pkts)
    fast = RequestFastPath({0x44: t}, lambda tg, k: None)
    _feed(ring, n, envs, {0x44: t}, fast)
    assert fast.taken == 16 and STOP_REASONS[fast.stop] == "end of batch"
    cs = t.rc.poll_recv_cq()
    assert [(c.wr_id, c.byte_len, c.imm_data) for c in cs] == \
        [(100 + i, len(m), 0x01020304 + i if i % 2 else None) for i, m in enumerate(msgs)]
    assert all(bytes(buf[i * 64:i * 64 + len(m)]) == m for i, m in enumerate(msgs))
    assert [(p.bth.opcode, p.bth.psn, p.aeth.msn) for p in t.rc.transmit(0.0)] == \
        [(Opcode.RC_ACKNOWLEDGE, (0xFFFFFA + 15) & PSN_MASK, 16)]
    assert t.rc.responder.msn == 16 and t.rc.metrics.rx_packets == 16


def test_fast_path_sends_the_coalesced_ack_itself(socks):
    """With an ``ack_sink``, a batch of plain SENDs taken whole leaves one
    ACK (the last AckReq's, with its MSN), sent by the fast path, none in the
    engine's output, the engine's counters as if it had sent it; a batch the
    fast path stops in puts its ACK in the engine's output instead."""
    for stop in (False, True):
        t = _send_target(8)
        pkts = [RocePacket(Bth(opcode=0x04, dest_qp=0x44, psn=(0xFFFFFA + i) & PSN_MASK,
                               ackreq=i < 6), payload=b"m%d" % i) for i in range(8)]
        if stop:                                        # a READ for the engine, at the end
            pkts.append(RocePacket(Bth(opcode=0x0C, dest_qp=0x44, psn=(0xFFFFFA + 8) & PSN_MASK),
                                   reth=Reth(t.va, t.rkey, 0)))
        ring, n, envs = _through_socket(socks, pkts)
        fast = RequestFastPath({0x44: t}, lambda tg, k: None)
        fast.ack_sink = t.ack_sink
        assert fast(ring, 0, n, envs) == 8
        ack = (Opcode.RC_ACKNOWLEDGE, (0xFFFFFA + 5) & PSN_MASK, Aeth(0x1F, 6))
        out = [(p.bth.opcode, p.bth.psn, p.aeth) for p in t.rc.responder.out]
        assert (out, t.sent, fast.acks_sent) == (([ack], [], 0) if stop else ([], [ack], 1))
        assert t.rc.metrics.tx_packets == 1 and t.rc.responder.msn == 8


def test_tx_ring_ack_is_the_reference_packet():
    """TxRing.add_ack gives the bytes TxRing.add gives for the responder's ACK
    packet (IPv4 and IPv6, sealed or not), and refuses fields out of range."""
    from roce._auth import TxAuth
    from roce.build import make_aeth, make_bth, make_packet

    rng = random.Random(5)
    for k in range(200):
        env = ENV4 if k % 2 else ENV6
        seal = k % 3 == 0
        dqp, pkey, psn = rng.getrandbits(24), rng.getrandbits(16), rng.getrandbits(24)
        syn, msn = rng.getrandbits(8), rng.getrandbits(24)
        a, b = TxRing(4), TxRing(4)
        a.set_auth(TxAuth(b"k" * 32, 1000 + k))
        b.set_auth(TxAuth(b"k" * 32, 1000 + k))
        assert a.add(make_packet(make_bth(Opcode.RC_ACKNOWLEDGE, dqp, psn, False, False, pkey),
                                 aeth=make_aeth(syn, msn)), env, seal)
        assert b.add_ack(env, dqp, pkey, psn, syn, msn, seal)
        assert a.flush_bytes() == b.flush_bytes()
    full = TxRing(1)
    assert full.add_ack(ENV4, 1, 2, 3, 4, 5) and not full.add_ack(ENV4, 1, 2, 3, 4, 5)
    for bad in ((1 << 24, 0, 0, 0, 0), (0, 1 << 16, 0, 0, 0), (0, 0, 1 << 24, 0, 0),
                (0, 0, 0, 256, 0), (0, 0, 0, 0, 1 << 24)):
        with pytest.raises(ValueError):
            TxRing(2).add_ack(ENV4, *bad)


@pytest.mark.parametrize("kind", ["write", "send"])
def test_fast_path_leaves_a_wrong_source_port_to_python(socks, kind):
    """The fast path takes a QP's packets only from a source port in its
    ``sports`` (RoceFabric.receive's check, which counts the others): with
    the sender's port it takes them all, with any other none, untouched."""
    tx, rx = socks
    port = tx.getsockname()[1]
    for sports, want in ((frozenset({port}), True), (frozenset({port + 1, 4791}), False)):
        if kind == "write":
            t = _Target(A, 1024, 8192)
            data = os.urandom(8192)
            pkts = [RocePacket(Bth(opcode=0x06 if i == 0 else 0x08 if i == 7 else 0x07,
                                   dest_qp=0x44, psn=(0xFFFFFA + i) & PSN_MASK, ackreq=i == 7),
                               reth=Reth(t.va, t.rkey, 8192) if i == 0 else None,
                               payload=data[i * 1024:(i + 1) * 1024]) for i in range(8)]
            t.rc.receive(decode(pkts[0].encode(_ctx(tx, rx)), _ctx(tx, rx)), 0.0)  # FIRST
            pkts = pkts[1:]
        else:
            t = _send_target(4)
            pkts = [RocePacket(Bth(opcode=0x04, dest_qp=0x44, psn=(0xFFFFFA + i) & PSN_MASK,
                                   ackreq=True), payload=b"m%d" % i) for i in range(4)]
        t.sports = sports
        before = t.state()
        ring, n, envs = _through_socket(socks, pkts)
        fast = RequestFastPath({0x44: t}, lambda tg, k: None)
        assert fast(ring, 0, n, envs) == (n if want else 0)
        assert fast.taken == (len(pkts) if want else 0)
        if not want:
            assert t.state() == before
