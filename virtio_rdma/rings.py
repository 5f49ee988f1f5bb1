"""The one consumer of a QP's guest rings (spec 5.x.6.4 work queues, 5.x.6.7 errors).

A QP's send and receive queues are rings of WQE slots in guest memory; the
guest produces (``post_send``/``post_recv`` and a doorbell), the device
consumes. Whichever engine runs the QP -- the local message path of
:mod:`virtio_rdma.datapath` (peer on this host), the userspace RoCE engine of
:mod:`fabric.roce_qp` or a host RDMA device through :mod:`fabric.hca` -- the
ring side is the same, and lives here once:

* :func:`drive_sq` reads send WQEs in ring order, fetches and decodes each
  slot, applies the checks every send WQE passes (:func:`check_wqe`) and
  hands it to the engine (:class:`SendEngine`); a WQE that fails completes
  with an error CQE and moves the QP to ERR (:func:`fail_send`);
* :func:`fetch_recv` / :func:`drive_rq` read receive WQEs, either when a
  message needs one (local path) or ahead of need (wire engines,
  :class:`RecvEngine`);
* :func:`local_views` checks a WQE's scatter list against the MR table
  (lkey, PD, rights, bounds) and returns memoryviews of guest memory;
* :func:`send_done` / :func:`recv_done` turn an engine's completion into a
  CQE, retire the ring slot and count it; :func:`qp_error` and :func:`flush`
  move a QP to ERR and complete everything outstanding with WR_FLUSH_ERR.

Ring indices are free-running u32 counters (:mod:`virtio_rdma.qp`). Nothing
here does I/O or reads a clock; ``dev`` is the guest's
:class:`~virtio_rdma.core.RdmaDeviceCore`.
"""
from __future__ import annotations

import struct
from typing import Protocol

from verbs import Access, AsyncEvent, Mtu, QpState, SendFlags, UnknownValueError, WcOpcode, WcStatus, WrOpcode
from virtio.errors import GuestMemoryError
from virtio_rdma.errors import MemoryAccessError, VirtioRdmaError
from virtio_rdma.wire import Completion, RecvWqe, SendWqe, decode_recv_wqe, decode_send_wqe

U32 = 0xFFFFFFFF
_WRID = struct.Struct("<Q")
#: the send opcodes whose bytes the requester sends (RDMA READ: the responder's bytes_sent)
_SENT_OPS = frozenset((WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.SEND,
                       WrOpcode.SEND_WITH_IMM, WrOpcode.SEND_WITH_INV))
_SIGNALED = int(SendFlags.SIGNALED)

#: the CQE opcode of each send WR opcode (ibv_wc_opcode of ibv_wr_opcode)
WC_OF_WR: dict[int, WcOpcode] = {
    WrOpcode.SEND: WcOpcode.SEND,
    WrOpcode.SEND_WITH_IMM: WcOpcode.SEND,
    WrOpcode.SEND_WITH_INV: WcOpcode.SEND,
    WrOpcode.RDMA_WRITE: WcOpcode.RDMA_WRITE,
    WrOpcode.RDMA_WRITE_WITH_IMM: WcOpcode.RDMA_WRITE,
    WrOpcode.RDMA_READ: WcOpcode.RDMA_READ,
    WrOpcode.ATOMIC_CMP_AND_SWP: WcOpcode.COMP_SWAP,
    WrOpcode.ATOMIC_FETCH_AND_ADD: WcOpcode.FETCH_ADD,
    WrOpcode.LOCAL_INV: WcOpcode.LOCAL_INV,
    WrOpcode.BIND_MW: WcOpcode.BIND_MW,
}
#: send opcodes this device runs
SUPPORTED = frozenset({WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                       WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ,
                       WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
ATOMICS = frozenset({WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
#: opcodes whose local buffers the device writes (the response lands there)
LOCAL_WRITE_OPS = ATOMICS | {WrOpcode.RDMA_READ}
_INLINE_OPS = frozenset({WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                         WrOpcode.RDMA_WRITE_WITH_IMM})


class WqeError(VirtioRdmaError):
    """A WQE failed a local check: it completes with ``wc_status`` and the
    device counts it in ``metric`` (a :class:`~virtio_rdma.metrics.DeviceMetrics` field)."""

    def __init__(self, message: str, wc_status: WcStatus, metric: str):
        super().__init__(message)
        self.wc_status = wc_status
        self.metric = metric


class SendEngine(Protocol):
    """What :func:`drive_sq` needs from the engine that runs a QP."""

    @property
    def refusals(self) -> tuple[type[BaseException], ...]:
        """Exceptions of the engine itself meaning "this WQE is refused"
        (completes LOC_QP_OP_ERR, counted as a bad WQE)."""

    def may_start(self, now: float) -> bool:
        """Can the next WQE start now (window, RNR stall, ...)?"""

    def start_send(self, idx: int, wqe: SendWqe, signaled: bool, now: float) -> bool:
        """Take checked WQE ``idx``; False: not now (fenced), keep it in the ring.
        May raise :class:`WqeError` or one of :attr:`refusals`."""

    def started(self, now: float) -> None:
        """The WQE just taken is accounted for (``qp.sq_next`` is past it)."""

    def fail_send(self, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
        """WQE ``idx`` failed before it started: stop, then :func:`fail_send`."""


class RecvEngine(Protocol):
    """What :func:`drive_rq` needs from a wire engine that takes receives ahead of need."""

    @property
    def refusals(self) -> tuple[type[BaseException], ...]: ...

    #: RQ ring index up to which receives went to the engine
    rq_posted: int

    def post_recv(self, idx: int, wqe: RecvWqe) -> None: ...


# --------------------------------------------------------------------------
# Checks and scatter lists
# --------------------------------------------------------------------------
def path_mtu_bytes(qp) -> int:
    """The QP's path MTU in bytes (1024 until the guest sets one)."""
    try:
        return Mtu(qp.attr.path_mtu).bytes
    except ValueError:
        return 1024


def local_views(dev, qp, wqe, need: Access) -> list[memoryview]:
    """The memoryviews of ``wqe``'s scatter list, each SGE checked against the
    MR table (lkey of the QP's PD granting ``need``, within bounds); raises
    :class:`WqeError` (LOC_PROT_ERR)."""
    views: list[memoryview] = []
    for s in wqe.sges:
        try:
            views.extend(dev.mrs.check(dev.mem, s.lkey, qp.pdn, s.addr, s.length, need))
        except MemoryAccessError as e:
            raise WqeError(f"QP {qp.qpn:#x} wr_id {wqe.wr_id:#x}: {e}", WcStatus.LOC_PROT_ERR,
                           "local_prot_errors") from None
    return views


def check_wqe(dev, qp, wqe: SendWqe) -> None:
    """The checks every send WQE passes before it starts, whichever engine
    runs the QP: a supported opcode, INLINE only where it may be and within
    max_inline_data, and the message within max_msg_sz (raises WqeError)."""
    op = wqe.opcode
    if op not in SUPPORTED:
        raise WqeError(f"QP {qp.qpn:#x}: opcode {op.name} not supported", WcStatus.LOC_QP_OP_ERR,
                       "bad_wqes")
    if wqe.inline is not None:
        if op not in _INLINE_OPS:
            raise WqeError(f"QP {qp.qpn:#x}: INLINE with {op.name}", WcStatus.LOC_QP_OP_ERR, "bad_wqes")
        if len(wqe.inline) > qp.layout.max_inline_data:
            raise WqeError(f"QP {qp.qpn:#x}: inline_len {len(wqe.inline)} > max_inline_data",
                           WcStatus.LOC_LEN_ERR, "local_len_errors")
    if wqe.length > dev.limits.max_msg_sz:
        raise WqeError(f"QP {qp.qpn:#x}: message of {wqe.length} bytes exceeds max_msg_sz",
                       WcStatus.LOC_LEN_ERR, "local_len_errors")


def _count(dev, metric: str) -> None:
    m = dev.metrics
    setattr(m, metric, getattr(m, metric) + 1)


# --------------------------------------------------------------------------
# The send ring
# --------------------------------------------------------------------------
def drive_sq(dev, qp, engine: SendEngine, now: float) -> None:
    """Start every send WQE the guest has rung for, in ring order, through
    ``engine``, while the QP is in RTS and the engine may start more."""
    mem, layout, metrics = dev.mem, qp.layout, dev.metrics
    slot_size = 1 << layout.sq_wqe_shift
    while (qp.sq_next != qp.sq_pi and qp.state is QpState.RTS and not qp.destroyed
           and engine.may_start(now)):
        idx = qp.sq_next
        try:
            slot = mem.translate(qp.sq_slot_gpa(idx), slot_size)
        except GuestMemoryError:
            metrics.wqe_fetch_faults += 1
            qp_error(dev, qp, AsyncEvent.QP_FATAL)
            return
        try:
            wqe = decode_send_wqe(slot, layout.max_send_sge)
            check_wqe(dev, qp, wqe)
            if not engine.start_send(idx, wqe, qp.sq_sig_all or bool(wqe.send_flags & _SIGNALED), now):
                return
        except WqeError as e:
            _count(dev, e.metric)
            engine.fail_send(idx, _WRID.unpack_from(slot)[0], slot[8], e.wc_status)
            return
        # malformed WQE / refused (mypy cannot type an except tuple with a starred part)
        except (VirtioRdmaError, UnknownValueError, *engine.refusals):  # type: ignore[misc]
            metrics.bad_wqes += 1
            engine.fail_send(idx, _WRID.unpack_from(slot)[0], slot[8], WcStatus.LOC_QP_OP_ERR)
            return
        qp.sq_next = (idx + 1) & U32
        metrics.requests_sent += 1
        engine.started(now)


def complete_send(dev, qp, index: int, wr_id: int, opcode: WrOpcode | int,
                  status: WcStatus, byte_len: int = 0, force: bool = True) -> None:
    """Retire send slot ``index``; write its CQE if ``force`` (signaled or an error)."""
    qp.sq_ci = (index + 1) & U32
    if not force:
        return
    wc_op = WC_OF_WR.get(opcode, WcOpcode.SEND)  # ints and WrOpcodes hash alike
    dev.complete(qp.send_cq, Completion(wr_id, status, wc_op, qp.qpn, byte_len=byte_len))


def send_done(dev, qp, idx: int, wr_id: int, opcode: int, status: WcStatus, byte_len: int,
              signaled: bool) -> None:
    """An engine completed send WQE ``idx``: its CQE (if signaled or an
    error), the slot retired, the device's counters."""
    ok = status is WcStatus.SUCCESS
    complete_send(dev, qp, idx, wr_id, opcode, status, byte_len, force=signaled or not ok)
    if ok:
        m = dev.metrics
        m.sends_completed += 1
        if opcode == WrOpcode.RDMA_READ:
            m.bytes_received += byte_len
        elif opcode in _SENT_OPS:  # the responder counts them received (recv_done, the WRITE path)
            m.bytes_sent += byte_len


def _slot_wr_id(dev, gpa: int) -> int:
    try:
        return _WRID.unpack(dev.mem.translate(gpa, 8))[0]
    except GuestMemoryError:
        return 0


def _slot_opcode(dev, gpa: int) -> int:
    try:
        return dev.mem.translate(gpa + 8, 1)[0]
    except GuestMemoryError:
        return WrOpcode.SEND


def fail_send(dev, qp, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
    """Send WQE ``idx`` failed before it started (its engine has stopped and
    dropped what it held): the WQEs before it complete with WR_FLUSH_ERR, it
    completes with ``status``, and the QP enters ERR."""
    while qp.sq_ci != idx:
        if qp.state is QpState.ERR:  # a CQE overflowed its CQ: the QP flushed itself, idx too
            return
        gpa = qp.sq_slot_gpa(qp.sq_ci)
        complete_send(dev, qp, qp.sq_ci, _slot_wr_id(dev, gpa), _slot_opcode(dev, gpa),
                      WcStatus.WR_FLUSH_ERR)
        dev.metrics.flushed_wrs += 1
    if qp.state is QpState.ERR:
        return
    complete_send(dev, qp, idx, wr_id, opcode, status)
    qp.sq_next = qp.sq_ci
    qp_error(dev, qp, None)


# --------------------------------------------------------------------------
# The receive ring
# --------------------------------------------------------------------------
def fetch_recv(dev, qp, idx: int) -> RecvWqe:
    """Read and decode receive WQE ``idx`` (raises WqeError: a slot outside
    guest memory or a malformed WQE)."""
    try:
        slot = dev.mem.translate(qp.rq_slot_gpa(idx), 1 << qp.layout.rq_wqe_shift)
        return decode_recv_wqe(slot, qp.layout.max_recv_sge)
    except GuestMemoryError as e:
        raise WqeError(f"QP {qp.qpn:#x} RQ slot {idx}: {e}", WcStatus.LOC_QP_OP_ERR,
                       "wqe_fetch_faults") from None
    except (VirtioRdmaError, UnknownValueError) as e:
        raise WqeError(f"QP {qp.qpn:#x} RQ WQE {idx}: {e}", WcStatus.LOC_QP_OP_ERR, "bad_wqes") from None


def recv_slot_wr_id(dev, qp) -> int:
    """The wr_id in the next receive slot (0 if unreadable): for the error
    CQE of a receive WQE that could not be decoded."""
    return _slot_wr_id(dev, qp.rq_slot_gpa(qp.rq_ci))


def drive_rq(dev, qp, engine: RecvEngine, *, lenient: bool = False) -> None:
    """Hand ``engine`` every receive WQE the guest posted since the last call.
    A bad one (counted in ``bad_wqes``) moves the QP to ERR; ``lenient``
    (posting ahead of need) stops at it instead, leaving it to the pass at
    which the QP needs it."""
    while engine.rq_posted != qp.rq_pi:
        idx = engine.rq_posted
        try:
            engine.post_recv(idx, fetch_recv(dev, qp, idx))
        # unreadable, malformed, a bad SGE, refused (mypy: see drive_sq)
        except (WqeError, *engine.refusals):  # type: ignore[misc]
            if lenient:
                return
            dev.metrics.bad_wqes += 1
            qp_error(dev, qp, AsyncEvent.QP_FATAL)
            return
        engine.rq_posted = (idx + 1) & U32


def recv_done(dev, qp, wr_id: int, status: WcStatus, opcode: WcOpcode, byte_len: int = 0,
              imm: int = 0, flags: int = 0, src_qp: int = 0, solicited: bool = False) -> None:
    """A message consumed the next receive WQE: retire its slot, write its CQE."""
    qp.rq_ci = (qp.rq_ci + 1) & U32
    if status is WcStatus.SUCCESS:
        dev.metrics.bytes_received += byte_len
    dev.complete(qp.recv_cq, Completion(wr_id, status, opcode, qp.qpn, byte_len, imm, flags, src_qp),
                 solicited=solicited)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def qp_error(dev, qp, event: AsyncEvent | None = None) -> None:
    """Move ``qp`` to ERR (once), report ``event``, flush both queues."""
    if qp.state is QpState.ERR or qp.destroyed:
        return
    if qp.net is not None:  # stop the wire engine; the rings are flushed below
        qp.net.on_error()
    qp.state = QpState.ERR
    qp.rnr_until = None
    if event is not None:
        dev.async_event(event, qp.qpn)
    flush(dev, qp)


def flush(dev, qp) -> None:
    """Complete every outstanding WR of a QP in ERR with WR_FLUSH_ERR (spec 5.x.6.7)."""
    inflight = {e.index: e for e in qp.inflight}
    qp.inflight.clear()
    while qp.sq_ci != qp.sq_pi:
        idx = qp.sq_ci
        e = inflight.get(idx)
        if e is not None:
            wr_id, op = e.wqe.wr_id, e.wqe.opcode
        else:
            gpa = qp.sq_slot_gpa(idx)
            wr_id, op = _slot_wr_id(dev, gpa), _slot_opcode(dev, gpa)
        complete_send(dev, qp, idx, wr_id, op, WcStatus.WR_FLUSH_ERR)
        dev.metrics.flushed_wrs += 1
    qp.sq_next = qp.sq_ci
    while qp.rq_ci != qp.rq_pi:
        wr_id = _slot_wr_id(dev, qp.rq_slot_gpa(qp.rq_ci))
        qp.rq_ci = (qp.rq_ci + 1) & U32
        dev.complete(qp.recv_cq, Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, qp.qpn))
        dev.metrics.flushed_wrs += 1
