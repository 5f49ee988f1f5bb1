"""A real cluster under a Poisson job load, set against the simulator (issue 15).

Four hosts in network namespaces on one bridge (:class:`vrdma.lab.LabCluster`),
each a real ``vrdma backend`` with the others as ``--peer`` s: by default
``host0`` without accelerators, ``host1`` and ``host3`` normal, ``host2``
twice as slow. Every accelerator host runs with a base ``--accel-slowdown``
(the slow one twice it), so a job's service is the emulated accelerator's
delay (a sleep in the worker, accel_core/service.py), tens of ms, and the
kernels' CPU is a small part of it: 4 daemons and 4 guests fit on 2 vCPUs.

Jobs: FFT (n = 2048 complex64, 12 transforms a unit) and Turbo decode
(K = 6144, one iteration, a block a unit), a job's units drawn from a
geometric distribution (mean 4 and 3, truncated at ``BATCH_CAP`` x it), so
service times are roughly exponential, the simulator's model.

Run:

1. **Calibration**: from the first host without accelerators, jobs forced
   (FORCE_TARGET) to each accelerator host, one at a time per host and kind
   (all hosts and kinds at once): a warm-up of sizes the load never uses,
   then passes over every job size; the last pass's CQE service times,
   weighted by the sizes' probabilities, give each host's mean service per
   kind, hence the cluster's capacity and the arrival rates;
   (response - wait - service) / 2 of these remote jobs is the one-way
   transfer time. An emulated accelerator's delay follows a per-size
   reference time: the least of the size's first 4 kernel times, then a low
   quantile (accel_core.estimate.ReferenceTimes); service times still
   settle somewhat during the run: the report gives both, and the load they
   really offered.
2. **Load**: one guest process per host (the root namespace, on that host's
   unix socket; ``python -m bench.cluster_run --guest``, its spec on stdin)
   submits Poisson streams of both kinds at ``--load`` x capacity / hosts
   each, for ``--duration`` s, over ``--queues`` AQs per kind (each job to the
   one with fewest in flight: completions of one AQ come in post order), then
   waits up to ``--grace`` s for the rest. Every output is checked: FFT
   byte-exact against accel_core's kernel on the same input (itself checked
   against numpy.fft once), Turbo: noiseless LLRs of known bits decode to
   those bits. Counted per guest: submitted, completed, correct, wrong,
   error statuses, lost (never completed), duplicated (a wr_id completed
   twice), where each ran (the CQE's host id, :meth:`LabCluster.ran_on`).
3. **Simulator**: :func:`bench.sched_sim.simulate` per kind with the run's
   service times (CQE means per host, and again with the calibration's),
   transfer and load period in units of the kind's fastest mean service, the
   daemon's policy, the run's length in jobs; measured mean / predicted mean
   (goal within 1.5x). Today's placement (here if the host has the kind,
   else the first peer) makes each accelerator an M/M/1 queue of its own
   (each guest's Poisson stream goes to one host): simulated one by one.
4. **Kill** (``--kill HOST --kill-at S``): SIGKILL a daemon mid-run; the
   killed host's own guest loses its device and is left out; for the others:
   lost and duplicated jobs, status counts, how long after the kill jobs
   still went to the dead host, and p99 response in the failover window
   (``--failover-window`` s from the kill) against before the kill.

Daemon options the scheduler adds (``--policy``, ``--load-backend``,
``--redis-url``, ``--load-period``, ``--cluster-key``) are passed through to
every backend only when given; ``--load-backend redis`` starts a
redis-server in the hub namespace on the bridge's address
(``LabCluster(hub_ip=...)``) and passes ``--redis-url``. The daemon's policy
for the prediction is ``--policy``, else the daemon's default if it has a
``--policy`` option, else today's placement (3).

``python -m bench.cluster_run [--duration 30] [--load 0.8] [--json] ...``;
needs root (namespaces).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

KINDS = ("fft", "turbo")
FFT_N = 2048
TURBO_K = 6144
_TAIL = 4  # Turbo tail bits per stream (accel_core.turbo.TAIL_BITS)
#: distinct inputs per kind, rotated over jobs (a result landing in the wrong buffer shows)
VARIANTS = 4
#: a job's units are resampled above this many times their mean
BATCH_CAP = 4
#: the simulator's warm-up: the first 10% of jobs (by submission) are not measured
WARMUP = 0.1
#: sims per kind for the prediction (different seeds)
SIM_SEEDS = 5
#: the lab's subnet (RFC 5737); a redis-server of the run's own listens on .254 (the hub)
LAB_SUBNET = "192.0.2"
REDIS_PORT = 6379
#: calibration jobs per host and kind that warm a daemon up before any measured size runs
WARM_JOBS = 4
GOAL_RATIO = 1.5
_CANARY = 0xAB
_SUCCESS = 0  # AccelStatus.SUCCESS
#: times one calibration job is posted again after REMOTE_FAILED (a link that reset on a
#: loaded machine) before the calibration fails
CALIBRATION_RETRIES = 3


# --------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class Workload:
    """Job sizes in units: an FFT unit is ``fft_group`` transforms of FFT_N points, a Turbo
    unit one decode of TURBO_K bits; a job's units are geometric (the kind's mean),
    resampled above ``BATCH_CAP`` x the mean. Few distinct sizes: the calibration runs each
    on each host (an emulated accelerator's delay multiplies a per-size reference time set
    by its first samples, accel_core.estimate.ReferenceTimes)."""

    fft_units_mean: float = 4.0
    fft_group: int = 12
    turbo_units_mean: float = 3.0
    turbo_iterations: int = 1

    def mean(self, kind: str) -> float:
        return self.fft_units_mean if kind == "fft" else self.turbo_units_mean

    def cap(self, kind: str) -> int:
        return max(1, int(BATCH_CAP * self.mean(kind)))

    def pmf(self, kind: str) -> np.ndarray:
        """P(units = u) for u = 1..cap (geometric of the kind's mean, truncated)."""
        p = 1.0 / self.mean(kind)
        u = np.arange(1, self.cap(kind) + 1)
        w = p * (1 - p) ** (u - 1)
        return w / w.sum()

    def draw(self, kind: str, rng: np.random.Generator) -> int:
        p, cap = 1.0 / self.mean(kind), self.cap(kind)
        while True:
            u = int(rng.geometric(p))
            if u <= cap:
                return u

    def batch(self, kind: str, u: int) -> int:
        """The job's batch field: transforms (FFT) or code blocks (Turbo)."""
        return u * self.fft_group if kind == "fft" else u

    def in_bytes(self, kind: str, u: int) -> int:
        b = self.batch(kind, u)
        return b * FFT_N * 8 if kind == "fft" else b * 3 * (TURBO_K + _TAIL) * 4

    def out_bytes(self, kind: str, u: int) -> int:
        b = self.batch(kind, u)
        return b * FFT_N * 8 if kind == "fft" else b * TURBO_K + b


class _Arena:
    """Byte ranges of one output MR: the lowest free range that fits (first fit), so the
    memory in use stays the fewest pages: a daemon's first touch of a guest page is a page
    fault, which a kernel's time would include (and an emulated slow accelerator multiply)."""

    def __init__(self, size: int):
        self.size = size
        self.free_ranges: list[list[int]] = [[0, size]]  # [off, n], by offset, coalesced
        self.used: dict[int, int] = {}

    def alloc(self, n: int) -> int | None:
        for i, (off, m) in enumerate(self.free_ranges):
            if m >= n:
                if m == n:
                    del self.free_ranges[i]
                else:
                    self.free_ranges[i] = [off + n, m - n]
                self.used[off] = n
                return off
        return None

    def free(self, off: int) -> None:
        n = self.used.pop(off)
        fr = self.free_ranges
        i = 0
        while i < len(fr) and fr[i][0] < off:
            i += 1
        fr.insert(i, [off, n])
        if i + 1 < len(fr) and off + n == fr[i + 1][0]:  # joins the next
            fr[i][1] += fr.pop(i + 1)[1]
        if i > 0 and fr[i - 1][0] + fr[i - 1][1] == off:  # joins the previous
            fr[i - 1][1] += fr.pop(i)[1]


class JobSet:
    """A guest's jobs on one Context: the inputs, the expected outputs, its AQs with an
    output ring each. Used by the load guests and by the calibration."""

    def __init__(self, ctx, wl: Workload, cq_depth: int, seed: int = 7):
        import accel_core
        from guest_lib import CQ, MR, PD
        from verbs import Access

        self.ctx, self.wl = ctx, wl
        self.pd = PD(ctx)
        self.cq = CQ(ctx, cq_depth)
        rng = np.random.default_rng(seed)
        self.inp: dict[str, object] = {}
        self.stride: dict[str, int] = {}
        self.expect: dict[str, list[np.ndarray]] = {}
        self._mrs = []
        for kind in KINDS:
            cap = wl.batch(kind, wl.cap(kind))
            stride = wl.in_bytes(kind, wl.cap(kind))
            mr = MR(self.pd, stride * VARIANTS, Access.LOCAL_WRITE)
            self._mrs.append(mr)
            exp = []
            for v in range(VARIANTS):
                if kind == "fft":
                    x = (rng.standard_normal((cap, FFT_N)) + 1j * rng.standard_normal((cap, FFT_N))
                         ).astype(np.complex64)
                    ref = accel_core.fft(x)
                    want = np.fft.fft(x.astype(np.complex128), axis=-1)
                    if not np.allclose(ref, want, rtol=1e-4, atol=1e-3 * math.sqrt(FFT_N)):
                        raise RuntimeError("accel_core.fft disagrees with numpy.fft: the reference is wrong")
                    mr.write(x.tobytes(), x.nbytes, v * stride)
                    exp.append(np.frombuffer(ref.tobytes(), np.uint8))
                else:
                    bits = rng.integers(0, 2, (cap, TURBO_K), dtype=np.uint8)
                    enc = accel_core.turbo_encode(bits).astype(np.float32)
                    llr = np.ascontiguousarray((1 - 2 * enc) * 4, dtype=np.float32)
                    mr.write(llr.tobytes(), llr.nbytes, v * stride)
                    exp.append(bits.reshape(-1))
            self.inp[kind], self.stride[kind], self.expect[kind] = mr, stride, exp
        self.queues: dict[int, _Queue] = {}

    def queue(self, kind: str, depth: int, ring_bytes: int, flags: int = 0, target: int = 0) -> _Queue:
        from guest_lib import MR
        from guest_lib.aq import AQ
        from verbs import Access
        from virtio_rdma.constants import AccelOp

        op = AccelOp.FFT if kind == "fft" else AccelOp.TURBO_DECODE
        aq = AQ(self.pd, self.cq, op, depth, flags=flags, target_host=target)
        out = MR(self.pd, ring_bytes, Access.LOCAL_WRITE)
        q = _Queue(kind, aq, out, _Arena(ring_bytes))
        self.queues[aq.aqn] = q
        return q

    def post(self, q: _Queue, wr_id: int, u: int, v: int, warm: bool = False) -> bool:
        """Post one job of ``u`` units on input variant ``v``; False if the queue or its
        ring has no room (nothing posted). ``warm``: a job of a size the load never uses
        (FFT: one transform fewer; Turbo: one iteration more), whose output is not checked."""
        from guest_lib import SGE
        from guest_lib.aq import AccelWR

        kind, wl = q.kind, self.wl
        nout = wl.out_bytes(kind, u)
        b = wl.batch(kind, u)
        if not q.aq.free_slots:
            return False
        off = q.ring.alloc(nout)
        if off is None:
            return False
        q.out_np[off : off + nout] = _CANARY
        inp = self.inp[kind]
        nin = wl.in_bytes(kind, u)
        if warm and kind == "fft":
            b = b - 1 if b > 1 else 2  # never a multiple of fft_group > 2
            nin = nout = b * FFT_N * 8
        src = SGE(inp.buf + v * self.stride[kind], nin, inp.lkey)
        dst = SGE(q.out.buf + off, nout, q.out.lkey)
        if kind == "fft":
            wr = AccelWR(wr_id=wr_id, size=FFT_N, batch=b, inputs=[src], outputs=[dst])
        else:
            wr = AccelWR(wr_id=wr_id, size=TURBO_K, batch=b, iterations=wl.turbo_iterations + warm,
                         inputs=[src], outputs=[dst])
        if q.aq.post(wr) != 1:
            q.ring.free(off)
            return False
        q.jobs[wr_id] = (off, u, -1 if warm else v)
        return True

    def complete(self, wc) -> tuple[_Queue, int, bool] | None:
        """Take one completion: (its queue, units, output correct); None if no job of ours
        has this wr_id on that queue (a duplicate or an unknown completion). The output is
        checked only on SUCCESS (else False)."""
        q = self.queues.get(wc.qp_num)
        if q is None or wc.wr_id not in q.jobs:
            return None
        off, u, v = q.jobs.pop(wc.wr_id)
        ok = False
        if int(wc.accel_status) == _SUCCESS:
            ok = v < 0 or self.check(q, off, u, v)
        q.ring.free(off)
        return q, u, ok

    def check(self, q: _Queue, off: int, u: int, v: int) -> bool:
        got = q.out_np
        if q.kind == "fft":
            n = self.wl.out_bytes("fft", u)
            return bool(np.array_equal(got[off : off + n], self.expect["fft"][v][:n]))
        b = u
        nb = b * TURBO_K
        used = got[off + nb : off + nb + b]
        return bool(np.array_equal(got[off : off + nb], self.expect["turbo"][v][:nb])
                    and np.all((used >= 1) & (used <= self.wl.turbo_iterations)))


@dataclass
class _Queue:
    kind: str
    aq: object
    out: object
    ring: _Arena
    jobs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_np = np.frombuffer(self.out.view, np.uint8)


# --------------------------------------------------------------------------- guest process

#: record fields of one job (JSON rows of a guest's report)
REC = ("kind", "units", "t_arr", "t_post", "t_done", "host", "status", "wait_us", "service_us", "ok",
       "n_done")


def _arrivals(rates: dict, t0: float, duration: float, wl: Workload, seed: int) -> list[tuple]:
    """(time, kind, units, variant) of one guest's Poisson streams, in time order."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in KINDS:
        lam = rates[kind]
        t = t0
        i = 0
        while lam > 0:
            t += rng.exponential(1.0 / lam)
            if t >= t0 + duration:
                break
            out.append((t, kind, wl.draw(kind, rng), i % VARIANTS))
            i += 1
    out.sort()
    return out


def guest(spec: dict) -> dict:
    """One guest's run (module doc, 2): returns its records and counters."""
    from guest_lib import Context
    from guest_lib.errors import RDMAError

    wl = Workload(**spec["workload"])
    nq, depth = spec["queues"], spec["depth"]
    with Context(spec["sock"], mem_size=spec["mem_mb"] << 20, timeout=30) as ctx:
        js = JobSet(ctx, wl, cq_depth=4 * nq * depth, seed=spec["seed"])
        qs = {k: [js.queue(k, depth, spec["ring_mb"][k] << 20, flags=spec.get("flags", 0)) for _ in range(nq)]
              for k in KINDS}
        print("ready", flush=True)
        t0 = float(sys.stdin.readline())
        arr = _arrivals(spec["rates"], t0, spec["duration"], wl, spec["seed"] + 1)
        end, give_up = t0 + spec["duration"], t0 + spec["duration"] + spec["grace"]
        recs: list[list] = []
        backlog: dict[str, deque[int]] = {k: deque() for k in KINDS}
        held: set[int] = set()  # jobs that found no free slot or ring room at first
        max_backlog = duplicates = unknown = 0
        lost_device: float | None = None
        nxt = 0
        outstanding = 0
        by_wr: dict[int, list] = {}
        try:
            while True:
                now = time.monotonic()
                while nxt < len(arr) and arr[nxt][0] <= now:
                    t, kind, b, _v = arr[nxt]
                    recs.append([kind, b, t, math.nan, math.nan, -1, -1, 0, 0, 0, 0])
                    backlog[kind].append(nxt)
                    nxt += 1
                for kind in KINDS:
                    bl = backlog[kind]
                    while bl:
                        wr = bl[0]
                        q = min(qs[kind], key=lambda q: q.aq.in_flight)
                        if not js.post(q, wr, recs[wr][1], arr[wr][3]):
                            held.add(wr)
                            max_backlog = max(max_backlog, len(bl))
                            break
                        bl.popleft()
                        recs[wr][3] = time.monotonic()
                        by_wr[wr] = recs[wr]
                        outstanding += 1
                _, wcs = js.cq.poll(64)
                tdone = time.monotonic()
                for wc in wcs:
                    r = by_wr.get(wc.wr_id)
                    got = js.complete(wc)
                    if r is None:
                        unknown += 1
                        continue
                    r[10] += 1
                    if got is None:  # a second completion of a wr_id
                        duplicates += 1
                        continue
                    outstanding -= 1
                    r[4], r[5], r[6] = tdone, int(wc.host), int(wc.accel_status)
                    r[7], r[8], r[9] = int(wc.wait_us), int(wc.service_us), int(got[2])
                if nxt >= len(arr) and now >= end and not outstanding and not any(backlog.values()):
                    break
                if now >= give_up:
                    break
                if not wcs:
                    wake = arr[nxt][0] - now if nxt < len(arr) else 1e-3
                    time.sleep(min(1e-3, max(0.0, wake)))
        except RDMAError:
            lost_device = time.monotonic()
    return {"host": spec["host"], "records": recs, "held": len(held), "max_backlog": max_backlog,
            "duplicates": duplicates,
            "unknown": unknown, "device_lost_at": lost_device,
            "queue_full": sum(q.aq.queue_full for k in KINDS for q in qs[k]) if lost_device is None else None}


def _guest_main() -> int:
    spec = json.loads(sys.stdin.readline())
    res = guest(spec)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------- calibration

def calibrate(c, wl: Workload, passes: int, src: int, warm: int = WARM_JOBS) -> dict:
    """Mean service per (accelerator host, kind) and one-way transfer per kind, from jobs
    forced from host ``src``'s guest to each accelerator host, one at a time per host and
    kind (all in parallel): ``warm`` jobs of a size the load never uses, then ``passes``
    passes over every job size 1..cap, the last one measured. A mean service is the
    sizes' service times weighted by their probabilities.

    The warm-up matters: an emulated accelerator's delay is (slowdown - 1) x a per-size
    reference kernel time (the least of its first 4 samples, then a low quantile:
    accel_core.estimate.ReferenceTimes); a daemon's first kernel calls run up to 3x
    slower than later ones (a cold process). Warm-up jobs are of other sizes: their
    references do not matter."""
    from guest_lib import Context
    from virtio_rdma.constants import AccelStatus, AqFlags

    remote_failed = int(AccelStatus.REMOTE_FAILED)  # the peer link gave the job back
    targets = [h.index for h in c.hosts if h.spec.ops()]
    # a negative size: a warm-up job of that many units
    plan = {k: [-wl.cap(k)] * warm + list(range(1, wl.cap(k) + 1)) * passes for k in KINDS}
    out: dict = {"service": {}, "transfer": {}, "passes": passes, "by_size_ms": {}, "retries": 0}
    with Context(c.hosts[src].sock, mem_size=256 << 20, timeout=60) as ctx:
        js = JobSet(ctx, wl, cq_depth=64, seed=99)
        qs = {}
        for j in targets:
            for k in KINDS:
                ring = 2 * wl.out_bytes(k, wl.cap(k))
                qs[(j, k)] = js.queue(k, 2, ring, flags=int(AqFlags.FORCE_TARGET), target=c.host_id(src, j))
        state = dict.fromkeys(qs, 0)  # next index into the plan
        retries = dict.fromkeys(qs, 0)
        t_post: dict[int, float] = {}
        last: dict = {key: {} for key in qs}  # size -> (service, wait, response) us, of the last pass
        wr = 0
        key_of: dict[int, tuple] = {}

        def post(key) -> None:
            nonlocal wr
            wr += 1
            i = state[key]
            u = plan[key[1]][i]
            js.post(qs[key], wr, abs(u), i % VARIANTS, warm=u < 0)
            key_of[wr], t_post[wr] = key, time.monotonic()

        for key in qs:
            post(key)
        left = len(qs)
        deadline = time.monotonic() + 300
        while left:
            _, wcs = js.cq.poll(16)
            now = time.monotonic()
            if not wcs:
                if now > deadline:
                    raise TimeoutError("calibration jobs did not complete")
                time.sleep(2e-4)
            for wc in wcs:
                key = key_of.pop(wc.wr_id)
                got = js.complete(wc)
                if int(wc.accel_status) == remote_failed and retries[key] < CALIBRATION_RETRIES:
                    retries[key] += 1  # the same job again: its link reset (counted, reported)
                    out["retries"] += 1
                    t_post.pop(wc.wr_id, None)
                    post(key)
                    continue
                if got is None or int(wc.accel_status) != _SUCCESS or not got[2]:
                    raise RuntimeError(f"calibration job on host {key[0]} ({key[1]}) failed: {wc}")
                if c.ran_on(src, wc.host).index != key[0]:
                    raise RuntimeError(f"a calibration job forced to host {key[0]} ran on host "
                                       f"{c.ran_on(src, wc.host).index}")
                t = t_post.pop(wc.wr_id)
                if plan[key[1]][state[key]] > 0:
                    last[key][got[1]] = (wc.service_us, wc.wait_us, (now - t) * 1e6)
                state[key] += 1
                if state[key] < len(plan[key[1]]):
                    post(key)
                else:
                    left -= 1
    for (j, k), by in last.items():
        pmf = wl.pmf(k)
        out["service"].setdefault(k, {})[j] = sum(pmf[u - 1] * by[u][0] for u in by) / 1e6
        out["by_size_ms"].setdefault(k, {})[j] = [round(by[u][0] / 1e3, 2) for u in sorted(by)]
    for k in KINDS:
        one_way = [(x[2] - x[1] - x[0]) / 2 for (j, kk), by in last.items() if kk == k and j != src
                   for x in by.values()]
        out["transfer"][k] = float(np.median(one_way)) / 1e6 if one_way else 0.0
    return out


# --------------------------------------------------------------------------- analysis

def _stats(a) -> dict:
    a = np.asarray(a, dtype=float)
    if not len(a):
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p99": math.nan}
    return {"n": len(a), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99))}


def summarize(c, guests: list[dict], unit: dict, t_kill: float | None, killed: int | None,
              window: float, t0: float) -> dict:
    """Counts and response times of every guest (the killed host's own guest apart)."""
    from virtio_rdma.constants import AccelStatus

    names = {int(s): s.name for s in AccelStatus}
    out: dict = {"per_guest": {}, "counts": {}, "status": {}, "ran_on": {}, "response": {}}
    rows = []  # (guest index, record) of the counted guests
    for g in guests:
        i = g["host"]
        recs = g["records"]
        done = [r for r in recs if r[10] >= 1]
        pg = {"submitted": len(recs), "completed": len(done),
              "correct": sum(1 for r in done if r[6] == _SUCCESS and r[9]),
              "wrong": sum(1 for r in done if r[6] == _SUCCESS and not r[9]),
              "errors": sum(1 for r in done if r[6] != _SUCCESS),
              "lost": len(recs) - len(done), "duplicated": g["duplicates"], "unknown": g["unknown"],
              "held": g["held"], "max_backlog": g["max_backlog"],
              "device_lost": g["device_lost_at"] is not None}
        out["per_guest"][f"host{i}"] = pg
        if killed is not None and i == killed:
            continue
        rows += [(i, r) for r in recs]
    cnt = dict.fromkeys(("submitted", "completed", "correct", "wrong", "errors", "lost", "duplicated"), 0)
    for name, pg in out["per_guest"].items():
        if killed is not None and name == f"host{killed}":
            continue
        for k in cnt:
            cnt[k] += pg[k]
    out["counts"] = cnt
    ran: dict[str, int] = {}
    for i, r in rows:
        if r[10] >= 1:
            st = names.get(r[6], str(r[6]))
            out["status"][st] = out["status"].get(st, 0) + 1
            if r[6] == _SUCCESS:
                h = c.ran_on(i, r[5]).name
                ran[h] = ran.get(h, 0) + 1
    out["ran_on"] = dict(sorted(ran.items()))
    none_hosts = {h.name for h in c.hosts if not h.spec.ops()}
    out["on_host_without_accelerators"] = sum(v for h, v in ran.items() if h in none_hosts)
    # response times: SUCCESS completions, the first WARMUP of each kind's jobs (by arrival) left out
    for kind in (*KINDS, "all"):
        sel = sorted((r for _, r in rows if kind in ("all", r[0])), key=lambda r: r[2])
        sel = sel[int(len(sel) * WARMUP):]
        resp = [r[4] - r[2] for r in sel if r[10] >= 1 and r[6] == _SUCCESS]
        st = _stats(resp)
        if kind != "all":
            st["in_mean_service"] = {k: (v / unit[kind] if k != "n" else v) for k, v in st.items()}
            st["wait_ms_mean"] = float(np.mean([r[7] for r in sel if r[10] >= 1 and r[6] == _SUCCESS]
                                               or [math.nan])) / 1e3
        out["response"][kind] = st
    if t_kill is not None:
        dead = c.hosts[killed].name
        # jobs posted after the kill that went to the dead host or failed there (a remote job
        # given back completes REMOTE_FAILED with host id 0): the last one ends the failover
        failed = [(r[3] - t_kill) for i, r in rows
                  if r[10] >= 1 and not math.isnan(r[3]) and r[3] >= t_kill
                  and (r[6] != _SUCCESS or c.ran_on(i, r[5]).name == dead)]
        before = [r[4] - r[2] for _, r in rows if r[10] >= 1 and t0 + WARMUP * (t_kill - t0) <= r[2] < t_kill]
        during = [r[4] - r[2] for _, r in rows if r[10] >= 1 and t_kill <= r[2] < t_kill + window]
        out["kill"] = {"host": dead, "at": t_kill - t0, "window_s": window,
                       "rerouted_after_s": max(failed) if failed else 0.0,
                       "jobs_posted_after_kill_failed_or_on_dead": len(failed),
                       "before": _stats(before), "failover": _stats(during)}
    return out


def _sim_mean(p, policy: str) -> tuple[float, float, float]:
    """Mean response (units) of ``p`` under ``policy`` over SIM_SEEDS seeds: (mean, min, max)."""
    import dataclasses

    from bench import sched_sim

    means = [sched_sim.simulate(dataclasses.replace(p, seed=1 + s), policy).mean for s in range(SIM_SEEDS)]
    return float(np.mean(means)), float(min(means)), float(max(means))


def run_service(c, guests: list[dict]) -> dict:
    """Mean service (s) per kind and accelerator host over the run's SUCCESS completions
    (the CQE's service time): what the accelerators really gave, next to the calibration's
    (a host that ran none of a kind is missing)."""
    acc: dict = {k: {} for k in KINDS}
    for g in guests:
        i = g["host"]
        for r in g["records"]:
            if r[10] >= 1 and r[6] == _SUCCESS:
                acc[r[0]].setdefault(c.ran_on(i, r[5]).index, []).append(r[8])
    return {k: {j: float(np.mean(v)) / 1e6 for j, v in sorted(by.items())} for k, by in acc.items()}


def predict(c, service: dict, transfer: dict, rates: dict, policy: str, static: bool,
            period: float | None, duration: float) -> dict:
    """bench.sched_sim's prediction per kind for the run's parameters (module doc, 3).

    ``static``: today's placement (here if this host has the kind, else the first peer
    that has it) splits each guest's Poisson stream to one host, so every accelerator is
    an M/M/1 queue of its own: simulated one by one (``hosts=1``, policy ``local``, its
    load, as many jobs as the run gives it), a remote job paying 2 x transfer. Else the
    whole cluster is simulated under ``policy``, the accelerator hosts' speeds measured.
    ``service``: kind -> host -> mean service (s); ``transfer``: kind -> one-way seconds;
    ``rates``: kind -> each guest's Poisson rate (jobs/s)."""
    from bench import sched_sim

    hosts = c.hosts
    accel = [h.index for h in hosts if h.spec.ops()]
    n = len(hosts)
    out = {}
    for kind in KINDS:
        svc = service[kind]
        unit = min(svc.values())
        d = transfer[kind]
        cap = sum(1.0 / svc[j] for j in accel)
        lam = rates[kind]
        load = lam * n / cap
        r: dict = {"unit_s": unit, "transfer": d / unit, "model": "static" if static else policy,
                   "load": load}
        if static:
            to = {h.index: (h.index if h.index in accel else next(c.ran_on(h.index, k + 1).index
                                                                  for k in range(len(h.peers))
                                                                  if c.ran_on(h.index, k + 1).index in accel))
                  for h in hosts}
            per_host = {}
            total = 0.0
            for j in accel:
                src = [i for i in to if to[i] == j]
                rho = lam * len(src) * svc[j]
                p = sched_sim.Params(hosts=1, accel_hosts=1, load=rho, period=1.0, transfer=0.0,
                                     speeds=(1.0,), jobs=max(200, int(lam * len(src) * duration)))
                m, lo, hi = _sim_mean(p, "local")
                per_host[f"host{j}"] = {"load": rho, "mean_s": m * svc[j],
                                        "seeds_s": [lo * svc[j], hi * svc[j]]}
                total += sum(m * svc[j] + (2 * d if i != j else 0.0) for i in src)
            r["per_host"] = per_host
            r["mean_s"] = total / n
        else:
            speeds = tuple(float(unit / svc[j]) for j in accel)
            p = sched_sim.Params(hosts=n, accel_hosts=len(accel), load=load,
                                 period=(period or 1.0) / unit, transfer=d / unit, speeds=speeds,
                                 jobs=max(200, int(lam * n * duration)))
            m, lo, hi = _sim_mean(p, policy)
            r.update(speeds=list(speeds), mean_s=m * unit, seeds_s=[lo * unit, hi * unit])
        out[kind] = r
    return out


# --------------------------------------------------------------------------- the run

@dataclass
class Options:
    duration: float = 30.0
    load: float = 0.8
    slowdown: float = 150.0
    layout: str = "none,1,2,1"  # per host: none, or its slowdown in multiples of --slowdown
    calibrate_passes: int = 2
    grace: float = 30.0
    queues: int = 4
    depth: int = 64
    workload: Workload = field(default_factory=Workload)
    seed: int = 1
    kill: int | None = None
    kill_at: float = 10.0
    failover_window: float | None = None
    policy: str | None = None
    load_backend: str | None = None
    redis_url: str | None = None
    load_period: float | None = None
    cluster_key: str | None = None
    dump: str | None = None
    #: the guests' queues ask for re-dispatch (LOCAL_FALLBACK): a job a failed host gives
    #: back is placed again elsewhere; False: it completes REMOTE_FAILED
    redispatch: bool = True


def _specs(o: Options):
    from vrdma import lab

    extra: list[str] = []
    if o.policy:
        extra += ["--policy", o.policy]
    if o.load_backend:
        extra += ["--load-backend", o.load_backend]
    if o.load_period is not None:
        extra += ["--load-period", f"{o.load_period:g}"]
    if o.cluster_key:
        extra += ["--cluster-key", o.cluster_key]
    specs = []
    for item in o.layout.split(","):
        if item == "none":
            specs.append(lab.HostSpec("none", 1.0, tuple(extra)))
        else:
            specs.append(lab.HostSpec("fft=1,turbo=1", o.slowdown * float(item), tuple(extra)))
    return specs


def daemon_policy(o: Options) -> tuple[str, str]:
    """The policy the daemons run, for the simulator, and where that comes from."""
    if o.policy:
        return o.policy, "--policy"
    cp = subprocess.run([sys.executable, "-m", "vrdma", "backend", "--help"], capture_output=True, text=True,
                        check=False)
    if "--policy" in cp.stdout:
        from scheduler.decide import DEFAULT_POLICY

        return DEFAULT_POLICY, "the daemon's default"
    return "local", "today's placement: here if the host has the kind, else the first peer"


def run(o: Options) -> dict:
    from vrdma import lab

    specs = _specs(o)
    n = len(specs)
    policy, policy_from = daemon_policy(o)
    res: dict = {"params": dict(asdict(o).items()), "policy": policy, "policy_from": policy_from}
    # --load-backend redis without --redis-url: a redis-server of our own, in the hub
    redis = o.load_backend == "redis" and not o.redis_url
    with tempfile.TemporaryDirectory(prefix="vrdma-crun-") as tmp:
        hub_ip = f"{LAB_SUBNET}.254" if redis else None
        url = o.redis_url or (f"redis://{hub_ip}:{REDIS_PORT}/0" if redis else None)
        if url:
            specs = [lab.HostSpec(s.accelerators, s.slowdown, (*s.extra, "--redis-url", url)) for s in specs]
            res["redis_url"] = url
        if o.load_backend and not o.cluster_key:  # load rows are authenticated: a key of the run's
            from roce.auth import write_key_file

            key = os.path.join(tmp, "cluster.key")
            write_key_file(key)
            specs = [lab.HostSpec(s.accelerators, s.slowdown, (*s.extra, "--cluster-key", key))
                     for s in specs]
        # every daemon's counters at exit (the scheduler's decisions and READs, the load table's rows)
        mfile = [os.path.join(tmp, f"host{i}.metrics.json") for i in range(n)]
        specs = [lab.HostSpec(s.accelerators, s.slowdown, (*s.extra, "--metrics-file", mfile[i]))
                 for i, s in enumerate(specs)]

        def start_redis(c) -> None:
            p = c.hub.popen(["redis-server", "--bind", hub_ip, "--port", str(REDIS_PORT), "--save", "",
                             "--appendonly", "no", "--protected-mode", "no", "--dir", tmp])
            p.expect("Ready to accept connections", timeout=20)

        t_setup = time.monotonic()
        with lab.LabCluster(specs, tmp, subnet=LAB_SUBNET, hub_ip=hub_ip,
                            on_network=start_redis if redis else None) as c:
            c.wait_linked()
            res["setup_s"] = time.monotonic() - t_setup
            src = next((h.index for h in c.hosts if not h.spec.ops()), 0)
            cal = calibrate(c, o.workload, o.calibrate_passes, src)
            res["calibration"] = cal
            accel = [h.index for h in c.hosts if h.spec.ops()]
            cap = {k: sum(1.0 / cal["service"][k][j] for j in accel) for k in KINDS}
            rates = {k: o.load * cap[k] / n for k in KINDS}
            res["capacity_jobs_per_s"], res["rate_per_guest"] = cap, rates
            res["guests"] = guests = _run_guests(c, o, rates, res)
        res["daemons"] = _daemon_metrics(mfile)
        static = policy_from.startswith("today")
        # the prediction from the service times the run really had (an emulated accelerator's
        # delay follows its per-size reference, which keeps settling during the run), and
        # from the calibration's (which set the arrival rates)
        svc = {k: {**cal["service"][k], **v} for k, v in run_service(c, guests).items()}
        res["run_service"] = svc
        unit = {k: min(svc[k].values()) for k in KINDS}
        res["summary"] = summarize(c, guests, unit, res.get("t_kill"), o.kill, res["window"], res["t0"])
        res["prediction"] = pr = predict(c, svc, cal["transfer"], rates, policy, static, o.load_period,
                                         o.duration)
        res["prediction_calibrated"] = predict(c, cal["service"], cal["transfer"], rates, policy, static,
                                               o.load_period, o.duration)
        for k in KINDS:
            m = res["summary"]["response"][k]["mean"]
            for x in (pr[k], res["prediction_calibrated"][k]):
                x["measured_mean_s"] = m
                x["ratio"] = m / x["mean_s"]
                x["goal_met"] = bool(1 / GOAL_RATIO <= x["ratio"] <= GOAL_RATIO)
    if o.dump:
        with open(o.dump, "w") as f:
            json.dump({"fields": REC, "t0": res["t0"], "t_kill": res.get("t_kill"),
                       "guests": res["guests"]}, f)
    for g in res["guests"]:
        g["n_records"] = len(g.pop("records"))
    from bench.machine import machine

    res["machine"] = machine()
    return res


def _daemon_metrics(files: list[str]) -> list[dict | None]:
    """Each daemon's scheduler and load-table counters at exit (None: it was killed)."""
    out: list[dict | None] = []
    for path in files:
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError):
            out.append(None)
            continue
        sch = (m.get("peering") or {}).get("scheduler") or {}
        lt = m.get("load_table") or {}
        out.append({"scheduler": {k: sch.get(k) for k in ("policy", "decisions", "local", "remote", "probes",
                                                        "reasons", "deferred", "reads", "reads_failed",
                                                        "reads_late", "reads_bad", "no_candidate",
                                                        "board_reads", "board_writes", "board_fallbacks",
                                                        "announced", "unannounced", "landed")},
                    "load_table": {"announcer": lt.get("announcer"), "listener": lt.get("listener")}})
    return out


def _run_guests(c, o: Options, rates: dict, res: dict) -> list[dict]:
    from virtio_rdma.constants import AqFlags

    wl = o.workload
    ring = {"fft": max(32, 2 * wl.out_bytes("fft", wl.cap("fft")) >> 20),
            "turbo": max(2, 2 * wl.out_bytes("turbo", wl.cap("turbo")) >> 20)}
    mem = (sum(wl.in_bytes(k, wl.cap(k)) * VARIANTS for k in KINDS)
           + o.queues * sum(v << 20 for v in ring.values()))
    procs = []
    try:
        for h in c.hosts:
            spec = {"sock": h.sock, "host": h.index, "workload": asdict(wl), "queues": o.queues,
                    "depth": o.depth, "ring_mb": ring, "mem_mb": (mem >> 20) + 32, "rates": rates,
                    "duration": o.duration, "grace": o.grace, "seed": o.seed * 1000 + h.index * 10,
                    "flags": int(AqFlags.LOCAL_FALLBACK) if o.redispatch else 0}
            p = subprocess.Popen([sys.executable, "-m", "bench.cluster_run", "--guest"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a guest did not start: {line!r}")
        t0 = time.monotonic() + 0.2
        res["t0"] = t0
        for p in procs:
            p.stdin.write(f"{t0!r}\n")
            p.stdin.flush()
        res["window"] = o.failover_window or (3 * o.load_period if o.load_period else 1.0)
        if o.kill is not None:
            time.sleep(max(0.0, t0 + o.kill_at - time.monotonic()))
            res["t_kill"] = time.monotonic()
            c.hosts[o.kill].kill()
        out = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a guest died without a report (exit {p.wait()})")
            out.append(json.loads(line))
            p.wait(30)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- report

def format_report(r: dict) -> str:
    from bench.machine import header

    o = r["params"]
    s = r["summary"]
    cal = r["calibration"]
    lines = [header(r["machine"]),
             (f"cluster: layout {o['layout']} (x slowdown {o['slowdown']:g}), load {o['load']}, "
             f"{o['duration']:g} s, policy {r['policy']} ({r['policy_from']}), setup {r['setup_s']:.1f} s"),
             (f"workload: FFT n={FFT_N} x {o['workload']['fft_group']} x geometric units (mean "
             f"{o['workload']['fft_units_mean']:g}), Turbo decode K={TURBO_K} x geometric blocks (mean "
             f"{o['workload']['turbo_units_mean']:g}), {o['workload']['turbo_iterations']} iteration(s)"),
             (f"calibration ({cal['passes']} passes over every size, forced to each host; "
              f"{cal.get('retries', 0)} jobs posted again after REMOTE_FAILED):")]
    for k in KINDS:
        svc = ", ".join(f"host{j} {v * 1e3:.1f} ms" for j, v in sorted(cal["service"][k].items()))
        lines.append(f"  {k}: mean service {svc}; one-way transfer {cal['transfer'][k] * 1e3:.2f} ms; "
                     f"capacity {r['capacity_jobs_per_s'][k]:.1f} jobs/s; per guest "
                     f"{r['rate_per_guest'][k]:.2f} jobs/s")
    for k in KINDS:
        run = ", ".join(f"host{j} {v * 1e3:.1f} ms" for j, v in r["run_service"][k].items())
        lines.append(f"  {k}: mean service during the run {run}: offered load "
                     f"{r['prediction'][k]['load']:.2f} of the capacity it gave")
    c = s["counts"]
    lines.append("jobs: " + ", ".join(f"{k} {v}" for k, v in c.items())
                 + f"; statuses {s['status']}")
    lines.append(f"ran on: {s['ran_on']}; on the host without accelerators: "
                 f"{s['on_host_without_accelerators']}")
    for name, pg in s["per_guest"].items():
        lines.append(f"  guest of {name}: " + ", ".join(f"{k} {v}" for k, v in pg.items()))
    lines.append(f"{'response':<10}{'n':>7}{'mean ms':>10}{'p50 ms':>9}{'p99 ms':>9}{'mean/svc':>10}"
                 f"{'p99/svc':>9}{'sim ms':>9}{'meas/sim':>9}")
    pr = r["prediction"]
    for k in (*KINDS, "all"):
        st = s["response"][k]
        row = f"{k:<10}{st['n']:>7}{st['mean'] * 1e3:>10.1f}{st['p50'] * 1e3:>9.1f}{st['p99'] * 1e3:>9.1f}"
        if k in pr:
            u = st["in_mean_service"]
            row += f"{u['mean']:>10.2f}{u['p99']:>9.2f}{pr[k]['mean_s'] * 1e3:>9.1f}{pr[k]['ratio']:>9.2f}"
        lines.append(row)
    for k in KINDS:
        p = pr[k]
        if p["model"] == "static":
            how = "; ".join(f"{h} load {x['load']:.2f} mean {x['mean_s'] * 1e3:.0f} ms"
                            for h, x in p["per_host"].items())
            how = f"one M/M/1 per accelerator ({how})"
        else:
            how = (f"policy {p['model']}, speeds {[round(x, 2) for x in p['speeds']]}, seeds "
                   f"{p['seeds_s'][0] * 1e3:.0f}..{p['seeds_s'][1] * 1e3:.0f} ms")
        pc = r["prediction_calibrated"][k]
        if "kill" in s:
            how = "(a run with a kill: not the model's) " + how
        lines.append(f"  sim {k}: {how}, transfer {p['transfer']:.3f} units; measured/predicted "
                     f"{p['ratio']:.2f}: goal <= {GOAL_RATIO}: {'met' if p['goal_met'] else 'NOT met'} "
                     f"(from the calibrated service times instead: {pc['mean_s'] * 1e3:.0f} ms, ratio "
                     f"{pc['ratio']:.2f})")
    if "kill" in s:
        k = s["kill"]
        lines.append(f"kill: {k['host']} at {k['at']:.2f} s; survivors' guests: lost {c['lost']}, "
                     f"duplicated {c['duplicated']}, statuses {s['status']}; jobs posted after the kill "
                     f"that went to it or failed: {k['jobs_posted_after_kill_failed_or_on_dead']}, "
                     f"the last posted {k['rerouted_after_s'] * 1e3:.0f} ms after the kill")
        lines.append(f"  p99 response before the kill {k['before']['p99'] * 1e3:.1f} ms "
                     f"(n {k['before']['n']}), "
                     f"in the {k['window_s']:g} s after it {k['failover']['p99'] * 1e3:.1f} ms "
                     f"(n {k['failover']['n']})")
    for i, d in enumerate(r.get("daemons") or []):
        if d is None:
            lines.append(f"host{i}: no counters (killed)")
            continue
        sc, ls = d["scheduler"], (d["load_table"] or {}).get("listener") or {}
        per = (f"{sc['reads'] / sc['decisions']:.2f} READs/decision (board {sc.get('board_reads')}, "
               f"announced {sc.get('announced')})" if sc.get("decisions") else "no decisions")
        lines.append(f"host{i}: {sc.get('policy')}: {sc.get('decisions')} decisions ({sc.get('local')} here, "
                     f"{sc.get('remote')} remote), {per}, failed {sc.get('reads_failed')}, late "
                     f"{sc.get('reads_late')}; load rows taken {ls.get('accepted', 0)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--guest"]:
        return _guest_main()
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench.cluster_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    p.add_argument("--load", type=float, default=d.load, help="fraction of the cluster's capacity")
    p.add_argument("--accel-slowdown", type=float, default=d.slowdown, dest="slowdown",
                   help="base --accel-slowdown of the accelerator hosts")
    p.add_argument("--layout", default=d.layout,
                   help="per host: none, or its slowdown in multiples of --accel-slowdown")
    p.add_argument("--calibrate-passes", type=int, default=d.calibrate_passes,
                   help="passes over every job size per host and kind (the last one measured)")
    p.add_argument("--grace", type=float, default=d.grace, help="seconds to wait for the last jobs")
    p.add_argument("--queues", type=int, default=d.queues, help="AQs per kind per guest")
    p.add_argument("--depth", type=int, default=d.depth, help="slots per AQ")
    p.add_argument("--fft-units", type=float, default=d.workload.fft_units_mean,
                   help="mean FFT job size in units of --fft-group transforms")
    p.add_argument("--fft-group", type=int, default=d.workload.fft_group)
    p.add_argument("--turbo-units", type=float, default=d.workload.turbo_units_mean,
                   help="mean Turbo job size in code blocks")
    p.add_argument("--turbo-iterations", type=int, default=d.workload.turbo_iterations)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kill", type=int, metavar="HOST", help="SIGKILL this host's daemon mid-run")
    p.add_argument("--kill-at", type=float, default=d.kill_at, metavar="SECONDS")
    p.add_argument("--failover-window", type=float,
                   help="seconds after the kill (default 3 load periods, or 1)")
    p.add_argument("--policy", help="daemon --policy (passed through)")
    p.add_argument("--load-backend", choices=("datagram", "redis"), help="daemon --load-backend")
    p.add_argument("--redis-url", help="daemon --redis-url (default: the redis-server this starts)")
    p.add_argument("--load-period", type=float, help="daemon --load-period (seconds)")
    p.add_argument("--cluster-key", help="daemon --cluster-key FILE")
    p.add_argument("--no-redispatch", action="store_true",
                   help="the guests' queues do not ask for re-dispatch (LOCAL_FALLBACK): a job a "
                        "failed host gives back completes REMOTE_FAILED")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dump", metavar="FILE", help="write every job's record (JSON) here")
    a = p.parse_args(argv)
    if not 0 < a.load < 1.5:
        p.error(f"--load {a.load}: must be in (0, 1.5)")
    o = Options(duration=a.duration, load=a.load, slowdown=a.slowdown, layout=a.layout,
                calibrate_passes=a.calibrate_passes, grace=a.grace, queues=a.queues, depth=a.depth,
                workload=Workload(a.fft_units, a.fft_group, a.turbo_units, a.turbo_iterations), seed=a.seed,
                kill=a.kill,
                kill_at=a.kill_at, failover_window=a.failover_window, policy=a.policy,
                load_backend=a.load_backend, redis_url=a.redis_url, load_period=a.load_period,
                cluster_key=a.cluster_key, dump=a.dump, redispatch=not a.no_redispatch)
    if o.kill is not None and not 0 <= o.kill < len(o.layout.split(",")):
        p.error(f"--kill {o.kill}: no such host")
    from vrdma import lab

    why = lab.available()
    if why:
        print(f"cluster_run: cannot run here: {why}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        r = run(o)
        print(json.dumps(r, indent=1) if a.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
