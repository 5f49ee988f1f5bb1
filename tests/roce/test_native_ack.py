"""The native ACK path of roce.rc._fastrx.RequestFastPath against the
Python completer (Requester.on_response).

A requester engine posts a seeded random mix of SENDs and WRITEs (one to
several packets, signaled or not) and READs between them (left to Python);
a responder engine answers; its ACKs and READ responses come back through a
real UDP socket into an RxRing, impaired (duplicates, reordering, losses, a
wrong P_Key, another QP's number, ACKs held back so that a later one
coalesces them), and are fed to one copy of the requester through the fast
path and the engine, and to another through the engine alone. Completions,
PSNs, the send queue, the deadlines, retry counters and every counter must
be identical after every packet. (These streams also found a crash of the
engine alone: a late READ response completing a READ that go-back-N had
rewound but not yet sent again left the next PSN behind the oldest
unacknowledged one, and the next send tripped an assertion; the requester
now moves its PSN past a WQE completed that way.)
"""
from __future__ import annotations

import random

import pytest

from roce import _codec
from roce._udpio import RxRing
from roce.icrc import IpContext
from roce.rc import MemoryTable, RcQp
from roce.rc._fastrx import STOP_REASONS, RequestFastPath
from roce.rc.verbs import SendWR
from roce.udp import make_socket
from verbs import Access, QpState, WrOpcode

A, B = "127.0.0.41", "127.0.0.42"
QA, QB = 0x61, 0x62


class _Req:
    """A requester (QP QA) and what the fast path needs of a target."""

    def __init__(self, peer: str, mtu: int, psn: int):
        self.peer = peer
        self.sports = None
        self.rq_posted = 0
        self.qp = type("Q", (), {"rq_pi": 0})()
        self.mem = MemoryTable()
        self.buf = bytearray(1 << 16)
        self.rc = RcQp(QA, self.mem)
        self.rc.modify(QpState.INIT)
        self.rc.modify(QpState.RTR, dest_qp_num=QB, path_mtu=mtu, rq_psn=0)
        self.rc.modify(QpState.RTS, sq_psn=psn, timeout=14, retry_cnt=7, rnr_retry=7)

    def state(self):
        q = self.rc.requester
        return ([(c.wr_id, c.status, c.opcode, c.byte_len) for c in self.rc.poll_send_cq()],
                q.psn, q.psn_hi, q.comp_psn, len(q.sq), q.send_idx, q.retrans_deadline,
                q.retry_left, q.rnr_left, q.retry_started, q.rd_atomic_outstanding,
                self.rc.metrics.as_dict(), self.rc.state, bytes(self.buf))


def _responder(mtu: int, psn: int):
    mem = MemoryTable()
    buf = bytearray(1 << 16)
    rkey, va = mem.register(buf, Access.REMOTE_WRITE | Access.REMOTE_READ | Access.LOCAL_WRITE)
    b = RcQp(QB, mem)
    b.modify(QpState.INIT, access=Access.REMOTE_WRITE | Access.REMOTE_READ)
    b.modify(QpState.RTR, dest_qp_num=QA, path_mtu=mtu, rq_psn=psn)
    b.modify(QpState.RTS, sq_psn=0)
    for i in range(64):
        b.post_recv(1000 + i, [memoryview(bytearray(4 * mtu))])
    return b, rkey, va


def _post(rng, reqs, rkey, va, mtu, n):
    """The same random WRs to every requester copy."""
    for k in range(n):
        op = rng.choice([WrOpcode.SEND, WrOpcode.RDMA_WRITE, WrOpcode.SEND_WITH_IMM,
                         WrOpcode.RDMA_WRITE, WrOpcode.RDMA_READ])
        length = rng.choice([0, 1, 64, mtu, mtu + 1, 3 * mtu])
        off = rng.randrange(0, 1 << 15)
        signaled = rng.random() < 0.7
        for r in reqs:
            r.rc.post_send(SendWR(k, op, [memoryview(r.buf)[off:off + length]],
                                  remote_addr=va + off, rkey=rkey, imm_data=7, signaled=signaled))


def _impair(rng, pkts):
    out = list(pkts)
    if rng.random() < 0.3 and len(out) > 2:
        k = rng.randrange(len(out))
        out.insert(k, out[k])
    if rng.random() < 0.3 and len(out) > 2:
        k = rng.randrange(len(out) - 1)
        out[k], out[k + 1] = out[k + 1], out[k]
    if rng.random() < 0.3 and len(out) > 1:
        del out[rng.randrange(len(out))]
    return out


@pytest.mark.parametrize("seed", range(60))
def test_ack_fast_path_is_the_completer(seed):
    rng = random.Random(seed)
    mtu = rng.choice([256, 1024])
    psn = rng.choice([0, 0xFFFFF0, rng.getrandbits(24)])
    fa, pa = _Req(A, mtu, psn), _Req(A, mtu, psn)           # fast path + engine / engine alone
    b, rkey, va = _responder(mtu, psn)
    tx, rx = make_socket(A, 0), make_socket(B, 0)
    ctx = IpContext(A, B, sport=tx.getsockname()[1], dport=rx.getsockname()[1])
    fast = RequestFastPath({QA: fa}, lambda t, k: None, lambda: 1.5)
    taken = 0
    try:
        for _round in range(rng.randrange(2, 6)):
            _post(rng, (fa, pa), rkey, va, mtu, rng.randrange(1, 6))
            reqs = fa.rc.transmit(1.0)
            assert [p.encode(ctx) for p in reqs] == [p.encode(ctx) for p in pa.rc.transmit(1.0)]
            for p in _impair(rng, reqs) if rng.random() < 0.3 else reqs:
                b.receive(p, 1.0)
            resps = b.transmit(1.0)
            if rng.random() < 0.2 and resps:                # a wrong P_Key or another QP's number
                p = resps[rng.randrange(len(resps))]
                p.bth = type(p.bth)(opcode=p.bth.opcode, dest_qp=QA if rng.random() < .5 else 0x77,
                                    psn=p.bth.psn, pkey=0x1234 if rng.random() < .5 else 0xFFFF)
            resps = _impair(rng, resps) if rng.random() < 0.4 else resps
            if not resps:
                continue
            for p in resps:
                tx.sendto(p.encode(ctx), (B, rx.getsockname()[1]))
            ring = RxRing(64)
            got = 0
            while got < len(resps):
                import select
                if not select.select([rx], [], [], 1.0)[0]:
                    break
                got += ring.recv(rx.fileno()) if got == 0 else 0
                if got and got < len(resps):
                    continue
            n = ring.count
            ip, port = ring.peer(0)
            envs = {ring.peer_key(0): _codec.Envelope(ip, B, port, rx.getsockname()[1])}
            for i in range(n):                  # packet by packet: the states agree after each
                j = fast(ring, i, i + 1, envs)
                taken += j - i
                status, pkt = ring.packet(i, envs[ring.peer_key(i)])
                for r in (fa, pa) if j == i else (pa,):
                    if status == 0 and pkt.bth.dest_qp == QA:
                        r.rc.receive(pkt, 1.5)
                assert fa.state() == pa.state(), (i, pkt)
            assert STOP_REASONS[fast.stop]
    finally:
        tx.close()
        rx.close()
    assert fast.taken == taken


def test_ack_fast_path_takes_request_reply_acks():
    """Plain SEND/WRITE traffic: every ACK goes the native way."""
    mtu = 1024
    fa, pa = _Req(A, mtu, 5), _Req(A, mtu, 5)
    b, rkey, va = _responder(mtu, 5)
    tx, rx = make_socket(A, 0), make_socket(B, 0)
    ctx = IpContext(A, B, sport=tx.getsockname()[1], dport=rx.getsockname()[1])
    fast = RequestFastPath({QA: fa}, lambda t, k: None, lambda: 2.0)
    try:
        for k in range(20):
            for r in (fa, pa):
                r.rc.post_send(SendWR(k, WrOpcode.SEND if k % 2 else WrOpcode.RDMA_WRITE,
                                      [memoryview(r.buf)[:3000]], remote_addr=va, rkey=rkey))
            pkts = fa.rc.transmit(1.0)
            pa.rc.transmit(1.0)
            for p in pkts:
                b.receive(p, 1.0)
            (ack,) = b.transmit(1.0)
            tx.sendto(ack.encode(ctx), (B, rx.getsockname()[1]))
            import select
            select.select([rx], [], [], 1.0)
            ring = RxRing(8)
            assert ring.recv(rx.fileno()) == 1
            ip, port = ring.peer(0)
            envs = {ring.peer_key(0): _codec.Envelope(ip, B, port, rx.getsockname()[1])}
            assert fast(ring, 0, 1, envs) == 1
            pa.rc.receive(ack, 2.0)
            assert fa.state() == pa.state()
    finally:
        tx.close()
        rx.close()
    assert fast.taken == 20
