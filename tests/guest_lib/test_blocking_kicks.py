"""A blocking daemon (no --poll-us) serving guests with DBREC_POLL: every
post kicks the doorbellq, and the device applies the QPs' doorbell records
(natively) before the doorbell buffers, which are then stale and cost no
engine run (issue 17; tests/virtio_rdma/test_kick_path.py has the core's
side). Real daemon in a thread, real guests over its unix socket."""
from guest_lib import SGE, QPCap, RecvWR, SendWR
from verbs import SendFlags, WcStatus, WrOpcode


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


def _workload(path):
    """SENDs (inline and from an MR), WRITE, WRITE with immediate, READ, a
    receive waited for through the CQ's event (a CQ_ARM doorbell), and last a
    SEND with a bad lkey (its QP goes to ERR, the peer's receives flush).
    Returns what the guests saw."""
    from guest_lib.endpoint import RcEndpoint, connect_pair

    seen = []
    cap = QPCap(32, 32, 2, 2, 64)
    with RcEndpoint(path, 1 << 16, cap=cap) as a, RcEndpoint(path, 1 << 16, cap=cap) as b:
        connect_pair(a, b)
        a.mr.write(bytes(range(256)) * 16)
        rsge = [SGE(b.mr.buf + 8192, 512, b.mr.lkey)]

        def wcs(ep, n=1):
            return [(w.wr_id, int(w.status), int(w.opcode), w.byte_len) for w in ep.poll(n)]

        for i in range(40):
            b.qp.post_recv(RecvWR(i, sg=rsge))
            k = i % 5
            if k == 0:
                wr = SendWR(100 + i, WrOpcode.SEND, sg=[SGE(a.mr.buf + i, 48, a.mr.lkey)],
                            send_flags=SendFlags.SIGNALED | SendFlags.INLINE)
            elif k == 1:
                wr = SendWR(100 + i, WrOpcode.SEND, sg=[SGE(a.mr.buf, 300 + i, a.mr.lkey),
                                                       SGE(a.mr.buf + 1024, 100, a.mr.lkey)],
                            send_flags=SendFlags.SIGNALED)
            elif k == 2:
                wr = SendWR(100 + i, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf + 2048, 1000, a.mr.lkey)],
                            send_flags=SendFlags.SIGNALED, remote_addr=b.mr.buf + 16384 + 64 * i,
                            rkey=b.mr.rkey)
            elif k == 3:
                wr = SendWR(100 + i, WrOpcode.RDMA_WRITE_WITH_IMM, sg=[SGE(a.mr.buf + 8, 64, a.mr.lkey)],
                            send_flags=SendFlags.SIGNALED, remote_addr=b.mr.buf + 32768 + i, rkey=b.mr.rkey,
                            imm_data=i)
            else:
                wr = SendWR(100 + i, WrOpcode.RDMA_READ, sg=[SGE(a.mr.buf + 4096 + 8 * i, 256, a.mr.lkey)],
                            send_flags=SendFlags.SIGNALED, remote_addr=b.mr.buf + 8192, rkey=b.mr.rkey)
            if i % 7 == 6:  # the receive side waits on its completion event
                b.cq.req_notify()
            a.qp.post_send(wr)
            seen.append(wcs(a))
            if k in (0, 1, 3):
                if i % 7 == 6:
                    b.cq.get_event(5.0)
                seen.append(wcs(b))
        b.qp.post_recv(RecvWR(999, sg=rsge))
        a.qp.post_send(SendWR(500, WrOpcode.SEND, sg=[SGE(a.mr.buf, 8, a.mr.lkey ^ 0x5A5A)],
                              send_flags=SendFlags.SIGNALED))
        seen.append(wcs(a))
        seen.append(bytes(b.mr.read(1 << 16)))
        seen.append(bytes(a.mr.read(1 << 16)))
    return seen


def test_native_kick_and_generic_kick_agree(tmp_path):
    """The same workload over a blocking daemon with the native doorbellq
    kick (``_datapath.kick_doorbellq``) and with the generic path: what the
    guests see and the device counters are identical (``doorbells`` and
    ``doorbells_stale`` aside: a guest skips a doorbell when it finds the
    daemon's notifications off, which is timing), and the native run
    really served the kicks."""
    from fabric.local import LocalFabric
    from vhost_user.testing import BackendThread
    from virtio_rdma import _datapath
    from virtio_rdma.device import RdmaDevice

    runs = {}
    for native in (True, False):
        fabric = LocalFabric()
        devices = []

        def make(info, fabric=fabric, devices=devices):
            d = RdmaDevice(fabric)
            devices.append(d)
            return d

        prev, _datapath.kick_enabled = _datapath.kick_enabled, native
        served = _datapath.kicks_served
        try:
            with BackendThread(str(tmp_path / f"{native}.sock"), make) as backend:
                seen = _workload(backend.path)
                # the guests closed: a device reset may have retired its core's counters
                metrics = backend.call(lambda devices=devices: [
                    {k: v + d.retired_metrics.get(k, 0) for k, v in d.core.metrics.as_dict().items()}
                    for d in devices])
        finally:
            _datapath.kick_enabled = prev
        runs[native] = (seen, metrics, _datapath.kicks_served - served)
    (seen_n, m_n, served_n), (seen_p, m_p, served_p) = runs[True], runs[False]
    assert served_n > 50 and served_p == 0
    assert seen_n == seen_p
    assert seen_n[-3][0][:2] == (500, int(WcStatus.LOC_PROT_ERR))  # the bad lkey's error CQE
    timing = {"doorbells", "doorbells_stale"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in m_n] == \
        [{k: v for k, v in m.items() if k not in timing} for m in m_p]
    assert sum(m["requests_sent"] for m in m_n) == 40 and sum(m["local_prot_errors"] for m in m_n) == 1


def test_native_kick_refuses_a_bad_doorbell_chain(rdma_backend, endpoints):
    """A guest's doorbellq buffer outside its memory, on the native kick: that
    connection fails (a protocol error, counted), the other guest goes on."""
    from guest_lib.endpoint import connect_pair
    from virtio_rdma import _datapath
    from virtio_rdma.constants import DOORBELLQ

    a, b = endpoints(cap=QPCap(16, 16, 1, 1, 64)), endpoints(cap=QPCap(16, 16, 1, 1, 64))
    c, d = endpoints(cap=QPCap(16, 16, 1, 1, 64)), endpoints(cap=QPCap(16, 16, 1, 1, 64))
    connect_pair(a, b)
    connect_pair(c, d)
    served = _datapath.kicks_served
    q = a.ctx.transport.queues[DOORBELLQ]
    q.add([(1 << 50, 8)], [], "bad")     # no such guest address
    a.ctx.transport.notify(DOORBELLQ)
    assert rdma_backend.wait_for(lambda s: s.metrics.protocol_errors == 1)
    assert _datapath.kicks_served > served
    d.qp.post_recv(RecvWR(7, sg=[SGE(d.mr.buf, 64, d.mr.lkey)]))
    c.qp.post_send(SendWR(8, WrOpcode.SEND, sg=[SGE(c.mr.buf, 16, c.mr.lkey)],
                          send_flags=SendFlags.SIGNALED))
    assert d.poll_one().wr_id == 7 and c.poll_one().wr_id == 8
    assert rdma_backend.metrics().protocol_errors == 1


def test_native_kick_serves_a_backlog_in_budgeted_passes():
    """More doorbell buffers than one pass takes (DOORBELL_BUDGET) queued
    while the daemon is stopped: the native kick takes a budget, the rest
    comes in the next pass, and every receive is there for the sends."""
    import os
    import signal

    from guest_lib.endpoint import RcEndpoint, connect_pair
    from vhost_user.testing import DaemonProcess
    from virtio_rdma import wire
    from virtio_rdma.constants import DoorbellKind
    from virtio_rdma.device import DOORBELL_BUDGET

    n = DOORBELL_BUDGET + 36
    cap = QPCap(n + 8, n + 8, 1, 1, 64)
    with DaemonProcess("--poll-us", "0") as d, RcEndpoint(d.path, 1 << 16, cap=cap) as a, \
            RcEndpoint(d.path, 1 << 16, cap=cap) as b:
        connect_pair(a, b)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for r in range(n):
                b.qp.post_recv(RecvWR(r, sg=[SGE(b.mr.buf + 64 * r, 64, b.mr.lkey)]))
                # one doorbell buffer each (post_recv skips its own once it sees the
                # daemon has not taken the first: EVENT_IDX, DBREC_POLL)
                b.ctx.ring_doorbells(wire.encode_doorbell(DoorbellKind.RQ, b.qp.qp_num, b.qp.rq_pi))
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        for r in range(n):
            a.mr.write(r.to_bytes(4, "little"))
            a.qp.post_send(SendWR(r, WrOpcode.SEND, sg=[SGE(a.mr.buf, 4, a.mr.lkey)],
                                  send_flags=SendFlags.SIGNALED | SendFlags.INLINE))
            assert a.poll_one().wr_id == r
            wc = b.poll_one()
            assert (wc.wr_id, wc.byte_len) == (r, 4)
            assert b.mr.view[64 * r:64 * r + 4] == r.to_bytes(4, "little")
        assert b.ctx.doorbells_skipped >= n - 1
