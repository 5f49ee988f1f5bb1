"""The accelerator service's device path: inline jobs, bursts, queue bounds, spinning workers,
the emulated slowdown and the online service-time model.

Real kernels and real worker threads; no timed assertions. The online model
is tested on synthetic samples (deterministic), the slowdown through the
counters it keeps (the delay it adds is computed from the kernel time it
measured, so their ratio is exact).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from accel_core import (AccelError, Accelerator, AcceleratorService, Job, JobRejected, JobState, ModelError, Op,
                        ServiceClosed, ServiceTimeModel, turbo_encode)
from accel_core.estimate import LinearCost, OnlineFit, features
from accel_core.jobs import JobParams
from accel_core.service import QueueFull

RNG = np.random.default_rng(20261204)


def flat_model(seconds: float = 1e-3, *, online: bool = False) -> ServiceTimeModel:
    keys = [f"{op}/{dt}" for op in ("fft", "ifft") for dt in ("complex64", "complex128")]
    keys += ["turbo_encode", "turbo_decode"]
    return ServiceTimeModel({k: LinearCost(seconds, (0.0,)) for k in keys}, calibrated=False, online=online)


def bits(*shape: int) -> np.ndarray:
    return RNG.integers(0, 2, shape, dtype=np.uint8)


def cplx(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex64)


def op_stats(acc: Accelerator, op: str) -> dict:
    return acc.stats()["ops"][op]


# --------------------------------------------------------------------------- inline jobs


def test_small_job_runs_inline_when_idle_and_lands_on_the_ready_queue():
    notified: list[str] = []
    with Accelerator("a", model=flat_model(1e-4), inline_max_seconds=1e-3,
                     ready_notify=lambda acc: notified.append(threading.current_thread().name)) as acc:
        x = cplx(1, 2048)
        out = np.empty_like(x)
        job = acc.submit(Job.create(Op.FFT, x, out, collect=True))
        # Finished before submit returned, in this thread: no handoff to a worker.
        assert job.state is JobState.DONE and job.future.done() and job.wait(0) is job
        assert notified == [threading.current_thread().name]
        assert acc.collect() == [job]
        np.testing.assert_allclose(out, np.fft.fft(x), rtol=1e-4, atol=1e-3)
        s = op_stats(acc, "fft")
        assert (s["submitted"], s["completed"], s["inline"]) == (1, 1, 1)
        assert s["kernel_seconds"] > 0.0 and s["delay_seconds"] == 0.0


def test_inline_only_when_it_cannot_overtake_or_exceed_the_threshold():
    with Accelerator("a", model=flat_model(1e-3), inline_max_seconds=5e-4) as acc:
        big = acc.submit(Job.create(Op.TURBO_ENCODE, bits(40)))  # estimate 1 ms > 0.5 ms: a worker runs it
        big.wait(30)
    assert op_stats(acc, "turbo_encode")["inline"] == 0
    with Accelerator("a", model=flat_model(1e-4), inline_max_seconds=5e-4) as acc:
        acc.pause()
        queued = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40))) for _ in range(2)]
        assert [j.state for j in queued] == [JobState.QUEUED] * 2  # paused: nothing runs inline
        acc.resume()
        for j in queued:
            j.wait(30)
        assert op_stats(acc, "turbo_encode")["inline"] == 0
        assert acc.submit(Job.create(Op.TURBO_ENCODE, bits(40))).state is JobState.DONE
        assert op_stats(acc, "turbo_encode")["inline"] == 1


def test_job_cancelled_before_submit_ends_cancelled_on_the_inline_path():
    with Accelerator("a", model=flat_model(1e-4), inline_max_seconds=1e-3) as acc:
        job = Job.create(Op.TURBO_ENCODE, bits(40), collect=True)
        assert job.future.cancel()  # the caller gave up on it before submitting
        acc.submit(job)
        assert job.state is JobState.CANCELLED
        assert acc.collect() == [job]  # still delivered: the daemon writes an error completion
        s = op_stats(acc, "turbo_encode")
        assert (s["cancelled"], s["completed"], s["inline"]) == (1, 0, 0)


def test_inline_kernel_error_fails_the_job_not_the_caller():
    with Accelerator("a", model=flat_model(1e-4), inline_max_seconds=1e-3) as acc:
        bad = bits(40)
        job = Job.create(Op.TURBO_ENCODE, bad, collect=True)
        bad[3] = 7  # guest memory changed after validation: the kernel's value check catches it
        acc.submit(job)
        assert job.state is JobState.FAILED and job.error is not None
        assert acc.collect() == [job]
        assert op_stats(acc, "turbo_encode")["failed"] == 1


# --------------------------------------------------------------------------- bursts and queue bounds


def test_submit_burst_takes_what_fits_and_counts_queue_full():
    with Accelerator("a", model=flat_model(), max_queued=5) as acc:
        acc.pause()
        infos = [bits(64) for _ in range(8)]
        jobs = [Job.create(Op.TURBO_ENCODE, b, guest_id=i % 3, collect=True) for i, b in enumerate(infos)]
        assert acc.submit_burst(jobs) == 5
        assert [j.state for j in jobs] == [JobState.QUEUED] * 5 + [JobState.NEW] * 3
        assert acc.queue_depth() == 5
        with pytest.raises(QueueFull, match="max_queued=5") as e:
            acc.submit(jobs[5])
        assert isinstance(e.value, JobRejected) and jobs[5].state is JobState.NEW
        assert acc.submit_burst(jobs[5:]) == 0
        assert op_stats(acc, "turbo_encode")["queue_full"] == 3
        acc.resume()
        done: list[Job] = []
        while len(done) < 5:
            done += acc.collect(timeout=30)
        assert acc.submit_burst(jobs[5:]) == 3  # room again
        while len(done) < 8:
            done += acc.collect(timeout=30)
    assert sorted(j.id for j in done) == list(range(8))
    for j, b in zip(jobs, infos, strict=True):
        assert j.state is JobState.DONE
        np.testing.assert_array_equal(j.output, turbo_encode(b))
    s = op_stats(acc, "turbo_encode")
    assert (s["submitted"], s["completed"], s["queue_full"]) == (8, 8, 3)
    assert not acc._shape_of  # nothing kept per job once delivered


def test_nothing_kept_per_job_after_cancel_close_or_failure():
    acc = Accelerator("a", model=flat_model(1e-4), inline_max_seconds=1e-3)
    late = Job.create(Op.TURBO_ENCODE, bits(40))
    late.future.cancel()
    acc.submit(late)  # cancelled on the inline path
    bad = bits(40)
    failed = Job.create(Op.TURBO_ENCODE, bad)
    bad[0] = 9
    acc.submit(failed)  # fails inline
    acc.pause()
    queued = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40))) for _ in range(3)]
    assert queued[0].cancel()
    assert len(acc._shape_of) == 2
    assert acc.close() == queued[1:]
    assert not acc._shape_of
    assert failed.state is JobState.FAILED and late.state is JobState.CANCELLED


def test_submit_burst_stops_at_a_job_it_cannot_take():
    with Accelerator("turbo", ops=["turbo_encode"], model=flat_model()) as acc:
        acc.pause()
        ok = [Job.create(Op.TURBO_ENCODE, bits(40)) for _ in range(2)]
        wrong = Job.create(Op.FFT, cplx(1, 256))
        after = Job.create(Op.TURBO_ENCODE, bits(40))
        assert acc.submit_burst([*ok, wrong, after]) == 2
        assert wrong.state is JobState.NEW and after.state is JobState.NEW
        assert op_stats(acc, "fft")["rejected"] == 1
        assert acc.submit_burst([ok[0], after]) == 0  # already queued: not NEW
        assert acc.submit_burst([]) == 0
        acc.resume()
        for j in ok:
            j.wait(30)
    with pytest.raises(ServiceClosed):
        acc.submit_burst([after])


def test_service_submit_burst_and_cancel_of_burst_jobs():
    with AcceleratorService(workers=2, model=flat_model()) as svc:
        acc = svc.accelerator("accel0")
        acc.pause()
        jobs = [Job.create(Op.TURBO_ENCODE, bits(40), guest_id=i) for i in range(6)]
        assert svc.submit_burst(jobs) == 6
        assert jobs[4].cancel() and jobs[4].state is JobState.CANCELLED
        assert acc.queue_depth() == 5
        acc.resume()
        for j in jobs[:4] + jobs[5:]:
            assert j.wait(30).state is JobState.DONE
        assert svc.submit_burst([]) == 0
    assert acc.stats()["total"]["cancelled"] == 1
    with pytest.raises(ServiceClosed):
        svc.submit_burst([Job.create(Op.TURBO_ENCODE, bits(40))])


@pytest.mark.parametrize("spin", [0.0, 1e-3])
def test_many_submitters_bursts_complete_exactly_once(spin):
    """4 submitter threads x bursts, collected through the ready queue by a fifth thread."""
    with AcceleratorService(workers=2, spin_seconds=spin) as svc:
        acc = svc.accelerator("accel0")
        per, bursts, size = 4, 5, 8
        total = per * bursts * size
        got: list[Job] = []

        def collector() -> None:
            while len(got) < total:
                got.extend(acc.collect(timeout=30))

        def submitter(g: int) -> None:
            for _ in range(bursts):
                jobs = [Job.create(Op.FFT, cplx(2, 256), guest_id=g, collect=True) for _ in range(size)]
                assert svc.submit_burst(jobs) == size

        c = threading.Thread(target=collector)
        c.start()
        subs = [threading.Thread(target=submitter, args=(g,)) for g in range(per)]
        for t in subs:
            t.start()
        for t in subs:
            t.join()
        c.join(60)
        assert not c.is_alive()
    assert len(got) == total and len({id(j) for j in got}) == total
    assert all(j.state is JobState.DONE for j in got)
    for j in got[:8]:
        np.testing.assert_allclose(j.output, np.fft.fft(j.input), rtol=1e-4, atol=1e-3)
    s = acc.stats()["ops"]["fft"]
    assert (s["submitted"], s["completed"], s["queue_full"]) == (total, total, 0)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, match", [
    ({"slowdown": 0.5}, "slowdown"),
    ({"slowdown": float("nan")}, "slowdown"),
    ({"slowdown": True}, "slowdown"),
    ({"inline_max_seconds": -1e-6}, "inline_max_seconds"),
    ({"spin_seconds": 2.0}, "spin_seconds"),
    ({"max_queued": 0}, "max_queued"),
    ({"max_queued": 1.5}, "max_queued"),
])
def test_bad_options_rejected_naming_the_value(kwargs, match):
    with pytest.raises(AccelError, match=match):
        Accelerator("a", **kwargs)


def test_slowdown_adds_its_share_of_the_measured_kernel_time():
    with Accelerator("slow", slowdown=3.0, model=flat_model(online=True)) as acc:
        jobs = [acc.submit(Job.create(Op.FFT, cplx(4, 2048))) for _ in range(4)]
        for j in jobs:
            j.wait(30)
        s = op_stats(acc, "fft")
    assert s["completed"] == 4 and s["kernel_seconds"] > 0.0
    # 2x the shape's reference kernel time each (tests/accel/test_estimate.py pins it down)
    assert s["delay_seconds"] > 0.0
    assert s["busy_seconds"] >= s["kernel_seconds"] + s["delay_seconds"]  # wall clock covers both
    assert acc.model.online is not None and acc.model.online.samples("fft/complex64") == 4


def test_slow_accelerator_workers_sleep_with_a_fine_timer_slack():
    """An emulated slow accelerator's workers wait out each job's delay in one sleep with
    their timer slack at FINE_TIMER_SLACK_NS (the kernel's own figure, read from
    /proc/<tid>/timerslack_ns); a full-speed accelerator's workers keep the default."""
    import os
    import time

    from accel_core import service

    def of(tid):
        with open(f"/proc/{tid}/timerslack_ns") as f:
            return int(f.read())

    if not os.path.exists(f"/proc/{threading.get_native_id()}/timerslack_ns"):
        pytest.skip("no /proc/<tid>/timerslack_ns on this kernel")

    def slack(acc):
        deadline = time.monotonic() + 10
        while True:  # the worker sets it as it starts
            ids = [t.native_id for t in acc._threads]
            vals = {of(tid) for tid in ids}
            if vals == {service.FINE_TIMER_SLACK_NS} or time.monotonic() > deadline:
                return vals
            time.sleep(0.01)

    own = of(threading.get_native_id())
    with Accelerator("slow", slowdown=2.0, workers=2, model=flat_model(online=True)) as acc:
        assert slack(acc) == {service.FINE_TIMER_SLACK_NS}
        job = acc.submit(Job.create(Op.FFT, cplx(1, 256)))
        job.wait(30)
        assert job.state is JobState.DONE and op_stats(acc, "fft")["delay_seconds"] > 0.0
    with Accelerator("fast", model=flat_model(online=True)) as acc:
        tids = [t.native_id for t in acc._threads]
        assert {of(tid) for tid in tids} == {own}


# --------------------------------------------------------------------------- online model


def _params(n: int = 2048, batch: int = 1) -> JobParams:
    return JobParams(batch=batch, n=n, dtype=np.dtype(np.complex64))


def test_online_fit_converges_and_tracks_a_changed_speed():
    model = flat_model(1e-3, online=True)
    p = _params()
    assert model.estimate_params(Op.FFT, p) == pytest.approx(1e-3)
    for _ in range(200):  # the accelerator turns out 3x slower than calibrated
        model.observe(Op.FFT, p, 3e-3)
    assert model.estimate_params(Op.FFT, p) == pytest.approx(3e-3, rel=0.05)
    assert model.base_estimate(Op.FFT, p) == pytest.approx(1e-3)  # the fit itself is untouched
    for _ in range(200):  # then speeds back up (the slowdown emulation removed)
        model.observe(Op.FFT, p, 1e-3)
    assert model.estimate_params(Op.FFT, p) == pytest.approx(1e-3, rel=0.05)


def test_online_fit_minimises_mean_absolute_relative_error_on_jittery_samples():
    model = flat_model(1e-3, online=True)
    p = _params()
    rng = np.random.default_rng(3)
    samples = 2e-3 * np.exp(rng.normal(0.0, 0.15, 4000))
    samples[::50] *= 20  # a stalled job now and then
    errs = []
    for m in samples:
        e = model.estimate_params(Op.FFT, p)
        errs.append(abs(e - m) / m)
        model.observe(Op.FFT, p, float(m))
    tail = samples[2000:]
    best = min(float(np.mean(np.abs(e - tail) / tail)) for e in tail)  # best constant, chosen afterwards
    ours = float(np.mean(errs[2000:]))
    assert ours <= best * 1.1, (ours, best)
    assert model.estimate_params(Op.FFT, p) == pytest.approx(2e-3, rel=0.15)


def test_online_fit_per_size_class_with_the_key_for_unseen_sizes():
    model = flat_model(1e-3, online=True)
    small, large, unseen = _params(256), _params(2048, 16), _params(4096, 2)
    for _ in range(50):
        model.observe(Op.FFT, small, 4e-3)   # small jobs cost 4x the fit in the service
        model.observe(Op.FFT, large, 1e-3)   # large ones as calibrated
    assert model.estimate_params(Op.FFT, small) == pytest.approx(4e-3, rel=0.05)
    assert model.estimate_params(Op.FFT, large) == pytest.approx(1e-3, rel=0.05)
    key_factor = model.estimate_params(Op.FFT, unseen) / 1e-3
    assert 1.0 < key_factor < 4.0  # an unseen size gets the operation's overall correction
    assert model.estimate_params(Op.IFFT, small) == pytest.approx(1e-3)  # other keys untouched
    online = model.online
    assert online is not None and online.samples("fft/complex64", features(Op.FFT, small)) == 50
    assert online.snapshot()["fft/complex64"]["samples"] == 100
    online.observe("fft/complex64", features(Op.FFT, small), 1e-3, float("nan"))  # ignored
    online.observe("fft/complex64", features(Op.FFT, small), 1e-3, -1.0)
    assert online.samples("fft/complex64", features(Op.FFT, small)) == 50


def test_online_fit_tracks_a_bounded_number_of_shapes():
    from accel_core.estimate import ONLINE_MAX_CLASSES

    online = OnlineFit()
    for i in range(ONLINE_MAX_CLASSES + 10):  # a guest cycling through batch sizes
        online.observe("fft/complex64", (float(i),), 1.0, 2.0)
    assert len(online._cls) == ONLINE_MAX_CLASSES
    assert online.samples("fft/complex64") == ONLINE_MAX_CLASSES + 10  # the key still learns
    assert online.factor("fft/complex64", (-1.0,)) == pytest.approx(2.0, rel=0.05)


def test_online_fit_ignores_one_stalled_sample():
    online = OnlineFit()
    f = (1.0,)
    for _ in range(10):
        online.observe("k", f, 1.0, 1.0)
    online.observe("k", f, 1.0, 1e4)  # a job stalled for ages
    assert online.factor("k", f) == pytest.approx(1.0)


def test_fixed_model_and_bad_online_settings():
    model = flat_model(1e-3)  # explicit costs: fixed unless asked
    p = _params()
    model.observe(Op.FFT, p, 5e-3)
    assert model.online is None and model.estimate_params(Op.FFT, p) == 1e-3
    assert ServiceTimeModel.nominal().online is not None
    for kwargs in ({"window": 0}, {"window": 2.0}, {"max_ratio": 1.0}, {"warmup": 0}, {"warmup": True}):
        with pytest.raises(ModelError):
            OnlineFit(**kwargs)
