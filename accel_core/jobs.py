"""Accelerator jobs: what a guest asks a shared accelerator to do.

A :class:`Job` is one request to an accelerator, the software analogue of a
descriptor handed to an FPGA queue: an operation (:class:`Op`), its parameters
(:class:`JobParams`: FFT size and batch, Turbo block size K and iterations,
extrinsic scaling, early stop), an input and an output buffer, the submitting
guest, timestamps, a state and a service-time estimate.

Buffers are zero copy: ``input`` and ``output`` are NumPy arrays, either the
caller's own arrays or views made with ``numpy.frombuffer`` over a writable
buffer (a ``memoryview`` of mapped guest memory, a ``bytearray``...). The
kernel reads ``input`` and writes straight into ``output``; the caller owns the
memory and must keep it mapped until the job is finished. The FFT may run in
place (``output`` is ``input``); the Turbo operations need disjoint buffers.

Everything about a job's *shape* is validated when the job is created (so
``submit()`` refuses it with :class:`~accel_core.errors.JobRejected` naming the
bad value). Element *values* (0/1 bits, finite LLRs) are checked by the kernel
modules when the job runs, because guest memory may still change until then; a
job failing there ends FAILED with the kernel's exception.

Job lifecycle (explicit state machine, see ``TRANSITIONS``)::

    NEW --submit--> QUEUED --dispatch--> RUNNING --> DONE
                      |                     '-----> FAILED
                      '--cancel/close--> CANCELLED

Operations follow 3GPP TS 36.211 (OFDM FFT sizes) and TS 36.212 §5.1.3.2
(Turbo coding, block sizes of Table 5.1.3-3).
"""
from __future__ import annotations

import enum
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from accel_core import dft, qpp, turbo
from accel_core.errors import JobRejected, JobStateError, UnsupportedOperation


class Op(enum.Enum):
    """Operations an accelerator can run."""

    FFT = "fft"                    # forward complex FFT along the last axis
    IFFT = "ifft"                  # inverse complex FFT (scaled by 1/N)
    TURBO_ENCODE = "turbo_encode"  # LTE PCCC encoder, [B, K] bits -> [B, 3, K+4]
    TURBO_DECODE = "turbo_decode"  # max-log-MAP decoder, [B, 3, K+4] LLRs -> [B, K] bits

    @classmethod
    def parse(cls, value: "Op | str") -> "Op":
        if isinstance(value, Op):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for op in cls:
                if op.value == key:
                    return op
        raise UnsupportedOperation(
            f"unknown accelerator operation {value!r}; known: {', '.join(o.value for o in cls)}")


FFT_OPS = frozenset({Op.FFT, Op.IFFT})
TURBO_OPS = frozenset({Op.TURBO_ENCODE, Op.TURBO_DECODE})


class JobState(enum.Enum):
    NEW = "new"              # created and validated, not yet submitted
    QUEUED = "queued"        # in an accelerator's receive queue
    RUNNING = "running"      # a worker is running its kernel
    DONE = "done"            # output written; future holds the job
    FAILED = "failed"        # the kernel raised; ``error`` holds the exception
    CANCELLED = "cancelled"  # removed from the receive queue before it ran

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.NEW: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

FFT_DTYPES = (np.dtype(np.complex64), np.dtype(np.complex128))
EARLY_STOP = (None, "crc24a", "crc24b")
MAX_ITERATIONS = 64


@dataclass(frozen=True)
class JobParams:
    """Shape parameters of a job (what the service-time model is fitted on).

    ``batch`` is the number of transforms (FFT) or code blocks (Turbo).
    FFT jobs set ``n`` and ``dtype``; Turbo jobs set ``k``; decode jobs also
    ``iterations``, ``scaling`` and ``early_stop``.
    """

    batch: int
    n: int | None = None
    dtype: np.dtype | None = None
    k: int | None = None
    iterations: int | None = None
    scaling: float | None = None
    early_stop: str | None = None


# --------------------------------------------------------------------------- validation


def _reject(msg: str) -> JobRejected:
    return JobRejected(msg)


def _as_array(buf: Any, dtype: np.dtype, shape: tuple[int, ...] | None, *, what: str,
              writable: bool) -> np.ndarray:
    """A C-contiguous, aligned ndarray of ``dtype`` over ``buf`` without copying.

    ``buf`` is an ndarray (its shape is kept; ``shape`` is checked if given) or
    any object with the buffer protocol (reshaped to ``shape``, which is then
    required).
    """
    if isinstance(buf, np.ndarray):
        arr = buf
        if arr.dtype != dtype:
            raise _reject(f"{what} dtype {arr.dtype} is not supported here; need {dtype}")
        if shape is not None and arr.shape != shape:
            raise _reject(f"{what} shape {arr.shape} does not match the job; need {shape}")
    else:
        try:
            mv = memoryview(buf)
        except TypeError:
            raise _reject(f"{what} of type {type(buf).__name__} is neither an ndarray nor a buffer") from None
        if shape is None:
            raise _reject(f"{what} is a raw buffer: the job's shape parameters are required")
        if not mv.c_contiguous:
            raise _reject(f"{what} buffer is not contiguous")
        need = math.prod(shape) * dtype.itemsize
        if mv.nbytes != need:
            raise _reject(f"{what} buffer is {mv.nbytes} bytes; the job needs {need} "
                          f"({'x'.join(map(str, shape))} {dtype})")
        if writable and mv.readonly:
            raise _reject(f"{what} buffer is read-only")
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        arr = np.frombuffer(mv, dtype=dtype).reshape(shape)
    if not arr.flags.c_contiguous:
        raise _reject(f"{what} must be C-contiguous (strides {arr.strides}); jobs never copy")
    if not arr.flags.aligned:
        raise _reject(f"{what} is not aligned to {dtype.alignment} bytes for {dtype}")
    if writable and not arr.flags.writeable:
        raise _reject(f"{what} is read-only")
    if arr.size == 0:
        raise _reject(f"{what} is empty (shape {arr.shape})")
    return arr


def _check_overlap(inp: np.ndarray, out: np.ndarray, *, in_place_ok: bool) -> None:
    if out is inp and in_place_ok:
        return
    if not np.may_share_memory(inp, out):
        return
    same = (inp.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and inp.shape == out.shape and inp.dtype == out.dtype)
    if same and in_place_ok:
        return
    if same:
        raise _reject("output is the input buffer; this operation cannot run in place")
    raise _reject("output overlaps the input buffer partially")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise _reject(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _fft_supported(n: int) -> bool:
    return dft.is_supported(n)


def _turbo_block_sizes() -> frozenset[int]:
    return frozenset(int(k) for k in qpp.BLOCK_SIZES)


def _validate_fft(op: Op, inp: Any, out: Any, *, n: int | None, dtype: Any, batch: int | None
                  ) -> tuple[JobParams, np.ndarray, np.ndarray]:
    if isinstance(inp, np.ndarray):
        if inp.dtype not in FFT_DTYPES:
            raise _reject(f"{op.value} input dtype {inp.dtype} is not supported; need complex64 or complex128")
        dt = inp.dtype
        if dtype is not None and np.dtype(dtype) != dt:
            raise _reject(f"{op.value} dtype parameter {np.dtype(dtype)} does not match input dtype {dt}")
        if inp.ndim == 0:
            raise _reject(f"{op.value} input is 0-d; need at least one axis")
        shape = inp.shape
        if n is not None and _positive_int(n, "n") != shape[-1]:
            raise _reject(f"{op.value} size n={n} does not match the input's last axis {shape[-1]}")
        x = _as_array(inp, dt, None, what=f"{op.value} input", writable=False)
    else:
        if n is None or dtype is None:
            raise _reject(f"{op.value} on a raw buffer needs n= and dtype=")
        n = _positive_int(n, "n")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise _reject(f"{op.value} dtype {dtype!r} is not a dtype") from None
        if dt not in FFT_DTYPES:
            raise _reject(f"{op.value} dtype {dt} is not supported; need complex64 or complex128")
        nbytes = memoryview(inp).nbytes if _has_buffer(inp) else None
        if nbytes is None:
            raise _reject(f"{op.value} input of type {type(inp).__name__} is neither an ndarray nor a buffer")
        if batch is None:
            if nbytes % (n * dt.itemsize):
                raise _reject(f"{op.value} input buffer of {nbytes} bytes is not a whole number of "
                              f"{n}-point {dt} transforms")
            batch = nbytes // (n * dt.itemsize)
        shape = (_positive_int(batch, "batch"), n)
        x = _as_array(inp, dt, shape, what=f"{op.value} input", writable=False)
    n = shape[-1]
    if not _fft_supported(n):
        raise _reject(f"{op.value} size {n} is not supported by the FFT kernel")
    if out is None:
        y = np.empty(shape, dtype=dt)
    else:
        y = _as_array(out, dt, shape, what=f"{op.value} output", writable=True)
        _check_overlap(x, y, in_place_ok=True)
    return JobParams(batch=x.size // n, n=n, dtype=dt), x, y


def _has_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def _check_k(k: int, what: str) -> int:
    if k not in _turbo_block_sizes():
        raise _reject(f"{what}: K={k} is not a Turbo block size of TS 36.212 Table 5.1.3-3 "
                      f"(40..512 step 8, 528..1024 step 16, 1056..2048 step 32, 2112..6144 step 64)")
    return k


def _validate_encode(inp: Any, out: Any, *, k: int | None, batch: int | None
                     ) -> tuple[JobParams, np.ndarray, np.ndarray]:
    u8 = np.dtype(np.uint8)
    if isinstance(inp, np.ndarray):
        if inp.ndim not in (1, 2):
            raise _reject(f"turbo_encode input must be [K] or [B, K] bits, got shape {inp.shape}")
        kk = inp.shape[-1]
        if k is not None and _positive_int(k, "k") != kk:
            raise _reject(f"turbo_encode k={k} does not match the input's last axis {kk}")
        x = _as_array(inp, u8, None, what="turbo_encode input", writable=False)
        out_shape = (3, kk + 4) if inp.ndim == 1 else (inp.shape[0], 3, kk + 4)
    else:
        if k is None:
            raise _reject("turbo_encode on a raw buffer needs k=")
        kk = _positive_int(k, "k")
        if not _has_buffer(inp):
            raise _reject(f"turbo_encode input of type {type(inp).__name__} is neither an ndarray nor a buffer")
        nbytes = memoryview(inp).nbytes
        if batch is None:
            if nbytes % kk:
                raise _reject(f"turbo_encode input buffer of {nbytes} bytes is not a whole number of K={kk} blocks")
            batch = nbytes // kk
        b = _positive_int(batch, "batch")
        x = _as_array(inp, u8, (b, kk), what="turbo_encode input", writable=False)
        out_shape = (b, 3, kk + 4)
    _check_k(kk, "turbo_encode")
    if out is None:
        y = np.empty(out_shape, dtype=u8)
    else:
        y = _as_array(out, u8, out_shape, what="turbo_encode output", writable=True)
        _check_overlap(x, y, in_place_ok=False)
    return JobParams(batch=x.size // kk, k=kk), x, y


def _validate_decode(inp: Any, out: Any, *, k: int | None, batch: int | None, iterations: Any,
                     scaling: Any, early_stop: Any) -> tuple[JobParams, np.ndarray, np.ndarray]:
    f32 = np.dtype(np.float32)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or not 1 <= iterations <= MAX_ITERATIONS:
        raise _reject(f"turbo_decode iterations must be an integer in 1..{MAX_ITERATIONS}, got {iterations!r}")
    if scaling is not None:
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.floating)) \
                or not 0.0 < float(scaling) <= 1.0:
            raise _reject(f"turbo_decode scaling must be None or a float in (0, 1], got {scaling!r}")
        scaling = float(scaling)
    if early_stop not in EARLY_STOP:
        raise _reject(f"turbo_decode early_stop must be None, 'crc24a' or 'crc24b', got {early_stop!r}")
    if isinstance(inp, np.ndarray):
        if inp.ndim not in (2, 3) or inp.shape[-2] != 3:
            raise _reject(f"turbo_decode input must be [3, K+4] or [B, 3, K+4] LLRs, got shape {inp.shape}")
        kk = inp.shape[-1] - 4
        if k is not None and _positive_int(k, "k") != kk:
            raise _reject(f"turbo_decode k={k} does not match the input's last axis {inp.shape[-1]} (K+4)")
        x = _as_array(inp, f32, None, what="turbo_decode input", writable=False)
        out_shape = (kk,) if inp.ndim == 2 else (inp.shape[0], kk)
    else:
        if k is None:
            raise _reject("turbo_decode on a raw buffer needs k=")
        kk = _positive_int(k, "k")
        if not _has_buffer(inp):
            raise _reject(f"turbo_decode input of type {type(inp).__name__} is neither an ndarray nor a buffer")
        per_block = 3 * (kk + 4) * f32.itemsize
        nbytes = memoryview(inp).nbytes
        if batch is None:
            if nbytes % per_block:
                raise _reject(f"turbo_decode input buffer of {nbytes} bytes is not a whole number of "
                              f"K={kk} blocks ({per_block} bytes each)")
            batch = nbytes // per_block
        b = _positive_int(batch, "batch")
        x = _as_array(inp, f32, (b, 3, kk + 4), what="turbo_decode input", writable=False)
        out_shape = (b, kk)
    _check_k(kk, "turbo_decode")
    if out is None:
        y = np.empty(out_shape, dtype=np.uint8)
    else:
        y = _as_array(out, np.dtype(np.uint8), out_shape, what="turbo_decode output", writable=True)
        _check_overlap(x, y, in_place_ok=False)
    params = JobParams(batch=x.size // (3 * (kk + 4)), k=kk, iterations=int(iterations),
                       scaling=scaling, early_stop=early_stop)
    return params, x, y


# --------------------------------------------------------------------------- the job


class Job:
    """One accelerator request. Create with :meth:`Job.create`; submit with
    ``Accelerator.submit`` / ``AcceleratorService.submit``.

    Waiting: ``job.wait(timeout)`` (returns the job, raises the kernel's error
    or ``concurrent.futures.CancelledError``), ``job.future`` (a
    ``concurrent.futures.Future`` resolving to the job; wrap it with
    ``asyncio.wrap_future`` in an event loop) or ``job.add_done_callback(fn)``
    (``fn(job)`` runs in the worker thread that finished it).
    """

    __slots__ = ("op", "params", "input", "output", "guest_id", "collect", "state", "error", "result",
                 "estimate", "id", "accelerator", "t_created", "t_submitted", "t_started", "t_finished",
                 "future", "_tag", "__weakref__")

    def __init__(self, op: Op, params: JobParams, input: np.ndarray, output: np.ndarray, *,
                 guest_id: int = 0, collect: bool = False) -> None:
        self.op = op
        self.params = params
        self.input = input
        self.output = output
        self.guest_id = guest_id
        self.collect = collect
        self.state = JobState.NEW
        self.error: BaseException | None = None
        self.result: Any = None
        self.estimate = 0.0
        self.id: int | None = None
        self.accelerator: str | None = None
        self.t_created = time.perf_counter()
        self.t_submitted: float | None = None
        self.t_started: float | None = None
        self.t_finished: float | None = None
        self.future: Future = Future()
        self._tag = 0.0

    @classmethod
    def create(cls, op: Op | str, input: Any, output: Any = None, *, guest_id: int = 0,
               n: int | None = None, dtype: Any = None, k: int | None = None, batch: int | None = None,
               iterations: int = 8, scaling: float | None = None, early_stop: str | None = None,
               collect: bool = False) -> "Job":
        """Validate buffers and parameters and build a NEW job (raises JobRejected).

        ndarray buffers carry their own shape (FFT: ``[..., N]``; encode: ``[K]``
        or ``[B, K]``; decode: ``[3, K+4]`` or ``[B, 3, K+4]``). Raw buffers
        (e.g. a memoryview of guest memory) need the shape parameters: FFT
        ``n`` and ``dtype``; Turbo ``k``; ``batch`` defaults to what the input
        buffer holds. ``output=None`` allocates the output.
        """
        op = Op.parse(op)
        if isinstance(guest_id, bool) or not isinstance(guest_id, (int, np.integer)) or guest_id < 0:
            raise _reject(f"guest_id must be a non-negative integer, got {guest_id!r}")
        if op in FFT_OPS:
            params, x, y = _validate_fft(op, input, output, n=n, dtype=dtype, batch=batch)
        elif op is Op.TURBO_ENCODE:
            params, x, y = _validate_encode(input, output, k=k, batch=batch)
        else:
            params, x, y = _validate_decode(input, output, k=k, batch=batch, iterations=iterations,
                                            scaling=scaling, early_stop=early_stop)
        return cls(op, params, x, y, guest_id=int(guest_id), collect=bool(collect))

    # -- state machine (driven by the accelerator, under its lock)

    def _transition(self, new: JobState, now: float) -> None:
        if new not in TRANSITIONS[self.state]:
            raise JobStateError(f"job {self.id} ({self.op.value}): illegal transition "
                                f"{self.state.value} -> {new.value}")
        self.state = new
        if new is JobState.QUEUED:
            self.t_submitted = now
        elif new is JobState.RUNNING:
            self.t_started = now
        else:
            self.t_finished = now

    # -- waiting

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until finished; return the job or raise its error / CancelledError / TimeoutError."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the job if it is still queued; False once it runs or finished (or before submit)."""
        if self.state is JobState.NEW:
            return False
        return self.future.cancel()

    def done(self) -> bool:
        return self.state.finished

    def add_done_callback(self, fn: Callable[["Job"], None]) -> None:
        self.future.add_done_callback(lambda _f: fn(self))

    # -- timing

    @property
    def queue_wait(self) -> float | None:
        """Seconds spent in the receive queue (None until started)."""
        if self.t_started is None or self.t_submitted is None:
            return None
        return self.t_started - self.t_submitted

    @property
    def service_time(self) -> float | None:
        """Seconds the kernel ran (None until finished after running)."""
        if self.t_started is None or self.t_finished is None:
            return None
        return self.t_finished - self.t_started

    def __repr__(self) -> str:
        p = self.params
        shape = f"n={p.n} {p.dtype}" if p.n else f"K={p.k}" + (f" it={p.iterations}" if p.iterations else "")
        return (f"<Job {self.id} {self.op.value} batch={p.batch} {shape} guest={self.guest_id} "
                f"{self.state.value}>")


# --------------------------------------------------------------------------- kernels


def _run_fft(job: Job) -> Any:
    fn = dft.fft if job.op is Op.FFT else dft.ifft
    res = fn(job.input, out=job.output)
    if res is not None and res is not job.output and not np.shares_memory(res, job.output):
        np.copyto(job.output, res)
    return None


def _run_encode(job: Job) -> Any:
    res = turbo.turbo_encode(job.input)
    np.copyto(job.output, np.asarray(res).reshape(job.output.shape))
    return None


def _run_decode(job: Job) -> Any:
    p = job.params
    bits, iters = turbo.turbo_decode(job.input, iterations=p.iterations, scaling=p.scaling,
                                     early_stop=p.early_stop)
    np.copyto(job.output, np.asarray(bits).reshape(job.output.shape))
    return iters


KERNELS: dict[Op, Callable[[Job], Any]] = {
    Op.FFT: _run_fft,
    Op.IFFT: _run_fft,
    Op.TURBO_ENCODE: _run_encode,
    Op.TURBO_DECODE: _run_decode,
}


def execute(job: Job) -> Any:
    """Run the job's kernel (GIL released inside the kernel); returns the op's
    extra result (Turbo decode: iterations used), raises the kernel's error."""
    return KERNELS[job.op](job)
