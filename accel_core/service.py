"""The accelerator service: shared FFT / Turbo accelerators with queues and workers.

Software stand-in for a pool of FPGA accelerator cards shared by guests. An
:class:`AcceleratorService` holds one or more :class:`Accelerator` s; each has

* a **receive queue** of submitted jobs, fair across guests in estimated
  accelerator time (:class:`accel_core.queues.FairQueue`);
* a **worker pool** of threads running the Cython kernels, which release the
  GIL, so N workers really use N cores;
* a **ready queue** of finished jobs waiting to be collected (jobs submitted
  with ``collect=True``: the completion path of the backend daemon), with a
  notifier hook to wake an event loop. Every job also resolves its
  ``concurrent.futures.Future`` (``asyncio.wrap_future`` adapts it).

The per-job path is kept short for the device (the daemon submits with
``collect=True`` and drains the ready queue on the notifier, never touching
futures): a finishing worker records the job and takes the next one in one
lock round trip; idle workers are woken only when some worker sleeps;
:meth:`Accelerator.submit_burst` queues many jobs under one lock, bbdev
style (non-blocking, returns how many it took, counts queue-full);
``inline_max_seconds`` lets :meth:`Accelerator.submit` run a small job in
the caller's thread when the accelerator is idle (DPDK's software bbdev
devices do the work inside enqueue: no thread handoff, the completion still
goes to the ready queue and the future); ``spin_seconds`` keeps an idle
worker polling briefly before it sleeps. ``slowdown`` emulates a slower
accelerator: after each kernel the worker waits ``(slowdown - 1) x`` the
kernel's time for the job's shape (one sleep, with the worker thread's
timer slack at 1 us). That time is a steady reference of the shape's measured kernel
times (:class:`accel_core.estimate.ReferenceTimes`: a low quantile, the
kernel undisturbed), not the one job's: a kernel that took 5 times its usual
time because the host's other vCPU was busy would otherwise stretch an
emulated 20-times-slower job by 100 times its usual time, a jitter no
hardware accelerator has and one that every job queued behind it inherits.

Each job carries a service-time estimate from a :class:`ServiceTimeModel`, so
an accelerator can say how much work it has queued
(:meth:`Accelerator.queued_work_seconds`) and when a job -- queued, or only
proposed -- would finish (:meth:`Accelerator.estimated_completion`), which the
cluster scheduler compares with 2 x transfer + remote processing time.

No global state: everything lives in the service object, which has an explicit
lifecycle (RUNNING -> CLOSING -> CLOSED), is thread-safe, idempotently
closeable and a context manager. ``close()`` cancels the jobs still queued
(their futures raise CancelledError; they are counted and returned, never lost
silently) or, with ``cancel_pending=False``, finishes them first; running
kernels always finish; worker threads are joined.
"""
from __future__ import annotations

import enum
import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from accel_core.errors import AccelError, JobRejected, ParameterError, ServiceClosed, UnsupportedOperation
from accel_core.estimate import ReferenceTimes, ServiceTimeModel, Shape
from accel_core.jobs import Job, JobState, Op, execute
from accel_core.metrics import AcceleratorMetrics
from accel_core.queues import Classifier, FairQueue, ReadyQueue

log = logging.getLogger(__name__)

ALL_OPS = frozenset(Op)
JOB_PARAMETERS = frozenset({"n", "dtype", "k", "batch", "iterations", "scaling", "early_stop", "collect"})
MAX_WORKERS = 64
MAX_SLOWDOWN = 1000.0
_thread_time = time.thread_time


class QueueFull(JobRejected):
    """The receive queue holds ``max_queued`` jobs; try again after collecting."""


class AcceleratorState(enum.Enum):
    RUNNING = "running"    # accepting and running jobs
    CLOSING = "closing"    # no new jobs; workers finish (or cancel) the rest, then exit
    CLOSED = "closed"      # workers joined


ACCELERATOR_TRANSITIONS = {
    AcceleratorState.RUNNING: frozenset({AcceleratorState.CLOSING}),
    AcceleratorState.CLOSING: frozenset({AcceleratorState.CLOSED}),
    AcceleratorState.CLOSED: frozenset(),
}


def _parse_ops(ops: Iterable[Op | str] | None) -> frozenset[Op]:
    if ops is None:
        return ALL_OPS
    parsed = frozenset(Op.parse(o) for o in ops)
    if not parsed:
        raise AccelError("an accelerator must serve at least one operation")
    return parsed


def _check_seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise AccelError(f"{what} must be a number of seconds in [0, 1], got {value!r}")
    return float(value)


def _delay_until(deadline: float, clock: Callable[[], float]) -> None:
    """Wait until ``deadline`` in one sleep: the GIL is given up and taken back once. (Yielding
    it in a loop of ``sleep(0)`` until the deadline took it back once per turn, and each
    time waited for a thread running Python -- the daemon's loop serving a flooding guest
    -- up to the interpreter's switch interval: an emulated 150 us job took milliseconds.
    The worker's timer slack, :func:`_fine_timer_slack`, keeps the sleep close to it.)"""
    left = deadline - clock()
    if left > 0.0:
        time.sleep(left)


PR_SET_TIMERSLACK = 29  # prctl(2)
FINE_TIMER_SLACK_NS = 1000


def _fine_timer_slack() -> None:
    """The calling thread's timer slack to FINE_TIMER_SLACK_NS (Linux; elsewhere nothing): a
    sleep of an emulated slow accelerator ends within microseconds of its deadline, not the
    default 50 us after it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, FINE_TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _remaining(job: Job, now: float) -> float:
    """Predicted seconds until a RUNNING job finishes (its estimate minus the time it has run)."""
    return max(0.0, job.estimate - (now - cast(float, job.t_started)))


class Accelerator:
    """One shared accelerator: receive queue, worker threads, ready queue.

    Threads start in the constructor and stop in :meth:`close`.
    ``ready_notify(accelerator)`` is called outside any lock whenever a
    ``collect=True`` job lands on the ready queue: from a worker thread, or
    from the submitting thread for a job run inline (``inline_max_seconds``).

    Options: ``slowdown`` >= 1 emulates a slower accelerator;
    ``inline_max_seconds`` (0 = never) runs small jobs in the submitter when
    idle; ``spin_seconds`` (0 = never) keeps idle workers polling before they
    sleep; ``max_queued`` bounds the receive queue (``QueueFull``, counted).
    """

    def __init__(self, name: str, *, ops: Iterable[Op | str] | None = None, workers: int = 1,
                 model: ServiceTimeModel | None = None,
                 ready_notify: Callable[[Accelerator], None] | None = None,
                 slowdown: float = 1.0, inline_max_seconds: float = 0.0, spin_seconds: float = 0.0,
                 max_queued: int | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise AccelError(f"workers must be an integer in 1..{MAX_WORKERS}, got {workers!r}")
        if (isinstance(slowdown, bool) or not isinstance(slowdown, (int, float))
                or not 1.0 <= slowdown <= MAX_SLOWDOWN):
            raise AccelError(f"slowdown must be a number in [1, {MAX_SLOWDOWN:g}], got {slowdown!r}")
        if max_queued is not None and (isinstance(max_queued, bool) or not isinstance(max_queued, int)
                                       or max_queued < 1):
            raise AccelError(f"max_queued must be None or an integer >= 1, got {max_queued!r}")
        self.name = str(name)
        self.ops = _parse_ops(ops)
        self.workers = workers
        self.slowdown = float(slowdown)
        self.inline_max_seconds = _check_seconds(inline_max_seconds, "inline_max_seconds")
        self.spin_seconds = _check_seconds(spin_seconds, "spin_seconds")
        self.max_queued = max_queued
        self.model = model if model is not None else ServiceTimeModel.nominal()
        self.metrics = AcceleratorMetrics()
        self._clock = time.perf_counter
        self._t_start = self._clock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)   # workers wait for jobs
        self._idle = threading.Condition(self._lock)   # drain() waits for empty + idle
        self._queue = FairQueue()
        self._running: dict[Job, None] = {}
        self._claimed = 0        # units taken by try_claim() for work run outside a Job
        self._shape_of: dict[Job, Shape] = {}  # submitted, not yet delivered: the model's handle
        self._kernel_ref = ReferenceTimes()  # per shape: the kernel time a slowdown multiplies
        self._seq = 0
        self._live = workers
        self._sleeping = 0       # workers blocked in _work.wait(): only then does submit notify
        self._draining = 0       # drain() callers blocked in _idle.wait(): only then is _idle signalled
        self._paused = False
        self._state = AcceleratorState.RUNNING
        self._ready = ReadyQueue(None if ready_notify is None else (lambda: ready_notify(self)))
        self._threads = [threading.Thread(target=self._worker, name=f"vrdma-accel-{self.name}-{i}",
                                          daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> AcceleratorState:
        return self._state

    def _set_state(self, new: AcceleratorState) -> None:
        if new not in ACCELERATOR_TRANSITIONS[self._state]:
            raise AccelError(f"accelerator {self.name}: illegal transition "
                             f"{self._state.value} -> {new.value}")
        self._state = new

    def close(self, *, cancel_pending: bool = True) -> list[Job]:
        """Stop accepting jobs, cancel (default) or finish the queued ones, join the workers.

        Returns the jobs cancelled by this call. Idempotent and safe from any
        thread. Called from a worker thread (a job's done-callback) it only
        signals the workers and returns without joining (two workers closing
        each other would deadlock); state becomes CLOSED when the last worker
        exits, and a later close() from another thread joins them.
        """
        cancelled: list[Job] = []
        with self._lock:
            if self._state is AcceleratorState.RUNNING:
                self._set_state(AcceleratorState.CLOSING)
                if cancel_pending:
                    now = self._clock()
                    cancelled = self._queue.take_all()
                    for job in cancelled:
                        job._transition(JobState.CANCELLED, now)
                        self.metrics.on_cancel(job)
                self._paused = False
                self._work.notify_all()
                self._idle.notify_all()
        self._deliver_cancelled(cancelled)
        if threading.current_thread() not in self._threads:
            for t in self._threads:
                t.join()
        if cancelled:
            log.info("accelerator %s closed with %d queued jobs cancelled", self.name, len(cancelled))
        return cancelled

    def __enter__(self) -> Accelerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_inline(self, max_seconds: float) -> None:
        """Set ``inline_max_seconds`` of a running accelerator (0 = never inline): its
        owner, e.g. the daemon's router, decides whether its submitting thread may run
        small jobs itself."""
        value = _check_seconds(max_seconds, "inline_max_seconds")
        with self._lock:
            self.inline_max_seconds = value

    def try_claim(self) -> bool:
        """Take a free unit for work the caller runs itself, outside a Job (the
        daemon's native job path: small jobs run in its loop thread, DPDK
        software-bbdev style). Only when running, not paused, nothing queued (a
        claim never overtakes a queued job) and a unit is free; pair with
        :meth:`release_claim`."""
        with self._lock:
            if (self._state is not AcceleratorState.RUNNING or self._paused or len(self._queue)
                    or len(self._running) + self._claimed >= self.workers):
                return False
            self._claimed += 1
            return True

    def release_claim(self, op: Op, jobs: int, seconds: float) -> None:
        """Give back a unit of :meth:`try_claim` after running ``jobs`` jobs of ``op``
        in ``seconds`` (counted as submitted, completed, inline and busy)."""
        with self._lock:
            self._claimed -= 1
            if jobs:
                c = self.metrics.ops[op]
                c.submitted += jobs
                c.completed += jobs
                c.inline += jobs
                c.queue_wait_buckets[0] += jobs  # run at once: no queue wait
                c.busy_seconds += seconds
                c.kernel_seconds += seconds
            if len(self._queue):  # submitted while the unit was claimed: a worker takes it now
                if self._sleeping:
                    self._work.notify()
            elif self._draining and not self._running and not self._claimed:
                self._idle.notify_all()

    def pause(self) -> None:
        """Stop dispatching queued jobs (running ones finish); submit still queues."""
        with self._lock:
            if self._state is AcceleratorState.RUNNING:
                self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._work.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the receive queue is empty and no job runs; False on timeout or if paused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while len(self._queue) or self._running or self._claimed:
                if self._paused and not self._running and not self._claimed:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._draining += 1
                try:
                    self._idle.wait(remaining)
                finally:
                    self._draining -= 1
        return True

    # ------------------------------------------------------------------ submitting

    def _check_job(self, job: Job) -> None:
        if job.op not in self.ops:
            with self._lock:
                self.metrics.on_reject(job.op)
            raise UnsupportedOperation(
                f"accelerator {self.name} does not serve {job.op.value} "
                f"(serves {', '.join(sorted(o.value for o in self.ops))})")
        if job.state is not JobState.NEW:
            raise JobRejected(f"job {job.id} is {job.state.value}; only a new job can be submitted")

    def _enqueue(self, job: Job, shape: Shape, estimate: float, now: float, *, push: bool = True) -> None:
        """Queue one checked job (under the lock); ``push=False`` when it is dispatched at once
        from an empty queue (pushing and popping it would leave the fair queue as it was)."""
        self._shape_of[job] = shape
        job.estimate = estimate
        job.id = self._seq
        self._seq += 1
        job.accelerator = self.name
        job._transition(JobState.QUEUED, now)
        if push:
            self._queue.push(job)
        self.metrics.on_submit(job)

    def submit(self, job: Job) -> Job:
        """Queue a NEW job; returns it. Raises UnsupportedOperation, ServiceClosed, JobRejected
        (QueueFull when ``max_queued`` jobs wait).

        With ``inline_max_seconds`` > 0, a job estimated at most that long runs
        here, in the caller's thread, when nothing is queued, dispatch is not
        paused and a worker slot is free: it returns finished (its future
        resolved, a ``collect=True`` job on the ready queue).
        """
        self._check_job(job)
        shape = self.model.shape(job.op, job.params)
        estimate = self.model.estimate_shape(shape)
        inline = late = False
        with self._lock:
            if self._state is not AcceleratorState.RUNNING:
                raise ServiceClosed(f"accelerator {self.name} is {self._state.value}")
            qlen = len(self._queue)
            if self.max_queued is not None and qlen >= self.max_queued:
                self.metrics.on_queue_full(job.op)
                raise QueueFull(f"accelerator {self.name}: receive queue full "
                                f"({qlen} of max_queued={self.max_queued} jobs)")
            now = self._clock()
            if (estimate <= self.inline_max_seconds and not qlen and not self._paused
                    and len(self._running) + self._claimed < self.workers):
                self._enqueue(job, shape, estimate, now, push=False)
                inline = self._start(job, now)
                late = not inline
                if inline:
                    self.metrics.on_inline(job)
            else:
                self._enqueue(job, shape, estimate, now)
                if self._sleeping:
                    self._work.notify()
        if inline:
            self._finish(job, *self._run(job))
        elif late:  # its future was cancelled before submit (Job.cancel() refuses a NEW job)
            self._deliver_late([job])
        else:
            # Only a queued job needs cancelling through its future. Added after queueing: a
            # future cancelled before this runs the callback at once (removing the job here), and
            # one cancelled before dispatch is caught by the dispatcher either way.
            job.future.add_done_callback(functools.partial(self._on_future_done, job))
        return job

    def submit_burst(self, jobs: Sequence[Job]) -> int:
        """Queue as many of ``jobs`` as possible, in order, under one lock; never blocks.

        Returns how many were taken (the first ones). The burst stops at a full
        receive queue (counted as ``queue_full``) or at a job this accelerator
        cannot take (another operation: counted ``rejected``; not NEW); the
        caller learns why by submitting that job alone. Raises ServiceClosed
        if the accelerator is not running. No job of a burst runs inline.
        """
        model = self.model
        ok: list[tuple[Job, Shape, float]] = []
        for job in jobs:
            if job.op not in self.ops or job.state is not JobState.NEW:
                break
            shape = model.shape(job.op, job.params)
            ok.append((job, shape, model.estimate_shape(shape)))
        stopped_by = jobs[len(ok)] if len(ok) < len(jobs) else None
        taken = 0
        with self._lock:
            if self._state is not AcceleratorState.RUNNING:
                raise ServiceClosed(f"accelerator {self.name} is {self._state.value}")
            room = len(ok) if self.max_queued is None else max(0, self.max_queued - len(self._queue))
            now = self._clock()
            for job, shape, estimate in ok[:room]:
                self._enqueue(job, shape, estimate, now)
                taken += 1
            if taken < len(ok):
                self.metrics.on_queue_full(ok[taken][0].op)
            elif stopped_by is not None and stopped_by.op not in self.ops:
                self.metrics.on_reject(stopped_by.op)
            if taken and self._sleeping:
                self._work.notify(min(taken, self._sleeping))
        for job, _, _ in ok[:taken]:
            job.future.add_done_callback(functools.partial(self._on_future_done, job))
        return taken

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job; False if it already started or finished."""
        with self._lock:
            if job.state is not JobState.QUEUED or not self._queue.remove(job):
                return False
            if not self._running:
                self._queue.idle()
            job._transition(JobState.CANCELLED, self._clock())
            self.metrics.on_cancel(job)
            if self._draining and not len(self._queue) and not self._running:
                self._idle.notify_all()
        self._deliver_cancelled([job])
        return True

    def _deliver_cancelled(self, jobs: list[Job]) -> None:
        """Resolve cancelled jobs' futures and hand collect=True ones to the ready queue."""
        for job in jobs:
            self._shape_of.pop(job, None)
            if job.collect:
                self._ready.put(job)
            job.future.cancel()

    def _on_future_done(self, job: Job, fut) -> None:
        if fut.cancelled():  # cancelled through job.cancel() / job.future.cancel()
            self.cancel(job)

    # ------------------------------------------------------------------ collecting

    def collect(self, max_jobs: int | None = None, timeout: float | None = 0.0) -> list[Job]:
        """Take finished ``collect=True`` jobs from the ready queue (see ReadyQueue.collect)."""
        return self._ready.collect(max_jobs, timeout)

    def set_ready_notifier(self, fn: Callable[[Accelerator], None] | None) -> None:
        self._ready.set_notifier(None if fn is None else (lambda: fn(self)))

    def set_classifier(self, classify: Classifier | None, aging_seconds: float = 0.0) -> None:
        """Tenant classes and weights for the receive queue (:class:`FairQueue`):
        ``classify(guest_id) -> (class, weight)``, read at each job's push."""
        with self._lock:
            self._queue.set_classifier(classify, aging_seconds)

    @property
    def aged_dispatches(self) -> int:
        """Jobs dispatched ahead of a higher class because their guest had waited (aging)."""
        return self._queue.aged_dispatches

    # ------------------------------------------------------------------ load and estimates

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def ready_depth(self) -> int:
        return len(self._ready)

    def queued_jobs(self) -> list[Job]:
        """Queued jobs in dispatch order."""
        with self._lock:
            return self._queue.ordered()

    def queued_work_seconds(self) -> float:
        """Estimated seconds of work held: queued estimates + what remains of running ones."""
        with self._lock:
            now = self._clock()
            queued = sum(j.estimate for j in self._queue.ordered())
            running = sum(_remaining(j, now) for j in self._running)
            return queued + running

    def estimated_completion(self, job: Job) -> float:
        """Predicted seconds from now until ``job`` finishes here.

        ``job`` may be queued here, running, finished (0.0) or NEW -- a job
        not submitted yet, placed where the fair queue would put it. The
        prediction replays dispatch order over the workers with the model's
        estimates (paused dispatch is ignored; later arrivals may overtake).
        """
        if job.state is JobState.NEW:
            if job.op not in self.ops:
                raise UnsupportedOperation(f"accelerator {self.name} does not serve {job.op.value}")
            own = self.model.estimate(job)
        else:
            own = job.estimate
        with self._lock:
            now = self._clock()
            if job.state.finished:
                return 0.0
            if job.state is JobState.RUNNING:
                return _remaining(job, now)
            free = [_remaining(j, now) for j in self._running]
            free += [0.0] * max(0, self.workers - len(free))
            heapq.heapify(free)
            order = self._queue.ordered()
            if job.state is JobState.NEW:
                tag = (self._queue.start_tag(job.guest_id), float("inf"))
                order = [j for j in order if j._tag <= tag] + [job] + [j for j in order if j._tag > tag]
            elif job.accelerator != self.name or job not in order:
                raise AccelError(f"job {job.id} is not queued on accelerator {self.name}")
            for j in order:
                start = heapq.heappop(free)
                end = start + (own if j is job else j.estimate)
                if j is job:
                    return end
                heapq.heappush(free, end)
        raise AssertionError("unreachable")  # pragma: no cover

    def estimated_wait(self, job: Job) -> float:
        """Predicted seconds from now until ``job`` would start (completion minus its own estimate)."""
        own = self.model.estimate(job) if job.state is JobState.NEW else job.estimate
        if job.state is not JobState.NEW and job.state is not JobState.QUEUED:
            return 0.0
        return max(0.0, self.estimated_completion(job) - own)

    def stats(self) -> dict:
        snap = self.metrics_snapshot()
        snap.update({"name": self.name, "workers": self.workers, "state": self._state.value,
                     "serves": sorted(o.value for o in self.ops)})
        return snap

    def metrics_snapshot(self) -> dict:
        with self._lock:
            snap = self.metrics.snapshot()
            snap["queue_depth"] = len(self._queue)
            snap["running"] = len(self._running)
            uptime = self._clock() - self._t_start
            snap["uptime_seconds"] = uptime
            q = self._queue
            snap["class_dispatches"] = dict(q.class_dispatches)
            snap["class_overtakes"] = q.class_overtakes
            snap["aged_dispatches"] = q.aged_dispatches
            snap["utilization"] = (snap["total"]["busy_seconds"] / (uptime * self.workers)
                                   if uptime > 0 else 0.0)
        snap["ready_depth"] = len(self._ready)
        return snap

    # ------------------------------------------------------------------ workers

    def _start(self, job: Job, now: float) -> bool:
        """Dispatch a popped job (under the lock): RUNNING and True, or CANCELLED (its future
        was cancelled just before dispatch) and False -- the caller then delivers it."""
        if job.future.set_running_or_notify_cancel():
            job._transition(JobState.RUNNING, now)
            self._running[job] = None
            return True
        job._transition(JobState.CANCELLED, now)
        self.metrics.on_cancel(job)
        return False

    def _pop_ready(self) -> tuple[Job | None, list[Job]]:
        """Under the lock: the next job to run (or None), plus late-cancelled jobs to deliver."""
        late: list[Job] = []
        while (not self._paused and len(self._queue) and len(self._running) + self._claimed < self.workers):
            job = cast(Job, self._queue.pop(self._clock()))
            if self._start(job, self._clock()):
                return job, late
            late.append(job)
        return None, late

    def _deliver_late(self, late: list[Job]) -> None:
        for job in late:
            self._shape_of.pop(job, None)
            if job.collect:
                self._ready.put(job)

    def _next_job(self) -> Job | None:
        """Block until a job may run (returned RUNNING) or the worker must exit (None)."""
        spin_until = self._clock() + self.spin_seconds if self.spin_seconds else 0.0
        while True:
            with self._lock:
                while True:
                    job, late = self._pop_ready()
                    if job is not None or late:
                        break
                    if self._state is not AcceleratorState.RUNNING and not len(self._queue):
                        self._live -= 1
                        if not self._live:
                            self._set_state(AcceleratorState.CLOSED)
                        return None
                    if self._draining and not len(self._queue) and not self._running:
                        self._idle.notify_all()
                    if spin_until and self._clock() < spin_until:
                        break  # poll again after yielding the GIL, without sleeping on the condition
                    self._sleeping += 1
                    try:
                        self._work.wait()
                    finally:
                        self._sleeping -= 1
            self._deliver_late(late)
            if job is not None:
                return job
            if spin_until and not late:
                time.sleep(0)

    def _run(self, job: Job) -> tuple[Any, BaseException | None, float, float]:
        """Run the kernel (no lock held): (result, error, kernel seconds, emulated delay seconds).

        The kernel's seconds are the running thread's CPU time over the call
        (the kernels are single-threaded): the accelerator's own time, without
        the wait to take the GIL back after the kernel released it, nor time
        the host took the CPU away -- neither would happen on a real card, and
        either can add milliseconds to a microsecond job. ``job.t_started`` /
        ``t_finished`` stay wall-clock.
        """
        error: BaseException | None = None
        result = None
        clock = self._clock
        c0 = _thread_time()
        job.t_started = clock()  # service time is the kernel's (+ slowdown), not the dispatch's
        try:
            result = execute(job)
        except Exception as e:  # the kernel's validation or a bug: the job fails, the worker lives
            error = e
        t1 = clock()
        kernel = _thread_time() - c0
        delay = 0.0
        if self.slowdown > 1.0:
            shape = self._shape_of.get(job)
            ref = kernel if shape is None else self._kernel_ref.update((shape[0], shape[1]), kernel)
            delay = (self.slowdown - 1.0) * ref
            _delay_until(t1 + delay, clock)
        return result, error, kernel, delay

    def _record(self, job: Job, result: Any, error: BaseException | None, kernel: float, delay: float
                ) -> None:
        """Finish a RUNNING job's bookkeeping (under the lock)."""
        now = self._clock()
        del self._running[job]
        if not self._running:
            self._queue.idle()  # the end of a busy period if nothing is queued either
        job.accel_seconds = kernel + delay
        if error is None:
            job.result = result
            job._transition(JobState.DONE, now)
        else:
            job.error = error
            job._transition(JobState.FAILED, now)
        self.metrics.on_finish(job, kernel, delay)

    def _deliver(self, job: Job, accel_seconds: float) -> None:
        """Hand a finished job over (no lock held): model, future, ready queue."""
        error = job.error
        shape = self._shape_of.pop(job, None)
        if error is None and shape is not None:
            self.model.observe_shape(shape, accel_seconds)
        else:
            log.debug("job %s failed: %s", job, error)
        if error is None:
            job.future.set_result(job)
        else:
            job.future.set_exception(error)
        if job.collect:  # last: the collector it wakes then finds this thread nearly done with the GIL
            self._ready.put(job)

    def _finish(self, job: Job, result: Any, error: BaseException | None, kernel: float, delay: float
                ) -> None:
        """Finish a job run outside a worker (inline): record, wake a worker if work waits, deliver."""
        with self._lock:
            self._record(job, result, error, kernel, delay)
            if len(self._queue):
                if self._sleeping:
                    self._work.notify()
            elif self._draining and not self._running:
                self._idle.notify_all()
        self._deliver(job, kernel + delay)

    def _worker(self) -> None:
        if self.slowdown > 1.0:
            _fine_timer_slack()
        job = self._next_job()
        while job is not None:
            outcome = self._run(job)
            with self._lock:  # one lock round trip: record this job, take the next if one waits
                self._record(job, *outcome)
                nxt, late = self._pop_ready()
                if nxt is None and self._draining and not len(self._queue) and not self._running:
                    self._idle.notify_all()
            self._deliver(job, outcome[2] + outcome[3])
            self._deliver_late(late)
            job = nxt if nxt is not None else self._next_job()

    def __repr__(self) -> str:
        return (f"<Accelerator {self.name} {self._state.value} workers={self.workers} "
                f"queued={len(self._queue)} running={len(self._running)}>")


@dataclass(frozen=True)
class AcceleratorSpec:
    """Configuration of one accelerator of a service."""

    name: str
    ops: frozenset[Op] = field(default=ALL_OPS)
    workers: int = 1
    slowdown: float = 1.0            # emulate an accelerator this many times slower
    inline_max_seconds: float = 0.0  # run jobs estimated at most this long in the submitter when idle
    spin_seconds: float = 0.0        # an idle worker polls this long before sleeping
    max_queued: int | None = None    # receive-queue bound (None: unbounded)


class AcceleratorService:
    """A set of accelerators sharing one service-time model.

    ``AcceleratorService()`` gives one accelerator ``accel0`` serving every
    operation with one worker; pass ``workers=`` or a list of
    :class:`AcceleratorSpec` for more. ``submit()`` validates the job, then
    queues it on the named accelerator or, by default, on the one serving the
    operation that predicts the earliest completion.
    """

    def __init__(self, accelerators: Sequence[AcceleratorSpec] | None = None, *, workers: int = 1,
                 model: ServiceTimeModel | None = None,
                 ready_notify: Callable[[Accelerator], None] | None = None,
                 slowdown: float = 1.0, inline_max_seconds: float = 0.0, spin_seconds: float = 0.0,
                 max_queued: int | None = None) -> None:
        self.model = model if model is not None else ServiceTimeModel.nominal()
        self._ready_notify = ready_notify
        self._lock = threading.Lock()
        self._accels: dict[str, Accelerator] = {}
        self._by_op: dict[Op, tuple[Accelerator, ...]] = {}
        self._closed = False
        self._rejected: dict[str, int] = {}
        specs = (list(accelerators) if accelerators is not None
                 else [AcceleratorSpec("accel0", workers=workers, slowdown=slowdown,
                                       inline_max_seconds=inline_max_seconds, spin_seconds=spin_seconds,
                                       max_queued=max_queued)])
        try:
            for spec in specs:
                self.add_accelerator(spec.name, ops=spec.ops, workers=spec.workers, slowdown=spec.slowdown,
                                     inline_max_seconds=spec.inline_max_seconds,
                                     spin_seconds=spec.spin_seconds, max_queued=spec.max_queued)
        except BaseException:
            self.close()
            raise

    def set_classifier(self, classify: Classifier | None, aging_seconds: float = 0.0) -> None:
        """Tenant classes, weights and aging on every accelerator's receive queue
        (``classify(guest_id) -> (class, weight)``; see :class:`FairQueue`)."""
        for a in self.accelerators:
            a.set_classifier(classify, aging_seconds)

    def add_accelerator(self, name: str, *, ops: Iterable[Op | str] | None = None, workers: int = 1,
                        **options: Any) -> Accelerator:
        """Add an accelerator; ``options`` are :class:`Accelerator`'s (slowdown, inline_max_seconds,
        spin_seconds, max_queued)."""
        with self._lock:
            if self._closed:
                raise ServiceClosed("accelerator service is closed")
            if name in self._accels:
                raise AccelError(f"accelerator {name!r} already exists")
            acc = Accelerator(name, ops=ops, workers=workers, model=self.model,
                              ready_notify=self._ready_notify, **options)
            self._accels[name] = acc
            self._by_op = {op: tuple(a for a in self._accels.values() if op in a.ops) for op in Op}
            return acc

    @property
    def accelerators(self) -> tuple[Accelerator, ...]:
        with self._lock:
            return tuple(self._accels.values())

    def accelerator(self, name: str) -> Accelerator:
        with self._lock:
            try:
                return self._accels[name]
            except KeyError:
                raise AccelError(f"no accelerator named {name!r} (have {sorted(self._accels)})") from None

    def serving(self, op: Op | str) -> tuple[Accelerator, ...]:
        """The accelerators serving ``op``, in creation order."""
        return self._by_op.get(Op.parse(op), ())

    def submit(self, op: Op | str, input: Any, output: Any = None, *, guest_id: int = 0,
               accelerator: str | None = None, **params: Any) -> Job:
        """Create (validate) and queue a job; see :meth:`Job.create` for the parameters."""
        try:
            unknown = sorted(params.keys() - JOB_PARAMETERS) if params else None
            if unknown:
                raise ParameterError(f"unknown job parameter(s) {', '.join(unknown)}; "
                                     f"known: {', '.join(sorted(JOB_PARAMETERS))}", argument=unknown[0])
            job = Job.create(op, input, output, guest_id=guest_id, **params)
        except JobRejected:
            key = op.value if isinstance(op, Op) else str(op)
            with self._lock:
                self._rejected[key] = self._rejected.get(key, 0) + 1
            raise
        return self.submit_job(job, accelerator=accelerator)

    def submit_job(self, job: Job, *, accelerator: str | None = None) -> Job:
        if self._closed:
            raise ServiceClosed("accelerator service is closed")
        acc = self.accelerator(accelerator) if accelerator is not None else self.choose(job)
        return acc.submit(job)

    def submit_burst(self, jobs: Sequence[Job], *, accelerator: str | None = None) -> int:
        """Queue NEW jobs on one accelerator (named, or chosen for the first job); returns how
        many were taken -- see :meth:`Accelerator.submit_burst`."""
        if self._closed:
            raise ServiceClosed("accelerator service is closed")
        if not jobs:
            return 0
        acc = self.accelerator(accelerator) if accelerator is not None else self.choose(jobs[0])
        return acc.submit_burst(jobs)

    def choose(self, job: Job) -> Accelerator:
        """The accelerator serving ``job.op`` that predicts the earliest completion."""
        cands = self.serving(job.op)
        if not cands:
            raise UnsupportedOperation(f"no accelerator of this service serves {job.op.value}")
        if len(cands) == 1:
            return cands[0]
        return min(cands, key=lambda a: a.estimated_completion(job))

    def estimated_completion(self, job: Job) -> tuple[Accelerator, float]:
        """Where a NEW job would run and the predicted seconds until it finishes there."""
        acc = self.choose(job)
        return acc, acc.estimated_completion(job)

    def queued_work_seconds(self) -> float:
        return sum(a.queued_work_seconds() for a in self.accelerators)

    def metrics(self) -> dict:
        with self._lock:
            rejected = dict(self._rejected)
        return {"accelerators": {a.name: a.stats() for a in self.accelerators},
                "rejected_at_create": rejected}

    def close(self, *, cancel_pending: bool = True) -> list[Job]:
        """Close every accelerator (see :meth:`Accelerator.close`); returns the cancelled jobs."""
        with self._lock:
            self._closed = True
            accels = list(self._accels.values())
        cancelled: list[Job] = []
        for acc in accels:
            cancelled.extend(acc.close(cancel_pending=cancel_pending))
        return cancelled

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AcceleratorService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AcceleratorService {'closed' if self._closed else 'open'} {list(self._accels)}>"
