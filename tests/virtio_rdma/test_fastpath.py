"""The native data path (virtio_rdma/_datapath.pyx) against the Python engine.

The same random mix of work requests (every opcode, inline and SGE payloads,
good and bad keys, out-of-range addresses, missing receives, malformed WQEs,
small CQs that overflow, armed CQs, multi-chunk MRs, batches under one
doorbell) runs twice on fresh guests: once with the fast path, once with the
Python engine only. Guest memory, CQEs, QP and CQ state, events and every
counter must be identical, and the fast run must really have used the
native path.
"""
import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_rdma import _datapath, datapath, wire
from verbs import Access, QpState, SendFlags, WcStatus, WrOpcode
from fabric.local import LocalFabric

from .driver import connect_pair, pair, seeded_ids

ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC

OPS = [WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM,
       WrOpcode.RDMA_READ, WrOpcode.ATOMIC_FETCH_AND_ADD, WrOpcode.ATOMIC_CMP_AND_SWP]

wqe_st = st.fixed_dictionaries({
    "op": st.sampled_from(OPS),
    "flags": st.sampled_from([SendFlags.SIGNALED, 0, SendFlags.SIGNALED | SendFlags.SOLICITED,
                              SendFlags.SIGNALED | SendFlags.FENCE]),
    "inline": st.booleans(),
    "nsge": st.integers(0, 3),
    "off": st.integers(0, 3000),
    "len": st.sampled_from([0, 1, 8, 63, 64, 700, 3000]),
    "key": st.sampled_from(["good", "good", "good", "chunked", "bad", "ro"]),
    "roff": st.integers(-8, 8000),
    "rkey": st.sampled_from(["good", "good", "good", "chunked", "bad", "ro"]),
    "garbage": st.sampled_from([None] * 12 + ["opcode", "flags", "reserved", "num_sge"]),
})

scenario_st = st.fixed_dictionaries({
    "batches": st.lists(st.lists(wqe_st, min_size=1, max_size=6), min_size=1, max_size=5),
    "recvs": st.lists(st.integers(0, 4), min_size=5, max_size=5),
    "recv_len": st.sampled_from([0, 64, 4000]),
    "cq_depth": st.sampled_from([4, 8, 64]),
    "arm": st.sampled_from([None, False, True]),
    "mtu": st.sampled_from([1, 3, 5]),
    "loopback": st.booleans(),
})


@contextlib.contextmanager
def _engine(fast: bool):
    prev = datapath.use_fast_path(fast)
    try:
        yield
    finally:
        datapath.use_fast_path(prev)


def _run(sc, fast: bool):
    with _engine(fast), seeded_ids():  # both runs see the same QPNs and keys
        fab = LocalFabric()
        a, b, pa, pb, ca, cb, qa, qb = pair(fab)
        if sc["loopback"]:  # a's QP talks to a second QP of its own device
            qb = a.create_qp(pa, ca)
            b, pb, cb = a, pa, ca
        # small CQs: replace the default ones
        sca = a.create_cq(sc["cq_depth"])
        qa = a.create_qp(pa, sca, ca)
        connect_pair(fab, a, b, qa, qb, path_mtu=sc["mtu"], rnr_retry=1, retry_cnt=1)
        ma, mb = a.reg_mr(pa, 16384), b.reg_mr(pb, 16384)
        ro_a = a.reg_mr(pa, 4096, access=Access.REMOTE_READ)
        ro_b = b.reg_mr(pb, 4096, access=Access.REMOTE_READ)
        g1, g2 = a.alloc(8192), a.alloc(8192)
        ch_a = a.reg_mr(pa, 8192, chunks=[(g1 + 4096, 4096), (g2, 4096)], gpa=g1, iova=0x7000_0000)
        h1, h2 = b.alloc(8192), b.alloc(8192)
        ch_b = b.reg_mr(pb, 8192, chunks=[(h2, 4096), (h1, 4096)], gpa=h1, iova=0x9000_0000)
        for i in range(0, 16384, 97):
            a.write(ma.gpa + i, bytes([i & 0xFF]) * 7)
            b.write(mb.gpa + i, bytes([(i * 3) & 0xFF]) * 5)
        if sc["arm"] is not None:
            b.arm(cb, solicited_only=sc["arm"])
            a.arm(sca, solicited_only=sc["arm"])
        keys_a = {"good": ma, "chunked": ch_a, "ro": ro_a}
        keys_b = {"good": mb, "chunked": ch_b, "ro": ro_b}
        wr = 0
        for bi, batch in enumerate(sc["batches"]):
            for _ in range(sc["recvs"][bi % 5]):
                n = sc["recv_len"]
                b.post_recv(qb, 1000 + wr, [(mb, (wr * 128) % 8000, n)] if n else [])
                wr += 1
            for w in batch:
                wr += 1
                loc = keys_a.get(w["key"])
                rem = keys_b.get(w["rkey"])
                sges = []
                for k in range(w["nsge"]):
                    if loc is None:
                        sges.append((ma.addr + w["off"], w["len"], 0xDEAD00))
                    else:
                        sges.append((loc.addr + (w["off"] + 8 * k) % max(1, loc.length - 8), w["len"], loc.lkey))
                kw = dict(remote_addr=(rem.addr if rem else mb.addr) + w["roff"],
                          rkey=rem.rkey if rem else 0xBEEF00, imm_data=wr * 7, compare_add=wr, swap=3)
                if w["inline"]:
                    data = bytes([wr & 0xFF]) * min(w["len"], 64)
                    raw = wire.encode_send_wqe(wr, w["op"], int(w["flags"]), inline=data,
                                               slot_size=1 << qa.layout.sq_wqe_shift, **kw) \
                        if w["op"] in OPS[:4] else None
                    if raw is None:
                        raw = wire.encode_send_wqe(wr, w["op"], int(w["flags"]), sges=sges,
                                                   slot_size=1 << qa.layout.sq_wqe_shift, **kw)
                else:
                    raw = wire.encode_send_wqe(wr, w["op"], int(w["flags"]), sges=sges,
                                               slot_size=1 << qa.layout.sq_wqe_shift, **kw)
                raw = bytearray(raw)
                if w["garbage"] == "opcode":
                    raw[8] = 0x77
                elif w["garbage"] == "flags":
                    raw[9] |= 0x40
                elif w["garbage"] == "reserved":
                    raw[50] = 1
                elif w["garbage"] == "num_sge":
                    struct.pack_into("<H", raw, 10, 200)
                a.write_send_wqe(qa, wr, w["op"], raw=bytes(raw))
            a.ring_sq(qa)
            a.poll(sca, 2)  # consume a little, so overflow depends on the mix
            a.clock[0] += 0.5  # let RNR / retry timers fire
            a.process()
            b.process()
        out = {
            "mem_a": bytes(a.buf), "mem_b": bytes(b.buf),
            "cqes_a": a.poll(sca), "cqes_ra": a.poll(ca), "cqes_b": b.poll(cb),
            "metrics_a": a.core.metrics.as_dict(), "metrics_b": b.core.metrics.as_dict(),
            "events_a": a.events, "events_b": b.events,
            "fabric": (fab.delivered, fab.dropped),
        }
        for name, g, q in (("qa", a, qa), ("qb", b, qb)):
            qp = g.core.qps.get(q.qpn)
            out[name] = None if qp is None else (
                qp.state, qp.sq_pi, qp.sq_next, qp.sq_ci, qp.rq_pi, qp.rq_ci, qp.sq_psn, qp.epsn,
                qp.retry_left, qp.rnr_left, qp.nak_seq_sent, len(qp.inflight))
        out["cqs"] = [(c.cqn, c.pc, c.written, c.state, c.arm) for g in {id(a): a, id(b): b}.values()
                      for c in g.core.cqs.values()]
        return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario_st)
def test_fast_and_python_paths_agree(sc):
    before = _datapath.completed
    fast = _run(sc, True)
    used = _datapath.completed - before
    slow = _run(sc, False)
    assert _datapath.completed - before == used  # the Python run did not use it
    for k in fast:
        assert fast[k] == slow[k], k


def test_fast_path_carries_the_plain_cases():
    """A clean mix of every fast opcode: all of it runs natively."""
    sc = {"batches": [[{"op": op, "flags": SendFlags.SIGNALED, "inline": inl, "nsge": 2, "off": 40,
                        "len": 100, "key": "good", "roff": 64, "rkey": "good", "garbage": None}
                       for op in OPS[:5] for inl in (False, True)]],
          "recvs": [8, 0, 0, 0, 0], "recv_len": 4000, "cq_depth": 64, "arm": None, "mtu": 3,
          "loopback": False}
    before = _datapath.completed
    fast = _run(sc, True)
    assert _datapath.completed - before == 10
    assert fast == _run(sc, False)
    assert fast["metrics_a"]["sends_completed"] == 10 and fast["metrics_b"]["bytes_received"] > 0


@pytest.mark.parametrize("arm", [False, True])
def test_fast_path_completion_events(arm):
    sc = {"batches": [[{"op": WrOpcode.SEND, "flags": SendFlags.SIGNALED | SendFlags.SOLICITED,
                        "inline": True, "nsge": 0, "off": 0, "len": 8, "key": "good", "roff": 0,
                        "rkey": "good", "garbage": None}] * 3],
          "recvs": [3, 0, 0, 0, 0], "recv_len": 64, "cq_depth": 64, "arm": arm, "mtu": 3,
          "loopback": False}
    fast = _run(sc, True)
    assert fast == _run(sc, False)
    assert fast["metrics_b"]["completion_events"] == 1 and len(fast["events_b"]) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_only_the_connected_peer_reaches_a_responder(fast):
    """A third guest's QP connected to a victim QP (it names the victim's QPN
    and knows its rkey and PSN): on either engine, its WRITE, READ, SEND and
    bad-rkey WRITE are dropped at the responder and counted, nothing of the
    victim changes, and the victim pair goes on working."""
    with _engine(fast):
        fab = LocalFabric()
        a, b, pa, pb, ca, cb, qa, qb = pair(fab)
        connect_pair(fab, a, b, qa, qb)
        m = type(a)(fab, gpa=0x8000_0000, clock=a.clock)
        pm = m.alloc_pd()
        cm = m.create_cq(64)
        mb, mm = b.reg_mr(pb, 8192), m.reg_mr(pm, 8192)
        b.write(mb.gpa, bytes(range(256)) * 32)
        m.write(mm.gpa, b"\xEE" * 8192)
        b.post_recv(qb, 9, [(mb, 0, 64)])
        victim = bytes(b.buf)
        for op, rkey in ((WrOpcode.RDMA_WRITE, mb.rkey), (WrOpcode.RDMA_READ, mb.rkey),
                         (WrOpcode.SEND, 0), (WrOpcode.RDMA_WRITE, 0xBAD_BAD)):
            qm = m.create_qp(pm, cm)  # a fresh attacker QP each time (the last one is in ERR)
            m.connect(qm, qb.qpn, gid=fab.gid, timeout=1, retry_cnt=1, rnr_retry=0)
            m.post_send(qm, 1, op, [(mm, 0, 64)], remote_addr=mb.addr, rkey=rkey)
            for _ in range(4):  # the retry timer fires, retry_cnt runs out
                m.clock[0] += 0.01
                m.process()
            (wc,) = m.poll(cm)
            assert wc.status == WcStatus.RETRY_EXC_ERR, (op, wc)
        assert bytes(b.buf) == victim and m.read(mm.gpa, 8192) == b"\xEE" * 8192
        assert b.core.metrics.foreign_requests == 8  # 4 requests, each sent twice
        assert b.core.qps[qb.qpn].state is QpState.RTS and b.poll(cb) == []
        a.post_send(qa, 2, WrOpcode.SEND, [(a.reg_mr(pa, 64), 0, 64)])
        assert a.poll(ca)[0].status == WcStatus.SUCCESS
        (wc,) = b.poll(cb)
        assert (wc.wr_id, wc.status, wc.src_qp) == (9, WcStatus.SUCCESS, qa.qpn)
