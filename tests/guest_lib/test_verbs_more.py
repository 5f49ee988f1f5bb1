"""More verbs through the real daemon: the remaining statuses, a guest that
misbehaves next to one that must not notice, and scale."""
import struct

import pytest

from guest_lib import CQ, QP, SGE, QPCap, QPInitAttr, RecvWR, SendWR
from guest_lib.endpoint import connect_pair, connect_qp, new_psn, poll_cq
from verbs import WcOpcode, WcStatus, WrOpcode
from virtio_rdma.constants import DoorbellKind


def test_write_with_imm_consumes_a_receive(pair):
    a, b = pair
    b.qp.post_recv(RecvWR(wr_id=77, sg=[SGE(b.mr.buf, 16, b.mr.lkey)]))
    a.mr.write(b"W" * 300)
    a.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.RDMA_WRITE_WITH_IMM, sg=[SGE(a.mr.buf, 300, a.mr.lkey)],
                          remote_addr=b.mr.buf + 4096, rkey=b.mr.rkey, imm_data=0xBEEF))
    assert poll_cq(a.cq)[0].status == WcStatus.SUCCESS
    wc = poll_cq(b.cq)[0]
    assert (wc.wr_id, wc.opcode, wc.imm_data, wc.byte_len) == (77, WcOpcode.RECV_RDMA_WITH_IMM, 0xBEEF, 300)
    assert b.mr.read(300, 4096) == b"W" * 300


def test_receive_too_small(pair):
    a, b = pair
    b.qp.post_recv(RecvWR(wr_id=5, sg=[SGE(b.mr.buf, 16, b.mr.lkey)]))
    a.qp.post_send(SendWR(wr_id=6, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    assert poll_cq(a.cq)[0].status == WcStatus.REM_INV_REQ_ERR
    assert poll_cq(b.cq)[0].status == WcStatus.LOC_LEN_ERR


def test_misaligned_atomic_is_invalid_request(pair):
    a, b = pair
    a.qp.post_send(SendWR(wr_id=8, opcode=WrOpcode.ATOMIC_FETCH_AND_ADD, sg=[SGE(a.mr.buf, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf + 3, rkey=b.mr.rkey, compare_add=1))
    assert poll_cq(a.cq)[0].status == WcStatus.REM_INV_REQ_ERR


def test_misbehaving_guest_cannot_touch_a_neighbour(rdma_backend, endpoints):
    """Guest C guesses keys, points SGEs outside its memory and rings absurd
    doorbells; A and B, connected to each other, keep working with intact data."""
    a, b, c, c2, d, d2 = (endpoints() for _ in range(6))
    connect_pair(a, b)
    connect_pair(c, c2)
    connect_pair(d, d2)
    b.mr.write(b"B" * 4096)
    for guess in (b.mr.rkey, b.mr.rkey + 1, b.mr.lkey ^ 0xFF, 0):
        c.qp.post_send(SendWR(wr_id=guess, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(c.mr.buf, 64, c.mr.lkey)],
                              remote_addr=b.mr.buf, rkey=guess))
        wc = poll_cq(c.cq)[0]
        assert wc.status in (WcStatus.REM_ACCESS_ERR, WcStatus.WR_FLUSH_ERR)
    # (a guessed rkey is resolved by C's own peer only: it never reaches B)
    # SGE outside D's own MR, and absurd doorbells
    d.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[SGE(0x1000, 64, d.mr.lkey)]))
    assert poll_cq(d.cq)[0].status == WcStatus.LOC_PROT_ERR
    d2.ctx.ring_doorbells(struct.pack("<II", d2.qp.qp_num | (int(DoorbellKind.SQ) << 24), 0x7FFFFFFF))
    d2.ctx.ring_doorbells(b"\xff" * 8)  # invalid kind: the buffer is dropped
    d2.ctx.ring_doorbells(struct.pack("<II", 0xABCDEF | (int(DoorbellKind.SQ) << 24), 1))  # no such QP
    # A and B are untouched and still work
    assert b.mr.read(4096) == b"B" * 4096
    b.qp.post_recv(RecvWR(wr_id=1, sg=[SGE(b.mr.buf + 8192, 64, b.mr.lkey)]))
    a.mr.write(b"ok" * 32)
    a.qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    assert poll_cq(a.cq)[0].status == WcStatus.SUCCESS
    assert poll_cq(b.cq)[0].status == WcStatus.SUCCESS
    assert b.mr.read(64, 8192) == b"ok" * 32
    assert rdma_backend.metrics().protocol_errors == 0  # errors were verbs-level, not transport


@pytest.mark.slow
def test_1024_qps_and_1024_cqs_in_one_guest(endpoints):
    """One guest with 1024 CQs and 1024 QPs, each QP sending to a peer guest."""
    n = 1024
    g, p = endpoints(), endpoints()
    cqs = [CQ(g.ctx, 2) for _ in range(n)]
    qps = [QP(g.pd, QPInitAttr(scq=cq, rcq=cq, cap=QPCap(2, 2, 1, 1, 0))) for cq in cqs]
    pcq = CQ(p.ctx, 2048)
    pqps = [QP(p.pd, QPInitAttr(scq=pcq, rcq=pcq, cap=QPCap(2, 2, 1, 1, 0))) for _ in range(n)]
    for mine, theirs in zip(qps, pqps):
        psn_mine, psn_theirs = new_psn(), new_psn()
        connect_qp(mine, theirs.qp_num, p.gid.raw, sq_psn=psn_mine, rq_psn=psn_theirs)
        connect_qp(theirs, mine.qp_num, g.gid.raw, sq_psn=psn_theirs, rq_psn=psn_mine)
    for i, theirs in enumerate(pqps):
        theirs.post_recv(RecvWR(wr_id=i, sg=[SGE(p.mr.buf + 8 * i, 8, p.mr.lkey)]))
    for i, (qp, cq) in enumerate(zip(qps, cqs)):
        g.mr.write(struct.pack("<Q", i * 3 + 1), offset=8 * i)
        qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.SEND, sg=[SGE(g.mr.buf + 8 * i, 8, g.mr.lkey)]))
    for i, cq in enumerate(cqs):
        assert poll_cq(cq)[0].status == WcStatus.SUCCESS
    got = poll_cq(pcq, n, timeout=60)
    assert all(w.status == WcStatus.SUCCESS for w in got)
    assert [struct.unpack("<Q", p.mr.read(8, 8 * i))[0] for i in range(n)] == [i * 3 + 1 for i in range(n)]


def test_post_recv_in_reset_is_einval_as_on_rxe(endpoints):
    """The device drops RQ doorbells of a QP in RESET; guest_lib must not
    accept the WR and lose it silently (ibv_post_recv returns EINVAL)."""
    import errno

    from guest_lib.errors import RDMAError
    from guest_lib.qp import QPAttr

    a = endpoints()
    with pytest.raises(RDMAError) as e:
        a.qp.post_recv(RecvWR(wr_id=1, sg=[SGE(a.mr.buf, 16, a.mr.lkey)]))
    assert e.value.errno == errno.EINVAL and a.qp.rq_pi == 0
    a.qp.to_init(QPAttr())
    a.qp.post_recv(RecvWR(wr_id=2, sg=[SGE(a.mr.buf, 16, a.mr.lkey)]))
    assert a.qp.rq_pi == 1
