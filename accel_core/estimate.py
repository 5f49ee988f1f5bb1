"""Service-time model of the accelerator kernels, calibrated on this machine.

A scheduler deciding where to run a job needs to predict how long it takes
(the cluster scheduler compares the local wait + service time against
2 x transfer time + the remote wait + service time). The model is linear with
non-negative coefficients in a few per-operation work *features*, one fit per
*cost key*:

==============  ==============================================  ==========================
cost key         features                                        model
==============  ==============================================  ==========================
fft/<dtype>      batch * N * log2 N                              a + b0 * f0 (per dtype)
ifft/<dtype>     batch * N * log2 N                              a + b0 * f0 (per dtype)
turbo_encode     batch * K                                       a + b0 * f0
turbo_decode     batch * K * it, ceil(batch / lanes) * K * it    a + b0 * f0 + b1 * f1
==============  ==============================================  ==========================

``a`` is the per-call overhead. The Turbo decoder kernel fills ``lanes`` SIMD
lanes (``accel_core._turbo.BATCH_LANES``) with code blocks or with trellis
segments of one block, so its cost sits between "per block" (f0) and "per
group of ``lanes`` blocks" (f1); the non-negative fit finds the mix on this
machine and build. Turbo decode with early stop is estimated at its full
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
class's correction (or the key's, for an unseen size); see :class:`OnlineFit`
for the update, which a stalled job moves by a bounded step only.
"""
from __future__ import annotations

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

from accel_core import _turbo
from accel_core.errors import ModelError
from accel_core.jobs import FFT_OPS, Job, JobParams, Op, execute

FORMAT_VERSION = 1
_SHAPE_CACHE_MAX = 4096

Shape = tuple[str, tuple[float, ...], float]  # (cost key, work features, linear-fit seconds)


_COST_KEYS = {(op, np.dtype(dt)): f"{op.value}/{np.dtype(dt).name}"
              for op in FFT_OPS for dt in (np.complex64, np.complex128)}


def cost_key(op: Op, params: JobParams) -> str:
    if op in FFT_OPS:
        key = _COST_KEYS.get((op, cast(np.dtype, params.dtype)))
        return key if key is not None else f"{op.value}/{np.dtype(params.dtype).name}"
    return op.value


def features(op: Op, params: JobParams) -> tuple[float, ...]:
    """The work features of a job that its cost model is linear in (see the table above)."""
    if op in FFT_OPS:
        n = cast(int, params.n)
        return (float(params.batch * n * math.log2(n)),)
    k = cast(int, params.k)
    if op is Op.TURBO_ENCODE:
        return (float(params.batch * k),)
    per_block = float(k * cast(int, params.iterations))
    groups = -(-params.batch // decode_lanes())
    return (params.batch * per_block, groups * per_block)


def work_units(op: Op, params: JobParams) -> float:
    """The primary work measure (first feature): batch * N log2 N, batch * K, batch * K * iterations."""
    return features(op, params)[0]


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


def fit_linear(feats: Any, seconds: Iterable[float]) -> LinearCost:
    """Fit ``seconds ~ a + b . features`` with a, b >= 0, minimizing the relative error.

    ``feats`` is [points] (one feature) or [points, features]. Exact
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
    A = np.concatenate([np.ones((t.size, 1)), X], axis=1) / t[:, None]  # relative residuals
    y = np.ones_like(t)
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
    rel = A @ best - y
    return LinearCost(float(best[0]), tuple(float(v) for v in best[1:]), int(t.size),
                      float(np.sqrt(np.mean(rel * rel))))


# Calibration points: (op, dtype or None, size N or K, batch, iterations).
_FFT_POINTS = [(256, 1), (256, 16), (1024, 4), (2048, 1), (2048, 16), (4096, 8), (16384, 2)]
_FFT_POINTS_QUICK = [(256, 1), (2048, 4), (4096, 8)]
_ENC_POINTS = [(1024, 1), (6144, 1), (6144, 8)]
_ENC_POINTS_QUICK = [(1024, 1), (6144, 2)]
_DEC_POINTS = [(1024, 1, 4), (6144, 1, 2), (6144, 1, 8), (512, 8, 4), (2048, 16, 4), (1024, 32, 2)]
_DEC_POINTS_QUICK = [(1024, 1, 2), (6144, 1, 4), (512, 8, 2), (1024, 16, 2)]


def _calibration_job(op: Op, size: int, batch: int, dtype: Any, iterations: int, rng) -> Job:
    if op in FFT_OPS:
        x = (rng.standard_normal((batch, size)) + 1j * rng.standard_normal((batch, size))).astype(dtype)
        return Job.create(op, x)
    if op is Op.TURBO_ENCODE:
        return Job.create(op, rng.integers(0, 2, (batch, size), dtype=np.uint8))
    llr = rng.standard_normal((batch, 3, size + 4)).astype(np.float32) * 2.0
    return Job.create(op, llr, iterations=iterations)


def _time_job(job: Job, repeat: int) -> float:
    execute(job)  # warm up: plan caches, interleaver tables, page faults
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        execute(job)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


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


ONLINE_STEP = 0.04     # log-domain step per sample (times measured / estimate) once a class is warm
ONLINE_MAX_RATIO = 4.0  # a sample counts as at most this many times the estimate (a stalled job)
ONLINE_WARMUP = 8       # samples averaged in the log domain before the tracker takes over
ONLINE_MAX_CLASSES = 4096  # size classes tracked; beyond, new shapes teach only their cost key


class OnlineFit:
    """Learned multiplicative corrections of a linear fit, per size class and per cost key.

    The first ``warmup`` samples of a class set its correction to the mean
    log ratio measured / fit (each clipped to ``1 / max_ratio .. max_ratio``).
    After that each sample moves it by ``step x ratio`` up when the job took
    longer than estimated, down when shorter: a stochastic subgradient step on
    the mean absolute *relative* error ``|measured - e| / e``, whose minimum
    is where those weighted moves balance (the ratio-weighted median). A
    stalled job moves the estimate by at most ``step x max_ratio``.

    Not locked: the owner may call :meth:`observe` from several worker
    threads; every update is one dict store of a tuple (atomic under the
    GIL), so a race loses at most one sample. ``trace``, when a list, gets
    ``(key, features, fit seconds, measured seconds)`` per sample (benchmarks).
    """

    def __init__(self, *, step: float = ONLINE_STEP, max_ratio: float = ONLINE_MAX_RATIO,
                 warmup: int = ONLINE_WARMUP) -> None:
        if not 0.0 < step <= 1.0:
            raise ModelError(f"online step must be in (0, 1], got {step!r}")
        if not max_ratio > 1.0:
            raise ModelError(f"online max_ratio must be > 1, got {max_ratio!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ModelError(f"online warmup must be an integer >= 1, got {warmup!r}")
        self.step, self.max_ratio, self.warmup = step, max_ratio, warmup
        self._log_max = math.log(max_ratio)
        self._cls: dict[tuple[str, tuple[float, ...]], tuple[float, float, int]] = {}  # log, factor, n
        self._key: dict[str, tuple[float, float, int]] = {}
        self.trace: list[tuple[str, tuple[float, ...], float, float]] | None = None

    def factor(self, key: str, feats: tuple[float, ...]) -> float:
        """Multiplier of the linear fit: the class's, else the key's, else 1."""
        c = self._cls.get((key, feats)) or self._key.get(key)
        return c[1] if c is not None else 1.0

    def _update(self, table: dict, k: Any, log_ratio: float) -> None:
        lr = min(self._log_max, max(-self._log_max, log_ratio))
        prev = table.get(k)
        if prev is None:
            table[k] = (lr, math.exp(lr), 1)
            return
        r, _, n = prev
        n += 1
        if n <= self.warmup:
            r += (lr - r) / n
        else:
            ratio = math.exp(lr - r)  # measured / current estimate
            r += self.step * ratio if ratio > 1.0 else -self.step * ratio
        table[k] = (r, math.exp(r), n)

    def observe(self, key: str, feats: tuple[float, ...], base: float, measured: float) -> None:
        """One finished job: ``measured`` seconds where the linear fit said ``base``."""
        if not (base > 0.0 and measured > 0.0 and math.isfinite(measured)):
            return
        if self.trace is not None:
            self.trace.append((key, feats, base, measured))
        lr = math.log(measured / base)
        cls = (key, feats)
        if len(self._cls) < ONLINE_MAX_CLASSES or cls in self._cls:  # guests choose shapes: bounded
            self._update(self._cls, cls, lr)
        self._update(self._key, key, lr)

    def samples(self, key: str, feats: tuple[float, ...] | None = None) -> int:
        c = self._key.get(key) if feats is None else self._cls.get((key, feats))
        return 0 if c is None else c[2]

    def snapshot(self) -> dict:
        """Per cost key: learned factor and samples (for metrics and the bench)."""
        return {k: {"factor": f, "samples": n} for k, (_, f, n) in sorted(self._key.items())}

    def clear(self) -> None:
        self._cls.clear()
        self._key.clear()


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
        return base if online is None else base * online.factor(key, feats)

    def observe_shape(self, shape: Shape, measured: float) -> None:
        online = self.online
        if online is not None:
            online.observe(shape[0], shape[1], shape[2], measured)

    def base_estimate(self, op: Op, params: JobParams) -> float:
        """The calibrated linear fit alone, without the online correction."""
        return self._lookup(op, params)[2]

    def estimate_params(self, op: Op, params: JobParams) -> float:
        key, feats, base = self._lookup(op, params)
        online = self.online
        return base if online is None else base * online.factor(key, feats)

    def estimate(self, job: Job) -> float:
        """Predicted service time of ``job`` in seconds."""
        return self.estimate_params(job.op, job.params)

    def observe(self, op: Op, params: JobParams, measured: float) -> None:
        """Learn from one finished job's measured service time (no-op when not online)."""
        online = self.online
        if online is not None:
            key, feats, base = self._lookup(op, params)
            online.observe(key, feats, base, measured)

    # -- construction

    @classmethod
    def nominal(cls) -> ServiceTimeModel:
        """Uncalibrated order-of-magnitude model (a few GFLOP/s FFT, ~1 Mbit/s per 8-iteration block)."""
        per_fft_unit = {"complex64": 1.0e-9, "complex128": 1.5e-9}
        costs = {}
        for op in FFT_OPS:
            for dt, b in per_fft_unit.items():
                costs[f"{op.value}/{dt}"] = LinearCost(2e-6, (b,))
        costs[Op.TURBO_ENCODE.value] = LinearCost(5e-6, (2e-9,))
        costs[Op.TURBO_DECODE.value] = LinearCost(2e-5, (1e-8, 0.0))
        return cls(costs, calibrated=False, meta={"source": "nominal"}, online=True)

    @classmethod
    def calibrate(cls, *, quick: bool = False, repeat: int | None = None,
                  ops: Iterable[Op | str] | None = None, seed: int = 1) -> ServiceTimeModel:
        """Time the kernels on this machine and fit the model (about 1 s; ``quick`` ~0.2 s)."""
        repeat = repeat if repeat is not None else (3 if quick else 7)
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
            for op_, dt, size, batch, it in grid:
                job = _calibration_job(op_, size, batch, dt, it, rng)
                sec = _time_job(job, repeat)
                points.setdefault(cost_key(op_, job.params), []).append((features(op_, job.params), sec))
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
