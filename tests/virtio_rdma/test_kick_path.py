"""The blocking daemon's kick path under DBREC_POLL (issue 17): a doorbell
whose index the device already has from the QP's record, with nothing for
the engine to start, is counted (``doorbells_stale``) and costs no engine
run; one that could still start work (an RNR wait, an index ahead of the
record) takes the full path as before."""
from __future__ import annotations

import struct

import pytest

from fabric.local import LocalFabric
from verbs import QpState, WcStatus, WrOpcode
from virtio_rdma import wire
from virtio_rdma.constants import DoorbellKind

from .driver import connect_pair, pair


@pytest.fixture
def fab():
    return LocalFabric()


def _dbrec_pair(fab, **kw):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, **kw)
    for g in (a, b):
        g.core.poll_doorbell_records = True
    return a, b, pa, pb, ca, cb, qa, qb


def test_doorbell_after_its_record_is_stale(fab):
    """What the blocking daemon sees: the record first (device.process_queue
    polls the records before the doorbellq buffers), then the doorbell."""
    a, b, pa, pb, ca, cb, qa, qb = _dbrec_pair(fab)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    for i in range(3):
        b.post_recv(qb, 10 + i, [(mb, 64 * i, 64)])  # record + doorbell: the doorbell applies it
    assert b.core.metrics.doorbells_stale == 0
    a.write(ma.gpa, b"abcdefgh")
    for i in range(3):
        a.write_send_wqe(qa, i, WrOpcode.SEND, [(ma, 0, 8)])
        a.write(qa.dbrec, struct.pack("<II", qa.sq_pi, qa.rq_pi))
        a.core.poll(a.now)  # the record: the SEND runs here
        a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qa.qpn, qa.sq_pi), a.now)
    m = a.core.metrics
    assert (m.doorbells, m.doorbells_stale, m.bad_doorbells, m.requests_sent) == (3, 3, 0, 3)
    assert [c.status for c in a.poll(ca)] == [WcStatus.SUCCESS] * 3
    assert [(c.wr_id, c.byte_len) for c in b.poll(cb)] == [(10, 8), (11, 8), (12, 8)]
    # an RQ doorbell with the record's value: stale too; a list of records as well
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 3)
                    + wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 3), b.now)
    assert (b.core.metrics.doorbells_stale, b.core.metrics.bad_doorbells) == (2, 0)
    # a record ahead of the device's index is no stale doorbell: it is applied
    b.write(qb.rq + 3 * (1 << qb.layout.rq_wqe_shift),
            wire.encode_recv_wqe(13, [(mb.addr, 64, mb.lkey)], slot_size=1 << qb.layout.rq_wqe_shift))
    b.write(qb.dbrec, struct.pack("<II", 0, 4))
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 4), b.now)
    assert (b.core.qps[qb.qpn].rq_pi, b.core.metrics.doorbells_stale) == (4, 2)
    # an absurd index is still fatal
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 4 + 1000), b.now)
    assert b.core.qps[qb.qpn].state is QpState.ERR and b.core.metrics.bad_doorbells == 1


def test_same_index_doorbell_still_runs_a_waiting_engine(fab):
    """An SQ doorbell with the index the device has, while a SEND waits out
    an RNR NAK, is not stale: it goes through the engine (as before)."""
    a, b, pa, pb, ca, cb, qa, qb = _dbrec_pair(fab, rnr_retry=3, min_rnr_timer=14)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    a.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 4)])
    assert b.core.metrics.rnr_naks_sent == 1
    qp = a.core.qps[qa.qpn]
    assert qp.rnr_until is not None
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qa.qpn, qa.sq_pi), a.now)
    assert a.core.metrics.doorbells_stale == 0 and a.core.metrics.bad_doorbells == 0
    b.post_recv(qb, 5, [(mb, 0, 16)])
    a.clock[0] = 1.3e-3
    a.process()
    assert a.poll(ca)[0].status == WcStatus.SUCCESS and b.poll(cb)[0].byte_len == 4


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x01\x00\x00\x00" * 3])
def test_one_record_fast_check_leaves_bad_buffers_to_the_decoder(fab, garbage):
    a, b, pa, pb, ca, cb, qa, qb = _dbrec_pair(fab)
    a.core.doorbell(garbage, a.now)
    m = a.core.metrics
    assert m.doorbells_stale == 0 and m.malformed_doorbell_buffers + m.bad_doorbells == 1
