"""The fair receive queue under a flood (issue #14's fairness goal, section c of
bench/accel_device_bench.py, without clocks): one guest keeps its queue full
while another submits one job at a time. A discrete-event simulation of one
worker drives accel_core.queues.FairQueue with synthetic jobs: the
one-at-a-time guest never waits for more than the job already running when
it submitted, whatever the flooder's queue depth, job cost or priority."""
from __future__ import annotations

import numpy as np
import pytest

from accel_core.jobs import Job
from accel_core.queues import FairQueue

X = np.zeros(16, np.complex64)
FLOOD, PROBE = 1, 2


def job(guest: int, cost: float, priority: int = 0) -> Job:
    j = Job.create("fft", X, guest_id=guest, priority=priority)
    j.estimate = cost
    return j


def simulate(*, depth: int, flood_cost: float, probe_cost: float, think: float, probes: int,
             flood_priority: int = 0) -> tuple[list[float], list[int], int]:
    """One worker; every job takes exactly its estimate. The flooder refills its queue to
    ``depth`` whenever a job of its finishes; the probe submits a job ``think`` after its
    previous one finished. Returns the probe's waits, how many flooder jobs ran ahead
    of each probe job, and how many flooder jobs ran in all."""
    q = FairQueue()
    now = 0.0
    for _ in range(depth):
        q.push(job(FLOOD, flood_cost, flood_priority))
    probe_at = think  # when the next probe job arrives
    pending: Job | None = None
    arrived = 0.0
    waits: list[float] = []
    ahead: list[int] = []
    flood_ran = ahead_now = 0
    while len(waits) < probes:
        nxt = q.pop()
        assert nxt is not None
        end = now + nxt.estimate
        if nxt.guest_id == PROBE:
            waits.append(now - arrived)
            ahead.append(ahead_now)
            pending = None
            probe_at = end + think
        else:
            flood_ran += 1
            if pending is not None:
                ahead_now += 1
            q.push(job(FLOOD, flood_cost, flood_priority))  # the flooder refills at once
        if pending is None and probe_at <= end:  # the probe arrives while this job runs
            pending = job(PROBE, probe_cost)
            arrived = max(probe_at, now)
            ahead_now = 0
            q.push(pending)
        now = end
    return waits, ahead, flood_ran


@pytest.mark.parametrize("flood_cost,probe_cost,flood_priority", [
    (1.0, 1.0, 0),   # the bench's case: same shape
    (3.0, 1.0, 0),   # the flooder's jobs are longer
    (1.0, 1.0, 7),   # the flooder's queue has the top priority
])
def test_a_one_at_a_time_guest_waits_for_the_running_job_only(flood_cost, probe_cost, flood_priority):
    waits, ahead, flood_ran = simulate(depth=64, flood_cost=flood_cost, probe_cost=probe_cost,
                                       think=0.35, probes=200, flood_priority=flood_priority)
    assert ahead == [0] * 200  # no queued flooder job ever went before a waiting probe job
    assert max(waits) <= flood_cost  # at most the remainder of the job running at arrival
    assert flood_ran >= 200  # and the flooder keeps the accelerator busy between probe jobs


def test_a_guest_with_longer_jobs_pays_its_own_time_back_only():
    """The probe's jobs cost 3 flooder jobs: having just used 3 units, its next job waits
    while the flooder gets its 3 (2 queued ones ahead, after the running one): fair in
    time, and the probe still gets more than half of the accelerator while it asks."""
    waits, ahead, flood_ran = simulate(depth=64, flood_cost=1.0, probe_cost=3.0, think=0.35, probes=200)
    assert max(ahead) <= 2 and max(waits) <= 3.0
    assert 200 * 3.0 / (200 * 3.0 + flood_ran) > 0.5


@pytest.mark.parametrize("depth", [1, 2, 64, 1000])
def test_the_flooders_queue_depth_does_not_matter(depth):
    waits, ahead, _ = simulate(depth=depth, flood_cost=1.0, probe_cost=1.0, think=0.1, probes=100)
    assert ahead == [0] * 100 and max(waits) <= 1.0
    # a probe that resubmits the instant its job ends is backlogged too: the two alternate
    waits, ahead, _ = simulate(depth=depth, flood_cost=1.0, probe_cost=1.0, think=0.0, probes=100)
    assert max(ahead) <= 1 and max(waits) <= 1.0


def test_two_backlogged_guests_share_in_estimated_time():
    """Both keep their queues full: each gets half the accelerator time (fair in cost, not
    in jobs: the guest with 3x longer jobs gets a third as many through)."""
    q = FairQueue()
    for _ in range(64):
        q.push(job(FLOOD, 3.0))
        q.push(job(PROBE, 1.0))
    busy = {FLOOD: 0.0, PROBE: 0.0}
    for _ in range(400):
        j = q.pop()
        assert j is not None
        busy[j.guest_id] += j.estimate
        q.push(job(j.guest_id, j.estimate))
    assert abs(busy[FLOOD] - busy[PROBE]) <= 3.0  # within one (longest) job of each other
