"""The RC data path: requester and responder engines of a QP.

Implements IBTA RC semantics (Vol. 1 ch. 9.7 reliable service, 10.8 work
completions) as spec 5.x.6.4-5.x.6.7 describes them:

* requester (:func:`progress_sq`, :func:`on_response`, :func:`on_timer`):
  reads WQEs from the SQ ring, checks local keys, sends message-shaped
  requests with PSNs over the fabric, matches ACK/NAK/READ/atomic responses
  in order, retries on RNR NAK (``min_rnr_timer``, ``rnr_retry``; 7 =
  infinite) and on ACK timeout (``timeout``, ``retry_cnt``) with
  go-back-N, and writes CQEs (signaled or SQ_SIG_ALL; errors always);
* responder (:func:`on_request`): PSN check (duplicate / sequence error),
  receive WQE consumption, rkey/rights/bounds checks, WRITE/READ/atomic
  execution directly on guest memory;
* flush (:func:`flush`): in ERR every outstanding WR completes WR_FLUSH_ERR.

Payload moves from one guest's memoryview to the other's with slice
assignment (:func:`virtio_rdma.mr.sg_copy`); nothing is staged in bytes.
All entry points take the device (``dev``: a :class:`~virtio_rdma.core.RdmaDeviceCore`)
and ``now``; nothing here does I/O or reads a clock.
"""
from __future__ import annotations

import struct
import sys

from virtio.errors import GuestMemoryError
from verbs import (
    PSN_MASK,
    RNR_RETRY_INFINITE,
    Access,
    AsyncEvent,
    Mtu,
    NakCode,
    QpState,
    SendFlags,
    WcFlags,
    WcOpcode,
    WcStatus,
    WrOpcode,
    ack_timeout_seconds,
    psn_diff,
    rnr_timer_seconds,
)
from virtio_rdma.errors import MemoryAccessError, UnknownValueError, VirtioRdmaError
from fabric.base import Request, RespKind, Response
from virtio_rdma.mr import sg_copy
from virtio_rdma.qp import Inflight, QueuePair
from virtio_rdma.wire import Completion, decode_recv_wqe, decode_send_wqe

try:  # the native fast path for the plain local success case (virtio_rdma/_datapath.pyx)
    from virtio_rdma import _datapath as _fast
    from virtio_rdma._datapath import DbrecScanner
except ImportError:  # pragma: no cover - extension not built
    _fast = None
    DbrecScanner = None

_U64N = struct.Struct("=Q")  # host-endian, like ibverbs atomics
_WRID = struct.Struct("<Q")
MAX_INFLIGHT = 128

_WC_OF_WR = {
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
_SUPPORTED = frozenset({WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                        WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ,
                        WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
_ATOMICS = frozenset({WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
_NAK_STATUS = {
    NakCode.INV_REQ: WcStatus.REM_INV_REQ_ERR,
    NakCode.REM_ACCESS: WcStatus.REM_ACCESS_ERR,
    NakCode.REM_OP: WcStatus.REM_OP_ERR,
    NakCode.INV_RD_REQ: WcStatus.REM_INV_RD_REQ_ERR,
}
_SEND_STATES = (QpState.RTS,)
_RECV_STATES = (QpState.RTR, QpState.RTS, QpState.SQD, QpState.SQE)


class _WqeError(VirtioRdmaError):
    def __init__(self, message: str, wc_status: WcStatus, metric: str):
        super().__init__(message)
        self.wc_status = wc_status
        self.metric = metric


def _mtu(qp: QueuePair) -> int:
    try:
        return Mtu(qp.attr["path_mtu"]).bytes
    except ValueError:
        return 1024


def _npkts(qp: QueuePair, length: int) -> int:
    m = _mtu(qp)
    return max(1, (length + m - 1) // m)


# --------------------------------------------------------------------------
# Completions and errors
# --------------------------------------------------------------------------
def complete_send(dev, qp: QueuePair, index: int, wr_id: int, opcode: WrOpcode | int,
                  status: WcStatus, byte_len: int = 0, force: bool = True) -> None:
    qp.sq_ci = (index + 1) & 0xFFFFFFFF
    if not force:
        return
    wc_op = _WC_OF_WR.get(opcode, WcOpcode.SEND)  # ints and WrOpcodes hash alike
    dev.complete(qp.send_cq, Completion(wr_id, status, wc_op, qp.qpn, byte_len=byte_len))


def qp_error(dev, qp: QueuePair, event: AsyncEvent | None = None) -> None:
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


def fail_wqe(dev, qp: QueuePair, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
    """A wire engine's send WQE ``idx`` failed before reaching the wire (the
    engine has already stopped): the WQEs before it complete with
    WR_FLUSH_ERR, it completes with ``status``, and the QP enters ERR, as on
    the message path."""
    while qp.sq_ci != idx:
        gpa = qp.sq_slot_gpa(qp.sq_ci)
        complete_send(dev, qp, qp.sq_ci, _slot_wr_id(dev, gpa), _slot_opcode(dev, gpa),
                      WcStatus.WR_FLUSH_ERR)
        dev.metrics.flushed_wrs += 1
    complete_send(dev, qp, idx, wr_id, opcode, status)
    qp.sq_next = qp.sq_ci
    qp_error(dev, qp, None)


def flush(dev, qp: QueuePair) -> None:
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
        qp.rq_ci = (qp.rq_ci + 1) & 0xFFFFFFFF
        dev.complete(qp.recv_cq, Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, qp.qpn))
        dev.metrics.flushed_wrs += 1


# --------------------------------------------------------------------------
# Requester
# --------------------------------------------------------------------------
def _local_views(dev, qp: QueuePair, wqe, need: Access) -> list[memoryview]:
    views = []
    for s in wqe.sges:
        try:
            views.extend(dev.mrs.check(dev.mem, s.lkey, qp.pdn, s.addr, s.length, need))
        except MemoryAccessError as e:
            raise _WqeError(f"QP {qp.qpn:#x} wr_id {wqe.wr_id:#x}: {e}", WcStatus.LOC_PROT_ERR,
                            "local_prot_errors") from None
    return views


def check_wqe(dev, qp: QueuePair, wqe) -> None:
    """The checks every send WQE passes before it starts, whichever engine
    runs the QP: a supported opcode, INLINE only where it may be and within
    max_inline_data, and the message within max_msg_sz (raises _WqeError)."""
    op = wqe.opcode
    if op not in _SUPPORTED:
        raise _WqeError(f"QP {qp.qpn:#x}: opcode {op.name} not supported", WcStatus.LOC_QP_OP_ERR,
                        "bad_wqes")
    if wqe.inline is not None:
        if op not in (WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                      WrOpcode.RDMA_WRITE_WITH_IMM):
            raise _WqeError(f"QP {qp.qpn:#x}: INLINE with {op.name}", WcStatus.LOC_QP_OP_ERR, "bad_wqes")
        if len(wqe.inline) > qp.layout.max_inline_data:
            raise _WqeError(f"QP {qp.qpn:#x}: inline_len {len(wqe.inline)} > max_inline_data",
                            WcStatus.LOC_LEN_ERR, "local_len_errors")
    length = wqe.length
    if length > dev.limits.max_msg_sz:
        raise _WqeError(f"QP {qp.qpn:#x}: message of {length} bytes exceeds max_msg_sz",
                        WcStatus.LOC_LEN_ERR, "local_len_errors")


def _build_request(dev, qp: QueuePair, wqe, psn: int) -> Request:
    check_wqe(dev, qp, wqe)
    op, length = wqe.opcode, wqe.length
    req = Request(dev.fabric.gid, qp.qpn, bytes(qp.attr["dgid"]), qp.attr["dest_qp_num"], psn, 1, op,
                  solicited=bool(wqe.send_flags & SendFlags.SOLICITED))
    if op in (WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM):
        req.imm_data = wqe.imm_data
    if op in _ATOMICS:
        if sum(s.length for s in wqe.sges) < 8:
            raise _WqeError(f"QP {qp.qpn:#x}: atomic needs an 8-byte local SGE", WcStatus.LOC_LEN_ERR,
                            "local_len_errors")
        _local_views(dev, qp, wqe, Access.LOCAL_WRITE)
        req.remote_addr, req.rkey = wqe.remote_addr, wqe.rkey
        req.compare_add, req.swap, req.length = wqe.compare_add, wqe.swap, 8
        return req
    if op is WrOpcode.RDMA_READ:
        _local_views(dev, qp, wqe, Access.LOCAL_WRITE)
        req.remote_addr, req.rkey, req.length = wqe.remote_addr, wqe.rkey, length
        req.npkts = _npkts(qp, length)
        return req
    req.payload = [wqe.inline] if wqe.inline is not None else _local_views(dev, qp, wqe, Access(0))
    req.length = length
    req.npkts = _npkts(qp, length)
    if op in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM):
        req.remote_addr, req.rkey = wqe.remote_addr, wqe.rkey
    return req


def use_fast_path(on: bool) -> bool:
    """Switch the native fast path on or off (tests compare both engines);
    returns the previous setting. Without the extension it is always off."""
    if _fast is None:
        return False
    prev, _fast.enabled = bool(_fast.enabled), bool(on)
    return prev


def progress_sq(dev, qp: QueuePair, now: float) -> None:
    """Start every posted send WQE the QP may start now (RTS, window, no RNR stall).

    WQEs on the plain local success path run natively (``_datapath.run_sq``),
    as many per call as there are; the first WQE it leaves (an error, RNR,
    an atomic, a full CQ...) is handled here, then the native path resumes."""
    if qp.net is not None:  # peer on another host: the wire engine runs the QP
        qp.net.progress(now)
        return
    while (qp.state in _SEND_STATES and qp.sq_next != qp.sq_pi
           and len(qp.inflight) < MAX_INFLIGHT and not qp.destroyed):
        if _fast is not None and _fast.run_sq(dev, qp, now):
            continue
        if qp.rnr_until is not None:
            if now < qp.rnr_until:
                return
            qp.rnr_until = None
        idx = qp.sq_next
        try:
            slot = dev.mem.translate(qp.sq_slot_gpa(idx), 1 << qp.layout.sq_wqe_shift)
        except GuestMemoryError:
            dev.metrics.wqe_fetch_faults += 1
            qp_error(dev, qp, AsyncEvent.QP_FATAL)
            return
        wr_id = _WRID.unpack_from(slot)[0]
        opcode = slot[8]
        try:
            wqe = decode_send_wqe(slot, qp.layout.max_send_sge)
            if wqe.send_flags & SendFlags.FENCE and any(e.is_read_or_atomic for e in qp.inflight):
                return  # fenced: wait for outstanding READ/atomic responses
            req = _build_request(dev, qp, wqe, qp.sq_psn)
        except _WqeError as e:
            setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
            _fail_at(dev, qp, idx, wr_id, opcode, e.wc_status)
            return
        except (VirtioRdmaError, UnknownValueError):  # WireError / UnknownValueError: malformed WQE
            dev.metrics.bad_wqes += 1
            _fail_at(dev, qp, idx, wr_id, opcode, WcStatus.LOC_QP_OP_ERR)
            return
        signaled = qp.sq_sig_all or bool(wqe.send_flags & SendFlags.SIGNALED)
        entry = Inflight(idx, wqe, req.psn, req.npkts, now, signaled)
        qp.inflight.append(entry)
        qp.sq_next = (idx + 1) & 0xFFFFFFFF
        qp.sq_psn = (qp.sq_psn + req.npkts) & PSN_MASK
        dev.metrics.requests_sent += 1
        resp = dev.fabric.send(req, now)
        if resp is not None:
            on_response(dev, qp, resp, now, sync=True)


def _fail_at(dev, qp: QueuePair, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
    """A WQE failed local checks before it was sent. Simplification: WQEs
    still in flight before it (only possible on an asynchronous fabric) are
    flushed rather than awaited; the failing WQE then completes with
    ``status`` and the QP enters ERR."""
    while qp.inflight:
        e = qp.inflight.popleft()
        complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, WcStatus.WR_FLUSH_ERR)
        dev.metrics.flushed_wrs += 1
    complete_send(dev, qp, idx, wr_id, opcode, status)
    qp.sq_next = qp.sq_ci
    qp_error(dev, qp, None)


def _complete_ok(dev, qp: QueuePair, e: Inflight, byte_len: int) -> None:
    complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, WcStatus.SUCCESS, byte_len,
                  force=e.signaled)
    qp.retry_left = qp.attr["retry_cnt"]
    qp.rnr_left = qp.attr["rnr_retry"]
    dev.metrics.sends_completed += 1


def _rewind(qp: QueuePair, pos: int) -> None:
    """Go back N: resend from inflight[pos] onward."""
    e = qp.inflight[pos]
    while len(qp.inflight) > pos:
        qp.inflight.pop()
    qp.sq_next = e.index
    qp.sq_psn = e.psn


def on_response(dev, qp: QueuePair, resp: Response, now: float, *, sync: bool) -> None:
    """Handle one response for a requester QP. ``sync``: called from progress_sq."""
    dev.metrics.responses_received += 1
    if qp.destroyed or qp.state not in (QpState.RTS, QpState.SQD) or not qp.inflight:
        dev.metrics.stale_responses += 1
        return
    if resp.kind is RespKind.ACK:
        while qp.inflight and not qp.inflight[0].is_read_or_atomic \
                and psn_diff(qp.inflight[0].last_psn, resp.psn) <= 0:
            e = qp.inflight.popleft()
            _complete_ok(dev, qp, e, e.wqe.length)
    elif resp.kind in (RespKind.READ_RESP, RespKind.ATOMIC_ACK):
        e = qp.inflight[0]
        want = RespKind.ATOMIC_ACK if e.wqe.opcode in _ATOMICS else RespKind.READ_RESP
        if resp.kind is not want or not e.is_read_or_atomic or e.last_psn != resp.psn:
            dev.metrics.stale_responses += 1
        else:
            try:
                dst = _local_views(dev, qp, e.wqe, Access.LOCAL_WRITE)
            except _WqeError as err:  # MR deregistered meanwhile
                dev.metrics.local_prot_errors += 1
                qp.inflight.popleft()
                complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, err.wc_status)
                qp_error(dev, qp, None)
                return
            qp.inflight.popleft()
            if resp.kind is RespKind.READ_RESP:
                n = sg_copy(dst, resp.data)
                dev.metrics.bytes_received += n
                _complete_ok(dev, qp, e, n)
            else:
                sg_copy(dst, [memoryview(_U64N.pack(resp.atomic_orig))])
                _complete_ok(dev, qp, e, 8)
    else:  # NAK
        pos = next((i for i, e in enumerate(qp.inflight) if e.psn == resp.psn), None)
        if pos is None:
            dev.metrics.stale_responses += 1
            return
        # A NAK implicitly acknowledges the SEND/WRITE messages before it.
        for _ in range(pos):
            e = qp.inflight[0]
            if e.is_read_or_atomic:
                break
            qp.inflight.popleft()
            _complete_ok(dev, qp, e, e.wqe.length)
        pos = next(i for i, e in enumerate(qp.inflight) if e.psn == resp.psn)
        e = qp.inflight[pos]
        if resp.nak is NakCode.RNR:
            dev.metrics.rnr_naks_received += 1
            if qp.attr["rnr_retry"] != RNR_RETRY_INFINITE:
                if qp.rnr_left <= 0:
                    dev.metrics.rnr_retry_exceeded += 1
                    _error_at(dev, qp, pos, WcStatus.RNR_RETRY_EXC_ERR)
                    return
                qp.rnr_left -= 1
            _rewind(qp, pos)
            qp.rnr_until = now + rnr_timer_seconds(resp.rnr_timer & 31)
            dev.metrics.rnr_retries += 1
        elif resp.nak is NakCode.PSN_SEQ_ERR:
            dev.metrics.psn_seq_naks += 1
            if qp.retry_left <= 0:
                dev.metrics.retry_exceeded += 1
                _error_at(dev, qp, pos, WcStatus.RETRY_EXC_ERR)
                return
            qp.retry_left -= 1
            _rewind(qp, pos)
        else:
            dev.metrics.remote_errors += 1
            _error_at(dev, qp, pos, _NAK_STATUS.get(resp.nak, WcStatus.REM_OP_ERR))
            return
    if qp.state is QpState.SQD and not qp.inflight and qp.attr["en_sqd_async_notify"]:
        dev.async_event(AsyncEvent.SQ_DRAINED, qp.qpn)
    if not sync:
        progress_sq(dev, qp, now)


def _error_at(dev, qp: QueuePair, pos: int, status: WcStatus) -> None:
    for _ in range(pos):  # earlier READ/atomics never answered: flushed in order
        e = qp.inflight.popleft()
        complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, WcStatus.WR_FLUSH_ERR)
    e = qp.inflight.popleft()
    complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, status)
    qp_error(dev, qp, None)


def deadline(qp: QueuePair) -> float | None:
    """When :func:`on_timer` must run next for this QP (None: no timer)."""
    if qp.net is not None:
        return qp.net.deadline()
    d = None
    if qp.rnr_until is not None and qp.sq_next != qp.sq_pi:
        d = qp.rnr_until
    if qp.inflight:
        t = ack_timeout_seconds(qp.attr["timeout"] & 31)
        if t is not None:
            a = qp.inflight[0].sent_at + t
            d = a if d is None else min(d, a)
    return d


def on_timer(dev, qp: QueuePair, now: float) -> None:
    if qp.net is not None:
        qp.net.on_timer(now)
        return
    if qp.state not in (QpState.RTS, QpState.SQD) or qp.destroyed:
        return
    if qp.inflight:
        t = ack_timeout_seconds(qp.attr["timeout"] & 31)
        if t is not None and now >= qp.inflight[0].sent_at + t:
            if qp.retry_left <= 0:
                dev.metrics.retry_exceeded += 1
                _error_at(dev, qp, 0, WcStatus.RETRY_EXC_ERR)
                return
            qp.retry_left -= 1
            dev.metrics.retransmits += 1
            _rewind(qp, 0)
    progress_sq(dev, qp, now)


# --------------------------------------------------------------------------
# Responder
# --------------------------------------------------------------------------
def _resp(qp: QueuePair, req: Request, kind: RespKind, psn: int, **kw) -> Response:
    return Response(req.dst_gid, qp.qpn, req.src_gid, req.src_qpn, psn, kind, **kw)


def _nak(dev, qp: QueuePair, req: Request, code: NakCode, event: AsyncEvent | None) -> Response:
    r = _resp(qp, req, RespKind.NAK, req.psn, nak=code)
    if event is not None:
        qp_error(dev, qp, event)
    return r


def _pop_recv(dev, qp: QueuePair):
    """Read the next receive WQE (None if none posted). Raises _WqeError if malformed."""
    if qp.rq_ci == qp.rq_pi:
        return None
    idx = qp.rq_ci
    try:
        slot = dev.mem.translate(qp.rq_slot_gpa(idx), 1 << qp.layout.rq_wqe_shift)
        wqe = decode_recv_wqe(slot, qp.layout.max_recv_sge)
    except GuestMemoryError as e:
        raise _WqeError(f"QP {qp.qpn:#x} RQ slot: {e}", WcStatus.LOC_QP_OP_ERR, "wqe_fetch_faults") from None
    except (VirtioRdmaError, UnknownValueError) as e:
        raise _WqeError(f"QP {qp.qpn:#x} RQ WQE: {e}", WcStatus.LOC_QP_OP_ERR, "bad_wqes") from None
    return wqe


def _recv_done(dev, qp: QueuePair, wr_id: int, status: WcStatus, op: WcOpcode, req: Request,
               byte_len: int = 0) -> None:
    qp.rq_ci = (qp.rq_ci + 1) & 0xFFFFFFFF
    flags = 0
    imm = 0
    if req.imm_data is not None and status == WcStatus.SUCCESS:
        flags, imm = int(WcFlags.WITH_IMM), req.imm_data
    dev.complete(qp.recv_cq, Completion(wr_id, status, op, qp.qpn, byte_len, imm, flags, req.src_qpn),
                 solicited=req.solicited)


def is_connected_peer(qp: QueuePair, gid: bytes, qpn: int) -> bool:
    """Is ``(gid, qpn)`` the peer ``qp`` was connected to (its AV's dgid and
    its dest_qp_num, set at INIT -> RTR)? The local fabric builds every
    request from the sending QP itself, so a guest cannot claim another
    guest's QPN there."""
    a = qp.attr
    return qpn == a["dest_qp_num"] and gid == a["dgid"]


def on_request(dev, qp: QueuePair, req: Request, now: float) -> Response | None:
    """Responder: execute one request addressed to ``qp``; return the response
    (None: silently dropped, as a QP that is not ready to receive does)."""
    if qp.destroyed or qp.state not in _RECV_STATES:
        dev.metrics.dropped_requests += 1
        return None
    if not is_connected_peer(qp, req.src_gid, req.src_qpn):
        # Only the QP this one was connected to may use it: anything else
        # is dropped before it can touch the responder's state (PSN, NAK
        # state, ERR on a bad rkey) or memory; its requester times out.
        dev.metrics.foreign_requests += 1
        return None
    d = psn_diff(req.psn, qp.epsn)
    if d > 0:
        # IBTA 9.7.5.1.2: NAK the first out-of-sequence request, then drop
        # silently until the expected PSN arrives again.
        dev.metrics.psn_seq_errors += 1
        if qp.nak_seq_sent:
            return None
        qp.nak_seq_sent = True
        return _resp(qp, req, RespKind.NAK, qp.epsn, nak=NakCode.PSN_SEQ_ERR)
    if d < 0:
        dev.metrics.duplicate_requests += 1
        op = req.opcode
        if op is WrOpcode.RDMA_READ:
            return _execute_read(dev, qp, req, advance=False)
        if op in _ATOMICS:
            if req.psn in qp.atomic_cache:
                return _resp(qp, req, RespKind.ATOMIC_ACK, req.psn, atomic_orig=qp.atomic_cache[req.psn])
            return None
        return _resp(qp, req, RespKind.ACK, req.last_psn)
    qp.nak_seq_sent = False
    op = req.opcode
    if req.length > dev.limits.max_msg_sz:
        dev.metrics.remote_inv_req_errors += 1
        return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)
    if op in (WrOpcode.SEND, WrOpcode.SEND_WITH_IMM):
        return _execute_send(dev, qp, req)
    if op in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM):
        return _execute_write(dev, qp, req)
    if op is WrOpcode.RDMA_READ:
        return _execute_read(dev, qp, req, advance=True)
    if op in _ATOMICS:
        return _execute_atomic(dev, qp, req)
    dev.metrics.remote_inv_req_errors += 1
    return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)


def _rnr(dev, qp: QueuePair, req: Request) -> Response:
    dev.metrics.rnr_naks_sent += 1
    return _resp(qp, req, RespKind.NAK, req.psn, nak=NakCode.RNR, rnr_timer=qp.attr["min_rnr_timer"])


def _execute_send(dev, qp: QueuePair, req: Request) -> Response:
    try:
        rwqe = _pop_recv(dev, qp)
    except _WqeError as e:
        setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
        _recv_done(dev, qp, _slot_wr_id(dev, qp.rq_slot_gpa(qp.rq_ci)), e.wc_status, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_FATAL)
    if rwqe is None:
        return _rnr(dev, qp, req)
    if sum(s.length for s in rwqe.sges) < req.length:
        dev.metrics.local_len_errors += 1
        _recv_done(dev, qp, rwqe.wr_id, WcStatus.LOC_LEN_ERR, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)
    try:
        dst = _local_views(dev, qp, rwqe, Access.LOCAL_WRITE)
    except _WqeError:
        dev.metrics.local_prot_errors += 1
        _recv_done(dev, qp, rwqe.wr_id, WcStatus.LOC_PROT_ERR, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_ACCESS_ERR)
    n = sg_copy(dst, req.payload)
    dev.metrics.bytes_received += n
    qp.epsn = (qp.epsn + req.npkts) & PSN_MASK
    _recv_done(dev, qp, rwqe.wr_id, WcStatus.SUCCESS, WcOpcode.RECV, req, n)
    return _resp(qp, req, RespKind.ACK, req.last_psn)


def _remote_views(dev, qp: QueuePair, req: Request, need: Access):
    if not qp.access & need:
        raise MemoryAccessError(f"QP {qp.qpn:#x} access flags {int(qp.access):#x} lack {need!r}")
    return dev.mrs.check(dev.mem, req.rkey, qp.pdn, req.remote_addr, req.length, need)


def _access_nak(dev, qp: QueuePair, req: Request) -> Response:
    dev.metrics.remote_access_errors += 1
    return _nak(dev, qp, req, NakCode.REM_ACCESS, AsyncEvent.QP_ACCESS_ERR)


def _execute_write(dev, qp: QueuePair, req: Request) -> Response:
    rwqe = None
    if req.opcode is WrOpcode.RDMA_WRITE_WITH_IMM:
        try:
            rwqe = _pop_recv(dev, qp)
        except _WqeError as e:
            setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
            _recv_done(dev, qp, _slot_wr_id(dev, qp.rq_slot_gpa(qp.rq_ci)), e.wc_status,
                       WcOpcode.RECV_RDMA_WITH_IMM, req)
            return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_FATAL)
        if rwqe is None:
            return _rnr(dev, qp, req)
    try:
        dst = _remote_views(dev, qp, req, Access.REMOTE_WRITE)
    except MemoryAccessError:
        return _access_nak(dev, qp, req)
    n = sg_copy(dst, req.payload)
    dev.metrics.bytes_received += n
    qp.epsn = (qp.epsn + req.npkts) & PSN_MASK
    if rwqe is not None:
        _recv_done(dev, qp, rwqe.wr_id, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, req, n)
    return _resp(qp, req, RespKind.ACK, req.last_psn)


def _execute_read(dev, qp: QueuePair, req: Request, advance: bool) -> Response:
    try:
        src = _remote_views(dev, qp, req, Access.REMOTE_READ)
    except MemoryAccessError:
        return _access_nak(dev, qp, req)
    if advance:
        qp.epsn = (qp.epsn + req.npkts) & PSN_MASK
    dev.metrics.bytes_sent += req.length
    return _resp(qp, req, RespKind.READ_RESP, req.last_psn, data=src)


def _execute_atomic(dev, qp: QueuePair, req: Request) -> Response:
    if req.remote_addr % 8:
        dev.metrics.remote_inv_req_errors += 1
        return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)
    try:
        views = _remote_views(dev, qp, req, Access.REMOTE_ATOMIC)
    except MemoryAccessError:
        return _access_nak(dev, qp, req)
    if len(views) == 1:
        orig = _U64N.unpack(views[0])[0]
    else:  # aligned word split across two backing chunks
        tmp = bytearray(8)
        sg_copy([memoryview(tmp)], views)
        orig = _U64N.unpack(tmp)[0]
    if req.opcode is WrOpcode.ATOMIC_CMP_AND_SWP:
        new = req.swap if orig == req.compare_add else orig
    else:
        new = (orig + req.compare_add) & 0xFFFFFFFFFFFFFFFF
    if new != orig:
        sg_copy(views, [memoryview(_U64N.pack(new))])
    qp.epsn = (qp.epsn + 1) & PSN_MASK
    qp.atomic_cache[req.psn] = orig
    if len(qp.atomic_cache) > max(1, qp.attr["max_dest_rd_atomic"]):
        qp.atomic_cache.pop(next(iter(qp.atomic_cache)))
    return _resp(qp, req, RespKind.ATOMIC_ACK, req.psn, atomic_orig=orig)


assert sys.byteorder in ("little", "big")
