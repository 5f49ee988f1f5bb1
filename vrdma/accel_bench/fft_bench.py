"""Batched complex FFT: accel_core.fft against scipy.fft and pyFFTW, one core.

For every size and dtype, a batch of ``rows`` transforms whose data fits in L2
(``rows * n * itemsize`` = 256 KiB by default, e.g. 16 x 2048 complex64) is
transformed out of place, all three implementations measured interleaved in
the same run:

* ours: ``accel_core.fft(x, out=o)`` (plan cached, GIL released), on each SIMD path
  asked for (``paths``; default the one in use, see accel_core.simd: VRDMA_SIMD forces
  it), every path interleaved with the baselines;
* scipy: ``scipy.fft.fft(x, axis=-1, workers=1)`` (pocketfft);
* pyFFTW: a ``pyfftw.FFTW`` object planned with FFTW_MEASURE, threads=1, on
  aligned arrays, planned outside the timing and executed with ``f()``.

Times are the best of ``repeat`` samples (each sample many calls, about
``sample_s`` seconds) of the calling thread's CPU time (``time.thread_time``: every
implementation runs in the calling thread here, and on a machine shared with other
work a wall clock would also count the time the benchmark was descheduled),
reported as microseconds per transform; ratios are
``baseline_us / ours_us`` (> 1 means we are faster). The call-overhead rows time
``fft`` on a 1-row batch with a cached plan against an empty Cython call
(``accel_core._fft.noop``) and against the bare kernel (``FFTCore.execute``).
``--against 4*4*4*4*8`` adds one more baseline, interleaved with the rest: the same
build's kernel running that stage schedule (``FFTCore.execute`` on the same arrays, on
each path; for the sizes it factors), to compare a schedule change before / after in
one sitting (``x sched`` = its time / ours).

Run: ``python -m vrdma.accel_bench.fft_bench [--sizes 2048,1536] [--dtypes complex64] [--simd all]
[--repeat 7] [--against 4*4*4*4*8] [--json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np

__all__ = ["run_fft_bench", "call_overhead", "machine_line", "main"]

DEFAULT_SIZES = (128, 256, 512, 1024, 1536, 2048, 3072, 4096)
DEFAULT_DTYPES = ("complex64", "complex128")
BATCH_BYTES = 256 * 1024


def _per_call(fn, number: int) -> float:
    t0 = time.thread_time()
    for _ in range(number):
        fn()
    return (time.thread_time() - t0) / number


def _calibrate(fn, sample_s: float) -> int:
    number = 1
    while True:
        t = _per_call(fn, number) * number
        if t >= sample_s / 4 or number >= 1 << 20:
            return max(1, int(number * sample_s / max(t, 1e-9)))
        number *= 4


def _best_of(fns: dict, repeat: int, sample_s: float) -> dict:
    """Best per-call time of each callable, samples interleaved across callables."""
    numbers = {k: _calibrate(f, sample_s) for k, f in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            best[k] = min(best[k], _per_call(f, numbers[k]))
    return best


def _pyfftw_plan(x: np.ndarray):
    try:
        import pyfftw
    except ImportError:  # optional baseline
        return None
    a = pyfftw.empty_aligned(x.shape, dtype=x.dtype)
    b = pyfftw.empty_aligned(x.shape, dtype=x.dtype)
    f = pyfftw.FFTW(a, b, axes=(-1,), direction="FFTW_FORWARD", flags=("FFTW_MEASURE",), threads=1)
    a[...] = x
    return f, b


def _on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the kernels switched to ``path`` (the switch costs well under 1 us)."""
    from accel_core import simd

    def call() -> object:
        simd.use(path)
        return fn()
    return call


def run_fft_bench(sizes=DEFAULT_SIZES, dtypes=DEFAULT_DTYPES, repeat: int = 7,
                  batch_bytes: int = BATCH_BYTES, sample_s: float = 0.02,
                  overhead: bool = True, paths: tuple[str, ...] | None = None,
                  against: tuple[int, ...] | None = None) -> list[dict]:
    """One row per (size, dtype, SIMD path) plus call-overhead rows; see the module docstring."""
    import scipy.fft

    from accel_core import dft as fftmod, simd
    start = simd.simd_path()
    paths = paths or (start,)
    try:
        return _run(sizes, dtypes, repeat, batch_bytes, sample_s, overhead, paths, scipy.fft, fftmod,
                    against)
    finally:
        simd.use(start)


def _run(sizes, dtypes, repeat, batch_bytes, sample_s, overhead, paths, scipy_fft, fftmod,
         against=None) -> list[dict]:
    from accel_core import simd
    rows: list[dict] = []
    rng = np.random.default_rng(1)
    for dtype in dtypes:
        dt = np.dtype(dtype)
        for n in sizes:
            rows_n = max(1, batch_bytes // (n * dt.itemsize))
            x = (rng.standard_normal((rows_n, n)) + 1j * rng.standard_normal((rows_n, n))).astype(dt)
            out = np.empty_like(x)
            ref = np.fft.fft(x.astype(np.complex128), axis=-1)
            err = {}
            sched = {}
            fns: dict[str, Callable[[], object]] = {}
            for p in paths:
                simd.use(p)
                fftmod.fft(x, out=out)  # build + cache the plan outside the timing
                err[p] = float(np.abs(out - ref).max() / np.abs(ref).max())
                sched[p] = fftmod.schedule_for(n, dt == np.complex128, p)
                fns[p] = _on_path(p, partial(fftmod.fft, x, out=out))
                if against and int(np.prod(against)) == n:
                    alt = fftmod._build_core(n, dt == np.complex128, False, p, tuple(against))
                    fns["alt " + p] = partial(alt.execute, x, np.empty_like(x))
            fns["scipy"] = partial(scipy_fft.fft, x, axis=-1, workers=1)
            pw = _pyfftw_plan(x)
            if pw is not None:
                fns["pyfftw"] = pw[0]
            best = _best_of(fns, repeat, sample_s)
            us = {k: v * 1e6 / rows_n for k, v in best.items()}
            rows.extend({
                "case": "fft", "size": n, "dtype": dt.name, "batch": rows_n, "simd_path": p,
                "batch_kib": x.nbytes // 1024,
                "ours_us": us[p], "scipy_us": us["scipy"], "pyfftw_us": us.get("pyfftw"),
                "speedup_vs_scipy": us["scipy"] / us[p],
                "speedup_vs_pyfftw": (us["pyfftw"] / us[p]) if "pyfftw" in us else None,
                "max_rel_err": err[p], "radices": list(sched[p]),
                "against": list(against) if "alt " + p in us else None, "against_us": us.get("alt " + p),
                "speedup_vs_against": (us["alt " + p] / us[p]) if "alt " + p in us else None,
            } for p in paths)
    if overhead:
        for p in paths:
            simd.use(p)
            rows.extend(call_overhead(repeat=repeat, sample_s=sample_s))
    return rows


def call_overhead(sizes=(16, 1024), dtype="complex64", repeat: int = 7,
                  sample_s: float = 0.02) -> list[dict]:
    """fft() on one row with a cached plan vs an empty Cython call and the bare kernel."""
    from accel_core import _fft, dft as fftmod, simd

    rows = []
    for n in sizes:
        x = np.ones((1, n), dtype=dtype)
        out = np.empty_like(x)
        core = fftmod._core(n, x.dtype == np.complex128, False)
        best = _best_of({
            "fft_out": lambda x=x, out=out: fftmod.fft(x, out=out),
            "fft_alloc": lambda x=x: fftmod.fft(x),
            "kernel": lambda core=core, x=x, out=out: core.execute(x, out),
            "noop": lambda x=x, out=out: _fft.noop(x, out),
        }, repeat, sample_s)
        us = {k: v * 1e6 for k, v in best.items()}
        rows.append({
            "case": "call overhead", "size": n, "dtype": np.dtype(dtype).name, "batch": 1,
            "simd_path": simd.simd_path(),
            "fft_out_us": us["fft_out"], "fft_alloc_us": us["fft_alloc"],
            "kernel_us": us["kernel"], "noop_us": us["noop"],
            # time spent in validation/dispatch on top of the kernel call itself
            "overhead_us": us["fft_out"] - us["kernel"] + us["noop"],
        })
    return rows


def machine_line() -> str:
    """One comment line: processor, vCPUs, the vector features the kernels use, the SIMD paths."""
    import os

    from accel_core import _fft, simd
    from accel_core.estimate import cpu_model
    features = " ".join(sorted(_fft.cpu_features())) or "none"
    return (f"# machine: {cpu_model()}; {os.cpu_count()} vCPUs; vector features {features}; "
            f"SIMD paths {' '.join(simd.available_paths())} (in use: {simd.simd_path()})")


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    lines = [(f"{'size':>6} {'dtype':>10} {'simd':>6} {'batch':>5} {'ours us':>9} {'scipy us':>9} "
              f"{'pyfftw us':>9} {'x scipy':>8} {'x pyfftw':>8} {'x sched':>8} {'rel err':>8}  stages")]
    for r in rows:
        if r["case"] != "fft":
            continue
        lines.append(
            f"{r['size']:>6} {r['dtype']:>10} {r['simd_path']:>6} {r['batch']:>5} {_fmt(r['ours_us']):>9} "
            f"{_fmt(r['scipy_us']):>9} {_fmt(r['pyfftw_us']):>9} {_fmt(r['speedup_vs_scipy']):>8} "
            f"{_fmt(r['speedup_vs_pyfftw']):>8} {_fmt(r.get('speedup_vs_against')):>8} "
            f"{r['max_rel_err']:>8.1e}  {'*'.join(map(str, r['radices']))}"
            + (f" (against {'*'.join(map(str, r['against']))})" if r.get("against") else ""))
    lines.append("(us per transform; x scipy / x pyfftw = baseline time / ours, > 1 is faster; "
                 "stages: the radices the kernel ran, accel_core.dft.schedule_for)")
    lines.extend(
        f"call overhead n={r['size']} 1 row {r['dtype']} [{r['simd_path']}]: "
        f"fft(out=) {r['fft_out_us']:.2f} us, "
        f"fft() {r['fft_alloc_us']:.2f} us, kernel {r['kernel_us']:.2f} us, "
        f"empty Cython call {r['noop_us']:.3f} us -> overhead {r['overhead_us']:.2f} us"
        for r in rows if r["case"] == "call overhead")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch-kib", type=int, default=BATCH_BYTES // 1024)
    ap.add_argument("--simd", default="",
                    help="SIMD paths to measure: 'all' (every path the CPU has) or a comma list "
                         "(default: the path in use)")
    ap.add_argument("--against", default="",
                    help="a stage schedule such as 4*4*4*4*8 to time as one more same-run baseline "
                         "(the sizes it factors)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.sizes.split(",") if s)
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    try:
        against = tuple(int(r) for r in a.against.split("*") if r) or None
    except ValueError:
        ap.error(f"--against must be radices joined by '*', got {a.against!r}")
    from accel_core import simd
    paths = simd.available_paths() if a.simd == "all" else tuple(p for p in a.simd.split(",") if p)
    rows = run_fft_bench(sizes=sizes, dtypes=tuple(d for d in a.dtypes.split(",") if d),
                         repeat=a.repeat, batch_bytes=a.batch_kib * 1024, paths=paths or None,
                         against=against)
    print(json.dumps(rows, indent=1) if a.json else machine_line() + "\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
