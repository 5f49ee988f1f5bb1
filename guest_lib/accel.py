"""accel_core's call shapes, and a file-like device, over the device's accelerator queues.

The upper two layers of guest_lib's accelerator API (docs/accel-api.md; the
verbs-shaped layer is :mod:`guest_lib.aq`, the ABI docs/virtio-rdma.md
5.x.6.10):

* :func:`fft`, :func:`ifft`, :func:`turbo_encode`, :func:`turbo_decode` take
  and return exactly what ``accel_core``'s functions of the same names do
  (shapes, dtypes, ``(bits, iters_used)``), and refuse bad input with
  accel_core's own checks, hence its typed errors, before anything reaches
  the device. What the device refuses afterwards is :class:`AccelJobError`
  (an :class:`~guest_lib.errors.RDMAError`) carrying the AccelStatus.
  :func:`afft`, :func:`aifft`, :func:`aturbo_encode`, :func:`aturbo_decode`
  are the asyncio forms: they poll the CQ from the event loop with a backoff
  (guest_lib's completion events block on the event queue and have no fd a
  loop could watch).
* :func:`open` gives the original design's file-like device: ``write()``
  submits one job's input bytes, ``read()`` returns the next result's bytes,
  in order.

Memory: the device reaches only registered memory of the queue's PD. Each
Context gets one :class:`AccelHelper` (made on first use, closed with the
Context) owning a PD, a staging MR, a CQ and one AQ per op (made lazily).
An input or output array that already lies in an MR of the helper's PD
(``helper(ctx).pd``; outputs need LOCAL_WRITE) is used in place, with no
copy. Any other input is copied once into the staging area, and a result
computed in the staging area is copied once into the array returned (or
``out``). A job larger than the staging area gets an MR of its own for its
lifetime.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from accel_core import dft as _dft, turbo as _turbo
from accel_core.crc import as_bits, check_bit_values
from accel_core.qpp import check_block_size
from guest_lib.aq import AQ, AccelWR
from guest_lib.base import VerbsObject
from guest_lib.context import Context
from guest_lib.cq import CQ, AccelWC
from guest_lib.errors import RDMAError, UserError
from guest_lib.mr import MR
from guest_lib.pd import PD
from guest_lib.wr import SGE
from verbs import Access
from virtio_rdma.constants import AccelDtype, AccelEarlyStop, AccelOp, AccelStatus

__all__ = ["fft", "ifft", "turbo_encode", "turbo_decode", "afft", "aifft", "aturbo_encode",
           "aturbo_decode", "open", "AccelFile", "AccelHelper", "AccelJobError", "AccelSizeError",
           "helper"]

#: bytes of the staging MR of a Context's helper
STAGING_BYTES = 4 << 20
#: slots of each of the helper's AQs, and (x 4 ops) entries of its CQ
AQ_DEPTH = 64
#: staging allocations are aligned to this
_ALIGN = 64
#: MRs a helper remembers as recently holding callers' arrays
_RECENT = 4
_LOCAL_WRITE = int(Access.LOCAL_WRITE)
#: polling of a waiting call (seconds): it busy-polls for _SPIN (yielding the CPU between empty
#: polls), then sleeps from _SLEEP_MIN doubling up to _SLEEP_MAX (a sleep costs ~60 us on
#: Linux; a small FFT's round trip is 20-70 us)
_SPIN, _SLEEP_MIN, _SLEEP_MAX = 250e-6, 20e-6, 1e-3
_TAIL = _turbo.TAIL_BITS
_EARLY_STOP = {None: AccelEarlyStop.NONE, "crc24a": AccelEarlyStop.CRC24A, "crc24b": AccelEarlyStop.CRC24B}
#: the errno an AccelJobError carries for each failing AccelStatus
_ERRNO: dict[int, int] = {
    AccelStatus.INVALID_PARAMS: errno.EINVAL,
    AccelStatus.LOCAL_PROT: errno.EACCES,
    AccelStatus.LOCAL_LEN: errno.EMSGSIZE,
    AccelStatus.NO_ACCELERATOR: errno.EOPNOTSUPP,
    AccelStatus.REMOTE_FAILED: errno.EHOSTDOWN,
    AccelStatus.CANCELLED: errno.ECANCELED,
    AccelStatus.FLUSHED: errno.ECANCELED,
}


class AccelJobError(RDMAError):
    """The device completed a job with an error status: ``accel_status``
    (an AccelStatus, or its number if unknown) and the completion ``wc``."""

    def __init__(self, wc: AccelWC):
        st = wc.accel_status
        super().__init__(f"accelerator job {wc.wr_id:#x} ({getattr(wc.op, 'name', wc.op)}) failed: "
                         f"{getattr(st, 'name', st)}", _ERRNO.get(int(st), errno.EIO))
        self.accel_status, self.wc = st, wc


class AccelSizeError(UserError, ValueError):
    """A file-like device's ``write()`` was given other than one job's input size."""


class _Staging:
    """First-fit allocator of the staging MR's bytes (offsets, _ALIGN-aligned)."""

    def __init__(self, size: int):
        self.size = size
        self.free = [(0, size)]  # sorted, coalesced (offset, length)

    def alloc(self, n: int) -> int | None:
        n = max(_ALIGN, (n + _ALIGN - 1) & -_ALIGN)
        for i, (off, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (off + n, length - n)
                return off
        return None

    def release(self, off: int, n: int) -> None:
        n = max(_ALIGN, (n + _ALIGN - 1) & -_ALIGN)
        free = self.free
        i = 0
        while i < len(free) and free[i][0] < off:
            i += 1
        free.insert(i, (off, n))
        if i + 1 < len(free) and off + n == free[i + 1][0]:  # merge with the next
            free[i] = (off, n + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and with the previous
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]


@dataclass
class _Job:
    """One submitted job: where its output goes and what it holds until its completion."""

    wr_id: int
    out: np.ndarray                       # flat uint8 view of the final destination
    staged: np.ndarray | None = None      # what the device writes, copied to ``out`` (None: in place)
    held: list = field(default_factory=list)   # staging (offset, n) to give back
    tmp_mrs: list = field(default_factory=list)
    wc: AccelWC | None = None
    error: AccelJobError | None = None
    finish: Callable | None = None        # out bytes -> the caller's result

    @property
    def done(self) -> bool:
        return self.wc is not None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.finish(self.out) if self.finish is not None else self.out


def _u8(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array (no copy)."""
    return a.reshape(-1).view(np.uint8)


class AccelHelper(VerbsObject):
    """A Context's accelerator resources: a PD, a staging MR, a CQ and one AQ
    per op (made on first use), and the jobs in flight. Closed with the
    Context (before its other objects); :func:`helper` makes or returns it."""

    _close_rank = -1

    def __init__(self, ctx: Context, staging: int = STAGING_BYTES, depth: int = AQ_DEPTH):
        super().__init__(ctx)
        self.ctx = ctx
        self.depth = depth
        made: list[VerbsObject] = []
        try:
            made.append(pd := PD(ctx))
            made.append(cq := CQ(ctx, 4 * depth))
            made.append(mr := MR(pd, staging, Access.LOCAL_WRITE))
        except BaseException:
            for obj in reversed(made):
                obj.close()
            self._abandon()
            raise
        self.pd, self.cq, self.mr = pd, cq, mr
        self.staging = _Staging(staging)
        # numpy views from a view of its own (MR.close releases the MR's view; exports would stop it)
        self._view = np.frombuffer(ctx.view_of_uva(self.mr.buf, staging), dtype=np.uint8)
        self.aqs: dict[AccelOp, AQ] = {}
        self.pending: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        #: the MRs registered() found last, most recent first (at most _RECENT; closed ones are skipped)
        self._recent: list[weakref.ref[MR]] = []  # weak: the caller's MRs stay the caller's
        #: completions for no job of this helper (counted, dropped)
        self.stray_completions = 0
        #: bytes copied into / out of the staging area, and jobs that used memory in place
        self.bytes_staged_in = self.bytes_staged_out = self.zero_copy_buffers = 0

    def aq(self, op: AccelOp) -> AQ:
        q = self.aqs.get(op)
        if q is None:
            q = self.aqs[op] = AQ(self.pd, self.cq, op, self.depth)
        return q

    # --- memory ---------------------------------------------------------
    def registered(self, arr: np.ndarray, write: bool) -> SGE | None:
        """The SGE of ``arr`` (C-contiguous) if it lies in one MR of this
        helper's PD (with LOCAL_WRITE if ``write``), else None."""
        if not arr.flags.c_contiguous or (write and not arr.flags.writeable) or not arr.nbytes:
            return None
        addr, n = arr.ctypes.data, arr.nbytes
        for ref in self._recent:  # callers reuse their buffers: the MRs found last, first
            mr = ref()
            if (mr is not None and not mr.closed and mr.buf <= addr and addr + n <= mr.buf + mr.length
                    and (not write or int(mr.access) & _LOCAL_WRITE)):
                return SGE(addr, n, mr.lkey)
        for mr in list(self.pd._children):
            if (isinstance(mr, MR) and mr is not self.mr and not mr.closed and mr.buf <= addr
                    and addr + n <= mr.buf + mr.length and (not write or mr.access & Access.LOCAL_WRITE)):
                self._recent = [weakref.ref(mr), *(r for r in self._recent[: _RECENT - 1] if r() is not mr)]
                return SGE(addr, n, mr.lkey)
        return None

    def _place(self, job: _Job, n: int) -> tuple[SGE, np.ndarray] | None:
        """``n`` bytes of device-reachable memory for ``job``: (SGE, uint8 view), or None if
        the staging area has no room now (a job larger than it gets its own MR)."""
        if n > self.staging.size:
            mr = MR(self.pd, n, Access.LOCAL_WRITE)
            job.tmp_mrs.append(mr)
            return SGE(mr.buf, n, mr.lkey), np.frombuffer(self.ctx.view_of_uva(mr.buf, n), dtype=np.uint8)
        off = self.staging.alloc(n)
        if off is None:
            return None
        job.held.append((off, n))
        return SGE(self.mr.buf + off, n, self.mr.lkey), self._view[off : off + n]

    def _drop(self, job: _Job) -> None:
        for off, n in job.held:
            self.staging.release(off, n)
        job.held.clear()
        for mr in job.tmp_mrs:
            mr.close()
        job.tmp_mrs.clear()

    # --- jobs -------------------------------------------------------------
    def try_submit(self, op: AccelOp, src: np.ndarray, out_bytes: int, dst: np.ndarray | None,
                   finish: Callable | None, **params) -> _Job | None:
        """Post one job of ``op`` reading ``src`` (C-contiguous; in place if
        registered, else copied into staging) and writing ``out_bytes`` bytes
        into ``dst`` (in place if registered; else through staging; None: a
        new uint8 array). None if the queue or the staging area is full now."""
        q = self.aq(op)
        if not q.free_slots:
            return None
        job = _Job(next(self._ids), np.empty(0, np.uint8), finish=finish)
        in_sge = self.registered(src, False)
        try:
            if in_sge is None:
                got = self._place(job, src.nbytes)
                if got is None:
                    return None
                in_sge, view = got
                view[:] = _u8(src)
                self.bytes_staged_in += src.nbytes
            else:
                self.zero_copy_buffers += 1
            out_sge = None if dst is None else self.registered(dst, True)
            if out_sge is None:
                got = self._place(job, out_bytes)
                if got is None:
                    self._drop(job)
                    return None
                out_sge, job.staged = got
                job.out = _u8(dst) if dst is not None else np.empty(out_bytes, np.uint8)
            else:
                assert dst is not None  # registered() found it
                self.zero_copy_buffers += 1
                job.out = _u8(dst)
            wr = AccelWR(job.wr_id, inputs=[in_sge], outputs=[out_sge], **params)
            if q.post([wr]) != 1:  # cannot happen: a slot was free
                self._drop(job)
                return None
        except BaseException:
            self._drop(job)
            raise
        self.pending[job.wr_id] = job
        return job

    def progress(self) -> int:
        """Poll the CQ once (up to 32 completions) and finish their jobs;
        returns how many completions it took."""
        n, wcs = self.cq.poll(32)
        for wc in wcs:
            job = self.pending.pop(wc.wr_id, None)
            if job is None or not isinstance(wc, AccelWC):
                self.stray_completions += 1
                continue
            self._complete(job, wc)
        return n

    def _complete(self, job: _Job, wc: AccelWC) -> None:
        try:
            if wc.accel_status != AccelStatus.SUCCESS:
                job.error = AccelJobError(wc)
            else:
                if job.staged is not None:
                    job.out[:] = job.staged[: job.out.nbytes]
                    self.bytes_staged_out += job.out.nbytes
        finally:
            job.staged = None
            self._drop(job)
            job.wc = wc

    def wait(self, job: _Job, timeout: float | None = None) -> bool:
        """Drive completions until ``job`` is done (True) or ``timeout`` passes (False)."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        sleep, spin_until = _SLEEP_MIN, now + _SPIN
        while not job.done:
            if self.progress():
                sleep, spin_until = _SLEEP_MIN, time.monotonic() + _SPIN
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now >= spin_until:
                time.sleep(sleep)
                sleep = min(sleep * 2, _SLEEP_MAX)
            else:
                os.sched_yield()  # a busy-polling device on this CPU (DBREC_POLL) goes first
        return True

    def submit(self, op: AccelOp, src: np.ndarray, out_bytes: int, dst: np.ndarray | None,
               finish: Callable | None, **params) -> _Job:
        """:meth:`try_submit`, driving completions while the queue or staging is full
        (RDMAError ETIMEDOUT if none comes within the Context's timeout)."""
        sleep = _SLEEP_MIN
        timeout = self.ctx.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.try_submit(op, src, out_bytes, dst, finish, **params)
            if job is not None:
                return job
            if self.progress():
                deadline = None if timeout is None else time.monotonic() + timeout
            else:
                if not self.pending:  # nothing to wait for: cannot happen, the staging is whole
                    raise UserError(f"{op.name} job of {src.nbytes} bytes finds no room in the staging area")
                if deadline is not None and time.monotonic() >= deadline:
                    raise RDMAError(f"no {op.name} job completed in {timeout} s to make room",
                                    errno.ETIMEDOUT)
                time.sleep(sleep)
                sleep = min(sleep * 2, _SLEEP_MAX)

    async def asubmit(self, op: AccelOp, src: np.ndarray, out_bytes: int, dst: np.ndarray | None,
                      finish: Callable | None, **params) -> _Job:
        sleep = 0.0
        while True:
            job = self.try_submit(op, src, out_bytes, dst, finish, **params)
            if job is not None:
                return job
            if not self.progress():
                await asyncio.sleep(sleep)
                sleep = min(max(sleep * 2, _SLEEP_MIN), _SLEEP_MAX)

    async def await_job(self, job: _Job):
        sleep = 0.0
        while not job.done:
            if self.progress():
                sleep = 0.0
                continue
            await asyncio.sleep(sleep)  # 0 first: other tasks run, then back off
            sleep = min(max(sleep * 2, _SLEEP_MIN), _SLEEP_MAX)
        return job.result()

    def _drain(self) -> None:
        """After DESTROY_AQ: take the completions of the jobs that were in
        flight (FLUSHED, or their results if they were running), so that the
        device is done with the staging MR, the PD and the CQ before they go
        (it keeps a destroyed queue until its last CQE is written). Bounded
        by the Context's timeout; nothing to wait for from a dead daemon."""
        timeout = self.ctx.timeout if self.ctx.timeout is not None else 10.0
        deadline = time.monotonic() + timeout
        while self.pending and not self.ctx.dead and time.monotonic() < deadline:
            try:
                if not self.progress():
                    time.sleep(_SLEEP_MIN)
            except RDMAError:  # the daemon went away meanwhile
                return

    def _release(self) -> None:
        try:
            for q in list(getattr(self, "aqs", {}).values()):
                q.close()
            self._drain()
            for job in list(getattr(self, "pending", {}).values()):
                job.staged = None
                self._drop(job)
            if getattr(self, "_view", None) is not None:
                del self._view
            for obj in (self.mr, self.pd, self.cq):
                obj.close()
        finally:
            if self.ctx.accel_helper is self:
                self.ctx.accel_helper = None


def helper(ctx: Context) -> AccelHelper:
    """The Context's :class:`AccelHelper`, made on first use; RDMAError
    EOPNOTSUPP (nothing made) if the device offers no accelerator queues."""
    h = ctx.accel_helper
    if h is None and not ctx.has_accel:
        ctx._check_open()
        raise RDMAError(f"the device at {ctx.name} offers no accelerator queues (VIRTIO_RDMA_F_ACCEL)",
                        errno.EOPNOTSUPP)
    if not isinstance(h, AccelHelper) or h.closed:
        h = AccelHelper(ctx)
        ctx.accel_helper = h
    return h


# --- accel_core's call shapes --------------------------------------------------
def _fft_job(ctx: Context, x, out, op: AccelOp):
    x, n, double = _dft.check_input(x)
    if out is not None:
        _dft.check_out(x, out)
    dst = out if out is not None else np.empty_like(x)
    if not x.size:
        return None, dst
    h = helper(ctx)
    params = dict(size=n, batch=x.size // n, dtype=AccelDtype.COMPLEX128 if double else AccelDtype.COMPLEX64)
    return (h, (op, x, x.nbytes, dst, lambda _b: dst), params), dst


def _encode_job(ctx: Context, bits):
    arr = as_bits(bits)
    K = check_block_size(arr.shape[-1])
    dst = np.empty((*arr.shape[:-1], 3, K + _TAIL), dtype=np.uint8)
    if not arr.size:
        return None, dst
    h = helper(ctx)
    return (h, (AccelOp.TURBO_ENCODE, arr, dst.nbytes, dst, lambda _b: dst),
            dict(size=K, batch=arr.size // K)), dst


def _decode_job(ctx: Context, llr, iterations, scaling, early_stop):
    its = _turbo.check_iterations(iterations)
    scale = _turbo.check_scaling(scaling)
    stop = _turbo.check_early_stop(early_stop)
    arr = _turbo.check_llr(llr)
    K = arr.shape[-1] - _TAIL
    B = arr.size // (3 * (K + _TAIL))
    single = arr.ndim == 2
    bits_shape = (*arr.shape[:-2], K)
    if not B:
        return None, (np.empty(bits_shape, np.uint8), np.empty(0, np.int32))
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)  # accel_core's conversion of other floats
    if not np.isfinite(arr).all():
        _turbo._finite_clipped(np.asarray(llr))  # raises accel_core's ElementError naming the first
    h = helper(ctx)

    def finish(out: np.ndarray):
        bits = out[: B * K].reshape(bits_shape)
        used = out[B * K : B * K + B].astype(np.int32)
        return bits, int(used[0]) if single else used

    return (h, (AccelOp.TURBO_DECODE, arr, B * K + B, None, finish),
            dict(size=K, batch=B, iterations=its, early_stop=_EARLY_STOP[stop], scaling=scale)), None


def _run(job_spec):
    h, args, params = job_spec
    job = h.submit(*args, **params)
    timeout = h.ctx.timeout  # the Context's bound on every wait for the device
    h.wait(job, timeout)
    if not job.done:
        raise RDMAError(f"accelerator job {job.wr_id:#x} did not complete in {timeout} s", errno.ETIMEDOUT)
    return job.result()


def fft(ctx: Context, x, out=None):
    """``accel_core.fft(x, out)`` run by the device: forward FFT along the last axis.

    ``x`` (and ``out``) in an MR of ``helper(ctx).pd`` are used in place;
    otherwise ``x`` is copied once into the staging area and the result once
    out of it. Returns the output array (``out`` if given)."""
    spec, dst = _fft_job(ctx, x, out, AccelOp.FFT)
    return dst if spec is None else _run(spec)


def ifft(ctx: Context, x, out=None):
    """``accel_core.ifft(x, out)`` run by the device (scaled by 1/n); memory as :func:`fft`."""
    spec, dst = _fft_job(ctx, x, out, AccelOp.IFFT)
    return dst if spec is None else _run(spec)


def turbo_encode(ctx: Context, bits):
    """``accel_core.turbo_encode(bits)`` run by the device: uint8 [3, K+4] or [B, 3, K+4].
    The bits are copied once into staging unless registered (uint8, C-contiguous)."""
    spec, dst = _encode_job(ctx, bits)
    return dst if spec is None else _run(spec)


def turbo_decode(ctx: Context, llr, iterations: int = 8, scaling: float | None = None,
                 early_stop: str | None = None):
    """``accel_core.turbo_decode(llr, ...)`` run by the device: ``(bits, iters_used)``,
    an int for one block [3, K+4], an int32 array [B] for a batch [B, 3, K+4].
    float32 C-contiguous LLRs in a registered MR are read in place; others
    are converted as accel_core converts them and copied once into staging.
    The result arrays are new (copied once out of staging)."""
    spec, empty = _decode_job(ctx, llr, iterations, scaling, early_stop)
    return empty if spec is None else _run(spec)


async def _arun(spec):
    h, args, params = spec
    job = await h.asubmit(*args, **params)
    return await h.await_job(job)


async def afft(ctx: Context, x, out=None):
    """:func:`fft` as a coroutine: the CQ is polled from the event loop."""
    spec, dst = _fft_job(ctx, x, out, AccelOp.FFT)
    return dst if spec is None else await _arun(spec)


async def aifft(ctx: Context, x, out=None):
    """:func:`ifft` as a coroutine."""
    spec, dst = _fft_job(ctx, x, out, AccelOp.IFFT)
    return dst if spec is None else await _arun(spec)


async def aturbo_encode(ctx: Context, bits):
    """:func:`turbo_encode` as a coroutine."""
    spec, dst = _encode_job(ctx, bits)
    return dst if spec is None else await _arun(spec)


async def aturbo_decode(ctx: Context, llr, iterations: int = 8, scaling: float | None = None,
                        early_stop: str | None = None):
    """:func:`turbo_decode` as a coroutine."""
    spec, empty = _decode_job(ctx, llr, iterations, scaling, early_stop)
    return empty if spec is None else await _arun(spec)


# --- the file-like device ---------------------------------------------------------
def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise UserError(f"{name}={v!r} must be a positive int")
    return int(v)


class AccelFile:
    """One accelerator, opened like a file (:func:`open`): each ``write()``
    of exactly :attr:`in_size` bytes submits one job; ``read()`` returns the
    next job's result bytes (:attr:`out_size`), in the order written.
    The input is copied once into the staging area; the result once out."""

    def __init__(self, ctx: Context, kind: str, *, n: int | None = None, dtype="complex64", batch: int = 1,
                 k: int | None = None, iterations: int = 8, scaling: float | None = None,
                 early_stop: str | None = None):
        self.ctx, self.kind = ctx, kind
        self.batch = b = _positive_int("batch", batch)
        ops = {"fft": AccelOp.FFT, "ifft": AccelOp.IFFT, "turbo_encode": AccelOp.TURBO_ENCODE,
               "turbo_decode": AccelOp.TURBO_DECODE}
        if kind not in ops:
            raise UserError(f"accelerator {kind!r} is unknown; one of {', '.join(ops)}")
        self.op = ops[kind]
        self._check: Callable[[np.ndarray], None] | None = None
        self.params: dict[str, Any]
        if self.op in (AccelOp.FFT, AccelOp.IFFT):
            if n is None:
                raise UserError(f"open({kind!r}) needs n=")
            size = _dft.check_size(n)
            double = _dft.check_dtype(dtype, "dtype")
            self.in_dtype = np.dtype(np.complex128 if double else np.complex64)
            self.in_size = self.out_size = b * size * self.in_dtype.itemsize
            self.params = dict(size=size, batch=b,
                               dtype=AccelDtype.COMPLEX128 if double else AccelDtype.COMPLEX64)
        else:
            if k is None:
                raise UserError(f"open({kind!r}) needs k=")
            K = check_block_size(k)
            if self.op is AccelOp.TURBO_ENCODE:
                self.in_dtype = np.dtype(np.uint8)
                self.in_size, self.out_size = b * K, b * 3 * (K + _TAIL)
                self.params = dict(size=K, batch=b)
                self._check = check_bit_values
            else:
                its = _turbo.check_iterations(iterations)
                scale = _turbo.check_scaling(scaling)
                stop = _turbo.check_early_stop(early_stop)
                self.in_dtype = np.dtype(np.float32)
                self.in_size, self.out_size = b * 3 * (K + _TAIL) * 4, b * K + b
                self.params = dict(size=K, batch=b, iterations=its, early_stop=_EARLY_STOP[stop],
                                   scaling=scale)
                self._check = self._finite
        self._h = helper(ctx)
        self._jobs: deque[_Job] = deque()
        self._closed = False

    @staticmethod
    def _finite(x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            _turbo._finite_clipped(x)  # accel_core's ElementError naming the first

    def write(self, data) -> int:
        """Submit one job whose input is ``data`` (exactly :attr:`in_size`
        bytes, else :class:`AccelSizeError`); returns the bytes taken.
        Blocks only while the queue or the staging area is full."""
        if self._closed:
            raise UserError(f"accelerator file {self.kind!r} is closed")
        mv = memoryview(data).cast("B")
        if mv.nbytes != self.in_size:
            raise AccelSizeError(f"{self.kind} write of {mv.nbytes} bytes: one job's input is "
                                 f"{self.in_size} bytes")
        x = np.frombuffer(mv, dtype=self.in_dtype)
        if self._check is not None:
            self._check(x)
        self._jobs.append(self._h.submit(self.op, x, self.out_size, None, None, **self.params))
        return mv.nbytes

    def read(self, timeout: float | None = None) -> bytes:
        """The next result's bytes, in write order (blocking; RDMAError
        ETIMEDOUT after ``timeout`` seconds, None: the Context's timeout, the
        job staying queued; UserError if nothing was written; AccelJobError
        if the job failed)."""
        if self._closed:
            raise UserError(f"accelerator file {self.kind!r} is closed")
        if not self._jobs:
            raise UserError(f"read from accelerator file {self.kind!r} with no job written")
        job = self._jobs[0]
        if timeout is None:
            timeout = self.ctx.timeout
        if not self._h.wait(job, timeout):
            raise RDMAError(f"{self.kind} result not ready in {timeout} s", errno.ETIMEDOUT)
        self._jobs.popleft()
        return job.result().tobytes()

    @property
    def pending(self) -> int:
        """Jobs written whose result was not read yet."""
        return len(self._jobs)

    def close(self) -> None:
        """Forget unread results (their jobs still complete; idempotent; never
        an error, also after the daemon went away)."""
        if self._closed:
            return
        self._closed = True
        jobs, self._jobs = self._jobs, deque()
        if self._h.closed or self.ctx.dead:
            return
        try:
            for job in jobs:  # let the jobs finish so their staging space comes back
                self._h.wait(job, self.ctx.timeout)
        except RDMAError:
            pass  # the daemon went away: the helper lets go of everything with the Context

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(ctx: Context, kind: str, **params) -> AccelFile:
    """Open an accelerator as a file: ``kind`` "fft" / "ifft" (``n=``,
    ``dtype=``, ``batch=``), "turbo_encode" (``k=``, ``batch=``) or
    "turbo_decode" (``k=``, ``batch=``, ``iterations=``, ``scaling=``,
    ``early_stop=``). Parameters are checked by accel_core's checks."""
    return AccelFile(ctx, kind, **params)

