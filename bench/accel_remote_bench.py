"""Remote against local accelerator jobs across real daemons (issue #14).

Two hosts in network namespaces on one bridge (:class:`vrdma.lab.LabCluster`),
each a ``vrdma backend --accelerators fft=1,turbo=1 --peer <other>``; the
guest is this process on host A's socket. For a 16 x 2048 complex64 FFT
batch and a K=6144 Turbo decode (8 iterations), all in the same run:

* **latency**, one job at a time: on A's own accelerator (a plain queue)
  against on B's (a queue with FORCE_TARGET to host 1). The remote job moves
  its input to B (B READs it) and its output back (B WRITEs it into the
  guest's buffer), so its added latency is set against the baseline of the
  same two transfers between two guests on those hosts over the same veth:
  an RDMA WRITE of the input's size plus one of the output's size, each
  timed post-to-completion at the links' path MTU (4096) (goal: added
  latency within 1.5x of that);
* **throughput** with 32 jobs kept in flight: remote (B's accelerator)
  against local (A's), each with one worker (goal: remote >= 90% of local);
  beside it, where the time goes: the CPU time daemon A, daemon B and the
  guest spent per job in each run, the time their threads were runnable but
  waited for a CPU (both from /proc/<pid>/task/<tid>/schedstat), and how many
  of the machine's vCPUs they kept busy -- on 2 vCPUs a remote job's
  transfers (userspace RoCE in both daemons) come out of the same cores as
  the kernels.

``python -m bench.accel_remote_bench [--quick] [--json]``; needs root (it
says why it cannot run otherwise). Figures vary with the machine: the header
names the processor and the CPU layout; the daemons, the guest and the
kernel's veth share its vCPUs (the guest busy-polls its CQ but yields the CPU
between empty polls, as a latency-bound guest on a shared host should).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

GOALS = {"latency_ratio": 1.5, "throughput_ratio": 0.90}
N_FFT, B_FFT, K, ITS = 2048, 16, 6144, 8
IN_FLIGHT = 32
MTU_CODE = 5  # IBV_MTU_4096: the peer links' path MTU on the lab's 9000-byte veths (fabric.roce.roce_mtu)


def _stats(us) -> dict:
    a = np.asarray(us, dtype=float)
    return {"median_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)), "n": len(a)}


class _Jobs:
    """One op's jobs on host A's guest: a local queue, a queue forced to host 1, buffers."""

    def __init__(self, ctx, op: str):
        from accel_core import turbo_encode
        from guest_lib import CQ, MR, PD
        from guest_lib.aq import AQ
        from verbs import Access
        from virtio_rdma.constants import AccelOp, AqFlags

        rng = np.random.default_rng(7)
        self.fft = op == "fft"
        self.op = AccelOp.FFT if self.fft else AccelOp.TURBO_DECODE
        if self.fft:
            shape = (B_FFT, N_FFT)
            x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
            data, self.out_bytes = x.tobytes(), x.nbytes
        else:
            coded = turbo_encode(rng.integers(0, 2, (1, K), dtype=np.uint8)).astype(np.float32)
            data = ((1 - 2 * coded) * 2 + rng.standard_normal(coded.shape)).astype(np.float32).tobytes()
            self.out_bytes = K + 1
        self.in_bytes = len(data)
        self.pd, self.cq = PD(ctx), CQ(ctx, 4 * IN_FLIGHT)
        self.src = MR(self.pd, self.in_bytes, Access.LOCAL_WRITE)
        self.src.write(data)
        self.dst = [MR(self.pd, self.out_bytes, Access.LOCAL_WRITE) for _ in range(IN_FLIGHT)]
        self.local = AQ(self.pd, self.cq, self.op, IN_FLIGHT)
        self.remote = AQ(self.pd, self.cq, self.op, IN_FLIGHT, flags=AqFlags.FORCE_TARGET, target_host=1)

    def wr(self, i: int):
        from guest_lib import SGE
        from guest_lib.aq import AccelWR

        d = self.dst[i % IN_FLIGHT]
        return AccelWR(wr_id=i, size=N_FFT if self.fft else K, batch=B_FFT if self.fft else 1,
                       iterations=0 if self.fft else ITS,
                       inputs=[SGE(self.src.buf, self.in_bytes, self.src.lkey)],
                       outputs=[SGE(d.buf, self.out_bytes, d.lkey)])

    def poll(self, n: int, timeout: float = 60.0) -> list:
        got: list = []
        end = time.monotonic() + timeout
        while len(got) < n:
            _, wcs = self.cq.poll(n - len(got))
            got += wcs
            if not wcs:
                os.sched_yield()  # 2 vCPUs: the daemons and the accelerator need them more
            if time.monotonic() > end:
                raise TimeoutError(f"{len(got)} of {n} jobs completed")
        for w in got:
            if int(w.accel_status) != 0:
                raise RuntimeError(f"job {w.wr_id} completed {w.accel_status!r}")
        return got

    def latency(self, q, reps: int) -> tuple[dict, set]:
        us, hosts = [], set()
        for i in range(reps + 3):
            t = time.perf_counter()
            q.post(self.wr(i))
            (w,) = self.poll(1)
            if i >= 3:
                us.append((time.perf_counter() - t) * 1e6)
                hosts.add(w.host)
        return _stats(us), hosts

    def rate(self, q, jobs: int) -> float:
        posted = done = 0
        t = time.perf_counter()
        while done < jobs:
            while posted < jobs and posted - done < IN_FLIGHT:
                posted += q.post(self.wr(posted))
            done += len(self.poll(1))
        return jobs / (time.perf_counter() - t)


def _sched_seconds(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of process ``pid`` so far,
    summed over its live threads (/proc/<pid>/task/<tid>/schedstat, nanoseconds)."""
    on = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                a, b, _ = f.read().split()
        except (OSError, ValueError):  # a thread that just ended
            continue
        on += int(a)
        wait += int(b)
    return on / 1e9, wait / 1e9


def _profiled_rate(j: _Jobs, q, jobs: int, pids: dict[str, int]) -> tuple[float, dict]:
    """``j.rate(q, jobs)`` and, per process in ``pids``, the CPU microseconds per job
    over it and the microseconds per job its threads were runnable but waited for a
    CPU (the machine's other load); with the vCPUs they kept busy together."""
    t0 = time.perf_counter()
    s0 = {k: _sched_seconds(p) for k, p in pids.items()}
    rate = j.rate(q, jobs)
    wall = time.perf_counter() - t0
    prof: dict[str, float] = {}
    busy = 0.0
    for k, p in pids.items():
        on, wait = _sched_seconds(p)
        prof[f"{k}_cpu_us_per_job"] = (on - s0[k][0]) * 1e6 / jobs
        prof[f"{k}_runq_us_per_job"] = (wait - s0[k][1]) * 1e6 / jobs
        busy += on - s0[k][0]
    prof["vcpus_busy"] = busy / wall if wall > 0 else 0.0
    return rate, prof


def _write_latency(a, b, n: int, reps: int) -> dict:
    """Post-to-completion time of an n-byte RDMA WRITE from guest a to guest b."""
    from guest_lib import SGE, SendWR
    from verbs import WrOpcode

    us = []
    for i in range(reps + 3):
        t = time.perf_counter()
        a.qp.post_send(SendWR(i, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, n, a.mr.lkey)],
                              remote_addr=b.mr.buf, rkey=b.mr.rkey))
        a.poll_one(30)
        if i >= 3:
            us.append((time.perf_counter() - t) * 1e6)
    return _stats(us)


def run(*, quick: bool = False) -> dict:
    from guest_lib import Context
    from guest_lib.endpoint import RcEndpoint
    from vrdma import lab

    reps = 30 if quick else 200
    jobs = 200 if quick else 2000
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="vrdma-rbench-") as tmp, \
            lab.LabCluster([lab.HostSpec(), lab.HostSpec()], tmp) as c:
        c.wait_linked()
        a_sock, b_sock = c.hosts[0].sock, c.hosts[1].sock
        a, b = RcEndpoint(a_sock, buf_size=1 << 20), RcEndpoint(b_sock, buf_size=1 << 20)
        try:
            kw = dict(path_mtu=MTU_CODE, timeout=14, retry_cnt=6, rnr_retry=6, min_rnr_timer=1)
            a.connect(b.info(), **kw)
            b.connect(a.info(), **kw)
            with Context(a_sock, mem_size=64 << 20, timeout=60) as ctx:
                for op in ("fft", "turbo_decode"):
                    j = _Jobs(ctx, op)
                    local, lh = j.latency(j.local, reps)
                    remote, rh = j.latency(j.remote, reps)
                    if lh != {0} or rh != {1}:
                        raise RuntimeError(f"{op}: jobs ran on hosts {lh} (local) / {rh} (remote)")
                    w_in = _write_latency(a, b, j.in_bytes, reps)
                    w_out = _write_latency(a, b, j.out_bytes, reps)
                    base = w_in["median_us"] + w_out["median_us"]
                    added = remote["median_us"] - local["median_us"]
                    pids = {"daemon_a": c.hosts[0].proc.pid, "daemon_b": c.hosts[1].proc.pid,
                            "guest": os.getpid()}
                    r_local, p_local = _profiled_rate(j, j.local, jobs, pids)
                    r_remote, p_remote = _profiled_rate(j, j.remote, jobs, pids)
                    res[op] = {
                        "in_bytes": j.in_bytes, "out_bytes": j.out_bytes, "local": local, "remote": remote,
                        "write_in": w_in, "write_out": w_out, "added_us": added, "transfer_baseline_us": base,
                        "latency_ratio": added / base,
                        "latency_goal_met": added <= GOALS["latency_ratio"] * base,
                        "local_jobs_per_s": r_local, "remote_jobs_per_s": r_remote,
                        "throughput_ratio": r_remote / r_local,
                        "local_profile": p_local, "remote_profile": p_remote,
                        "throughput_goal_met": r_remote >= GOALS["throughput_ratio"] * r_local}
        finally:
            a.close()
            b.close()
    return res


def format_report(r: dict) -> str:
    from bench.machine import header

    lines = [header(), ("remote (FORCE_TARGET host 1, over the peer link) against local (this host's "
                        "accelerator), one guest process, two daemons in namespaces on one bridge")]
    for op, x in r.items():
        lines.append(f"\n{op}: input {x['in_bytes']} B, output {x['out_bytes']} B")
        lines.append(f"  latency, one job at a time: local median {x['local']['median_us']:.0f} us "
                     f"(p99 {x['local']['p99_us']:.0f}), remote {x['remote']['median_us']:.0f} us "
                     f"(p99 {x['remote']['p99_us']:.0f}): added {x['added_us']:.0f} us")
        lines.append(f"  baseline: RDMA WRITE of the input {x['write_in']['median_us']:.0f} us + of the "
                     f"output {x['write_out']['median_us']:.0f} us = {x['transfer_baseline_us']:.0f} us "
                     "over the same veth")
        lines.append(f"  added / baseline = {x['latency_ratio']:.2f}  goal <= {GOALS['latency_ratio']}: "
                     f"{'met' if x['latency_goal_met'] else 'NOT met'}")
        lines.append(f"  throughput, {IN_FLIGHT} in flight: local {x['local_jobs_per_s']:.0f} jobs/s, remote "
                     f"{x['remote_jobs_per_s']:.0f} jobs/s: ratio {x['throughput_ratio']:.2f}  goal >= "
                     f"{GOALS['throughput_ratio']}: {'met' if x['throughput_goal_met'] else 'NOT met'}")
        for name in ("local", "remote"):
            pr = x.get(f"{name}_profile")
            if pr:
                lines.append(f"    {name}: CPU per job (waiting for a CPU) daemon A "
                             f"{pr['daemon_a_cpu_us_per_job']:.0f} ({pr['daemon_a_runq_us_per_job']:.0f}) us, "
                             f"daemon B {pr['daemon_b_cpu_us_per_job']:.0f} ({pr['daemon_b_runq_us_per_job']:.0f}) us, "
                             f"guest {pr['guest_cpu_us_per_job']:.0f} ({pr['guest_runq_us_per_job']:.0f}) us; "
                             f"{pr['vcpus_busy']:.2f} vCPUs busy")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about half a minute)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    from vrdma import lab

    why = lab.available()
    if why:
        print(f"accel_remote_bench: cannot run here: {why}", file=sys.stderr)
        return 2
    r = run(quick=args.quick)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
