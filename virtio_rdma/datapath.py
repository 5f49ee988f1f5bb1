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
* the guest's rings are read and completed through :mod:`virtio_rdma.rings`
  (the same consumer the wire engines of :mod:`fabric` drive); the
  requester is its :class:`LocalSender`.

Payload moves from one guest's memoryview to the other's with slice
assignment (:func:`virtio_rdma.mr.sg_copy`); nothing is staged in bytes.
All entry points take the device (``dev``: a :class:`~virtio_rdma.core.RdmaDeviceCore`)
and ``now``; nothing here does I/O or reads a clock.
"""
from __future__ import annotations

import struct
import sys

from fabric.base import Request, RespKind, Response
from verbs import (
    PSN_MASK,
    RNR_RETRY_INFINITE,
    Access,
    AsyncEvent,
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
from virtio_rdma.errors import MemoryAccessError
from virtio_rdma.mr import sg_copy
from virtio_rdma.qp import Inflight, QueuePair
from virtio_rdma.rings import (
    ATOMICS,
    WqeError,
    complete_send,
    drive_sq,
    fail_send,
    fetch_recv,
    local_views,
    path_mtu_bytes,
    qp_error,
    recv_done,
    recv_slot_wr_id,
    send_done,
)

try:  # the native fast path for the plain local success case (virtio_rdma/_datapath.pyx)
    from virtio_rdma import _datapath as _fast
    from virtio_rdma._datapath import DbrecScanner
except ImportError:  # pragma: no cover - extension not built
    _fast = None  # type: ignore[assignment]  # only where the extension is not built
    DbrecScanner = None  # type: ignore[assignment,misc]  # likewise

_U64N = struct.Struct("=Q")  # host-endian, like ibverbs atomics
_WITH_IMM = int(WcFlags.WITH_IMM)
MAX_INFLIGHT = 128

_NAK_STATUS: dict[NakCode | None, WcStatus] = {
    NakCode.INV_REQ: WcStatus.REM_INV_REQ_ERR,
    NakCode.REM_ACCESS: WcStatus.REM_ACCESS_ERR,
    NakCode.REM_OP: WcStatus.REM_OP_ERR,
    NakCode.INV_RD_REQ: WcStatus.REM_INV_RD_REQ_ERR,
}
_RECV_STATES = (QpState.RTR, QpState.RTS, QpState.SQD, QpState.SQE)


def _npkts(qp: QueuePair, length: int) -> int:
    m = path_mtu_bytes(qp)
    return max(1, (length + m - 1) // m)


# --------------------------------------------------------------------------
# Requester
# --------------------------------------------------------------------------
def _build_request(dev, qp: QueuePair, wqe, psn: int) -> Request:
    """The request message of a checked WQE (raises WqeError if a local
    buffer is not the guest's to use)."""
    op, length = wqe.opcode, wqe.length
    req = Request(dev.fabric.gid, qp.qpn, bytes(qp.attr.dgid), qp.attr.dest_qp_num, psn, 1, op,
                  solicited=bool(wqe.send_flags & SendFlags.SOLICITED))
    if op in (WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM):
        req.imm_data = wqe.imm_data
    if op in ATOMICS:
        if sum(s.length for s in wqe.sges) < 8:
            raise WqeError(f"QP {qp.qpn:#x}: atomic needs an 8-byte local SGE", WcStatus.LOC_LEN_ERR,
                           "local_len_errors")
        local_views(dev, qp, wqe, Access.LOCAL_WRITE)
        req.remote_addr, req.rkey = wqe.remote_addr, wqe.rkey
        req.compare_add, req.swap, req.length = wqe.compare_add, wqe.swap, 8
        return req
    if op is WrOpcode.RDMA_READ:
        local_views(dev, qp, wqe, Access.LOCAL_WRITE)
        req.remote_addr, req.rkey, req.length = wqe.remote_addr, wqe.rkey, length
        req.npkts = _npkts(qp, length)
        return req
    req.payload = [wqe.inline] if wqe.inline is not None else local_views(dev, qp, wqe, Access(0))
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


class LocalSender:
    """The message path's requester as the :class:`~virtio_rdma.rings.SendEngine`
    of a QP whose peer is reached through ``dev.fabric.send``: a window of
    :data:`MAX_INFLIGHT` messages, stalled by an RNR NAK until its timer
    runs out, fences held until earlier READs and atomics are answered.
    WQEs on the plain local success path run natively first
    (``_datapath.run_sq``: as many per call as there are; the first WQE it
    leaves -- an error, RNR, an atomic, a full CQ... -- comes through here)."""

    __slots__ = ("dev", "qp", "_req")
    refusals: tuple = ()

    def __init__(self, dev, qp: QueuePair) -> None:
        self.dev = dev
        self.qp = qp
        self._req: Request | None = None

    def may_start(self, now: float) -> bool:
        qp = self.qp
        if _fast is not None and _fast.run_sq(self.dev, qp, now) and (
                qp.sq_next == qp.sq_pi or qp.state is not QpState.RTS or qp.destroyed):
            return False
        if len(qp.inflight) >= MAX_INFLIGHT:
            return False
        if qp.rnr_until is not None:
            if now < qp.rnr_until:
                return False
            qp.rnr_until = None
        return True

    def fence_pending(self) -> bool:
        return any(e.is_read_or_atomic for e in self.qp.inflight)

    def start_send(self, idx: int, wqe, signaled: bool, now: float) -> bool:
        qp = self.qp
        req = _build_request(self.dev, qp, wqe, qp.sq_psn)
        qp.inflight.append(Inflight(idx, wqe, req.psn, req.npkts, now, signaled))
        qp.sq_psn = (qp.sq_psn + req.npkts) & PSN_MASK
        self._req = req
        return True

    def started(self, now: float) -> None:
        req, self._req = self._req, None
        dev = self.dev
        resp = dev.fabric.send(req, now)
        if resp is not None:
            on_response(dev, self.qp, resp, now, sync=True)

    def fail_send(self, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
        """Simplification: WQEs still in flight before it (only possible on
        an asynchronous fabric) are flushed rather than awaited."""
        self.qp.inflight.clear()
        fail_send(self.dev, self.qp, idx, wr_id, opcode, status)


def progress_sq(dev, qp: QueuePair, now: float) -> None:
    """Start every posted send WQE the QP may start now, through its engine:
    the wire engine when its peer is on another host, else the message path."""
    if qp.net is not None:
        qp.net.progress(now)
        return
    engine = qp.local
    if engine is None:
        engine = qp.local = LocalSender(dev, qp)
    drive_sq(dev, qp, engine, now)


def _complete_ok(dev, qp: QueuePair, e: Inflight, byte_len: int) -> None:
    send_done(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, WcStatus.SUCCESS, byte_len, e.signaled)
    qp.retry_left = qp.attr.retry_cnt
    qp.rnr_left = qp.attr.rnr_retry


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
        want = RespKind.ATOMIC_ACK if e.wqe.opcode in ATOMICS else RespKind.READ_RESP
        if resp.kind is not want or not e.is_read_or_atomic or e.last_psn != resp.psn:
            dev.metrics.stale_responses += 1
        else:
            try:
                dst = local_views(dev, qp, e.wqe, Access.LOCAL_WRITE)
            except WqeError as err:  # MR deregistered meanwhile
                dev.metrics.local_prot_errors += 1
                qp.inflight.popleft()
                complete_send(dev, qp, e.index, e.wqe.wr_id, e.wqe.opcode, err.wc_status)
                qp_error(dev, qp, None)
                return
            qp.inflight.popleft()
            if resp.kind is RespKind.READ_RESP:
                _complete_ok(dev, qp, e, sg_copy(dst, resp.data))
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
            if qp.attr.rnr_retry != RNR_RETRY_INFINITE:
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
    if qp.state is QpState.SQD and not qp.inflight and qp.attr.en_sqd_async_notify:
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
        t = ack_timeout_seconds(qp.attr.timeout & 31)
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
        t = ack_timeout_seconds(qp.attr.timeout & 31)
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
    """The next receive WQE (None if none posted); raises WqeError if unreadable."""
    if qp.rq_ci == qp.rq_pi:
        return None
    return fetch_recv(dev, qp, qp.rq_ci)


def _recv_done(dev, qp: QueuePair, wr_id: int, status: WcStatus, op: WcOpcode, req: Request,
               byte_len: int = 0) -> None:
    if req.imm_data is not None and status is WcStatus.SUCCESS:
        recv_done(dev, qp, wr_id, status, op, byte_len, req.imm_data, _WITH_IMM, req.src_qpn,
                  req.solicited)
    else:
        recv_done(dev, qp, wr_id, status, op, byte_len, 0, 0, req.src_qpn, req.solicited)


def is_connected_peer(qp: QueuePair, gid: bytes, qpn: int) -> bool:
    """Is ``(gid, qpn)`` the peer ``qp`` was connected to (its AV's dgid and
    its dest_qp_num, set at INIT -> RTR)? The local fabric builds every
    request from the sending QP itself, so a guest cannot claim another
    guest's QPN there."""
    a = qp.attr
    return qpn == a.dest_qp_num and gid == a.dgid


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
        if op in ATOMICS:
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
    if op in ATOMICS:
        return _execute_atomic(dev, qp, req)
    dev.metrics.remote_inv_req_errors += 1
    return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)


def _rnr(dev, qp: QueuePair, req: Request) -> Response:
    dev.metrics.rnr_naks_sent += 1
    return _resp(qp, req, RespKind.NAK, req.psn, nak=NakCode.RNR, rnr_timer=qp.attr.min_rnr_timer)


def _execute_send(dev, qp: QueuePair, req: Request) -> Response:
    try:
        rwqe = _pop_recv(dev, qp)
    except WqeError as e:
        setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
        _recv_done(dev, qp, recv_slot_wr_id(dev, qp), e.wc_status, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_FATAL)
    if rwqe is None:
        return _rnr(dev, qp, req)
    if sum(s.length for s in rwqe.sges) < req.length:
        dev.metrics.local_len_errors += 1
        _recv_done(dev, qp, rwqe.wr_id, WcStatus.LOC_LEN_ERR, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.INV_REQ, AsyncEvent.QP_REQ_ERR)
    try:
        dst = local_views(dev, qp, rwqe, Access.LOCAL_WRITE)
    except WqeError:
        dev.metrics.local_prot_errors += 1
        _recv_done(dev, qp, rwqe.wr_id, WcStatus.LOC_PROT_ERR, WcOpcode.RECV, req)
        return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_ACCESS_ERR)
    n = sg_copy(dst, req.payload)
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
        except WqeError as e:
            setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
            _recv_done(dev, qp, recv_slot_wr_id(dev, qp), e.wc_status,
                       WcOpcode.RECV_RDMA_WITH_IMM, req)
            return _nak(dev, qp, req, NakCode.REM_OP, AsyncEvent.QP_FATAL)
        if rwqe is None:
            return _rnr(dev, qp, req)
    try:
        dst = _remote_views(dev, qp, req, Access.REMOTE_WRITE)
    except MemoryAccessError:
        return _access_nak(dev, qp, req)
    n = sg_copy(dst, req.payload)
    qp.epsn = (qp.epsn + req.npkts) & PSN_MASK
    if rwqe is None:
        dev.metrics.bytes_received += n
    else:  # its CQE counts the bytes
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
    if len(qp.atomic_cache) > max(1, qp.attr.max_dest_rd_atomic):
        qp.atomic_cache.pop(next(iter(qp.atomic_cache)))
    return _resp(qp, req, RespKind.ATOMIC_ACK, req.psn, atomic_orig=orig)


assert sys.byteorder in ("little", "big")
