"""Accelerator queues: the fair receive queue and the ready (completion) queue.

Receive queue: start-time fair queueing (SFQ, Goyal/Vin/Cheng 1996) across
guests, costed by each job's *estimated service time*. Every guest has a FIFO;
a job arriving from guest g gets the start tag ``S = max(V, F_g)`` and moves
the guest's finish tag to ``F_g = S + cost``; the dispatcher always takes the
queued job with the smallest ``(S, arrival)``; ``V`` is the start tag of the
last dispatched job. So each guest's jobs run in submission order, guests with
equal demand alternate, and a guest submitting long jobs gets proportionally
fewer of them through when others are waiting (fair in accelerator time, not
job count), while an idle accelerator serves anyone at once (work conserving).
When the queue empties the virtual clock and all guest tags reset, so no state
outlives a busy period.

Ready queue: jobs finished and waiting to be collected (the completion queue a
backend daemon drains to write guest completions). A notifier callback runs,
outside any lock, each time a job is appended, so an event loop can be woken
(``loop.call_soon_threadsafe``, an eventfd write).

These are data structures only; the owning accelerator serializes access to the
receive queue with its own lock. The ready queue has its own condition variable
because producers (workers) and consumers (collectors) are different threads.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from accel_core.jobs import Job

log = logging.getLogger(__name__)

MIN_COST = 1e-9  # seconds; keeps tags increasing per guest even for free jobs


class FairQueue:
    """Start-time fair receive queue of jobs across guests (not thread-safe)."""

    def __init__(self) -> None:
        self._fifo: dict[int, deque[Job]] = {}
        self._finish: dict[int, float] = {}
        self._vtime = 0.0
        self._arrival = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return iter(self.ordered())

    def start_tag(self, guest_id: int) -> float:
        """The start tag a job from ``guest_id`` would get if it arrived now."""
        return max(self._vtime, self._finish.get(guest_id, 0.0))

    def push(self, job: Job) -> None:
        g = job.guest_id
        start = self.start_tag(g)
        self._finish[g] = start + max(job.estimate, MIN_COST)
        job._tag = (start, next(self._arrival))
        self._fifo.setdefault(g, deque()).append(job)
        self._len += 1

    def pop(self) -> Job | None:
        """Remove and return the next job to dispatch, or None when empty."""
        best_g, best_tag = None, None
        for g, fifo in self._fifo.items():
            tag = fifo[0]._tag
            if best_tag is None or tag < best_tag:
                best_g, best_tag = g, tag
        if best_g is None:
            return None
        fifo = self._fifo[best_g]
        job = fifo.popleft()
        if not fifo:
            del self._fifo[best_g]
        self._vtime = job._tag[0]
        self._len -= 1
        if not self._len:
            self._reset()
        return job

    def remove(self, job: Job) -> bool:
        """Remove a queued job (cancellation); False if it is not queued here."""
        fifo = self._fifo.get(job.guest_id)
        if fifo is None:
            return False
        try:
            fifo.remove(job)
        except ValueError:
            return False
        if not fifo:
            del self._fifo[job.guest_id]
        self._len -= 1
        if not self._len:
            self._reset()
        return True

    def take_all(self) -> list[Job]:
        """Empty the queue, returning the jobs in dispatch order."""
        jobs = self.ordered()
        self._fifo.clear()
        self._len = 0
        self._reset()
        return jobs

    def ordered(self) -> list[Job]:
        """Queued jobs in the order they would be dispatched if nothing else arrived."""
        return sorted((j for fifo in self._fifo.values() for j in fifo), key=lambda j: j._tag)

    def guests(self) -> dict[int, int]:
        """Queued job count per guest."""
        return {g: len(f) for g, f in self._fifo.items()}

    def _reset(self) -> None:
        self._vtime = 0.0
        self._finish.clear()


class ReadyQueue:
    """Finished jobs waiting to be collected; thread-safe."""

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._notify = notify
        self._waiting = 0  # collectors blocked in collect(): put() signals the condition only for them

    def __len__(self) -> int:
        with self._cv:
            return len(self._jobs)

    def set_notifier(self, notify: Callable[[], None] | None) -> None:
        with self._cv:
            self._notify = notify

    def put(self, job: Job) -> None:
        with self._cv:
            self._jobs.append(job)
            if self._waiting:
                self._cv.notify_all()
            notify = self._notify
        if notify is not None:
            try:
                notify()
            except Exception:  # a broken notifier must not kill the worker that delivers
                log.exception("ready-queue notifier failed")

    def collect(self, max_jobs: int | None = None, timeout: float | None = 0.0) -> list[Job]:
        """Take up to ``max_jobs`` finished jobs, oldest first.

        ``timeout=0`` polls; ``None`` waits until at least one job is ready; a
        positive value waits at most that long. Returns [] on timeout.
        """
        if max_jobs is not None and max_jobs <= 0:
            return []
        with self._cv:
            if not self._jobs and timeout != 0:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._jobs:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._waiting += 1
                    try:
                        self._cv.wait(remaining)
                    finally:
                        self._waiting -= 1
            n = len(self._jobs) if max_jobs is None else min(max_jobs, len(self._jobs))
            return [self._jobs.popleft() for _ in range(n)]
