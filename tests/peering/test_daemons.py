"""Accelerator jobs across real daemons in network namespaces (issue #14).

Every host is a namespace on one bridge running ``vrdma backend --peer ...``
(:class:`vrdma.lab.LabCluster`); guests are this test process, over the
daemons' unix sockets, using guest_lib's three layers. A host without
accelerators gets all its guests' jobs done by its peers; results are
compared with accel_core called here (FFT byte-exact: the same kernels;
Turbo bit-exact). Then the same under 3% loss (iptables' statistic match in
each namespace) and reordering (an L2 relay), and a peer daemon killed with
jobs on it.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import accel_core
from guest_lib import CQ, MR, PD, SGE, Context, SendWR, accel
from guest_lib.aq import AQ, AccelWR
from guest_lib.cq import AccelWC
from verbs import Access, WrOpcode
from virtio_rdma.constants import AccelOp, AccelStatus, AqFlags
from vrdma import lab

pytestmark = pytest.mark.netns
C64 = np.dtype(np.complex64)
#: the daemons' link defaults (peering.link.LinkConfig): 7 x 67 ms ACK timeouts
RETRY_BUDGET = 7 * 4.096e-6 * 2**14
KEEPALIVE = 0.25


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    why = lab.available()
    if why:
        pytest.skip(why)
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def trio(lab_dir):
    """host0 without accelerators, host1 and host2 with FFT and Turbo."""
    with lab.LabCluster([lab.HostSpec("none"), lab.HostSpec(), lab.HostSpec()], lab_dir) as c:
        c.wait_linked()
        yield c


def _c64(shape, seed):
    r = np.random.default_rng(seed)
    return (r.standard_normal(shape) + 1j * r.standard_normal(shape)).astype(C64)


def _poll(cq: CQ, n: int, timeout: float = 30.0) -> list[AccelWC]:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} completions"
        _, wcs = cq.poll(n - len(got))
        got += wcs
        if not wcs:
            time.sleep(0.0005)
    return got


def test_a_host_without_accelerators_gets_every_job_done_by_its_peers(trio):
    """Call-shaped layer on host0: every FFT size class and a spread of K, equal to accel_core."""
    with Context(trio.hosts[0].sock, mem_size=64 << 20, timeout=30) as ctx:
        info = {i.op: i for i in ctx.query_accel()}
        assert info[AccelOp.FFT].local_units == 0 and info[AccelOp.FFT].reachable_hosts == 2
        for n in (8, 60, 1024, 1536, 2048, 4096):  # power of two, mixed radix, Bluestein sizes
            x = _c64((3, n), n)
            assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
            assert accel.ifft(ctx, x).tobytes() == accel_core.ifft(x).tobytes()
        rng = np.random.default_rng(1)
        for K in (40, 512, 1024, 6144):
            bits = rng.integers(0, 2, (2, K), dtype=np.uint8)
            enc = accel.turbo_encode(ctx, bits)
            assert np.array_equal(enc, accel_core.turbo_encode(bits))
            llr = ((1 - 2 * enc.astype(np.float32)) * 2 + rng.standard_normal(enc.shape)).astype(np.float32)
            got_bits, got_used = accel.turbo_decode(ctx, llr, iterations=6, scaling=0.75)
            want_bits, want_used = accel_core.turbo_decode(llr, iterations=6, scaling=0.75)
            assert np.array_equal(got_bits, want_bits) and np.array_equal(got_used, want_used)
        # the file-like layer: write() submits, read() returns results in order
        xs = [_c64((1, 2048), 50 + i) for i in range(4)]
        f = accel.open(ctx, "fft", n=2048, dtype="complex64")
        try:
            for x in xs:
                f.write(x.tobytes())
            for x in xs:
                assert f.read() == accel_core.fft(x).tobytes()
        finally:
            f.close()


def test_verbs_layer_reports_where_jobs_ran_and_forced_targets(trio):
    """AQ + CQ.poll on host1 (which has FFT): local by default, on host2 when forced; RDMA
    traffic between two guests flows on the same devices while jobs run."""
    from guest_lib.endpoint import RcEndpoint

    h1, h2 = trio.hosts[1], trio.hosts[2]
    with Context(h1.sock, mem_size=32 << 20, timeout=30) as ctx:
        pd, cq = PD(ctx), CQ(ctx, 256)
        x = _c64((16, 2048), 7)
        src = MR(pd, x.nbytes, Access.LOCAL_WRITE)
        src.write(x.tobytes())
        outs = [MR(pd, x.nbytes, Access.LOCAL_WRITE) for _ in range(4)]
        local = AQ(pd, cq, AccelOp.FFT)
        forced = AQ(pd, cq, AccelOp.FFT, flags=AqFlags.FORCE_TARGET, target_host=trio.host_id(1, 2))
        a, b = RcEndpoint(h1.sock, buf_size=1 << 20), RcEndpoint(h2.sock, buf_size=1 << 20)
        try:
            a.connect(b.info(), sq_psn=1, rq_psn=2, path_mtu=3, timeout=12, retry_cnt=7, rnr_retry=7)
            b.connect(a.info(), sq_psn=2, rq_psn=1, path_mtu=3, timeout=12, retry_cnt=7, rnr_retry=7)
            for i, (q, out) in enumerate([(local, outs[0]), (forced, outs[1]), (forced, outs[2]),
                                          (local, outs[3])]):
                assert q.post([AccelWR(wr_id=i, size=2048, batch=16, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                       outputs=[SGE(out.buf, x.nbytes, out.lkey)])]) == 1
            # RDMA between the two hosts' guests, meanwhile: a 64 KiB WRITE lands intact
            data = np.random.default_rng(9).bytes(1 << 16)
            a.mr.write(data, len(data), 0)
            a.qp.post_send(SendWR(1, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, len(data), a.mr.lkey)],
                                  remote_addr=b.mr.buf, rkey=b.mr.rkey))
            assert a.poll_one(30).status == 0 and b.mr.read(len(data), 0) == data
            wcs = {w.wr_id: w for w in _poll(cq, 4)}
            assert all(w.accel_status is AccelStatus.SUCCESS for w in wcs.values())
            assert [trio.ran_on(1, wcs[i].host).index for i in range(4)] == [1, 2, 2, 1]
            want = accel_core.fft(x).tobytes()
            assert all(o.read(x.nbytes) == want for o in outs)
        finally:
            a.close()
            b.close()


def _remote_jobs_equal_accel_core(c, n_fft: int = 24, n_dec: int = 4) -> None:
    with Context(c.hosts[0].sock, mem_size=64 << 20, timeout=60) as ctx:
        for i in range(n_fft):
            x = _c64((16, 2048), 100 + i)
            assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
        rng = np.random.default_rng(5)
        bits = rng.integers(0, 2, (1, 6144), dtype=np.uint8)
        enc = accel_core.turbo_encode(bits)
        llr = ((1 - 2 * enc.astype(np.float32)) * 2 + rng.standard_normal(enc.shape)).astype(np.float32)
        for _ in range(n_dec):
            got = accel.turbo_decode(ctx, llr, iterations=8)
            want = accel_core.turbo_decode(llr, iterations=8)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_remote_jobs_under_loss(lab_dir):
    """3% loss each way (iptables statistic) on the peers' RoCE traffic, byte-exact results."""
    from netlab.loss import lossy_link

    with lab.LabCluster([lab.HostSpec("none"), lab.HostSpec()], lab_dir / "loss") as c:
        c.wait_linked()
        with lossy_link(c.hosts[0].ns, c.hosts[1].ns, 0.03) as (la, lb):
            _remote_jobs_equal_accel_core(c)
            assert la.dropped() + lb.dropped() > 0  # the impairment really happened


def test_remote_jobs_under_loss_reordering_and_duplication(lab_dir):
    """An L2 relay between the hosts reorders, duplicates and drops their RoCE datagrams."""
    from netlab.relay import Policy

    policy = Policy(seed=4, loss=0.03, reorder=0.1, reorder_depth=3, duplicate=0.02, udp_port=4791)
    with lab.LabCluster([lab.HostSpec("none"), lab.HostSpec()], lab_dir / "relay", relay=policy) as c:
        c.wait_linked()
        _remote_jobs_equal_accel_core(c, n_fft=12, n_dec=2)
        st = c.relay.stats()
        total = {k: st["a_to_b"][k] + st["b_to_a"][k] for k in ("dropped", "held", "duplicated")}
        assert all(total.values()), total  # the impairments really happened


@pytest.mark.parametrize("fallback", [False, True], ids=["remote-failed", "local-fallback"])
def test_peer_daemon_killed_mid_job(lab_dir, fallback):
    """host1 (slowed) holds host0's jobs and is SIGKILLed: each job completes exactly once,
    REMOTE_FAILED or re-run on host0 (the queue's choice), within 2x the retry budget; host0's
    other queues keep working; when host1 comes back, jobs go there again."""
    specs = [lab.HostSpec(), lab.HostSpec(slowdown=100.0)]
    with lab.LabCluster(specs, lab_dir / f"kill{int(fallback)}") as c:
        c.wait_linked()
        with Context(c.hosts[0].sock, mem_size=64 << 20, timeout=30) as ctx:
            pd, cq = PD(ctx), CQ(ctx, 256)
            x = _c64((16, 2048), 3)
            src = MR(pd, x.nbytes, Access.LOCAL_WRITE)
            src.write(x.tobytes())
            flags = AqFlags.FORCE_TARGET | (AqFlags.LOCAL_FALLBACK if fallback else 0)
            remote = AQ(pd, cq, AccelOp.FFT, flags=flags, target_host=1)
            pad = 256  # canaries either side of each output: nothing may land outside it
            outs = [MR(pd, x.nbytes + 2 * pad, Access.LOCAL_WRITE) for _ in range(8)]
            for o in outs:
                o.write(b"\xab" * (x.nbytes + 2 * pad))
            for i, o in enumerate(outs):
                remote.post(AccelWR(wr_id=i, size=2048, batch=16, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                    outputs=[SGE(o.buf + pad, x.nbytes, o.lkey)]))
            first = _poll(cq, 1)  # host1 runs them slowly: one done, the rest in its hands
            t_kill = time.monotonic()
            c.hosts[1].kill()
            rest = _poll(cq, 7, timeout=10)
            took = time.monotonic() - t_kill
            wcs = {w.wr_id: w for w in first + rest}
            assert sorted(wcs) == list(range(8))  # each exactly once
            assert took < 2 * RETRY_BUDGET, took
            want = accel_core.fft(x).tobytes()
            for i, w in wcs.items():
                whole = outs[i].read(x.nbytes + 2 * pad)
                assert whole[:pad] == whole[-pad:] == b"\xab" * pad  # nothing outside the output
                if w.accel_status is AccelStatus.SUCCESS:
                    assert whole[pad:-pad] == want
                    assert w.host == 1 or (fallback and w.host == 0)  # host0 only as the fallback
                else:
                    # the output buffer of a failed remote job is undefined (the peer may have
                    # written part of it before it died), as an RDMA error leaves its buffer
                    assert not fallback and w.accel_status is AccelStatus.REMOTE_FAILED
            failed = sum(w.accel_status is AccelStatus.REMOTE_FAILED for w in wcs.values())
            assert (failed == 0 and any(w.host == 0 for w in wcs.values())) if fallback else failed >= 1
            time.sleep(2 * KEEPALIVE)
            assert cq.poll(8)[0] == 0  # nothing delivered twice, later
            # the guest's other queues keep working: a local FFT queue
            here = AQ(pd, cq, AccelOp.FFT)
            here.post(AccelWR(wr_id=100, size=2048, batch=16, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                              outputs=[SGE(outs[0].buf, x.nbytes, outs[0].lkey)]))
            (w,) = _poll(cq, 1)
            assert w.accel_status is AccelStatus.SUCCESS and w.host == 0
            # host1 comes back (a new daemon): the link is made again and jobs go there
            c.hosts[1].spec = lab.HostSpec()
            c.hosts[1].start()
            c.wait_linked(hosts=[c.hosts[0]])
            remote.post(AccelWR(wr_id=200, size=2048, batch=16, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                outputs=[SGE(outs[1].buf, x.nbytes, outs[1].lkey)]))
            (w,) = _poll(cq, 1)
            assert w.accel_status is AccelStatus.SUCCESS and w.host == 1
            assert outs[1].read(x.nbytes) == want


def test_redis_unreachable_the_daemons_keep_routing_and_say_so(lab_dir):
    """Load rows through a real redis-server in the hub namespace; the server is killed
    under the daemons: every job still completes on a host with accelerators (the table
    keeps what it has, probes read live counters), and each daemon says Redis is
    unreachable (a warning, and its load-table counters at exit)."""
    import json
    import shutil

    from roce.auth import write_key_file

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on this machine")
    hub, key = "192.0.2.254", str(lab_dir / "redis.key")
    write_key_file(key)
    servers = []

    def start(c):
        p = c.hub.popen(["redis-server", "--bind", hub, "--port", "6379", "--save", "", "--appendonly", "no",
                         "--protected-mode", "no", "--dir", str(lab_dir)])
        p.expect("Ready to accept connections", timeout=20)
        servers.append(p)

    extra = ("--cluster-key", key, "--load-backend", "redis", "--redis-url", f"redis://{hub}:6379/0",
             "--load-period", "0.2")
    specs = [lab.HostSpec("none", extra=(*extra, "--metrics-file", str(lab_dir / "r0.json"))),
             lab.HostSpec(extra=(*extra, "--metrics-file", str(lab_dir / "r1.json"))),
             lab.HostSpec(extra=(*extra, "--metrics-file", str(lab_dir / "r2.json")))]
    with lab.LabCluster(specs, lab_dir / "redis", hub_ip=hub, on_network=start) as c:
        c.wait_linked()
        with Context(c.hosts[0].sock, mem_size=64 << 20, timeout=60) as ctx:
            x = _c64((16, 2048), 11)
            want = accel_core.fft(x).tobytes()
            for _ in range(4):
                assert accel.fft(ctx, x).tobytes() == want
            servers[0].send_signal(9)
            servers[0].wait(10)
            for h in c.hosts:
                line = h.proc.expect("unreachable", stream="stderr", timeout=10)
                assert "routing on the load table as it is" in line, line
            for _ in range(8):
                assert accel.fft(ctx, x).tobytes() == want
        for h in c.hosts:
            h.stop()
    m = [json.loads((lab_dir / f"r{i}.json").read_text()) for i in range(3)]
    for i, d in enumerate(m):
        be = d["load_table"]["backend"]
        assert be["redis_up"] is False and be["outages"] >= 1, (i, be)
    sch = m[0]["peering"]["scheduler"]
    assert sch["decisions"] == sch["remote"] == 12 and sch["no_candidate"] == 0
    # before the outage host0 took its peers' rows from Redis
    assert m[0]["load_table"]["listener"]["accepted"] > 0
