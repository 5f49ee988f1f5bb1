"""Accelerator service: real FFT / Turbo kernels through queues and worker threads.

No timed assertions: ordering is checked on a paused accelerator (dispatch
order is then fully determined by the fair queue), estimates with generous
factors or relative comparisons only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import numpy as np
import pytest

from accel_core import (AccelError, Accelerator, AcceleratorService, AcceleratorSpec, AcceleratorState, Job,
                        JobRejected, JobState, ModelError, Op, ServiceClosed, ServiceTimeModel,
                        UnsupportedOperation, turbo_encode)
from accel_core.estimate import FORMAT_VERSION, LinearCost, fit_linear, work_units
from accel_core.dft import FFTPlan, fft, ifft
from accel_core.errors import (BlockSizeError, DtypeError, ElementError, InvalidInput, LayoutError, ParameterError,
                               ParameterTypeError, ShapeError, UnsupportedSize)
from accel_core.turbo import turbo_decode
from accel_core.jobs import JobParams
from tests.accel.typed import raises_exactly

RNG = np.random.default_rng(20261122)


def flat_model(seconds: float = 1e-3) -> ServiceTimeModel:
    """Every job costs ``seconds``: makes tags and predictions exact for ordering tests."""
    keys = [f"{op}/{dt}" for op in ("fft", "ifft") for dt in ("complex64", "complex128")]
    keys += ["turbo_encode", "turbo_decode"]
    return ServiceTimeModel({k: LinearCost(seconds, (0.0,)) for k in keys}, calibrated=False)


def bits(*shape: int) -> np.ndarray:
    return RNG.integers(0, 2, shape, dtype=np.uint8)


def noiseless_llr(coded: np.ndarray, amplitude: float = 4.0) -> np.ndarray:
    return ((1.0 - 2.0 * coded.astype(np.float32)) * amplitude).astype(np.float32)


def cplx(shape, dtype) -> np.ndarray:
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


TOL = {np.complex64: 1e-5, np.complex128: 1e-12}


# --------------------------------------------------------------------------- correct results


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("n", [128, 1536, 2048])
def test_fft_and_ifft_through_service_match_numpy(dtype, n):
    x = cplx((4, n), dtype)
    with AcceleratorService(workers=2) as svc:
        fwd = svc.submit(Op.FFT, x, guest_id=3)
        inv = svc.submit("ifft", x)
        assert fwd.wait(30) is fwd and inv.wait(30) is inv
    assert fwd.state is JobState.DONE and fwd.error is None
    assert fwd.output.dtype == dtype and fwd.output.shape == x.shape
    assert rel_err(fwd.output, np.fft.fft(x.astype(np.complex128))) <= TOL[dtype] * 10
    assert rel_err(inv.output, np.fft.ifft(x.astype(np.complex128))) <= TOL[dtype] * 10
    assert fwd.t_submitted <= fwd.t_started <= fwd.t_finished
    assert fwd.params == JobParams(batch=4, n=n, dtype=np.dtype(dtype))


def test_fft_zero_copy_over_guest_buffers_and_in_place():
    n, batch = 256, 3
    x = cplx((batch, n), np.complex64)
    guest_in = bytearray(x.tobytes())       # stands in for mapped guest memory
    guest_out = bytearray(x.nbytes)
    with AcceleratorService() as svc:
        job = svc.submit(Op.FFT, memoryview(guest_in), memoryview(guest_out), n=n, dtype=np.complex64)
        job.wait(30)
        assert job.params.batch == batch
        assert np.shares_memory(job.output, np.frombuffer(guest_out, np.uint8))
        got = np.frombuffer(guest_out, np.complex64).reshape(batch, n)
        assert rel_err(got, np.fft.fft(x.astype(np.complex128))) <= 1e-4
        y = x.copy()
        inplace = svc.submit(Op.IFFT, y, y)
        inplace.wait(30)
        assert inplace.output is y
        assert rel_err(y, np.fft.ifft(x.astype(np.complex128))) <= 1e-4


def test_turbo_encode_decode_round_trip_through_service():
    k = 1024
    info = bits(5, k)
    out = np.zeros((5, 3, k + 4), np.uint8)
    with AcceleratorService(workers=2) as svc:
        enc = svc.submit(Op.TURBO_ENCODE, info, out, guest_id=1)
        enc.wait(30)
        assert enc.output is out
        np.testing.assert_array_equal(out, turbo_encode(info))
        dec = svc.submit(Op.TURBO_DECODE, noiseless_llr(out), iterations=2, scaling=0.75, guest_id=1)
        dec.wait(30)
    np.testing.assert_array_equal(dec.output, info)
    assert list(dec.result) == [2] * 5
    one = Job.create(Op.TURBO_DECODE, noiseless_llr(out[0]), iterations=1)
    assert one.output.shape == (k,)


def test_single_block_jobs_match_direct_calls():
    k = 40
    info = bits(k)
    with AcceleratorService() as svc:
        enc = svc.submit(Op.TURBO_ENCODE, info)
        enc.wait(30)
        llr = noiseless_llr(enc.output, amplitude=0.5)
        dec = svc.submit(Op.TURBO_DECODE, llr, iterations=3, early_stop="crc24b")
        dec.wait(30)
    assert enc.output.shape == (3, k + 4)
    np.testing.assert_array_equal(enc.output, turbo_encode(info))
    ref_bits, ref_iters = turbo_decode(llr, iterations=3, early_stop="crc24b")
    assert dec.output.shape == (k,)
    np.testing.assert_array_equal(dec.output, ref_bits)
    assert type(dec.result) is int and dec.result == ref_iters


def test_job_pins_a_guest_mapping_until_released():
    import gc
    import mmap

    n = 512
    x = cplx((2, n), np.complex128)
    region = mmap.mmap(-1, x.nbytes)  # anonymous shared mapping standing in for guest RAM
    with AcceleratorService() as svc:
        job = svc.submit(Op.FFT, x, memoryview(region), n=n, dtype=np.complex128)
        job.wait(30)
    got = np.frombuffer(region, np.complex128).reshape(2, n).copy()
    assert rel_err(got, np.fft.fft(x)) <= 1e-11
    with pytest.raises(BufferError):  # the job's output view still exports the mapping: no unmap under it
        region.close()
    del job
    gc.collect()
    region.close()


def test_turbo_decode_into_guest_buffer_with_early_stop():
    from accel_core import attach_crc24a

    k = 6144
    info = np.stack([attach_crc24a(bits(k - 24)) for _ in range(2)])
    llr = noiseless_llr(turbo_encode(info))
    guest_out = bytearray(2 * k)
    with AcceleratorService() as svc:
        job = svc.submit("turbo_decode", memoryview(llr.tobytes()), memoryview(guest_out), k=k, iterations=8,
                         early_stop="crc24a")
        job.wait(60)
    np.testing.assert_array_equal(np.frombuffer(guest_out, np.uint8).reshape(2, k), info)
    assert all(1 <= it < 8 for it in job.result)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_submitters_all_complete_correctly():
    k = 256
    per_thread, threads = 12, 4
    results: list[tuple[np.ndarray, Job]] = []
    lock = threading.Lock()
    with AcceleratorService(workers=2) as svc:
        def submitter(guest: int) -> None:
            for _ in range(per_thread):
                info = bits(2, k)
                job = svc.submit(Op.TURBO_ENCODE, info, guest_id=guest)
                with lock:
                    results.append((info, job))

        ts = [threading.Thread(target=submitter, args=(g,)) for g in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        concurrent.futures.wait([j.future for _, j in results], timeout=60)
        snap = svc.metrics()["accelerators"]["accel0"]
    assert len(results) == per_thread * threads
    for info, job in results:
        assert job.state is JobState.DONE
        np.testing.assert_array_equal(job.output, turbo_encode(info))
    enc = snap["ops"]["turbo_encode"]
    assert enc["submitted"] == enc["completed"] == per_thread * threads
    assert enc["failed"] == enc["cancelled"] == 0
    assert snap["queue_depth"] == 0 and snap["running"] == 0
    assert len({job.id for _, job in results}) == len(results)


def test_two_workers_run_jobs_in_parallel_threads():
    seen: set[str] = set()
    lock = threading.Lock()

    def record(job: Job) -> None:
        with lock:
            seen.add(threading.current_thread().name)

    with AcceleratorService(workers=2) as svc:
        acc = svc.accelerator("accel0")
        acc.pause()
        jobs = [svc.submit(Op.TURBO_DECODE, noiseless_llr(turbo_encode(bits(16, 6144))), iterations=4)
                for _ in range(4)]
        for j in jobs:
            j.add_done_callback(record)
        acc.resume()
        assert acc.drain(60)
    assert all(j.state is JobState.DONE for j in jobs)
    assert seen <= {"vrdma-accel-accel0-0", "vrdma-accel-accel0-1"} and seen


# --------------------------------------------------------------------------- ordering and fairness


def _dispatch_order(acc: Accelerator, jobs: list[Job]) -> list[Job]:
    order: list[Job] = []
    for j in jobs:
        j.add_done_callback(order.append)  # one worker: callbacks run in dispatch order
    acc.resume()
    assert acc.drain(60)
    return order


def test_fifo_per_guest_and_round_robin_between_equal_guests():
    with Accelerator("a", workers=1, model=flat_model()) as acc:
        acc.pause()
        a = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=1)) for _ in range(5)]
        b = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=2)) for _ in range(2)]
        c = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=3))]
        assert acc.queued_jobs() == [a[0], b[0], c[0], a[1], b[1], a[2], a[3], a[4]]
        order = _dispatch_order(acc, a + b + c)
    assert order == [a[0], b[0], c[0], a[1], b[1], a[2], a[3], a[4]]
    assert [j.id for j in a] == sorted(j.id for j in a)


def test_fairness_is_in_accelerator_time_not_job_count():
    # Guest 1 submits decode jobs estimated 4x longer than guest 2's encode jobs.
    model = flat_model(1e-3)
    model.costs["turbo_decode"] = LinearCost(4e-3, (0.0,))
    llr = noiseless_llr(turbo_encode(bits(40)))
    with Accelerator("a", workers=1, model=model) as acc:
        acc.pause()
        big = [acc.submit(Job.create(Op.TURBO_DECODE, llr, iterations=1, guest_id=1)) for _ in range(3)]
        small = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=2)) for _ in range(8)]
        order = _dispatch_order(acc, big + small)
    # Start tags: big 0, 4, 8 ms; small 0, 1, ..., 7 ms -> four small jobs per big one.
    assert order == [big[0], small[0], small[1], small[2], small[3], big[1],
                     small[4], small[5], small[6], small[7], big[2]]


def test_new_guest_is_not_stuck_behind_a_backlog():
    with Accelerator("a", workers=1, model=flat_model()) as acc:
        acc.pause()
        backlog = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=7)) for _ in range(20)]
        late = acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=8))
        order = _dispatch_order(acc, backlog + [late])
    assert order.index(late) == 1


# --------------------------------------------------------------------------- load and estimates


def test_queued_work_seconds_follows_queue_contents():
    model = flat_model(2e-3)
    with Accelerator("a", workers=1, model=model) as acc:
        assert acc.queued_work_seconds() == 0.0
        acc.pause()
        seen = [acc.queued_work_seconds()]
        jobs = []
        for i in range(6):
            jobs.append(acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=i % 2)))
            seen.append(acc.queued_work_seconds())
        assert all(b > a for a, b in zip(seen, seen[1:]))
        assert seen[-1] == pytest.approx(6 * 2e-3)
        assert jobs[3].cancel() and jobs[3].state is JobState.CANCELLED
        assert acc.queued_work_seconds() == pytest.approx(5 * 2e-3)
        acc.resume()
        assert acc.drain(60)
        assert acc.queued_work_seconds() == 0.0


def test_estimated_completion_replays_dispatch_over_workers():
    e = 1e-3
    with Accelerator("a", workers=2, model=flat_model(e)) as acc:
        acc.pause()
        a = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=1)) for _ in range(4)]
        assert [acc.estimated_completion(j) for j in a] == pytest.approx([e, e, 2 * e, 2 * e])
        assert acc.estimated_wait(a[3]) == pytest.approx(e)
        # A proposed (not submitted) job: same guest goes last, a new guest right after a[0].
        same = Job.create(Op.TURBO_ENCODE, bits(40), guest_id=1)
        other = Job.create(Op.TURBO_ENCODE, bits(40), guest_id=2)
        assert acc.estimated_completion(same) == pytest.approx(3 * e)
        assert acc.estimated_completion(other) == pytest.approx(e)
        assert same.state is JobState.NEW and acc.queue_depth() == 4
        acc.resume()
        assert acc.drain(60)
        assert acc.estimated_completion(a[0]) == 0.0
        assert acc.estimated_completion(same) == pytest.approx(e)


def test_service_places_jobs_on_the_least_loaded_accelerator():
    specs = [AcceleratorSpec("x", workers=1), AcceleratorSpec("y", workers=1)]
    with AcceleratorService(specs, model=flat_model()) as svc:
        x, y = svc.accelerator("x"), svc.accelerator("y")
        x.pause()
        y.pause()
        jobs = [svc.submit(Op.TURBO_ENCODE, bits(40), guest_id=1) for _ in range(6)]
        assert x.queue_depth() == 3 and y.queue_depth() == 3
        pinned = svc.submit(Op.TURBO_ENCODE, bits(40), accelerator="x")
        assert pinned.accelerator == "x"
        acc, wait = svc.estimated_completion(Job.create(Op.TURBO_ENCODE, bits(40), guest_id=1))
        assert acc is y and wait == pytest.approx(4e-3)
        x.resume()
        y.resume()
        assert x.drain(60) and y.drain(60)
    assert all(j.state is JobState.DONE for j in jobs)


def test_accelerator_serving_a_subset_of_ops():
    specs = [AcceleratorSpec("turbo", ops=frozenset({Op.TURBO_ENCODE, Op.TURBO_DECODE}))]
    with AcceleratorService(specs) as svc:
        with pytest.raises(UnsupportedOperation, match="fft"):
            svc.submit(Op.FFT, cplx((1, 256), np.complex64))
        with pytest.raises(UnsupportedOperation, match="does not serve fft"):
            svc.accelerator("turbo").submit(Job.create(Op.FFT, cplx((1, 256), np.complex64)))
        assert svc.submit(Op.TURBO_ENCODE, bits(40)).wait(30).state is JobState.DONE
        assert svc.metrics()["accelerators"]["turbo"]["ops"]["fft"]["rejected"] == 1


# --------------------------------------------------------------------------- service-time model


def test_fit_linear_recovers_coefficients_and_clamps():
    w = np.array([1e3, 1e4, 1e5, 1e6])
    cost = fit_linear(w, 5e-6 + 2e-9 * w)
    assert cost.a == pytest.approx(5e-6, rel=1e-6) and cost.b[0] == pytest.approx(2e-9, rel=1e-6)
    assert cost.rms_rel_error < 1e-9
    assert cost(1e6) == pytest.approx(5e-6 + 2e-3)
    clamped = fit_linear(w, 1e-9 * w - 1e-7)  # negative intercept: refit through the origin
    assert clamped.a == 0.0 and clamped.b[0] > 0
    # Two features, one of which does not matter: its coefficient is clamped to zero, not negative.
    X = np.array([[1e3, 1e3], [1e4, 1e3], [1e5, 2e4], [1e6, 2e4], [2e6, 4e4]])
    two = fit_linear(X, 1e-5 + 3e-9 * X[:, 0])
    assert two.b[0] == pytest.approx(3e-9, rel=1e-6) and two.b[1] == pytest.approx(0.0, abs=1e-15)
    assert min(two.b) >= 0 and two.a == pytest.approx(1e-5, rel=1e-6)
    with pytest.raises(ModelError):
        fit_linear([1.0], [1.0])
    with pytest.raises(ModelError):
        fit_linear([1.0, 2.0], [0.0, 1.0])


def test_work_units_follow_the_cost_model():
    # batch * N * passes(N): 2048 = 8*8*8*4 (4 passes), 1200 = 4*4*5*5*3 (5 passes)
    assert work_units(Op.FFT, JobParams(batch=16, n=2048, dtype=np.dtype(np.complex64))) == 16 * 2048 * 4
    assert work_units(Op.IFFT, JobParams(batch=2, n=1200, dtype=np.dtype(np.complex128))) == 2 * 1200 * 5
    assert work_units(Op.TURBO_ENCODE, JobParams(batch=3, k=6144)) == 3 * 6144
    one = work_units(Op.TURBO_DECODE, JobParams(batch=1, k=6144, iterations=8))
    assert one == 6144 * 8
    assert work_units(Op.TURBO_DECODE, JobParams(batch=2, k=6144, iterations=8)) >= one


@pytest.fixture(scope="module")
def calibrated() -> ServiceTimeModel:
    return ServiceTimeModel.calibrate(quick=True)


def _calibration_problems(m: ServiceTimeModel) -> list:
    """What is wrong with a calibrated model's fits (empty: nothing)."""
    problems: list = []
    for key in ("fft/complex64", "fft/complex128", "ifft/complex64", "ifft/complex128",
                "turbo_encode", "turbo_decode"):
        c = m.costs[key]
        if not (c.a >= 0 and min(c.b) >= 0 and sum(c.b) > 0 and c.points >= 2):
            problems.append(("coefficients", key, c))
        # the fit follows its own points: quick calibrations 1-10% RMS on a quiet 2-vCPU EPYC, up
        # to 33% with a load of 12 on it; one coefficient's sign flipped gives 72% or more
        if c.rms_rel_error is None or c.rms_rel_error >= 0.5:
            problems.append(("rms", key, c))
    # the per-iteration feature: the same K = 6144 block at 8 and at 2 iterations. A model
    # without it gives exactly 1; quick calibrations 1.7-2.4 (a load of 12 on the 2 vCPUs
    # included), full ones 1.3-1.8. (Comparing K=6144 x 8 with K=1024 x 2 instead, 3.9 when
    # timed directly, was no test: loaded quick calibrations gave 1.8-3.4 and the model
    # without the feature 0.5-1.6.)
    large = Job.create(Op.TURBO_DECODE, np.zeros((3, 6148), np.float32), iterations=8)
    fewer = Job.create(Op.TURBO_DECODE, np.zeros((3, 6148), np.float32), iterations=2)
    small = Job.create(Op.TURBO_DECODE, np.zeros((3, 1028), np.float32), iterations=2)
    if not m.estimate(large) > 1.25 * m.estimate(fewer):
        problems.append(("iterations", m.estimate(large) / m.estimate(fewer)))
    if not m.estimate(large) > m.estimate(small):  # 24x the bit-iterations
        problems.append(("decode size", m.estimate(large) / m.estimate(small)))
    if not m.estimate(Job.create(Op.FFT, cplx((16, 2048), np.complex128))) > \
            m.estimate(Job.create(Op.FFT, cplx((1, 256), np.complex128))):
        problems.append(("fft size",))
    return problems


def test_calibrated_model_structure_and_sanity(calibrated):
    assert calibrated.calibrated and calibrated.meta["cpu"] and calibrated.meta["kernels"]
    # A quick calibration times each point 3 times: a loaded machine can stall enough of them to
    # bend a fit (all of a key's slope to 0: 1 run in 10 with two CPU burners on the 2 vCPUs).
    # A stall does not repeat itself; a broken model fails every calibration: up to 3.
    tries = [_calibration_problems(calibrated)]
    while tries[-1] and len(tries) < 3:
        tries.append(_calibration_problems(ServiceTimeModel.calibrate(quick=True)))
    assert not tries[-1], tries


def test_estimates_within_a_sane_factor_through_the_service(calibrated):
    llr = noiseless_llr(turbo_encode(bits(6144)))
    x = cplx((16, 2048), np.complex64)
    with AcceleratorService(workers=1, model=calibrated) as svc:
        jobs = [svc.submit(Op.TURBO_DECODE, llr, iterations=4) for _ in range(3)]
        jobs += [svc.submit(Op.FFT, x) for _ in range(5)]
        concurrent.futures.wait([j.future for j in jobs], timeout=60)
        est = svc.metrics()["accelerators"]["accel0"]["ops"]
    for op in ("turbo_decode", "fft"):
        mine = [j for j in jobs if j.op.value == op]
        best = min(j.service_time / j.estimate for j in mine)
        # Generous: the machine is shared; only a broken model is off by 10x at best.
        assert 0.1 < best < 10, (op, best)
        assert est[op]["estimate"]["count"] == len(mine)
        assert est[op]["estimate"]["geomean_ratio"] > 0


def test_model_save_load_and_cache(tmp_path, calibrated):
    path = calibrated.save(tmp_path / "m.json")
    back = ServiceTimeModel.load(path)
    assert back.costs.keys() == calibrated.costs.keys()
    assert all(back.costs[k].a == calibrated.costs[k].a and back.costs[k].b == calibrated.costs[k].b
               for k in back.costs)
    assert back.calibrated and back.meta["cpu"] == calibrated.meta["cpu"]

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not JSON"):
        ServiceTimeModel.load(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text(json.dumps({"format": FORMAT_VERSION,
                                                   "costs": {"fft/complex64": {"a": -1, "b": 0}}}))
    (tmp_path / "v1.json").write_text(json.dumps({"format": 1, "costs": {"fft/complex64": {"a": 1, "b": 1}}}))
    with pytest.raises(ModelError, match="format 2"):  # FFT features were N log2 N: not reused
        ServiceTimeModel.load(tmp_path / "v1.json")
    with pytest.raises(ModelError, match="invalid coefficients"):
        ServiceTimeModel.load(tmp_path / "neg.json")
    with pytest.raises(ModelError, match="cannot read"):
        ServiceTimeModel.load(tmp_path / "missing.json")
    with pytest.raises(ModelError, match="no cost for 'turbo_encode'"):
        ServiceTimeModel({}, calibrated=False).estimate(Job.create(Op.TURBO_ENCODE, bits(40)))

    cache = tmp_path / "cache"
    assert ServiceTimeModel.load_cached(cache) is None
    calibrated.save(ServiceTimeModel.cache_file(cache))
    again = ServiceTimeModel.load_or_calibrate(cache)  # served from the cache, no recalibration
    assert again.meta["time"] == calibrated.meta["time"]
    assert ServiceTimeModel.cache_file(cache).name.startswith("accel-model-")


# --------------------------------------------------------------------------- bad jobs


BAD_JOBS = [
    (("dct", np.zeros(8, np.complex64)), {}, "unknown accelerator operation 'dct'", UnsupportedOperation),
    ((Op.FFT, np.zeros((2, 256), np.float64)), {}, "dtype float64", DtypeError),
    ((Op.FFT, np.zeros((2, 256), np.int32)), {}, "dtype int32", DtypeError),
    ((Op.FFT, np.zeros((2, 1001), np.complex64)), {}, "size 1001", UnsupportedSize),
    ((Op.FFT, np.zeros((), np.complex64)), {}, "0-d", ShapeError),
    ((Op.FFT, np.zeros((2, 256), np.complex64), np.zeros((2, 128), np.complex64)), {}, "shape", ShapeError),
    ((Op.FFT, np.zeros((2, 256), np.complex64), np.zeros((2, 256), np.complex128)), {}, "complex128", DtypeError),
    ((Op.FFT, np.zeros((2, 512), np.complex64)[:, ::2]), {}, "C-contiguous", LayoutError),
    ((Op.FFT, np.zeros((2, 256), np.complex64)), {"n": 512}, "n=512", ShapeError),
    ((Op.FFT, bytearray(100)), {"n": 256, "dtype": np.complex64}, "100 bytes", LayoutError),
    ((Op.FFT, bytearray(2048)), {"n": 256}, "needs n= and dtype=", ParameterError),
    ((Op.FFT, object()), {"n": 256, "dtype": np.complex64}, "neither an ndarray nor a buffer", DtypeError),
    ((Op.FFT, np.zeros((2, 256), np.complex64), bytes(4096)), {}, "read-only", LayoutError),
    ((Op.TURBO_ENCODE, np.zeros(41, np.uint8)), {}, "K=41", BlockSizeError),
    ((Op.TURBO_ENCODE, np.zeros(40, np.int64)), {}, "dtype int64", DtypeError),
    ((Op.TURBO_ENCODE, np.zeros((1, 1, 40), np.uint8)), {}, "shape", ShapeError),
    ((Op.TURBO_DECODE, np.zeros((4, 44), np.float32)), {}, "shape", ShapeError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float64)), {}, "dtype float64", DtypeError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"iterations": 0}, "iterations", ParameterError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"iterations": 65}, "iterations", ParameterError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"iterations": True}, "iterations", ParameterTypeError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"scaling": 1.5}, "scaling", ParameterError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"early_stop": "crc16"}, "early_stop", ParameterError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32), np.zeros(41, np.uint8)), {}, "shape", ShapeError),
    ((Op.TURBO_DECODE, bytearray(100)), {"k": 40}, "whole number", LayoutError),
    ((Op.TURBO_ENCODE, np.zeros(40, np.uint8)), {"guest_id": -1}, "guest_id", ParameterError),
    ((Op.TURBO_ENCODE, np.zeros(40, np.uint8)), {"bogus": 1}, "bogus", ParameterError),
    ((Op.FFT, np.zeros((0, 256), np.complex64)), {}, "is empty", LayoutError),
    ((Op.FFT, bytearray(4096)), {"n": 1001, "dtype": np.complex64}, "fft size 1001", UnsupportedSize),
    ((Op.IFFT, bytearray(4096)), {"n": 256, "dtype": "no-such-dtype"}, "not a numpy dtype", DtypeError),
    ((Op.FFT, np.zeros((2, 256), np.complex64)), {"dtype": np.complex128}, "dtype parameter", DtypeError),
    ((Op.TURBO_DECODE, bytearray(3 * 45 * 4)), {"k": 41}, "K=41", BlockSizeError),
    ((Op.TURBO_DECODE, bytearray(3 * 44 * 4)), {"k": 40, "batch": 0}, "batch", ParameterError),
    ((Op.TURBO_DECODE, bytearray(3 * 44 * 4)), {"k": 40.0}, "k must be", ParameterTypeError),
    ((Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"scaling": "0.7"}, "scaling", ParameterTypeError),
    ((Op.TURBO_ENCODE, np.zeros(40, np.uint8)), {"guest_id": "7"}, "guest_id", ParameterTypeError),
]


@pytest.mark.parametrize("args,kwargs,match,typed", BAD_JOBS, ids=[m for _, _, m, _ in BAD_JOBS])
def test_bad_jobs_are_rejected_at_submit(args, kwargs, match, typed):
    with AcceleratorService() as svc:
        with raises_exactly(typed, match=match) as info:
            svc.submit(*args, **kwargs)
        assert isinstance(info.value, JobRejected)
        snap = svc.metrics()
        assert sum(snap["rejected_at_create"].values()) == 1
        assert snap["accelerators"]["accel0"]["total"]["submitted"] == 0


def test_overlapping_buffers_rejected_but_fft_in_place_allowed():
    buf = np.zeros((2, 256), np.complex64)
    Job.create(Op.FFT, buf, buf)
    with pytest.raises(JobRejected, match="overlaps"):
        Job.create(Op.FFT, buf[:1], buf.reshape(-1)[128:384].reshape(1, 256))
    raw = np.zeros(3 * 44 + 40, np.uint8)
    with pytest.raises(JobRejected, match="overlaps"):
        Job.create(Op.TURBO_ENCODE, raw[:40], raw[20:20 + 132].reshape(3, 44))


def test_job_cannot_be_submitted_twice_and_errors_are_typed():
    with AcceleratorService() as svc:
        job = svc.submit(Op.TURBO_ENCODE, bits(40))
        job.wait(30)
        with pytest.raises(JobRejected, match="only a new job"):
            svc.submit_job(job)
        with pytest.raises(AccelError, match="no accelerator named 'nope'"):
            svc.submit(Op.TURBO_ENCODE, bits(40), accelerator="nope")
    assert issubclass(JobRejected, ValueError) and issubclass(UnsupportedOperation, JobRejected)


TYPED_INPUT_ERRORS = (DtypeError, ShapeError, UnsupportedSize, BlockSizeError, ParameterError, ParameterTypeError,
                      ElementError, LayoutError)


@pytest.mark.parametrize("cls", TYPED_INPUT_ERRORS, ids=lambda c: c.__name__)
def test_typed_input_errors_keep_the_builtin_bases(cls):
    # refused and counted at submit (JobRejected), caught by callers of ValueError, and
    # wrong-type errors also by callers of TypeError, as before the typed errors existed
    assert issubclass(cls, InvalidInput) and issubclass(cls, JobRejected) and issubclass(cls, AccelError)
    assert issubclass(cls, ValueError)
    assert issubclass(cls, TypeError) == (cls in (DtypeError, ParameterTypeError))
    err = cls("bad", argument="x", value=7)
    assert (str(err), err.argument, err.value) == ("bad", "x", 7)


SAME_CHECK = [  # (direct call, job arguments, job keyword arguments)
    (lambda: fft(np.zeros((2, 1001), np.complex64)), (Op.FFT, np.zeros((2, 1001), np.complex64)), {}),
    (lambda: ifft(np.zeros((2, 256), np.int16)), (Op.IFFT, np.zeros((2, 256), np.int16)), {}),
    (lambda: ifft(np.complex64(1)), (Op.IFFT, np.zeros((), np.complex64)), {}),
    (lambda: FFTPlan(256, "no-such-dtype"), (Op.FFT, bytearray(2048)), {"n": 256, "dtype": "no-such-dtype"}),
    (lambda: turbo_encode(np.zeros(41, np.uint8)), (Op.TURBO_ENCODE, np.zeros(41, np.uint8)), {}),
    (lambda: turbo_encode(np.zeros((1, 1, 40), np.uint8)), (Op.TURBO_ENCODE, np.zeros((1, 1, 40), np.uint8)), {}),
    (lambda: turbo_encode(np.zeros(40, np.float32)), (Op.TURBO_ENCODE, np.zeros(40, np.float32)), {}),
    (lambda: turbo_decode(np.zeros((3, 45), np.float32)), (Op.TURBO_DECODE, np.zeros((3, 45), np.float32)), {}),
    (lambda: turbo_decode(np.zeros((2, 44), np.float32)), (Op.TURBO_DECODE, np.zeros((2, 44), np.float32)), {}),
    (lambda: turbo_decode(np.zeros((3, 44), np.int16)), (Op.TURBO_DECODE, np.zeros((3, 44), np.int16)), {}),
    (lambda: turbo_decode(np.zeros((3, 44), np.float32), iterations=0),
     (Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"iterations": 0}),
    (lambda: turbo_decode(np.zeros((3, 44), np.float32), iterations=True),
     (Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"iterations": True}),
    (lambda: turbo_decode(np.zeros((3, 44), np.float32), scaling=2),
     (Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"scaling": 2}),
    (lambda: turbo_decode(np.zeros((3, 44), np.float32), early_stop="crc8"),
     (Op.TURBO_DECODE, np.zeros((3, 44), np.float32)), {"early_stop": "crc8"}),
]


@pytest.mark.parametrize("direct,args,kwargs", SAME_CHECK)
def test_a_job_and_a_direct_kernel_call_fail_the_same_check(direct, args, kwargs):
    with pytest.raises(InvalidInput) as by_call:
        direct()
    with pytest.raises(InvalidInput) as by_job:
        Job.create(*args, **kwargs)
    assert type(by_job.value) is type(by_call.value)
    assert by_job.value.value == by_call.value.value


def test_kernel_value_errors_fail_the_job_not_the_worker():
    bad_bits = np.full(40, 2, np.uint8)          # not 0/1: refused by the kernel module at run time
    nan_llr = np.zeros((3, 44), np.float32)
    nan_llr[1, 5] = np.nan
    with AcceleratorService(workers=1) as svc:
        j1 = svc.submit(Op.TURBO_ENCODE, bad_bits)
        j2 = svc.submit(Op.TURBO_DECODE, nan_llr)
        ok = svc.submit(Op.TURBO_ENCODE, bits(40))
        with pytest.raises(ValueError):
            j1.wait(30)
        with pytest.raises(ValueError, match="not finite"):
            j2.wait(30)
        assert ok.wait(30).state is JobState.DONE
        ops = svc.metrics()["accelerators"]["accel0"]["ops"]
    assert j1.state is JobState.FAILED and isinstance(j1.error, ValueError)
    assert type(j1.error) is ElementError and j1.error.argument == "bits" and j1.error.value == 2
    assert type(j2.error) is ElementError and j2.error.argument == "llr"
    assert ops["turbo_encode"]["failed"] == 1 and ops["turbo_encode"]["completed"] == 1
    assert ops["turbo_decode"]["failed"] == 1


# --------------------------------------------------------------------------- lifecycle


def test_close_cancels_pending_jobs_and_accounts_for_them():
    svc = AcceleratorService(workers=1)
    acc = svc.accelerator("accel0")
    acc.pause()
    jobs = [svc.submit(Op.TURBO_ENCODE, bits(40), guest_id=i % 3, collect=(i % 2 == 0)) for i in range(7)]
    cancelled = svc.close()
    assert set(map(id, cancelled)) == set(map(id, jobs))
    for j in jobs:
        assert j.state is JobState.CANCELLED and j.future.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            j.wait(1)
    assert acc.state is AcceleratorState.CLOSED
    assert acc.stats()["total"]["cancelled"] == 7
    # Cancelled jobs that asked for collection are delivered on the ready queue too.
    assert [j.id for j in acc.collect()] == [j.id for j in jobs if j.collect]
    assert svc.close() == []  # idempotent
    with pytest.raises(ServiceClosed):
        svc.submit(Op.TURBO_ENCODE, bits(40))
    with pytest.raises(ServiceClosed):
        acc.submit(Job.create(Op.TURBO_ENCODE, bits(40)))


def test_close_without_cancelling_finishes_pending_jobs():
    acc = Accelerator("a", workers=2)
    acc.pause()
    jobs = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(2, 512))) for _ in range(6)]
    assert acc.close(cancel_pending=False) == []
    assert all(j.state is JobState.DONE for j in jobs)
    assert acc.state is AcceleratorState.CLOSED


def test_cancel_single_job_and_running_jobs_are_not_cancelled():
    with Accelerator("a", workers=1) as acc:
        acc.pause()
        a = acc.submit(Job.create(Op.TURBO_ENCODE, bits(40)))
        b = acc.submit(Job.create(Op.TURBO_ENCODE, bits(40)))
        assert b.future.cancel()          # through the future: same effect as b.cancel()
        assert b.state is JobState.CANCELLED and acc.queue_depth() == 1
        assert not Job.create(Op.TURBO_ENCODE, bits(40)).cancel()  # never submitted
        acc.resume()
        a.wait(30)
        assert not a.cancel() and a.state is JobState.DONE
        assert acc.stats()["ops"]["turbo_encode"]["cancelled"] == 1


def test_ready_queue_collect_and_notifier():
    notified = threading.Semaphore(0)
    with AcceleratorService(workers=2, ready_notify=lambda acc: notified.release()) as svc:
        jobs = [svc.submit(Op.TURBO_ENCODE, bits(40), collect=True) for _ in range(5)]
        quiet = svc.submit(Op.TURBO_ENCODE, bits(40))  # not collected: future only
        got: list[Job] = []
        while len(got) < 5:
            assert notified.acquire(timeout=30)
            got += svc.accelerator("accel0").collect(timeout=0)
        quiet.wait(30)
        assert svc.accelerator("accel0").collect(timeout=0.01) == []
    assert sorted(j.id for j in got) == sorted(j.id for j in jobs)
    assert all(j.state is JobState.DONE for j in got)


def test_close_from_done_callbacks_does_not_deadlock():
    acc = Accelerator("a", workers=2)
    closed = threading.Semaphore(0)

    def on_done(job: Job) -> None:
        acc.close()  # from a worker thread: signals, never joins (two workers would join each other)
        closed.release()

    acc.pause()
    first = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40))) for _ in range(2)]
    rest = [acc.submit(Job.create(Op.TURBO_ENCODE, bits(40))) for _ in range(3)]
    for j in first:
        j.add_done_callback(on_done)
    acc.resume()
    assert closed.acquire(timeout=30)
    acc.close()  # from the test thread: joins the workers
    assert acc.state is AcceleratorState.CLOSED
    assert all(j.state in (JobState.DONE, JobState.CANCELLED) for j in first + rest)
    assert acc.stats()["total"]["completed"] + acc.stats()["total"]["cancelled"] == 5


def test_broken_ready_notifier_does_not_lose_jobs():
    def broken(acc: Accelerator) -> None:
        raise RuntimeError("event loop gone")

    with AcceleratorService(workers=1, ready_notify=broken) as svc:
        jobs = [svc.submit(Op.TURBO_ENCODE, bits(40), collect=True) for _ in range(3)]
        for j in jobs:
            j.wait(30)
        assert len(svc.accelerator("accel0").collect()) == 3
        assert 0.0 <= svc.metrics()["accelerators"]["accel0"]["utilization"] <= 1.0


def test_asyncio_adapter_awaits_job_futures():
    async def main(svc: AcceleratorService) -> list[Job]:
        jobs = [svc.submit(Op.TURBO_ENCODE, bits(40), guest_id=g) for g in range(4)]
        return await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))

    with AcceleratorService(workers=2) as svc:
        done = asyncio.run(main(svc))
    assert [j.state for j in done] == [JobState.DONE] * 4


def test_bad_worker_counts_rejected():
    with pytest.raises(AccelError, match="workers"):
        Accelerator("a", workers=0)
    with pytest.raises(AccelError, match="already exists"):
        AcceleratorService([AcceleratorSpec("a"), AcceleratorSpec("a")])


# --------------------------------------------------------------------------- vrdma accel-bench


def test_accel_bench_quick_json_smoke(capsys):
    from vrdma.accel_bench import format_table
    from vrdma.cli import main

    assert main(["accel-bench", "--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["machine"]["quick"] is True
    assert res["fft"] and all(isinstance(r, dict) for r in res["fft"])
    assert res["turbo"][0]["mbit_s"] > 0 and res["turbo"][0]["bit_errors"] == 0
    service = res["service"]
    assert {r["workers"] for r in service if "ratio_vs_direct" in r} == {0, 1, 2}
    assert all(r["ratio_vs_direct"] > 0 for r in service if "ratio_vs_direct" in r)
    assert all(r["est_geomean_ratio"] > 0 for r in service if r.get("workers") and "ratio_vs_direct" in r)
    assert any("overhead_us" in r for r in service)
    assert {c["key"] for c in res["calibration"]["costs"]} >= {"fft/complex64", "turbo_decode"}
    table = format_table(res)
    for section in ("fft", "turbo", "model", "service"):
        assert any(line.startswith(section) for line in table.splitlines()), section
