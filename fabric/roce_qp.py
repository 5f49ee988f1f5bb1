"""A guest QP whose peer is on another host, run by the RoCE RC engine.

When a QP moves INIT -> RTR with a destination GID that is not this host's,
a network fabric (:class:`fabric.roce.RoceFabric`) gives it a
:class:`NetworkQp`: the packet-level RC transport of :mod:`roce.rc`
(:class:`roce.rc.qp.RcQp`, rxe's semantics: MTU segmentation, AckReq,
coalesced ACKs, go-back-N resuming mid-message, RNR, retransmit timer,
replay of duplicates) drives the QP instead of the message path of
:mod:`virtio_rdma.datapath`. This module is the bridge between the guest's
rings and that engine:

* send WQEs are read from the SQ ring, their local keys checked, and posted
  as :class:`roce.rc.verbs.SendWR` whose SGEs are memoryviews into the
  guest's memory (zero copy: packets are gathered from guest memory, and
  retransmissions read it again, as an HCA's DMA does);
* receive WQEs are posted lazily, when a packet arrives, with their SGEs
  checked against the MR table then;
* the engine's responder reaches the guest's MRs through
  :class:`GuestRemoteMemory` (rkey, PD, QP access flags and bounds checked on
  every request);
* completions come back in order and become CQEs; each one retires the ring
  slot it belongs to. Every WR is posted signaled so that each retires its
  slot; the guest's own signaled flag decides whether a CQE is written.

Immediate data: a WQE's ``imm_data`` holds the four ImmDt bytes as they go
on the wire (the guest stores ``htonl(x)``, as with libibverbs' ``__be32``);
:mod:`roce` takes the big-endian value of those bytes, hence the byte swap.

Sans-I/O: packets leave through ``fabric.transmit`` and arrive through
:meth:`NetworkQp.receive`; ``now`` is passed in.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, cast

from roce.errors import RemoteAccessError, TransportError
from roce.rc import verbs as rv
from roce.rc.qp import RcQp
from roce.rc.sgl import SgList
from verbs import Access, AsyncEvent, QpState, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.errors import MemoryAccessError
from virtio_rdma.rings import (
    ATOMICS,
    LOCAL_WRITE_OPS,
    WqeError,
    drive_rq,
    drive_sq,
    fail_send,
    local_views,
    path_mtu_bytes,
    qp_error,
    recv_done,
    send_done,
)

try:  # the native path of plain send WQEs (virtio_rdma/_datapath.pyx)
    from virtio_rdma._datapath import run_wire_rq, run_wire_sq, wire_cqes, wire_pump, wire_settle
except ImportError:  # pragma: no cover - extension not built
    run_wire_sq = run_wire_rq = wire_cqes = wire_pump = wire_settle = None  # type: ignore[assignment]  # not built

log = logging.getLogger(__name__)

_LOCAL_WRITE_OPS = frozenset({WrOpcode.RDMA_READ, WrOpcode.ATOMIC_CMP_AND_SWP,
                              WrOpcode.ATOMIC_FETCH_AND_ADD})
_ATOMICS = frozenset({WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
#: the guest QP states the engine mirrors (verbs.QpState, as roce.rc.qp uses it); SQE has no
#: engine state: the engine keeps running
_ENGINE_STATES = frozenset({QpState.INIT, QpState.RTR, QpState.RTS, QpState.SQD})
_WITH_IMM = frozenset({WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM})
_NO_ACCESS = Access(0)
_SIGNALED, _SOLICITED, _FENCE = int(SendFlags.SIGNALED), int(SendFlags.SOLICITED), \
    int(SendFlags.FENCE)
_WC_STATUS = {int(s): s for s in WcStatus}
_WC_OPCODE = {int(o): o for o in WcOpcode}
_WITH_IMM_FLAG = int(WcFlags.WITH_IMM)
_RECV_STATES = frozenset({QpState.RTR, QpState.RTS, QpState.SQD, QpState.SQE})
#: WQEs kept in the ring while the window is full (Requester.window_full; _datapath.run_wire_sq)
_HOLDABLE = frozenset({WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE,
                       WrOpcode.RDMA_WRITE_WITH_IMM})
_RIGHTS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC


def bswap32(v: int) -> int:
    return int.from_bytes((v & 0xFFFFFFFF).to_bytes(4, "little"), "big")


class Scattered:
    """A remote-access range backed by several guest chunks: sliceable and
    assignable like the one memoryview the responder normally gets."""

    __slots__ = ("sgl",)

    def __init__(self, views: list[memoryview]):
        self.sgl = SgList(views)

    def __len__(self) -> int:
        return self.sgl.total

    def _span(self, s: slice) -> tuple[int, int]:
        start, stop, step = s.indices(self.sgl.total)
        if step != 1:
            raise ValueError("strided access to guest memory")
        return start, max(0, stop - start)

    def __getitem__(self, s: slice):
        off, n = self._span(s)
        return self.sgl.gather(off, n)

    def __setitem__(self, s: slice, data) -> None:
        off, n = self._span(s)
        if len(data) != n:
            raise ValueError(f"assigning {len(data)} bytes to a {n}-byte range")
        self.sgl.scatter(off, data)


class GuestRemoteMemory:
    """:class:`roce.rc.memory.RemoteMemory` over one guest's MR table, for the
    responder of one QP: the R_Key must name an MR of the QP's PD that grants
    the access, the QP's own access flags must allow it, and the range must lie
    inside the MR (spec 5.x.6.5; IBTA C9-88)."""

    __slots__ = ("dev", "qp")

    def __init__(self, dev, qp) -> None:
        self.dev = dev
        self.qp = qp

    def resolve(self, rkey: int, va: int, length: int, access) -> memoryview:
        need = Access(int(access))
        qp = self.qp
        if need & ~qp.access:
            raise RemoteAccessError(f"QP {qp.qpn:#x} access flags {int(qp.access):#x} lack "
                                    f"{need!r}", rkey=rkey, va=va, length=length)
        try:
            views = self.dev.mrs.check(self.dev.mem, rkey, qp.pdn, va, length, need)
        except MemoryAccessError as e:
            raise RemoteAccessError(str(e), rkey=rkey, va=va, length=length) from None
        if len(views) == 1:
            return views[0]
        if need & Access.REMOTE_ATOMIC:  # an aligned word split across guest chunks
            raise RemoteAccessError(f"atomic target {va:#x} spans {len(views)} guest chunks",
                                    rkey=rkey, va=va, length=length)
        # the responder only slices, assigns and takes len() of the range: Scattered does those
        return cast(memoryview, Scattered(views))

    def invalidate(self, rkey: int) -> None:
        raise RemoteAccessError(f"SEND with Invalidate of R_Key {rkey:#x}: memory windows and "
                                "remote invalidation are not supported", rkey=rkey)


class NetworkQp:
    """The wire engine of one guest QP (see module doc).

    ``fabric`` provides ``transmit(packets, peer_ip)`` and
    ``detach_wire(qpn)``, and may provide ``drain()`` (receive what has
    arrived, before a retransmission timer fires); ``dev`` is the guest's
    :class:`~virtio_rdma.core.RdmaDeviceCore`; ``peer`` the IP address of
    the destination GID.
    """

    #: doorbell records of this QP may be applied natively (_datapath.apply_records):
    #: ``rq_rung`` does nothing and ``progress`` runs the send side
    native_records = True
    #: ``progress`` may run as _datapath._wire_progress (its body, natively, calling
    #: ``progress_rest`` where it does not end after the first ``run_wire_sq``)
    native_progress = True

    def __init__(self, fabric, dev, qp, peer: str) -> None:
        self.fabric = fabric
        self.dev = dev
        self.qp = qp
        self.peer = peer
        #: UDP source ports the peer sends this QP's packets from (None: any;
        #: set by the fabric, roce.sport)
        self.sports: frozenset[int] | None = None
        self.rc = RcQp(qp.qpn, GuestRemoteMemory(dev, qp))
        self.posted: deque[tuple[int, int, bool]] = deque()  # (ring index, opcode, signaled)
        self.rq_posted = qp.rq_ci  # RQ ring index up to which receives went to the engine
        self.closed = False
        #: WQEs drive_sq may still start in this pass (-1: no limit); with the
        #: native path, one at a time between native runs
        self._budget = -1
        #: the requester's comp_psn when the next WQE was kept in the ring for
        #: want of window (None: none kept); ``pump`` starts it once an ACK moved it
        self.held: int | None = None
        #: times a WQE was kept in the ring for want of window (both paths count)
        self.window_holds = 0
        self.rc.modify(QpState.INIT, access=Access(int(qp.access & _RIGHTS)))

    # ------------------------------------------------------------------ state
    def modified(self, prev: QpState, target: QpState, now: float) -> None:
        """The guest's MODIFY_QP moved the QP from ``prev`` to ``target``
        (RESET and ERR are handled by ``close`` and ``on_error``)."""
        qp, a = self.qp, self.qp.attr
        if target not in _ENGINE_STATES:  # SQE: the engine has no such state; it keeps running
            return
        attrs: dict[str, Any] = {"access": Access(int(qp.access & _RIGHTS))}
        if target is QpState.RTR and prev is QpState.INIT:
            self._post_recvs()
            attrs.update(dest_qp_num=a.dest_qp_num, path_mtu=path_mtu_bytes(qp),
                         rq_psn=qp.epsn, min_rnr_timer=a.min_rnr_timer & 31,
                         max_dest_rd_atomic=max(1, min(255, a.max_dest_rd_atomic)))
        if target in (QpState.RTS, QpState.SQD):
            attrs.update(timeout=a.timeout & 31, retry_cnt=a.retry_cnt & 7,
                         rnr_retry=a.rnr_retry & 7,
                         max_rd_atomic=max(1, min(255, a.max_rd_atomic)))
            if prev is QpState.RTR:
                attrs["sq_psn"] = qp.sq_psn
        if self.rc.state is QpState.ERR:
            return
        try:
            self.rc.modify(target, **attrs)
        except TransportError as e:  # the core's table allowed it; the engine disagrees
            log.warning("QP %#x: wire engine refused %s -> %s: %s", qp.qpn, prev.name,
                        target.name, e)
            qp_error(self.dev, qp, AsyncEvent.QP_FATAL)
            return
        if target is QpState.RTS:
            self.progress(now)

    def on_error(self) -> None:
        """The core moves the QP to ERR and flushes its rings itself: stop the
        engine and forget what it held (nothing of it reaches the guest)."""
        if self.rc.state is not QpState.ERR:
            self.rc.modify(QpState.ERR)
        self.rc.poll_send_cq()
        self.rc.poll_recv_cq()
        self.rc.transmit(0.0)
        self.posted.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.posted.clear()
            self.fabric.detach_wire(self.qp.qpn)

    # ------------------------------------------------------------- send side
    def progress(self, now: float) -> None:
        """Post every send WQE the guest has rung for, pumping the engine
        after each: a WQE's packets leave while the next one is read, so the
        peer works in parallel. Then hand the engine the receives the guest
        posted meanwhile: its sends are on the wire, the reply is not here
        yet, so this work is off the round trip (at the reply's arrival it
        would be on it)."""
        self._progress_sq(now)
        qp = self.qp
        if not self.closed and self.rq_posted != qp.rq_pi and qp.state in _RECV_STATES:
            self._post_recvs(lenient=True)

    def _progress_sq(self, now: float) -> None:
        qp = self.qp
        self.held = None
        if qp.state is not QpState.RTS:
            self.pump(now)
        elif run_wire_sq is None:
            drive_sq(self.dev, qp, self, now)
        else:  # the plain WQEs natively, each other one through drive_sq, in ring order
            run_wire_sq(self.dev, qp, self, now)
            self.progress_rest(now)

    def progress_rest(self, now: float) -> None:
        """``_progress_sq`` after its first ``run_wire_sq`` (which
        ``_datapath.apply_records`` runs natively): while a WQE is left, it
        through ``drive_sq``, then the plain ones after it natively again."""
        qp = self.qp
        while True:
            before = qp.sq_next
            if before == qp.sq_pi or qp.state is not QpState.RTS or self.held is not None:
                return
            self._budget = 1
            try:
                drive_sq(self.dev, qp, self, now)
            finally:
                self._budget = -1
            if qp.sq_next == before:  # it did not start (failed, or the QP stopped)
                return
            run_wire_sq(self.dev, qp, self, now)

    # the ring consumer's SendEngine (virtio_rdma.rings)
    refusals = (TransportError,)

    def may_start(self, now: float) -> bool:
        return self._budget != 0

    def fence_pending(self) -> bool:
        return False  # the engine orders fenced WRs itself

    def start_send(self, idx: int, wqe, signaled: bool, now: float) -> bool:
        """Post one checked WQE to the engine; False (and ``held`` set) keeps
        it in the ring: a SEND/WRITE whose packets the window cannot take now
        (``Requester.window_full``) waits there for an ACK, whole, as
        ``_datapath.run_wire_sq`` leaves it."""
        wr = self._send_wr(wqe)
        if wqe.opcode in _HOLDABLE:
            req = self.rc.requester
            mtu = self.rc.cfg.path_mtu
            if req.window_full(max(1, -(-wqe.length // mtu))):
                self.held = req.comp_psn
                self.window_holds += 1
                return False
        self.rc.post_send(wr)
        self.posted.append((idx, int(wqe.opcode), signaled))
        return True

    def started(self, now: float) -> None:
        """Pump after each WQE: its packets leave while the next is read."""
        if self._budget > 0:
            self._budget -= 1
        self.pump(now)

    def _send_wr(self, wqe) -> rv.SendWR:
        op = wqe.opcode
        if wqe.inline is not None:
            sges = [memoryview(bytes(wqe.inline))]  # the slot may be reused once posted
        else:
            sges = local_views(self.dev, self.qp, wqe, Access.LOCAL_WRITE
                               if op in LOCAL_WRITE_OPS else _NO_ACCESS)
        if op in ATOMICS:
            sges = _first_bytes(sges, 8)
        flags = int(wqe.send_flags)
        # the engine maps the opcode to its own enum (same ibv values)
        return rv.SendWR(wqe.wr_id, op, sges, wqe.remote_addr, wqe.rkey,
                         bswap32(wqe.imm_data) if op in _WITH_IMM else 0, 0, wqe.compare_add,
                         wqe.swap, True, bool(flags & _SOLICITED), bool(flags & _FENCE))

    def fail_send(self, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
        """A WQE failed its local checks: WQEs before it still in the engine
        are flushed, it completes with ``status`` and the QP enters ERR."""
        self.on_error()
        fail_send(self.dev, self.qp, idx, wr_id, opcode, status)

    # ---------------------------------------------------------- receive side
    def rq_rung(self, now: float) -> None:
        """The guest posted receives. This engine hands them over when a
        packet arrives (``receive``) or after its next send pass
        (``progress``), so nothing happens here."""

    def _post_recvs(self, *, lenient: bool = False) -> None:
        """Hand the engine every receive WQE the guest has posted since the
        last call (SGEs are checked now: a bad one moves the QP to ERR).
        ``lenient`` (posting ahead of need) stops at a bad WQE instead and
        leaves it to the pass at the next arrival, so that a bad receive
        fails when the QP needs it, as without posting ahead. The plain
        WQEs go natively first (``_datapath.run_wire_rq``)."""
        if run_wire_rq is not None:
            run_wire_rq(self.dev, self.qp, self)
        drive_rq(self.dev, self.qp, self, lenient=lenient)

    def post_recv(self, idx: int, wqe) -> None:
        """The ring consumer's RecvEngine: one checked receive WQE to the engine."""
        self.rc.post_recv(wqe.wr_id, local_views(self.dev, self.qp, wqe, Access.LOCAL_WRITE))

    def receive(self, pkt, now: float, pump: bool = True) -> None:
        """A packet for this QP arrived (syntax and ICRC already checked).
        Without ``pump`` the caller pumps later (once for a batch)."""
        if self.rq_posted != self.qp.rq_pi and self.qp.state in _RECV_STATES:
            self._post_recvs()
        self.rc.receive(pkt, now)
        if pump:
            self.pump(now)

    # ------------------------------------------------------------ the engine
    def deadline(self) -> float | None:
        return self.rc.next_deadline()

    def on_timer(self, now: float) -> None:
        d = self.rc.next_deadline()
        drain = getattr(self.fabric, "drain", None)
        if drain is not None and d is not None and now >= d:
            drain()     # ACKs already in the socket first: they may move the deadline
            if self.closed:
                return
        self.rc.handle_timer(now)
        self.pump(now)

    def pump(self, now: float) -> None:
        """Send what the engine has to send, turn its completions into CQEs,
        and follow it into ERR."""
        if self.closed:
            return
        rc, qp, dev = self.rc, self.qp, self.dev
        # the common case (nothing for Requester.fill to start) natively, the same body
        if wire_pump is None or not wire_pump(dev, qp, self, now):
            pkts = rc.transmit_raw(now)
            if pkts:
                self.fabric.transmit(pkts, self.peer)
            sends, recvs = rc.poll_send_cq(), rc.poll_recv_cq()
            if sends or recvs:
                i = j = 0
                if wire_cqes is not None:  # the successful ones natively, the rest below in order
                    i, j = wire_cqes(dev, qp, self, sends, recvs)
                for c in sends[i:] if i else sends:
                    self._send_done(c)
                for c in recvs[j:] if j else recvs:
                    self._recv_done(c)
        qp.sq_psn = rc.requester.psn
        qp.epsn = rc.responder.psn
        held = self.held
        if held is not None and rc.requester.comp_psn != held and qp.state is QpState.RTS \
                and rc.state is QpState.RTS:
            self._progress_sq(now)      # an ACK made room: the WQE kept in the ring starts
        if rc.state is QpState.ERR and qp.state is not QpState.ERR:
            m = rc.metrics
            event = None if m.fatal_naks_received or m.timeouts or m.retry_events else \
                AsyncEvent.QP_ACCESS_ERR if m.remote_access_naks else AsyncEvent.QP_REQ_ERR \
                if m.invalid_request_naks else AsyncEvent.QP_FATAL
            qp_error(dev, qp, event)

    def _send_done(self, c: rv.Completion) -> None:
        if not self.posted:
            log.warning("QP %#x: engine completion with nothing posted: %r", self.qp.qpn, c)
            return
        idx, opcode, signaled = self.posted.popleft()
        send_done(self.dev, self.qp, idx, c.wr_id, opcode, _WC_STATUS[c.status], c.byte_len, signaled)

    def _recv_done(self, c: rv.Completion) -> None:
        if c.imm_data is not None:
            recv_done(self.dev, self.qp, c.wr_id, _WC_STATUS[c.status], _WC_OPCODE[c.opcode],
                      c.byte_len, bswap32(c.imm_data), _WITH_IMM_FLAG, c.src_qp)
        else:
            recv_done(self.dev, self.qp, c.wr_id, _WC_STATUS[c.status], _WC_OPCODE[c.opcode],
                      c.byte_len, 0, 0, c.src_qp)


def _first_bytes(views: list[memoryview], n: int) -> list[memoryview]:
    if views and len(views[0]) >= n:
        return [views[0][:n]]
    raise WqeError(f"atomic needs an {n}-byte local buffer in one piece",
                             WcStatus.LOC_LEN_ERR, "local_len_errors")
