"""Slurm GRES ``vrdma`` (deploy/slurm/) with a real single-node Slurm.

munged, slurmctld and slurmd (Debian's munge and slurm-wlm) are started here
in a private directory with their own ports and munge socket; the
deployment's prolog, task prolog and epilog are the ones in deploy/slurm/
(wrapped only to set where things are). Two jobs in turn ask
``--gres=vrdma:1``: each finds its private daemon at $VRDMA_SOCKET, its
guests do RDMA WRITEs and FFT / Turbo jobs, the daemon runs as the job's uid
and sees its guests as that tenant; after each job the daemon is gone and
its directory removed. A job without the GRES gets no daemon.

An unprivileged job: root submits with ``sbatch --uid=nobody`` (no user is
created: the system is not changed). The directory the cluster runs in is
world-traversable (its munge key and state stay root's), job output goes to
a sticky world-writable subdirectory, and the job and its daemon run a Python
that uid can execute: the test's own, else the system's python3 of the same
version with the test's site-packages on PYTHONPATH (a skip names it if
neither works).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
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


NOBODY = 65534


def _runs_as(uid: int, python: str, pythonpath: str) -> bool:
    """Whether ``uid`` can run ``python`` and import what a job and its daemon need."""
    # through env(1), as slurmstepd and the prolog start it (setpriv's own exec of a path it
    # cannot reach behaves differently here)
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env",
                        f"PYTHONPATH={pythonpath}", python, "-c",
                        "import numpy, uvloop, vrdma, guest_lib, virtio_rdma._datapath"],
                       env={"PATH": os.environ["PATH"]}, cwd="/",
                       capture_output=True, timeout=60, check=False)
    return r.returncode == 0


def user_python() -> tuple[str, str] | None:
    """(python, PYTHONPATH) that an unprivileged uid can run vrdma with, or None."""
    here = str(ROOT)
    if _runs_as(NOBODY, sys.executable, here):
        return sys.executable, here
    system = shutil.which("python3", path="/usr/bin:/bin")
    site = sysconfig.get_paths()["purelib"]
    if system:
        ver = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip()
        if ver == str(tuple(sys.version_info[:2])) and _runs_as(NOBODY, system, f"{here}:{site}"):
            return system, f"{here}:{site}"
    return None


class MiniSlurm:
    def __init__(self, d: Path, python: tuple[str, str]):
        self.d = d
        self.python, self.pythonpath = python
        self.run = d / "run"
        self.state = d / "acct"
        self.out = d / "out"  # job output: written by the job's user
        self.out.mkdir()
        self.out.chmod(0o1777)
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
        (d / "state").mkdir(mode=0o700)
        (d / "spool").mkdir(mode=0o700)
        (d / "slurm.conf").write_text(_conf(d, host))
        shutil.copy(DEPLOY / "gres.conf", d / "gres.conf")
        env = {"SLURM_CONF": str(d / "slurm.conf"), "VRDMA_RUN": str(self.run),
               "VRDMA_STATE": str(self.state),
               "VRDMA": f"{self.python} -m vrdma", "PYTHONPATH": self.pythonpath,
               "VRDMA_ARGS": "--accelerators fft=1,turbo=1", "PATH": os.environ["PATH"]}
        _wrapper(d, "prolog.sh", "vrdma-prolog.sh", env)
        _wrapper(d, "epilog.sh", "vrdma-epilog.sh", env)
        _wrapper(d, "task-prolog.sh", "vrdma-task-prolog.sh", {"VRDMA_RUN": str(self.run)})
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PYTHONPATH": self.pythonpath}
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
        out = self.out / f"job{len(list(self.out.glob('job*.out')))}.out"
        r = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(out), "--chdir", str(self.out), *args],
                           env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr + self._logs() + (out.read_text() if out.exists() else "")
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


@pytest.fixture(scope="module")
def slurm():
    python = user_python()
    d = Path(tempfile.mkdtemp(prefix="vrdma-slurm-"))
    d.chmod(0o755)  # an unprivileged job reaches its socket, output and munge's socket through it
    try:
        s = MiniSlurm(d, python or (sys.executable, str(ROOT)))
        s.user_python = python
        try:
            yield s
        finally:
            s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gres_job(slurm: MiniSlurm, *sbatch_args: str) -> dict:
    """One --gres=vrdma:1 job running tests/ops/slurm_job.py; checks what it saw, that
    everything was released after it, and its accounting rows. Returns its report."""
    job = f"{slurm.python} {ROOT / 'tests' / 'ops' / 'slurm_job.py'}"
    jid, out = slurm.sbatch("--gres=vrdma:1", *sbatch_args, "--wrap", job)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"job {jid} output:\n{out}\n{slurm._logs()}"
    r = json.loads(lines[0])
    assert r["job"] == jid and r["fft_ok"] and r["turbo_ok"] and r["writes_ok"]
    assert r["socket"] == str(slurm.run / f"job{jid}" / "vrdma.sock")
    assert r["guest_uids"] == [r["uid"], r["uid"]]  # the job's uid is the tenant
    # the job's socket and its directory are the job user's alone (prolog: 0700 dir, 0600 socket)
    assert (r["socket_uid"], r["socket_mode"], r["dir_uid"], r["dir_mode"]) == (r["uid"], 0o600, r["uid"], 0o700)
    assert r["daemon_uid"] == r["uid"]
    # released: the daemon is gone and so is its directory (sockets, pid file, log)
    # (the epilog runs on the node after sbatch --wait returned: stop, then remove)
    deadline = time.monotonic() + 15
    while (_alive(r["daemon_pid"]) or (slurm.run / f"job{jid}").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(r["daemon_pid"])
    assert not (slurm.run / f"job{jid}").exists() and not (slurm.run / f"job{jid}.pid").exists()
    # its accounting outlives it: the FFT and Turbo jobs and the RDMA bytes, tenant = its uid
    rows = query(str(slurm.state / f"job{jid}" / "accounting.db"))
    got = {(row["tenant"], row["op"], row["where"]): row for row in rows}
    tenant = f"uid:{r['uid']}"
    fft = got[(tenant, "fft", "local")]
    assert fft["jobs"] >= 1 and fft["accel_seconds"] > 0, rows
    assert any(op.startswith("turbo") and t == tenant and row["jobs"] >= 1
               for (t, op, _w), row in got.items()), rows
    rdma = got[(tenant, "rdma", "local")]
    assert rdma["bytes_received"] >= 8 * 4096 and rdma["bytes_sent"] >= 8 * 4096, rows
    print("slurm job:", r, "accounting:", rows)
    return r


def test_two_gres_jobs_each_get_a_private_daemon_released_at_job_end(slurm):
    seen = [_gres_job(slurm) for _ in range(2)]
    assert seen[0]["daemon_pid"] != seen[1]["daemon_pid"] and seen[0]["socket"] != seen[1]["socket"]
    # a job without the GRES gets no daemon
    jid, out = slurm.sbatch("--wrap", "echo VRDMA_SOCKET=${VRDMA_SOCKET:-unset}")
    assert "VRDMA_SOCKET=unset" in out
    assert not (slurm.run / f"job{jid}").exists()


def test_a_gres_job_of_an_unprivileged_user(slurm):
    """root submits as nobody: the daemon, the socket and the tenant are nobody's."""
    if slurm.user_python is None:
        pytest.skip(f"no Python uid {NOBODY} can run vrdma with (neither {sys.executable} nor the "
                    "system's python3 of the same version with this site-packages)")
    r = _gres_job(slurm, f"--uid={NOBODY}", f"--gid={NOBODY}")
    assert r["uid"] == NOBODY and not r["pidfile_writable"]
