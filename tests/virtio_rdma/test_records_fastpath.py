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
