"""The accelerators' receive queue with tenant classes, weights and aging
(accel_core.queues.FairQueue with a classifier), sans-I/O: jobs are plain
objects with a guest id, an estimate and a submission time; ``now`` is given."""
from __future__ import annotations

import itertools

import numpy as np

from accel_core import Job
from accel_core.queues import FairQueue


def job(guest, estimate=1.0, t=0.0, priority=0):
    j = Job.create("fft", np.zeros(64, np.complex64), guest_id=guest, priority=priority)
    j.estimate = estimate
    j.t_submitted = t
    return j


def classes(table):
    return lambda g: table[g]


def test_a_higher_class_goes_first_whatever_the_arrival_order():
    q = FairQueue(classes({1: (0, 1.0), 2: (1, 1.0), 3: (2, 1.0)}))
    for g in (1, 2, 3, 1, 2, 3):
        q.push(job(g))
    assert [q.pop(0.0).guest_id for _ in range(6)] == [3, 3, 2, 2, 1, 1]
    assert [j.guest_id for j in q.ordered()] == []


def test_class_counters():
    """class_dispatches by the served guest's class; class_overtakes: dispatches ahead
    of a lower class's job queued earlier (none once only one class waits, nor among
    equals); aged_dispatches stay 0 without aging."""
    q = FairQueue(classes({1: (0, 1.0), 2: (2, 1.0), 3: (2, 1.0)}))
    for g in (1, 1, 2, 3):
        q.push(job(g))
    assert [q.pop(0.0).guest_id for _ in range(4)] == [2, 3, 1, 1]
    assert q.class_dispatches == {2: 2, 0: 2}
    assert q.class_overtakes == 2 and q.aged_dispatches == 0
    flat = FairQueue()
    for g in (1, 2, 1, 2):
        flat.push(job(g))
    while flat.pop(0.0) is not None:
        pass
    assert flat.class_overtakes == 0 and flat.class_dispatches == {0: 4}


def test_ordered_lists_the_class_order_too():
    q = FairQueue(classes({1: (0, 1.0), 2: (2, 1.0)}))
    for g in (1, 2, 1, 2):
        q.push(job(g))
    assert [j.guest_id for j in q.ordered()] == [2, 2, 1, 1]


def test_weights_3_to_1_share_accelerator_time_3_to_1_within_a_class():
    q = FairQueue(classes({1: (1, 3.0), 2: (1, 1.0)}))
    for _ in range(400):
        q.push(job(1, 0.002))
        q.push(job(2, 0.002))
    served = {1: 0.0, 2: 0.0}
    for _ in range(400):  # both stay backlogged throughout
        j = q.pop(0.0)
        served[j.guest_id] += j.estimate
    assert abs(served[1] / served[2] - 3.0) < 0.05


def test_weights_count_time_not_jobs():
    """Weight 1 each, guest 1's jobs 4x longer: guest 2 gets 4 jobs per job of guest 1."""
    q = FairQueue(classes({1: (1, 1.0), 2: (1, 1.0)}))
    for _ in range(50):
        q.push(job(1, 4.0))
    for _ in range(200):
        q.push(job(2, 1.0))
    first = [q.pop(0.0).guest_id for _ in range(50)]
    assert 9 <= first.count(1) <= 11


def test_without_aging_a_saturating_high_tenant_starves_low():
    q = FairQueue(classes({1: (0, 1.0), 2: (2, 1.0)}), aging_seconds=0.0)
    q.push(job(1, t=0.0))
    now = 0.0
    for _ in range(100):
        q.push(job(2, t=now))
        assert q.pop(now).guest_id == 2
        now += 1.0
    assert q.aged_dispatches == 0


def test_aging_lets_a_low_tenant_progress_under_a_saturating_high_one():
    q = FairQueue(classes({1: (0, 1.0), 2: (2, 1.0)}), aging_seconds=0.5)
    for _ in range(5):
        q.push(job(1, 0.1, t=0.0))
    now, low = 0.0, []
    for i in range(100):
        q.push(job(2, 0.1, t=now))  # high always has a job waiting
        j = q.pop(now)
        if j.guest_id == 1:
            low.append(i)
        now += 0.1
    assert len(low) == 5  # every low job ran
    # one class per 0.5 s waited: it takes 1 s (2 classes) between low jobs, so ~1 in 10 dispatches
    gaps = [b - a for a, b in itertools.pairwise(low)]
    assert all(8 <= g <= 12 for g in gaps), gaps
    assert q.aged_dispatches == 5


def test_aging_does_not_lift_a_tenant_that_was_just_served():
    q = FairQueue(classes({1: (0, 1.0), 2: (2, 1.0)}), aging_seconds=10.0)
    q.push(job(1, t=0.0))
    q.push(job(2, t=0.0))
    assert q.pop(5.0).guest_id == 2  # low waited 5 s < 10 s
    q.push(job(2, t=5.0))
    assert q.pop(25.0).guest_id == 1  # 25 s: lifted two classes
    assert q.aged_dispatches == 1


def test_a_broken_classifier_does_not_lose_jobs():
    def classify(g):
        raise RuntimeError("boom")

    q = FairQueue(classify)
    q.push(job(1))
    q.push(job(2))
    assert sorted(q.pop(0.0).guest_id for _ in range(2)) == [1, 2]
    assert len(q) == 0


def test_priority_within_a_guest_still_orders_its_own_jobs():
    q = FairQueue(classes({1: (1, 1.0)}))
    q.push(job(1, priority=0))
    urgent = job(1, priority=7)
    q.push(urgent)
    assert q.pop(0.0) is urgent
