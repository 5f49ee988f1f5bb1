"""Completion queue (ibv_cq): a ring of CQEs in guest memory, polled directly.

The device writes CQE number n to slot n mod cqe with owner bit
((n / cqe) & 1) ^ 1, owner byte last; polling needs no virtqueue round trip.
The consumer index goes to the CQ's doorbell record so the device can tell
an overflow. An accelerator job's CQE (opcode ACCEL_CQE_OPCODE_BASE | op,
5.x.6.10) comes out of ``poll`` as an :class:`AccelWC` and frees its slot of
the accelerator queue (guest_lib.aq). ``req_notify`` arms the CQ; ``get_event`` blocks on the event
queue until the device reports a completion for this CQ.

``poll_into`` copies the raw CQEs into a caller's array of :data:`WC_DTYPE`
(no object per completion, as perftest polls into an ibv_wc array);
``poll_counts`` only counts them (receives, others, errors).

Two implementations read the ring: the native :class:`guest_lib._fast.CompletionRing`
(the default) and :class:`PyCompletionRing`, the Python reference; a CQ or
QP takes the one :func:`native_default` names when it is made
(``VRDMA_GUEST_NATIVE=0`` in the environment, or ``NATIVE = False`` here,
chooses Python).

``poll`` returns what the ring holds even when the daemon is gone; an empty
poll looks at the daemon's socket at most once per
``context.LIVENESS_INTERVAL`` and raises ``RDMAError`` (ENOTCONN) once it is
gone, so busy-poll loops end instead of spinning forever.
"""
from __future__ import annotations

import errno
import os
import struct
import time
from dataclasses import dataclass
from time import monotonic

import numpy as np

from guest_lib import _fast
from guest_lib.base import VerbsObject
from guest_lib.context import Context
from guest_lib.errors import RDMAError, UserError
from verbs import WcOpcode, WcStatus
from virtio.memory import le32_words
from virtio_rdma import wire
from virtio_rdma.constants import ACCEL_CQE_OPCODE_BASE, AccelOp, AccelStatus, Cmd, CqArm

_CQE = struct.Struct("<QBBBBIIIII")
_OWNER = wire.CQE_OWNER_OFFSET
_ACCEL = ACCEL_CQE_OPCODE_BASE  # every accelerator CQE opcode is >= this; no verbs opcode is
_ACCEL_OPS = {int(o): o for o in AccelOp}
_ACCEL_STATUSES = {int(s): s for s in AccelStatus}
_SERVICE_MASK = wire.ACCEL_SERVICE_US_MAX
_ITER_SHIFT = _SERVICE_MASK.bit_length()
_RECV = 0x80  # WcOpcode.RECV's bit: RECV (128) and RECV_RDMA_WITH_IMM (129) carry it
assert _RECV == WcOpcode.RECV

#: the native fast path (guest_lib._fast) for the CQs and QPs made from now on
NATIVE = os.environ.get("VRDMA_GUEST_NATIVE", "1") != "0"


def native_default() -> bool:
    """Do new CQs and QPs use the native fast path? (:data:`NATIVE`)"""
    return NATIVE


#: one completion as ``poll_into`` writes it: the CQE's own layout
#: (virtio_rdma.wire.Cqe, 32 bytes), the owner byte zeroed
WC_DTYPE = np.dtype([(sc.name, {1: "u1", 4: "<u4", 8: "<u8"}[sc.sizeof()]) for sc in wire.Cqe.subcons])
assert WC_DTYPE.itemsize == wire.CQE_SIZE


@dataclass
class WC:
    wr_id: int
    status: int
    opcode: int
    vendor_err: int
    byte_len: int
    qp_num: int
    src_qp: int
    imm_data: int
    wc_flags: int

    def __str__(self):
        try:
            st = WcStatus(self.status).name
        except ValueError:
            st = str(self.status)
        return f"WC(wr_id={self.wr_id}, status={st}, opcode={self.opcode}, byte_len={self.byte_len})"


@dataclass
class AccelWC:
    """An accelerator job's completion (docs/virtio-rdma.md 5.x.6.10), as
    ``CQ.poll`` returns it beside the :class:`WC` s of the verbs.

    ``status`` is the ibv_wc_status the CQE carries (SUCCESS, or the error
    class of ``accel_status``), ``accel_status`` the
    :class:`~virtio_rdma.constants.AccelStatus`, ``op`` the AccelOp,
    ``qp_num`` the AQN, ``byte_len`` the bytes written to the output,
    ``host`` the host that ran the job (0: this one), ``wait_us`` /
    ``service_us`` the queue wait and service time, ``iterations`` (Turbo
    decode) the most iterations a block used. An op or status this library
    does not know stays a plain int."""

    wr_id: int
    status: int
    opcode: int
    op: AccelOp | int
    accel_status: AccelStatus | int
    byte_len: int
    qp_num: int
    host: int
    wait_us: int
    service_us: int
    iterations: int

    @property
    def aqn(self) -> int:
        return self.qp_num

    def __str__(self):
        return (f"AccelWC(wr_id={self.wr_id}, op={getattr(self.op, 'name', self.op)}, "
                f"status={getattr(self.accel_status, 'name', self.accel_status)}, byte_len={self.byte_len}, "
                f"host={self.host}, wait_us={self.wait_us}, service_us={self.service_us})")


def _accel_wc(wr_id: int, st: int, op: int, fl: int, blen: int, imm: int, qpn: int, src: int,
              verr: int) -> AccelWC:
    return AccelWC(wr_id, st, op, _ACCEL_OPS.get(op - _ACCEL, op - _ACCEL), _ACCEL_STATUSES.get(fl, fl), blen,
                   qpn, imm, src, verr & _SERVICE_MASK, verr >> _ITER_SHIFT)


class PyCompletionRing:
    """A CQ's ring and consumer index in Python: the reference the native
    :class:`guest_lib._fast.CompletionRing` is checked against (same
    constructor, methods and results)."""

    def __init__(self, ring, dbrec, cqe: int, make_wc, accel_wc):
        if cqe <= 0 or cqe & (cqe - 1):
            raise ValueError(f"CQ size {cqe} must be a power of two")
        if len(ring) < cqe * wire.CQE_SIZE:
            raise ValueError(f"the CQ ring of {len(ring)} bytes is smaller than its "
                             f"{cqe * wire.CQE_SIZE}-byte geometry")
        self.ring, self.cqe = ring, cqe
        self._ci_word = le32_words(dbrec)  # the consumer index, stored whole
        self._mask, self._shift = cqe - 1, cqe.bit_length() - 1
        self.make_wc, self.accel_wc = make_wc, accel_wc
        self.ci = 0

    def close(self) -> None:
        self._ci_word.release()

    def _entries(self, num_entries: int):
        """(offset, ci after it) of each written CQE, up to ``num_entries``."""
        ring, ci = self.ring, self.ci
        for _ in range(num_entries):
            off = (ci & self._mask) * wire.CQE_SIZE
            if (ring[off + _OWNER] & 1) != (((ci >> self._shift) & 1) ^ 1):
                return
            ci = (ci + 1) & 0xFFFFFFFF
            yield off, ci

    def _consumed(self, ci: int) -> None:
        self.ci = ci
        self._ci_word[0] = ci

    @staticmethod
    def _reclaim(op: int, st: int, qpn: int, qps: dict, aqs: dict) -> None:
        if op >= _ACCEL:
            aq = aqs.get(qpn)
            if aq is not None:
                aq._completed()
            return
        qp = qps.get(qpn)
        if qp is not None:
            qp._completed(op, st)

    def poll(self, num_entries: int, qps: dict, aqs: dict) -> list:
        out: list = []
        ci = self.ci
        for off, ci in self._entries(num_entries):  # noqa: B007  ci: the index after the last one
            wr_id, st, op, fl, _o, blen, imm, qpn, src, verr = _CQE.unpack_from(self.ring, off)
            if op >= _ACCEL:  # the one check the verbs path pays
                out.append(self.accel_wc(wr_id, st, op, fl, blen, imm, qpn, src, verr))
            else:
                out.append(self.make_wc(wr_id, st, op, verr, blen, qpn, src, imm, fl))
            self._reclaim(op, st, qpn, qps, aqs)
        if out:
            self._consumed(ci)
        return out

    def poll_into(self, out, qps: dict, aqs: dict, num_entries: int = -1) -> int:
        view = memoryview(out)
        if view.readonly or not view.c_contiguous:
            raise BufferError("poll_into needs a writable, C-contiguous buffer")
        dst = out.reshape(-1).view(np.uint8) if isinstance(out, np.ndarray) else view.cast("B")
        cap = len(dst) // wire.CQE_SIZE
        if 0 <= num_entries < cap:
            cap = num_entries
        n, ci = 0, self.ci
        for off, ci in self._entries(cap):  # noqa: B007
            at = n * wire.CQE_SIZE
            dst[at : at + wire.CQE_SIZE] = self.ring[off : off + wire.CQE_SIZE]
            dst[at + _OWNER] = 0
            _wr_id, st, op, _fl, _o, _blen, _imm, qpn, _src, _verr = _CQE.unpack_from(self.ring, off)
            self._reclaim(op, st, qpn, qps, aqs)
            n += 1
        if n:
            self._consumed(ci)
        return n

    def wait_counts(self, num_entries: int, qps: dict, aqs: dict, spin_ns: int,
                    block_ns: int) -> tuple[int, int, int, int, int, int]:
        clock = time.perf_counter_ns
        t0 = now = clock()
        phase, away = 0, 0
        while not any(True for _ in self._entries(1)):
            phase = 1
            if now - t0 >= spin_ns:
                phase = 2
                if now - t0 >= block_ns:
                    return 0, 0, 0, 3, now - t0, away
                t = now
                os.sched_yield()
                now = clock()
                away = max(away, now - t)
            else:
                now = clock()
        r = self.poll_counts(num_entries, qps, aqs)
        return r[0], r[1], r[2], phase, (clock() - t0) if phase else 0, away

    def poll_counts(self, num_entries: int, qps: dict, aqs: dict) -> tuple[int, int, int]:
        n = nrecv = nerr = 0
        ci = self.ci
        for off, ci in self._entries(num_entries):  # noqa: B007
            _wr_id, st, op, _fl, _o, _blen, _imm, qpn, _src, _verr = _CQE.unpack_from(self.ring, off)
            n += 1
            nerr += st != 0
            nrecv += op < _ACCEL and bool(op & _RECV)
            self._reclaim(op, st, qpn, qps, aqs)
        if n:
            self._consumed(ci)
        return nrecv, n - nrecv, nerr


class CQ(VerbsObject):
    _close_rank = 3

    def __init__(self, ctx: Context, cqe: int, cq_context=None, channel=None, comp_vector: int = 0):
        if cqe <= 0:
            raise UserError(f"CQ size {cqe} must be positive")
        super().__init__(ctx)
        self.ctx = ctx
        self.cq_context = cq_context
        n = 1 << (cqe - 1).bit_length()
        self.ring_gpa, self.ring = ctx.alloc(n * wire.CQE_SIZE, 4096)
        self.dbrec_gpa, self.dbrec = ctx.alloc(wire.DBREC_SIZE, 64)
        try:
            r = ctx.command(Cmd.CREATE_CQ, cqe=n, comp_vector=comp_vector, ring_gpa=self.ring_gpa,
                            dbrec_gpa=self.dbrec_gpa)
        except BaseException:
            self._free_memory()
            self._abandon()
            raise
        self.cqn, self.cqe = r["cqn"], r["cqe"]
        rings = _fast.CompletionRing if native_default() else PyCompletionRing
        try:
            self._cr = rings(self.ring, self.dbrec, self.cqe, WC, _accel_wc)
        except (ValueError, OverflowError) as e:  # the device's ring does not fit what we allocated
            try:
                ctx._destroy(Cmd.DESTROY_CQ, cqn=self.cqn)
            finally:
                self._free_memory()
                self._abandon()
            raise RDMAError(f"CREATE_CQ: the device's ring of {self.cqe} CQEs is unusable: {e}",
                            errno.EPROTO) from e

    @property
    def ci(self) -> int:
        """The consumer index: CQEs polled so far (mod 2**32)."""
        return self._cr.ci

    @property
    def native(self) -> bool:
        """Is this CQ read by the native fast path (guest_lib._fast)?"""
        return isinstance(self._cr, _fast.CompletionRing)

    def _idle(self) -> None:
        if monotonic() >= self.ctx._next_check:  # nothing yet: is anyone still there to complete it?
            self.ctx.check_alive(f"poll of CQ {self.cqn}")

    def poll(self, num_entries: int = 1) -> tuple[int, list[WC | AccelWC]]:
        """Poll up to ``num_entries`` completions: (npolled, [WC]); an
        accelerator job's completion comes out as an :class:`AccelWC`."""
        ctx = self.ctx
        out = self._cr.poll(num_entries, ctx.qps, ctx.aqs)
        if not out:
            self._idle()
        return len(out), out

    def poll_into(self, out, num_entries: int = -1) -> int:
        """Poll up to ``num_entries`` (default: as many as fit) completions
        into ``out``, a numpy array of :data:`WC_DTYPE` (or any writable
        buffer of 32-byte records): the CQEs as the device wrote them, the
        owner byte zeroed, an accelerator job's too (``opcode`` >=
        ACCEL_CQE_OPCODE_BASE). Returns how many; no object per completion."""
        ctx = self.ctx
        n = self._cr.poll_into(out, ctx.qps, ctx.aqs, num_entries)
        if not n:
            self._idle()
        return n

    def poll_counts(self, num_entries: int = 16) -> tuple[int, int, int]:
        """Consume up to ``num_entries`` completions and only count them:
        (receive completions, other completions, completions in error), the
        batch form perftest-style loops need."""
        ctx = self.ctx
        r = self._cr.poll_counts(num_entries, ctx.qps, ctx.aqs)
        if not (r[0] or r[1]):
            self._idle()
        return r

    def wait_counts(self, num_entries: int = 16, spin_ns: int = 0,
                    block_ns: int = 2_000_000) -> tuple[int, int, int, int, int, int]:
        """:meth:`poll_counts` once a completion is there: spin for
        ``spin_ns``, then sched_yield between looks until ``block_ns`` have
        passed (the native path waits without the GIL). Returns (receives,
        others, errors, phase, waited_ns, away_ns): phase 0 found at once, 1
        while spinning, 2 while yielding, 3 nothing within ``block_ns``;
        away_ns is the longest a sched_yield kept the CPU from us."""
        ctx = self.ctx
        r = self._cr.wait_counts(num_entries, ctx.qps, ctx.aqs, spin_ns, block_ns)
        if r[3] == 3:
            self._idle()
        return r

    def req_notify(self, solicited_only: bool = False) -> None:
        self.ctx.command(Cmd.REQ_NOTIFY_CQ, cqn=self.cqn,
                         flags=int(CqArm.SOLICITED_ONLY) if solicited_only else 0)

    def get_event(self, timeout: float | None = None) -> bool:
        """Wait for a completion event of this CQ (after req_notify)."""
        ctx = self.ctx
        if not ctx.cq_events[self.cqn]:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not ctx.cq_events[self.cqn]:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not ctx._take_events(left) and deadline is not None and time.monotonic() >= deadline:
                    return False
        ctx.cq_events[self.cqn] -= 1
        return True

    def _free_memory(self) -> None:
        cr = getattr(self, "_cr", None)
        if cr is not None:
            cr.close()  # its views of the ring go first
        for v in (self.ring, self.dbrec):
            v.release()
        if not self.ctx.closed:
            self.ctx.free(self.ring_gpa)
            self.ctx.free(self.dbrec_gpa)

    def _release(self) -> None:
        try:
            self.ctx._destroy(Cmd.DESTROY_CQ, cqn=self.cqn)
        finally:
            self._free_memory()
