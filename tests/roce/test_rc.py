"""The sans-I/O RC transport: two QPs through an in-memory channel that
drops, duplicates and reorders (seeded), with simulated time."""
import random

import pytest

from roce.headers import Aeth, Bth, Reth
from roce.opcodes import Opcode
from roce.packet import RocePacket
from roce.errors import InvalidWorkRequest, QpStateError
from roce.rc import RcQp, SendWR
from roce.rc.qp import TRANSITIONS
from verbs import Access, NakCode, QpState, WcOpcode, WcStatus, WrOpcode

from .rc_harness import CTX_AB, CTX_BA, Channel, Pair

ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC


def pattern(n, seed):
    return bytearray(random.Random(seed).randbytes(n))


def wait_cq(pair, qp, n, recv=False):
    got = []

    def until():
        got.extend(qp.poll_recv_cq() if recv else qp.poll_send_cq())
        return len(got) >= n
    pair.run(until)
    return got


# --------------------------------------------------------------- every verb
@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 64 * 1024 + 3])
def test_send_sizes(size):
    p = Pair()
    data = pattern(size, size)
    rbuf = bytearray(size + 16)
    p.b.post_recv(7, [memoryview(rbuf)])
    p.a.post_send(SendWR(1, WrOpcode.SEND, [memoryview(data)]))
    sc = wait_cq(p, p.a, 1)
    rc = p.b.poll_recv_cq()
    assert [(c.wr_id, c.status, c.opcode) for c in sc] == [(1, WcStatus.SUCCESS, WcOpcode.SEND)]
    assert [(c.wr_id, c.status, c.byte_len) for c in rc] == [(7, WcStatus.SUCCESS, size)]
    assert rbuf[:size] == data and rbuf[size:] == bytes(16)


def test_send_with_imm_and_inv_and_scatter_gather():
    p = Pair()
    victim = bytearray(64)
    vkey, _ = p.mem_b.register(victim, ALL)
    r1, r2 = bytearray(1000), bytearray(3000)
    p.b.post_recv(1, [memoryview(r1), memoryview(r2)])
    p.b.post_recv(2, [memoryview(bytearray(10))])
    d1, d2 = pattern(1500, 1), pattern(1700, 2)
    p.a.post_send(SendWR(10, WrOpcode.SEND_WITH_IMM, [memoryview(d1), memoryview(d2)],
                         imm_data=0xDEADBEEF))
    p.a.post_send(SendWR(11, WrOpcode.SEND_WITH_INV, [memoryview(bytearray(b"inv!"))],
                         invalidate_rkey=vkey))
    wait_cq(p, p.a, 2)
    rc = p.b.poll_recv_cq()
    assert rc[0].imm_data == 0xDEADBEEF and rc[0].byte_len == 3200
    assert (r1 + r2)[:3200] == d1 + d2
    assert rc[1].invalidated_rkey == vkey and rc[1].byte_len == 4 and rc[1].wc_flags == 8
    from roce.errors import RemoteAccessError
    with pytest.raises(RemoteAccessError):
        p.mem_b.resolve(vkey, vkey << 32, 1, Access.REMOTE_READ)


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_write_and_write_imm(size):
    p = Pair()
    target = bytearray(size + 8)
    rkey, va = p.mem_b.register(target, ALL)
    data = pattern(size, 3)
    p.b.post_recv(5, [])
    p.a.post_send(SendWR(1, WrOpcode.RDMA_WRITE, [memoryview(data)], remote_addr=va + 4, rkey=rkey))
    p.a.post_send(SendWR(2, WrOpcode.RDMA_WRITE_WITH_IMM, [memoryview(data)], remote_addr=va,
                         rkey=rkey, imm_data=42))
    sc = wait_cq(p, p.a, 2)
    assert [c.status for c in sc] == [WcStatus.SUCCESS] * 2
    assert [c.opcode for c in sc] == [WcOpcode.RDMA_WRITE] * 2
    assert target[:size] == data
    (rc,) = p.b.poll_recv_cq()
    assert (rc.wr_id, rc.opcode, rc.imm_data, rc.byte_len) == (5, WcOpcode.RECV_RDMA_WITH_IMM, 42, size)


@pytest.mark.parametrize("size", [0, 1, 1024, 70000])
def test_read(size):
    p = Pair()
    src = pattern(size, 4)
    rkey, va = p.mem_b.register(src, Access.REMOTE_READ)
    dst = bytearray(size)
    p.a.post_send(SendWR(9, WrOpcode.RDMA_READ, [memoryview(dst)], remote_addr=va, rkey=rkey))
    (c,) = wait_cq(p, p.a, 1)
    assert (c.status, c.opcode, c.byte_len) == (WcStatus.SUCCESS, WcOpcode.RDMA_READ, size)
    assert dst == src


def test_atomics():
    p = Pair()
    cell = bytearray((5).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little"))
    rkey, va = p.mem_b.register(cell, ALL)
    o1, o2, o3 = bytearray(8), bytearray(8), bytearray(8)
    p.a.post_send(SendWR(1, WrOpcode.ATOMIC_CMP_AND_SWP, [memoryview(o1)], remote_addr=va,
                         rkey=rkey, compare_add=5, swap=77))
    p.a.post_send(SendWR(2, WrOpcode.ATOMIC_CMP_AND_SWP, [memoryview(o2)], remote_addr=va,
                         rkey=rkey, compare_add=5, swap=99))      # fails: value is 77 now
    p.a.post_send(SendWR(3, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(o3)], remote_addr=va + 8,
                         rkey=rkey, compare_add=3))               # wraps
    sc = wait_cq(p, p.a, 3)
    assert [(c.opcode, c.status) for c in sc] == [(WcOpcode.COMP_SWAP, WcStatus.SUCCESS)] * 2 + \
        [(WcOpcode.FETCH_ADD, WcStatus.SUCCESS)]
    assert int.from_bytes(o1, "little") == 5 and int.from_bytes(o2, "little") == 77
    assert int.from_bytes(o3, "little") == 2**64 - 1
    assert int.from_bytes(cell[:8], "little") == 77 and int.from_bytes(cell[8:], "little") == 2


def test_unsignaled_completions_are_suppressed():
    p = Pair()
    p.b.post_recv(1, [memoryview(bytearray(8))])
    p.b.post_recv(2, [memoryview(bytearray(8))])
    p.a.post_send(SendWR(1, WrOpcode.SEND, [b"x"], signaled=False))
    p.a.post_send(SendWR(2, WrOpcode.SEND, [b"y"]))
    assert [c.wr_id for c in wait_cq(p, p.a, 1)] == [2]
    assert [c.wr_id for c in p.b.poll_recv_cq()] == [1, 2]


# -------------------------------------------------- lossy channel stress test
def _stress(mtu, seed, drop, dup, reorder, nmsg=25, maxsize=40000, **attrs):
    ch = Channel(seed=seed, drop=drop, dup=dup, reorder=reorder)
    p = Pair(ch, mtu=mtu, **attrs)
    rng = random.Random(seed)
    remote = bytearray(maxsize * 2)
    rkey, va = p.mem_b.register(remote, ALL)
    expect_send, expect_recv = [], []
    recv_bufs = []
    shadow = bytearray(remote)
    atom = 0
    for i in range(nmsg):
        kind = rng.choice(["send", "send", "write", "read", "fadd"])
        size = rng.choice([0, 1, mtu - 1, mtu, mtu + 1, rng.randrange(maxsize)])
        if kind == "send":
            data = pattern(size, seed * 1000 + i)
            buf = bytearray(size)
            recv_bufs.append((buf, data))
            p.b.post_recv(1000 + i, [memoryview(buf)])
            p.a.post_send(SendWR(i, WrOpcode.SEND, [memoryview(data)]))
            expect_recv.append((1000 + i, size))
        elif kind == "write":
            data = pattern(size, seed * 1000 + i)
            off = rng.randrange(maxsize)
            shadow[off:off + size] = data
            # fenced: a READ retried after loss must not see this later WRITE
            p.a.post_send(SendWR(i, WrOpcode.RDMA_WRITE, [memoryview(data)], remote_addr=va + off,
                                 rkey=rkey, fence=True))
        elif kind == "read":
            # read back a range written by earlier WRs (ordering: reads see prior writes)
            off = rng.randrange(maxsize)
            dst = bytearray(size)
            recv_bufs.append((dst, bytes(shadow[off:off + size])))
            p.a.post_send(SendWR(i, WrOpcode.RDMA_READ, [memoryview(dst)], remote_addr=va + off,
                                 rkey=rkey))
        else:
            p.a.post_send(SendWR(i, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(bytearray(8))],
                                 remote_addr=va + 2 * maxsize - 8, rkey=rkey, compare_add=1))
            shadow[-8:] = (atom + 1).to_bytes(8, "little")
            atom += 1
        expect_send.append(i)
    sc = wait_cq(p, p.a, nmsg)
    assert [(c.wr_id, c.status) for c in sc] == [(i, WcStatus.SUCCESS) for i in expect_send]
    rc = p.b.poll_recv_cq()
    assert [(c.wr_id, c.status, c.byte_len) for c in rc] == \
        [(w, WcStatus.SUCCESS, n) for w, n in expect_recv]
    for buf, want in recv_bufs:
        assert buf == want
    assert remote == shadow
    assert p.a.state is QpState.RTS and p.b.state is QpState.RTS
    return p


@pytest.mark.parametrize("mtu", [256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("seed", [1, 2])
def test_lossy_channel_all_verbs(mtu, seed):
    p = _stress(mtu, seed, drop=0.05, dup=0.03, reorder=0.1, maxsize=40 * mtu)
    m = p.a.metrics
    assert m.retry_events > 0 and m.retransmitted_packets > 0
    assert p.b.metrics.duplicate_requests > 0
    assert p.max_inflight[p.a] <= 128 + 40 + 1     # a READ occupies its response PSNs


def test_clean_channel_has_no_retries():
    p = _stress(1024, 3, drop=0, dup=0, reorder=0)
    m = p.a.metrics
    assert m.retry_events == 0 and m.retransmitted_packets == 0 and m.timeouts == 0
    assert p.b.metrics.duplicate_requests == 0 and p.b.metrics.seq_naks_sent == 0


def test_big_message_window_ackreq_and_single_seq_nak_per_gap():
    ch = Channel(seed=5)
    p = Pair(ch, mtu=256)
    size = 2 * 1024 * 1024 + 77                 # 8193 packets
    data = pattern(size, 9)
    rbuf = bytearray(size)
    p.b.post_recv(1, [memoryview(rbuf)])
    p.a.post_send(SendWR(1, WrOpcode.SEND, [memoryview(data)]))
    dropped = []
    orig_ship = p._ship

    def ship(src, now):                         # drop exactly one packet: PSN 100+300
        if src is p.a:
            out = src.transmit(now)
            keep = []
            for pkt in out:
                if pkt.bth.psn == 400 and not dropped:
                    dropped.append(pkt)
                else:
                    keep.append(pkt)
            src.requester.out = []
            for pkt in keep:
                src.responder.out.append(pkt)   # re-queue through transmit()
        orig_ship(src, now)
    p._ship = ship
    wait_cq(p, p.a, 1)
    assert rbuf == data
    assert p.max_inflight[p.a] <= 128
    reqs = [pkt for side, pkt in p.sent_log if side is p.a]
    # AckReq at least every 64 packets and on the last
    gap = 0
    for pkt in reqs:
        gap = 0 if pkt.bth.ackreq else gap + 1
        assert gap < 64
    assert reqs[-1].bth.ackreq
    # FIRST and MIDDLE carry exactly one MTU
    for pkt in reqs:
        if pkt.bth.opcode in (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE):
            assert len(pkt.payload) == 256
    assert p.b.metrics.seq_naks_sent == 1        # one NAK for the one gap
    assert p.a.metrics.seq_naks_received == 1
    assert p.b.metrics.out_of_sequence >= 1


def test_read_with_one_lost_response_retries_once_per_burst():
    """A READ response packet is lost: the next one shows the gap (an implicit
    NAK) and the READ is asked again from the missing PSN at once; the rest of
    the burst, still arriving, starts no further retry and charges no retry
    budget (rxe's comp.started_retry). Before, every later packet started one,
    so a 64-packet READ that lost one packet early spent the whole budget."""
    p = Pair(Channel(seed=3), mtu=256, retry_cnt=3, timeout=14)
    size = 64 * 256
    src = pattern(size, 5)
    rkey, va = p.mem_b.register(src, Access.REMOTE_READ)
    dst = bytearray(size)
    dropped = []
    orig_ship = p._ship

    def ship(q, now):                    # drop B's second READ response packet, once
        if q is p.b:
            out = q.transmit(now)
            keep = [pkt for pkt in out if dropped or pkt.opcode != Opcode.RC_RDMA_READ_RESPONSE_MIDDLE
                    or dropped.append(pkt)]
            q.responder.out = keep
        orig_ship(q, now)
    p._ship = ship
    p.a.post_send(SendWR(1, WrOpcode.RDMA_READ, [memoryview(dst)], remote_addr=va, rkey=rkey))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.SUCCESS and dst == src and len(dropped) == 1
    m = p.a.metrics
    assert m.retry_events == 1 and m.timeouts == 0  # at the gap, not after an ACK timeout
    assert p.b.metrics.duplicate_requests == 1      # the READ asked again once


def test_long_message_under_loss_survives_a_small_retry_budget():
    """The retry budget counts retries without forward progress (IBTA 9.7.6.1.3):
    a PSN sequence error NAK that acknowledges the packets before its gap is
    progress. A 512-packet WRITE losing 3% of packets meets a gap many times;
    with retry_cnt 2 it must still complete. Before, each NAK spent the budget
    for good and the QP failed (RETRY_EXC_ERR)."""
    p = Pair(Channel(seed=11, drop=0.03), mtu=256, retry_cnt=2, timeout=14)
    size = 512 * 256
    data = pattern(size, 2)
    rkey, va = p.mem_b.register(bytearray(size), Access.REMOTE_WRITE)
    p.a.post_send(SendWR(1, WrOpcode.RDMA_WRITE, [memoryview(data)], remote_addr=va, rkey=rkey))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.SUCCESS
    assert p.a.metrics.seq_naks_received > 2   # more gaps than the budget: it was reset


# ------------------------------------------------------------------- RNR
def test_rnr_nak_then_receive_posted():
    p = Pair(min_rnr_timer=1)
    p.b.cfg.min_rnr_timer = 3                    # responder advertises 30 us
    p.a.post_send(SendWR(1, WrOpcode.SEND, [b"hello"]))
    p.run(lambda: p.a.metrics.rnr_naks_received >= 3)
    buf = bytearray(5)
    p.b.post_recv(9, [memoryview(buf)])
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.SUCCESS and buf == b"hello"
    assert p.b.metrics.rnr_naks_sent >= 3


def test_rnr_retry_exceeded_flushes_later_wrs():
    p = Pair(rnr_retry=2)
    p.a.post_send(SendWR(1, WrOpcode.SEND, [b"a"]))
    p.a.post_send(SendWR(2, WrOpcode.RDMA_WRITE, [b"b"], remote_addr=0, rkey=0))
    sc = wait_cq(p, p.a, 2)
    assert [(c.wr_id, c.status) for c in sc] == [(1, WcStatus.RNR_RETRY_EXC_ERR),
                                                 (2, WcStatus.WR_FLUSH_ERR)]
    assert p.a.metrics.rnr_naks_received == 3
    assert p.a.state is QpState.ERR
    # posting to an ERR QP completes at once with a flush error
    p.a.post_send(SendWR(3, WrOpcode.SEND, [b"c"]))
    assert [(c.wr_id, c.status) for c in p.a.poll_send_cq()] == [(3, WcStatus.WR_FLUSH_ERR)]


# ---------------------------------------------------------- vanished peer
@pytest.mark.parametrize("retry_cnt", [0, 3])
def test_vanished_peer_retry_exceeded(retry_cnt):
    ch = Channel(cut=True)
    p = Pair(ch, retry_cnt=retry_cnt, timeout=10)
    p.a.post_send(SendWR(1, WrOpcode.RDMA_READ, [memoryview(bytearray(10))], remote_addr=0, rkey=1))
    p.a.post_send(SendWR(2, WrOpcode.SEND, [b"x"]))
    sc = wait_cq(p, p.a, 2)
    assert [(c.wr_id, c.status) for c in sc] == [(1, WcStatus.RETRY_EXC_ERR),
                                                 (2, WcStatus.WR_FLUSH_ERR)]
    assert p.a.metrics.timeouts == retry_cnt + 1
    # 4.096 us * 2^10 per try, simulated
    assert p.now == pytest.approx((retry_cnt + 1) * 4.096e-6 * 1024, rel=0.01)


# ------------------------------------------------------------ fatal NAKs
def test_bad_rkey_is_remote_access_error():
    p = Pair()
    buf = bytearray(100)
    rkey, va = p.mem_b.register(buf, Access.REMOTE_READ)       # no remote write
    p.b.post_recv(1, [memoryview(bytearray(4))])
    p.a.post_send(SendWR(1, WrOpcode.RDMA_WRITE, [b"abcd"], remote_addr=va, rkey=rkey))
    p.a.post_send(SendWR(2, WrOpcode.SEND, [b"late"]))
    sc = wait_cq(p, p.a, 2)
    assert [(c.wr_id, c.status) for c in sc] == [(1, WcStatus.REM_ACCESS_ERR),
                                                 (2, WcStatus.WR_FLUSH_ERR)]
    assert p.b.metrics.remote_access_naks == 1 and p.b.state is QpState.ERR
    assert [(c.wr_id, c.status) for c in p.b.poll_recv_cq()] == [(1, WcStatus.WR_FLUSH_ERR)]
    assert buf == bytes(100)


@pytest.mark.parametrize("va_off,length,status", [
    (96, 8, WcStatus.REM_ACCESS_ERR),      # out of the region
    (3, 8, WcStatus.REM_INV_REQ_ERR),      # misaligned atomic
])
def test_atomic_errors(va_off, length, status):
    p = Pair()
    rkey, va = p.mem_b.register(bytearray(100), ALL)
    p.a.post_send(SendWR(1, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(bytearray(8))],
                         remote_addr=va + va_off, rkey=rkey, compare_add=1))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is status


def test_read_bad_rkey_and_recv_too_small():
    p = Pair()
    p.a.post_send(SendWR(1, WrOpcode.RDMA_READ, [memoryview(bytearray(10))], remote_addr=0,
                         rkey=0xBAD))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.REM_ACCESS_ERR
    p = Pair()
    p.b.post_recv(4, [memoryview(bytearray(3))])
    p.a.post_send(SendWR(1, WrOpcode.SEND, [b"too long"]))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.REM_INV_REQ_ERR
    assert [(c.wr_id, c.status) for c in p.b.poll_recv_cq()] == [(4, WcStatus.LOC_LEN_ERR)]


def test_qp_without_remote_write_access_rejects_write():
    p = Pair()
    p.b.cfg.access = Access.LOCAL_WRITE
    rkey, va = p.mem_b.register(bytearray(8), ALL)
    p.a.post_send(SendWR(1, WrOpcode.RDMA_WRITE, [b"x"], remote_addr=va, rkey=rkey))
    (c,) = wait_cq(p, p.a, 1)
    assert c.status is WcStatus.REM_INV_REQ_ERR and p.b.metrics.invalid_request_naks == 1


# ---------------------------------------------- hostile packets at a responder
def _req(opcode, psn, payload=b"", **kw):
    return RocePacket(Bth(opcode=opcode, dest_qp=0x22, psn=psn, ackreq=True), payload=payload,
                      **kw).encode(CTX_AB)


def _responses(p):
    return [pkt for side, pkt in p.sent_log if side is p.b]


def test_oversized_packet_is_nakked_invalid_request():
    p = Pair(mtu=256)
    p.b.post_recv(1, [memoryview(bytearray(4096))])
    p.inject(p.b, _req(Opcode.RC_SEND_ONLY, 100, b"x" * 257))
    p.run(lambda: p.b.state is QpState.ERR and not p.heap)
    (nak,) = [r for r in _responses(p) if r.aeth is not None]
    assert nak.aeth.nak_code == NakCode.INV_REQ and nak.bth.psn == 100
    assert p.b.metrics.invalid_request_naks == 1


def test_middle_without_first_is_invalid_request():
    p = Pair(mtu=256)
    p.b.post_recv(1, [memoryview(bytearray(4096))])
    p.inject(p.b, _req(Opcode.RC_SEND_MIDDLE, 100, b"x" * 256))
    p.run(lambda: p.b.state is QpState.ERR)
    assert p.b.metrics.invalid_request_naks == 1


def test_out_of_window_psn_one_nak_then_duplicates_reacked():
    p = Pair()
    p.b.post_recv(1, [memoryview(bytearray(16))])
    for psn in (105, 106, 0x7FFFFF):          # ahead of the expected 100: one NAK for the gap
        p.inject(p.b, _req(Opcode.RC_SEND_ONLY, psn, b"a"))
    p.run(lambda: not p.heap)
    naks = [r for r in _responses(p) if r.aeth is not None]
    assert len(naks) == 1 and naks[0].bth.psn == 100 and naks[0].aeth.nak_code == 0
    assert p.b.metrics.out_of_sequence == 3 and p.b.metrics.seq_naks_sent == 1
    p.inject(p.b, _req(Opcode.RC_SEND_ONLY, 100, b"b"))
    p.inject(p.b, _req(Opcode.RC_SEND_ONLY, 100, b"c"))    # duplicate: re-ACK, not re-executed
    p.run(lambda: not p.heap)
    (rc,) = p.b.poll_recv_cq()
    assert rc.byte_len == 1
    assert p.b.metrics.duplicate_requests == 1
    acks = [r for r in _responses(p) if r.aeth is not None][1:]
    assert [a.bth.psn for a in acks] == [100, 100] and all(a.aeth.type == 0 for a in acks)
    assert p.b.state is QpState.RTS


def test_duplicate_atomic_answered_from_replay_cache_and_read_replayed():
    p = Pair()
    cell = bytearray(8)
    rkey, va = p.mem_b.register(cell, ALL)
    from roce.headers import AtomicEth
    p.inject(p.b, _req(Opcode.RC_FETCH_ADD, 100, atomic_eth=AtomicEth(va, rkey, 5, 0)))
    p.inject(p.b, _req(Opcode.RC_FETCH_ADD, 100, atomic_eth=AtomicEth(va, rkey, 5, 0)))
    src = pattern(3000, 1)
    skey, sva = p.mem_b.register(src, ALL)
    p.inject(p.b, _req(Opcode.RC_RDMA_READ_REQUEST, 101, reth=Reth(sva, skey, 3000)))
    # retry of the read from its second response packet
    p.inject(p.b, _req(Opcode.RC_RDMA_READ_REQUEST, 102, reth=Reth(sva + 1024, skey, 1976)))
    p.run(lambda: not p.heap)
    assert int.from_bytes(cell, "little") == 5          # executed once
    resp = _responses(p)
    acks = [r for r in resp if r.bth.opcode == Opcode.RC_ATOMIC_ACKNOWLEDGE]
    assert [a.atomic_ack_eth.orig for a in acks] == [0, 0]
    reads = [(r.bth.opcode, r.bth.psn, bytes(r.payload)) for r in resp
             if r.bth.opcode in range(0x0D, 0x11)]
    assert [r[:2] for r in reads] == [(0x0D, 101), (0x0E, 102), (0x0F, 103), (0x0D, 102), (0x0F, 103)]
    assert reads[3][2] == src[1024:2048] and reads[4][2] == src[2048:]
    assert p.b.metrics.duplicate_requests == 2


def test_wrong_qp_and_state_are_dropped_and_counted():
    p = Pair()
    wire = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=0x999, psn=100), payload=b"").encode(CTX_AB)
    p.inject(p.b, wire)
    p.run(lambda: not p.heap)
    assert p.b.metrics.dropped_other == 1
    q = RcQp(5, None)
    q.receive(RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=5, psn=0)), 0.0)
    assert q.metrics.dropped_qp_state == 1
    # a response for a PSN never sent is dropped
    p.inject(p.a, RocePacket(Bth(opcode=Opcode.RC_ACKNOWLEDGE, dest_qp=0x11, psn=5000),
                             aeth=Aeth.ack(0)).encode(CTX_BA))
    p.run(lambda: not p.heap)
    assert p.a.metrics.responses_dropped == 1
    # a corrupted datagram never reaches the QP: decode rejects it (ICRC)
    p.inject(p.a, b"\x11" + bytes(15))
    p.run(lambda: not p.heap)
    assert p.ch.stats["malformed"] == 1 and p.a.metrics.rx_packets == 1


# ------------------------------------------------------------ state machine
def test_qp_state_machine():
    q = RcQp(1, None)
    with pytest.raises(QpStateError):
        q.post_send(SendWR(1, WrOpcode.SEND, []))
    with pytest.raises(QpStateError):
        q.modify(QpState.RTS)
    with pytest.raises(QpStateError):
        q.modify(QpState.INIT, bogus=1)
    q.modify(QpState.INIT)
    q.post_recv(1, [])
    q.modify(QpState.RTR, dest_qp_num=2, path_mtu=4096)
    q.modify(QpState.RTS, sq_psn=7)
    with pytest.raises(QpStateError):
        q.modify(QpState.RTS, path_mtu=256)
    q.modify(QpState.ERR)
    assert [(c.wr_id, c.status) for c in q.poll_recv_cq()] == [(1, WcStatus.WR_FLUSH_ERR)]
    q.modify(QpState.RESET)
    for s, nxt in TRANSITIONS.items():
        assert QpState.ERR in nxt and QpState.RESET in nxt


def test_bad_work_requests_are_typed():
    p = Pair()
    with pytest.raises(InvalidWorkRequest):
        p.a.post_send(SendWR(1, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(bytearray(4))]))
    with pytest.raises(InvalidWorkRequest):
        p.a.post_send(SendWR(1, 42, []))
    with pytest.raises(InvalidWorkRequest):
        p.a.post_send(SendWR(1, WrOpcode.SEND, [b"x"], imm_data=1 << 32))
    from roce.errors import FieldRange
    with pytest.raises(FieldRange):
        p.a.modify(QpState.RTS, timeout=32)
