"""Slurm GRES ``vrdma`` (deploy/slurm/) with a real single-node Slurm.

munged, slurmctld and slurmd (Debian's munge and slurm-wlm) are started here
in a private directory with their own ports and munge socket; the
deployment's prolog, task prolog and epilog are the ones in deploy/slurm/
(wrapped only to set where things are). Two jobs in turn ask
``--gres=vrdma:1``: each finds its private daemon at $VRDMA_SOCKET, its
guests do RDMA WRITEs and FFT / Turbo jobs, the daemon runs as the job's uid
and sees its guests as that tenant; after each job the daemon is gone and
its directory removed. A job without the GRES gets no daemon.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ops.conftest import free_port
from vrdma.accounting import query

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "slurm"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "setpriv")
missing = [b for b in NEEDED if shutil.which(b) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"no {', '.join(missing)} (install.sh installs slurm, munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd and the prolog need root"),
]


def _conf(d: Path, host: str) -> str:
    return f"""ClusterName=vrdmatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=vrdma
Prolog={d}/prolog.sh
Epilog={d}/epilog.sh
TaskProlog={d}/task-prolog.sh
PrologFlags=Alloc
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 Gres=vrdma:8 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _wrapper(d: Path, name: str, script: str, env: dict[str, str]) -> None:
    lines = ["#!/bin/sh", *(f"export {k}='{v}'" for k, v in env.items()), f"exec {DEPLOY / script}", ""]
    p = d / name
    p.write_text("\n".join(lines))
    p.chmod(0o755)


class MiniSlurm:
    def __init__(self, d: Path):
        self.d = d
        self.run = d / "run"
        self.state = d / "acct"
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
        (d / "state").mkdir()
        (d / "spool").mkdir()
        (d / "slurm.conf").write_text(_conf(d, host))
        shutil.copy(DEPLOY / "gres.conf", d / "gres.conf")
        env = {"SLURM_CONF": str(d / "slurm.conf"), "VRDMA_RUN": str(self.run),
               "VRDMA_STATE": str(self.state),
               "VRDMA": f"{sys.executable} -m vrdma", "PYTHONPATH": str(ROOT),
               "VRDMA_ARGS": "--accelerators fft=1,turbo=1", "PATH": os.environ["PATH"]}
        _wrapper(d, "prolog.sh", "vrdma-prolog.sh", env)
        _wrapper(d, "epilog.sh", "vrdma-epilog.sh", env)
        _wrapper(d, "task-prolog.sh", "vrdma-task-prolog.sh", {"VRDMA_RUN": str(self.run)})
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PYTHONPATH": str(ROOT)}
        self._start(["munged", "-F", "-f", f"--key-file={key}", f"--socket={d}/munge.sock",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                     f"--seed-file={d}/munged.seed"])
        self._wait((d / "munge.sock").exists, "munged")
        self._start(["slurmctld", "-D", "-f", str(d / "slurm.conf")])
        self._start(["slurmd", "-D", "-f", str(d / "slurm.conf"), "-N", host])
        self._wait(self._node_idle, "the node to be idle")

    def _start(self, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=open(self.d / f"{argv[0]}.err", "w")))  # noqa: SIM115

    def _wait(self, pred, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode} waiting for {what}: "
                                       + self._logs())
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}: " + self._logs())
            time.sleep(0.2)

    def _logs(self) -> str:
        files = sorted(self.d.glob("*.log")) + sorted(self.d.glob("*.err"))
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-2000:] for f in files)

    def _node_idle(self) -> bool:
        r = subprocess.run(["scontrol", "show", "node", "-o"], env=self.env, capture_output=True,
                           text=True, check=False)
        return "State=IDLE" in r.stdout

    def sbatch(self, *args: str) -> tuple[str, str]:
        out = self.d / f"job{len(list(self.d.glob('job*.out')))}.out"
        r = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(out), *args], env=self.env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr + self._logs()
        return r.stdout.strip().split(";")[0], out.read_text()

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def slurm(tmp_path):
    s = MiniSlurm(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_gres_jobs_each_get_a_private_daemon_released_at_job_end(slurm):
    job = f"{sys.executable} {ROOT / 'tests' / 'ops' / 'slurm_job.py'}"
    seen = []
    for _ in range(2):
        jid, out = slurm.sbatch("--gres=vrdma:1", "--wrap", job)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert len(lines) == 1, f"job {jid} output:\n{out}\n{slurm._logs()}"
        r = json.loads(lines[0])
        assert r["job"] == jid and r["fft_ok"] and r["turbo_ok"] and r["writes_ok"]
        assert r["socket"] == str(slurm.run / f"job{jid}" / "vrdma.sock")
        assert r["guest_uids"] == [r["uid"], r["uid"]]  # the job's uid is the tenant
        # released: the daemon is gone and so is its directory (sockets, pid file, log)
        # (the epilog runs on the node after sbatch --wait returned: stop, then remove)
        deadline = time.monotonic() + 15
        while (_alive(r["daemon_pid"]) or (slurm.run / f"job{jid}").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(r["daemon_pid"])
        assert not (slurm.run / f"job{jid}").exists()
        # its accounting outlives it: the FFT and Turbo jobs and the RDMA bytes, tenant = its uid
        rows = query(str(slurm.state / f"job{jid}" / "accounting.db"))
        got = {(row["tenant"], row["op"], row["where"]): row for row in rows}
        tenant = f"uid:{r['uid']}"
        fft = got[(tenant, "fft", "local")]
        assert fft["jobs"] >= 1 and fft["accel_seconds"] > 0, rows
        assert any(op.startswith("turbo") and t == tenant and row["jobs"] >= 1
                   for (t, op, _w), row in got.items()), rows
        assert got[(tenant, "rdma", "local")]["bytes_received"] > 0, rows
        print("slurm job:", r, "accounting:", rows)
        seen.append(r)
    assert seen[0]["daemon_pid"] != seen[1]["daemon_pid"] and seen[0]["socket"] != seen[1]["socket"]
    # a job without the GRES gets no daemon
    jid, out = slurm.sbatch("--wrap", "echo VRDMA_SOCKET=${VRDMA_SOCKET:-unset}")
    assert "VRDMA_SOCKET=unset" in out
    assert not (slurm.run / f"job{jid}").exists()
