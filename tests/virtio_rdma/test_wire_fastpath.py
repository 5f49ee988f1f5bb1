"""The native wire path (``_datapath.run_wire_sq`` / ``run_wire_rq``: send
WQEs of a QP run by the RoCE RC engine decoded, checked and posted, their
packets built as runs; receive WQEs handed to the engine) against the Python
path of :mod:`fabric.roce_qp`.

Two hosts' device cores joined by :class:`fabric.roce.RoceFabric` (sans I/O,
every packet encoded and decoded with its ICRC, through a channel that can
lose, duplicate and reorder: the harness of tests/fabric/test_roce_fabric.py)
run the same seeded random mix twice, once with the native paths and once
without: SEND / WRITE with and without immediate data, READs and atomics
between them, inline and SGE payloads of several packets, multi-SGE and
multi-chunk MRs, bad lkeys and rkeys, fences, unsignaled WRs, several WQEs
under one doorbell, receives posted late or with bad keys, traffic both
ways (the CQEs of the engine's completions are written natively too,
``_datapath.wire_cqes``). Guest memory (rings, CQEs and buffers: every byte), every CQE, the QP,
engine and fabric state and every counter must be identical, and the native
run must really have taken the native path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roce.rc.sgl import SgList
from tests.fabric.test_roce_fabric import Hosts
from verbs import Access, SendFlags, WrOpcode
from virtio_rdma import _datapath

from .driver import seeded_ids, wire_native
from .test_records_fastpath import _records

OPS = [WrOpcode.SEND, WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
       WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ,
       WrOpcode.ATOMIC_FETCH_AND_ADD]
IMPAIRMENTS = {"clean": {}, "impaired": {"loss": 0.05, "dup": 0.03, "reorder": 0.05}}


def _run(h: Hosts, steps: int = 400) -> None:
    """Deliver packets and fire timers for a bounded number of steps (the
    same in both runs: no convergence needed, an RNR loop is fine)."""
    for _ in range(steps):
        if not h.wire.deliver(h.clock[0]):
            ds = [d for d in (h.a.process().next_deadline, h.b.process().next_deadline)
                  if d is not None]
            if not ds:
                return
            h.clock[0] = max(h.clock[0] + 1e-4, min(ds))
            h.a.process()
            h.b.process()


def _sges(rng, g, bufs, total, bad):
    """Up to 3 SGEs covering ``total`` bytes in random buffers of ``bufs``."""
    n = rng.choice([1, 1, 2, 3]) if total else rng.choice([0, 1])
    cuts = sorted(rng.randrange(total + 1) for _ in range(n - 1)) if n else []
    out, prev = [], 0
    for c in [*cuts, total][:n]:
        b = rng.choice(bufs)
        ln = c - prev
        off = rng.randrange(0, b.length - ln + 1) if b.length >= ln else 0
        key = b.lkey if not bad else rng.choice([b.rkey ^ 0x100, 0xDEAD])
        out.append((b.addr + off, ln, key))
        prev = c
    return out


def _scenario(seed: int, impair: dict, native: bool, hosts=Hosts) -> dict:
    rng = random.Random(seed)
    with wire_native(native), seeded_ids(seed):
        h = hosts(**impair, seed=seed)
        mtu = rng.choice([1, 3, 5])
        h.connect(psn_a=rng.getrandbits(24), psn_b=rng.getrandbits(24), path_mtu=mtu)
        mtu_bytes = 128 << mtu
        a, b = h.a, h.b
        abufs = [a.reg_mr(h.pa, 64 << 10), a.reg_mr(h.pa, 16 << 10)]
        bbufs = [b.reg_mr(h.pb, 64 << 10), b.reg_mr(h.pb, 16 << 10)]
        # an MR of two guest chunks in each guest (the native path leaves it to Python)
        for g, pd, bufs in ((a, h.pa, abufs), (b, h.pb, bbufs)):
            g1, g2 = g.alloc(8192), g.alloc(4096)
            g.alloc(4096)
            bufs.append(g.reg_mr(pd, 12288, gpa=g1, chunks=[(g1, 8192), (g2, 4096)], iova=0x7000_0000))
        ro = b.reg_mr(h.pb, 4096, Access.REMOTE_READ)
        for i, buf in enumerate(abufs[:2] + bbufs[:2]):
            (a if i < 2 else b).write(buf.addr, random.Random(seed + i).randbytes(buf.length))
        cqes = []
        wr_id = 0
        for _round in range(rng.randrange(2, 6)):
            for g, q, bufs in ((b, h.qb, bbufs), (a, h.qa, abufs)):
                for _ in range(rng.choice([0, 1, 2, 3, 3, 4])):
                    wr_id += 1
                    size = rng.choice([0, 8, 64, mtu_bytes]) if rng.random() < 0.05 else \
                        rng.choice([3 * mtu_bytes, 4 * mtu_bytes])
                    g.post_recv(q, wr_id, _sges(rng, g, bufs[:2] + bufs[2:] * (rng.random() < .2),
                                                size, rng.random() < 0.01))
            for src, q, bufs, peer in ((a, h.qa, abufs, bbufs), (b, h.qb, bbufs, abufs)):
                if src is b and rng.random() < 0.6:
                    continue
                for _ in range(rng.choice([1, 1, 2, 3, 4])):
                    wr_id += 1
                    op = rng.choice(OPS)
                    flags = SendFlags(0)
                    if rng.random() < 0.75:
                        flags |= SendFlags.SIGNALED
                    if rng.random() < 0.1:
                        flags |= SendFlags.FENCE
                    if rng.random() < 0.2:
                        flags |= SendFlags.SOLICITED
                    size = rng.choice([0, 1, 8, 64, mtu_bytes - 1, mtu_bytes + 1, 3 * mtu_bytes])
                    kw: dict = {}
                    if op in (WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM):
                        kw["imm_data"] = rng.getrandbits(32)
                    if op in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ,
                              WrOpcode.ATOMIC_FETCH_AND_ADD):
                        t = ro if rng.random() < 0.04 else rng.choice(peer[:2])
                        if op is WrOpcode.ATOMIC_FETCH_AND_ADD:
                            size = 8
                            kw["compare_add"] = rng.getrandbits(64)
                            kw["remote_addr"] = t.addr + 8 * rng.randrange(t.length // 8)
                        else:
                            kw["remote_addr"] = t.addr + rng.randrange(0, max(1, t.length - size))
                        kw["rkey"] = t.rkey if rng.random() > 0.02 else 0xBAD
                    inline = (op in (WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                                     WrOpcode.RDMA_WRITE_WITH_IMM)
                              and size <= 64 and rng.random() < 0.3)
                    if inline:
                        src.write_send_wqe(q, wr_id, op, flags=flags, inline=rng.randbytes(size), **kw)
                    else:
                        src.write_send_wqe(q, wr_id, op, _sges(rng, src, bufs[:2] + bufs[2:] * (
                                                                   rng.random() < .1), size,
                                                               rng.random() < 0.015),
                                           flags=flags, **kw)
                src.ring_sq(q)
            _run(h)
            cqes.append((a.poll(h.ca), b.poll(h.cb)))
        _run(h)
        cqes.append((a.poll(h.ca), b.poll(h.cb)))
        return _state(h, cqes)


def _state(h: Hosts, cqes: list) -> dict:
    """Everything both runs must agree on: CQEs, packets sent, guest memory,
    device, fabric, QP and engine state and counters."""
    a, b = h.a, h.b
    state = {"cqes": cqes, "sent": h.wire.sent, "clock": h.clock[0]}
    if hasattr(h.wire, "digest"):       # every datagram's bytes, in order
        state["bytes"] = h.wire.digest.hexdigest()
    for name, g, f in (("a", a, h.fa), ("b", b, h.fb)):
        state[name + "_mem"] = hashlib.sha256(g.buf).hexdigest()
        state[name + "_dev"] = dataclasses.asdict(g.core.metrics)
        state[name + "_fabric"] = f.metrics.as_dict()
        for qpn, qp in g.core.qps.items():
            state[f"{name}_qp"] = (qpn, qp.state, qp.sq_psn, qp.epsn, qp.sq_ci, qp.sq_next,
                                   qp.rq_ci, qp.rq_pi)
            n = qp.net
            if n is not None:
                rq, rs = n.rc.requester, n.rc.responder
                state[f"{name}_rc"] = (n.rc.state, dataclasses.asdict(n.rc.metrics), rq.psn,
                                       rq.psn_hi, rq.comp_psn, len(rq.sq), rq.send_idx,
                                       rq.retrans_deadline, rq.rnr_deadline, rs.psn, rs.msn,
                                       len(rs.rq), n.rq_posted, list(n.posted), n.held,
                                       n.window_holds)
    return state


@pytest.mark.parametrize("impair", IMPAIRMENTS)
@pytest.mark.parametrize("records", [False, True], ids=["doorbells", "records"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_wire_native_path_is_the_python_path(impair, records, seed):
    """``records``: the devices poll doorbell records (DBREC_POLL, as under
    ``--poll-us``), applied natively by ``_datapath.apply_records``."""
    with _records() if records else contextlib.nullcontext():
        fast = _scenario(seed, IMPAIRMENTS[impair], True)
        sq1, rq1, p1 = _datapath.wire_started, _datapath.wire_recvs, _datapath.wire_pumps
        slow = _scenario(seed, IMPAIRMENTS[impair], False)
    assert (_datapath.wire_started, _datapath.wire_recvs, _datapath.wire_pumps) == (sq1, rq1, p1), \
        "Python run went native"
    assert fast == slow


def test_fixed_mixes_went_native():
    """A few fixed mixes: the same results, and the native paths took WQEs."""
    sq0, rq0, cq0 = _datapath.wire_started, _datapath.wire_recvs, _datapath.wire_cqes_written
    p0 = _datapath.wire_pumps
    for seed in (0, 2, 4):
        for impair in IMPAIRMENTS.values():
            assert _scenario(seed, impair, True) == _scenario(seed, impair, False)
    assert _datapath.wire_started - sq0 > 20 and _datapath.wire_recvs - rq0 > 20
    assert _datapath.wire_cqes_written - cq0 > 20
    assert _datapath.wire_pumps - p0 > 20      # NetworkQp.pump's body (_datapath.wire_pump)


def test_wire_native_path_takes_plain_traffic():
    """Plain SENDs and WRITEs both ways: every send and receive WQE goes the
    native way, and the data arrives."""
    sq0, rq0, cq0 = _datapath.wire_started, _datapath.wire_recvs, _datapath.wire_cqes_written
    with seeded_ids(7):
        h = Hosts()
        h.connect(psn_a=0xFFFFF0, psn_b=5, path_mtu=3)   # a's PSNs wrap
        src, dst = h.a.reg_mr(h.pa, 1 << 16), h.b.reg_mr(h.pb, 1 << 16)
        payload = random.Random(1).randbytes(5000)
        h.a.write(src.addr, payload)
        for i in range(8):
            h.b.post_recv(h.qb, 100 + i, [(dst.addr + 8192 * (i % 4), 8192, dst.lkey)])
        for i in range(8):
            h.a.write_send_wqe(h.qa, i, WrOpcode.SEND if i % 2 else WrOpcode.RDMA_WRITE,
                               [(src.addr, 5000, src.lkey)], remote_addr=dst.addr + 40000,
                               rkey=dst.rkey)
        h.a.ring_sq(h.qa)
        _run(h)
        got_a, got_b = h.a.poll(h.ca), h.b.poll(h.cb)
    assert [c.wr_id for c in got_a] == list(range(8))
    assert all(c.status == 0 for c in got_a + got_b)
    assert [c.wr_id for c in got_b] == [100, 101, 102, 103]
    assert h.b.read(dst.addr, 5000) == payload and h.b.read(dst.addr + 40000, 5000) == payload
    assert _datapath.wire_started - sq0 == 8
    assert _datapath.wire_recvs - rq0 == 8
    assert _datapath.wire_cqes_written - cq0 == 8 + 4


def _window_scenario(seed: int, impair: dict, native: bool, hosts=Hosts) -> dict:
    """Rounds of many multi-packet WRITEs and SENDs under one doorbell each,
    more packets than the window (128 PSNs) takes: WQEs wait in the ring for
    ACKs (``NetworkQp.held``), a message longer than the window is posted to
    be sent piecemeal; with an odd seed a bad lkey near the end fails its
    WQE (and the QP) while others wait."""
    rng = random.Random(seed)
    with wire_native(native), seeded_ids(seed):
        h = hosts(**impair, seed=seed)
        h.connect(psn_a=rng.getrandbits(24), psn_b=rng.getrandbits(24), path_mtu=1)  # 256 B
        a, b = h.a, h.b
        src, dst = a.reg_mr(h.pa, 64 << 10), b.reg_mr(h.pb, 64 << 10)
        a.write(src.addr, rng.randbytes(64 << 10))
        wr_id, cqes = 0, []
        for _round in range(3):
            for i in range(4):
                wr_id += 1
                b.post_recv(h.qb, wr_id, [(dst.addr + 8192 * i, 8192, dst.lkey)])
            sends = 0
            n = rng.randrange(8, 24)
            for k in range(n):
                wr_id += 1
                op = rng.choice([WrOpcode.RDMA_WRITE] * 4 + [WrOpcode.SEND,
                                                            WrOpcode.RDMA_WRITE_WITH_IMM])
                if op is not WrOpcode.RDMA_WRITE:
                    if sends == 4:
                        op = WrOpcode.RDMA_WRITE
                    else:
                        sends += 1
                size = rng.choice([4096, 4096, 2049, 8192, 128 * 256, 100]
                                  + [129 * 256] * (_round == 2))
                if op is not WrOpcode.RDMA_WRITE:
                    size = min(size, 8192)
                bad = _round == 2 and k == n - 3 and seed % 2   # the QP's last act: ERR
                key = 0xDEAD if bad else src.lkey
                flags = SendFlags.SIGNALED if rng.random() < 0.7 else SendFlags(0)
                kw = {"imm_data": rng.getrandbits(32)} if op is WrOpcode.RDMA_WRITE_WITH_IMM else {}
                a.write_send_wqe(h.qa, wr_id, op, [(src.addr, size, key)], flags=flags,
                                 remote_addr=dst.addr + rng.randrange(0, (64 << 10) - size + 1),
                                 rkey=dst.rkey, **kw)
            a.ring_sq(h.qa)
            _run(h, 3000)
            cqes.append((a.poll(h.ca), b.poll(h.cb)))
        return _state(h, cqes)


@pytest.mark.parametrize("impair", IMPAIRMENTS)
@pytest.mark.parametrize("seed", range(3))
def test_window_holds_are_the_python_paths(impair, seed):
    """WQEs the window cannot take wait in the ring, natively as in Python:
    the same state, and they did wait (and start natively after the ACKs)."""
    sq0 = _datapath.wire_started
    fast = _window_scenario(seed, IMPAIRMENTS[impair], True)
    sq1 = _datapath.wire_started
    slow = _window_scenario(seed, IMPAIRMENTS[impair], False)
    assert _datapath.wire_started == sq1 and sq1 > sq0
    assert fast == slow
    assert fast["a_rc"][-1] > 0                           # window_holds


def _sg(sgl) -> tuple:
    return (sgl.total, list(sgl.starts), [bytes(v) for v in sgl.views],
            [(v.format, v.ndim, v.c_contiguous, v.readonly) for v in sgl.views])


def test_native_sg_lists_are_the_engines():
    """The SG lists run_wire_sq / run_wire_rq build without SgList's checks
    (and their guest views, without GuestMemory.translate) are what
    ``SgList(views)`` makes of the same views, empty entries left out, and
    they alias guest memory (a receive scatters into the guest, a
    retransmission gathers from it again)."""
    rq0, sq0 = _datapath.wire_recvs, _datapath.wire_started
    h = Hosts()
    h.connect(path_mtu=3)
    a, b = h.a, h.b
    src, dst = a.reg_mr(h.pa, 1 << 14), b.reg_mr(h.pb, 1 << 14)
    a.write(src.addr, bytes(range(256)) * 64)
    recvs = [[(dst.addr, 0, dst.lkey), (dst.addr + 100, 50, dst.lkey), (dst.addr + 1000, 30, dst.lkey)],
             [(dst.addr + 4000, 1, dst.lkey)], []]
    for i, sges in enumerate(recvs):
        b.post_recv(h.qb, 10 + i, sges)
    net_b = b.core.qps[h.qb.qpn].net
    net_b._post_recvs()
    taken = list(net_b.rc.responder.rq)
    assert _datapath.wire_recvs - rq0 == 3 and [w for w, _ in taken] == [10, 11, 12]
    for (_, sgl), sges in zip(taken, recvs, strict=True):
        views = [b.core.mem.translate(addr, n) for addr, n, _ in sges if n]
        assert _sg(sgl) == _sg(SgList(views))
    b.write(dst.addr + 100, b"\xaa" * 50)
    assert bytes(taken[0][1].views[0]) == b"\xaa" * 50       # a view of guest memory
    sends = [dict(inline=b""), dict(inline=b"0123456789"),
             dict(sges=[(src.addr + 7, 0, src.lkey), (src.addr + 9, 40, src.lkey),
                        (src.addr + 3000, 2000, src.lkey)])]
    for i, kw in enumerate(sends):
        a.write_send_wqe(h.qa, i, WrOpcode.SEND, kw.pop("sges", ()), **kw)
    a.ring_sq(h.qa)
    wqes = list(a.core.qps[h.qa.qpn].net.rc.requester.sq)
    assert _datapath.wire_started - sq0 == 3 and len(wqes) == 3
    for w in wqes:
        assert _sg(w.sgl) == _sg(SgList(w.wr.sges))
    assert w.sgl.total == 2040 and bytes(w.sgl.gather(0, 40)) == a.read(src.addr + 9, 40)
    a.write(src.addr + 3000, b"\x55" * 10)
    assert bytes(w.sgl.gather(40, 10)) == b"\x55" * 10         # gathered from the guest again
