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

from virtio.errors import GuestMemoryError
from virtio_rdma import datapath
from verbs import Access, AsyncEvent, QpState, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.errors import MemoryAccessError, UnknownValueError, VirtioRdmaError
from virtio_rdma.wire import Completion, decode_recv_wqe, decode_send_wqe

from roce.errors import RemoteAccessError, TransportError
from roce.rc import verbs as rv
from roce.rc.qp import QpState as RcState, RcQp
from roce.rc.sgl import SgList

log = logging.getLogger(__name__)

_LOCAL_WRITE_OPS = frozenset({WrOpcode.RDMA_READ, WrOpcode.ATOMIC_CMP_AND_SWP,
                              WrOpcode.ATOMIC_FETCH_AND_ADD})
_ATOMICS = frozenset({WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
_STATE = {QpState.INIT: RcState.INIT, QpState.RTR: RcState.RTR, QpState.RTS: RcState.RTS,
          QpState.SQD: RcState.SQD}
_WITH_IMM = frozenset({WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM})
_NO_ACCESS = Access(0)
_SIGNALED, _SOLICITED, _FENCE = int(SendFlags.SIGNALED), int(SendFlags.SOLICITED), \
    int(SendFlags.FENCE)
_WC_STATUS = {int(s): s for s in WcStatus}
_WC_OPCODE = {int(o): o for o in WcOpcode}
_WITH_IMM_FLAG = int(WcFlags.WITH_IMM)
_RECV_STATES = frozenset({QpState.RTR, QpState.RTS, QpState.SQD, QpState.SQE})
_RIGHTS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC


def bswap32(v: int) -> int:
    return int.from_bytes((v & 0xFFFFFFFF).to_bytes(4, "little"), "big")


class _Scattered:
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
        return _Scattered(views)

    def invalidate(self, rkey: int) -> None:
        raise RemoteAccessError(f"SEND with Invalidate of R_Key {rkey:#x}: memory windows and "
                                "remote invalidation are not supported", rkey=rkey)


class NetworkQp:
    """The wire engine of one guest QP (see module doc).

    ``fabric`` provides ``transmit(packets, peer_ip)`` and
    ``detach_wire(qpn)``; ``dev`` is the guest's
    :class:`~virtio_rdma.core.RdmaDeviceCore`; ``peer`` the IP address of
    the destination GID.
    """

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
        self.rc.modify(RcState.INIT, access=Access(int(qp.access & _RIGHTS)))

    # ------------------------------------------------------------------ state
    def modified(self, prev: QpState, target: QpState, now: float) -> None:
        """The guest's MODIFY_QP moved the QP from ``prev`` to ``target``
        (RESET and ERR are handled by ``close`` and ``on_error``)."""
        qp, a = self.qp, self.qp.attr
        rc_target = _STATE.get(target)
        if rc_target is None:  # SQE: the engine has no such state; it keeps running
            return
        attrs = {"access": Access(int(qp.access & _RIGHTS))}
        if target is QpState.RTR and prev is QpState.INIT:
            self._post_recvs()
            attrs.update(dest_qp_num=a["dest_qp_num"], path_mtu=datapath._mtu(qp),
                         rq_psn=qp.epsn, min_rnr_timer=a["min_rnr_timer"] & 31,
                         max_dest_rd_atomic=max(1, min(255, a["max_dest_rd_atomic"])))
        if target in (QpState.RTS, QpState.SQD):
            attrs.update(timeout=a["timeout"] & 31, retry_cnt=a["retry_cnt"] & 7,
                         rnr_retry=a["rnr_retry"] & 7,
                         max_rd_atomic=max(1, min(255, a["max_rd_atomic"])))
            if prev is QpState.RTR:
                attrs["sq_psn"] = qp.sq_psn
        if self.rc.state is RcState.ERR:
            return
        try:
            self.rc.modify(rc_target, **attrs)
        except TransportError as e:  # the core's table allowed it; the engine disagrees
            log.warning("QP %#x: wire engine refused %s -> %s: %s", qp.qpn, prev.name,
                        target.name, e)
            datapath.qp_error(self.dev, qp, AsyncEvent.QP_FATAL)
            return
        if target is QpState.RTS:
            self.progress(now)

    def on_error(self) -> None:
        """The core moves the QP to ERR and flushes its rings itself: stop the
        engine and forget what it held (nothing of it reaches the guest)."""
        if self.rc.state is not RcState.ERR:
            self.rc.modify(RcState.ERR)
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
        qp, dev = self.qp, self.dev
        if qp.state is QpState.RTS:
            while qp.sq_next != qp.sq_pi:
                if not self._post_one(qp.sq_next):
                    return  # the QP went to ERR
                qp.sq_next = (qp.sq_next + 1) & 0xFFFFFFFF
                dev.metrics.requests_sent += 1
                self.pump(now)
                if qp.state is not QpState.RTS:
                    return  # ERR: the core flushes what is left in the ring
            return
        self.pump(now)

    def _post_one(self, idx: int) -> bool:
        qp, dev = self.qp, self.dev
        try:
            slot = dev.mem.translate(qp.sq_slot_gpa(idx), 1 << qp.layout.sq_wqe_shift)
        except GuestMemoryError:
            dev.metrics.wqe_fetch_faults += 1
            datapath.qp_error(dev, qp, AsyncEvent.QP_FATAL)
            return False
        try:
            wqe = decode_send_wqe(slot, qp.layout.max_send_sge)
            flags = int(wqe.send_flags)
            wr = self._send_wr(wqe, flags)
            self.rc.post_send(wr)
        except datapath._WqeError as e:
            setattr(dev.metrics, e.metric, getattr(dev.metrics, e.metric) + 1)
            return self._fail(idx, int.from_bytes(slot[:8], "little"), slot[8], e.wc_status)
        except (VirtioRdmaError, UnknownValueError, TransportError) as e:  # malformed WQE / refused WR
            log.debug("QP %#x: bad send WQE %d: %s", qp.qpn, idx, e)
            dev.metrics.bad_wqes += 1
            return self._fail(idx, int.from_bytes(slot[:8], "little"), slot[8],
                              WcStatus.LOC_QP_OP_ERR)
        self.posted.append((idx, int(wqe.opcode), qp.sq_sig_all or bool(flags & _SIGNALED)))
        return True

    def _send_wr(self, wqe, flags: int) -> rv.SendWR:
        qp, dev = self.qp, self.dev
        datapath.check_wqe(dev, qp, wqe)
        op = wqe.opcode
        if wqe.inline is not None:
            sges = [memoryview(bytes(wqe.inline))]  # the slot may be reused once posted
        else:
            sges = datapath._local_views(dev, qp, wqe, Access.LOCAL_WRITE
                                         if op in _LOCAL_WRITE_OPS else _NO_ACCESS)
        if op in _ATOMICS:
            sges = _first_bytes(sges, 8)
        # the engine maps the opcode to its own enum (same ibv values)
        return rv.SendWR(wqe.wr_id, op, sges, wqe.remote_addr, wqe.rkey,
                         bswap32(wqe.imm_data) if op in _WITH_IMM else 0, 0, wqe.compare_add,
                         wqe.swap, True, bool(flags & _SOLICITED), bool(flags & _FENCE))

    def _fail(self, idx: int, wr_id: int, opcode: int, status: WcStatus) -> bool:
        """A WQE failed its local checks: WQEs before it still in the engine
        are flushed, it completes with ``status`` and the QP enters ERR (as the
        message path does)."""
        self.on_error()
        datapath.fail_wqe(self.dev, self.qp, idx, wr_id, opcode, status)
        return False

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
        fails when the QP needs it, as without posting ahead."""
        qp, dev = self.qp, self.dev
        while self.rq_posted != qp.rq_pi:
            idx = self.rq_posted
            try:
                slot = dev.mem.translate(qp.rq_slot_gpa(idx), 1 << qp.layout.rq_wqe_shift)
                wqe = decode_recv_wqe(slot, qp.layout.max_recv_sge)
                views = datapath._local_views(dev, qp, wqe, Access.LOCAL_WRITE)
            except (GuestMemoryError, VirtioRdmaError, UnknownValueError) as e:
                if lenient:
                    return
                log.debug("QP %#x: bad receive WQE %d: %s", qp.qpn, idx, e)
                dev.metrics.bad_wqes += 1
                datapath.qp_error(dev, qp, AsyncEvent.QP_FATAL)
                return
            self.rc.post_recv(wqe.wr_id, views)
            self.rq_posted = (idx + 1) & 0xFFFFFFFF

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
        self.rc.handle_timer(now)
        self.pump(now)

    def pump(self, now: float) -> None:
        """Send what the engine has to send, turn its completions into CQEs,
        and follow it into ERR."""
        if self.closed:
            return
        rc, qp, dev = self.rc, self.qp, self.dev
        pkts = rc.transmit_raw(now)
        if pkts:
            self.fabric.transmit(pkts, self.peer)
        for c in rc.poll_send_cq():
            self._send_done(c)
        for c in rc.poll_recv_cq():
            self._recv_done(c)
        qp.sq_psn = rc.requester.psn
        qp.epsn = rc.responder.psn
        if rc.state is RcState.ERR and qp.state is not QpState.ERR:
            m = rc.metrics
            event = None if m.fatal_naks_received or m.timeouts or m.retry_events else \
                AsyncEvent.QP_ACCESS_ERR if m.remote_access_naks else AsyncEvent.QP_REQ_ERR \
                if m.invalid_request_naks else AsyncEvent.QP_FATAL
            datapath.qp_error(dev, qp, event)

    def _send_done(self, c: rv.Completion) -> None:
        qp, dev = self.qp, self.dev
        if not self.posted:
            log.warning("QP %#x: engine completion with nothing posted: %r", qp.qpn, c)
            return
        idx, opcode, signaled = self.posted.popleft()
        status = _WC_STATUS[c.status]
        ok = status is WcStatus.SUCCESS
        datapath.complete_send(dev, qp, idx, c.wr_id, opcode, status, c.byte_len,
                               force=signaled or not ok)
        if ok:
            m = dev.metrics
            m.sends_completed += 1
            if opcode == WrOpcode.RDMA_READ:
                m.bytes_received += c.byte_len

    def _recv_done(self, c: rv.Completion) -> None:
        qp, dev = self.qp, self.dev
        qp.rq_ci = (qp.rq_ci + 1) & 0xFFFFFFFF
        flags, imm = 0, 0
        if c.imm_data is not None:
            flags, imm = _WITH_IMM_FLAG, bswap32(c.imm_data)
        status = _WC_STATUS[c.status]
        if status is WcStatus.SUCCESS:
            dev.metrics.bytes_received += c.byte_len
        dev.complete(qp.recv_cq, Completion(c.wr_id, status, _WC_OPCODE[c.opcode], qp.qpn,
                                            c.byte_len, imm, flags, c.src_qp))


def _first_bytes(views: list[memoryview], n: int) -> list[memoryview]:
    if views and len(views[0]) >= n:
        return [views[0][:n]]
    raise datapath._WqeError(f"atomic needs an {n}-byte local buffer in one piece",
                             WcStatus.LOC_LEN_ERR, "local_len_errors")
