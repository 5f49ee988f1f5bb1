"""Tenant classes, weights and aging on one shared accelerator (issue #18).

One accelerator (one unit, FFT, ``--slowdown`` x this host's kernel time so a
job takes ~1 ms), the AcceleratorService's real workers and fair queue with
the tenant classifier the daemon installs (``set_classifier``). Submitters
are threads of this process keeping a tenant's jobs queued (saturating) or
one job at a time (closed loop). Measured, in this order, interleaved over
``--rounds`` rounds:

1. *idle*: tenant H (class high) alone, one job at a time: its p99 queue wait;
2. *high vs low*: H closed loop while L (class low) keeps 16 jobs queued: H's
   p99 wait, against the goal (idle p99 + one service time) x 2;
3. *weights 3:1*: A (weight 3) and B (weight 1), one class, both saturating:
   their accelerator-seconds ratio (goal within 10% of 3);
4. *aging*: L's jobs completed while H saturates, with aging (0.05 s) and
   without: L progresses only with aging.

``--daemon``: the same through a real ``vrdma backend`` and guest processes
(bench/tenant_priority_daemon.py, which shares :func:`verdicts` and :func:`report`).

Prints the machine (bench/machine.py); the machine may be shared, so every
figure is compared with the baseline measured in the same round.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from accel_core import Job
from accel_core.jobs import Op
from accel_core.service import AcceleratorService, AcceleratorSpec
from bench.machine import header

N = 1024
HIGH, NORMAL, LOW = 2, 1, 0


def _x():
    return np.ones((1, N), np.complex64)


class Tenant:
    def __init__(self, svc, gid, depth):
        self.svc, self.gid, self.depth = svc, gid, depth
        self.waits: list[float] = []
        self.busy = 0.0
        self.done = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _submit(self):
        j = Job.create(Op.FFT, _x(), guest_id=self.gid)
        self.svc.submit_job(j)
        return j

    def _run(self):
        inflight = [self._submit() for _ in range(self.depth)]
        while not self.stop.is_set():
            j = inflight.pop(0)
            j.wait(30)
            if j.t_started is not None and j.t_submitted is not None:
                self.waits.append(j.t_started - j.t_submitted)
            self.busy += j.accel_seconds or 0.0
            self.done += 1
            inflight.append(self._submit())
        for j in inflight:
            j.wait(30)

    def start(self):
        self.thread.start()
        return self

    def finish(self):
        self.stop.set()
        self.thread.join()


def p99(xs):
    return float(np.percentile(xs, 99)) if xs else float("nan")


def run_round(slowdown: float, seconds: float):
    classes = {1: (HIGH, 1.0), 2: (LOW, 1.0), 3: (NORMAL, 3.0), 4: (NORMAL, 1.0)}
    out = {}
    with AcceleratorService([AcceleratorSpec("fft", frozenset({Op.FFT, Op.IFFT}), 1, slowdown)]) as svc:
        svc.set_classifier(lambda g: classes.get(g, (NORMAL, 1.0)), aging_seconds=0.0)
        # service time of one job
        svc.submit(Op.FFT, _x()).wait(30)
        js = [svc.submit(Op.FFT, _x()) for _ in range(20)]
        for j in js:
            j.wait(30)
        service = float(np.median([j.accel_seconds for j in js]))
        out["service_ms"] = service * 1e3
        # 1. idle
        h = Tenant(svc, 1, 1).start()
        time.sleep(seconds)
        h.finish()
        out["idle_p99_ms"] = p99(h.waits) * 1e3
        # 2. high vs low
        low = Tenant(svc, 2, 16).start()
        time.sleep(0.1)
        h = Tenant(svc, 1, 1).start()
        time.sleep(seconds)
        h.finish()
        low.finish()
        out["loaded_p99_ms"] = p99(h.waits) * 1e3
        out["loaded_p50_ms"] = float(np.median(h.waits)) * 1e3 if h.waits else float("nan")
        out["goal_ms"] = 2 * (out["idle_p99_ms"] + out["service_ms"])
        # 3. weights 3:1
        a, b = Tenant(svc, 3, 16), Tenant(svc, 4, 16)
        a.start()
        b.start()
        time.sleep(seconds)
        a0, b0 = a.busy, b.busy
        time.sleep(seconds)
        ratio = (a.busy - a0) / max(1e-12, b.busy - b0)
        a.finish()
        b.finish()
        out["weight_ratio"] = ratio
        # 4. aging off / on
        for aging in (0.0, 0.05):
            svc.set_classifier(lambda g: classes.get(g, (NORMAL, 1.0)), aging_seconds=aging)
            hi, lo = Tenant(svc, 1, 16), Tenant(svc, 2, 4)
            hi.start()
            time.sleep(0.05)
            lo.start()
            time.sleep(seconds)
            n_lo, n_hi = lo.done, hi.done
            hi.finish()
            lo.finish()
            out[f"low_jobs_aging_{aging:g}"] = n_lo
            out[f"high_jobs_aging_{aging:g}"] = n_hi
    return out


def verdicts(o: dict) -> dict[str, bool]:
    """Each goal of a round's figures ``o`` (shared by the daemon mode,
    bench/tenant_priority_daemon.py): high's p99 wait within (idle p99 + one
    service time) x 2, weights 3:1 within 10%, low progressing only with aging."""
    return {"priority": o["loaded_p99_ms"] <= o["goal_ms"],
            "weights": abs(o["weight_ratio"] / 3 - 1) <= 0.1,
            "aging": o["low_jobs_aging_0.05"] > 0}


def report(r: int, o: dict) -> str:
    """One round's line: figures and verdicts."""
    v = verdicts(o)
    return (f"round {r}: service {o['service_ms']:.3f} ms | high p99 wait idle {o['idle_p99_ms']:.3f} ms, "
            f"vs saturating low {o['loaded_p99_ms']:.3f} ms (p50 {o['loaded_p50_ms']:.3f}; "
            f"goal <= {o['goal_ms']:.3f}: "
            f"{'ok' if v['priority'] else 'MISSED'}) | weights 3:1 -> "
            f"{o['weight_ratio']:.3f} ({'ok' if v['weights'] else 'MISSED'}) | "
            f"low jobs under saturating high: aging off {o['low_jobs_aging_0']} "
            f"(high {o['high_jobs_aging_0']}), aging 0.05 s {o['low_jobs_aging_0.05']} "
            f"(high {o['high_jobs_aging_0.05']}; {'ok' if v['aging'] else 'MISSED'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--slowdown", type=float, default=100.0)
    p.add_argument("--daemon", action="store_true",
                   help="through a real vrdma backend and guest processes (bench/tenant_priority_daemon.py)")
    args = p.parse_args(argv)
    if args.daemon:
        from bench import tenant_priority_daemon

        return tenant_priority_daemon.main(["--rounds", str(args.rounds), "--seconds", str(args.seconds),
                                            "--slowdown", str(args.slowdown)])
    print(header())
    import os

    print(f"# load average at start: {os.getloadavg()[0]:.2f} (the machine is shared)")
    for r in range(args.rounds):
        print(report(r, run_round(args.slowdown, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
