"""LTE turbo decoder throughput (K = 6144, 8 iterations, one core) against scikit-commpy.

Both decoders get the same noisy frames: a random block, turbo-encoded, BPSK
(0 -> +1) over AWGN at ``ebn0_db``. vrdma's accel_core.turbo decodes them in
batches of ``batch`` code blocks (max-log-MAP, scaled extrinsic); commpy's
``commpy.channelcoding.turbo.turbo_decode`` (log-MAP in the probability domain,
pure Python) gets a commpy Trellis of the same RSC code (memory 3, g = [13, 15]
octal, feedback 13), an interleaver object carrying the same QPP permutation and
the same received symbols (commpy maps bit 1 -> +1, so the signs are flipped; it
ignores the tail). commpy is slow (seconds per block), so it runs on
``commpy_frames`` blocks only. Throughput counts information bits per second of
wall time of the decode calls alone (the decoder is single-threaded), and, as
``mbit_s_cpu``, per second of the calling thread's CPU time (``time.thread_time``:
on a machine shared with other work the wall clock also counts the time the
benchmark was descheduled). vrdma's decoder runs on each SIMD path asked for
(``paths``; default the one in use, see accel_core.simd), the paths interleaved
repeat by repeat.

Run: ``python -m vrdma.accel_bench.turbo_bench [--frames N] [--batch B] [--simd all] [--json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from accel_core import simd
from accel_core.qpp import qpp_table
from accel_core.turbo import turbo_decode, turbo_encode

__all__ = ["awgn_frames", "run_turbo_bench", "main"]

RATE = 1.0 / 3.0


def awgn_frames(K: int, frames: int, ebn0_db: float, rng: np.random.Generator):
    """(bits [F, K], received y [F, 3, K+4], sigma^2) for BPSK 0 -> +1 at Eb/N0 (R = 1/3)."""
    sigma2 = 1.0 / (2.0 * RATE * 10.0 ** (ebn0_db / 10.0))
    bits = rng.integers(0, 2, (frames, K), dtype=np.uint8)
    y = 1.0 - 2.0 * turbo_encode(bits).astype(np.float32)
    y += rng.standard_normal(y.shape, dtype=np.float32) * np.float32(np.sqrt(sigma2))
    return bits, y, sigma2


def _time_vrdma(llr, iterations, batch, scaling, repeat, paths):
    """{path: (best wall s, best thread CPU s, decoded bits)}, the paths interleaved."""
    best: dict[str, list] = {p: [float("inf"), float("inf"), None] for p in paths}
    start = simd.simd_path()
    try:
        for p in paths:             # warm-up: interleaver tables, plan caches, page faults
            simd.use(p)
            turbo_decode(llr[:1], iterations=1, scaling=scaling)
        for _ in range(repeat):
            for p in paths:
                simd.use(p)
                c0, t0 = time.thread_time(), time.perf_counter()
                parts = [turbo_decode(llr[i:i + batch], iterations=iterations, scaling=scaling)[0]
                         for i in range(0, llr.shape[0], batch)]
                t1, c1 = time.perf_counter(), time.thread_time()
                b = best[p]
                b[0], b[1], b[2] = min(b[0], t1 - t0), min(b[1], c1 - c0), np.concatenate(parts)
    finally:
        simd.use(start)
    return {p: tuple(v) for p, v in best.items()}


def _time_commpy(y, sigma2, K, iterations):
    from commpy.channelcoding import Trellis, turbo as cturbo
    from commpy.channelcoding.interleavers import RandInterlv

    trellis = Trellis(np.array([3]), np.array([[0o13, 0o15]]), feedback=0o13, code_type="rsc")
    interleaver = RandInterlv(K, 0)
    interleaver.p_array = qpp_table(K).astype(np.int64)   # c'_i = c_pi(i), as in 36.212
    decoded = []
    t0 = time.perf_counter()
    for f in range(y.shape[0]):
        s = -y[f].astype(np.float64)                      # commpy: bit 1 -> +1
        decoded.append(cturbo.turbo_decode(s[0, :K], s[1, :K], s[2, :K], trellis, sigma2,
                                           iterations, interleaver))
    return time.perf_counter() - t0, np.array(decoded, dtype=np.uint8)


def run_turbo_bench(K: int = 6144, iterations: int = 8, frames: int = 128, batch: int = 32,
                    *, scaling: float | None = 0.75, ebn0_db: float = 1.0,
                    commpy_frames: int = 2, repeat: int = 3, seed: int = 0,
                    paths: tuple[str, ...] | None = None) -> list[dict]:
    """Decode ``frames`` noisy blocks with vrdma (batch sizes ``batch`` and 1, on each SIMD
    path of ``paths``) and ``commpy_frames`` of them with commpy; one dict per implementation
    with Mbit/s (information bits per second) and the ratio against commpy measured in this run."""
    paths = paths or (simd.simd_path(),)
    rng = np.random.default_rng(seed)
    bits, y, sigma2 = awgn_frames(K, frames, ebn0_db, rng)
    llr = y * np.float32(2.0 / sigma2)
    rows = []

    def row(impl, nframes, b, seconds, decoded, cpu=None, path=None):
        r = {"impl": impl, "K": K, "iterations": iterations, "frames": nframes, "batch": b,
             "ebn0_db": ebn0_db, "seconds": seconds,
             "mbit_s": nframes * K / seconds / 1e6,
             "bit_errors": int((decoded != bits[:nframes]).sum())}
        if cpu is not None:
            r.update(simd_path=path, cpu_seconds=cpu, mbit_s_cpu=nframes * K / cpu / 1e6)
        return r

    lanes = {p: simd.kernel_module("turbo", p).BATCH_LANES for p in paths}
    n1 = min(frames, 8)
    many = _time_vrdma(llr, iterations, batch, scaling, repeat, paths)
    one = _time_vrdma(llr[:n1], iterations, 1, scaling, repeat, paths)
    for p in paths:
        secs, cpu, dec = many[p]
        rows.append(row(f"vrdma int16 max-log-MAP x{scaling} [{p}, {lanes[p]} lanes]",
                        frames, batch, secs, dec, cpu, p))
        secs, cpu, dec = one[p]
        rows.append(row(f"vrdma [{p}], one block per call", n1, 1, secs, dec, cpu, p))
    if commpy_frames > 0:
        nc = min(frames, commpy_frames)
        secs, dec = _time_commpy(y[:nc], sigma2, K, iterations)
        rows.append(row("commpy turbo_decode (log-MAP, Python)", nc, 1, secs, dec))
        base = rows[-1]["mbit_s"]
        for r in rows:
            r["ratio_vs_commpy"] = r["mbit_s"] / base
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'implementation':<48} {'K':>5} {'it':>3} {'frames':>6} {'batch':>5} "
            f"{'Mbit/s':>9} {'(CPU)':>9} {'x commpy':>9} {'bit err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio_vs_commpy']:.0f}" if "ratio_vs_commpy" in r else "-"
        cpu = f"{r['mbit_s_cpu']:.4g}" if "mbit_s_cpu" in r else "-"
        lines.append(f"{r['impl']:<48} {r['K']:>5} {r['iterations']:>3} {r['frames']:>6} "
                     f"{r['batch']:>5} {r['mbit_s']:>9.4g} {cpu:>9} {ratio:>9} {r['bit_errors']:>8}")
    return "\n".join(lines)


def _paths(arg: str) -> tuple[str, ...] | None:
    if arg == "all":
        return simd.available_paths()
    return tuple(p for p in arg.split(",") if p) or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=6144)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--scaling", type=float, default=0.75, help="extrinsic scaling, 0 = none")
    p.add_argument("--ebn0", type=float, default=1.0, help="Eb/N0 of the test frames in dB")
    p.add_argument("--commpy-frames", type=int, default=2, help="0 skips commpy")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simd", default="",
                   help="SIMD paths to run: 'all' (every path the CPU has) or a comma list "
                        "(default: the path in use)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    rows = run_turbo_bench(a.K, a.iterations, a.frames, a.batch, scaling=a.scaling or None,
                           ebn0_db=a.ebn0, commpy_frames=a.commpy_frames, repeat=a.repeat,
                           seed=a.seed, paths=_paths(a.simd))
    from vrdma.accel_bench.fft_bench import machine_line
    print(json.dumps(rows, indent=2) if a.json else machine_line() + "\n" + _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
