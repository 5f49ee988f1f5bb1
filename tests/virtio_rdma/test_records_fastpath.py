"""Doorbell records applied natively (``_datapath.apply_records``) against
the Python path of ``doorbells.poll_records``.

The random mixes of tests/virtio_rdma/test_fastpath.py (every opcode, inline
and SGE payloads, bad keys, malformed WQEs, missing receives, small CQs,
armed CQs, multi-chunk MRs, loopback, batches under one record update) run
on devices with DBREC_POLL: the driver writes the doorbell record and the
device's busy-poll entry (``core.poll``) finds the change, as the daemon's
``--poll-us`` loop does; only CQ arming uses the doorbell queue. Once with
the native paths, once with the Python engine only: guest memory, CQEs, QP
and CQ state, events and every counter must be identical, and the native
run must really have applied records natively.
"""
from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings

from virtio_rdma import _datapath, wire
from virtio_rdma.constants import DoorbellKind
from virtio_rdma.core import RdmaDeviceCore

from . import driver
from .test_fastpath import OPS, _run, scenario_st
from verbs import SendFlags


class _RecordCore(RdmaDeviceCore):
    """A device core with DBREC_POLL whose driver never rings for SQ/RQ:
    each doorbell buffer of those kinds becomes a busy-poll pass instead."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.poll_doorbell_records = True

    def doorbell(self, records, now):
        dbs = wire.decode_doorbells(records)
        if any(d.kind is DoorbellKind.CQ_ARM for d in dbs):
            return super().doorbell(records, now)
        return self.poll(now)


@contextlib.contextmanager
def _records():
    saved = driver.RdmaDeviceCore
    driver.RdmaDeviceCore = _RecordCore
    try:
        yield
    finally:
        driver.RdmaDeviceCore = saved


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario_st)
def test_records_native_and_python_agree(sc):
    with _records():
        fast = _run(sc, True)
        applied = _datapath.records_applied
        slow = _run(sc, False)
    assert _datapath.records_applied == applied  # the Python run did not use it
    for k in fast:
        assert fast[k] == slow[k], k


def test_plain_records_go_native():
    sc = {"batches": [[{"op": op, "flags": SendFlags.SIGNALED, "inline": inl, "nsge": 1, "off": 40,
                        "len": 100, "key": "good", "roff": 64, "rkey": "good", "garbage": None}
                       for op in OPS[:5] for inl in (False, True)]] * 3,
          "recvs": [6, 6, 6, 0, 0], "recv_len": 4000, "cq_depth": 64, "arm": None, "mtu": 3,
          "loopback": False}
    before, done = _datapath.records_applied, _datapath.completed
    with _records():
        fast = _run(sc, True)
        assert fast == _run(sc, False)
    assert _datapath.records_applied - before >= 3 + 3   # each batch's SQ and RQ record
    assert _datapath.completed - done == 30
    assert fast["metrics_a"]["sends_completed"] == 30



def test_idle_poll_is_a_scan_and_changes_are_applied():
    """``doorbells.poll`` with a current scanner: a pass that finds no changed
    record is the scan alone (nothing applied, no core call), yet events a
    peer queued meanwhile are still signalled as a core call's end signals
    them; a changed record is applied once, as ``poll_records`` applies it."""
    from fabric.local import LocalFabric
    from virtio_rdma.constants import EventKind
    from virtio_rdma.testing import DBREC

    fab = LocalFabric()
    g = driver.Guest(fab)
    core = g.core
    core.poll_doorbell_records = True
    notified = []
    core.notify = lambda: notified.append(1)
    pd = g.alloc_pd()
    cq = g.create_cq(16)
    qp = g.create_qp(pd, cq, max_send_wr=8, max_recv_wr=8)
    peer = g.create_qp(pd, cq, max_send_wr=8, max_recv_wr=8)
    driver.connect_pair(fab, g, g, qp, peer)
    buf = g.reg_mr(pd, 4096)
    core.poll(0.0)                           # the first scan looks at the new QP's record
    assert core.dbrec_scanner.key == (len(core.qps), core.qp_epoch)
    calls, bad = core.in_call, core.metrics.bad_doorbells
    assert [core.poll(0.0) for _ in range(3)] == [0, 0, 0]
    assert core.in_call == calls and notified == []
    core.event_queue.append(wire.Event(EventKind.COMPLETION, 0, cq.cqn))
    assert core.poll(0.0) == 0 and notified == [1]
    core.event_queue.clear()
    # a receive posted as a DBREC_POLL driver posts it: WQE and record, no doorbell
    slot = 1 << qp.layout.rq_wqe_shift
    g.write(qp.rq + (qp.rq_pi % qp.layout.rq_depth) * slot,
            wire.encode_recv_wqe(7, [(buf.addr, 64, buf.lkey)], slot_size=slot))
    qp.rq_pi += 1
    g.write(qp.dbrec, DBREC.pack(qp.sq_pi, qp.rq_pi))
    assert core.poll(0.0) == 1
    assert core.qps[qp.qpn].rq_pi == qp.rq_pi
    assert core.poll(0.0) == 0
    assert core.metrics.bad_doorbells == bad
