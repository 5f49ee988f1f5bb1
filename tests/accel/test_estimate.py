"""Service-time estimates (accel_core/estimate.py) and what the device reports of
them (QUERY_ACCEL, spec 5.x.6.10; the CQE's service_us).

Deterministic: the model is fed synthetic samples (no clocks); the device tests
compare QUERY_ACCEL and the CQEs with the model's own numbers, never with a
duration.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

import accel_core
from accel_core import AcceleratorService, AcceleratorSpec, ModelError, Op, ServiceTimeModel, dft
from accel_core.estimate import (
    FORMAT_VERSION,
    REF_UP,
    REF_WARMUP,
    LinearCost,
    OnlineFit,
    ReferenceTimes,
    decode_segments,
    features,
    fft_passes,
    fit_linear,
    query_units,
)
from accel_core.jobs import JobParams
from accel_core.service import Accelerator
from fabric.local import LocalFabric
from virtio_rdma import accel, wire
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import AccelDtype, AccelOp, Cmd

C64 = np.dtype(np.complex64)


def fft_params(n: int, batch: int = 1) -> JobParams:
    return JobParams(batch=batch, n=n, dtype=C64)


def dec_params(k: int, batch: int, it: int) -> JobParams:
    return JobParams(batch=batch, k=k, iterations=it)


# --------------------------------------------------------------------------- units


def test_fft_passes_is_the_kernels_stage_count_for_every_size():
    for n in dft.supported_sizes():
        assert fft_passes(n) == len(dft.radices_for(n)), n
    assert [fft_passes(n) for n in (1, 2, 8, 16, 1200, 2048, 65536)] == [0, 1, 1, 2, 5, 4, 6]
    for bad in (0, -8, 7, 1001, True, 2.0):
        with pytest.raises(ModelError):
            fft_passes(bad)  # type: ignore[arg-type]


def test_query_units_are_every_keys_first_feature():
    assert query_units(Op.FFT, 2048, 16) == 16 * 2048 * 4
    assert query_units(Op.IFFT, 1200, 8) == 8 * 1200 * 5
    assert query_units(Op.TURBO_ENCODE, 6144, 3) == 3 * 6144
    assert query_units(Op.TURBO_DECODE, 1024, 4, 6) == 4 * 1024 * 6
    assert features(Op.FFT, fft_params(1200, 8))[0] == query_units(Op.FFT, 1200, 8)
    assert features(Op.TURBO_ENCODE, JobParams(batch=3, k=6144)) == (3 * 6144,)
    for k, b, it in ((6144, 1, 8), (40, 1, 4), (40, 32, 8), (1024, 3, 2)):
        f = features(Op.TURBO_DECODE, dec_params(k, b, it))
        assert f[0] == query_units(Op.TURBO_DECODE, k, b, it) and f[1] == b * k


def test_decode_idle_lane_steps():
    lanes = accel_core.estimate.decode_lanes()
    assert lanes == 16   # int16 lanes of the fixed-point decoder, on every SIMD path
    p40, p6144 = decode_segments(40), decode_segments(6144)
    assert p40 == 1 and p6144 == 16
    # one K=40 block fills 1 lane of 16: 15 idle lanes for 40 steps x 4 iterations
    assert features(Op.TURBO_DECODE, dec_params(40, 1, 4))[2] == 15 * 40 * 4
    assert features(Op.TURBO_DECODE, dec_params(40, 16, 4))[2] == 0
    assert features(Op.TURBO_DECODE, dec_params(40, 17, 4))[2] == 15 * 40 * 4
    assert features(Op.TURBO_DECODE, dec_params(6144, 1, 8))[2] == 0  # 16 segments fill the lanes


# --------------------------------------------------------------------------- fits


def test_weighted_fit_follows_the_heavy_points():
    w = [1e3, 1e4, 1e5]
    t = [2e-6, 11e-6, 101e-6]  # a = 1e-6, b = 1e-9 exactly
    t_bad = [4e-6, 11e-6, 101e-6]  # the first point off by 2x
    plain = fit_linear(w, t_bad)
    heavy = fit_linear(w, t_bad, [1e-3, 1.0, 1.0])  # the outlier barely counts
    assert abs(heavy(1e3) - 2e-6) < abs(plain(1e3) - 2e-6)
    assert heavy.b[0] == pytest.approx(1e-9, rel=0.01)
    assert fit_linear(w, t, [5.0, 5.0, 5.0]).a == pytest.approx(1e-6, rel=1e-6)
    for bad in ([1.0, 1.0], [1.0, 0.0, 1.0], [1.0, math.nan, 1.0]):
        with pytest.raises(ModelError, match="weights"):
            fit_linear(w, t, bad)


def test_the_first_slow_jobs_of_a_shape_do_not_set_its_estimate():
    online = OnlineFit()
    f = (1.0,)
    for m in (3.0, 1.0, 1.0):  # the first job of a shape builds its plan: 3x slower
        online.observe("k", f, 1.0, m)
    assert online.factor("k", f) == pytest.approx(1.0)
    assert online.samples("k", f) == 3 and online.key_factor("k") == pytest.approx(1.0)
    assert online.class_factor("k", (2.0,)) is None and online.key_factor("other") == 1.0


def test_the_estimate_minimises_the_error_relative_to_the_measured_times():
    """Over its window the class's estimate is the 1/m-weighted median: for samples
    1, 2 and 4 that is 1 (sum of |e - m| / m: 1.25), not the plain median 2 (1.5)."""
    online = OnlineFit(window=3)
    f = (1.0,)
    for m in (1.0, 4.0, 2.0):
        online.observe("k", f, 1.0, m)
    e = online.factor("k", f)
    assert e == pytest.approx(1.0)
    mae = lambda e: sum(abs(e - m) / m for m in (1.0, 2.0, 4.0))  # noqa: E731
    assert all(mae(e) <= mae(x) + 1e-12 for x in np.linspace(0.5, 5.0, 451))


def test_a_stalled_job_does_not_move_the_estimate_and_a_lasting_change_does():
    online = OnlineFit()
    f = (1.0,)
    for _ in range(10):
        online.observe("k", f, 1.0, 1.0)
    online.observe("k", f, 1.0, 1e4)  # a job stalled for ages
    assert online.factor("k", f) == pytest.approx(1.0)
    for i in range(online.window):  # the machine got 1.5x slower: followed within window / 2 + 1
        online.observe("k", f, 1.0, 1.5)
        assert online.factor("k", f) == pytest.approx(1.5 if i >= online.window // 2 else 1.0)
    assert online.samples("k", f) == 11 + online.window


def test_a_much_slower_accelerator_is_learned_in_a_few_jobs():
    """--accel-slowdown 20: every job takes 20x the calibrated kernel time."""
    online = OnlineFit()
    f = (1.0,)
    online.observe("k", f, 1.0, 20.0)
    assert online.factor("k", f) == pytest.approx(20.0) and online.key_factor("k") == pytest.approx(20.0)
    for _ in range(5):
        online.observe("k", f, 1.0, 20.0)
    online.observe("k", f, 1.0, 1e-6)  # one absurdly short time weighs as a 4x shorter one: no effect
    assert online.factor("k", f) == pytest.approx(20.0)


def true_fft(feats) -> float:
    return 4e-6 + 6e-10 * feats[0]


def test_learned_cost_converges_to_the_served_costs_and_estimates_unseen_sizes():
    """The calibrated fit is wrong (an idle machine, a slower service); the jobs served
    teach the key's line, which QUERY_ACCEL reports and unseen sizes are estimated with."""
    model = ServiceTimeModel({"fft/complex64": LinearCost(1e-6, (2e-10,))}, calibrated=True, online=True)
    served = [fft_params(2048), fft_params(2048, 16), fft_params(256, 32), fft_params(8192, 4)]
    for _ in range(20):
        for p in served:
            model.observe(Op.FFT, p, true_fft(features(Op.FFT, p)))
    cost = model.learned_cost("fft/complex64")
    assert cost.a == pytest.approx(4e-6, rel=0.05) and cost.b[0] == pytest.approx(6e-10, rel=0.05)
    q = model.query_cost(Op.FFT)
    assert (q.a, *q.b) == pytest.approx((cost.a, *cost.b), rel=1e-9)
    for p in served:  # a served class: its own learned estimate
        assert model.estimate_params(Op.FFT, p) == pytest.approx(true_fft(features(Op.FFT, p)), rel=0.02)
    unseen = fft_params(1200, 8)
    assert model.estimate_params(Op.FFT, unseen) == pytest.approx(true_fft(features(Op.FFT, unseen)),
                                                                  rel=0.05)
    assert model.base_estimate(Op.FFT, unseen) == pytest.approx(1e-6 + 2e-10 * 48000)  # fit untouched


def test_query_cost_before_any_sample_is_the_fit_and_folds_decode_terms():
    model = ServiceTimeModel.nominal()
    for op in (Op.FFT, Op.IFFT, Op.TURBO_ENCODE):
        key = "turbo_encode" if op is Op.TURBO_ENCODE else f"{op.value}/complex64"
        base, q = model.costs[key], model.query_cost(op)
        assert q.a == pytest.approx(base.a) and q.b == pytest.approx(base.b)
    q = model.query_cost(Op.TURBO_DECODE, C64)
    assert len(q.b) == 1 and q.b[0] > model.costs["turbo_decode"].b[0]  # batch*K folded into the unit
    full = model.costs["turbo_decode"]
    for p in (dec_params(6144, 2, 4), dec_params(2048, 16, 4)):  # lanes full: one unit fits well
        f = features(Op.TURBO_DECODE, p)
        assert q.a + q.b[0] * f[0] == pytest.approx(full(f), rel=0.25)
    assert model.query_cost(Op.FFT, np.complex128).b == pytest.approx(model.costs["fft/complex128"].b)


def test_learned_cost_refits_after_new_samples_only():
    model = ServiceTimeModel({"fft/complex64": LinearCost(1e-6, (2e-10,))}, calibrated=True, online=True)
    first = model.learned_cost("fft/complex64")
    assert model.learned_cost("fft/complex64") is first  # cached
    model.observe(Op.FFT, fft_params(2048), 1e-3)
    assert model.learned_cost("fft/complex64") is not first
    with pytest.raises(ModelError, match="no cost for 'turbo_encode'"):
        model.learned_cost("turbo_encode")


def test_model_file_format_is_2():
    assert FORMAT_VERSION == 2  # FFT features changed from N log2 N to N * passes(N)


# --------------------------------------------------------------------------- steady slowdown


def test_reference_time_is_a_low_quantile_steady_against_outliers():
    ref = ReferenceTimes()
    # the first REF_WARMUP times: the least of them (a cold first call takes twice as long)
    assert ref.update("s", 20e-6) == pytest.approx(20e-6)
    assert ref.update("s", 10e-6) == pytest.approx(10e-6)
    for _ in range(REF_WARMUP - 2):
        assert ref.update("s", 30e-6) == pytest.approx(10e-6)
    assert ref.update("s", 100e-6) == pytest.approx(10e-6 * math.exp(REF_UP))  # a 10x outlier: +0.5%
    assert ref.update("s", 10.02e-6) == pytest.approx(10.02e-6)  # never past the time it moves to
    rng = np.random.default_rng(1)
    for t in 10e-6 * np.exp(rng.normal(0.0, 0.2, 3000)):  # jitter: it settles low in the spread
        ref.update("s", float(t))
    assert 10e-6 * math.exp(-0.2 * 1.8) < ref.get("s") < 10e-6 * math.exp(-0.2 * 1.0)
    for _ in range(200):
        ref.update("s", 20e-6)  # the kernel really got slower: followed, slowly
    assert ref.get("s") == pytest.approx(20e-6)
    for _ in range(20):
        ref.update("s", 10e-6)  # and faster: quickly
    assert ref.get("s") == pytest.approx(10e-6)
    assert ref.update("s", math.nan) == ref.get("s") and ref.update("s", -1.0) == ref.get("s")
    assert ref.update("other", -1.0) == 0.0 and ref.get("other") is None and len(ref) == 1


def test_slowdown_multiplies_the_shapes_reference_time():
    with Accelerator("slow", slowdown=3.0) as acc:
        x = np.zeros((4, 2048), np.complex64)
        first = acc.submit(accel_core.Job.create(Op.FFT, x)).wait(30)
        s = acc.metrics_snapshot()["ops"]["fft"]
        # first job of its shape: the reference is its own kernel time
        assert s["delay_seconds"] == pytest.approx(2.0 * s["kernel_seconds"], rel=1e-9)
        assert first.accel_seconds == pytest.approx(s["kernel_seconds"] + s["delay_seconds"], rel=1e-9)
        more = [acc.submit(accel_core.Job.create(Op.FFT, x)) for _ in range(5)]
        for j in more:
            j.wait(30)
        (ref,) = acc._kernel_ref._ref.values()
        last = acc.metrics_snapshot()["ops"]["fft"]
    assert last["completed"] == 6
    # every delay was 2x the reference of its time: the least of the first REF_WARMUP kernel
    # times (never above the first), then moving up by at most REF_UP per job
    hi = 2.0 * s["kernel_seconds"] * 6 * math.exp((6 - REF_WARMUP) * REF_UP)
    assert 0 < last["delay_seconds"] <= hi
    assert 0 < ref <= s["kernel_seconds"] * math.exp((6 - REF_WARMUP) * REF_UP)


# --------------------------------------------------------------------------- through the device


@pytest.fixture
def router():
    model = ServiceTimeModel({"fft/complex64": LinearCost(2e-6, (5e-10,)),
                              "ifft/complex64": LinearCost(3e-6, (6e-10,)),
                              "fft/complex128": LinearCost(2e-6, (1e-9,)),
                              "ifft/complex128": LinearCost(2e-6, (1e-9,)),
                              "turbo_encode": LinearCost(8e-6, (2e-9,)),
                              "turbo_decode": LinearCost(2e-5, (6e-9, 5e-9, 6e-9))},
                             calibrated=True, online=True)
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({Op.FFT, Op.IFFT})),
                              AcceleratorSpec("turbo", ops=frozenset({Op.TURBO_ENCODE, Op.TURBO_DECODE}))],
                             model=model)
    # every job through the service (no native path in the loop, no inline run): the model
    # learns from each one, which is what these tests check
    r = AccelRouter(svc, native_max_seconds=0.0, inline_max_seconds=0.0)
    yield r
    r.close()


def _query(g) -> dict:
    q = g.cmd(Cmd.QUERY_ACCEL)
    return {o["op"]: o for o in q["ops"][:q["num_ops"]]}


def _guest(router):
    from tests.virtio_rdma.driver import Guest

    g = Guest(LocalFabric(), size=16 << 20, gpa=0x1000_0000, accel=router)
    return g, g.alloc_pd(), g.create_cq(256)


def test_query_accel_reports_the_models_learned_cost_in_the_spec_units(router):
    g, _, _ = _guest(router)
    model = router.local.service.model
    ops = _query(g)
    for op in AccelOp:
        q = model.query_cost(accel.CORE_OP[op])
        assert ops[op]["est_fixed_ns"] == round(q.a * 1e9) and ops[op]["est_unit_ps"] == round(q.b[0] * 1e12)
    assert ops[AccelOp.IFFT]["est_fixed_ns"] == 3000 and ops[AccelOp.IFFT]["est_unit_ps"] == 600
    # decode: all three terms folded into the one unit, not b0 alone
    assert ops[AccelOp.TURBO_DECODE]["est_unit_ps"] > 6000

    # jobs served at a known cost move what QUERY_ACCEL says (the model learned)
    for n, b in ((2048, 1), (256, 32), (8192, 4)):
        for _ in range(10):
            model.observe(Op.IFFT, fft_params(n, b), 1e-5 + 2e-9 * query_units(Op.IFFT, n, b))
    ops = _query(g)
    assert ops[AccelOp.IFFT]["est_unit_ps"] == pytest.approx(2000, rel=0.1)
    assert ops[AccelOp.IFFT]["est_fixed_ns"] == pytest.approx(10000, rel=0.25)


def test_cqe_service_us_is_the_accelerator_time_the_model_learns(router):
    g, pd, cq = _guest(router)
    model = router.local.service.model
    model.online.trace = trace = []
    n, batch = 2048, 4
    x = np.arange(n * batch, dtype=np.complex64)
    src = g.reg_mr(pd, x.nbytes)
    g.write(src.gpa, x.tobytes())
    dst = g.reg_mr(pd, x.nbytes)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    for i in range(3):
        g.post_aq_job(aq, i, AccelOp.FFT, inputs=[(src.addr, x.nbytes, src.lkey)],
                      outputs=[(dst.addr, x.nbytes, dst.lkey)], size=n, batch=batch,
                      dtype=AccelDtype.COMPLEX64)
    deadline = time.monotonic() + 30
    got = []
    while len(got) < 3:
        assert time.monotonic() < deadline, "accelerator jobs did not finish"
        router.wait(0.05)
        router.deliver()
        got += [wire.decode_accel_cqe(c) for c in g.poll(cq)]
    assert [c.wr_id for c in got] == [0, 1, 2]
    assert [c.service_us for c in got] == [round(t[3] * 1e6) for t in trace]  # kernel CPU (+ slowdown)
    assert all(t[0] == "fft/complex64" and t[1] == features(Op.FFT, fft_params(n, batch)) for t in trace)



def test_query_fields_round_saturate_and_are_zero_without_a_cost():
    model = ServiceTimeModel({"fft/complex64": LinearCost(1.2346e-6, (4.0e-10,)),
                              "turbo_encode": LinearCost(10.0, (1.0,))}, calibrated=True)
    assert model.query_fields(Op.FFT) == (1235, 400)
    assert model.query_fields(Op.TURBO_ENCODE) == ((1 << 32) - 1, (1 << 32) - 1)
    assert model.query_fields(Op.IFFT) == (0, 0) and model.query_fields(Op.TURBO_DECODE) == (0, 0)


def test_query_accel_reports_no_estimate_for_an_operation_nothing_here_runs():
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({Op.FFT, Op.IFFT}))],
                             model=ServiceTimeModel.nominal())
    r = AccelRouter(svc)
    try:
        g, _, _ = _guest(r)
        ops = _query(g)
        assert ops[AccelOp.FFT]["est_unit_ps"] == round(svc.model.query_cost(Op.FFT).b[0] * 1e12) > 0
        for op in (AccelOp.TURBO_ENCODE, AccelOp.TURBO_DECODE):
            assert ops[op]["local_units"] == 0
            assert ops[op]["est_fixed_ns"] == ops[op]["est_unit_ps"] == 0
    finally:
        r.close()
