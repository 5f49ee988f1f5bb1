"""What every fuzz target shares: the run report, the per-input watchdog,
canary snapshots of guest memory, and fd/mapping counts of a process.

A target feeds inputs one at a time. Each input is bounded by
:class:`Watchdog` (``SIGALRM``: an input that runs past its bound raises
:class:`Hang` in the fuzz loop, which records it with the seed and index to
replay). :class:`Canary` keeps a copy of every byte of a guest's memory that
nothing may change (everything outside the ranges the guest allowed to be
written) and reports the offsets that did change.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field


class FuzzFailure(AssertionError):
    """A finding: a crash, hang, canary violation, fd/mapping leak or a dead
    daemon. The message names the target, seed and input index to replay."""


class Hang(Exception):
    """Raised in the fuzz loop by the watchdog when one input runs too long."""


@dataclass
class Report:
    target: str
    seed: int
    count: int = 0                 # inputs sent
    rejected: int = 0              # inputs answered with an error status / dropped and counted
    accepted: int = 0              # inputs the code under test took as valid
    crashes: int = 0
    hangs: int = 0
    canary_violations: int = 0     # bytes changed outside what the guest allowed
    liveness_checks: int = 0       # fresh-guest round trips that passed
    fd_delta: int = 0              # fds after the run minus baseline (0 expected)
    maps_delta: int = 0            # /proc/PID/maps lines after minus baseline (0 expected)
    seconds: float = 0.0
    slowest_input_s: float = 0.0
    slowest_input_index: int = -1
    failures: list = field(default_factory=list)   # first few findings, replayable
    counters: dict = field(default_factory=dict)   # target-specific counters of the code under test

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.hangs or self.canary_violations or self.fd_delta
                    or self.maps_delta or self.failures)

    def fail(self, index: int, what: str) -> None:
        msg = f"{self.target}: {what} (replay: --seed {self.seed}, input index {index})"
        if len(self.failures) < 20:
            self.failures.append(msg)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rate_per_s"] = round(self.rate, 1)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        lines = [
            f"fuzz {self.target}: seed {self.seed}",
            f"  inputs            {self.count} in {self.seconds:.1f} s ({self.rate:,.0f}/s)",
            f"  rejected/errors   {self.rejected}   accepted {self.accepted}",
            f"  crashes {self.crashes}   hangs {self.hangs}   canary violations {self.canary_violations}",
            f"  fd delta {self.fd_delta}   maps delta {self.maps_delta}   "
            f"liveness round trips {self.liveness_checks}",
            f"  slowest input     {self.slowest_input_s * 1e3:.2f} ms (index {self.slowest_input_index})",
        ]
        if self.counters:
            lines.append("  counters          " + json.dumps(self.counters, sort_keys=True))
        for f in self.failures:
            lines.append("  FAIL " + f)
        lines.append("  RESULT " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


class Watchdog:
    """Bounds each input in time with ``ITIMER_REAL``: :meth:`arm` before an
    input, :meth:`disarm` after; a timer that fires raises :class:`Hang`.
    Also tracks the slowest input. Main thread only."""

    def __init__(self, bound_s: float, report: Report):
        self.bound = float(bound_s)
        self.report = report
        self._t0 = 0.0
        self._old = None

    def __enter__(self):
        self._old = signal.signal(signal.SIGALRM, self._fire)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old or signal.SIG_DFL)

    @staticmethod
    def _fire(signum, frame):
        raise Hang("input exceeded its time bound")

    def arm(self) -> None:
        self._t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, self.bound)

    def disarm(self, index: int) -> float:
        signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - self._t0
        if dt > self.report.slowest_input_s:
            self.report.slowest_input_s = dt
            self.report.slowest_input_index = index
        return dt


class Canary:
    """A copy of ``view`` outside ``allowed`` ranges ((offset, length) within
    the view). :meth:`check` returns the number of bytes that changed and the
    first changed offset (-1 if none)."""

    def __init__(self, view: memoryview, allowed=(), name: str = "guest"):
        self.view = view
        self.name = name
        spans = sorted((max(0, o), min(len(view), o + n)) for o, n in allowed if n > 0)
        keep, pos = [], 0
        for a, b in spans:
            if a > pos:
                keep.append((pos, a))
            pos = max(pos, b)
        if pos < len(view):
            keep.append((pos, len(view)))
        self.spans = keep
        self.copies = [bytes(view[a:b]) for a, b in keep]

    @property
    def bytes_watched(self) -> int:
        return sum(b - a for a, b in self.spans)

    def check(self) -> tuple[int, int]:
        changed, first = 0, -1
        v = self.view
        for (a, b), old in zip(self.spans, self.copies):
            cur = bytes(v[a:b])
            if cur == old:
                continue
            for i in range(b - a):
                if cur[i] != old[i]:
                    changed += 1
                    if first < 0:
                        first = a + i
        return changed, first


    def rebase(self) -> None:
        """Take the current bytes as the new reference (each change is reported once)."""
        self.copies = [bytes(self.view[a:b]) for a, b in self.spans]


def check_canaries(report, canaries, i: int) -> None:
    """Count and report, as input ``i``'s finding, every canary byte that changed."""
    for c in canaries:
        n, first = c.check()
        if n:
            report.canary_violations += n
            report.fail(i, f"{n} canary bytes of {c.name} changed (first at offset {first:#x})")
            c.rebase()


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def maps_count(pid: int | str = "self", needle: str = "memfd:") -> int:
    """Lines of /proc/PID/maps naming ``needle``: the guest-memory mappings
    (every guest's memory is a memfd). Anonymous mappings are not counted:
    the allocator's arenas come and go on their own."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(needle in line for line in f)


def settle(read, baseline: int, timeout: float = 5.0) -> int:
    """Poll ``read()`` until it returns ``baseline`` or ``timeout`` passes;
    the last value read (a closed connection is released asynchronously)."""
    deadline = time.monotonic() + timeout
    v = read()
    while v != baseline and time.monotonic() < deadline:
        time.sleep(0.02)
        v = read()
    return v
