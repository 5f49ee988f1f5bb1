"""A real Prometheus server scrapes a real daemon after a known workload.

The daemon (``vrdma backend --metrics-addr``) serves two guests that do RDMA
WRITEs and accelerator jobs; a Prometheus server started here (Debian's
``prometheus``) scrapes it every second, and PromQL queries through its HTTP
API return the counters the workload implies. The exposition itself is
checked too: counter names end in ``_total``, every family has bounded
labels, the histogram's count matches the completed jobs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import accel_core
from guest_lib import accel
from guest_lib.endpoint import RcEndpoint, connect_pair
from tests.ops.conftest import free_port, metric_value
from tests.ops.test_admin import MEM, _writes

PROMETHEUS = shutil.which("prometheus")
WRITES, FFTS, ENCODES = 10, 3, 5


def _workload(path: str) -> None:
    a, z = RcEndpoint(path, mem_size=MEM), RcEndpoint(path, mem_size=MEM)
    try:
        connect_pair(a, z)
        _writes(a, z, WRITES)
        for _ in range(FFTS):
            x = np.ones(1024, np.complex64)
            np.testing.assert_array_equal(accel.fft(a.ctx, x), accel_core.fft(x))
        bits = np.zeros(40, np.uint8)
        for _ in range(ENCODES):
            np.testing.assert_array_equal(accel.turbo_encode(z.ctx, bits), accel_core.turbo_encode(bits))
    finally:
        a.close()
        z.close()


class PrometheusServer:
    def __init__(self, target: str):
        self._dir = tempfile.TemporaryDirectory()
        cfg = os.path.join(self._dir.name, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: vrdma\n    static_configs:\n"
                    f"      - targets: ['{target}']\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={self._dir.name}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.1)

    def query(self, promql: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def value(self, promql: str) -> float | None:
        res = self.query(promql)
        return float(res[0]["value"][1]) if res else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()


def _gone(d) -> None:
    """Until the daemon has seen the workload's guests hang up (their close does not wait
    for it): only then are their counters folded per tenant and no guest connected."""
    deadline = time.monotonic() + 30
    while d.ctl("guests"):
        assert time.monotonic() < deadline, d.ctl("guests")
        time.sleep(0.05)


def test_the_exposition_is_prometheus_shaped(ops_daemon):
    _workload(ops_daemon.path)
    _gone(ops_daemon)
    from prometheus_client.parser import text_string_to_metric_families

    text = ops_daemon.scrape()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(n.startswith("vrdma_") for n in fams)
    for f in fams.values():
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        assert len(f.samples) < 200, f.name  # bounded label sets
    assert metric_value(text, "vrdma_device_requests_sent_total", tenant=f"uid:{os.getuid()}") == WRITES
    assert metric_value(text, "vrdma_device_aq_completions_total") == FFTS + ENCODES
    assert metric_value(text, "vrdma_accel_jobs_completed_total", op="turbo_encode") == ENCODES
    assert metric_value(text, "vrdma_accel_queue_wait_seconds_count", op="fft") == FFTS
    assert metric_value(text, "vrdma_accel_queue_wait_seconds_count", op="turbo_encode") == ENCODES
    assert metric_value(text, "vrdma_scrape_ok") == 1
    assert metric_value(text, "vrdma_server_poll_moves_total") is not None    # the loop's CPU moves
    # counters of guests that left stay (folded per tenant): a _total never goes back
    assert metric_value(text, "vrdma_tenant_connections") is None  # both guests are gone
    assert metric_value(text, "vrdma_device_sends_completed_total") == WRITES


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (install.sh installs it)")
def test_a_real_prometheus_server_scrapes_the_workloads_counters(ops_daemon):
    _workload(ops_daemon.path)
    prom = PrometheusServer(f"127.0.0.1:{ops_daemon.port}")
    try:
        expect = {
            "sum(vrdma_device_requests_sent_total)": WRITES,
            "sum(vrdma_device_sends_completed_total)": WRITES,
            "sum(vrdma_device_aq_completions_total)": FFTS + ENCODES,
            'sum(vrdma_accel_jobs_completed_total{op="fft"})': FFTS,
            'sum(vrdma_accel_jobs_completed_total{op="turbo_encode"})': ENCODES,
            'sum(vrdma_accel_queue_wait_seconds_count{op="turbo_encode"})': ENCODES,
            "sum(vrdma_server_accepted_total)": 2,
            'up{job="vrdma"}': 1,
        }
        got: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = {q: prom.value(q) for q in expect}
            if got == {q: float(v) for q, v in expect.items()}:
                break
            time.sleep(0.5)
        assert got == {q: float(v) for q, v in expect.items()}
        # a histogram quantile is computable from the buckets (the alert rule's expression)
        p99 = prom.value("histogram_quantile(0.99, sum by (le) (vrdma_accel_queue_wait_seconds_bucket))")
        assert p99 is not None and p99 >= 0
        # every panel of the Grafana dashboard is a query this Prometheus accepts, and the
        # panels of the counters the workload moved have data
        dash = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-vrdma.json").read_text())
        want = {"Accelerator wait p99", "Accelerator jobs completed / s", "RDMA bytes sent / s per tenant",
                "Daemon RSS", "Drain state (0 serving, 1 draining, 2 drained)"}
        deadline = time.monotonic() + 15  # rates need two scrapes in their window
        while True:
            with_data = {p["title"] for p in dash["panels"]
                         if prom.query(p["targets"][0]["expr"].replace("$instance", ".*"))}
            if want <= with_data or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert want <= with_data, with_data
    finally:
        prom.close()



def test_tenants_named_by_socket_are_series_of_their_own(tmp_path):
    """A second socket mapped to tenant "lead" (the same uid: this test's): the guests
    on it count under tenant="lead", those on the first socket under the uid's default
    tenant: one series per tenant, not one per uid."""
    from tests.ops.conftest import OpsDaemon

    second = str(tmp_path / "lead.sock")
    cfg = tmp_path / "tenants.toml"
    cfg.write_text(f'[[tenant]]\nname = "lead"\nsocket = "{second}"\n')
    d = OpsDaemon("--socket", second, "--config", str(cfg))
    try:
        for path, n in ((d.path, 3), (second, 7)):
            a, z = RcEndpoint(path, mem_size=MEM), RcEndpoint(path, mem_size=MEM)
            try:
                connect_pair(a, z)
                _writes(a, z, n)
            finally:
                a.close()
                z.close()
        text = d.scrape()
        assert metric_value(text, "vrdma_device_requests_sent_total", tenant=f"uid:{os.getuid()}") == 3
        assert metric_value(text, "vrdma_device_requests_sent_total", tenant="lead") == 7
    finally:
        assert d.close() == 0
