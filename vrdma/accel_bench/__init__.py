"""Accelerator benchmark: FFT and Turbo kernels against their baselines, and the service.

Three sections, each compared against a baseline measured in the same run:

* ``fft``     -- :func:`.fft_bench.run_fft_bench`: batches held in L2 (256 KiB,
  e.g. 16 x 2048 complex64) vs ``scipy.fft`` (workers=1) and pyFFTW (FFTW_MEASURE,
  1 thread), both dtypes, every LTE/NR size (2048 only in ``--quick``), plus the
  call overhead for N <= 1024;
* ``turbo``   -- :func:`.turbo_bench.run_turbo_bench`: K=6144, 8 iterations,
  one core, Mbit/s vs scikit-commpy's turbo_decode (skipped in ``--quick``
  unless ``--commpy-frames`` is given: commpy needs seconds per block);
* ``service`` -- :func:`run_service_bench`: jobs through an
  :class:`~accel_core.AcceleratorService` with 1 and 2 workers vs calling the
  kernel directly in one thread (throughput ratio), the synchronous round-trip
  overhead of one small job (next to a bare two-thread ping-pong, the floor of
  any thread handoff on this machine), and the accuracy of the calibrated
  service-time model (measured / estimated kernel time over the run's jobs).
  Python-side work per job (validation, queueing, future) is ~10-20 us and holds
  the GIL, so jobs of tens of microseconds lose throughput; millisecond jobs do not.

``vrdma accel-bench [--quick] [--json] [--only SECTION]``. The baselines are the
``bench`` extra of pyproject.toml (scipy, pyFFTW, scikit-commpy).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

SECTIONS = ("fft", "turbo", "service")


# --------------------------------------------------------------------------- service section


def _direct_calls(direct: Callable[[Any], object], outs: list, jobs: int) -> list:
    """``jobs`` kernel calls, round-robin over the output buffers."""
    return [direct(outs[i % len(outs)]) for i in range(jobs)]


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _service_run(svc, op, inputs, outputs, jobs, params) -> tuple[float, list]:
    """Submit ``jobs`` jobs up front (round-robin over the buffer rings), wait for all."""
    done: list = []

    def go() -> None:
        subs = [svc.submit(op, inputs[i % len(inputs)], outputs[i % len(outputs)], **params)
                for i in range(jobs)]
        for j in subs:
            j.wait()
        done.extend(subs)

    return _timed(go), done


def run_service_bench(*, quick: bool = False, model=None, workers: tuple[int, ...] = (1, 2),
                      repeat: int | None = None) -> list[dict]:
    """Throughput through the service vs direct kernel calls, round-trip overhead, estimate accuracy.

    ``model`` defaults to a fresh calibration (quick one with ``quick``). Rows:
    ``{"case", "workers", "jobs", "seconds", "jobs_per_s", "unit", "rate", "direct_rate",
    "ratio_vs_direct", "est_geomean_ratio", "est_mean_abs_rel_error"}`` and one
    overhead row ``{"case": "round trip ...", "direct_us", "service_us", "overhead_us"}``.
    """
    from accel_core import AcceleratorService, Op, ServiceTimeModel, fft, turbo_decode, turbo_encode

    repeat = repeat if repeat is not None else (1 if quick else 3)
    if model is None:
        model = ServiceTimeModel.calibrate(quick=quick)
    rng = np.random.default_rng(5)

    n, fb = 2048, 16
    x = (rng.standard_normal((fb, n)) + 1j * rng.standard_normal((fb, n))).astype(np.complex64)
    k, db, its = 6144, 16, 8
    info = rng.integers(0, 2, (db, k), dtype=np.uint8)
    llr = ((1.0 - 2.0 * turbo_encode(info).astype(np.float32)) * 2.0
           + rng.standard_normal((db, 3, k + 4)).astype(np.float32))
    workloads: list[dict[str, Any]] = [
        {"case": f"fft {fb}x{n} complex64", "op": Op.FFT, "inputs": [x],
         "outputs": [np.empty_like(x) for _ in range(8)], "params": {},
         "jobs": 48 if quick else 400, "unit": "Msample/s", "per_job": fb * n / 1e6,
         "direct": lambda out: fft(x, out=out)},
        {"case": f"turbo_decode {db}x K={k} it={its}", "op": Op.TURBO_DECODE, "inputs": [llr],
         "outputs": [np.empty((db, k), np.uint8) for _ in range(4)], "params": {"iterations": its},
         "jobs": 4 if quick else 16, "unit": "Mbit/s", "per_job": db * k / 1e6,
         "direct": lambda out: np.copyto(out, turbo_decode(llr, iterations=its)[0])},
    ]
    rows: list[dict] = []
    for w in workloads:
        outs = w["outputs"]
        w["direct"](outs[0])  # warm up plans and tables
        direct = min(_timed(partial(_direct_calls, w["direct"], outs, w["jobs"])) for _ in range(repeat))
        direct_rate = w["jobs"] * w["per_job"] / direct
        rows.append({"case": w["case"], "workers": 0, "mode": "direct kernel calls, 1 thread",
                     "jobs": w["jobs"], "seconds": direct, "jobs_per_s": w["jobs"] / direct,
                     "unit": w["unit"], "rate": direct_rate, "direct_rate": direct_rate,
                     "ratio_vs_direct": 1.0})
        for nw in workers:
            best = math.inf
            est: dict[str, Any] | None = None
            for _ in range(repeat):
                with AcceleratorService(workers=nw, model=model) as svc:
                    secs, _jobs = _service_run(svc, w["op"], w["inputs"], outs, w["jobs"], w["params"])
                    stats = svc.metrics()["accelerators"]["accel0"]["ops"][w["op"].value]["estimate"]
                if secs < best:
                    best, est = secs, stats
            assert est is not None  # repeat >= 1 runs
            rate = w["jobs"] * w["per_job"] / best
            rows.append({"case": w["case"], "workers": nw, "mode": f"service, {nw} worker(s)",
                         "jobs": w["jobs"], "seconds": best, "jobs_per_s": w["jobs"] / best,
                         "unit": w["unit"], "rate": rate, "direct_rate": direct_rate,
                         "ratio_vs_direct": rate / direct_rate,
                         "est_geomean_ratio": est["geomean_ratio"],
                         "est_mean_abs_rel_error": est["mean_abs_rel_error"]})

    # Synchronous round trip of one small job: submit + dispatch + kernel + future.
    small = (rng.standard_normal((1, 256)) + 1j * rng.standard_normal((1, 256))).astype(np.complex64)
    sout = np.empty_like(small)
    calls = 200 if quick else 2000
    fft(small, out=sout)
    direct = min(_timed(lambda: [fft(small, out=sout) for _ in range(calls)]) for _ in range(repeat)) / calls
    with AcceleratorService(workers=1, model=model) as svc:
        svc.submit(Op.FFT, small, sout).wait()
        service = min(_timed(lambda: [svc.submit(Op.FFT, small, sout).wait() for _ in range(calls)])
                      for _ in range(repeat)) / calls
    handoff = _thread_handoff_us(calls, repeat)
    rows.append({"case": "round trip fft 1x256 complex64", "workers": 1, "mode": "submit().wait() vs direct",
                 "jobs": calls, "direct_us": direct * 1e6, "service_us": service * 1e6,
                 "overhead_us": (service - direct) * 1e6, "thread_handoff_us": handoff})
    rows.extend(device_path_rows(model, calls=calls, repeat=repeat, handoff_us=handoff))
    rows.extend(submitters_rows(model, workloads[0], quick=quick, repeat=repeat))
    rows.extend(device_loop_rows(model, workloads[0], quick=quick, repeat=repeat))
    return rows


def _device_loop(svc, op, x, outs: list, guests: int, in_flight: int, total: int) -> int:
    """One thread, as the backend daemon: ``guests`` x ``in_flight`` jobs kept queued with
    submit_burst, completions taken from the ready queue, each refilled for the same guest."""
    from accel_core import Job

    acc = svc.accelerators[0]
    submitted = done = 0
    refill = [g for g in range(guests) for _ in range(in_flight)]
    while done < total:
        if refill:
            n = min(len(refill), total - submitted)
            jobs = [Job.create(op, x, outs[(submitted + i) % len(outs)], guest_id=refill[i], collect=True)
                    for i in range(n)]
            taken = svc.submit_burst(jobs, accelerator=acc.name)
            assert taken == n, f"burst took {taken} of {n} (unbounded queue)"
            submitted += n
            refill.clear()
        finished = acc.collect(timeout=None)
        done += len(finished)
        if submitted < total:
            refill = [j.guest_id for j in finished]
    return done


def _rate_row(w: dict, case: str, workers: int, mode: str, jobs: int, seconds: float, est: dict,
              direct_rate: float) -> dict:
    """One throughput row: ``jobs`` of workload ``w`` in ``seconds``, against direct calls."""
    rate = jobs * w["per_job"] / seconds
    return {"case": case, "workers": workers, "mode": mode, "jobs": jobs, "seconds": seconds,
            "jobs_per_s": jobs / seconds, "unit": w["unit"], "rate": rate, "direct_rate": direct_rate,
            "ratio_vs_direct": rate / direct_rate, "est_geomean_ratio": est["geomean_ratio"],
            "est_mean_abs_rel_error": est["mean_abs_rel_error"]}


def device_loop_rows(model, w: dict, *, quick: bool, repeat: int, guests: int = 4, in_flight: int = 32,
                     workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    """The daemon's shape of load: one thread, ``guests`` x ``in_flight`` jobs, ready-queue completion."""
    from accel_core import AcceleratorService

    total = guests * in_flight * (1 if quick else 4)
    outs = w["outputs"]
    direct = min(_timed(partial(_direct_calls, w["direct"], outs, total)) for _ in range(repeat))
    direct_rate = total * w["per_job"] / direct
    rows = []
    for nw in workers:
        best, est = math.inf, None
        for _ in range(repeat):
            with AcceleratorService(workers=nw, model=model) as svc:
                secs = _timed(partial(_device_loop, svc, w["op"], w["inputs"][0], outs, guests, in_flight,
                                      total))
                stats = svc.metrics()["accelerators"]["accel0"]["ops"][w["op"].value]["estimate"]
            if secs < best:
                best, est = secs, stats
        assert est is not None
        rows.append(_rate_row(w, f"{w['case']} 1 loop, {guests} guests x {in_flight} in flight", nw,
                              f"submit_burst + collect, {nw} worker(s)", total, best, est, direct_rate))
    return rows


DEVICE_MODES: tuple[tuple[str, float, float], ...] = (  # (mode, spin_seconds, inline_max_seconds)
    ("worker thread", 0.0, 0.0),
    ("worker spins 100 us", 1e-4, 0.0),
    ("inline when idle", 0.0, 1e-4),
)


def device_path_rows(model, *, calls: int, repeat: int, handoff_us: float, n: int = 2048) -> list[dict]:
    """The device's per-job path for one n-point complex64 FFT vs ``accel_core.fft`` in-process.

    Per job: ``Job.create(collect=True)``, ``submit_job(job, accelerator=...)``
    and ``collect(timeout=None)`` from the ready queue (no futures waited on),
    in each of :data:`DEVICE_MODES`; ``create_us`` is Job.create alone (the
    buffer validation the device does in any mode).
    """
    from accel_core import AcceleratorService, Job, Op, fft

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1, n)) + 1j * rng.standard_normal((1, n))).astype(np.complex64)
    out = np.empty_like(x)
    fft(x, out=out)
    direct = min(_timed(lambda: [fft(x, out=out) for _ in range(calls)]) for _ in range(repeat)) / calls
    create = min(_timed(lambda: [Job.create(Op.FFT, x, out, collect=True) for _ in range(calls)])
                 for _ in range(repeat)) / calls
    rows = []
    for mode, spin, inline_max in DEVICE_MODES:
        with AcceleratorService(workers=1, model=model, spin_seconds=spin,
                                inline_max_seconds=inline_max) as svc:
            acc = svc.accelerator("accel0")

            def device_jobs(svc=svc, acc=acc) -> None:
                for _ in range(calls):
                    svc.submit_job(Job.create(Op.FFT, x, out, collect=True), accelerator="accel0")
                    acc.collect(timeout=None)

            device_jobs()
            per_job = min(_timed(device_jobs) for _ in range(repeat)) / calls
            inline = svc.metrics()["accelerators"]["accel0"]["ops"]["fft"]["inline"]
        rows.append({"case": f"device path fft 1x{n} complex64", "workers": 1, "mode": mode,
                     "jobs": calls, "direct_us": direct * 1e6, "service_us": per_job * 1e6,
                     "overhead_us": (per_job - direct) * 1e6, "create_us": create * 1e6,
                     "submit_collect_overhead_us": (per_job - create - direct) * 1e6,
                     "thread_handoff_us": handoff_us, "inline_jobs": inline})
    return rows


def _submitter(svc, op, x, outs: list, in_flight: int, rounds: int) -> None:
    """Keep ``in_flight`` jobs of this thread queued: burst them, wait for them, ``rounds`` times."""
    from accel_core import Job

    for _ in range(rounds):
        jobs = [Job.create(op, x, outs[i % len(outs)]) for i in range(in_flight)]
        taken = svc.submit_burst(jobs)
        assert taken == in_flight, f"burst took {taken} of {in_flight} (unbounded queue)"
        for j in jobs:
            j.wait()


def submitters_rows(model, w: dict, *, quick: bool, repeat: int, submitters: int = 4, in_flight: int = 32,
                    workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    """``submitters`` threads x ``in_flight`` jobs each through submit_burst vs direct calls, 1 thread."""
    import threading

    from accel_core import AcceleratorService

    rounds = 1 if quick else 4
    jobs = submitters * in_flight * rounds
    outs = w["outputs"]
    x = w["inputs"][0]
    direct = min(_timed(partial(_direct_calls, w["direct"], outs, jobs)) for _ in range(repeat))
    direct_rate = jobs * w["per_job"] / direct
    rows = []
    for nw in workers:
        best, est = math.inf, None
        for _ in range(repeat):
            with AcceleratorService(workers=nw, model=model) as svc:
                threads = [threading.Thread(target=_submitter, name=f"accel-bench-submitter-{i}",
                                            args=(svc, w["op"], x, outs, in_flight, rounds))
                           for i in range(submitters)]

                def run_all(threads=threads) -> None:
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

                secs = _timed(run_all)
                stats = svc.metrics()["accelerators"]["accel0"]["ops"][w["op"].value]["estimate"]
            if secs < best:
                best, est = secs, stats
        assert est is not None
        rows.append(_rate_row(w, f"{w['case']} {submitters} submitters x {in_flight} in flight", nw,
                              f"submit_burst, {nw} worker(s)", jobs, best, est, direct_rate))
    return rows


def _estimate_mix(rng) -> list[tuple[Any, Any, dict]]:
    """(op, input, params) shapes the estimate run cycles through: several sizes per operation."""
    from accel_core import Op, turbo_encode

    mix: list[tuple[Any, Any, dict]] = []
    for op in (Op.FFT, Op.IFFT):
        for n, b in ((256, 1), (2048, 1), (2048, 16), (4096, 4)):
            mix.append((op, (rng.standard_normal((b, n)) + 1j * rng.standard_normal((b, n))
                             ).astype(np.complex64), {}))
    for k, b in ((1024, 1), (6144, 2)):
        mix.append((Op.TURBO_ENCODE, rng.integers(0, 2, (b, k), dtype=np.uint8), {}))
    for k, b, it in ((1024, 1, 4), (2048, 4, 2)):
        info = rng.integers(0, 2, (b, k), dtype=np.uint8)
        mix.append((Op.TURBO_DECODE, (1.0 - 2.0 * turbo_encode(info).astype(np.float32)) * 2.0,
                    {"iterations": it}))
    return mix


def run_estimate_bench(model, *, quick: bool = False, workers: int = 1, in_flight: int = 4) -> list[dict]:
    """Mean absolute error of the service-time estimates per operation, over a mix of sizes.

    One submitter keeps ``in_flight`` jobs queued, cycling through
    :func:`_estimate_mix`; the errors are those the accelerator's metrics
    record (estimate made at submit vs measured service time), over every job
    (``mae``) and over the second half of the run (``mae_after_warmup``,
    once the online fit has seen each shape).
    """
    from collections import deque

    from accel_core import AcceleratorService, Job

    rng = np.random.default_rng(11)
    mix = _estimate_mix(rng)
    rounds = 30 if quick else 120
    outs = [None] * len(mix)
    half: dict[str, dict] = {}
    trace: list = []
    online = model.online
    if online is not None:
        online.trace = trace
    with AcceleratorService(workers=workers, model=model) as svc:
        pending: deque = deque()
        for r in range(rounds):
            if r == rounds // 2:
                half = svc.metrics()["accelerators"]["accel0"]["ops"]
            for i, (op, x, params) in enumerate(mix):
                pending.append(svc.submit_job(Job.create(op, x, outs[i], **params)))
                while len(pending) >= in_flight:
                    pending.popleft().wait()
        for j in pending:
            j.wait()
        ops = svc.metrics()["accelerators"]["accel0"]["ops"]
    if online is not None:
        online.trace = None
    floor = _oracle_floor(trace)
    rows = []
    for op, c in ops.items():
        e = c["estimate"]
        if not e["count"]:
            continue
        h = half[op]["estimate"]
        n2 = e["count"] - h["count"]
        mae2 = ((e["mean_abs_rel_error"] * e["count"] - (h["mean_abs_rel_error"] or 0.0) * h["count"]) / n2
                if n2 else None)
        rows.append({"op": op, "jobs": e["count"], "workers": workers,
                     "shapes": sum(1 for m in mix if m[0].value == op),
                     "mae": e["mean_abs_rel_error"], "mae_after_warmup": mae2,
                     "oracle_floor": floor.get(op), "geomean_ratio": e["geomean_ratio"]})
    return rows


def _oracle_floor(trace: list) -> dict[str, float]:
    """Same-run baseline for the MAE: per operation, the error of the best *constant* estimate of
    each shape, chosen after the fact over the second half of its samples (the jitter no per-shape
    model can remove)."""
    by_class: dict[tuple, list[float]] = {}
    for key, feats, _base, measured in trace:
        by_class.setdefault((key, feats), []).append(measured)
    err: dict[str, list[float]] = {}
    for (key, _feats), ms in by_class.items():
        tail = np.asarray(ms[len(ms) // 2:])
        if not tail.size:
            continue
        best = min(float(np.mean(np.abs(e - tail) / tail)) for e in tail)  # error relative to measured
        err.setdefault(key.split("/")[0], []).extend([best] * tail.size)
    return {op: float(np.mean(v)) for op, v in err.items()}


def _thread_handoff_us(calls: int, repeat: int) -> float:
    """Floor for any thread-pool round trip here: bare ping-pong with a thread over two SimpleQueues."""
    import queue
    import threading

    req: queue.SimpleQueue = queue.SimpleQueue()
    rsp: queue.SimpleQueue = queue.SimpleQueue()

    def echo() -> None:
        while (item := req.get()) is not None:
            rsp.put(item)

    t = threading.Thread(target=echo, name="accel-bench-echo")
    t.start()
    try:
        def pingpong() -> None:
            for i in range(calls):
                req.put(i)
                rsp.get()

        pingpong()
        return min(_timed(pingpong) for _ in range(repeat)) / calls * 1e6
    finally:
        req.put(None)
        t.join()


def model_rows(model) -> list[dict]:
    """The calibrated cost model as rows (a: per-job overhead, b: per work unit)."""
    return [{"key": key, "a_us": c.a * 1e6, "b_ns_per_unit": [b * 1e9 for b in c.b], "points": c.points,
             "fit_rms_rel_error": c.rms_rel_error} for key, c in sorted(model.costs.items())]


# --------------------------------------------------------------------------- everything


def run_accel_bench(*, quick: bool = False, sections: tuple[str, ...] = SECTIONS,
                    commpy_frames: int | None = None) -> dict:
    """Run the chosen sections; returns ``{"machine": ..., "<section>": [rows], ...}``."""
    from accel_core import ServiceTimeModel, simd
    from accel_core.estimate import cpu_model

    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "vcpus": os.cpu_count(), "quick": quick,
                                       "simd": simd.simd_path(), "simd_available": simd.available_paths()}}
    if "fft" in sections:
        from vrdma.accel_bench.fft_bench import run_fft_bench

        if quick:
            out["fft"] = run_fft_bench(sizes=(2048,), repeat=3, sample_s=0.01)
        else:
            out["fft"] = run_fft_bench()
    if "turbo" in sections:
        from vrdma.accel_bench.turbo_bench import run_turbo_bench

        cf = commpy_frames if commpy_frames is not None else (0 if quick else 1)
        if quick:
            out["turbo"] = run_turbo_bench(frames=16, batch=16, commpy_frames=cf, repeat=1)
        else:
            out["turbo"] = run_turbo_bench(commpy_frames=cf)
    if "service" in sections:
        t0 = time.perf_counter()
        model = ServiceTimeModel.calibrate(quick=quick)
        out["calibration"] = {"seconds": time.perf_counter() - t0, "costs": model_rows(model)}
        out["service"] = run_service_bench(quick=quick, model=model)
        out["estimates"] = run_estimate_bench(model, quick=quick)
    return out


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _fft_line(r: dict) -> tuple[str, str, str, str, str]:
    """One bench_fft row -> (case, ours, baseline, ratio, note)."""
    if r.get("case") == "call overhead":
        return (f"call overhead fft 1x{r['size']} {r['dtype']}", f"{r['fft_out_us']:.2f} us/call",
                f"kernel {r['kernel_us']:.2f} us, empty Cython call {r['noop_us']:.3f} us",
                f"+{r['overhead_us']:.2f} us", "fft(x, out=) with a cached plan")
    ratios = f"x{r['speedup_vs_scipy']:.2f} vs scipy"
    base = f"scipy {r['scipy_us']:.2f} us"
    if r.get("pyfftw_us") is not None:
        base += f", pyFFTW {r['pyfftw_us']:.2f} us"
        ratios += f", x{r['speedup_vs_pyfftw']:.2f} vs pyFFTW"
    return (f"fft {r['batch']}x{r['size']} {r['dtype']} ({r.get('batch_kib', '?')} KiB)",
            f"{r['ours_us']:.2f} us/transform", base, ratios, f"max rel err {r['max_rel_err']:.1e}")


def format_table(res: dict) -> str:
    """One table over every section: section | case | ours | baseline | ratio | note."""
    rows: list[tuple[str, ...]] = []
    rows.extend(("fft", *_fft_line(r)) for r in res.get("fft", []))
    turbo = res.get("turbo", [])
    commpy = next((r for r in turbo if "commpy" in r["impl"]), None)
    for r in turbo:
        ratio = r.get("ratio_vs_commpy")
        rows.append(("turbo", f"{r['impl']} K={r['K']} it={r['iterations']} batch={r['batch']}",
                     f"{r['mbit_s']:.4g} Mbit/s",
                     f"commpy {commpy['mbit_s']:.4g} Mbit/s" if commpy else "commpy skipped",
                     f"x{ratio:.0f}" if ratio is not None else "-",
                     f"{r['frames']} frames, {r['bit_errors']} bit errors @ {r['ebn0_db']} dB"
                     + (f"; {r['mbit_s_cpu']:.4g} Mbit/s of CPU time" if "mbit_s_cpu" in r else "")))
    rows.extend(("model", r["key"], f"a={r['a_us']:.2f} us",
                 "b=" + "/".join(f"{b:.4f}" for b in r["b_ns_per_unit"]) + " ns/unit", "-",
                 f"{r['points']} points, fit rms rel err {_fmt(r['fit_rms_rel_error'], '.2f')}")
                for r in res.get("calibration", {}).get("costs", []))
    for r in res.get("service", []):
        if "create_us" in r:
            rows.append(("service", f"{r['case']}: {r['mode']}", f"{r['service_us']:.1f} us/job",
                         (f"direct fft {r['direct_us']:.1f} us; "
                          f"bare thread ping-pong {r['thread_handoff_us']:.1f} us"),
                         f"+{r['overhead_us']:.1f} us",
                         (f"Job.create {r['create_us']:.1f} us + submit/collect "
                          f"+{r['submit_collect_overhead_us']:.1f} us; {r['inline_jobs']} inline")))
            continue
        if "overhead_us" in r:
            rows.append(("service", r["case"], f"{r['service_us']:.1f} us/job",
                         (f"direct {r['direct_us']:.1f} us; "
                          f"bare thread ping-pong {r['thread_handoff_us']:.1f} us"),
                         f"+{r['overhead_us']:.1f} us", r["mode"]))
            continue
        est = ""
        if r.get("est_geomean_ratio") is not None:
            est = (f"measured/estimate geomean {r['est_geomean_ratio']:.2f}, "
                   f"mean |err| {100 * r['est_mean_abs_rel_error']:.0f}%")
        rows.append(("service", f"{r['case']}: {r['mode']}", f"{r['rate']:.1f} {r['unit']}",
                     f"direct {r['direct_rate']:.1f} {r['unit']}", f"x{r['ratio_vs_direct']:.2f}", est))
    rows.extend(("estimate", f"{r['op']} ({r['shapes']} shapes, {r['workers']} worker)",
                 f"MAE {100 * r['mae']:.1f}%", "-", "-",
                 (f"{r['jobs']} jobs; second half MAE {100 * r['mae_after_warmup']:.1f}% vs best constant "
                  f"per shape {100 * (r['oracle_floor'] or 0.0):.1f}%; "
                  f"measured/estimate geomean {r['geomean_ratio']:.2f}"
                  if r["mae_after_warmup"] is not None else f"{r['jobs']} jobs"))
                for r in res.get("estimates", []))
    head = ("section", "case", "ours", "baseline", "ratio", "note")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    m = res.get("machine") or {}
    paths = " ".join(m.get("simd_available", ()))
    lines = [(f"# machine: {m.get('cpu', '?')}; {m.get('vcpus', '?')} vCPUs; kernels' SIMD path "
              f"{m.get('simd', '?')} (available: {paths}; VRDMA_SIMD forces one)")] if m else []
    lines += ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds, not minutes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--only", choices=SECTIONS, action="append",
                   help="run only this section (repeatable); default: all")
    p.add_argument("--commpy-frames", type=int, default=None,
                   help="Turbo blocks decoded by scikit-commpy for the ratio (default 1; 0 in --quick)")


def run(args: argparse.Namespace) -> int:
    if args.commpy_frames is not None and args.commpy_frames < 0:
        print(f"accel-bench: --commpy-frames must be >= 0, got {args.commpy_frames}", file=sys.stderr)
        return 2
    sections = tuple(args.only) if args.only else SECTIONS
    res = run_accel_bench(quick=args.quick, sections=sections, commpy_frames=args.commpy_frames)
    print(json.dumps(res, indent=2, default=str) if args.json else format_table(res))
    return 0
