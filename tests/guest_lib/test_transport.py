"""The guest transport seam (guest_lib/transport.py): the vhost-user adapter
implements the interface, a Context runs real verbs over a transport it was
handed, and transport failures reach guests as the documented errors. Every
test talks to a real daemon; no stand-in for the device."""
from __future__ import annotations

import errno
import time

import pytest

from guest_lib import CQ, MR, PD, QP, SGE, Context, QPCap, QPInitAttr, RDMAError, RecvWR, SendWR, UserError
from guest_lib.endpoint import connect_qp, new_psn, poll_cq
from guest_lib.transport import (
    DRIVER_FEATURES,
    NUM_QUEUES,
    DeviceGone,
    TransportError,
    VirtioTransport,
    VirtQueue,
    WaitTimeout,
    missing_members,
)
from guest_lib.transports.vhost_user import VhostUserTransport
from vhost_user.testing import DaemonProcess
from virtio.constants import FeatureBit
from virtio_rdma import wire
from verbs import Access, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.constants import CONTROLQ, EVENTQ, Feature


def test_vhost_user_adapter_implements_the_interface(rdma_backend):
    t = VhostUserTransport(rdma_backend.path, mem_size=8 << 20)
    try:
        assert isinstance(t, VirtioTransport) and missing_members(t) == []
        assert len(t.queues) == NUM_QUEUES and all(isinstance(q, VirtQueue) for q in t.queues)
        assert t.name == rdma_backend.path and t.dead is None
        # the per-operation members are the front-end's own: the seam adds no call to the data path
        dev = t.device
        assert (t.translate, t.uva_to_gpa, t.notify_if_needed, t.queues) == (
            dev.mem.translate, dev.mem.uva_to_gpa, dev.kick_if_needed, dev.queues)
        assert t.features & (1 << FeatureBit.VIRTIO_F_VERSION_1)
        # the daemon offers all of them but accelerator queues (only with accelerators: test_accel.py)
        assert t.features & DRIVER_FEATURES == DRIVER_FEATURES & ~(1 << Feature.ACCEL)
        cfg = wire.decode_config(t.get_config(0, wire.Config.sizeof()))
        assert cfg["max_qp"] >= 1
        gpa = t.alloc(4096, 4096)
        assert gpa % 4096 == 0
        t.translate(gpa, 4096)[:5] = b"hello"
        assert t.uva_to_gpa(t.uva_of(gpa) + 1, 4) == gpa + 1
        assert bytes(t.translate(t.uva_to_gpa(t.uva_of(gpa), 5), 5)) == b"hello"
        t.free(gpa)
        t.check_alive()
        with pytest.raises(WaitTimeout) as e:  # nothing made available: nothing comes back
            t.wait_used(CONTROLQ, 0.05)
        assert e.value.errno == errno.ETIMEDOUT
    finally:
        t.close()
    assert t.dead is not None and t.queues == []
    t.close()  # idempotent
    with pytest.raises(DeviceGone):
        t.check_alive()


def _context(path: str) -> tuple[VhostUserTransport, Context]:
    t = VhostUserTransport(path, mem_size=8 << 20, queue_size=64)
    return t, Context(transport=t)


def test_context_over_an_explicit_transport_sends_and_receives(rdma_backend):
    (ta, a), (tb, b) = _context(rdma_backend.path), _context(rdma_backend.path)
    with a, b:
        assert a.transport is ta and a.name == rdma_backend.path
        ends = []
        for ctx in (a, b):
            pd = PD(ctx)
            mr = MR(pd, 1 << 16, Access.LOCAL_WRITE)
            cq = CQ(ctx, 16)
            qp = QP(pd, QPInitAttr(scq=cq, rcq=cq, cap=QPCap(16, 16, 1, 1, 0)))
            ends.append((mr, cq, qp, new_psn()))
        (mra, cqa, qpa, psna), (mrb, cqb, qpb, psnb) = ends
        gid_a, gid_b = a.query_gid().raw, b.query_gid().raw
        connect_qp(qpa, qpb.qp_num, gid_b, sq_psn=psna, rq_psn=psnb)
        connect_qp(qpb, qpa.qp_num, gid_a, sq_psn=psnb, rq_psn=psna)
        qpb.post_recv(RecvWR(wr_id=5, sg=[SGE(mrb.buf, 4096, mrb.lkey)]))
        payload = bytes(range(256)) * 3
        mra.write(payload)
        qpa.post_send(SendWR(wr_id=6, opcode=WrOpcode.SEND_WITH_IMM, sg=[SGE(mra.buf, len(payload), mra.lkey)],
                             imm_data=0x1234))
        (wa,) = poll_cq(cqa)
        assert (wa.status, wa.opcode, wa.wr_id) == (WcStatus.SUCCESS, WcOpcode.SEND, 6)
        (wb,) = poll_cq(cqb)
        assert (wb.status, wb.opcode, wb.wr_id, wb.byte_len, wb.imm_data) == (
            WcStatus.SUCCESS, WcOpcode.RECV, 5, len(payload), 0x1234)
        assert mrb.read(len(payload)) == payload
    # the Context owned its transport: closing it closed the connection
    assert ta.dead is not None and tb.dead is not None


def test_context_refuses_what_is_not_a_transport(rdma_backend):
    with pytest.raises(UserError, match="not a VirtioTransport: it has no .*wait_used"):
        Context(transport=object())
    with pytest.raises(UserError, match="a vhost-user socket path or transport"):
        Context()
    t = VhostUserTransport(rdma_backend.path, mem_size=8 << 20)
    try:
        with pytest.raises(UserError, match="not both"):
            Context(rdma_backend.path, transport=t)
        t.check_alive()  # an argument error leaves the transport to its owner
    finally:
        t.close()


def test_context_closes_a_transport_with_too_few_queues(rdma_backend):
    t = VhostUserTransport(rdma_backend.path, mem_size=8 << 20, num_queues=NUM_QUEUES - 1)
    with pytest.raises(UserError, match=f"has {NUM_QUEUES - 1} queues, the device needs {NUM_QUEUES}"):
        Context(transport=t)
    assert t.dead is not None


def test_open_failure_is_rdma_error_with_errno(tmp_path):
    with pytest.raises(RDMAError) as e:
        Context(str(tmp_path / "nobody.sock"))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(TransportError) as e2:
        VhostUserTransport(str(tmp_path / "nobody.sock"))
    assert e2.value.errno == errno.ENOENT


def test_device_gone_reaches_the_transport_and_the_context():
    """SIGKILL the daemon: the transport raises DeviceGone (ENOTCONN) from a
    wait within a second and from check_alive, and the Context on it turns
    that into RDMAError(ENOTCONN)."""
    with DaemonProcess() as d:
        t = VhostUserTransport(d.path, mem_size=8 << 20)
        ctx = Context(transport=t)
        try:
            ctx.query_device()
            d.proc.kill()
            d.proc.wait()
            t0 = time.monotonic()
            with pytest.raises(DeviceGone) as e:
                t.wait_used(EVENTQ, 10.0)
            assert time.monotonic() - t0 < 1.0 and e.value.errno == errno.ENOTCONN
            assert t.dead is not None
            with pytest.raises(DeviceGone):
                t.check_alive()
            with pytest.raises(RDMAError) as r:
                ctx.query_device()
            assert r.value.errno == errno.ENOTCONN and ctx.dead
        finally:
            ctx.close()
