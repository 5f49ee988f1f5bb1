"""Tenant classes, weights and aging through the daemon (issue #18, "Priority").

The daemon mode of :mod:`bench.tenant_priority_bench`: the same four
measurements and goals, for tenants of a real ``vrdma backend``:

* one local accelerator unit (``--accelerators fft=1``), emulated slow
  (``--accel-slowdown``) so that a 1024-point FFT takes ~1 ms;
* a ``--config`` TOML mapping four sockets to tenants: ``H`` class high,
  ``L`` class low, ``A`` normal weight 3, ``B`` normal weight 1
  (``[fairness] aging_seconds`` 0, raised to 0.05 s by a SIGHUP reload for
  the aging measurement and put back after it);
* one guest PROCESS per tenant (``python -m bench.tenant_priority_daemon
  --guest SOCKET``) submitting FFT jobs through guest_lib's accelerator API
  (:class:`guest_lib.accel.AccelHelper`), driven by JSON lines on its stdin
  (``{"depth": D, "seconds": S}``: keep D jobs in flight for S seconds; or
  ``"jobs": N``: post N at once and wait for them; ``"size"``, ``"batch"``:
  the FFT's points and transforms, default 1024 x 1; ``"in_place"``: in
  registered buffers, no staging copies) and answering with every
  job's completion (monotonic time, the CQE's ``wait_us`` and ``service_us``).

Queue waits are the CQEs' ``wait_us`` (the service's submit to start: what the
in-process bench measures); accelerator time per tenant is the sum of the
CQEs' ``service_us``, cross-checked at the end against the daemon's own
per-tenant accounting (``--state-dir``, ``vrdma accounting --format json``).
Goals as in the in-process bench (:func:`bench.tenant_priority_bench.verdicts`):
high's p99 wait under saturating low within (idle p99 + one service time) x 2
of the same round, weights 3:1 within 10%, low progressing only with aging.

``--native``: the native path instead (full speed, no accounting: small FFT
jobs run in the daemon's loop, never through the fair queue; 48 x 2048-point
jobs in place): A:B accelerator time and H's share of the jobs against a
saturating L, per round (:func:`native_round`).

``python -m bench.tenant_priority_daemon [--rounds 3] [--seconds 2] [--slowdown 100] [--native]``
(also ``python -m bench.tenant_priority_bench --daemon``). Prints the machine
(bench/machine.py); the machine may be shared: every goal is against the same
round's baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

N = 1024  # FFT points (complex64), as the in-process bench
#: tenants of the bench: socket name -> (class, weight)
TENANTS = {"H": ("high", 1), "L": ("low", 1), "A": ("normal", 3), "B": ("normal", 1)}
AGING_SECONDS = 0.05


# ---------------------------------------------------------------------------
# The guest process
# ---------------------------------------------------------------------------
def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def guest_main(path: str) -> int:
    """A guest on ``path``: FFT jobs on command (stdin JSON lines), results on stdout."""
    from guest_lib import Context
    from guest_lib.accel import helper

    with Context(path, mem_size=32 << 20, timeout=60.0) as ctx:
        poster = _Poster(ctx, helper(ctx))
        _emit({"event": "ready", "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("quit"):
                break
            _emit({"event": "done", "jobs": poster.run(cmd)})
        poster.close()
    return 0


class _Poster:
    """One guest's FFT jobs through its AccelHelper (guest_lib.accel)."""

    def __init__(self, ctx, h):
        self.ctx, self.h = ctx, h
        self.mr = None  # registered buffers of in_place commands
        self.slots: list[np.ndarray] = []
        self.turn = 0
        self.x = np.empty(0, np.complex64)
        self.params: dict = {}

    def _prepare(self, cmd: dict, depth: int) -> None:
        from guest_lib import MR
        from verbs import Access
        from virtio_rdma.constants import AccelDtype

        size, batch = int(cmd.get("size", N)), int(cmd.get("batch", 1))
        self.x = x = np.ones((batch, size), np.complex64)
        self.params = dict(size=size, batch=batch, dtype=AccelDtype.COMPLEX64)
        self.slots = []
        if cmd.get("in_place"):  # registered buffers, one per job in flight: no staging copies
            if self.mr is None or self.mr.length < depth * x.nbytes:
                if self.mr is not None:
                    self.mr.close()
                self.mr = MR(self.h.pd, depth * x.nbytes, Access.LOCAL_WRITE)
            whole = np.frombuffer(self.ctx.view_of_uva(self.mr.buf, depth * x.nbytes), np.complex64)
            self.slots = [whole[i * x.size:(i + 1) * x.size].reshape(x.shape) for i in range(depth)]
            for sl in self.slots:
                sl[:] = x

    def _post(self):
        from virtio_rdma.constants import AccelOp

        if self.slots:
            sl = self.slots[self.turn % len(self.slots)]
            self.turn += 1
            j = self.h.try_submit(AccelOp.FFT, sl, sl.nbytes, sl, None, **self.params)
        else:
            j = self.h.try_submit(AccelOp.FFT, self.x, self.x.nbytes, None, None, **self.params)
        if j is None:
            raise RuntimeError("the AQ or the staging area is full")
        return j

    def run(self, cmd: dict) -> list[list]:
        """Keep ``depth`` jobs in flight for ``seconds`` (or post ``jobs`` in all); every
        job's [monotonic time seen, wait_us, service_us, accel status]."""
        depth, seconds, total = int(cmd.get("depth", 1)), float(cmd.get("seconds", 0)), cmd.get("jobs")
        self._prepare(cmd, depth)
        h = self.h
        done: list[list] = []
        pending: list = []
        posted = 0
        end = time.monotonic() + seconds

        def more() -> bool:
            return posted < total if total is not None else time.monotonic() < end

        told = False
        while True:
            while more() and len(pending) < depth:
                pending.append(self._post())
                posted += 1
            if not pending:
                return done
            if not h.wait(pending[0], timeout=60.0):
                raise RuntimeError("no completion within 60 s")
            now = time.monotonic()
            while pending and pending[0].done:
                wc = pending.pop(0).wc
                done.append([now, wc.wait_us, wc.service_us, int(wc.accel_status)])
            if not told:
                told = True
                _emit({"event": "running"})

    def close(self) -> None:
        self.slots = []
        if self.mr is not None:
            self.mr.close()


class Guest:
    """A guest process seen from the coordinator."""

    def __init__(self, path: str, name: str, *, wait: bool = True):
        """Start the process; ``wait``: until it is connected (else call ``expect("ready")``)."""
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.tenant_priority_daemon", "--guest", path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""  # read from the pipe, not yet taken as lines (select sees only the pipe)
        if wait:
            self.expect("ready", 120)

    def expect(self, event: str, timeout: float = 120.0) -> dict:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("event") == event:
                    return msg
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            if not r:
                raise TimeoutError(f"guest {self.name}: no {event!r} within {timeout} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"guest {self.name} exited ({self.proc.wait()})")
            self._buf += chunk

    def run(self, **cmd) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def result(self, timeout: float = 120.0) -> list[list]:
        return self.expect("done", timeout)["jobs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.run(quit=True)
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------
def config_text(sockets: dict[str, str], aging: float) -> str:
    out = [f"[fairness]\naging_seconds = {aging}\n"]
    for name, (klass, weight) in TENANTS.items():
        out.append(f'[[tenant]]\nname = "{name}"\nsocket = "{sockets[name]}"\nclass = "{klass}"\n'
                   f"weight = {weight}\n")
    return "\n".join(out)


@dataclass
class Daemon:
    """``vrdma backend`` with one socket per tenant, its config and state directory."""

    slowdown: float
    extra: tuple[str, ...] = ()
    #: keep accounting (--state-dir): every job then takes the fair queue (no native path)
    keep_accounting: bool = True
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="vrdma-prio-"))

    def __post_init__(self):
        self.sockets = {n: os.path.join(self.dir, f"{n}.sock") for n in TENANTS}
        self.config = os.path.join(self.dir, "vrdma.toml")
        self.state = os.path.join(self.dir, "state")
        self.metrics_file = os.path.join(self.dir, "metrics.json")
        self.set_aging(0.0, reload=False)
        args = [sys.executable, "-m", "vrdma", "backend"]
        for p in self.sockets.values():
            args += ["-s", p]
        args += ["--accelerators", "fft=1", "--accel-slowdown", str(self.slowdown), "--config", self.config,
                 "--metrics-file", self.metrics_file, *self.extra]
        if self.keep_accounting:
            args += ["--state-dir", self.state]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not all(os.path.exists(p) for p in self.sockets.values()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vrdma backend did not start listening ({' '.join(args)})")
            time.sleep(0.02)

    def set_aging(self, aging: float, reload: bool = True) -> None:
        """Rewrite the config with ``aging`` and reload it (SIGHUP; applied asynchronously)."""
        with open(self.config + ".tmp", "w") as f:
            f.write(config_text(self.sockets, aging))
        os.replace(self.config + ".tmp", self.config)
        if reload:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)  # the loop reads it at its next turn

    def close(self) -> int:
        """SIGTERM (the accounting and metrics file are written at exit); the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def accounting(self) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "vrdma", "accounting", "--db",
                            os.path.join(self.state, "accounting.db"), "--format", "json"],
                           capture_output=True, text=True, timeout=60, check=False)
        if r.returncode:
            raise RuntimeError(f"vrdma accounting: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def metrics(self) -> dict:
        with open(self.metrics_file) as f:
            return json.load(f)

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def tenant_guests(d: Daemon) -> Iterator[dict[str, Guest]]:
    """A guest process for each tenant of ``d``, all connected (started together, then
    waited for); when this leaves, on any path, the guests quit and the daemon stops
    (its exit status: ``d.proc.returncode``; its directory stays for ``d.cleanup()``)."""
    guests: dict[str, Guest] = {}
    try:
        for name in TENANTS:
            guests[name] = Guest(d.sockets[name], name, wait=False)
        for gst in guests.values():
            gst.expect("ready")
        yield guests
    finally:
        for gst in guests.values():
            gst.close()
        d.close()


def _start_line(through: str) -> None:
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (the machine may be shared); through {through}",
          flush=True)


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------
def waits_ms(jobs: list[list]) -> list[float]:
    return [j[1] / 1e3 for j in jobs]


def busy_in(jobs: list[list], t0: float, t1: float) -> float:
    """Accelerator seconds (CQE service_us) of the jobs completed in [t0, t1)."""
    return sum(j[2] for j in jobs if t0 <= j[0] < t1) / 1e6


def count_in(jobs: list[list], t0: float, t1: float) -> int:
    return sum(1 for j in jobs if t0 <= j[0] < t1)


def run_round(d: Daemon, g: dict[str, Guest], seconds: float, totals: dict[str, float]) -> dict:
    from bench.tenant_priority_bench import p99

    out: dict = {}

    def keep(name: str, jobs: list[list]) -> list[list]:
        totals[name] = totals.get(name, 0.0) + sum(j[2] for j in jobs) / 1e6
        bad = [j for j in jobs if j[3] != 0]
        if bad:
            raise RuntimeError(f"tenant {name}: {len(bad)} jobs failed "
                               f"(statuses {sorted({j[3] for j in bad})})")
        return jobs

    # 1. idle: H alone, one job at a time
    g["H"].run(depth=1, seconds=seconds)
    idle = keep("H", g["H"].result())
    out["service_ms"] = float(np.median([j[2] for j in idle])) / 1e3
    out["idle_p99_ms"] = p99(waits_ms(idle))
    # 2. H closed loop while L keeps 16 queued
    g["L"].run(depth=16, seconds=seconds + 0.5)
    g["L"].expect("running")
    time.sleep(0.05)
    g["H"].run(depth=1, seconds=seconds)
    loaded = keep("H", g["H"].result())
    keep("L", g["L"].result())
    out["loaded_p99_ms"] = p99(waits_ms(loaded))
    out["loaded_p50_ms"] = float(np.median(waits_ms(loaded))) if loaded else float("nan")
    out["goal_ms"] = 2 * (out["idle_p99_ms"] + out["service_ms"])
    # 3. A (weight 3) and B (weight 1), both saturating: accelerator time over the second half
    t0 = time.monotonic()
    g["A"].run(depth=16, seconds=2 * seconds)
    g["B"].run(depth=16, seconds=2 * seconds)
    a, b = keep("A", g["A"].result()), keep("B", g["B"].result())
    lo, hi = t0 + seconds, t0 + 2 * seconds
    out["weight_ratio"] = busy_in(a, lo, hi) / max(1e-12, busy_in(b, lo, hi))
    # 4. L (4 deep) under saturating H, without aging and with it. H keeps 32 queued (the
    # in-process bench: 16): a guest process descheduled for 16 service times on a loaded
    # machine would let its queue run dry, and L run without aging
    for aging in (0.0, AGING_SECONDS):
        if aging:
            d.set_aging(aging)
        g["H"].run(depth=32, seconds=seconds + 0.3)
        g["H"].expect("running")
        t1 = time.monotonic()
        g["L"].run(depth=4, seconds=seconds)
        lj = keep("L", g["L"].result())
        hj = keep("H", g["H"].result())
        # L's jobs completed while H saturated (its last ones finish after H stopped)
        t_end = max((j[0] for j in hj), default=t1)
        out[f"low_jobs_aging_{aging:g}"] = count_in(lj, t1, t_end)
        out[f"high_jobs_aging_{aging:g}"] = count_in(hj, t1, t_end)
        if aging:
            d.set_aging(0.0)
    return out


#: the native path's measurement: jobs it runs in the daemon's loop (at most NATIVE_MAX_POINTS)
NATIVE_JOB = dict(size=2048, batch=48, in_place=True)


def native_round(g: dict[str, Guest], seconds: float) -> dict:
    """At full speed without accounting: small jobs run natively in the daemon's loop,
    never through the fair queue. Both pairs keep 16 jobs (48 x 2048 points, in
    place) queued: A:B accelerator time (goal 3:1) and H's share of the jobs
    against L (goal: all of them while H has jobs waiting), over the second half."""
    out: dict = {}
    t0 = time.monotonic()
    g["A"].run(depth=16, seconds=2 * seconds, **NATIVE_JOB)
    g["B"].run(depth=16, seconds=2 * seconds, **NATIVE_JOB)
    a, b = g["A"].result(), g["B"].result()
    lo, hi = t0 + seconds, t0 + 2 * seconds
    out["weight_ratio"] = busy_in(a, lo, hi) / max(1e-12, busy_in(b, lo, hi))
    out["busy_share"] = (busy_in(a, lo, hi) + busy_in(b, lo, hi)) / max(1e-12, hi - lo)
    t0 = time.monotonic()
    g["L"].run(depth=16, seconds=2 * seconds, **NATIVE_JOB)
    g["H"].run(depth=16, seconds=2 * seconds, **NATIVE_JOB)
    h, low = g["H"].result(), g["L"].result()
    lo, hi = t0 + seconds, t0 + 2 * seconds
    nh, nl = count_in(h, lo, hi), count_in(low, lo, hi)
    out["high_share"] = nh / max(1, nh + nl)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest", metavar="SOCKET", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--slowdown", type=float, default=100.0)
    p.add_argument("--native", action="store_true",
                   help="full speed, no accounting: the native path's turns (weights 3:1, high's share)")
    args = p.parse_args(argv)
    if args.guest:
        return guest_main(args.guest)
    from bench.machine import header
    from bench.tenant_priority_bench import report

    print(header())
    if args.native:
        return _main_native(args)
    _start_line(f"vrdma backend (fft=1, --accel-slowdown {args.slowdown:g}), one guest process per tenant")
    d = Daemon(args.slowdown)
    totals: dict[str, float] = {}
    try:
        with tenant_guests(d) as guests:
            for r in range(args.rounds):
                print(report(r, run_round(d, guests, args.seconds, totals)), flush=True)
        rc = d.proc.returncode
        rows = d.accounting()
        acct = {}
        for row in rows:
            if row["op"] == "fft":
                acct[row["tenant"]] = acct.get(row["tenant"], 0.0) + row["accel_seconds"]
        per = ", ".join(f"{n} {totals.get(n, 0.0):.3f}/{acct.get(n, 0.0):.3f}" for n in TENANTS)
        print(f"# daemon exit {rc}; accelerator seconds per tenant, CQEs vs the daemon's accounting: {per}")
        svc = d.metrics()["accelerators"]["service"]["accelerators"]
        for name, st in svc.items():
            print(f"# accelerator {name}: dispatches by class {st.get('class_dispatches')}, "
                  f"class overtakes {st.get('class_overtakes')}, aged dispatches {st.get('aged_dispatches')}")
    finally:
        d.cleanup()
    return 0


def _main_native(args) -> int:
    _start_line(f"vrdma backend (fft=1, full speed, no --state-dir: the native path), jobs {NATIVE_JOB}")
    d = Daemon(1.0, keep_accounting=False)
    try:
        with tenant_guests(d) as guests:
            for r in range(args.rounds):
                o = native_round(guests, args.seconds)
                print(f"round {r}: native weights 3:1 -> {o['weight_ratio']:.3f} "
                      f"({'ok' if abs(o['weight_ratio'] / 3 - 1) <= 0.1 else 'MISSED'}; loop busy with "
                      f"kernels {100 * o['busy_share']:.0f}% of the time) | high's share of jobs against "
                      f"saturating low {100 * o['high_share']:.1f}%", flush=True)
        nat = d.metrics()["accelerators"]["native"]
        print(f"# native path: {nat}")
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
