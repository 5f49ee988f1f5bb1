"""Accelerator queue: FFT and Turbo jobs handed to the device (docs/virtio-rdma.md 5.x.6.10).

The verbs-shaped layer of guest_lib's accelerator API (docs/accel-api.md),
modelled on DPDK bbdev: an :class:`AQ` is created from a PD and a CQ with one
operation (:class:`~virtio_rdma.constants.AccelOp`), a priority and a depth.
Its ring of ``AQ_SLOT_SIZE``-byte job slots and its 8-byte doorbell record
live in guest memory the device reaches. :meth:`AQ.post` is bbdev's
non-blocking enqueue: it takes as many :class:`AccelWR` as there are free
slots, writes them, stores the new producer index in the doorbell record and
rings one AQ doorbell (kind 4) -- none while a DBREC_POLL device is polling
the records (``ctx.device_polling()``, as for QPs) --, and returns how many
it took. Completions
come back on the CQ, in post order, as :class:`~guest_lib.cq.AccelWC` from
``CQ.poll``; each one frees its slot. The SGEs name MRs of the queue's PD
(outputs need LOCAL_WRITE); the device checks them as any local access.

Errors: a WR that cannot be encoded (too many SGEs, a value that does not
fit its field) is a :class:`~guest_lib.errors.UserError` and nothing of the
call is posted; what the device refuses is :class:`RDMAError` with its errno
(CREATE_AQ, CANCEL_AQ_JOB), or an error completion with an AccelStatus.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from time import monotonic

from accel_core.jobs import MAX_PRIORITY
from guest_lib.base import VerbsObject
from guest_lib.cq import CQ
from guest_lib.errors import UserError
from guest_lib.pd import PD
from verbs import UnknownValueError
from virtio.memory import le32_words
from virtio_rdma import wire
from virtio_rdma.constants import (
    AQ_SLOT_SIZE,
    MAX_ACCEL_SGE,
    AccelDtype,
    AccelEarlyStop,
    AccelJobFlags,
    AccelOp,
    Cmd,
    DoorbellKind,
)

_U32 = 0xFFFFFFFF
# The job entry's layout is wire's (one definition): post() packs it straight into the ring.
_JOB, _SGE = wire._AJOB, wire._SGE
_HDR, _SGE_SIZE, _NO_RESERVED = wire.ACCEL_JOB_HEADER_SIZE, wire.SGE_SIZE, wire._NO_RESERVED
_ZEROS = bytes(AQ_SLOT_SIZE)
_SCALING = int(AccelJobFlags.SCALING)
_OPS = frozenset(int(o) for o in AccelOp)
_DTYPES = frozenset(int(d) for d in AccelDtype)
_STOPS = frozenset(int(e) for e in AccelEarlyStop)


@dataclass
class AccelWR:
    """One accelerator job (a slot of the AQ's ring).

    ``size`` is the FFT's points n or the Turbo block size K; ``batch`` the
    number of transforms or code blocks; ``inputs`` / ``outputs`` are
    :class:`~guest_lib.wr.SGE` lists gathered / scattered in order (the
    byte layouts of each op are in the spec's table). ``op`` None means the
    queue's op (a different one completes with INVALID_PARAMS).
    ``iterations``, ``early_stop`` and ``scaling`` (None: plain max-log-MAP)
    are TURBO_DECODE's."""

    wr_id: int = 0
    size: int = 0
    batch: int = 1
    dtype: int = AccelDtype.COMPLEX64
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    iterations: int = 0
    early_stop: int = AccelEarlyStop.NONE
    scaling: float | None = None
    op: int | None = None


def encode_wr(wr: AccelWR, op: AccelOp) -> bytes:
    """The ``AQ_SLOT_SIZE``-byte job entry of ``wr`` on a queue of ``op``;
    UserError naming the WR if it cannot be encoded."""
    if len(wr.inputs) + len(wr.outputs) > MAX_ACCEL_SGE:
        raise UserError(f"accel WR {wr.wr_id:#x}: {len(wr.inputs)} + {len(wr.outputs)} SGEs exceed "
                        f"{MAX_ACCEL_SGE}")
    try:
        return wire.encode_accel_job(
            wr.wr_id, op if wr.op is None else wr.op, size=wr.size, batch=wr.batch, dtype=wr.dtype,
            iterations=wr.iterations, early_stop=wr.early_stop, scaling=wr.scaling,
            inputs=[(s.addr, s.length, s.lkey) for s in wr.inputs],
            outputs=[(s.addr, s.length, s.lkey) for s in wr.outputs])
    except (wire.WireError, UnknownValueError) as e:
        raise UserError(f"accel WR {wr.wr_id:#x}: {e}") from e


def pack_wr(buf, off: int, wr: AccelWR, op: AccelOp) -> None:
    """Write :func:`encode_wr`'s bytes of ``wr`` at ``buf[off:off + AQ_SLOT_SIZE]``
    without building them (the per-job cost of :meth:`AQ.post`); UserError as
    encode_wr (the slot may then hold part of the entry)."""
    ins, outs = wr.inputs, wr.outputs
    ni, no = len(ins), len(outs)
    wop = op if wr.op is None else wr.op
    scaling = wr.scaling
    if (ni + no > MAX_ACCEL_SGE or wop not in _OPS or wr.dtype not in _DTYPES
            or wr.early_stop not in _STOPS):
        buf[off : off + AQ_SLOT_SIZE] = encode_wr(wr, op)  # raises UserError naming the WR
        return
    try:
        _JOB.pack_into(buf, off, wr.wr_id, wop, wr.dtype, ni, no, wr.size, wr.batch, wr.iterations,
                       wr.early_stop, 0 if scaling is None else _SCALING, 0.0 if scaling is None else scaling,
                       _NO_RESERVED)
        o = off + _HDR
        for sg in ins:
            _SGE.pack_into(buf, o, sg.addr, sg.length, sg.lkey)
            o += _SGE_SIZE
        for sg in outs:
            _SGE.pack_into(buf, o, sg.addr, sg.length, sg.lkey)
            o += _SGE_SIZE
    except (struct.error, TypeError, AttributeError):
        buf[off : off + AQ_SLOT_SIZE] = encode_wr(wr, op)  # raises UserError naming the WR
        return
    end = off + AQ_SLOT_SIZE
    if o < end:
        buf[o:end] = _ZEROS[: end - o]


class AQ(VerbsObject):
    """An accelerator queue of ``op`` on ``pd`` whose completions go to ``cq``.

    ``depth`` is rounded up to a power of two (the device echoes what it
    took); ``priority`` 0 (lowest) .. 7; ``flags`` are
    :class:`~virtio_rdma.constants.AqFlags` (FORCE_TARGET with
    ``target_host``, LOCAL_FALLBACK)."""

    _close_rank = 0

    def __init__(self, pd: PD, cq: CQ, op: AccelOp | int, depth: int = 64, priority: int = 0,
                 flags: int = 0, target_host: int = 0):
        try:
            op = AccelOp.parse(op)
        except UnknownValueError as e:
            raise UserError(f"accelerator op {op!r} is unknown: {e}") from e
        if depth <= 0:
            raise UserError(f"AQ depth {depth} must be positive")
        if not 0 <= priority <= MAX_PRIORITY:
            raise UserError(f"AQ priority {priority} is outside 0..{MAX_PRIORITY}")
        if cq.ctx is not pd.ctx:
            raise UserError("the AQ's PD and CQ belong to different Contexts")
        super().__init__(pd)
        self.pd, self.cq, self.ctx, self.op = pd, cq, pd.ctx, op
        ctx = self.ctx
        n = 1 << (depth - 1).bit_length()
        self.ring_gpa, self.ring = ctx.alloc(n * AQ_SLOT_SIZE, 4096)
        self.dbrec_gpa, self.dbrec = ctx.alloc(wire.DBREC_SIZE, 64)
        self._pi_word = le32_words(self.dbrec)
        try:
            r = ctx.command(Cmd.CREATE_AQ, pdn=pd.pdn, cqn=cq.cqn, op=int(op), priority=priority,
                            flags=int(flags), reserved0=0, depth=n, ring_gpa=self.ring_gpa,
                            dbrec_gpa=self.dbrec_gpa, target_host=target_host, reserved1=0)
        except BaseException:
            self._free_memory()
            self._abandon()
            raise
        self.aqn, self.depth = r["aqn"], r["depth"]
        if self.depth != n:  # the device must echo what the ring holds
            self._release()
            self._abandon()
            raise UserError(f"CREATE_AQ: the device took depth {r['depth']}, the ring holds {n}")
        self.priority, self.flags, self.target_host = priority, int(flags), target_host
        self.pi = self.ci = 0
        #: jobs refused by post() for want of a free slot (bbdev's enqueue_err/queue-full count)
        self.queue_full = 0
        ctx.aqs[self.aqn] = self

    @property
    def in_flight(self) -> int:
        """Jobs posted whose completion has not been polled yet."""
        return (self.pi - self.ci) & _U32

    @property
    def free_slots(self) -> int:
        return self.depth - self.in_flight

    def post(self, wrs) -> int:
        """Enqueue one AccelWR or a list of them without blocking: takes the
        first ``min(len(wrs), free_slots)``, rings one doorbell (none while
        the device polls the doorbell records), returns how many it took (0:
        the queue is full; no doorbell then). Encoding errors raise UserError
        before anything is posted."""
        self._check_open()
        if isinstance(wrs, AccelWR):
            wrs = (wrs,)
        free = self.free_slots
        k = min(len(wrs), free)
        if k < len(wrs):
            self.queue_full += len(wrs) - k
        if not k:
            return 0
        ctx = self.ctx
        if monotonic() >= ctx._next_check:
            ctx.check_alive(f"post to AQ {self.aqn}")
        # Packed straight into the free slots; all or nothing: the producer index
        # (what the device reads up to) moves only once every entry is written.
        ring, mask, pi, op = self.ring, self.depth - 1, self.pi, self.op
        for i in range(k):
            pack_wr(ring, (pi & mask) * AQ_SLOT_SIZE, wrs[i], op)
            pi = (pi + 1) & _U32
        self.pi = pi
        self._pi_word[0] = pi
        # The doorbell record is written; a device polling it needs nothing more.
        if not ctx.device_polling():
            ctx.ring_doorbells(wire.encode_doorbell(DoorbellKind.AQ, self.aqn, pi))
        return k

    def cancel(self, wr_id: int) -> None:
        """Cancel the oldest queued job with ``wr_id`` (it completes with
        CANCELLED); RDMAError ENOENT if there is none, EBUSY if it is running."""
        self._check_open()
        self.ctx.command(Cmd.CANCEL_AQ_JOB, aqn=self.aqn, reserved=0, wr_id=wr_id)

    def _completed(self) -> None:
        """Called by CQ.poll for each completion of this queue: its slot is free."""
        self.ci = (self.ci + 1) & _U32

    def _free_memory(self) -> None:
        for v in (self._pi_word, self.ring, self.dbrec):
            v.release()
        if not self.ctx.closed:
            self.ctx.free(self.ring_gpa)
            self.ctx.free(self.dbrec_gpa)

    def _release(self) -> None:
        aqn = getattr(self, "aqn", None)
        if self.ctx.aqs.get(aqn) is self:
            del self.ctx.aqs[aqn]
        try:
            if aqn is not None:
                self.ctx._destroy(Cmd.DESTROY_AQ, aqn=aqn)
        finally:
            self._free_memory()
