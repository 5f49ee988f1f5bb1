"""Tenants through the real daemon (``vrdma backend`` as a subprocess, guests
over vhost-user with guest_lib's Context): tenant quotas give their statuses
and spare the tenant's other objects, SIGHUP reloads the limits without
dropping the guest, and the accounting database holds the jobs after a known
workload and across a daemon restart (``vrdma accounting``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from guest_lib import RDMAError
from tests.virtio_rdma.test_accel_daemon import RawGuest
from vhost_user.testing import DaemonProcess
from virtio_rdma import wire
from virtio_rdma.constants import AccelOp, AccelStatus, Cmd

N = 1024  # FFT points (complex64)


def config(max_cq: int, per_minute: float, max_jobs: int = 64) -> str:
    uid = os.getuid()
    return (f'[[tenant]]\nname = "me"\nuid = {uid}\nclass = "high"\nweight = 2\nmax_cq = {max_cq}\n'
            f"max_accel_jobs = {max_jobs}\naccel_seconds_per_minute = {per_minute}\n")


def fft_jobs(g: RawGuest, aq, ids):
    x = np.ones((len(ids), N), np.complex64)
    gin, view, lk = g.mr(x.nbytes)
    view[:] = x.tobytes()
    gout, _, olk = g.mr(x.nbytes)
    per = N * 8
    g.post(aq, [wire.encode_accel_job(i, AccelOp.FFT, size=N, inputs=[(gin + k * per, per, lk)],
                                      outputs=[(gout + k * per, per, olk)]) for k, i in enumerate(ids)])
    return {c.wr_id: c.status for c in g.poll(len(ids))}


def new_cq(g: RawGuest):
    gpa, _ = g.ctx.alloc(16 * wire.CQE_SIZE)
    db, _ = g.ctx.alloc(8, 8)
    return g.ctx.command(Cmd.CREATE_CQ, cqe=16, comp_vector=0, ring_gpa=gpa, dbrec_gpa=db)["cqn"]


def accounting(db: str, *args: str):
    r = subprocess.run([sys.executable, "-m", "vrdma", "accounting", "--db", db, *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_quotas_sighup_reload_and_accounting_across_a_restart(tmp_path):
    cfg = tmp_path / "vrdma.toml"
    state = tmp_path / "state"
    db = str(state / "accounting.db")
    cfg.write_text(config(max_cq=2, per_minute=1e-6))
    args = ("--accelerators", "fft=1", "--config", str(cfg), "--state-dir", str(state))
    with DaemonProcess(*args) as d:
        g = RawGuest(d.path)  # its first CQ
        try:
            new_cq(g)  # the second
            with pytest.raises(RDMAError) as e:
                new_cq(g)  # the tenant's max_cq = 2
            assert e.value.errno == errno_enospc()
            aq = g.aq(AccelOp.FFT)
            # accelerator-seconds per minute: the bucket holds 1 us; the first job is admitted
            # and takes longer, the next ones are refused until the bucket refills (60 s per us)
            assert fft_jobs(g, aq, [1]) == {1: AccelStatus.SUCCESS}
            assert fft_jobs(g, aq, [2, 3]) == {2: AccelStatus.QUOTA_EXCEEDED, 3: AccelStatus.QUOTA_EXCEEDED}
            # SIGHUP with higher limits: the same guest, its queue and CQs go on
            cfg.write_text(config(max_cq=4, per_minute=600.0))
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            cq_refusals = 1
            while True:  # the reload is asynchronous: wait until a new CQ is allowed
                try:
                    new_cq(g)
                    break
                except RDMAError:
                    cq_refusals += 1
                    assert time.monotonic() < deadline, "SIGHUP did not raise max_cq"
                    time.sleep(0.05)
            new_cq(g)  # the fourth
            with pytest.raises(RDMAError):
                new_cq(g)
            cq_refusals += 1
            got = fft_jobs(g, aq, [4, 5, 6, 7])
            assert set(got.values()) == {AccelStatus.SUCCESS}
            # a broken file on SIGHUP keeps the running configuration
            cfg.write_text('[[tenant]]\nname = "me"\nweight = -1\n')
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
            assert set(fft_jobs(g, aq, [8]).values()) == {AccelStatus.SUCCESS}
        finally:
            g.close()
        assert d.close() == 0  # accounting flushed at exit
    rows = json.loads(accounting(db, "--format", "json"))
    tenant = "me"
    mine = [r for r in rows if r["tenant"] == tenant and r["op"] != "quota"]
    assert [(r["op"], r["where"], r["jobs"], r["failed"]) for r in mine] == [("fft", "local", 6, 0)]  # refused jobs ran nothing
    assert mine[0]["accel_seconds"] > 0
    # ... and each refusal is a row of op quota: the CQ (ENOSPC) and the two jobs (QUOTA_EXCEEDED)
    hits = {r["where"]: r["quota_hits"] for r in rows if r["tenant"] == tenant and r["op"] == "quota"}
    assert hits == {"max_cq": cq_refusals, "accel_seconds_per_minute": 2}, rows
    # restart: one more job; the database keeps the old rows and adds the new
    cfg.write_text(config(max_cq=4, per_minute=600.0))
    with DaemonProcess(*args) as d:
        g = RawGuest(d.path)
        try:
            assert fft_jobs(g, g.aq(AccelOp.FFT), [9]) == {9: AccelStatus.SUCCESS}
        finally:
            g.close()
        assert d.close() == 0
    rows = json.loads(accounting(db, "--format", "json", "--tenant", tenant, "--since", "1h"))
    assert [(r["op"], r["jobs"], r["failed"]) for r in rows if r["op"] != "quota"] == [("fft", 7, 0)]
    assert json.loads(accounting(db, "--format", "json", "--since", "0", "--until", "1")) == []
    csv = accounting(db, "--format", "csv").splitlines()
    assert csv[0].startswith("host,tenant,op,where,jobs") and ",me,fft,local,7,0," in csv[1]
    assert "quota_hits" in csv[0].split(",") and any(f",me,quota,max_cq,0,0,0.0,0.0,0,0,{cq_refusals}," in ln
                                                   for ln in csv)
    assert "me" in accounting(db, "--format", "table")


def errno_enospc() -> int:
    import errno

    return errno.ENOSPC


def test_accounting_cli_refuses_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vrdma", "accounting", "--db", str(tmp_path / "none.db")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no such file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vrdma", "accounting", "--db", str(tmp_path / "none.db"),
                        "--since", "yesterday"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "'yesterday'" in r.stderr


def test_a_bad_config_stops_the_daemon_naming_the_value(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[tenant]]\nname = "x"\nclass = "urgent"\n')
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "-s", str(tmp_path / "s"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "'urgent'" in r.stderr


def test_rdma_bytes_are_accounted_per_tenant(tmp_path):
    from guest_lib import QPCap
    from guest_lib.endpoint import RcEndpoint, connect_pair

    from .test_limits import _write_works

    state = tmp_path / "state"
    cfg = tmp_path / "vrdma.toml"
    cfg.write_text(config(max_cq=8, per_minute=60.0))
    with DaemonProcess("--config", str(cfg), "--state-dir", str(state)) as d:
        a = RcEndpoint(d.path, 4096, cap=QPCap(32, 32, 1, 1, 0), mem_size=8 << 20)
        b = RcEndpoint(d.path, 4096, cap=QPCap(32, 32, 1, 1, 0), mem_size=8 << 20)
        try:
            connect_pair(a, b)
            for i in range(10):  # 10 RDMA WRITEs of 64 bytes each way
                assert _write_works(a, b, bytes([65 + i])) and _write_works(b, a, bytes([97 + i]))
        finally:
            a.close()
            b.close()
        assert d.close() == 0
    rows = json.loads(accounting(str(state / "accounting.db"), "--format", "json", "--tenant", "me"))
    rdma = [r for r in rows if r["op"] == "rdma"]
    assert len(rdma) == 1 and rdma[0]["bytes_received"] == 2 * 10 * 64 and rdma[0]["jobs"] == 0


# ---------------------------------------------------------------- issue #18's operations gaps
def _wait(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def _closed_by_daemon(path: str, timeout: float = 30.0) -> bool:
    """Connect a bare unix socket (no vhost-user handshake); True once the daemon closes it."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(timeout)
        try:
            return s.recv(1) == b""
        except TimeoutError:
            return False


def test_sighup_changes_the_admission_limits_for_the_next_connection(tmp_path):
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from tests.ops.conftest import OpsDaemon

    from .test_limits import _write_works

    cfg = tmp_path / "vrdma.toml"
    cfg.write_text("[tenants]\nmax_connections_per_uid = 3\nhandshake_timeout = 0\n")
    d = OpsDaemon("--config", str(cfg), "--accelerators", "none", metrics=False)
    a = b = None
    try:
        a, b = RcEndpoint(d.path, 4096, mem_size=8 << 20), RcEndpoint(d.path, 4096, mem_size=8 << 20)
        connect_pair(a, b)
        assert _write_works(a, b, b"1")

        def admission():
            return d.ctl("health")["admission"]

        assert admission()["max_connections_per_uid"] == 3
        # lowered below what the uid holds: its two guests stay, a third connection is refused
        cfg.write_text("[tenants]\nmax_connections_per_uid = 1\nhandshake_timeout = 0\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: admission()["max_connections_per_uid"] == 1, "the reload")
        assert _closed_by_daemon(d.path)
        m = admission()
        assert (m["refused_uid_limit"], m["refused_host_limit"]) == (1, 0)
        assert d.ctl("health")["connections"] == 2
        assert _write_works(a, b, b"2") and _write_works(b, a, b"3")
        # raised again, with a handshake timeout: the next connection is admitted, and closed
        # when it does not finish its handshake in time; the guests connected before stay
        cfg.write_text("[tenants]\nmax_connections_per_uid = 3\nhandshake_timeout = 0.2\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: admission()["handshake_timeout"] == 0.2, "the second reload")
        assert _closed_by_daemon(d.path)
        m = admission()
        assert (m["refused_uid_limit"], m["handshake_timeouts"]) == (1, 1)
        # the host-wide limit follows a reload too
        cfg.write_text("[tenants]\nmax_connections = 2\nhandshake_timeout = 0\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: admission()["max_connections"] == 2, "the third reload")
        assert _closed_by_daemon(d.path)
        m = admission()
        assert (m["refused_uid_limit"], m["refused_host_limit"], m["handshake_timeouts"]) == (1, 1, 1)
        assert _write_works(a, b, b"4") and d.ctl("health")["connections"] == 2
    finally:
        for e in (a, b):
            if e is not None:
                e.close()
        assert d.close() == 0


def _tenant_row(d, name: str) -> dict:
    (row,) = [r for r in d.ctl("tenants") if r["tenant"] == name]
    return row


def test_live_overrides_survive_sighup_and_a_restart_until_reset(tmp_path):
    from tests.ops.conftest import OpsDaemon

    uid = os.getuid()
    cfg = tmp_path / "vrdma.toml"
    cfg.write_text(f'[[tenant]]\nname = "me"\nuid = {uid}\nclass = "low"\nmax_cq = 10\n')
    state = tmp_path / "state"
    log = tmp_path / "daemon.log"
    args = ("--config", str(cfg), "--state-dir", str(state), "--accelerators", "none")

    def ctl(d, *argv):
        r = subprocess.run([sys.executable, "-m", "vrdma", "ctl", "-a", d.admin, *argv],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    with open(log, "w") as err:
        d = OpsDaemon(*args, metrics=False, stderr=err)
    try:
        row = _tenant_row(d, "me")
        assert (row["class"], row["max_cq"], row["live"]) == ("low", 10, "-")
        ctl(d, "tenant", "set", "me", "--class", "high", "--quota", "max_cq=3")
        # a reload: the file's other fields change, the ones set live stay
        cfg.write_text(f'[[tenant]]\nname = "me"\nuid = {uid}\nclass = "low"\nweight = 4\nmax_cq = 20\n')
        d.proc.send_signal(signal.SIGHUP)
        row = _wait(lambda: (r := _tenant_row(d, "me"))["weight"] == 4.0 and r, "the reload")
        assert (row["class"], row["weight"], row["max_cq"], row["live"]) == ("high", 4.0, 3, "class,max_cq")
        table = ctl(d, "tenants").splitlines()
        assert "LIVE" in table[0].split() and any(ln.split()[0] == "me" and "class,max_cq" in ln.split()
                                                   for ln in table[1:])
    finally:
        assert d.close() == 0
    saved = json.loads((state / "tenant-overrides.json").read_text())
    assert saved == {"version": 1, "tenants": {"me": {"class": "high", "max_cq": 3}}}
    assert oct((state / "tenant-overrides.json").stat().st_mode & 0o777) == "0o600"
    # a restarted daemon restores them, and says so
    with open(log, "w") as err:
        d = OpsDaemon(*args, metrics=False, stderr=err)
    try:
        row = _tenant_row(d, "me")
        assert (row["class"], row["weight"], row["max_cq"], row["live"]) == ("high", 4.0, 3, "class,max_cq")
        assert "tenant me: live overrides restored" in log.read_text()
        assert "class=high, max_cq=3" in log.read_text()
        out = json.loads(ctl(d, "--json", "tenant", "reset", "me"))
        assert out == {"reset": {"me": ["class", "max_cq"]}}
        row = _tenant_row(d, "me")
        assert (row["class"], row["max_cq"], row["live"]) == ("low", 20, "-")
        ctl(d, "tenant", "set", str(uid), "--weight", "7")
        assert json.loads(ctl(d, "--json", "tenant", "reset", "--all")) == {"reset": {"me": ["weight"]}}
        r = subprocess.run([sys.executable, "-m", "vrdma", "ctl", "-a", d.admin, "tenant", "reset"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "--all" in r.stderr
    finally:
        assert d.close() == 0
    assert json.loads((state / "tenant-overrides.json").read_text())["tenants"] == {}
    # a corrupt or invalid file is logged and ignored: the daemon starts with the file's entries
    for bad in ("{not json", json.dumps({"version": 1, "tenants": {"me": {"weight": -5}}})):
        (state / "tenant-overrides.json").write_text(bad)
        with open(log, "w") as err:
            d = OpsDaemon(*args, metrics=False, stderr=err)
        try:
            row = _tenant_row(d, "me")
            assert (row["class"], row["live"]) == ("low", "-")
            assert "tenant overrides" in log.read_text() and "ignored" in log.read_text()
        finally:
            assert d.close() == 0


def test_local_rdma_bytes_count_for_the_sending_and_the_receiving_tenant(tmp_path):
    """Two guests of one daemon on two sockets (two tenants), QPs connected on the
    local path: SEND and RDMA WRITE bytes count as the requester's sent and the
    responder's received, RDMA READ bytes the other way round."""
    import tempfile

    from guest_lib import SGE, RecvWR, SendWR
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from verbs import SendFlags, WrOpcode

    socks = tempfile.mkdtemp(prefix="vrdma-bytes-")
    left, right = os.path.join(socks, "left.sock"), os.path.join(socks, "right.sock")
    cfg = tmp_path / "vrdma.toml"
    cfg.write_text(f'[[tenant]]\nname = "left"\nsocket = "{left}"\n'
                   f'[[tenant]]\nname = "right"\nsocket = "{right}"\n')
    state = tmp_path / "state"
    sizes = {"send": 1000, "write": 3000, "read": 500}
    try:
        with DaemonProcess("-s", left, "-s", right, "--config", str(cfg), "--state-dir", str(state),
                           "--accelerators", "none") as d:
            _wait(lambda: os.path.exists(right), "the second socket")
            a = RcEndpoint(left, 1 << 16, mem_size=8 << 20)
            b = RcEndpoint(right, 1 << 16, mem_size=8 << 20)
            try:
                connect_pair(a, b)
                a.mr.write(bytes(range(256)) * 16)
                b.mr.write(b"r" * 4096, offset=8192)
                b.qp.post_recv([RecvWR(wr_id=7, sg=[SGE(b.mr.buf + 16384, 4096, b.mr.lkey)])])
                a.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND, send_flags=SendFlags.SIGNALED,
                                      sg=[SGE(a.mr.buf, sizes["send"], a.mr.lkey)]))
                assert a.poll_one().wr_id == 1 and b.poll_one().byte_len == sizes["send"]
                a.qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                                      sg=[SGE(a.mr.buf, sizes["write"], a.mr.lkey)],
                                      remote_addr=b.mr.buf + 32768, rkey=b.mr.rkey))
                assert a.poll_one().wr_id == 2
                a.qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.RDMA_READ, send_flags=SendFlags.SIGNALED,
                                      sg=[SGE(a.mr.buf + 49152, sizes["read"], a.mr.lkey)],
                                      remote_addr=b.mr.buf + 8192, rkey=b.mr.rkey))
                assert a.poll_one().wr_id == 3
                assert b.mr.read(sizes["write"], 32768) == (bytes(range(256)) * 16)[:sizes["write"]]
                assert a.mr.read(sizes["read"], 49152) == b"r" * sizes["read"]
            finally:
                a.close()
                b.close()
            assert d.close() == 0
    finally:
        for name in os.listdir(socks):
            os.unlink(os.path.join(socks, name))
        os.rmdir(socks)
    rows = json.loads(accounting(str(state / "accounting.db"), "--format", "json"))
    got = {r["tenant"]: (r["bytes_sent"], r["bytes_received"]) for r in rows if r["op"] == "rdma"}
    moved = sizes["send"] + sizes["write"]
    assert got == {"left": (moved, sizes["read"]), "right": (sizes["read"], moved)}, rows
