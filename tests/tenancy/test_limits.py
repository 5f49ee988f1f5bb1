"""Per-connection caps and per-uid budgets through the real daemon and guest_lib:
each limit answers its control command with its status (ENOMEM: the
connection's own cap; ENOSPC: the uid's budget), counts it, and leaves the
guest's other objects working; every budget comes back when objects, the
connection or the daemon's side of it go away."""
import errno
import os
import struct

import pytest

from bench.tenant_hog import PAGE, Hog
from guest_lib import RDMAError, SGE, SendWR, QPCap
from guest_lib.endpoint import RcEndpoint, connect_pair, poll_cq
from vhost_user.tenancy import Resource, TenantPolicy
from verbs import WcStatus, WrOpcode
from virtio_rdma.constants import Cmd

from .conftest import NOBODY, run_as


def _write_works(src, dst, pattern: bytes) -> bool:
    src.mr.write(pattern * 64)
    src.qp.post_send(SendWR(wr_id=9, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(src.mr.buf, 64, src.mr.lkey)],
                            remote_addr=dst.mr.buf + 256, rkey=dst.mr.rkey))
    (wc,) = poll_cq(src.cq)
    return wc.status == WcStatus.SUCCESS and dst.mr.read(64, 256) == pattern * 64


def _refused(op) -> int:
    with pytest.raises(RDMAError) as e:
        op()
    return e.value.errno


def test_each_cap_gives_enomem_counts_and_spares_the_other_objects(tenant_backend):
    buf = 4 * PAGE
    pol = TenantPolicy(max_pd=2, max_cq=3, max_mr=3, max_qp=4, max_pinned_bytes=buf + 3 * PAGE,
                       max_wqes=256)
    b = tenant_backend(pol)
    a = RcEndpoint(b.path, buf, cap=QPCap(32, 32, 1, 1, 0), mem_size=8 << 20)
    peer = RcEndpoint(b.path, buf, cap=QPCap(32, 32, 1, 1, 0), mem_size=8 << 20)
    try:
        connect_pair(a, peer)
        dev = a.ctx.query_device()
        assert (dev.max_pd, dev.max_cq, dev.max_mr, dev.max_qp) == (2, 3, 3, 4)  # the guest sees its caps
        h = Hog(ctx=a.ctx)
        f = h.fill()
        assert (len(f.pds), len(f.cqs), len(f.mrs), len(f.qps)) == (1, 2, 2, 3)
        assert f.stopped == {"pds": errno.ENOMEM, "cqs": errno.ENOMEM, "mrs": errno.ENOMEM,
                             "qps": errno.ENOMEM}
        # pinned bytes: room for one more page after dropping a 1-page MR, not for three
        a.ctx.command(Cmd.DEREG_MR, lkey=f.mrs.pop())
        big, _ = a.ctx.alloc(3 * PAGE, PAGE)
        assert _refused(lambda: h.reg_mr(f.pds[0], 3 * PAGE, big)) == errno.ENOMEM
        f.mrs.append(h.reg_mr(f.pds[0], PAGE, big))
        # in-flight work: ring entries of all QPs
        a.ctx.command(Cmd.DESTROY_QP, qpn=f.qps.pop())
        assert _refused(lambda: h.create_qp(f.pds[0], f.cqs[0], wr=128)) == errno.ENOMEM
        f.qps.append(h.create_qp(f.pds[0], f.cqs[0], wr=1))
        hits = b.call(lambda: dict(b.ledger.uids[0].counters.cap_hits))
        assert hits == {Resource.PD: 1, Resource.CQ: 1, Resource.MR: 1, Resource.QP: 1,
                        Resource.PINNED_BYTES: 1, Resource.WQES: 1}
        assert h.hammer(20)[errno.ENOMEM] == 80  # keeps refusing, never more
        # the guest's connected QP still works both ways, the peer too
        assert _write_works(a, peer, b"x") and _write_works(peer, a, b"y")
        # destroying objects gives their budget back
        a.ctx.command(Cmd.DESTROY_QP, qpn=f.qps.pop())
        f.qps.append(h.create_qp(f.pds[0], f.cqs[0]))
    finally:
        a.close()
        peer.close()
    assert b.wait_for(lambda s: not s.connections)
    assert b.call(lambda: all(v == 0 for v in b.ledger.totals(0).values()))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a guest of another uid)")
def test_uid_budget_spans_its_connections_not_other_uids(tenant_backend):
    pol = TenantPolicy(uid_max_objects=12, uid_max_pinned_bytes=8 * PAGE)
    b = tenant_backend(pol, socket_mode=0o666)
    one, two = Hog(b.path, mem_size=4 << 20), Hog(b.path, mem_size=4 << 20)
    try:
        pds = one._fill("pds", one.alloc_pd, None)
        assert len(pds) == 12 and one.filled.stopped["pds"] == errno.ENOSPC
        assert _refused(two.alloc_pd) == errno.ENOSPC  # same uid, other connection
        # another uid is not charged for uid 0's use
        pid, out = run_as(NOBODY, lambda: _nobody_allocs(b.path))
        assert out == {"pdns": 3}, out
        one.ctx.command(Cmd.DEALLOC_PD, pdn=pds.pop())
        keep = two.alloc_pd()  # the freed object went to the uid's pool
        assert _refused(one.alloc_pd) == errno.ENOSPC
        # pinned bytes per uid: 5 pages here leave 3 there
        region, _ = two.ctx.alloc(5 * PAGE, PAGE)
        one_region, _ = one.ctx.alloc(5 * PAGE, PAGE)
        one.ctx.command(Cmd.DEALLOC_PD, pdn=pds.pop())
        one.ctx.command(Cmd.DEALLOC_PD, pdn=pds.pop())
        one.reg_mr(pds[0], 5 * PAGE, one_region)
        assert _refused(lambda: two.reg_mr(keep, 5 * PAGE, region)) == errno.ENOSPC
        two.reg_mr(keep, 3 * PAGE, region)
        counters = b.call(lambda: dict(b.ledger.uids[0].counters.budget_hits))
        assert counters == {Resource.PD: 3, Resource.PINNED_BYTES: 1}
    finally:
        one.close()
    # closing one connection returns its share: the other may now use it
    assert b.wait_for(lambda s: len(s.connections) == 1)
    more = two._fill("pds", two.alloc_pd, 20)
    assert len(more) == 12 - 2  # the second connection already holds 1 PD and 1 MR
    two.close()
    assert b.wait_for(lambda s: not s.connections)
    assert b.call(lambda: all(v == 0 for v in b.ledger.totals(0).values()))


def _nobody_allocs(path):
    with Hog(path, mem_size=4 << 20) as h:
        return {"pdns": len(h._fill("pds", h.alloc_pd, 3))}


def test_budget_released_when_the_daemon_drops_a_broken_connection(tenant_backend):
    b = tenant_backend(TenantPolicy())
    h = Hog(b.path, mem_size=4 << 20)
    try:
        h.fill(fraction=0.02)
        held = b.call(lambda: b.ledger.totals(0)[Resource.QP])
        assert held >= 20
        # a protocol violation: an unknown vhost-user request; the daemon closes the connection
        h.ctx.transport.device.frontend.sock.sendall(struct.pack("<III", 0xFFFF, 1, 0))
        assert b.wait_for(lambda s: not s.connections)
        assert b.metrics().protocol_errors == 1
    finally:
        h.close()
    assert b.call(lambda: all(v == 0 for v in b.ledger.totals(0).values()))


def test_budget_released_on_device_reset(tenant_backend):
    b = tenant_backend(TenantPolicy())
    h = Hog(b.path, mem_size=4 << 20)
    try:
        h.fill(fraction=0.02)
        assert b.call(lambda: b.ledger.totals(0)[Resource.MR]) >= 40
        h.ctx.transport.device.frontend.reset_device()  # RESET_DEVICE: every object goes, the connection stays
        assert b.wait_for(lambda s: all(v == 0 for v in b.ledger.totals(0).values()))
        assert b.connection_count() == 1
    finally:
        h.close()


def test_a_burst_of_control_commands_is_served_in_slices(tenant_backend):
    """A guest that queues 120 commands with one kick gets all 120 answers, and
    the daemon returns to its event loop between slices (other guests go first)."""
    b = tenant_backend(TenantPolicy(max_pd=4))
    with Hog(b.path, mem_size=8 << 20) as h, RcEndpoint(b.path, 8192, mem_size=8 << 20) as a, \
            RcEndpoint(b.path, 8192, mem_size=8 << 20) as peer:
        connect_pair(a, peer)
        assert h.burst(120) == {0: 120}  # 2 descriptors each: a 256-entry ring holds 128
        assert h.burst(120, Cmd.ALLOC_PD) == {0: 4, errno.ENOMEM: 116}
        yields = b.call(lambda: sum(c.core.metrics.budget_yields for c in b.server.connections))
        assert yields >= 2 * (120 // 16 - 1)
        assert _write_works(a, peer, b"z")


def _transfers(a, b, sizes) -> None:
    """A SEND, an RDMA WRITE (a -> b) and an RDMA READ (a <- b) of ``sizes``' lengths."""
    from guest_lib import RecvWR
    from verbs import SendFlags

    a.mr.write(b"s" * 4096)
    b.mr.write(b"r" * 4096, offset=8192)
    b.qp.post_recv([RecvWR(wr_id=7, sg=[SGE(b.mr.buf + 16384, 4096, b.mr.lkey)])])
    for wr_id, op, n, extra in ((1, WrOpcode.SEND, sizes["send"], {}),
                                (2, WrOpcode.RDMA_WRITE, sizes["write"],
                                 {"remote_addr": b.mr.buf + 32768, "rkey": b.mr.rkey}),
                                (3, WrOpcode.RDMA_READ, sizes["read"],
                                 {"remote_addr": b.mr.buf + 8192, "rkey": b.mr.rkey})):
        off = 49152 if op == WrOpcode.RDMA_READ else 0
        a.qp.post_send(SendWR(wr_id=wr_id, opcode=op, send_flags=SendFlags.SIGNALED,
                              sg=[SGE(a.mr.buf + off, n, a.mr.lkey)], **extra))
        assert a.poll_one().wr_id == wr_id
    assert b.poll_one().byte_len == sizes["send"]
    assert a.mr.read(sizes["read"], 49152) == b"r" * sizes["read"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_local_transfers_count_bytes_on_both_devices(tenant_backend, native):
    """Each device's counters (what accounting samples per tenant): the requester's
    SEND and WRITE bytes are its bytes_sent, the responder's bytes_received; READ
    the other way round. Both local engines: the native fast path and Python's."""
    from virtio_rdma import datapath

    if native and datapath._fast is None:
        pytest.skip("the native datapath extension is not built")
    sizes = {"send": 1000, "write": 3000, "read": 500}
    prev = datapath.use_fast_path(native)
    try:
        b = tenant_backend()
        with RcEndpoint(b.path, 1 << 16, mem_size=8 << 20) as x, \
                RcEndpoint(b.path, 1 << 16, mem_size=8 << 20) as y:
            connect_pair(x, y)
            _transfers(x, y, sizes)
            got = b.call(lambda: sorted((a.byte_counters.bytes_sent, a.byte_counters.bytes_received)
                                        for a in b.ledger.accounts))
    finally:
        datapath.use_fast_path(prev)
    moved = sizes["send"] + sizes["write"]
    assert got == [(sizes["read"], moved), (moved, sizes["read"])]
