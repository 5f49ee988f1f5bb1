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
            while True:  # the reload is asynchronous: wait until a new CQ is allowed
                try:
                    new_cq(g)
                    break
                except RDMAError:
                    assert time.monotonic() < deadline, "SIGHUP did not raise max_cq"
                    time.sleep(0.05)
            new_cq(g)  # the fourth
            with pytest.raises(RDMAError):
                new_cq(g)
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
    mine = [r for r in rows if r["tenant"] == tenant]
    assert [(r["op"], r["where"], r["jobs"], r["failed"]) for r in mine] == [("fft", "local", 6, 0)]  # refused jobs ran nothing
    assert mine[0]["accel_seconds"] > 0
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
    assert [(r["jobs"], r["failed"]) for r in rows] == [(7, 0)]
    assert json.loads(accounting(db, "--format", "json", "--since", "0", "--until", "1")) == []
    csv = accounting(db, "--format", "csv").splitlines()
    assert csv[0].startswith("host,tenant,op,where,jobs") and ",me,fft,local,7,0," in csv[1]
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
