"""FairQueue with job priorities (accel_core/queues.py): priority orders the
jobs *within one guest's share*; across guests the queue stays fair in
estimated accelerator time. Deterministic: jobs are pushed and popped by hand,
no threads, no clocks."""
from __future__ import annotations

import numpy as np
import pytest

from accel_core.errors import ParameterError, ParameterTypeError
from accel_core.jobs import MAX_PRIORITY, Job
from accel_core.queues import FairQueue

X = np.zeros(16, np.complex64)


def job(guest, priority=0, cost=1.0, name=None):
    j = Job.create("fft", X, guest_id=guest, priority=priority)
    j.estimate = cost
    j.result = name  # a label for the assertions (result is unused while queued)
    return j


def names(jobs):
    return [j.result for j in jobs]


def drain(q):
    out = []
    while (j := q.pop()) is not None:
        out.append(j)
    return out


def test_priority_orders_one_guests_jobs_fifo_within_a_priority():
    q = FairQueue()
    for name, p in [("a0", 0), ("b0", 0), ("c3", 3), ("d7", 7), ("e3", 3), ("f7", 7)]:
        q.push(job(1, p, name=name))
    want = ["d7", "f7", "c3", "e3", "a0", "b0"]
    assert names(q.ordered()) == want
    assert names(drain(q)) == want
    assert len(q) == 0 and q.pop() is None


def test_equal_priorities_are_plain_sfq():
    """All priority 0: what the queue did before priorities (submission order
    per guest, guests alternating by start tag)."""
    q = FairQueue()
    for i in range(3):
        q.push(job(1, name=f"g1-{i}"))
    for i in range(3):
        q.push(job(2, name=f"g2-{i}"))
    assert names(drain(q)) == ["g1-0", "g2-0", "g1-1", "g2-1", "g1-2", "g2-2"]


def test_priority_7_does_not_take_more_than_a_fair_share():
    """Guest 1 floods at priority 7, guest 2 posts at priority 0: they still
    alternate (equal costs); guest 1's priority only reorders its own jobs."""
    q = FairQueue()
    for i in range(4):
        q.push(job(1, 7, name=f"hi{i}"))
    for i in range(4):
        q.push(job(2, 0, name=f"lo{i}"))
    got = names(drain(q))
    assert got == ["hi0", "lo0", "hi1", "lo1", "hi2", "lo2", "hi3", "lo3"]


def test_fairness_is_in_cost_and_the_taken_job_pays():
    """Guest 1 queues a 3-unit bulk job then a 1-unit urgent one; guest 2 has
    1-unit jobs. Guest 1's urgent job goes first and charges 1, its bulk job
    then charges 3: guest 2 gets three jobs in before guest 1's next one."""
    q = FairQueue()
    q.push(job(1, 0, cost=3.0, name="bulk"))
    q.push(job(1, 5, cost=1.0, name="urgent"))
    q.push(job(1, 0, cost=1.0, name="after"))
    for i in range(5):
        q.push(job(2, 0, cost=1.0, name=f"g2-{i}"))
    order = names(q.ordered())
    got = names(drain(q))
    assert got == order
    # tags: urgent 0, bulk 1, after 4; g2: 0,1,2,3,4 (ties by arrival)
    assert got == ["urgent", "g2-0", "bulk", "g2-1", "g2-2", "g2-3", "after", "g2-4"]


def test_a_late_high_priority_job_overtakes_queued_ones_of_its_guest():
    q = FairQueue()
    for i in range(3):
        q.push(job(1, 0, name=f"low{i}"))
    assert q.pop().result == "low0"
    q.push(job(1, 7, name="urgent"))
    assert names(drain(q)) == ["urgent", "low1", "low2"]


def test_remove_gives_back_the_cost_and_keeps_order():
    q = FairQueue()
    a, b, c = job(1, 0, cost=5.0, name="a"), job(1, 7, name="b"), job(1, 0, name="c")
    for j in (a, b, c):
        q.push(j)
    d = job(2, 0, name="d")
    q.push(d)
    assert q.remove(a) and not q.remove(a)
    assert q.guests() == {1: 2, 2: 1}
    # guest 1 is charged b and c only (2 units): a new guest-1 job starts at 2
    assert q.start_tag(1) == 2.0
    assert names(drain(q)) == ["b", "d", "c"]
    assert q.start_tag(1) == 2.0  # empty, but the last job may still run: tags kept
    q.idle()  # the accelerator went idle: a new busy period
    assert q.start_tag(1) == 0.0


def test_remove_of_a_job_never_queued_and_take_all():
    q = FairQueue()
    stranger = job(3)
    assert not q.remove(stranger)
    for name, p in [("x", 0), ("y", 2)]:
        q.push(job(1, p, name=name))
    q.push(job(2, 1, name="z"))
    assert not q.remove(job(1, 4))  # same guest, a priority with no queue
    assert names(q.take_all()) == ["y", "z", "x"]
    assert len(q) == 0 and q.guests() == {} and q.pop() is None


@pytest.mark.parametrize("bad,err", [(-1, ParameterError), (MAX_PRIORITY + 1, ParameterError),
                                     (1.5, ParameterTypeError), (True, ParameterTypeError)])
def test_job_priority_is_checked(bad, err):
    with pytest.raises(err, match="priority"):
        Job.create("fft", X, priority=bad)
    assert Job.create("fft", X, priority=MAX_PRIORITY).priority == MAX_PRIORITY
    assert Job.create("fft", X).priority == 0


def test_a_paused_accelerator_runs_a_guests_jobs_by_priority():
    """Through the service (one worker): submitted while paused, run in the
    fair queue's order once resumed (order of t_started, no timing)."""
    from accel_core import AcceleratorService

    with AcceleratorService() as svc:
        acc = svc.accelerators[0]
        acc.pause()
        jobs = [Job.create("fft", X, guest_id=g, priority=p) for g, p in
                [(1, 0), (1, 0), (1, 7), (2, 0), (1, 7), (2, 3)]]
        for j in jobs:
            svc.submit_job(j)
        plan = acc.queued_jobs()
        acc.resume()
        for j in jobs:
            j.wait(30)
        ran = sorted(jobs, key=lambda j: j.t_started)
        assert ran == plan
        # guest 1: its two priority-7 jobs first; guest 2: priority 3 before 0; guests
        # alternate (equal costs), ties between guests going to the earlier-submitted job
        assert [jobs.index(j) for j in ran] == [2, 5, 3, 4, 0, 1]
        for j in jobs:
            np.testing.assert_allclose(j.output, np.fft.fft(X), atol=1e-6)
