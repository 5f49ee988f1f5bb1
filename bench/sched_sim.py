"""Discrete-event simulation of the cluster scheduler (issue 15, item 4).

The model: ``--hosts N`` hosts, the first ``--accel-hosts M`` of them with one
FIFO accelerator each, of speed taken in turn from ``--speeds`` (speed 2 =
twice as fast). Jobs arrive in one Poisson stream per host, each at rate
``load x capacity / N`` (capacity = the sum of the speeds); a job's work is
exponential of mean 1, its service time work / speed. The origin host calls
:func:`scheduler.decide.decide` exactly as the daemon will: with its own
live counters, the load table at ``now``, its own sends since each row, the
transfer time and a probe reading another host's true current state. A job
sent away pays ``--transfer D`` to get there (it joins the target's queue on
landing) and D for its result to come back; response = submission to
result.

Each accelerator host advertises its row every ``--period T`` (times a
uniform jitter in [0.9, 1.1]), each at its own random phase; hosts without
accelerators never advertise. A broadcast reaches every host at once, so all
hosts' tables are identical and one :class:`scheduler.table.LoadTable`
stands for all of them (own-send ledgers stay per host). Every host starts
with every accelerator host's idle row (seq 0).

The arrivals and job sizes come from one rng stream (``--seed``), the same
for every policy (common random numbers); decisions and the broadcast
jitter have their own streams. The first 10% of jobs are warm-up and not
measured. Printed per period and policy: mean and p99 response, the fraction
sent remote, probes (RDMA READs) and control messages per job,
dissemination messages per period, and the mean's ratio to the oracle's.

Usage: python -m bench.sched_sim [--hosts 16] [--accel-hosts 8] [--load 0.9]
    [--period 0.1,1,5,20] [--transfer 0.1] [--speeds 1] [--jobs 20000]
    [--policy all|NAME[,NAME]] [--seed 1] [--json] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field

from scheduler.decide import DEFAULT_POLICY, DecisionCounters, Job, View, decide, parse_policy
from scheduler.errors import UnknownPolicy
from scheduler.table import LoadRow, LoadTable, OwnSends

#: the only job kind of the model
KIND = "acc"
#: policies ``--policy all`` runs, references last
ALL_POLICIES = ("seed", "seed+own", "local", "p2c", "p2c+own", "probe", "board", "random", "oracle")
#: the broadcast interval is the period times a uniform draw in this range
JITTER = (0.9, 1.1)
#: fraction of the jobs (the first ones submitted) not measured
WARMUP = 0.1

_ARRIVE, _LAND, _DONE, _BCAST = 0, 1, 2, 3


@dataclass(slots=True)
class _Host:
    hid: int
    speed: float  # 0 for a host without an accelerator
    queue: deque[int] = field(default_factory=deque)
    busy: bool = False
    #: service seconds of the jobs waiting (not the one in service)
    waiting: float = 0.0
    #: when the job in service ends
    ends: float = 0.0
    #: service seconds of the jobs sent here and not yet landed (the oracle sees them)
    inbound: float = 0.0
    seq: int = 0
    own: OwnSends = field(default_factory=OwnSends)

    def row(self, now: float, known_sizes: bool, inbound: bool) -> LoadRow:
        """The host's true counters now (what it advertises, or a probe reads): the work in
        its system exactly if job sizes are known, else the job count x the mean service time."""
        if not self.speed:
            return LoadRow(self.hid, {}, {}, {}, {}, self.seq, now)
        s = 1.0 / self.speed
        if known_sizes:
            queued = self.waiting + (max(0.0, self.ends - now) if self.busy else 0.0)
        else:
            queued = len(self.queue) * s
        if inbound:
            queued += max(0.0, self.inbound)
        return LoadRow(self.hid, {KIND: 1}, {KIND: s}, {KIND: queued}, {KIND: int(self.busy)}, self.seq, now)


@dataclass(frozen=True, slots=True)
class Params:
    hosts: int = 16
    accel_hosts: int = 8
    load: float = 0.9
    period: float = 1.0
    transfer: float = 0.1
    speeds: tuple[float, ...] = (1.0,)
    jobs: int = 20000
    seed: int = 1
    known_sizes: bool = True
    #: a target counts a job sent to it from its announcement (the job message, latency
    #: much less than D) rather than from the landing of its input
    count_announced: bool = False

    def speed_of(self, host: int) -> float:
        return self.speeds[host % len(self.speeds)] if host < self.accel_hosts else 0.0


@dataclass(slots=True)
class Result:
    policy: str
    period: float
    mean: float
    p99: float
    remote_fraction: float
    probes_per_job: float
    control_per_job: float
    bcasts_per_period: float
    completed: int
    submitted: int
    duplicates: int
    counters: DecisionCounters

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("policy", "period", "mean", "p99", "remote_fraction",
                                              "probes_per_job", "control_per_job", "bcasts_per_period",
                                              "completed", "submitted", "duplicates")}


def simulate(p: Params, policy: str) -> Result:
    """One run of ``policy`` under ``p`` (module docstring)."""
    pol = parse_policy(policy)
    if not 0 < p.accel_hosts <= p.hosts:
        raise ValueError(f"--accel-hosts {p.accel_hosts} must be in 1..--hosts {p.hosts}")
    # a simulation's streams, reproducible from --seed: not keys (STYLE.md 15 is about keys)
    arr_rng, dec_rng, jit_rng = (random.Random(p.seed + i) for i in range(3))  # noqa: S311
    hosts = [_Host(h, p.speed_of(h)) for h in range(p.hosts)]
    capacity = sum(h.speed for h in hosts)
    rate = p.load * capacity
    table = LoadTable(period=p.period)
    for h in hosts:
        if h.speed:
            table.update(h.row(0.0, p.known_sizes, False))
    submit = [0.0] * p.jobs
    work = [0.0] * p.jobs
    origin = [0] * p.jobs
    remote = [False] * p.jobs
    response = [math.nan] * p.jobs
    done = [0] * p.jobs
    ev: list[tuple[float, int, int, int, int]] = []  # (time, tiebreak, type, a, b)
    tick = 0

    def push(t: float, kind: int, a: int, b: int = 0) -> None:
        nonlocal tick
        tick += 1
        heapq.heappush(ev, (t, tick, kind, a, b))

    for h in hosts:
        if h.speed:
            push(jit_rng.uniform(0.0, p.period), _BCAST, h.hid)
    next_job = 0
    t_next = arr_rng.expovariate(rate)
    push(t_next, _ARRIVE, 0)
    counters = DecisionCounters()
    bcasts = 0
    completed = 0
    transfer = p.transfer
    ks = p.known_sizes
    oracle = pol.reference
    announced = p.count_announced
    # the board holds the work dispatchers announced with their FETCH_ADDs: jobs on their way
    board = pol.base == "board"

    def truth(hid: int) -> LoadRow:
        """A probe: the host's true counters at the decision's ``now``."""
        return hosts[hid].row(now, ks, oracle or announced or board)

    def enqueue(h: _Host, j: int, now: float) -> None:
        h.queue.append(j)
        h.waiting += work[j] / h.speed
        start(h, now)

    def start(h: _Host, now: float) -> None:
        if not h.busy and h.queue:
            h.busy = True
            t = work[h.queue[0]] / h.speed
            h.waiting = max(0.0, h.waiting - t) if len(h.queue) > 1 else 0.0
            h.ends = now + t
            push(h.ends, _DONE, h.hid)

    now = 0.0
    while completed < p.jobs:
        now, _, kind, a, _b = heapq.heappop(ev)
        if kind == _ARRIVE:
            j = next_job
            next_job += 1
            o = arr_rng.randrange(p.hosts)
            submit[j], work[j], origin[j] = now, arr_rng.expovariate(1.0), o
            if next_job < p.jobs:
                push(now + arr_rng.expovariate(rate), _ARRIVE, 0)
            here = hosts[o]
            view = View(table, now, transfer, here.own, probe=truth)
            d = decide(Job(KIND, work[j] if ks else 1.0), here.row(now, ks, announced), view, dec_rng, pol)
            counters.count(d)
            if d.local:
                enqueue(here, j, now)
            else:
                remote[j] = True
                tgt = hosts[d.target]
                row = table.rows[tgt.hid]
                sent = row.service_time[KIND] * (work[j] if ks else 1.0)
                here.own.note(tgt.hid, row.seq, sent, now)
                tgt.inbound += sent
                push(now + transfer, _LAND, j, tgt.hid)
        elif kind == _LAND:
            tgt = hosts[_b]
            tgt.inbound -= (work[a] if ks else 1.0) / tgt.speed
            enqueue(tgt, a, now)
        elif kind == _DONE:
            h = hosts[a]
            j = h.queue.popleft()
            h.busy = False
            done[j] += 1
            response[j] = now + (transfer if remote[j] else 0.0) - submit[j]
            completed += 1
            start(h, now)
        else:  # _BCAST
            h = hosts[a]
            h.seq += 1
            table.update(h.row(now, ks, announced))
            bcasts += 1
            push(now + p.period * jit_rng.uniform(*JITTER), _BCAST, a)
    measured = sorted(response[int(p.jobs * WARMUP):])
    mean = sum(measured) / len(measured)
    p99 = measured[min(len(measured) - 1, int(0.99 * len(measured)))]
    periods = now / p.period
    # control operations per job: board's FETCH_ADD announcing each remote job (the others: none)
    ctl = counters.remote / counters.decisions if board else 0.0
    return Result(pol.name, p.period, mean, p99, counters.remote / counters.decisions,
                  counters.probes / counters.decisions, ctl, bcasts / periods if periods else 0.0,
                  sum(1 for c in done if c == 1), p.jobs, sum(1 for c in done if c > 1), counters)


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(":", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"not a list of positive numbers: {text!r}")
    return vals


def _print(p: Params, results: list[Result]) -> None:
    speeds = ":".join(f"{s:g}" for s in p.speeds)
    sizes = "known" if p.known_sizes else "unknown"
    count = "announce" if p.count_announced else "land"
    print(f"hosts {p.hosts} (accelerators on {p.accel_hosts}, speeds {speeds})  load {p.load}"
          f"  transfer {p.transfer}  jobs {p.jobs}  seed {p.seed}  sizes {sizes}  count from {count}"
          f"  default {DEFAULT_POLICY}")
    print(f"{'T':>6} {'policy':<10} {'mean':>8} {'p99':>8} {'remote':>7} {'reads/job':>9} "
          f"{'ctl/job':>7} {'bcast/T':>7} {'x oracle':>8}")
    oracle = {r.period: r.mean for r in results if r.policy == "oracle"}
    for r in results:
        ratio = f"{r.mean / oracle[r.period]:8.2f}" if r.period in oracle else f"{'-':>8}"
        mark = "*" if r.policy == DEFAULT_POLICY else " "
        print(f"{r.period:6g} {r.policy + mark:<10} {r.mean:8.3f} {r.p99:8.3f} {r.remote_fraction:7.3f} "
              f"{r.probes_per_job:9.2f} {r.control_per_job:7.2f} {r.bcasts_per_period:7.2f} {ratio}")


def _plot(path: str, p: Params, results: list[Result]) -> int:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, which is not installed", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.policy for r in results):
        pts = sorted((r.period, r.mean) for r in results if r.policy == name)
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o",
                label=name + (" (default)" if name == DEFAULT_POLICY else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("table period T (mean service times)")
    ax.set_ylabel("mean response time")
    ax.set_title(f"{p.hosts} hosts, {p.accel_hosts} accelerated, load {p.load}, transfer {p.transfer}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sched_sim", description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--accel-hosts", type=int, default=None, help="default: half the hosts")
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--period", type=_floats, default=[0.1, 1.0, 5.0, 20.0], help="T, or a list: 0.1,1,5,20")
    ap.add_argument("--transfer", type=float, default=0.1)
    ap.add_argument("--speeds", type=_floats, default=[1.0], help="e.g. 2:1, cycled over accelerator hosts")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--policy", default="all", help=f"all ({', '.join(ALL_POLICIES)}) or a list")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", choices=("known", "unknown"), default="known",
                    help="hosts know each job's service time (counters in seconds of work) or only counts")
    ap.add_argument("--count-from", choices=("land", "announce"), default="land",
                    help="a target counts a sent job when its input lands, or at its announcement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png")
    a = ap.parse_args(argv)
    names = list(ALL_POLICIES) if a.policy == "all" else a.policy.split(",")
    for n in names:
        try:
            parse_policy(n)
        except UnknownPolicy as e:
            ap.error(str(e))
    if not 0 < a.load < 1:
        ap.error(f"--load {a.load}: must be in (0, 1) for the queues to be stable")
    if a.jobs < 10:
        ap.error(f"--jobs {a.jobs}: at least 10")
    base = Params(a.hosts, a.accel_hosts if a.accel_hosts is not None else max(1, a.hosts // 2), a.load,
                  1.0, a.transfer, tuple(a.speeds), a.jobs, a.seed, a.sizes == "known",
                  a.count_from == "announce")
    results = []
    for t in a.period:
        p = dataclasses.replace(base, period=t)
        results += [simulate(p, n) for n in names]
    if a.json:
        print(json.dumps({"params": {"hosts": base.hosts, "accel_hosts": base.accel_hosts, "load": base.load,
                                     "periods": a.period, "transfer": base.transfer,
                                     "speeds": list(base.speeds), "jobs": base.jobs, "seed": base.seed,
                                     "known_sizes": base.known_sizes,
                                     "count_announced": base.count_announced},
                          "default": DEFAULT_POLICY,
                          "results": [dict(r.as_dict(), default=r.policy == DEFAULT_POLICY)
                                      for r in results]}, indent=1))
    else:
        _print(base, results)
    if a.plot:
        return _plot(a.plot, base, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
