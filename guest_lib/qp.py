"""Queue pair (ibv_qp), RC.

The send and receive queues are rings of fixed-size WQE slots in guest
memory (geometry: docs/virtio-rdma.md 5.x.6.5). ``post_send``/``post_recv``
write WQEs straight into the slots, update the QP's doorbell record and ring
one doorbell per call (a list of WRs is one batch). Slots are reclaimed as
completions are polled: send WRs complete in order, so a signaled completion
frees every slot up to it, as providers of real HCAs track it.

The rings are written by :class:`guest_lib._fast.WorkQueues` (native, the
default) or by :class:`PyWorkQueues`, the Python reference
(``VRDMA_GUEST_NATIVE=0``; guest_lib.cq.NATIVE when the QP is made). A bad
WR (too many SGEs, too much inline data, a field out of range, a full
queue) raises before its slot is touched; the WRs before it in the same
call are posted and rung, as ibv_post_send posts those before ``bad_wr``.
"""
from __future__ import annotations

import collections
import errno
import struct
from dataclasses import dataclass, field

from guest_lib import _fast
from guest_lib.base import VerbsObject
from guest_lib.cq import CQ, native_default
from guest_lib.errors import RDMAError, UserError
from guest_lib.pd import PD
from verbs import Mtu, QpAttrMask as M, QpState, QpType, SendFlags, WcOpcode
from virtio.memory import le32_words
from virtio_rdma import wire
from virtio_rdma.constants import Cmd, CreateQpFlags, DoorbellKind

_U32 = 0xFFFFFFFF
_INLINE, _SIGNALED = int(SendFlags.INLINE), int(SendFlags.SIGNALED)  # ints: enum flag arithmetic is slow
_MAX_SGE = _fast.MAX_SGE  # the most SGEs one WR may carry (either path)


@dataclass
class QPCap:
    max_send_wr: int = 64
    max_recv_wr: int = 64
    max_send_sge: int = 1
    max_recv_sge: int = 1
    max_inline_data: int = 0


@dataclass
class QPInitAttr:
    qp_type: int = QpType.RC
    scq: CQ | None = None
    rcq: CQ | None = None
    cap: QPCap = field(default_factory=QPCap)
    sq_sig_all: bool = False


@dataclass
class AHAttr:
    dgid: bytes = bytes(16)
    sgid_index: int = 0
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    port_num: int = 1


@dataclass
class QPAttr:
    qp_state: int = QpState.RESET
    cur_qp_state: int = 0
    path_mtu: int = int(Mtu.MTU_4096)
    qp_access_flags: int = 0
    pkey_index: int = 0
    port_num: int = 1
    qkey: int = 0
    ah_attr: AHAttr = field(default_factory=AHAttr)
    dest_qp_num: int = 0
    rq_psn: int = 0
    sq_psn: int = 0
    max_dest_rd_atomic: int = 1
    max_rd_atomic: int = 1
    min_rnr_timer: int = 12
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = 7

    def to_wire(self) -> wire.QpAttr:
        a = self.ah_attr
        return wire.qp_attr_defaults(
            qp_state=int(self.qp_state), cur_qp_state=int(self.cur_qp_state), path_mtu=self.path_mtu,
            timeout=self.timeout, retry_cnt=self.retry_cnt, rnr_retry=self.rnr_retry,
            min_rnr_timer=self.min_rnr_timer, max_rd_atomic=self.max_rd_atomic,
            max_dest_rd_atomic=self.max_dest_rd_atomic, port_num=self.port_num, sgid_index=a.sgid_index,
            hop_limit=a.hop_limit, traffic_class=a.traffic_class, pkey_index=self.pkey_index, qkey=self.qkey,
            rq_psn=self.rq_psn, sq_psn=self.sq_psn, dest_qp_num=self.dest_qp_num,
            qp_access_flags=int(self.qp_access_flags), flow_label=a.flow_label, dgid=bytes(a.dgid))


class PostList:
    """Send WQEs encoded once (:meth:`QP.prepare_send`), posted by :meth:`QP.post_list`."""

    __slots__ = ("qp", "wqes", "signaled")

    def __init__(self, qp, wqes: bytes, signaled: tuple):
        self.qp, self.wqes, self.signaled = qp, wqes, signaled


class PyWorkQueues:
    """A QP's send and receive rings and doorbell record, in Python: the
    reference the native :class:`guest_lib._fast.WorkQueues` is checked
    against (same constructor, methods, errors and bytes written). Every
    field of a WR is packed (and so checked) before its slot is written; on
    an error the WRs before the bad one stay posted."""

    def __init__(self, qpn: int, sq, rq, dbrec, sq_depth: int, rq_depth: int, sq_slot: int, rq_slot: int,
                 max_send_sge: int, max_recv_sge: int, sq_sig_all: bool, translate):
        for d in (sq_depth, rq_depth):
            if d <= 0 or d & (d - 1):
                raise ValueError(f"queue depths {sq_depth}/{rq_depth} must be powers of two")
        if sq_slot < wire.SEND_WQE_HEADER_SIZE or rq_slot < wire.RECV_WQE_HEADER_SIZE:
            raise ValueError(f"WQE slots {sq_slot}/{rq_slot} are smaller than their headers")
        for what, buf, need in (("the send queue", sq, sq_depth * sq_slot),
                                ("the receive queue", rq, rq_depth * rq_slot),
                                ("the doorbell record", dbrec, 8)):
            if len(buf) < need:
                raise ValueError(f"{what} of {len(buf)} bytes is smaller than its {need}-byte geometry")
        self.qpn, self.sq, self.rq = qpn, sq, rq
        self._pi_words = le32_words(dbrec)  # [sq_pi, rq_pi], each stored whole
        self.sq_depth, self.rq_depth, self.sq_slot, self.rq_slot = sq_depth, rq_depth, sq_slot, rq_slot
        self.max_send_sge, self.max_recv_sge, self.sq_sig_all = max_send_sge, max_recv_sge, bool(sq_sig_all)
        self.translate = translate
        self.sq_pi = self.sq_ci = self.rq_pi = self.rq_ci = 0
        self._signaled: collections.deque = collections.deque()  # one flag per posted, uncompleted send

    def close(self) -> None:
        self._pi_words.release()

    def reset(self) -> None:
        self.sq_pi = self.sq_ci = self.rq_pi = self.rq_ci = 0
        self._signaled.clear()
        self._pi_words[0] = self._pi_words[1] = 0

    def _pack(self, buf, off: int, wr) -> bool:
        """Write the WQE of ``wr`` into ``buf`` at ``off`` (one slot); returns
        whether it is signaled."""
        slot = self.sq_slot
        try:
            flags = int(wr.send_flags)
            sg = wr.sg if wr.num_sge is None else wr.sg[: wr.num_sge]
            if flags & _INLINE:
                data = b"".join(bytes(self.translate(s.addr, s.length)) for s in sg)
                room = slot - wire.SEND_WQE_HEADER_SIZE
                if len(data) > room:
                    raise UserError(f"{len(data)} bytes of inline data exceed the QP's {room}")
                wqe = bytearray(wire.SEND_WQE_HEADER_SIZE)
                wire.pack_send_wqe_header(wqe, 0, wr.wr_id, wr.opcode, flags, 0, wr.imm_data, wr.remote_addr,
                                          wr.rkey, len(data), wr.compare_add, wr.swap)
                wqe += data
            else:
                if len(sg) > min(self.max_send_sge, _MAX_SGE):
                    raise UserError(f"{len(sg)} SGEs exceed max_send_sge {self.max_send_sge}")
                wqe = bytearray(wire.SEND_WQE_HEADER_SIZE + wire.SGE_SIZE * len(sg))
                wire.pack_send_wqe_header(wqe, 0, wr.wr_id, wr.opcode, flags, len(sg), wr.imm_data,
                                          wr.remote_addr, wr.rkey, 0, wr.compare_add, wr.swap)
                wire.pack_sges(wqe, wire.SEND_WQE_HEADER_SIZE, [(s.addr, s.length, s.lkey) for s in sg])
        except (struct.error, OverflowError, TypeError) as e:
            raise UserError(f"send WR {wr.wr_id!r}: a field is out of range ({e})") from None
        buf[off : off + len(wqe)] = wqe
        return bool(flags & _SIGNALED) or self.sq_sig_all

    def _full(self, pi: int, n: int) -> None:
        if (pi - self.sq_ci) & _U32 > self.sq_depth - n:
            raise RDMAError(f"send queue of QP {self.qpn:#x} is full ({self.sq_depth} WRs)", errno.ENOMEM)

    def post_send(self, wrs) -> None:
        if not isinstance(wrs, (list, tuple)):
            wrs = (wrs,)
        sq, slot, mask = self.sq, self.sq_slot, self.sq_depth - 1
        pi = self.sq_pi
        try:
            for wr in wrs:
                self._full(pi, 1)
                self._signaled.append(self._pack(sq, (pi & mask) * slot, wr))
                pi = (pi + 1) & _U32
        finally:
            self.sq_pi = pi
            self._pi_words[0] = pi

    def prepare(self, wrs) -> tuple[bytes, tuple]:
        buf = bytearray(len(wrs) * self.sq_slot)
        signaled = tuple(self._pack(buf, i * self.sq_slot, wr) for i, wr in enumerate(wrs))
        return bytes(buf), signaled

    def post_list(self, wqes: bytes, signaled: tuple) -> None:
        n, slot = len(signaled), self.sq_slot
        if n * slot != len(wqes) or not 0 < n <= self.sq_depth:
            raise UserError(f"a post list of {len(wqes)} bytes does not hold {n} WQEs of this QP")
        pi = self.sq_pi
        self._full(pi, n)
        first = pi & (self.sq_depth - 1)
        k = min(n, self.sq_depth - first) * slot
        self.sq[first * slot : first * slot + k] = wqes[:k]
        if k < len(wqes):
            self.sq[: len(wqes) - k] = wqes[k:]
        self._signaled.extend(bool(s) for s in signaled)
        self.sq_pi = (pi + n) & _U32
        self._pi_words[0] = self.sq_pi

    def post_recv(self, wrs) -> None:
        if not isinstance(wrs, (list, tuple)):
            wrs = (wrs,)
        rq, slot, mask = self.rq, self.rq_slot, self.rq_depth - 1
        pi = self.rq_pi
        try:
            for wr in wrs:
                if (pi - self.rq_ci) & _U32 >= self.rq_depth:
                    raise RDMAError(f"receive queue of QP {self.qpn:#x} is full ({self.rq_depth} WRs)",
                                    errno.ENOMEM)
                sg = wr.sg if wr.num_sge is None else wr.sg[: wr.num_sge]
                if len(sg) > min(self.max_recv_sge, _MAX_SGE):
                    raise UserError(f"{len(sg)} SGEs exceed max_recv_sge {self.max_recv_sge}")
                wqe = bytearray(wire.RECV_WQE_HEADER_SIZE + wire.SGE_SIZE * len(sg))
                try:
                    wire.pack_recv_wqe_header(wqe, 0, wr.wr_id, len(sg))
                    wire.pack_sges(wqe, wire.RECV_WQE_HEADER_SIZE, [(s.addr, s.length, s.lkey) for s in sg])
                except (struct.error, OverflowError, TypeError) as e:
                    raise UserError(f"recv WR {wr.wr_id!r}: a field is out of range ({e})") from None
                off = (pi & mask) * slot
                rq[off : off + len(wqe)] = wqe
                pi = (pi + 1) & _U32
        finally:
            self.rq_pi = pi
            self._pi_words[1] = pi

    def completed(self, opcode: int, status: int) -> None:
        if opcode & WcOpcode.RECV:  # RECV (128) / RECV_RDMA_WITH_IMM (129)
            if self.rq_ci != self.rq_pi:  # never past what was posted, whatever the device says
                self.rq_ci = (self.rq_ci + 1) & _U32
            return
        q = self._signaled  # send WRs complete in order: a completion frees every slot up to it
        while q:
            self.sq_ci = (self.sq_ci + 1) & _U32
            if q.popleft() or status:
                break


TO_INIT = M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS
TO_RTR = M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER
TO_RTS = M.STATE | M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.MAX_QP_RD_ATOMIC


class QP(VerbsObject):
    _close_rank = 0

    def __init__(self, pd: PD, init_attr: QPInitAttr):
        if init_attr.scq is None or init_attr.rcq is None:
            raise UserError("QPInitAttr needs a send CQ (scq) and a receive CQ (rcq)")
        if init_attr.qp_type != QpType.RC:
            raise UserError(f"QP type {init_attr.qp_type} is not supported (only RC)")
        super().__init__(pd)
        self.pd, self.ctx = pd, pd.ctx
        self.scq, self.rcq = init_attr.scq, init_attr.rcq
        cap = init_attr.cap
        lay = wire.wq_layout(cap.max_send_wr, cap.max_recv_wr, cap.max_send_sge, cap.max_recv_sge,
                             cap.max_inline_data)
        ctx = self.ctx
        self.sq_gpa, self.sq = ctx.alloc(lay.sq_bytes, 4096)
        self.rq_gpa, self.rq = ctx.alloc(lay.rq_bytes, 4096)
        self.dbrec_gpa, self.dbrec = ctx.alloc(wire.DBREC_SIZE, 64)
        try:
            r = ctx.command(Cmd.CREATE_QP, pdn=pd.pdn, qp_type=int(QpType.RC), send_cqn=self.scq.cqn,
                            recv_cqn=self.rcq.cqn, max_send_wr=cap.max_send_wr, max_recv_wr=cap.max_recv_wr,
                            max_send_sge=cap.max_send_sge, max_recv_sge=cap.max_recv_sge,
                            max_inline_data=cap.max_inline_data,
                            flags=int(CreateQpFlags.SQ_SIG_ALL) if init_attr.sq_sig_all else 0,
                            sq_gpa=self.sq_gpa, rq_gpa=self.rq_gpa, dbrec_gpa=self.dbrec_gpa)
        except BaseException:
            self._free_memory()
            self._abandon()
            raise
        self.qp_num = r["qpn"]
        self.cap = QPCap(r["max_send_wr"], r["max_recv_wr"], r["max_send_sge"], r["max_recv_sge"],
                         r["max_inline_data"])
        self.sq_depth, self.rq_depth = r["max_send_wr"], r["max_recv_wr"]
        self.sq_slot, self.rq_slot = 1 << r["sq_wqe_shift"], 1 << r["rq_wqe_shift"]
        self.sq_sig_all = init_attr.sq_sig_all
        rings = _fast.WorkQueues if native_default() else PyWorkQueues
        try:
            self._wq = rings(self.qp_num, self.sq, self.rq, self.dbrec, self.sq_depth, self.rq_depth,
                             self.sq_slot, self.rq_slot, self.cap.max_send_sge, self.cap.max_recv_sge,
                             self.sq_sig_all, ctx.view_of_uva)
        except (ValueError, OverflowError) as e:  # the device's geometry does not fit what we allocated
            try:
                ctx._destroy(Cmd.DESTROY_QP, qpn=self.qp_num)
            finally:
                self._free_memory()
                self._abandon()
            raise RDMAError(f"CREATE_QP: the device's work queue geometry is unusable: {e}",
                            errno.EPROTO) from e
        self.state = QpState.RESET
        ctx.qps[self.qp_num] = self

    # --- state ----------------------------------------------------------
    def modify(self, attr: QPAttr, attr_mask: int) -> None:
        self.ctx.command(Cmd.MODIFY_QP, qpn=self.qp_num, attr_mask=int(attr_mask), attr=attr.to_wire())
        if attr_mask & M.STATE:
            self.state = QpState(attr.qp_state)
            if self.state is QpState.RESET:
                # indices to 0; the device may poll the record: it must not see old indices again
                self._wq.reset()

    def to_init(self, attr: QPAttr) -> None:
        attr.qp_state = QpState.INIT
        self.modify(attr, TO_INIT)

    def to_rtr(self, attr: QPAttr) -> None:
        attr.qp_state = QpState.RTR
        self.modify(attr, TO_RTR)

    def to_rts(self, attr: QPAttr) -> None:
        attr.qp_state = QpState.RTS
        self.modify(attr, TO_RTS)

    def query(self, attr_mask: int = 0xFFFFFFFF) -> dict:
        return self.ctx.command(Cmd.QUERY_QP, qpn=self.qp_num, attr_mask=int(attr_mask) & ((1 << 21) - 1))

    # --- posting ----------------------------------------------------------
    @property
    def sq_pi(self) -> int:
        return self._wq.sq_pi

    @property
    def sq_ci(self) -> int:
        return self._wq.sq_ci

    @property
    def rq_pi(self) -> int:
        return self._wq.rq_pi

    @property
    def rq_ci(self) -> int:
        return self._wq.rq_ci

    @property
    def native(self) -> bool:
        """Does this QP post through the native fast path (guest_lib._fast)?"""
        return isinstance(self._wq, _fast.WorkQueues)

    def post_send(self, wrs) -> None:
        """Post one SendWR or a list of them (one doorbell for the list). On
        an error the WRs before the bad one are posted (and rung)."""
        self._check_open()
        wq = self._wq
        before = wq.sq_pi
        try:
            wq.post_send(wrs)
        finally:
            if wq.sq_pi != before:
                self._ring(DoorbellKind.SQ, wq.sq_pi)

    def prepare_send(self, wrs) -> PostList:
        """Encode a list of SendWRs once, to post it many times with
        :meth:`post_list` (perftest's ``-l``: the same WRs, one doorbell)."""
        wrs = list(wrs)
        if not 0 < len(wrs) <= self.sq_depth:
            raise UserError(f"a post list of {len(wrs)} WRs does not fit a {self.sq_depth}-WR send queue")
        wqes, signaled = self._wq.prepare(wrs)
        return PostList(self, wqes, signaled)

    def post_list(self, plist: PostList) -> None:
        """Post a prepared list: its WQEs are copied into the ring in at most
        two slice copies, then one doorbell."""
        self._check_open()
        if plist.qp is not self:
            raise UserError("this post list was prepared for another QP")
        self._wq.post_list(plist.wqes, plist.signaled)
        self._ring(DoorbellKind.SQ, self._wq.sq_pi)

    def post_recv(self, wrs) -> None:
        """Post one RecvWR or a list of them (one doorbell for the list)."""
        self._check_open()
        if self.state is QpState.RESET:  # the device ignores RQ doorbells in RESET, as rxe does
            raise RDMAError(f"post_recv on QP {self.qp_num:#x} in RESET", errno.EINVAL)
        wq = self._wq
        before = wq.rq_pi
        try:
            wq.post_recv(wrs)
        finally:
            if wq.rq_pi != before:
                self._ring(DoorbellKind.RQ, wq.rq_pi)

    def _ring(self, kind: DoorbellKind, pi: int) -> None:
        # The doorbell record is written; a polling device needs nothing more.
        if self.ctx.device_polling():
            return
        self.ctx.ring_doorbells(wire.encode_doorbell(kind, self.qp_num, pi))

    def _completed(self, opcode: int, status: int) -> None:
        """Called by CQ.poll for each CQE of this QP: reclaim slots."""
        self._wq.completed(opcode, status)

    # --- teardown -----------------------------------------------------------
    def _free_memory(self) -> None:
        wq = getattr(self, "_wq", None)
        if wq is not None:
            wq.close()  # its views of the rings go first
        for v in (self.sq, self.rq, self.dbrec):
            v.release()
        if not self.ctx.closed:
            for gpa in (self.sq_gpa, self.rq_gpa, self.dbrec_gpa):
                self.ctx.free(gpa)

    def _release(self) -> None:
        self.ctx.qps.pop(getattr(self, "qp_num", None), None)
        try:
            if hasattr(self, "qp_num"):
                self.ctx._destroy(Cmd.DESTROY_QP, qpn=self.qp_num)
        finally:
            self._free_memory()
