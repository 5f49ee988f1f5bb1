"""A real ``vrdma backend`` process with its admin socket and Prometheus endpoint."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpsDaemon:
    """``vrdma backend --admin-socket ... --metrics-addr 127.0.0.1:PORT ARGS`` as a process
    (``stderr``: where its log goes, e.g. an open file; default: the test's)."""

    def __init__(self, *args: str, metrics: bool = True, timeout: float = 30.0, stderr=None):
        self._dir = tempfile.TemporaryDirectory()
        os.chmod(self._dir.name, 0o755)  # noqa: S103  # the non-owner test's client must reach the socket
        self.path = os.path.join(self._dir.name, "vrdma.sock")
        self.admin = self.path + ".admin"
        self.port = free_port() if metrics else None
        cmd = [sys.executable, "-m", "vrdma", "backend", "--socket", self.path, *args]
        if metrics:
            cmd += ["--metrics-addr", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.path) and os.path.exists(self.admin)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vrdma backend {' '.join(args)} did not start")
            time.sleep(0.02)

    def ctl(self, cmd: str, **args):
        from vrdma.ops.admin import AdminClient

        with AdminClient(self.admin) as c:
            return c.call(cmd, **args)

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._dir.cleanup()
        return rc


@pytest.fixture
def ops_daemon():
    d = OpsDaemon("--accelerators", "fft=1,turbo=1")
    yield d
    assert d.close() == 0


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in a Prometheus text exposition (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None
