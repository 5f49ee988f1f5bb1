"""A blocking daemon (no --poll-us) serving guests with DBREC_POLL: every
post kicks the doorbellq, and the device applies the QPs' doorbell records
(natively) before the doorbell buffers, which are then stale and cost no
engine run (issue 17; tests/virtio_rdma/test_kick_path.py has the core's
side). Real daemon in a thread, real guests over its unix socket."""
from guest_lib import SGE, QPCap, RecvWR, SendWR
from verbs import SendFlags, WrOpcode


def _device_metrics(backend):
    return backend.call(lambda: [c.core.device.core.metrics.as_dict() for c in backend.server.connections])


def test_blocking_daemon_applies_records_first(rdma_backend, endpoints):
    from guest_lib.endpoint import connect_pair

    a, b = endpoints(cap=QPCap(64, 64, 1, 1, 64)), endpoints(cap=QPCap(64, 64, 1, 1, 64))
    connect_pair(a, b)
    n = 100
    for r in range(n):
        b.qp.post_recv(RecvWR(r, sg=[SGE(b.mr.buf + 4096, 64, b.mr.lkey)]))
        a.mr.write(r.to_bytes(4, "little"))
        a.qp.post_send(SendWR(1000 + r, WrOpcode.SEND, sg=[SGE(a.mr.buf, 4, a.mr.lkey)],
                              send_flags=SendFlags.SIGNALED | SendFlags.INLINE))
        wc = b.poll_one()
        assert (wc.wr_id, wc.byte_len) == (r, 4)
        assert b.mr.view[4096:4100] == r.to_bytes(4, "little")
        assert a.poll_one().wr_id == 1000 + r
    # the daemon blocks: the guests rang every doorbell
    assert a.ctx.dbrec_poll and a.ctx.doorbells_skipped == 0 and b.ctx.doorbells_skipped == 0
    ms = _device_metrics(rdma_backend)
    assert len(ms) == 2
    sent = sum(m["requests_sent"] for m in ms)
    stale = sum(m["doorbells_stale"] for m in ms)
    doorbells = sum(m["doorbells"] for m in ms)
    assert sent == n and doorbells >= 2 * n
    # each SEND's and each receive's doorbell found its record applied already
    assert stale >= 2 * n, (stale, doorbells)
    assert sum(m["bad_doorbells"] + m["internal_errors"] + m["malformed_doorbell_buffers"] for m in ms) == 0
