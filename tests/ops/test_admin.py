"""The admin socket and ``vrdma ctl`` against a real daemon with real guests.

Guests are guest_lib contexts on the daemon's vhost-user socket doing RDMA
WRITEs and accelerator jobs; the admin socket is asked through
:class:`vrdma.ops.admin.AdminClient` and through the ``vrdma ctl`` command.
Hostile clients (garbage, oversized and half-open lines, a client storm, a
non-owner uid) get errors or are dropped, and the daemon keeps answering.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import accel_core
from guest_lib import CQ, MR, PD, SGE, RDMAError, accel
from guest_lib.aq import AQ, AccelWR
from guest_lib.endpoint import RcEndpoint, connect_pair
from guest_lib.wr import SendWR
from tests.ops.conftest import OpsDaemon, metric_value
from verbs import Access, SendFlags, WcStatus, WrOpcode
from virtio_rdma.constants import AccelOp, AccelStatus
from vrdma.ops import wire
from vrdma.ops.admin import MAX_CLIENTS, MAX_UNSENT_BYTES, AdminClient

MEM = 32 << 20
NOBODY = 65534


def _ctl(d: OpsDaemon, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrdma", "ctl", "-a", d.admin, *argv],
                          capture_output=True, text=True, timeout=30, check=False)


def _writes(a: RcEndpoint, z: RcEndpoint, n: int) -> None:
    for i in range(n):
        a.qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                              sg=[SGE(a.mr.buf, 256, a.mr.lkey)], remote_addr=z.mr.buf, rkey=z.mr.rkey))
        assert a.poll_one().status == WcStatus.SUCCESS


def test_ctl_lists_guests_qps_queues_and_sets_live_tenant_limits(ops_daemon):
    d = ops_daemon
    a, z = RcEndpoint(d.path, mem_size=MEM), RcEndpoint(d.path, mem_size=MEM)
    try:
        connect_pair(a, z)
        _writes(a, z, 10)
        x = np.ones(1024, np.complex64)
        np.testing.assert_array_equal(accel.fft(a.ctx, x), accel_core.fft(x))
        guests = d.ctl("guests")
        assert len(guests) == 2 and {g["uid"] for g in guests} == {os.getuid()}
        assert {g["pid"] for g in guests} == {os.getpid()}
        assert sorted(g["qps"] for g in guests) == [1, 1] and sum(g["aqs"] for g in guests) >= 1
        qps = d.ctl("qps")
        assert sorted(q["qpn"] for q in qps) == sorted([a.qp.qp_num, z.qp.qp_num])
        assert {q["state"] for q in qps} == {"RTS"}
        queues = d.ctl("queues")
        assert [q["op"] for q in queues] == ["FFT"] and queues[0]["jobs_completed"] == 1
        assert d.ctl("jobs") == []
        h = d.ctl("health")
        assert h["connections"] == 2 and h["drain"]["state"] == "serving" and h["pid"] == d.proc.pid
        # the command line: a table, and JSON
        out = _ctl(d, "guests")
        assert out.returncode == 0 and out.stdout.splitlines()[0].split()[:3] == ["NAME", "PID", "UID"]
        assert len(out.stdout.splitlines()) == 3
        out = _ctl(d, "--json", "qps")
        assert out.returncode == 0 and '"RTS"' in out.stdout
        top = subprocess.run([sys.executable, "-m", "vrdma", "top", "-a", d.admin, "--once"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert top.returncode == 0, top.stderr
        assert "guests (2)" in top.stdout and "accelerators (2)" in top.stdout
        assert "drain: serving" in top.stdout
        assert all(g["name"] in top.stdout for g in guests)
        # the tenant's own entry changes live: class, weight, quotas (that tenant only)
        out = _ctl(d, "--json", "tenant", "set", str(os.getuid()), "--weight", "2", "--class", "high",
                   "--quota", "max_accel_jobs=5")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)["tenant"]
        assert (got["name"], got["class"], got["weight"], got["max_accel_jobs"]) == \
            (f"uid:{os.getuid()}", "high", 2.0, 5)
        out = _ctl(d, "--json", "tenant", "set", f"uid:{os.getuid()}", "--quota", "max_accel_jobs=none")
        assert out.returncode == 0 and json.loads(out.stdout)["tenant"]["max_accel_jobs"] is None
        out = _ctl(d, "tenant", "set", str(os.getuid()), "--weight", "-1")
        assert out.returncode == 1 and "weight" in out.stderr
        out = _ctl(d, "tenant", "set", str(os.getuid()), "--quota", "max_bogus=1")
        assert out.returncode == 1 and "max_bogus" in out.stderr
        # a TenantPolicy field applies live: the next guest cannot register an MR
        out = _ctl(d, "tenant", "set", str(os.getuid()), "--limit", "max_mr=0")
        assert out.returncode == 0, out.stderr
        with pytest.raises(RDMAError) as e:
            RcEndpoint(d.path, mem_size=MEM)
        assert e.value.errno == errno.ENOMEM
        text = d.scrape()
        assert metric_value(text, "vrdma_tenant_limit_rejections_total", tenant=f"uid:{os.getuid()}",
                            limit="cap", resource="mr") == 1
        out = _ctl(d, "tenant", "set", str(os.getuid()), "--limit", "max_mr=2048")
        assert out.returncode == 0
        RcEndpoint(d.path, mem_size=MEM).close()
        with pytest.raises(wire.RemoteError) as e2:
            d.ctl("tenant_set", uid=-1, max_mr=1)
        assert e2.value.kind == "bad_argument" and "-1" in str(e2.value)
        with pytest.raises(wire.RemoteError) as e2:
            d.ctl("tenant_set", uid=1, no_such_limit=1)
        assert e2.value.kind == "bad_argument" and "no_such_limit" in str(e2.value)
    finally:
        a.close()
        z.close()
    deadline = time.monotonic() + 10
    while d.ctl("guests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.ctl("guests") == []


def test_ctl_cancels_a_queued_job_the_guest_sees_cancelled(capsys):
    d = OpsDaemon("--accelerators", "fft=1", "--accel-slowdown", "100", metrics=False)
    try:
        with RcEndpoint(d.path, mem_size=MEM) as ep:
            ctx = ep.ctx
            pd = PD(ctx)
            cq = CQ(ctx, 64)
            n, b = 65536, 2
            nbytes = n * b * 8
            mr = MR(pd, 2 * nbytes, Access.LOCAL_WRITE)
            src, dst = SGE(mr.buf, nbytes, mr.lkey), SGE(mr.buf + nbytes, nbytes, mr.lkey)
            aq = AQ(pd, cq, AccelOp.FFT, depth=16)
            wrs = [AccelWR(i, size=n, batch=b, inputs=[src], outputs=[dst]) for i in range(12)]
            assert aq.post(wrs) == 12
            jobs = d.ctl("jobs")
            assert len(jobs) >= 2 and {j["op"] for j in jobs} == {"FFT"}
            last = max(jobs, key=lambda j: j["wr_id"])
            assert last["wr_id"] == 11
            # the command's code in this process: a new interpreter's start-up (seconds on a loaded
            # machine) outlasted the 12 slowed jobs, and job 11 was no longer queued
            from vrdma.cli import main as vrdma_main

            capsys.readouterr()
            rc = vrdma_main(["ctl", "-a", d.admin, "cancel", last["id"]])
            assert rc == 0, capsys.readouterr().err
            out = _ctl(d, "cancel", last["id"])  # taken already
            assert out.returncode == 1 and "not_found" in out.stderr
            out = _ctl(d, "cancel", "garbage")
            assert out.returncode == 1 and "bad_argument" in out.stderr and "garbage" in out.stderr
            done: list = []
            deadline = time.monotonic() + 60
            while len(done) < 12 and time.monotonic() < deadline:
                done += cq.poll(16)[1]
            assert [w.wr_id for w in done] == list(range(12))
            st = {w.wr_id: w.accel_status for w in done}
            assert st[11] == AccelStatus.CANCELLED and st[0] == AccelStatus.SUCCESS
            assert d.ctl("jobs") == []
            aq.close()
    finally:
        assert d.close() == 0


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    def drop():
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    # the system's python: the venv's may not be readable by nobody; the probe needs only the stdlib
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    return subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=False,
                          preexec_fn=drop, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid (setuid nobody)")
def test_a_non_owner_uid_is_refused(ops_daemon):
    d = ops_daemon
    assert stat.S_IMODE(os.stat(d.admin).st_mode) == 0o600
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             f"try:\n s.connect({d.admin!r})\nexcept PermissionError:\n print('EACCES'); sys.exit(0)\n"
             "print(s.recv(4096).decode())\n")  # refused at accept, before any request
    out = _as_nobody(probe)
    assert out.stdout.strip() == "EACCES", out
    # with the file mode opened up, SO_PEERCRED still refuses the uid
    os.chmod(d.admin, 0o666)  # noqa: S103
    out = _as_nobody(probe)
    assert '"ok":false' in out.stdout and '"refused"' in out.stdout and str(NOBODY) in out.stdout, out
    h = d.ctl("health")
    assert h["admin"]["refused_uid"] == 1


def test_hostile_clients_get_errors_or_are_dropped_and_the_daemon_keeps_serving():
    d = OpsDaemon("--accelerators", "fft=1", "--admin-timeout", "1", metrics=False)
    try:
        with AdminClient(d.admin) as c:
            s = c.sock
            for bad, kind in ((b"not json\n", "protocol"), (b"[1,2]\n", "protocol"),
                              (b'{"id":"x","cmd":"health"}\n', "protocol"), (b'{"id":7,"cmd":"rm -rf"}\n',
                                                                               "unknown_command"),
                              (b'{"id":8,"cmd":"cancel","args":[]}\n', "protocol"),
                              (b'\xff\xfe\n', "protocol"), (b'{"id":9,"cmd":"cancel","args":{}}\n',
                                                           "bad_argument")):
                s.sendall(bad)
                line = b""
                while not line.endswith(b"\n"):
                    line += s.recv(4096)
                with pytest.raises(wire.RemoteError) as e:
                    wire.decode_response(line)
                assert e.value.kind == kind, (bad, line)
            assert c.call("health")["connections"] == 0  # the same connection still answers
        # an oversized line: an error, then the connection ends
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.admin)
            s.settimeout(10)
            try:
                s.sendall(b"x" * (wire.MAX_REQUEST_BYTES + 10))
            except (BrokenPipeError, ConnectionResetError):
                pass
            got = b""
            while True:
                try:
                    data = s.recv(4096)
                except ConnectionResetError:
                    break
                if not data:
                    break
                got += data
            assert b'"too_long"' in got
        # half-open: a partial line and silence; closed after --admin-timeout
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.admin)
            s.settimeout(10)
            s.sendall(b'{"id":1,"cmd":"hea')
            assert s.recv(4096) == b""
        # a slow loris: a byte every 0.3 s, never a newline; closed at the same timeout
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.admin)
            s.settimeout(0.3)
            t0, closed = time.monotonic(), False
            while time.monotonic() - t0 < 10 and not closed:
                try:
                    s.sendall(b" ")
                    closed = s.recv(4096) == b""
                except TimeoutError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
            assert closed
        # a client that asks and never reads: its answers pass the high-water mark, then it is
        # closed after --admin-timeout (it used to be awaited for good, holding its slot)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.admin)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            one = len(json.dumps(d.ctl("health")))
            n = (MAX_UNSENT_BYTES // 2) // one  # about 2 MiB of answers: past every socket buffer,
            s.sendall(b'{"id":1,"cmd":"health"}\n' * n)  # below MAX_UNSENT_BYTES
            deadline = time.monotonic() + 30  # dropped 1 s (--admin-timeout) after it stopped reading
            while d.ctl("health")["admin"]["slow_readers"] < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            got = 0
            try:
                while data := s.recv(1 << 16):  # EOF (or a reset), not a 10 s timeout
                    got += len(data)
            except ConnectionResetError:
                pass
            assert got < n * one // 4  # the unsent answers were dropped, not kept for the reader
        assert d.ctl("health")["admin"]["slow_readers"] == 1
        # a storm of idle clients: past MAX_CLIENTS refused at once; the daemon still answers
        socks = []
        try:
            refused = 0
            for _ in range(MAX_CLIENTS + 8):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(d.admin)
                socks.append(s)
            for s in socks:
                s.setblocking(False)
            pending = set(socks)
            deadline = time.monotonic() + 10
            while refused < 8 and time.monotonic() < deadline:
                for s in list(pending):
                    try:
                        if b'"refused"' in s.recv(4096):
                            refused += 1
                            pending.discard(s)
                    except BlockingIOError:
                        pass
                time.sleep(0.05)
            assert refused >= 8
        finally:
            for s in socks:
                s.close()
        def admin_metrics() -> dict | None:
            try:
                return d.ctl("health")["admin"]
            except wire.RemoteError as e:  # the daemon has not seen all of the storm's closes yet
                assert e.kind == "refused", e
                return None

        def counted(m: dict | None) -> bool:
            return m is not None and m["too_long"] == 1 and m["idle_closed"] >= 2 and m["refused_busy"] >= 8 \
                and m["errors"] >= 8

        deadline = time.monotonic() + 20  # not a fixed sleep: it gets to the closed clients when it can
        m = admin_metrics()
        while not counted(m) and time.monotonic() < deadline:
            time.sleep(0.05)
            m = admin_metrics()
        assert counted(m), m
        with RcEndpoint(d.path, mem_size=MEM) as ep:  # guests are served as before
            x = np.ones(256, np.complex64)
            np.testing.assert_array_equal(accel.fft(ep.ctx, x), accel_core.fft(x))
            assert len(d.ctl("guests")) == 1
    finally:
        assert d.close() == 0
