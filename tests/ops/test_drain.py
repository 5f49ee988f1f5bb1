"""Drain under load: two real daemons in network namespaces (vrdma.lab.LabCluster).

host0's guest sends FFT jobs to host1 (FORCE_TARGET, LOCAL_FALLBACK); host1
is slowed so several are in its hands when ``vrdma ctl drain`` reaches it.
Those finish there; every job sent after the drain is refused with the
existing refusal and runs on host0 instead (nothing lost: each job
completes exactly once, correctly); host1 reports ``drained`` once its last
job is back; host1's load row leaves host0's table within a few load
periods; ``undrain`` takes remote work again.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

import accel_core
from guest_lib import CQ, MR, PD, SGE, Context
from guest_lib.aq import AQ, AccelWR
from tests.ops.conftest import metric_value
from verbs import Access
from virtio_rdma.constants import AccelOp, AccelStatus, AqFlags
from vrdma import lab
from vrdma.ops.admin import AdminClient

pytestmark = pytest.mark.netns
PERIOD = 0.2
N = 2048
B = 16


def _ctl(h: lab.LabHost, cmd: str, **args):
    with AdminClient(h.sock + ".admin") as c:
        return c.call(cmd, **args)


def _scrape(h: lab.LabHost) -> str:
    r = h.ns.run(["curl", "-sf", f"http://{h.ip}:9464/metrics"], check=False, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _poll(cq: CQ, n: int, timeout: float = 60.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} completions"
        got += cq.poll(n - len(got))[1]
    return got


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def lab_dir(tmp_path):
    why = lab.available()
    if why:
        pytest.skip(why)
    return tmp_path


def test_drain_finishes_what_it_has_refuses_new_remote_work_and_undrains(lab_dir):
    from roce.auth import write_key_file

    key = str(lab_dir / "cluster.key")
    write_key_file(key)
    extra = ("--cluster-key", key, "--load-period", str(PERIOD))
    specs = [lab.HostSpec("fft=1", extra=(*extra, "--metrics-addr", "192.0.2.1:9464")),
             # slowed 1000x (~50-200 ms a job): at 100x its six jobs could all be done before the
             # drain reached it on a loaded machine (held 0, failed 1 of 3 runs with a load of 9)
             lab.HostSpec("fft=1", slowdown=1000.0, extra=(*extra, "--metrics-addr", "192.0.2.2:9464"))]
    with lab.LabCluster(specs, lab_dir / "drain") as c:
        c.wait_linked()
        h0, h1 = c.hosts
        _until(lambda: all(p["in_table"] for p in _ctl(h0, "peers")), 10, "host1 never in host0's table")
        with Context(h0.sock, mem_size=64 << 20, timeout=30) as ctx:
            pd, cq = PD(ctx), CQ(ctx, 256)
            x = (np.arange(B * N) % 7 + 1j).astype(np.complex64).reshape(B, N)
            src = MR(pd, x.nbytes, Access.LOCAL_WRITE)
            src.write(x.tobytes())
            outs = [MR(pd, x.nbytes, Access.LOCAL_WRITE) for _ in range(12)]
            remote = AQ(pd, cq, AccelOp.FFT, depth=16, flags=AqFlags.FORCE_TARGET | AqFlags.LOCAL_FALLBACK,
                        target_host=c.host_id(0, 1))

            def post(i: int, o: MR) -> None:
                remote.post(AccelWR(wr_id=i, size=N, batch=B, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                    outputs=[SGE(o.buf, x.nbytes, o.lkey)]))

            for i in range(6):
                post(i, outs[i])
            _until(lambda: any(p["serving"] for p in _ctl(h1, "peers")), 20, "host1 never took a job")
            state = _ctl(h1, "drain")
            assert state["state"] in ("draining", "drained")
            held = state["remote_jobs_left"]
            assert held >= 1  # slowed 1000x: the job host1 took is still running
            refused_before = sum(p["jobs_refused"] for p in _ctl(h1, "peers"))
            for i in range(6, 10):  # after the drain: host1 takes none of them
                post(i, outs[i])
            wcs = {w.wr_id: w for w in _poll(cq, 10)}
            assert sorted(wcs) == list(range(10))  # each exactly once: nothing lost
            want = accel_core.fft(x).tobytes()
            for i, w in wcs.items():
                assert w.accel_status is AccelStatus.SUCCESS, w
                assert outs[i].read(x.nbytes) == want
            assert all(wcs[i].host == 0 for i in range(6, 10))  # refused by host1, run here
            on_host1 = sum(w.host == 1 for w in wcs.values())
            print(f"drain: host1 held {held} jobs, ran {on_host1}")
            assert on_host1 >= held  # what host1 held when the drain began finished there
            assert sum(p["jobs_refused"] for p in _ctl(h1, "peers")) >= refused_before + 4
            _until(lambda: _ctl(h1, "health")["drain"]["state"] == "drained", 30, "host1 never drained")
            # host1 advertises no units: its row leaves host0's table (3 periods of silence)
            _until(lambda: not any(p["in_table"] for p in _ctl(h0, "peers")), 20 * PERIOD + 5,
                   "host1 stayed in host0's load table while drained")
            # the same through each host's Prometheus endpoint (scraped inside its namespace)
            m0, m1 = _scrape(h0), _scrape(h1)
            assert metric_value(m1, "vrdma_drain_state") == 2
            assert metric_value(m1, "vrdma_peer_jobs_refused_total", peer=h0.ip) >= 4
            assert metric_value(m1, "vrdma_peer_link_connects_total", peer=h0.ip) >= 1
            assert metric_value(m1, "vrdma_roce_udp_rx_packets_total") > 0
            assert metric_value(m0, "vrdma_load_exchange_announcer_sent_total") > 0
            assert metric_value(m0, "vrdma_load_table_present", peer=h1.ip) == 0
            assert metric_value(m0, "vrdma_load_table_age_seconds", peer=h1.ip) > 3 * PERIOD
            # undrain: remote work again
            assert _ctl(h1, "undrain")["state"] == "serving"
            post(100, outs[10])
            (w,) = _poll(cq, 1)
            assert w.accel_status is AccelStatus.SUCCESS and w.host == 1
            assert outs[10].read(x.nbytes) == want
            _until(lambda: all(p["in_table"] for p in _ctl(h0, "peers")), 20 * PERIOD + 5,
                   "host1 not back in host0's table after undrain")


def test_a_drained_host_gets_no_new_work_from_the_scheduler(lab_dir):
    """host0 (no accelerators) places unpinned jobs on host1 (fast) or host2 (slowed):
    host1 gets work before the drain; one load period after it, none."""
    from roce.auth import write_key_file

    key = str(lab_dir / "cluster.key")
    write_key_file(key)
    extra = ("--cluster-key", key, "--load-period", str(PERIOD))
    specs = [lab.HostSpec("none", extra=extra), lab.HostSpec("fft=1", extra=extra),
             lab.HostSpec("fft=1", slowdown=20.0, extra=extra)]
    with lab.LabCluster(specs, lab_dir / "sched") as c:
        c.wait_linked()
        h0, h1, _h2 = c.hosts
        _until(lambda: all(p["in_table"] for p in _ctl(h0, "peers")), 10, "peers never in host0's table")
        with Context(h0.sock, mem_size=64 << 20, timeout=30) as ctx:
            pd, cq = PD(ctx), CQ(ctx, 256)
            n = 1024
            x = (np.arange(n) % 5 + 1j).astype(np.complex64)
            src, out = MR(pd, x.nbytes, Access.LOCAL_WRITE), MR(pd, x.nbytes, Access.LOCAL_WRITE)
            src.write(x.tobytes())
            aq = AQ(pd, cq, AccelOp.FFT, depth=64)

            def run(first: int, count: int) -> Iterator[int]:
                for i in range(first, first + count):  # one at a time: each placed on fresh load
                    aq.post(AccelWR(wr_id=i, size=n, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                    outputs=[SGE(out.buf, x.nbytes, out.lkey)]))
                    (w,) = _poll(cq, 1)
                    assert w.accel_status is AccelStatus.SUCCESS and w.wr_id == i
                    yield c.ran_on(0, w.host).index

            before = list(run(0, 20))
            assert 1 in before, before  # the fast host is chosen while it serves
            res = subprocess.run([sys.executable, "-m", "vrdma", "ctl", "-a", h1.sock + ".admin", "drain",
                                  "--wait", "30"], capture_output=True, text=True, timeout=60, check=False)
            assert res.returncode == 0 and '"drained"' in res.stdout, res.stdout + res.stderr
            time.sleep(PERIOD)
            after = list(run(100, 20))
            assert 1 not in after and set(after) == {2}, after
            assert _ctl(h1, "undrain")["state"] == "serving"
