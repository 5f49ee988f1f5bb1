"""Accelerator.try_claim / release_claim: a unit taken for work its caller runs
itself outside a Job (the daemon's native job path), with real worker threads."""
from __future__ import annotations

import numpy as np

from accel_core import Op
from accel_core.service import Accelerator
from accel_core.jobs import Job


def _job(n=64):
    x = np.ones((1, n), np.complex64)
    return Job.create(Op.FFT, x, np.empty_like(x), collect=True)


def test_claims_use_units_and_never_overtake_queued_jobs():
    with Accelerator("a", workers=2) as acc:
        assert acc.try_claim() and acc.try_claim()
        assert not acc.try_claim()  # both units held
        acc.release_claim(Op.FFT, 3, 1e-5)
        acc.release_claim(Op.IFFT, 0, 0.0)
        acc.pause()
        assert not acc.try_claim()  # paused: no dispatch of any kind
        acc.submit(_job())
        acc.resume()
        assert acc.drain(10) and len(acc.collect()) == 1
        assert acc.try_claim()
        acc.pause()
        job = acc.submit(_job())  # queued behind the pause
        acc.resume()
        # one unit claimed, one free: a worker runs the queued job meanwhile
        assert acc.collect(timeout=10) == [job]
        ops = acc.metrics_snapshot()["ops"]["fft"]
        assert ops["inline"] == 3 and ops["completed"] == 3 + 2 and ops["submitted"] == 5
        acc.release_claim(Op.FFT, 1, 1e-6)
        assert acc.drain(10)
        assert acc.metrics_snapshot()["ops"]["fft"]["completed"] == 6


def test_a_job_submitted_while_the_only_unit_is_claimed_runs_after_release():
    with Accelerator("a", workers=1) as acc:
        assert acc.try_claim()
        job = acc.submit(_job())
        assert not acc.try_claim()  # a job is queued: no claim overtakes it
        assert not acc.drain(0.05)  # it cannot run while the unit is held, drain waits for the claim
        assert acc.queue_depth() == 1 and acc.running_count() == 0
        acc.release_claim(Op.FFT, 1, 2e-6)
        assert acc.drain(10)
        assert acc.collect() == [job]
        ops = acc.metrics_snapshot()["ops"]["fft"]
        assert ops["completed"] == 2 and ops["inline"] == 1


def test_closed_accelerator_refuses_claims():
    acc = Accelerator("a")
    acc.close()
    assert not acc.try_claim()
