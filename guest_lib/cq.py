"""Completion queue (ibv_cq): a ring of CQEs in guest memory, polled directly.

The device writes CQE number n to slot n mod cqe with owner bit
((n / cqe) & 1) ^ 1, owner byte last; polling needs no virtqueue round trip.
The consumer index goes to the CQ's doorbell record so the device can tell
an overflow. An accelerator job's CQE (opcode ACCEL_CQE_OPCODE_BASE | op,
5.x.6.10) comes out of ``poll`` as an :class:`AccelWC` and frees its slot of
the accelerator queue (guest_lib.aq). ``req_notify`` arms the CQ; ``get_event`` blocks on the event
queue until the device reports a completion for this CQ.

``poll`` returns what the ring holds even when the daemon is gone; an empty
poll looks at the daemon's socket at most once per
``context.LIVENESS_INTERVAL`` and raises ``RDMAError`` (ENOTCONN) once it is
gone, so busy-poll loops end instead of spinning forever.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from time import monotonic

from guest_lib.base import VerbsObject
from guest_lib.context import Context
from guest_lib.errors import UserError
from verbs import WcStatus
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
        self._ci_word = le32_words(self.dbrec)  # the consumer index, stored whole
        try:
            r = ctx.command(Cmd.CREATE_CQ, cqe=n, comp_vector=comp_vector, ring_gpa=self.ring_gpa,
                            dbrec_gpa=self.dbrec_gpa)
        except BaseException:
            self._free_memory()
            self._abandon()
            raise
        self.cqn, self.cqe = r["cqn"], r["cqe"]
        self._mask = self.cqe - 1
        self._shift = self.cqe.bit_length() - 1
        self.ci = 0

    def poll(self, num_entries: int = 1) -> tuple[int, list[WC | AccelWC]]:
        """Poll up to ``num_entries`` completions: (npolled, [WC]); an
        accelerator job's completion comes out as an :class:`AccelWC`."""
        ring, ci = self.ring, self.ci
        out: list[WC | AccelWC] = []
        qps = self.ctx.qps
        while len(out) < num_entries:
            off = (ci & self._mask) * 32
            if (ring[off + _OWNER] & 1) != (((ci >> self._shift) & 1) ^ 1):
                break
            wr_id, st, op, fl, _o, blen, imm, qpn, src, verr = _CQE.unpack_from(ring, off)
            ci = (ci + 1) & 0xFFFFFFFF
            if op >= _ACCEL:  # the one check the verbs path pays
                out.append(_accel_wc(wr_id, st, op, fl, blen, imm, qpn, src, verr))
                aq = self.ctx.aqs.get(qpn)
                if aq is not None:
                    aq._completed()
                continue
            out.append(WC(wr_id, st, op, verr, blen, qpn, src, imm, fl))
            qp = qps.get(qpn)
            if qp is not None:
                qp._completed(op, st)
        if out:
            self.ci = ci
            self._ci_word[0] = ci
        elif monotonic() >= self.ctx._next_check:  # nothing yet: is anyone still there to complete it?
            self.ctx.check_alive(f"poll of CQ {self.cqn}")
        return len(out), out

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
        for v in (self._ci_word, self.ring, self.dbrec):
            v.release()
        if not self.ctx.closed:
            self.ctx.free(self.ring_gpa)
            self.ctx.free(self.dbrec_gpa)

    def _release(self) -> None:
        try:
            self.ctx._destroy(Cmd.DESTROY_CQ, cqn=self.cqn)
        finally:
            self._free_memory()
