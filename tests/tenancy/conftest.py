"""Fixtures of the tenant-limit tests: the real daemon (in a thread, so the
test can read its counters and ledger) with a TenantPolicy, a socket
directory other users can reach, and a helper that runs a function in a
forked child as another uid (os.setgid/os.setuid, no exec)."""
import json
import os
import select
import signal
import tempfile
import time

import pytest

from vhost_user.tenancy import TenantLedger, TenantPolicy
from vhost_user.testing import BackendThread
from virtio_rdma.device import RdmaDevice
from fabric.local import LocalFabric

NOBODY = 65534


@pytest.fixture
def shared_dir():
    """A directory any uid may reach (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="vrdma-tenancy-")
    os.chmod(d, 0o755)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def tenant_backend(shared_dir):
    """``start(policy, **server_kw)``: the daemon with ``policy``; returns the
    BackendThread with ``.ledger``, ``.infos`` (every ConnectionInfo the
    factory saw) and ``.fabric``. Stopped at teardown."""
    started = []

    def start(policy: TenantPolicy | None = None, **server_kw):
        policy = policy or TenantPolicy()
        fabric = LocalFabric()
        ledger = TenantLedger(policy)
        make = RdmaDevice.factory(fabric, ledger)
        infos = []

        def factory(info):
            infos.append(info)
            return make(info)

        b = BackendThread(os.path.join(shared_dir, f"rdma{len(started)}.sock"), factory,
                          policy=policy, **server_kw)
        b.start()
        b.ledger, b.infos, b.fabric = ledger, infos, fabric
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def run_as(uid: int, fn, *, timeout: float = 60.0):
    """Fork; in the child drop to ``uid`` (gid the same, no supplementary
    groups) and run ``fn()``; return (child pid, fn's JSON-able result or
    {"error": ...})."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no exceptions escaping
        code = 1
        try:
            os.close(r)
            os.closerange(3, w)  # the parent's sockets (maybe 1000 of them) are not the child's
            os.closerange(w + 1, 1 << 16)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = fn()
            code = 0
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(r, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child {pid} (uid {uid}) did not finish within {timeout} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return pid, json.loads(data or b'{"error": "no output"}')


def rc_write_roundtrip(path: str) -> dict:
    """A guest's whole job in one call: two RC endpoints on ``path``, connected,
    a 64 B RDMA WRITE each way, data checked. Returns what happened."""
    from guest_lib.endpoint import RcEndpoint, connect_pair, poll_cq
    from guest_lib import SGE, SendWR
    from verbs import WcStatus, WrOpcode

    with RcEndpoint(path, 8192, mem_size=8 << 20) as a, RcEndpoint(path, 8192, mem_size=8 << 20) as b:
        connect_pair(a, b)
        for src, dst, pat in ((a, b, b"A"), (b, a, b"B")):
            src.mr.write(pat * 64)
            src.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(src.mr.buf, 64, src.mr.lkey)],
                                    remote_addr=dst.mr.buf + 128, rkey=dst.mr.rkey))
            (wc,) = poll_cq(src.cq)
            if wc.status != WcStatus.SUCCESS or dst.mr.read(64, 128) != pat * 64:
                return {"ok": False, "status": int(wc.status)}
        return {"ok": True, "uid": os.getuid(), "pid": os.getpid()}
