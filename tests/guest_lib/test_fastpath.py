"""guest_lib's batched posting and the polling daemon: doorbell records
instead of doorbells while the daemon busy-polls (DBREC_POLL)."""
from guest_lib import SGE, QPCap, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint, connect_pair
from vhost_user.testing import DaemonProcess
from verbs import SendFlags, WrOpcode


def _write_list(a, b, n, size):
    return a.qp.prepare_send([
        SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf + i * size, size, a.mr.lkey)],
               remote_addr=b.mr.buf + i * size, rkey=b.mr.rkey,
               send_flags=SendFlags.SIGNALED if i == n - 1 else 0) for i in range(n)])


def test_post_list_wraps_the_ring_and_reclaims_slots(pair):
    a, b = pair
    plist = _write_list(a, b, 24, 64)  # 24 of 64 slots: the third post wraps
    for r in range(8):
        a.mr.write(bytes([r]) * (24 * 64))
        a.qp.post_list(plist)
        (wc,) = a.poll()
        assert (wc.wr_id, wc.status) == (23, 0)
        assert b.mr.read(24 * 64) == bytes([r]) * (24 * 64)
    assert a.qp.sq_ci == a.qp.sq_pi == 8 * 24


def test_polling_daemon_needs_no_doorbells():
    with DaemonProcess("--poll-us", "20000") as d:
        with RcEndpoint(d.path, 1 << 16, cap=QPCap(64, 64, 1, 1, 64)) as a, \
                RcEndpoint(d.path, 1 << 16, cap=QPCap(64, 64, 1, 1, 64)) as b:
            connect_pair(a, b)
            plist = _write_list(a, b, 16, 128)
            for r in range(200):
                b.qp.post_recv(RecvWR(r, sg=[SGE(b.mr.buf + 4096, 64, b.mr.lkey)]))
                a.qp.post_send(SendWR(1000 + r, WrOpcode.SEND, sg=[SGE(a.mr.buf, 8, a.mr.lkey)],
                                      send_flags=SendFlags.SIGNALED | SendFlags.INLINE))
                assert b.poll_one().wr_id == r and a.poll_one().wr_id == 1000 + r
                a.qp.post_list(plist)
                assert a.poll_one().wr_id == 15
            # while the daemon spins, posts write the doorbell record only
            assert a.ctx.dbrec_poll and a.ctx.doorbells_skipped > 100, a.ctx.doorbells_skipped
