"""Accelerator queues: the fair receive queue and the ready (completion) queue.

Receive queue: start-time fair queueing (SFQ, Goyal/Vin/Cheng 1996) across
guests, costed by each job's *estimated service time*. Every guest has a FIFO;
a job arriving from guest g gets the start tag ``S = max(V, F_g)`` and moves
the guest's finish tag to ``F_g = S + cost``; the dispatcher always takes the
queued job with the smallest ``(S, arrival)``; ``V`` is the start tag of the
last dispatched job. So each guest's jobs of one priority run in submission order, guests with
equal demand alternate, and a guest submitting long jobs gets proportionally
fewer of them through when others are waiting (fair in accelerator time, not
job count), while an idle accelerator serves anyone at once (work conserving).
When the accelerator goes idle -- no job queued *and none running*: its owner
calls :meth:`FairQueue.idle` -- the virtual clock and all guest tags reset, so
no state outlives a busy period. Not when the queue merely empties while a job
runs: a guest whose job is running and who refills its queue right then must
not tie with (and, arriving first, overtake) a guest that has been waiting its
turn; the finish tag its running job left is what puts its refill behind.

Priority (``Job.priority``, 0 lowest .. ``jobs.MAX_PRIORITY``) orders jobs
*within one guest's share*, never across guests: the queue first picks the
guest by fairness as above, then takes that guest's highest-priority waiting
job (FIFO within a priority), like bbdev queue priorities inside one device.
So a guest cannot take more than its fair share by declaring priority 7, and
a guest's urgent job overtakes its own bulk jobs. Tags are per guest *slot*:
a backlogged guest's next dispatch gets start tag ``S_g`` and moves it to
``S_g + cost`` of the job actually taken (exactly SFQ when priorities are
equal); a cancelled job's cost is given back to its guest.

Tenant classes, weights and aging (issue #18): an optional ``classify(guest_id)
-> (class, weight)`` (the daemon's tenant ledger: a higher class is served
first; ``weight`` divides each job's cost, so within a class backlogged guests
get accelerator time in proportion to their weights -- weighted SFQ). Aging:
a guest served nothing for ``aging_seconds`` while it has jobs waiting competes
one class higher per period waited (up to the highest class waiting), so a low
tenant still progresses under a saturating high one; its start tag, left behind
while it waited, then puts it first among its new peers. Counted:
``class_dispatches`` (by the served guest's class), ``class_overtakes`` (a job
dispatched ahead of a lower class's job queued earlier) and ``aged_dispatches``. Without ``classify``
every guest is class 0 weight 1: exactly the queue described above.

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
from typing import cast

from accel_core.jobs import Job

log = logging.getLogger(__name__)

MIN_COST = 1e-9  # seconds; keeps tags increasing per guest even for free jobs


class _Share:
    """One guest's waiting jobs: a FIFO per priority present, the highest of
    those priorities, the start tag its next dispatched job gets, its class and
    weight, and since when it has waited unserved (aging)."""

    __slots__ = ("fifos", "top", "start", "n", "klass", "weight", "since")

    def __init__(self, start: float, klass: int, weight: float, since: float) -> None:
        self.fifos: dict[int, deque[Job]] = {}
        self.top = 0
        self.start = start
        self.n = 0
        self.klass = klass
        self.weight = weight
        self.since = since


def _cost(job: Job) -> float:
    c = job.estimate
    return max(MIN_COST, c)


#: classify(guest_id) -> (class, weight); class: higher first; weight > 0
Classifier = Callable[[int], tuple[int, float]]


class FairQueue:
    """Start-time fair receive queue of jobs across guests, by priority
    within a guest (not thread-safe)."""

    def __init__(self, classify: Classifier | None = None, aging_seconds: float = 0.0) -> None:
        self.classify = classify
        self.aging_seconds = aging_seconds
        #: dispatches that went to a guest because aging lifted its class (tests assert it)
        self.aged_dispatches = 0
        #: dispatches by the class of the guest served (its own class, before aging)
        self.class_dispatches: dict[int, int] = {}
        #: dispatches ahead of a waiting job of a lower class queued earlier (the class order
        #: at work: 0 while every guest is one class; tests through the daemon assert it)
        self.class_overtakes = 0
        self._shares: dict[int, _Share] = {}
        self._finish: dict[int, float] = {}
        self._vtime = 0.0
        self._arrival = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return iter(self.ordered())

    def start_tag(self, guest_id: int) -> float:
        """The start tag a job from ``guest_id`` would get if it arrived now
        (were it of its guest's lowest queued priority)."""
        return max(self._vtime, self._finish.get(guest_id, 0.0))

    def set_classifier(self, classify: Classifier | None, aging_seconds: float = 0.0) -> None:
        self.classify = classify
        self.aging_seconds = aging_seconds

    def _class_weight(self, g: int) -> tuple[int, float]:
        if self.classify is None:
            return 0, 1.0
        try:
            k, w = self.classify(g)
        except Exception:  # a broken classifier must not lose the job
            log.exception("fair queue: classifying guest %d failed", g)
            return 0, 1.0
        return int(k), (float(w) if w > 0 else 1.0)

    def push(self, job: Job) -> None:
        g = job.guest_id
        if len(self._finish) > 4 * len(self._shares) + 64:
            self._prune()
        klass, weight = self._class_weight(g)
        start = self.start_tag(g)
        self._finish[g] = start + _cost(job) / weight
        job._tag = (start, next(self._arrival))  # the FIFO tag; ordered() and pop() set the real one
        share = self._shares.get(g)
        if share is None:  # the guest becomes backlogged: SFQ's max(V, F_g)
            since = job.t_submitted if job.t_submitted is not None else 0.0
            share = self._shares[g] = _Share(start, klass, weight, since)
        else:
            share.klass, share.weight = klass, weight
        p = job.priority
        fifo = share.fifos.get(p)
        if fifo is None:
            fifo = share.fifos[p] = deque()
            if not share.n or p > share.top:
                share.top = p
        fifo.append(job)
        share.n += 1
        self._len += 1

    def pop(self, now: float | None = None) -> Job | None:
        """Remove and return the next job to dispatch, or None when empty.
        ``now`` (the clock of the jobs' ``t_submitted``): for aging."""
        shares = self._shares
        if len(shares) == 1:
            g, share = next(iter(shares.items()))
        elif shares:
            aging = self.aging_seconds if now is not None and self.aging_seconds > 0 else 0.0
            top = max(sh.klass for sh in shares.values())
            g, share, best = -1, None, (0, 0.0, 0.0)
            aged = False
            for g1, sh in shares.items():
                k = sh.klass
                lifted = False
                if aging and k < top:
                    k2 = min(top, k + int((cast(float, now) - sh.since) / aging))
                    lifted, k = k2 > k, k2
                tag = (-k, sh.start, sh.fifos[sh.top][0]._tag[1])
                if share is None or tag < best:
                    g, share, best, aged = g1, sh, tag, lifted
            if aged:
                self.aged_dispatches += 1
            assert share is not None
            arrival = best[2]
            if any(sh.klass < share.klass and sh.fifos[sh.top][0]._tag[1] < arrival
                   for sh in shares.values()):
                self.class_overtakes += 1
        else:
            return None
        assert share is not None
        self.class_dispatches[share.klass] = self.class_dispatches.get(share.klass, 0) + 1
        fifo = share.fifos[share.top]
        job = fifo.popleft()
        if not fifo:
            self._drop_fifo(share, share.top)
        share.n -= 1
        if not share.n:
            del shares[g]
        start = share.start
        job._tag = (start, job._tag[1])
        self._vtime = start
        share.start = start + _cost(job) / share.weight
        if now is not None:
            share.since = now
        self._len -= 1
        return job

    @staticmethod
    def _drop_fifo(share: _Share, p: int) -> None:
        del share.fifos[p]
        if share.fifos and p == share.top:
            share.top = max(share.fifos)

    def remove(self, job: Job) -> bool:
        """Remove a queued job (cancellation); False if it is not queued here.
        Its guest is not charged for it."""
        g = job.guest_id
        share = self._shares.get(g)
        fifo = share.fifos.get(job.priority) if share is not None else None
        if share is None or fifo is None or job not in fifo:
            return False
        fifo.remove(job)
        if not fifo:
            self._drop_fifo(share, job.priority)
        share.n -= 1
        if not share.n:
            del self._shares[g]
        self._finish[g] = share.start if not share.n else self._finish[g] - _cost(job) / share.weight
        self._len -= 1
        return True

    def take_all(self) -> list[Job]:
        """Empty the queue, returning the jobs in dispatch order."""
        jobs = self.ordered()
        self._shares.clear()
        self._len = 0
        self._reset()
        return jobs

    def ordered(self) -> list[Job]:
        """Queued jobs in the order they would be dispatched if nothing else
        arrived; sets each one's ``_tag`` to the (start tag, arrival) it
        would be dispatched with (a guest's jobs go by priority, then FIFO,
        from the guest's next start tag on)."""
        jobs: list[tuple[int, Job]] = []
        for share in self._shares.values():
            s = share.start
            for p in sorted(share.fifos, reverse=True):
                for j in share.fifos[p]:
                    j._tag = (s, j._tag[1])
                    s += _cost(j) / share.weight
                    jobs.append((-share.klass, j))
        jobs.sort(key=lambda kj: (kj[0], kj[1]._tag))
        return [j for _, j in jobs]

    def guests(self) -> dict[int, int]:
        """Queued job count per guest."""
        return {g: share.n for g, share in self._shares.items()}

    def idle(self) -> None:
        """The accelerator went idle (nothing queued, nothing running): a new busy period
        starts from a clean virtual clock. No-op while jobs are queued."""
        if not self._len:
            self._reset()

    def _prune(self) -> None:
        """Forget the finish tags of guests with nothing queued whose tag the virtual clock
        has passed (``max(V, F_g)`` is V for them anyway): guests come and go during a
        long busy period, the table stays bounded by those still owed or owing."""
        v = self._vtime
        self._finish = {g: f for g, f in self._finish.items() if f > v or g in self._shares}

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
