"""Two guests (two Contexts, each its own vhost-user connection, memfd and
eventfds) on one real back-end: connect RC QPs and run every verb."""
import struct

import pytest

from guest_lib import CQ, MR, PD, QP, SGE, Context, QPAttr, QPInitAttr, RDMAError, RecvWR, SendWR, UserError
from guest_lib.endpoint import connect_pair, poll_cq
from verbs import Access, SendFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.constants import Cmd

def test_query(rdma_backend):
    with Context(rdma_backend.path) as ctx:
        dev = ctx.query_device()
        assert dev.max_qp >= 1024 and dev.max_cq >= 1024
        port = ctx.query_port(1)
        assert port.state == 4  # IBV_PORT_ACTIVE
        assert len(ctx.query_gid(1, 0).raw) == 16


def test_send_recv_with_imm(pair):
    a, b = pair
    b.qp.post_recv(RecvWR(wr_id=7, sg=[SGE(b.mr.buf, 4096, b.mr.lkey)]))
    a.mr.write(b"hello, rdma" * 10)
    a.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND_WITH_IMM, sg=[SGE(a.mr.buf, 110, a.mr.lkey)],
                          imm_data=0xABCD))
    (wc_a,) = poll_cq(a.cq)
    assert (wc_a.status, wc_a.opcode, wc_a.wr_id) == (WcStatus.SUCCESS, WcOpcode.SEND, 1)
    (wc_b,) = poll_cq(b.cq)
    assert (wc_b.status, wc_b.opcode, wc_b.wr_id, wc_b.byte_len) == (WcStatus.SUCCESS, WcOpcode.RECV, 7, 110)
    assert wc_b.imm_data == 0xABCD and wc_b.src_qp in (0, a.qp.qp_num)
    assert b.mr.read(110) == b"hello, rdma" * 10


def test_rdma_write_read(pair):
    a, b = pair
    a.mr.write(bytes(range(256)) * 16)
    a.qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 4096, a.mr.lkey)],
                          remote_addr=b.mr.buf + 8192, rkey=b.mr.rkey))
    assert poll_cq(a.cq)[0].status == WcStatus.SUCCESS
    assert b.mr.read(4096, 8192) == bytes(range(256)) * 16
    b.mr.write(b"R" * 1000, offset=100)
    a.qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.RDMA_READ, sg=[SGE(a.mr.buf + 50000, 1000, a.mr.lkey)],
                          remote_addr=b.mr.buf + 100, rkey=b.mr.rkey))
    wc = poll_cq(a.cq)[0]
    assert (wc.status, wc.opcode, wc.byte_len) == (WcStatus.SUCCESS, WcOpcode.RDMA_READ, 1000)
    assert a.mr.read(1000, 50000) == b"R" * 1000


def test_atomics(pair):
    a, b = pair
    b.mr.write(struct.pack("<Q", 40), offset=64)
    a.qp.post_send(SendWR(wr_id=4, opcode=WrOpcode.ATOMIC_FETCH_AND_ADD, sg=[SGE(a.mr.buf, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf + 64, rkey=b.mr.rkey, compare_add=2))
    assert poll_cq(a.cq)[0].status == WcStatus.SUCCESS
    assert struct.unpack("<Q", a.mr.read(8))[0] == 40
    assert struct.unpack("<Q", b.mr.read(8, 64))[0] == 42
    a.qp.post_send(SendWR(wr_id=5, opcode=WrOpcode.ATOMIC_CMP_AND_SWP, sg=[SGE(a.mr.buf + 8, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf + 64, rkey=b.mr.rkey, compare_add=42, swap=7))
    assert poll_cq(a.cq)[0].status == WcStatus.SUCCESS
    assert struct.unpack("<Q", a.mr.read(8, 8))[0] == 42
    assert struct.unpack("<Q", b.mr.read(8, 64))[0] == 7


def test_error_completions(pair):
    a, b = pair
    # wrong rkey: remote access error, then the QP is in ERR and flushes
    a.qp.post_send(SendWR(wr_id=10, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 64, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey ^ 0x55))
    assert poll_cq(a.cq)[0].status == WcStatus.REM_ACCESS_ERR
    a.qp.post_send(SendWR(wr_id=11, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    wc = poll_cq(a.cq)[0]
    assert (wc.wr_id, wc.status) == (11, WcStatus.WR_FLUSH_ERR)


def test_local_protection_error(pair):
    a, b = pair
    a.qp.post_send(SendWR(wr_id=12, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf + a.mr.length - 8, 64, a.mr.lkey)]))
    assert poll_cq(a.cq)[0].status == WcStatus.LOC_PROT_ERR


def test_rnr_retry_exceeded(endpoints):
    a, b = endpoints(), endpoints()
    connect_pair(a, b, rnr_retry=1, min_rnr_timer=1)
    a.qp.post_send(SendWR(wr_id=13, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    wc = poll_cq(a.cq, timeout=10)[0]
    assert wc.status == WcStatus.RNR_RETRY_EXC_ERR


def test_inline_and_unsignaled_batch(pair):
    a, b = pair
    b.qp.post_recv([RecvWR(wr_id=100 + i, sg=[SGE(b.mr.buf + 64 * i, 64, b.mr.lkey)]) for i in range(32)])
    for i in range(32):
        a.mr.write(bytes([i]) * 32, offset=4096 + 32 * i)
    wrs = [SendWR(wr_id=i, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf + 4096 + 32 * i, 32, a.mr.lkey)],
                  send_flags=SendFlags.INLINE | (SendFlags.SIGNALED if i == 31 else 0)) for i in range(32)]
    a.qp.post_send(wrs)
    (wc,) = poll_cq(a.cq)
    assert wc.wr_id == 31
    got = poll_cq(b.cq, 32)
    assert [w.wr_id for w in got] == [100 + i for i in range(32)]
    for i in range(32):
        assert b.mr.read(32, 64 * i) == bytes([i]) * 32


def test_cq_event(pair):
    a, b = pair
    b.cq.req_notify()
    b.qp.post_recv(RecvWR(wr_id=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.qp.post_send(SendWR(wr_id=1, sg=[SGE(a.mr.buf, 8, a.mr.lkey)]))
    assert b.cq.get_event(timeout=5)
    assert poll_cq(b.cq)[0].status == WcStatus.SUCCESS


def test_errors_carry_errno(rdma_backend):
    with Context(rdma_backend.path) as ctx:
        pd = PD(ctx)
        with pytest.raises(RDMAError) as ei:
            MR(pd, 4096, Access.REMOTE_WRITE)  # REMOTE_WRITE without LOCAL_WRITE
        assert ei.value.error_code == 22
        cq = CQ(ctx, 16)
        qp = QP(pd, QPInitAttr(scq=cq, rcq=cq))
        with pytest.raises(RDMAError) as ei:
            qp.to_rts(QPAttr())  # RESET -> RTS is illegal
        assert ei.value.error_code == 22
        with pytest.raises(RDMAError) as ei:
            ctx.command(Cmd.DEALLOC_PD, pdn=pd.pdn)  # the QP still uses it
        assert ei.value.error_code == 16
        with pytest.raises(UserError):
            MR(pd, 0)
    assert ctx.closed and qp.closed and cq.closed


def test_close_is_idempotent_and_closes_children(rdma_backend):
    ctx = Context(rdma_backend.path)
    pd = PD(ctx)
    mr = MR(pd, 4096)
    ctx.close()
    ctx.close()
    assert pd.closed and mr.closed
    assert rdma_backend.wait_for(lambda s: not s.connections)
