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
    return rows


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
    from accel_core import ServiceTimeModel
    from accel_core.estimate import cpu_model

    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "quick": quick}}
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
                     f"{r['frames']} frames, {r['bit_errors']} bit errors @ {r['ebn0_db']} dB"))
    rows.extend(("model", r["key"], f"a={r['a_us']:.2f} us",
                 "b=" + "/".join(f"{b:.4f}" for b in r["b_ns_per_unit"]) + " ns/unit", "-",
                 f"{r['points']} points, fit rms rel err {_fmt(r['fit_rms_rel_error'], '.2f')}")
                for r in res.get("calibration", {}).get("costs", []))
    for r in res.get("service", []):
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
    head = ("section", "case", "ours", "baseline", "ratio", "note")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
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
