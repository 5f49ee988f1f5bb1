"""Accelerator jobs: what a guest asks a shared accelerator to do.

A :class:`Job` is one request to an accelerator, the software analogue of a
descriptor handed to an FPGA queue: an operation (:class:`Op`), its parameters
(:class:`JobParams`: FFT size and batch, Turbo block size K and iterations,
extrinsic scaling, early stop), an input and an output buffer, the submitting
guest, a priority (0 lowest .. :data:`MAX_PRIORITY`: orders the jobs *of one
guest* in the receive queue, see :class:`accel_core.queues.FairQueue`),
timestamps, a state and a service-time estimate.

Buffers are zero copy: ``input`` and ``output`` are NumPy arrays, either the
caller's own arrays or views made with ``numpy.frombuffer`` over a writable
buffer (a ``memoryview`` of mapped guest memory, a ``bytearray``...). The
kernel reads ``input`` and writes straight into ``output``; the caller owns the
memory and must keep it mapped until the job is finished. The FFT may run in
place (``output`` is ``input``); the Turbo operations need disjoint buffers.

Everything about a job's *shape* is validated when the job is created, by the
checks of the kernel modules themselves (:mod:`accel_core.dft`, :mod:`accel_core.crc`,
:mod:`accel_core.qpp`, :mod:`accel_core.turbo`) and of :mod:`accel_core.buffers`,
so ``submit()`` refuses a bad job with the same typed error a direct kernel call
raises (every one a :class:`~accel_core.errors.JobRejected` naming the bad
value). A job then runs the kernels' ``*_into`` entry points, which trust those
checks and only look at element *values* (0/1 bits, finite LLRs), because guest
memory may still change until then; a job failing there ends FAILED with the
kernel module's exception.

Job lifecycle (explicit state machine, see ``TRANSITIONS``)::

    NEW --submit--> QUEUED --dispatch--> RUNNING --> DONE
                      |                     '-----> FAILED
                      '--cancel/close--> CANCELLED

Operations follow 3GPP TS 36.211 (OFDM FFT sizes) and TS 36.212 §5.1.3.2
(Turbo coding, block sizes of Table 5.1.3-3).
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from accel_core import buffers, crc, dft, qpp, turbo
from accel_core.errors import (
    DtypeError,
    JobStateError,
    LayoutError,
    ParameterError,
    ParameterTypeError,
    ShapeError,
    UnsupportedOperation,
)


class Op(enum.Enum):
    """Operations an accelerator can run."""

    FFT = "fft"                    # forward complex FFT along the last axis
    IFFT = "ifft"                  # inverse complex FFT (scaled by 1/N)
    TURBO_ENCODE = "turbo_encode"  # LTE PCCC encoder, [B, K] bits -> [B, 3, K+4]
    TURBO_DECODE = "turbo_decode"  # max-log-MAP decoder, [B, 3, K+4] LLRs -> [B, K] bits

    @classmethod
    def parse(cls, value: Op | str) -> Op:
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
#: highest job priority (0 is the lowest); the device's CREATE_AQ priorities are these
MAX_PRIORITY = 7


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
#
# Every check below is the one of the module that owns the concept: FFT sizes and dtypes
# (accel_core.dft), bit arrays (accel_core.crc), block sizes K (accel_core.qpp), decoder
# parameters and LLR arrays (accel_core.turbo), zero-copy buffers (accel_core.buffers). This section
# only decides which buffer is which and what shape a raw buffer has; it raises the same typed errors.


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterTypeError(f"{name} must be a positive integer, got {value!r}", argument=name,
                                 value=value)
    if value <= 0:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}", argument=name, value=value)
    return int(value)


def _raw_batch(nbytes: int, per_item: int, batch: Any, what: str, item: str) -> int:
    """The batch a raw buffer of ``nbytes`` holds (``batch`` if given, checked later by adopt)."""
    if batch is None:
        if nbytes % per_item:
            raise LayoutError(f"{what} buffer of {nbytes} bytes is not a whole number of {item}",
                              argument=what, value=nbytes)
        batch = nbytes // per_item
    return _positive_int(batch, "batch")


def _validate_fft(op: Op, inp: Any, out: Any, *, n: int | None, dtype: Any, batch: int | None
                  ) -> tuple[JobParams, np.ndarray, np.ndarray]:
    what = f"{op.value} input"
    if isinstance(inp, np.ndarray):
        dft.check_dtype(inp.dtype, what)
        dt = inp.dtype
        if dtype is not None:
            dft.check_dtype(dtype, f"{op.value} dtype parameter")
            if np.dtype(dtype) != dt:
                raise DtypeError(f"{op.value} dtype parameter {np.dtype(dtype)} does not match "
                                 f"input dtype {dt}", argument="dtype", value=np.dtype(dtype))
        size = dft.check_shape(inp.shape, what)
        if n is not None and _positive_int(n, "n") != size:
            raise ShapeError(f"{op.value} size n={n} does not match the input's last axis {size}",
                             argument="n", value=n)
        x = buffers.adopt(inp, dt, None, what=what, writable=False)
    else:
        if n is None or dtype is None:
            raise ParameterError(f"{op.value} on a raw buffer needs n= and dtype=",
                                 argument="n" if n is None else "dtype")
        size = dft.check_size(_positive_int(n, "n"))
        dft.check_dtype(dtype, f"{op.value} dtype")
        dt = np.dtype(dtype)
        if not buffers.has_buffer(inp):
            raise DtypeError(f"{what} of type {type(inp).__name__} is neither an ndarray nor a buffer",
                             argument=what, value=type(inp))
        b = _raw_batch(memoryview(inp).nbytes, size * dt.itemsize, batch, what,
                       f"{size}-point {dt} transforms")
        x = buffers.adopt(inp, dt, (b, size), what=what, writable=False)
    if out is None:
        y = np.empty(x.shape, dtype=dt)
    else:
        y = buffers.adopt(out, dt, x.shape, what=f"{op.value} output", writable=True)
        buffers.check_overlap(x, y, in_place_ok=True)
    return JobParams(batch=x.size // size, n=size, dtype=dt), x, y


def _validate_encode(inp: Any, out: Any, *, k: int | None, batch: int | None
                     ) -> tuple[JobParams, np.ndarray, np.ndarray]:
    u8 = np.dtype(np.uint8)
    what = "turbo_encode input"
    if isinstance(inp, np.ndarray):
        crc.check_bit_array(inp, what)
        kk = inp.shape[-1]
        if k is not None and _positive_int(k, "k") != kk:
            raise ShapeError(f"turbo_encode k={k} does not match the input's last axis {kk}",
                             argument="k", value=k)
        x = buffers.adopt(inp, u8, None, what=what, writable=False)
    else:
        if k is None:
            raise ParameterError("turbo_encode on a raw buffer needs k=", argument="k")
        kk = _positive_int(k, "k")
        if not buffers.has_buffer(inp):
            raise DtypeError(f"{what} of type {type(inp).__name__} is neither an ndarray nor a buffer",
                             argument=what, value=type(inp))
        b = _raw_batch(memoryview(inp).nbytes, kk, batch, what, f"K={kk} blocks")
        x = buffers.adopt(inp, u8, (b, kk), what=what, writable=False)
    qpp.check_block_size(kk, what)
    out_shape = (*x.shape[:-1], 3, kk + turbo.TAIL_BITS)
    if out is None:
        y = np.empty(out_shape, dtype=u8)
    else:
        y = buffers.adopt(out, u8, out_shape, what="turbo_encode output", writable=True)
        buffers.check_overlap(x, y, in_place_ok=False)
    return JobParams(batch=x.size // kk, k=kk), x, y


def _validate_decode(inp: Any, out: Any, *, k: int | None, batch: int | None, iterations: Any,
                     scaling: Any, early_stop: Any) -> tuple[JobParams, np.ndarray, np.ndarray]:
    f32 = np.dtype(np.float32)
    what = "turbo_decode input"
    its = turbo.check_iterations(iterations)
    scaling = turbo.check_scaling(scaling)
    early_stop = turbo.check_early_stop(early_stop)
    if isinstance(inp, np.ndarray):
        turbo.check_llr(inp)
        kk = inp.shape[-1] - turbo.TAIL_BITS
        if k is not None and _positive_int(k, "k") != kk:
            raise ShapeError(f"turbo_decode k={k} does not match the input's last axis {inp.shape[-1]} (K+4)",
                             argument="k", value=k)
        x = buffers.adopt(inp, f32, None, what=what, writable=False)
    else:
        if k is None:
            raise ParameterError("turbo_decode on a raw buffer needs k=", argument="k")
        kk = qpp.check_block_size(_positive_int(k, "k"), "turbo_decode k")
        if not buffers.has_buffer(inp):
            raise DtypeError(f"{what} of type {type(inp).__name__} is neither an ndarray nor a buffer",
                             argument=what, value=type(inp))
        per_block = 3 * (kk + turbo.TAIL_BITS) * f32.itemsize
        b = _raw_batch(memoryview(inp).nbytes, per_block, batch, what,
                       f"K={kk} blocks ({per_block} bytes each)")
        x = buffers.adopt(inp, f32, (b, 3, kk + turbo.TAIL_BITS), what=what, writable=False)
    out_shape = (*x.shape[:-2], kk)
    if out is None:
        y = np.empty(out_shape, dtype=np.uint8)
    else:
        y = buffers.adopt(out, np.dtype(np.uint8), out_shape, what="turbo_decode output", writable=True)
        buffers.check_overlap(x, y, in_place_ok=False)
    params = JobParams(batch=x.size // (3 * (kk + turbo.TAIL_BITS)), k=kk, iterations=its,
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

    __slots__ = ("op", "params", "input", "output", "guest_id", "priority", "collect", "state", "error",
                 "result", "estimate", "id", "accelerator", "t_created", "t_submitted", "t_started",
                 "t_finished", "accel_seconds", "future", "_tag", "__weakref__")

    def __init__(self, op: Op, params: JobParams, input: np.ndarray, output: np.ndarray, *,
                 guest_id: int = 0, collect: bool = False, priority: int = 0) -> None:
        self.op = op
        self.params = params
        self.input = input
        self.output = output
        self.guest_id = guest_id
        #: 0 (lowest) .. MAX_PRIORITY: served first among this guest's queued jobs
        self.priority = priority
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
        #: the accelerator's own seconds for the job, set when it finished running (kernel
        #: CPU time + emulated slowdown: what the service-time model learns and estimates)
        self.accel_seconds: float | None = None
        self.future: Future = Future()
        self._tag: tuple[float, float] = (0.0, 0.0)  # fair-queue order (start tag, arrival)

    @classmethod
    def create(cls, op: Op | str, input: Any, output: Any = None, *, guest_id: int = 0,
               n: int | None = None, dtype: Any = None, k: int | None = None, batch: int | None = None,
               iterations: int = 8, scaling: float | None = None, early_stop: str | None = None,
               collect: bool = False, priority: int = 0) -> Job:
        """Validate buffers and parameters and build a NEW job (raises JobRejected).

        ndarray buffers carry their own shape (FFT: ``[..., N]``; encode: ``[K]``
        or ``[B, K]``; decode: ``[3, K+4]`` or ``[B, 3, K+4]``). Raw buffers
        (e.g. a memoryview of guest memory) need the shape parameters: FFT
        ``n`` and ``dtype``; Turbo ``k``; ``batch`` defaults to what the input
        buffer holds. ``output=None`` allocates the output. ``priority`` 0
        (lowest) .. :data:`MAX_PRIORITY` orders the job among its guest's.
        """
        op = Op.parse(op)
        if isinstance(guest_id, bool) or not isinstance(guest_id, (int, np.integer)):
            raise ParameterTypeError(f"guest_id must be a non-negative integer, got {guest_id!r}",
                                     argument="guest_id", value=guest_id)
        if guest_id < 0:
            raise ParameterError(f"guest_id must be a non-negative integer, got {guest_id!r}",
                                 argument="guest_id", value=guest_id)
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise ParameterTypeError(f"priority must be an integer in 0..{MAX_PRIORITY}, got {priority!r}",
                                     argument="priority", value=priority)
        if not 0 <= priority <= MAX_PRIORITY:
            raise ParameterError(f"priority {priority!r} is outside 0..{MAX_PRIORITY}",
                                 argument="priority", value=priority)
        if op in FFT_OPS:
            params, x, y = _validate_fft(op, input, output, n=n, dtype=dtype, batch=batch)
        elif op is Op.TURBO_ENCODE:
            params, x, y = _validate_encode(input, output, k=k, batch=batch)
        else:
            params, x, y = _validate_decode(input, output, k=k, batch=batch, iterations=iterations,
                                            scaling=scaling, early_stop=early_stop)
        return cls(op, params, x, y, guest_id=int(guest_id), collect=bool(collect), priority=int(priority))

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

    def wait(self, timeout: float | None = None) -> Job:
        """Block until finished; return the job or raise its error / CancelledError / TimeoutError."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the job if it is still queued; False once it runs or finished (or before submit)."""
        if self.state is JobState.NEW:
            return False
        return self.future.cancel()

    def done(self) -> bool:
        return self.state.finished

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
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
    dft.transform_into(job.input, job.output, job.op is Op.IFFT)
    return None


def _run_encode(job: Job) -> Any:
    turbo.encode_into(job.input, job.output)
    return None


def _run_decode(job: Job) -> Any:
    p = job.params
    used = turbo.decode_into(job.input, job.output, iterations=cast(int, p.iterations), scaling=p.scaling,
                             early_stop=p.early_stop)
    return int(used[0]) if job.input.ndim == 2 else used


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
