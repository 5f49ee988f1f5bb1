"""Service-time model of the accelerator kernels, calibrated on this machine.

A scheduler deciding where to run a job needs to predict how long it takes
(the cluster scheduler compares the local wait + service time against
2 x transfer time + the remote wait + service time). The model is linear with
non-negative coefficients in a few per-operation work *features*, one fit per
*cost key*:

==============  ==============================================  ==========================
cost key         features                                        model
==============  ==============================================  ==========================
fft/<dtype>      batch * N * passes(N)                           a + b0 * f0 (per dtype)
ifft/<dtype>     batch * N * passes(N)                           a + b0 * f0 (per dtype)
turbo_encode     batch * K                                       a + b0 * f0
turbo_decode     batch * K * it, batch * K, idle lane-steps       a + b0 * f0 + b1 * f1 + b2 * f2
==============  ==============================================  ==========================

``a`` is the per-call overhead. ``passes(N)`` is the number of radix passes
of an N-point mixed-radix FFT with radices 8, 4, 5, 3 and 2: ``ceil(a/3) + b + c``
for ``N = 2^a 3^b 5^c`` (:func:`fft_passes`). Each pass reads and writes the
whole transform, so ``N * passes`` follows the kernel's time far better than
``N log2 N`` does across sizes (a 1200-point transform, five passes, costs
about 1.6 times what ``N log2 N`` predicts from the powers of two). The first
feature of every operation is also the unit of QUERY_ACCEL's ``est_unit_ps``
(:func:`query_units`, docs/virtio-rdma.md 5.x.6.10). The Turbo decoder kernel
(``accel_core._turbo``) cuts each block into P trellis segments (P depends on
K: ``_turbo.segments_for(K, turbo.MIN_SEGMENT)``) and runs ``lanes``
(``_turbo.BATCH_LANES``) segments side by side; a job whose ``batch * P``
segments do not fill the last group of lanes pays for the idle ones too
(``(ceil(batch * P / lanes) * lanes - batch * P) * (K / P) * it`` idle
lane-steps: a single K=40 block costs as much as eight). ``batch * K`` is the
per-block set-up outside the iterations. Turbo decode with early stop is estimated at its full
iteration count (an upper bound).

:meth:`ServiceTimeModel.calibrate` runs each kernel (through the same
:func:`accel_core.jobs.execute` path the workers use) at a few sizes, takes the
median of several runs per point and fits ``a, b >= 0`` by least squares on the
*relative* error (so small and large jobs weigh alike). A model is saved as JSON
(:meth:`save` / :meth:`load`); :meth:`load_or_calibrate` keeps one per machine
in a cache directory, keyed by CPU model, package version and a fingerprint of
the compiled kernel extensions (a rebuilt kernel gets a fresh calibration).
:meth:`nominal` gives an uncalibrated model with order-of-magnitude constants,
for use before any calibration.

Online correction (:class:`OnlineFit`): a calibration made in isolation
misses what a job costs *in the service* on the machine at hand (two workers
sharing caches and memory bandwidth, a slower emulated accelerator, another
tenant's load), so the model keeps learning from the jobs it serves. Each
finished job reports its measured service time (:meth:`ServiceTimeModel.observe`);
per *size class* (cost key + exact work features, i.e. one (op, size, batch,
dtype) shape) the model tracks a correction of the linear fit that minimises
the mean absolute relative error of its estimates, and per cost key the same
for sizes it has not seen yet. An estimate is the linear fit times the
class's correction (an unseen size: the learned linear cost below); see
:class:`OnlineFit` for the update (a weighted median over a window of recent
samples: a stalled job does not move it, a lasting change of speed does).

Learned linear cost (:meth:`ServiceTimeModel.learned_cost`): what the device
reports in QUERY_ACCEL and what an unseen size is estimated with. Per cost
key it is the linear fit refit on the size classes served (each at its
learned estimate, weighted by how many samples back it) together with a grid
of reference shapes (the calibration grid, at the calibrated fit times the
key's learned correction, weighing less as more served classes are warm),
so a few served shapes move the whole line and the grid keeps its slope sane
where nothing was served.
:meth:`ServiceTimeModel.query_cost` is the same fit on the first feature
alone: the two numbers the wire carries.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from accel_core import _turbo, turbo
from accel_core.errors import ModelError
from accel_core.jobs import FFT_OPS, Job, JobParams, Op, execute

FORMAT_VERSION = 2  # 2: FFT features are batch * N * passes(N) (1 was N log2 N)
_SHAPE_CACHE_MAX = 4096

Shape = tuple[str, tuple[float, ...], float]  # (cost key, work features, linear-fit seconds)


_COST_KEYS = {(op, np.dtype(dt)): f"{op.value}/{np.dtype(dt).name}"
              for op in FFT_OPS for dt in (np.complex64, np.complex128)}


def cost_key(op: Op, params: JobParams) -> str:
    if op in FFT_OPS:
        key = _COST_KEYS.get((op, cast(np.dtype, params.dtype)))
        return key if key is not None else f"{op.value}/{np.dtype(params.dtype).name}"
    return op.value


def fft_passes(n: int) -> int:
    """Radix passes of an ``n``-point FFT with radices 8, 4, 5, 3, 2: ``ceil(a/3) + b + c``
    for ``n = 2^a 3^b 5^c`` (the count of :func:`accel_core.dft.radices_for`; the
    spec's definition, docs/virtio-rdma.md 5.x.6.10)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ModelError(f"fft size {n!r} is not a positive integer")
    counts = []
    m = int(n)
    for p in (2, 3, 5):
        c = 0
        while m % p == 0:
            m //= p
            c += 1
        counts.append(c)
    if m != 1:
        raise ModelError(f"fft size {n} is not of the form 2^a 3^b 5^c")
    a, b, c = counts
    return -(-a // 3) + b + c


def query_units(op: Op, size: int, batch: int, iterations: int = 0) -> float:
    """The unit of QUERY_ACCEL's ``est_unit_ps`` for a job (docs/virtio-rdma.md 5.x.6.10):
    ``batch * n * passes(n)`` (FFT, IFFT), ``batch * K`` (Turbo encode), ``batch * K *
    iterations`` (Turbo decode). The first work feature of every cost key."""
    if op in FFT_OPS:
        return float(batch * size * fft_passes(size))
    if op is Op.TURBO_ENCODE:
        return float(batch * size)
    return float(batch * size * iterations)


def features(op: Op, params: JobParams) -> tuple[float, ...]:
    """The work features of a job that its cost model is linear in (see the table above)."""
    if op in FFT_OPS:
        n = cast(int, params.n)
        return (query_units(op, n, params.batch),)
    k = cast(int, params.k)
    if op is Op.TURBO_ENCODE:
        return (query_units(op, k, params.batch),)
    it = cast(int, params.iterations)
    b = params.batch
    p = decode_segments(k)
    lanes = decode_lanes()
    segs = b * p
    idle = (-(-segs // lanes) * lanes - segs) * (k // p) * it
    return (query_units(op, k, b, it), float(b * k), float(idle))


def work_units(op: Op, params: JobParams) -> float:
    """The primary work measure (first feature): batch * N * passes(N), batch * K, batch * K * iterations."""
    return features(op, params)[0]


@functools.lru_cache(maxsize=256)
def decode_segments(k: int) -> int:
    """Trellis segments the Turbo decoder cuts a block of ``k`` bits into (1 if it does not say)."""
    seg = getattr(_turbo, "segments_for", None)
    return max(1, int(seg(k, turbo.MIN_SEGMENT))) if seg is not None else 1


def decode_lanes() -> int:
    """Code blocks the Turbo decoder kernel processes side by side (1 if it does not say)."""
    return max(1, int(getattr(_turbo, "BATCH_LANES", 1)))


@dataclass(frozen=True)
class LinearCost:
    """seconds = a + sum(b[i] * feature[i]); missing coefficients count as zero.

    ``rms_rel_error`` is the fit's residual on its calibration points.
    """

    a: float
    b: tuple[float, ...]
    points: int = 0
    rms_rel_error: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.b, tuple):
            object.__setattr__(self, "b", tuple(np.atleast_1d(np.asarray(self.b, dtype=float)).tolist()))

    def __call__(self, feats: Iterable[float] | float) -> float:
        if isinstance(feats, (int, float)):
            feats = (feats,)
        return self.a + sum(b * f for b, f in zip(self.b, feats, strict=False))


def fit_linear(feats: Any, seconds: Iterable[float], weights: Iterable[float] | None = None) -> LinearCost:
    """Fit ``seconds ~ a + b . features`` with a, b >= 0, minimizing the relative error.

    ``feats`` is [points] (one feature) or [points, features]; ``weights``
    (positive, default all 1) weigh the points' squared relative errors. Exact
    non-negative least squares by trying every support set (a handful of
    parameters, so at most 2**(1 + features) small solves).
    """
    t = np.asarray(list(seconds), dtype=np.float64)
    X = np.asarray(feats, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] != t.size or t.size < 2 or X.shape[1] > 4:
        raise ModelError(f"need at least 2 calibration points with 1..4 features, got {X.shape} vs {t.size}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(t)) and np.all(t > 0) and np.all(X >= 0)):
        raise ModelError("calibration points must be finite with positive times and non-negative features")
    w = np.ones_like(t) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != t.shape or not np.all(np.isfinite(w) & (w > 0)):
        raise ModelError(f"weights must be {t.size} positive numbers, got {w.tolist()}")
    sw = np.sqrt(w)
    A = np.concatenate([np.ones((t.size, 1)), X], axis=1) * (sw / t)[:, None]  # relative residuals
    y = sw
    p = A.shape[1]
    best, best_res = np.zeros(p), math.inf
    for mask in range(1, 1 << p):
        cols = [c for c in range(p) if mask >> c & 1]
        sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        coef = np.zeros(p)
        coef[cols] = sol
        res = float(np.sum((A @ coef - y) ** 2))
        if res < best_res - 1e-15:
            best, best_res = coef, res
    rel = (A @ best - y) / sw
    return LinearCost(float(best[0]), tuple(float(v) for v in best[1:]), int(t.size),
                      float(np.sqrt(np.mean(rel * rel))))


# Calibration points: (op, dtype or None, size N or K, batch, iterations).
_FFT_POINTS = [(256, 1), (256, 16), (1024, 4), (2048, 1), (2048, 16), (4096, 8), (16384, 2)]
_FFT_POINTS_QUICK = [(256, 1), (2048, 4), (4096, 8)]
_ENC_POINTS = [(1024, 1), (6144, 1), (6144, 8)]
_ENC_POINTS_QUICK = [(1024, 1), (6144, 2)]
_DEC_POINTS = [(1024, 1, 4), (6144, 1, 2), (6144, 1, 8), (512, 8, 4), (2048, 16, 4), (1024, 32, 2),
               (40, 1, 4), (40, 32, 8), (6144, 2, 4)]
_DEC_POINTS_QUICK = [(1024, 1, 2), (6144, 1, 4), (512, 8, 2), (1024, 16, 2), (40, 1, 4), (6144, 2, 8)]


def _grid_features(key: str) -> list[tuple[float, ...]]:
    """The work features of the calibration grid's shapes of a cost key (reference shapes)."""
    op = Op.parse(key.split("/", 1)[0])
    if op in FFT_OPS:
        return [features(op, JobParams(batch=b, n=n, dtype=np.dtype(np.complex64))) for n, b in _FFT_POINTS]
    if op is Op.TURBO_ENCODE:
        return [features(op, JobParams(batch=b, k=k)) for k, b in _ENC_POINTS]
    return [features(op, JobParams(batch=b, k=k, iterations=it)) for k, b, it in _DEC_POINTS]


def _calibration_job(op: Op, size: int, batch: int, dtype: Any, iterations: int, rng) -> Job:
    if op in FFT_OPS:
        x = (rng.standard_normal((batch, size)) + 1j * rng.standard_normal((batch, size))).astype(dtype)
        return Job.create(op, x)
    if op is Op.TURBO_ENCODE:
        return Job.create(op, rng.integers(0, 2, (batch, size), dtype=np.uint8))
    llr = rng.standard_normal((batch, 3, size + 4)).astype(np.float32) * 2.0
    return Job.create(op, llr, iterations=iterations)


def _time_jobs(jobs: list[Job], repeat: int) -> list[float]:
    """Median seconds of each job, as a worker measures them (the thread's CPU time over
    :func:`accel_core.jobs.execute`). Two warm-up rounds first (plan caches, interleaver
    tables, page faults, clock ramp-up: a process's first runs of a kernel are slow),
    then ``repeat`` rounds over every job, so a slow spell of the machine spreads over
    the points instead of bending the fit at one of them."""
    for _ in range(2):
        for job in jobs:
            execute(job)
    runs: list[list[float]] = [[] for _ in jobs]
    clock = time.thread_time
    for _ in range(repeat):
        for job, r in zip(jobs, runs, strict=True):
            t0 = clock()
            execute(job)
            r.append(clock() - t0)
    return [max(statistics.median(r), 1e-9) for r in runs]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vrdma")
    except Exception:  # not installed (running from a checkout)
        return "0+checkout"


def kernel_fingerprint() -> str:
    """Hash of the compiled accel_core extensions (name, size, mtime)."""
    here = Path(__file__).parent
    h = hashlib.sha1(usedforsecurity=False)  # a cache key, not a secret
    for so in sorted(here.glob("_*.so")) + sorted(here.glob("_*.pyd")):
        st = so.stat()
        h.update(f"{so.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("VRDMA_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vrdma"


ONLINE_WINDOW = 8      # a size class's estimate: the last this many samples (a cost key's: twice that)
ONLINE_MAX_RATIO = 4.0  # a sample weighs as if at most this far from its window's median
ONLINE_WARMUP = 4       # samples after which a size class counts as warm (its weight in refits)
ONLINE_MAX_CLASSES = 4096  # size classes tracked; beyond, new shapes teach only their cost key
REFIT_EVERY = 32        # samples of a cost key between refits of its learned linear cost
REFIT_MAX_CLASSES = 64  # served size classes a refit uses (the most sampled)
GRID_WEIGHT = 1.0       # weight of a reference shape in the refit, / (1 + warm served classes)^2;
CLASS_WEIGHT = 4.0      # a served class weighs up to this once warm (1 + 3 * samples / warmup)


def _weighted_log_median(logs: tuple[float, ...], log_max: float) -> float:
    """The log of the estimate ``e`` minimising ``sum |e - m| / m`` over the samples
    ``m = exp(logs)``: their median weighted by ``1 / m``, each weight taken as if its
    sample were within ``exp(log_max)`` of the plain (lower) median, so that one absurdly
    short time cannot outweigh the rest of the window."""
    srt = sorted(logs)
    mid = srt[(len(srt) - 1) // 2]
    lo, hi = mid - log_max, mid + log_max
    ws = [math.exp(-min(hi, max(lo, x))) for x in srt]
    half = 0.5 * sum(ws)
    acc = 0.0
    for x, w in zip(srt, ws, strict=True):
        acc += w
        if acc >= half:
            return x
    return srt[-1]


class OnlineFit:
    """Learned multiplicative corrections of a linear fit, per size class and per cost key.

    A class's correction is the one that minimises the mean absolute error
    *relative to the measured time*, ``|e - measured| / measured`` (the
    figure the issue sets a goal for), over its last ``window`` samples: their
    median ratio measured / fit, each sample weighted by 1 / measured (as if
    it were within ``max_ratio`` of the window's plain median: one absurdly
    short time cannot outweigh the rest; no sample is clipped, so an
    accelerator emulated 20 times slower than the calibrated kernels is
    learned from its first job). A cost key's is the same
    over its last ``2 x window`` samples of any class. A median, so one
    stalled job (or a shape's slow first jobs: plans, tables, cold caches)
    does not move it; a window, so a lasting change of the machine's speed
    (a busy neighbour, memory settling after start-up) is followed within
    ``window / 2`` jobs.
    Not locked: the owner may call :meth:`observe` from several worker
    threads; every update is one dict store of a tuple (atomic under the
    GIL), so a race loses at most one sample. ``trace``, when a list, gets
    ``(key, features, fit seconds, measured seconds)`` per sample (benchmarks).
    """

    def __init__(self, *, window: int = ONLINE_WINDOW, max_ratio: float = ONLINE_MAX_RATIO,
                 warmup: int = ONLINE_WARMUP) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ModelError(f"online window must be an integer >= 1, got {window!r}")
        if not max_ratio > 1.0:
            raise ModelError(f"online max_ratio must be > 1, got {max_ratio!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ModelError(f"online warmup must be an integer >= 1, got {warmup!r}")
        self.window, self.max_ratio, self.warmup = window, max_ratio, warmup
        self._log_max = math.log(max_ratio)
        # log factor, factor, samples, the window's log ratios (oldest first)
        self._cls: dict[tuple[str, tuple[float, ...]], tuple[float, float, int, tuple[float, ...]]] = {}
        self._key: dict[str, tuple[float, float, int, tuple[float, ...]]] = {}
        self.trace: list[tuple[str, tuple[float, ...], float, float]] | None = None

    def factor(self, key: str, feats: tuple[float, ...]) -> float:
        """Multiplier of the linear fit: the class's, else the key's, else 1."""
        c = self._cls.get((key, feats)) or self._key.get(key)
        return c[1] if c is not None else 1.0

    def key_factor(self, key: str) -> float:
        """Multiplier of the linear fit learned over all of ``key``'s classes (1 before any sample)."""
        c = self._key.get(key)
        return c[1] if c is not None else 1.0

    def class_factor(self, key: str, feats: tuple[float, ...]) -> float | None:
        """Multiplier of the linear fit learned for one size class; None if it has no samples."""
        c = self._cls.get((key, feats))
        return c[1] if c is not None else None

    def classes(self, key: str) -> list[tuple[tuple[float, ...], float, int]]:
        """The size classes of ``key`` with samples: (features, factor, samples) each."""
        return [(f, fac, n) for (k, f), (_, fac, n, _) in list(self._cls.items()) if k == key]

    def _update(self, table: dict, k: Any, lr: float, window: int) -> None:
        prev = table.get(k)
        if prev is None:
            table[k] = (lr, math.exp(lr), 1, (lr,))
            return
        _, _, n, win = prev
        win = (*win[1 - window:], lr) if window > 1 else (lr,)
        r = _weighted_log_median(win, self._log_max)
        table[k] = (r, math.exp(r), n + 1, win)

    def observe(self, key: str, feats: tuple[float, ...], base: float, measured: float) -> None:
        """One finished job: ``measured`` seconds where the linear fit said ``base``."""
        if not (base > 0.0 and measured > 0.0 and math.isfinite(measured)):
            return
        if self.trace is not None:
            self.trace.append((key, feats, base, measured))
        lr = math.log(measured / base)
        cls = (key, feats)
        if len(self._cls) < ONLINE_MAX_CLASSES or cls in self._cls:  # guests choose shapes: bounded
            self._update(self._cls, cls, lr, self.window)
        self._update(self._key, key, lr, 2 * self.window)

    def samples(self, key: str, feats: tuple[float, ...] | None = None) -> int:
        c = self._key.get(key) if feats is None else self._cls.get((key, feats))
        return 0 if c is None else c[2]

    def snapshot(self) -> dict:
        """Per cost key: learned factor and samples (for metrics and the bench)."""
        return {k: {"factor": f, "samples": n} for k, (_, f, n, _) in sorted(self._key.items())}

    def clear(self) -> None:
        self._cls.clear()
        self._key.clear()


REF_UP = 0.005        # log step of a shape's reference towards a longer time (at most to it)
REF_DOWN = 0.05       # ... towards a shorter one: the reference tracks the ~9th percentile
REF_MAX_KEYS = 4096   # shapes with a reference; past it the table starts over
REF_WARMUP = 4        # a shape's first times: its reference is the least of them (cold first calls)


class ReferenceTimes:
    """A steady reference of a measured time per job shape: what an emulated slow
    accelerator multiplies (``Accelerator(slowdown=...)``): the kernel's time
    undisturbed by the host's other work, as a hardware accelerator's speed
    does not depend on the host's load.

    A shape's reference is the least of its first :data:`REF_WARMUP` times (a
    kernel's first calls of a shape run cold, up to twice as long: a
    reference set by one of them would make an emulated accelerator slower
    for the first dozens of jobs of each shape); after that a longer time
    moves it up by ``REF_UP`` in the log (never past that time), a shorter
    one down by ``REF_DOWN`` (never below it): a low-quantile tracker (the
    fraction ``REF_UP / (REF_UP + REF_DOWN)``, about the 9th percentile, of
    the times lies below it). One job that took 10 times as long moves it by
    0.5%; a lasting change of speed is followed (up: about 140 jobs for 2x,
    down: 14). Not locked: one dict store per update (atomic under the GIL);
    a race loses a sample.
    """

    def __init__(self) -> None:
        self._ref: dict[Any, float] = {}
        self._seen: dict[Any, int] = {}  # times taken per shape, while fewer than REF_WARMUP

    def update(self, key: Any, seconds: float) -> float:
        """Take one measured time of ``key``'s shape; returns its reference (seconds)."""
        prev = self._ref.get(key)
        if not (seconds > 0.0 and math.isfinite(seconds)):
            return prev if prev is not None else 0.0
        seen = self._seen.get(key, REF_WARMUP)
        if prev is None:
            if len(self._ref) >= REF_MAX_KEYS:  # guests choose shapes: bounded
                self._ref.clear()
                self._seen.clear()
            ref = seconds
            seen = 0
        elif seen < REF_WARMUP:
            ref = min(prev, seconds)
        elif seconds > prev:
            ref = min(seconds, prev * math.exp(REF_UP))
        else:
            ref = max(seconds, prev * math.exp(-REF_DOWN))
        if seen + 1 < REF_WARMUP:
            self._seen[key] = seen + 1
        else:
            self._seen.pop(key, None)
        self._ref[key] = ref
        return ref

    def get(self, key: Any) -> float | None:
        return self._ref.get(key)

    def __len__(self) -> int:
        return len(self._ref)


class ServiceTimeModel:
    """Per-operation linear service-time model; ``estimate(job) -> seconds``.

    With ``online=True`` the model also learns from :meth:`observe` (see
    :class:`OnlineFit`); models made by :meth:`nominal`, :meth:`calibrate` and
    :meth:`load` do; a model built from explicit costs keeps them fixed unless
    asked (``online=False`` is the constructor's default).
    """

    def __init__(self, costs: dict[str, LinearCost], *, calibrated: bool, meta: dict | None = None,
                 online: bool | OnlineFit = False) -> None:
        self.costs = dict(costs)
        self.calibrated = calibrated
        self.meta = dict(meta or {})
        self.online: OnlineFit | None = (online if isinstance(online, OnlineFit)
                                         else OnlineFit() if online else None)
        self._shape: dict[tuple[Op, JobParams], Shape] = {}
        #: per cost key: (key samples at the refit, learned cost, its query_cost)
        self._learned: dict[str, tuple[int, LinearCost, LinearCost]] = {}

    # -- estimating

    def _lookup(self, op: Op, params: JobParams) -> Shape:
        """(cost key, features, linear-fit seconds) of a job shape, cached per shape."""
        hit = self._shape.get((op, params))
        if hit is not None:
            return hit
        key = cost_key(op, params)
        cost = self.costs.get(key)
        if cost is None:
            raise ModelError(f"service-time model has no cost for {key!r} (known: {sorted(self.costs)})")
        feats = features(op, params)
        hit = (key, feats, cost(feats))
        if len(self._shape) >= _SHAPE_CACHE_MAX:  # a guest cycling through shapes cannot grow it
            self._shape.clear()
        self._shape[(op, params)] = hit
        return hit

    def shape(self, op: Op, params: JobParams) -> Shape:
        """A job shape's handle for :meth:`estimate_shape` / :meth:`observe_shape` (one lookup per
        job instead of one per call: the service keeps it from submit to completion)."""
        return self._lookup(op, params)

    def estimate_shape(self, shape: Shape) -> float:
        key, feats, base = shape
        online = self.online
        if online is None:
            return base
        f = online.class_factor(key, feats)
        return base * f if f is not None else self._unseen(key, feats, base)

    def _unseen(self, key: str, feats: tuple[float, ...], base: float) -> float:
        """A size class with no samples: the learned linear cost (the fit itself before any)."""
        online = self.online
        if online is None or not online.samples(key):
            return base
        return self._refit(key, force=False)[1](feats)

    def observe_shape(self, shape: Shape, measured: float) -> None:
        online = self.online
        if online is not None:
            online.observe(shape[0], shape[1], shape[2], measured)

    def base_estimate(self, op: Op, params: JobParams) -> float:
        """The calibrated linear fit alone, without the online correction."""
        return self._lookup(op, params)[2]

    def estimate_params(self, op: Op, params: JobParams) -> float:
        return self.estimate_shape(self._lookup(op, params))

    def estimate(self, job: Job) -> float:
        """Predicted service time of ``job`` in seconds."""
        return self.estimate_params(job.op, job.params)

    def observe(self, op: Op, params: JobParams, measured: float) -> None:
        """Learn from one finished job's measured service time (no-op when not online)."""
        online = self.online
        if online is not None:
            key, feats, base = self._lookup(op, params)
            online.observe(key, feats, base, measured)

    # -- the learned linear cost (QUERY_ACCEL)

    def learned_cost(self, key: str) -> LinearCost:
        """``key``'s linear cost refit on what it learned (see the module docstring); the
        calibrated fit when nothing was learned. Refits when a sample came since the last."""
        return self._refit(key, force=True)[1]

    def query_cost(self, op: Op, dtype: Any = np.complex64) -> LinearCost:
        """The learned cost of ``op`` on its first feature alone (:func:`query_units`): the
        ``est_fixed_ns`` / ``est_unit_ps`` QUERY_ACCEL reports. FFT for ``dtype``."""
        key = cost_key(op, JobParams(batch=1, n=1, dtype=np.dtype(dtype)) if op in FFT_OPS
                       else JobParams(batch=1))
        return self._refit(key, force=True)[2]

    def query_fields(self, op: Op) -> tuple[int, int]:
        """QUERY_ACCEL's ``(est_fixed_ns, est_unit_ps)`` of ``op`` (:meth:`query_cost`, rounded,
        saturating at 2^32 - 1); (0, 0) when the model has no cost for it."""
        try:
            cost = self.query_cost(op)
        except ModelError:
            return 0, 0
        top = (1 << 32) - 1
        return min(round(cost.a * 1e9), top), min(round((cost.b[0] if cost.b else 0.0) * 1e12), top)

    def _refit(self, key: str, *, force: bool) -> tuple[int, LinearCost, LinearCost]:
        """The cached (samples, cost, query cost) of ``key``, refit when ``REFIT_EVERY`` samples
        (``force``: any sample) came since. Races refit twice at worst (the last store wins)."""
        cost = self.costs.get(key)
        if cost is None:
            raise ModelError(f"service-time model has no cost for {key!r} (known: {sorted(self.costs)})")
        online = self.online
        n = online.samples(key) if online is not None else 0
        hit = self._learned.get(key)
        if hit is not None and (n == hit[0] or (not force and n - hit[0] < REFIT_EVERY)):
            return hit
        feats, secs, weights = [], [], []
        seen: set[tuple[float, ...]] = set()
        if online is not None and n:
            served = sorted(online.classes(key), key=lambda c: -c[2])[:REFIT_MAX_CLASSES]
            for f, fac, k in served:
                seen.add(f)
                feats.append(f)
                secs.append(cost(f) * fac)
                weights.append(1.0 + (CLASS_WEIGHT - 1.0) * min(1.0, k / online.warmup))
        scale = online.key_factor(key) if online is not None else 1.0
        warm = sum(1 for w in weights if w >= CLASS_WEIGHT)
        for f in _grid_features(key):  # fade as served classes take over
            if f not in seen and cost(f) > 0:
                feats.append(f)
                secs.append(cost(f) * scale)
                weights.append(GRID_WEIGHT / (1 + warm) ** 2)
        try:
            full = fit_linear(feats, secs, weights)
            first = fit_linear([f[0] for f in feats], secs, weights)
        except ModelError:  # fewer than two usable points: the fit as it is, times the key's factor
            full = LinearCost(cost.a * scale, tuple(b * scale for b in cost.b))
            first = LinearCost(full.a, full.b[:1])
        hit = self._learned[key] = (n, full, first)
        return hit

    # -- construction

    @classmethod
    def nominal(cls) -> ServiceTimeModel:
        """Uncalibrated order-of-magnitude model (a few GFLOP/s FFT, ~1 Mbit/s per 8-iteration block)."""
        per_fft_unit = {"complex64": 3.0e-9, "complex128": 4.5e-9}  # per N * passes
        costs = {}
        for op in FFT_OPS:
            for dt, b in per_fft_unit.items():
                costs[f"{op.value}/{dt}"] = LinearCost(2e-6, (b,))
        costs[Op.TURBO_ENCODE.value] = LinearCost(5e-6, (2e-9,))
        costs[Op.TURBO_DECODE.value] = LinearCost(2e-5, (6e-9, 7e-9, 6e-9))
        return cls(costs, calibrated=False, meta={"source": "nominal"}, online=True)

    @classmethod
    def calibrate(cls, *, quick: bool = False, repeat: int | None = None,
                  ops: Iterable[Op | str] | None = None, seed: int = 1) -> ServiceTimeModel:
        """Time the kernels on this machine and fit the model (about 0.1 s on a 2-vCPU EPYC)."""
        repeat = repeat if repeat is not None else (3 if quick else 9)
        if repeat < 1:
            raise ModelError(f"repeat must be >= 1, got {repeat}")
        wanted = list(Op) if ops is None else [Op.parse(o) for o in ops]
        rng = np.random.default_rng(seed)
        costs: dict[str, LinearCost] = {}
        points: dict[str, list[tuple[tuple[float, ...], float]]] = {}
        grid: list[tuple[Op, str | None, int, int, int]]
        for op in wanted:
            if op in FFT_OPS:
                grid = [(op, dt, n, b, 0) for dt in ("complex64", "complex128")
                        for n, b in (_FFT_POINTS_QUICK if quick else _FFT_POINTS)]
            elif op is Op.TURBO_ENCODE:
                grid = [(op, None, k, b, 0) for k, b in (_ENC_POINTS_QUICK if quick else _ENC_POINTS)]
            else:
                grid = [(op, None, k, b, it) for k, b, it in (_DEC_POINTS_QUICK if quick else _DEC_POINTS)]
            jobs = [_calibration_job(op_, size, batch, dt, it, rng) for op_, dt, size, batch, it in grid]
            for job, sec in zip(jobs, _time_jobs(jobs, repeat), strict=True):
                key = cost_key(job.op, job.params)
                points.setdefault(key, []).append((features(job.op, job.params), sec))
        for key, pts in points.items():
            costs[key] = fit_linear([p[0] for p in pts], [p[1] for p in pts])
        meta = cls.cache_identity()
        meta.update({"source": "calibrate", "quick": quick, "repeat": repeat, "time": time.time(),
                     "points": {k: [[list(f), s] for f, s in v] for k, v in points.items()}})
        return cls(costs, calibrated=True, meta=meta, online=True)

    # -- persistence

    @staticmethod
    def cache_identity() -> dict:
        return {"cpu": cpu_model(), "version": package_version(), "kernels": kernel_fingerprint()}

    @classmethod
    def cache_file(cls, cache_dir: str | os.PathLike | None = None) -> Path:
        ident = cls.cache_identity()
        key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode(), usedforsecurity=False).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return base / f"accel-model-{key}.json"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "calibrated": self.calibrated,
            "meta": self.meta,
            "costs": {k: {"a": c.a, "b": list(c.b), "points": c.points, "rms_rel_error": c.rms_rel_error}
                      for k, c in sorted(self.costs.items())},
        }

    @classmethod
    def from_dict(cls, d: Any) -> ServiceTimeModel:
        if (not isinstance(d, dict) or d.get("format") != FORMAT_VERSION
                or not isinstance(d.get("costs"), dict)):
            raise ModelError(f"not a service-time model of format {FORMAT_VERSION}")
        costs = {}
        for key, c in d["costs"].items():
            try:
                a = float(c["a"])
                b = tuple(float(v) for v in (c["b"] if isinstance(c["b"], list) else [c["b"]]))
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"cost {key!r} lacks numeric a and b") from None
            if not (math.isfinite(a) and a >= 0 and b and all(math.isfinite(v) and v >= 0 for v in b)):
                raise ModelError(f"cost {key!r} has invalid coefficients a={a} b={list(b)}")
            costs[str(key)] = LinearCost(a, b, int(c.get("points") or 0), c.get("rms_rel_error"))
        return cls(costs, calibrated=bool(d.get("calibrated")), meta=d.get("meta") or {}, online=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as JSON (atomically: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ServiceTimeModel:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ModelError(f"cannot read service-time model {path}: {e.strerror}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"service-time model {path} is not JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def load_cached(cls, cache_dir: str | os.PathLike | None = None) -> ServiceTimeModel | None:
        """The cached calibration for this machine and build, or None (missing or unreadable)."""
        path = cls.cache_file(cache_dir)
        if not path.exists():
            return None
        try:
            return cls.load(path)
        except ModelError:
            return None

    @classmethod
    def load_or_calibrate(cls, cache_dir: str | os.PathLike | None = None, *, quick: bool = False
                          ) -> ServiceTimeModel:
        model = cls.load_cached(cache_dir)
        if model is None:
            model = cls.calibrate(quick=quick)
            model.save(cls.cache_file(cache_dir))
        return model

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {c.a * 1e6:.1f}us + [{', '.join(f'{b * 1e9:.3f}' for b in c.b)}]ns/unit"
                          for k, c in sorted(self.costs.items()))
        return f"<ServiceTimeModel {'calibrated' if self.calibrated else 'nominal'} {parts}>"
