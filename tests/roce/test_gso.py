"""UDP GSO in roce._udpio's TX ring, over real loopback sockets.

A run of equal datagrams leaves as one ``sendmmsg`` message with
``UDP_SEGMENT``; the kernel gives segment ``k`` IPv4 ID ``k``, so each
datagram's ICRC is the reference's for that ID, and the RX ring (which sees
no IP header) accepts it natively (an ID of 1 .. GSO_SEGMENTS - 1 is solved
for; any other needs the reference). Sealed runs open. A refused GSO send
(here ``SO_NO_CHECK``: a socket without UDP checksums cannot use GSO, the
kernel says EINVAL) is sent one datagram at a time for ID 0 (ICRC and seal
redone), counted, and the ring stops trying. Datagrams taken out of the ring
as bytes (the backlog's way) are for ID 0. Hostile datagrams on the solved-ID path are
rejected like any bad ICRC. UDP GRO: a buffer of coalesced datagrams (loopback
hands a GSO send to a ``UDP_GRO`` socket whole) is split back into the same
datagrams, sealed ones open one by one, and a sender's GSO with a segment
size that does not fit its packets, or a truncated last segment, gives bad
datagrams counted like any other. The multi-host stream, the capture and the
fallback through a device without checksum offload are in
tests/fabric/test_gso_multihost.py.
"""
from __future__ import annotations

import random
import select
import socket

import pytest

from roce import _codec
from roce._auth import RxAuth, TxAuth
from roce._udpio import RxRing, TxRing
from roce.auth import seal as ref_seal
from roce.errors import RoceError
from roce.icrc import IpContext
from roce.packet import PacketRun, RocePacket, decode, expand
from roce.headers import Bth
from roce.rc.sgl import SgList
from verbs import PSN_MASK

A, B = "127.0.0.41", "127.0.0.42"
SO_NO_CHECK = 11
KEY = bytes(range(32))


@pytest.fixture
def socks():
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((A, 0))
    rx.bind((B, 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    tx.setsockopt(socket.IPPROTO_IP, 10, 2)      # IP_MTU_DISCOVER = IP_PMTUDISC_DO, as roce.udp
    tx.setblocking(False)
    yield tx, rx
    tx.close()
    rx.close()


def _env(tx, rx):
    return _codec.Envelope(A, B, tx.getsockname()[1], rx.getsockname()[1])


def _ctx(tx, rx, ip_id=0):
    return IpContext(A, B, sport=tx.getsockname()[1], dport=rx.getsockname()[1], ip_id=ip_id)


def _write(length, mtu=1024, psn=0xFFFFF0, data=None):
    """A whole RDMA WRITE of ``length`` bytes as one PacketRun."""
    data = bytearray(random.Random(length).randbytes(length)) if data is None else data
    npkts = max(1, -(-length // mtu))
    return PacketRun((0x06, 0x07, 0x08, 0x0A), npkts, 0, npkts, psn & PSN_MASK, 0x22, 0xFFFF,
                     mtu, length, SgList([memoryview(data)]), reth=(0x1000, 0x77))


def _recv(rx, ring, want):
    """``want`` slots' (datagram, status, packet) from ``ring``."""
    got = []
    for _ in range(200):
        n = ring.recv(rx.fileno())
        got += [(ring.datagram(i), *ring.packet(i, _ENV_RX[0])) for i in range(n)]
        if len(got) >= want:
            break
        select.select([rx], [], [], 0.05)
    return got


_ENV_RX: list = []


@pytest.fixture(autouse=True)
def _rx_env(socks):
    tx, rx = socks
    _ENV_RX[:] = [_codec.Envelope(A, B, tx.getsockname()[1], rx.getsockname()[1])]


def _fill(ring, runs, env, fd, seal=False):
    for r in runs:
        j = 0
        while j < r.count:
            j = ring.add_run(r, env, j, seal)
            if j < r.count:
                ring.flush(fd)


@pytest.mark.parametrize("gso", [True, False])
def test_segments_carry_their_index_as_ip_id(socks, gso):
    tx, rx = socks
    # MTU 1024: FIRST (28 B of headers) and LAST (12); then FIRST and MIDDLE,
    # MIDDLE and a shorter LAST; a lone SEND ONLY (a run may end shorter, never
    # continue after a shorter datagram)
    runs = [_write(2048, psn=0), _write(4000, psn=2)]
    ring = TxRing(64, gso=gso)
    _fill(ring, runs, _env(tx, rx), tx.fileno())
    assert ring.add(RocePacket(Bth(opcode=0x04, dest_qp=0x22, psn=6), payload=b"x" * 7), _env(tx, rx))
    assert ring.flush(tx.fileno())[:2] == (7, 0)
    pkts = expand(runs) + [RocePacket(Bth(opcode=0x04, dest_qp=0x22, psn=6), payload=b"x" * 7)]
    got = _recv(rx, RxRing(16), len(pkts))
    ids = [0, 1, 0, 1, 0, 1, 0] if gso else [0] * 7
    assert [d for d, _, _ in got] == [p.encode(_ctx(tx, rx, k)) for p, k in zip(pkts, ids)]
    assert [(st, p.ip_id, p.bth.psn) for _, st, p in got] == [(0, k, q.bth.psn) for q, k in zip(pkts, ids)]
    assert (ring.gso_calls, ring.gso_datagrams, ring.gso_fallbacks) == ((3, 6, 0) if gso else (0, 0, 0))


def test_a_run_is_at_most_64_kib_and_gso_segments(socks):
    tx, rx = socks
    runs = [_write(64 * 4096 + 5, mtu=4096, psn=0)]       # 65 packets, 4 KiB MIDDLEs
    ring = TxRing(128)
    _fill(ring, runs, _env(tx, rx), tx.fileno())
    assert ring.flush(tx.fileno())[:2] == (65, 0)
    pkts = expand(runs)
    got = _recv(rx, RxRing(128), len(pkts))
    assert all(st == 0 for _, st, _ in got) and len(got) == 65
    # FIRST + MIDDLE (shorter than FIRST) | 15 MIDDLEs (a 16th would pass 64 KiB) | ... | LAST
    ids = [p.ip_id for _, _, p in got]
    assert ids[:2] == [0, 1] and ids[2:17] == list(range(15)) and max(ids) == 14
    assert [d for d, _, _ in got] == [p.encode(_ctx(tx, rx, k)) for p, k in zip(pkts, ids)]


def test_sealed_runs_open(socks):
    tx, rx = socks
    ring = TxRing(64)
    ring.set_auth(TxAuth(KEY, 1000))
    runs = [_write(6000, psn=0)]
    _fill(ring, runs, _env(tx, rx), tx.fileno(), seal=True)
    assert ring.flush(tx.fileno())[:2] == (6, 0) and ring.gso_datagrams == 6
    rring = RxRing(16)
    auth = RxAuth(KEY, B, rx.getsockname()[1], frozenset())
    n = 0
    for _ in range(100):
        n = rring.recv(rx.fileno())
        if n:
            break
        select.select([rx], [], [], 0.05)
    assert n == 6 and rring.open_sealed(n, auth) is None and auth.opened == 6
    got = [rring.packet(i, _ENV_RX[0]) for i in range(n)]
    assert [(st, p.ip_id) for st, p in got] == [(0, 0), (0, 1), (0, 0), (0, 1), (0, 2), (0, 3)]
    assert [p.bth.psn for _, p in got] == list(range(6))


@pytest.mark.parametrize("seal", [False, True])
def test_refused_gso_is_sent_alone_for_id_0(socks, seal):
    tx, rx = socks
    tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)       # GSO needs UDP checksums: EINVAL
    ring = TxRing(64)
    if seal:
        ring.set_auth(TxAuth(KEY, 50))
    runs = [_write(6000, psn=0)]
    _fill(ring, runs, _env(tx, rx), tx.fileno(), seal)
    assert ring.flush(tx.fileno())[:2] == (6, 0)
    assert (ring.gso_calls, ring.gso_fallbacks, ring.gso) == (0, 1, False)
    _fill(ring, [_write(3000, psn=6)], _env(tx, rx), tx.fileno(), seal)   # no more attempts
    assert ring.flush(tx.fileno())[:2] == (3, 0) and ring.gso_fallbacks == 1
    pkts = expand(runs) + expand([_write(3000, psn=6)])
    rring = RxRing(16)
    got = []
    auth = RxAuth(KEY, B, rx.getsockname()[1], frozenset())
    for _ in range(100):
        n = rring.recv(rx.fileno())
        got += [rring.datagram(i) for i in range(n)]
        if n and seal:
            assert rring.open_sealed(n, auth) is None
        if len(got) >= 9:
            break
        select.select([rx], [], [], 0.05)
    want = [p.encode(_ctx(tx, rx)) for p in pkts]
    if seal:   # the same counters, in order: the GSO version of a datagram never left
        want = [ref_seal(KEY, w, 50 + i, A, B, tx.getsockname()[1], rx.getsockname()[1])
                for i, w in enumerate(want)]
        assert auth.opened == 9
    assert got == want


def test_bytes_taken_from_the_ring_are_for_id_0(socks):
    tx, rx = socks
    ring = TxRing(64)
    runs = [_write(5000, psn=0)]
    _fill(ring, runs, _env(tx, rx), tx.fileno())
    out = ring.flush_bytes()
    assert [d for d, _ in out] == [p.encode(_ctx(tx, rx)) for p in expand(runs)]
    assert {a for _, a in out} == {(B, rx.getsockname()[1])} and ring.count == 0


def _datagram_for_id(tx, rx, ip_id, n=300):
    return RocePacket(Bth(opcode=0x04, dest_qp=5, psn=9), payload=bytes(n)).encode(_ctx(tx, rx, ip_id))


@pytest.mark.parametrize("ip_id, native", [(1, True), (63, True), (64, False), (0xBEEF, False)])
def test_only_gso_ids_are_solved_natively(socks, ip_id, native):
    """IDs a GSO send gives are accepted natively; others go to the reference
    (status 2), which recovers any ID (kernel rxe's), as before."""
    tx, rx = socks
    d = _datagram_for_id(tx, rx, ip_id)
    tx.sendto(d, rx.getsockname())
    (got, st, p), = _recv(rx, RxRing(4), 1)
    assert got == d
    assert (st, p.ip_id if p else None) == ((0, ip_id) if native else (2, None))
    assert decode(d, _ctx(tx, rx), recover_ipv4_id=True).ip_id == ip_id
    assert (_codec.decode(d, _ENV_RX[0]) is not None) == native


def test_hostile_icrcs_on_the_solved_id_path(socks):
    """A corrupted ICRC, a payload bit flipped in a GSO segment, a truncated
    segment: each fails like any bad datagram (status 2: the reference then
    counts it), none is taken for another ID."""
    tx, rx = socks
    rng = random.Random(5)
    bad = []
    for k in range(1, 40):
        d = bytearray(_datagram_for_id(tx, rx, k, n=rng.randrange(4, 4096) & ~3))
        which = k % 3
        if which == 0:
            d[-1 - rng.randrange(4)] ^= 1 << rng.randrange(8)
        elif which == 1:
            d[12 + rng.randrange(len(d) - 16)] ^= 1 << rng.randrange(8)
        else:
            d = d[:-4 - 4 * rng.randrange(1, 8)] + d[-4:]    # shorter, old ICRC kept
        bad.append(bytes(d))
    for d in bad:
        tx.sendto(d, rx.getsockname())
    got = _recv(rx, RxRing(64), len(bad))
    assert len(got) == len(bad) and all(st in (1, 2) and p is None for _, st, p in got)
    assert sum(st == 2 for _, st, _ in got) >= 26      # the flips: ICRC; truncation may be either
    for d in bad:
        with pytest.raises(RoceError):
            decode(d, _ctx(tx, rx), recover_ipv4_id=False)


# ------------------------------------------------------------------ UDP GRO
UDP_GRO, UDP_SEGMENT = 104, 103


def _gro(rx):
    rx.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)


def _recv_ring(rx, ring, want):
    """Receive into ``ring`` until it holds ``want`` datagrams (one recv)."""
    for _ in range(100):
        if ring.recv(rx.fileno()) >= want:
            return ring.count
        select.select([rx], [], [], 0.05)
    return ring.count


def test_gro_buffers_are_split_into_their_datagrams(socks):
    """Loopback hands a GSO send to a UDP_GRO socket whole: one slot, split
    back into the same datagrams the plain socket gets."""
    tx, rx = socks
    _gro(rx)
    runs = [_write(6000, psn=0)]
    ring = TxRing(64)
    _fill(ring, runs, _env(tx, rx), tx.fileno())
    assert ring.flush(tx.fileno())[:2] == (6, 0) and ring.gso_calls == 2
    rring = RxRing(8)
    assert _recv_ring(rx, rring, 6) == 6
    assert rring.slots == 2 and (rring.gro_buffers, rring.gro_packets, rring.gro_dropped) == (2, 6, 0)
    got = [(rring.datagram(i), *rring.packet(i, _ENV_RX[0])) for i in range(6)]
    ids = [0, 1, 0, 1, 2, 3]
    assert [d for d, _, _ in got] == [p.encode(_ctx(tx, rx, k)) for p, k in zip(expand(runs), ids)]
    assert [(st, p.bth.psn) for _, st, p in got] == [(0, i) for i in range(6)]
    assert {rring.peer(i) for i in range(6)} == {(A, tx.getsockname()[1])}


def test_sealed_gro_buffers_open_per_datagram(socks):
    tx, rx = socks
    _gro(rx)
    ring = TxRing(64)
    ring.set_auth(TxAuth(KEY, 7))
    _fill(ring, [_write(6000, psn=0)], _env(tx, rx), tx.fileno(), seal=True)
    ring.flush(tx.fileno())
    rring = RxRing(8)
    assert _recv_ring(rx, rring, 6) == 6 and rring.gro_packets == 6
    auth = RxAuth(KEY, B, rx.getsockname()[1], frozenset())
    assert rring.open_sealed(6, auth) is None and auth.opened == 6
    assert [rring.packet(i, _ENV_RX[0])[0] for i in range(6)] == [0] * 6


def test_hostile_gro_buffers(socks):
    """A sender's GSO whose segment size does not match its packets, and one
    whose last segment is a truncated packet: every piece is one bad (or, the
    whole ones, good) datagram, nothing read past the buffer, counted as
    usual by the endpoint."""
    tx, rx = socks
    _gro(rx)
    good = [RocePacket(Bth(opcode=0x04, dest_qp=5, psn=i), payload=bytes(range(256)) * 4)
            .encode(_ctx(tx, rx, i)) for i in range(3)]            # 1040 B each, IDs 0, 1, 2
    dst = rx.getsockname()

    def gso(data, size):
        tx.sendmsg([data], [(socket.IPPROTO_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))], 0, dst)

    gso(b"".join(good), 1000)                     # does not divide: 1000, 1000, 1000, 120
    gso(good[0] + good[1] + good[2][:500], 1040)  # the last one truncated
    rring = RxRing(8)
    assert _recv_ring(rx, rring, 7) == 7 and rring.slots == 2
    lens = [len(rring.datagram(i)) for i in range(7)]
    assert lens == [1000, 1000, 1000, 120, 1040, 1040, 500]
    st = [rring.packet(i, _ENV_RX[0])[0] for i in range(7)]
    assert st[:4] != [0] * 4 and all(s != 0 for s in st[:4]) and st[4:6] == [0, 0] and st[6] != 0


def test_endpoint_counts_gro_and_bad_pieces(socks):
    """The same through a RoceUdpEndpoint (UDP_GRO as roce.udp sets it): the
    good datagrams are delivered, the bad pieces counted, the GRO counters
    show the buffers."""
    import asyncio

    from roce import udp

    tx, _ = socks

    async def main():
        got = []
        s = udp.make_socket(B, 0)
        ep = udp.RoceUdpEndpoint(s, lambda p, ip: got.append(p.bth.psn))
        dst = ep.local
        ctx = IpContext(A, B, sport=tx.getsockname()[1], dport=dst[1])
        good = [RocePacket(Bth(opcode=0x04, dest_qp=5, psn=i), payload=bytes(1024)).encode(
            IpContext(A, B, sport=ctx.sport, dport=ctx.dport, ip_id=i)) for i in range(3)]
        tx.sendmsg([b"".join(good)], [(socket.IPPROTO_UDP, UDP_SEGMENT, (1040).to_bytes(2, "little"))],
                   0, dst)
        tx.sendmsg([good[0] + good[1][:100]], [(socket.IPPROTO_UDP, UDP_SEGMENT,
                                                (1040).to_bytes(2, "little"))], 0, dst)
        for _ in range(100):
            ep.poll()
            if len(got) >= 4 and ep.metrics.rx_packets >= 5:
                break
            await asyncio.sleep(0.01)
        m = ep.metrics
        await ep.aclose()
        return got, m

    got, m = asyncio.run(main())
    assert got == [0, 1, 2, 0]
    assert (m.rx_packets, m.rx_malformed + m.rx_icrc_errors) == (5, 1)
    assert (m.rx_gro_buffers, m.rx_gro_packets) == (2, 5)
