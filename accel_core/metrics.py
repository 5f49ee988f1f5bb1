"""Accelerator metrics: counters per operation, busy time, estimate error.

One :class:`AcceleratorMetrics` per accelerator, updated by its owner under the
owner's lock (this class does no locking of its own). ``snapshot()`` returns a
plain dict for logs, JSON and tests:

* per operation: submitted / completed / failed / cancelled / rejected jobs,
  queue_full refusals (a submit or burst stopped by ``max_queued``), jobs run
  inline in the submitter's thread, busy seconds (service time: kernel plus
  any emulated slowdown), kernel seconds, emulated-delay seconds, queue-wait
  seconds;
* estimate accuracy over completed jobs, measured service time (the
  accelerator's: kernel CPU time plus emulated delay, see
  ``Accelerator._run``) vs the estimate made at submit: count, mean ratio
  measured/estimated, geometric mean ratio, mean and max absolute relative
  error ``|est - measured| / measured``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from accel_core.jobs import Job, JobState, Op

#: upper bounds (seconds) of the queue-wait histogram's buckets; a last bucket takes the rest
QUEUE_WAIT_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
                      5.0)


@dataclass
class _EstimateStats:
    count: int = 0
    sum_ratio: float = 0.0
    sum_log_ratio: float = 0.0
    sum_abs_rel: float = 0.0
    max_abs_rel: float = 0.0

    def add(self, measured: float, estimated: float) -> None:
        if estimated <= 0.0 or measured <= 0.0:
            return
        ratio = measured / estimated
        self.count += 1
        self.sum_ratio += ratio
        self.sum_log_ratio += math.log(ratio)
        rel = abs(estimated - measured) / measured  # relative to the measured time (the goal's)
        self.sum_abs_rel += rel
        self.max_abs_rel = max(self.max_abs_rel, rel)

    def merge(self, other: _EstimateStats) -> None:
        self.count += other.count
        self.sum_ratio += other.sum_ratio
        self.sum_log_ratio += other.sum_log_ratio
        self.sum_abs_rel += other.sum_abs_rel
        self.max_abs_rel = max(self.max_abs_rel, other.max_abs_rel)

    def as_dict(self) -> dict:
        n = self.count
        return {
            "count": n,
            "mean_ratio": self.sum_ratio / n if n else None,
            "geomean_ratio": math.exp(self.sum_log_ratio / n) if n else None,
            "mean_abs_rel_error": self.sum_abs_rel / n if n else None,
            "max_abs_rel_error": self.max_abs_rel if n else None,
        }


@dataclass
class _OpCounters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    queue_full: int = 0
    inline: int = 0
    busy_seconds: float = 0.0
    kernel_seconds: float = 0.0
    delay_seconds: float = 0.0
    queue_wait_seconds: float = 0.0
    #: finished jobs per queue-wait bucket (QUEUE_WAIT_BUCKETS, then the rest)
    queue_wait_buckets: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_WAIT_BUCKETS) + 1))
    estimate: _EstimateStats = field(default_factory=_EstimateStats)

    def as_dict(self) -> dict:
        return {
            "submitted": self.submitted, "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled, "rejected": self.rejected,
            "queue_full": self.queue_full, "inline": self.inline,
            "busy_seconds": self.busy_seconds, "kernel_seconds": self.kernel_seconds,
            "delay_seconds": self.delay_seconds, "queue_wait_seconds": self.queue_wait_seconds,
            "queue_wait_buckets": list(self.queue_wait_buckets), "estimate": self.estimate.as_dict(),
        }


class AcceleratorMetrics:
    """Counters of one accelerator (the owner serializes updates)."""

    def __init__(self) -> None:
        self.ops: dict[Op, _OpCounters] = {op: _OpCounters() for op in Op}

    def on_submit(self, job: Job) -> None:
        self.ops[job.op].submitted += 1

    def on_reject(self, op: Op) -> None:
        self.ops[op].rejected += 1

    def on_cancel(self, job: Job) -> None:
        self.ops[job.op].cancelled += 1

    def on_queue_full(self, op: Op) -> None:
        self.ops[op].queue_full += 1

    def on_inline(self, job: Job) -> None:
        self.ops[job.op].inline += 1

    def on_finish(self, job: Job, kernel_seconds: float = 0.0, delay_seconds: float = 0.0) -> None:
        """A job left RUNNING; ``delay_seconds`` is the emulated slowdown inside its service time."""
        c = self.ops[job.op]
        c.kernel_seconds += kernel_seconds
        c.delay_seconds += delay_seconds
        if job.state is JobState.DONE:
            c.completed += 1
        else:
            c.failed += 1
        service = job.service_time or 0.0
        c.busy_seconds += service
        wait = job.queue_wait or 0.0
        c.queue_wait_seconds += wait
        c.queue_wait_buckets[bisect.bisect_left(QUEUE_WAIT_BUCKETS, wait)] += 1
        if job.state is JobState.DONE:
            # The accelerator's time when the owner measured it (kernel CPU time + emulated
            # delay), else the job's wall-clock service time.
            c.estimate.add(kernel_seconds + delay_seconds if kernel_seconds > 0.0 else service, job.estimate)

    def snapshot(self) -> dict:
        total = _OpCounters()
        for c in self.ops.values():
            total.submitted += c.submitted
            total.completed += c.completed
            total.failed += c.failed
            total.cancelled += c.cancelled
            total.rejected += c.rejected
            total.queue_full += c.queue_full
            total.inline += c.inline
            total.busy_seconds += c.busy_seconds
            total.kernel_seconds += c.kernel_seconds
            total.delay_seconds += c.delay_seconds
            total.queue_wait_seconds += c.queue_wait_seconds
            total.queue_wait_buckets = [a + b for a, b in zip(total.queue_wait_buckets, c.queue_wait_buckets,
                                                              strict=True)]
            total.estimate.merge(c.estimate)
        return {"ops": {op.value: c.as_dict() for op, c in self.ops.items()}, "total": total.as_dict()}
