"""RC requester and completer (IBTA vol. 1, 9.7 "Reliable service"; the
roles of rxe_req.c and rxe_comp.c), sans-I/O.

The requester turns send work requests into request packets: it gives every
WQE its PSN range, segments SEND/WRITE payloads by the path MTU (FIRST and
MIDDLE carry exactly one MTU), sets AckReq on the last packet of a message
and at least every 64 packets, and keeps at most 128 unacknowledged PSNs in
flight. The completer consumes ACKs, NAKs, READ responses and atomic ACKs:
coalesced ACKs complete every WQE they cover, a PSN sequence error NAK or a
timeout rewinds the requester to the oldest unacknowledged PSN (go-back-N,
resuming in the middle of a message or a READ), an RNR NAK pauses for the
responder's timer, fatal NAKs become error completions.

Work queue entry states::

    POSTED --first packet--> SENDING --last packet--> PENDING --ack--> done
       ^                                                  |
       +------------------- retry (rewind) <--------------+
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from verbs import (
    PSN_MASK,
    AethType,
    NakCode,
    WcStatus,
    WrOpcode,
    ack_timeout_seconds,
    psn_add,
    psn_diff,
    rnr_timer_seconds,
)

from ..build import make_bth, make_ieth, make_immdt, make_packet, make_reth
from ..errors import InvalidWorkRequest
from ..headers import Aeth, AtomicEth
from ..opcodes import OPCODE_TABLE, Kind, Opcode
from ..packet import PacketRun, RocePacket
from .config import MAX_MSG_SIZE, MAX_PKT_PER_ACK, MAX_UNACKED_PSNS, QpConfig
from .metrics import RcMetrics
from .sgl import SgList
from .verbs import Completion, SendWR, wc_opcode_of

_U64 = (1 << 64) - 1


class WqeState(enum.Enum):
    POSTED = "posted"      # no packet sent yet (or rewound to its start)
    SENDING = "sending"    # some packets of the message sent
    PENDING = "pending"    # every packet sent, waiting for the response


# (first, middle, last, only) opcodes per send opcode
_SEND_OPS = {
    WrOpcode.SEND: (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST,
                    Opcode.RC_SEND_ONLY),
    WrOpcode.SEND_WITH_IMM: (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE,
                             Opcode.RC_SEND_LAST_WITH_IMMEDIATE,
                             Opcode.RC_SEND_ONLY_WITH_IMMEDIATE),
    WrOpcode.SEND_WITH_INV: (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE,
                             Opcode.RC_SEND_LAST_WITH_INVALIDATE,
                             Opcode.RC_SEND_ONLY_WITH_INVALIDATE),
    WrOpcode.RDMA_WRITE: (Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE,
                          Opcode.RC_RDMA_WRITE_LAST, Opcode.RC_RDMA_WRITE_ONLY),
    WrOpcode.RDMA_WRITE_WITH_IMM: (Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE,
                                   Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
                                   Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE),
}

_WR_OPS = {int(op): op for op in WrOpcode}
_WRITES = frozenset({WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM})
_WITH_IMM = frozenset({WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM})
_ATOMICS = frozenset({WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD})
_U32 = 0xFFFFFFFF
_ACK_T, _RNR_T, _NAK_T = int(AethType.ACK), int(AethType.RNR_NAK), int(AethType.NAK)

_FATAL_NAK: dict[int, WcStatus] = {
    NakCode.INV_REQ: WcStatus.REM_INV_REQ_ERR,
    NakCode.REM_ACCESS: WcStatus.REM_ACCESS_ERR,
    NakCode.REM_OP: WcStatus.REM_OP_ERR,
    NakCode.INV_RD_REQ: WcStatus.REM_OP_ERR,
}


@dataclass(slots=True)
class Wqe:
    wr: SendWR
    sgl: SgList
    length: int
    npkts: int
    rd_atomic: bool                 # READ or atomic: needs a response with data
    state: WqeState = WqeState.POSTED
    first_psn: int | None = None
    next_pkt: int = 0               # index of the next packet to (re)send

    @property
    def last_psn(self) -> int:
        return psn_add(self.first_psn, self.npkts - 1)  # type: ignore[arg-type]  # sent: first_psn is set


class Requester:
    """Send queue, requester and completer of one RC QP."""

    def __init__(self, cfg: QpConfig, metrics: RcMetrics, on_fatal) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._on_fatal = on_fatal       # called once when a fatal error moves the QP to ERR
        self.sq: deque[Wqe] = deque()   # incomplete WQEs in order
        self.send_idx = 0               # sq index of the next WQE to send from
        self.psn = cfg.sq_psn           # next PSN to send
        self.psn_hi = cfg.sq_psn        # one past the highest PSN ever sent
        self.comp_psn = cfg.sq_psn      # oldest unacknowledged PSN
        self.noack_pkts = 0
        self.rd_atomic_outstanding = 0
        self.retry_left = cfg.retry_cnt
        #: a retry (go-back-N) started on a response that showed data missing and
        #: nothing has been acknowledged since: later responses of the same burst
        #: do not start (and charge) another one (rxe's comp.started_retry)
        self.retry_started = False
        self.rnr_left = cfg.rnr_retry
        self.retrans_deadline: float | None = None
        self.rnr_deadline: float | None = None
        self.completions: list[Completion] = []
        self.out: list[RocePacket | PacketRun] = []
        self.dead = False

    # ----------------------------------------------------------------- verbs
    def post(self, wr: SendWR) -> None:
        try:
            op = _WR_OPS.get(wr.opcode)
        except TypeError:               # unhashable
            op = None
        if op is None:
            raise InvalidWorkRequest(f"wr_id {wr.wr_id}: opcode {wr.opcode!r} not supported "
                                     "on RC") from None
        sgl = SgList(wr.sges)
        total = sgl.total
        if op in _ATOMICS:
            if total != 8:
                raise InvalidWorkRequest(f"wr_id {wr.wr_id}: atomic needs an 8-byte local "
                                         f"buffer, got {total}")
            for name in ("compare_add", "swap"):
                v = getattr(wr, name)
                if not isinstance(v, int) or not 0 <= v <= _U64:
                    raise InvalidWorkRequest(f"wr_id {wr.wr_id}: {name}={v!r} is not a u64")
            npkts, rd = 1, True
        else:
            if total > MAX_MSG_SIZE:
                raise InvalidWorkRequest(f"wr_id {wr.wr_id}: length {total} > 2^31")
            npkts = max(1, -(-total // self.cfg.path_mtu))
            rd = op is WrOpcode.RDMA_READ
        ra, rk, imm, inv = wr.remote_addr, wr.rkey, wr.imm_data, wr.invalidate_rkey
        if not (type(ra) is int and type(rk) is int and type(imm) is int and type(inv) is int
                and 0 <= ra <= _U64 and 0 <= rk <= _U32 and 0 <= imm <= _U32
                and 0 <= inv <= _U32):
            for name, bits in (("remote_addr", 64), ("rkey", 32), ("imm_data", 32),
                               ("invalidate_rkey", 32)):
                v = getattr(wr, name)
                if not isinstance(v, int) or v < 0 or v >> bits:
                    raise InvalidWorkRequest(
                        f"wr_id {wr.wr_id}: {name}={v!r} does not fit {bits} bits")
        wr.opcode = op
        self.sq.append(Wqe(wr, sgl, total, npkts, rd))

    def window_full(self, npkts: int) -> bool:
        """Would a new SEND/WRITE of ``npkts`` packets wait for the window
        (:data:`MAX_UNACKED_PSNS` unacknowledged PSNs) if posted now, with
        nothing else waiting before it: the send side idle but for packets in
        flight (no unsent WQE, no retry or RNR stall), a message that fits an
        empty window? A caller may then keep it and post it once an ACK has
        made room (``fabric.roce_qp.NetworkQp`` keeps it in the guest's ring,
        as an HCA leaves WQEs it cannot start yet; its native path applies
        the same rule), instead of posting it to be sent piecemeal as ACKs
        come."""
        if self.dead or self.rnr_deadline is not None or self.send_idx != len(self.sq) \
                or self.psn != self.psn_hi or npkts > MAX_UNACKED_PSNS:
            return False
        inflight = psn_diff(self.psn, self.comp_psn)
        return inflight >= 0 and inflight + npkts > MAX_UNACKED_PSNS

    # ---------------------------------------------------------------- sending
    def fill(self, now: float) -> None:
        """Queue the request packets that may be sent now."""
        if self.dead or self.rnr_deadline is not None:
            return
        cfg = self.cfg
        sq = self.sq
        while self.send_idx < len(sq):
            room = MAX_UNACKED_PSNS - psn_diff(self.psn, self.comp_psn)
            if room <= 0:
                break
            wqe = sq[self.send_idx]
            if wqe.first_psn is None:
                if wqe.wr.fence and self.rd_atomic_outstanding:
                    break
                if wqe.rd_atomic:
                    if self.rd_atomic_outstanding >= cfg.max_rd_atomic:
                        break
                    self.rd_atomic_outstanding += 1
                wqe.first_psn = self.psn
            if wqe.rd_atomic:
                self._emit(wqe, now)
            else:
                self._emit_data(wqe, now, room)

    def _emit_data(self, wqe: Wqe, now: float, room: int) -> None:
        """SEND/WRITE: the next ``room`` packets of ``wqe`` at most, as one
        :class:`~roce.packet.PacketRun` (the packets :meth:`_emit` would make
        one call at a time; the counters move as if it had)."""
        cfg, wr = self.cfg, wqe.wr
        op = wr.opcode
        n, i = wqe.npkts, wqe.next_pkt
        psn = self.psn
        assert psn == psn_add(wqe.first_psn, i)  # type: ignore[arg-type]  # sent: first_psn is set
        k = min(n - i, room)
        self.out.append(PacketRun(
            _SEND_OPS[op], n, i, k, psn, cfg.dest_qp_num, cfg.pkey, cfg.path_mtu, wqe.length,
            wqe.sgl, (wr.remote_addr, wr.rkey) if op in _WRITES else None,
            wr.imm_data if op in _WITH_IMM else None,
            wr.invalidate_rkey if op is WrOpcode.SEND_WITH_INV else None,
            wr.solicited, self.noack_pkts, MAX_PKT_PER_ACK))
        m = self.metrics
        m.tx_packets += k
        behind = psn_diff(self.psn_hi, psn)         # packets of the run sent before
        if behind > 0:
            m.retransmitted_packets += min(k, behind)
        psn = (psn + k) & PSN_MASK
        if psn_diff(psn, self.psn_hi) > 0:
            self.psn_hi = psn
        self.psn = psn
        i += k
        wqe.next_pkt = i
        if i >= n:
            self.noack_pkts = 0                     # the last packet asks for an ACK
            wqe.state = WqeState.PENDING
            self.send_idx += 1
        else:
            self.noack_pkts = (self.noack_pkts + k) % MAX_PKT_PER_ACK
            wqe.state = WqeState.SENDING
        if self.retrans_deadline is None:
            to = ack_timeout_seconds(cfg.timeout)
            if to is not None:
                self.retrans_deadline = now + to

    def _emit(self, wqe: Wqe, now: float) -> None:
        cfg, wr, mtu = self.cfg, wqe.wr, self.cfg.path_mtu
        i = wqe.next_pkt
        psn = self.psn
        assert psn == psn_add(wqe.first_psn, i)  # type: ignore[arg-type]  # sent: first_psn is set
        op = wr.opcode
        kw: dict[str, Any] = {}
        payload = b""
        se = False
        if op is WrOpcode.RDMA_READ:
            off = i * mtu
            opcode = Opcode.RC_RDMA_READ_REQUEST
            kw["reth"] = make_reth((wr.remote_addr + off) & _U64, wr.rkey, wqe.length - off)
            npsn = wqe.npkts - i
            last = True
        elif op in (WrOpcode.ATOMIC_CMP_AND_SWP, WrOpcode.ATOMIC_FETCH_AND_ADD):
            if op is WrOpcode.ATOMIC_CMP_AND_SWP:
                opcode = Opcode.RC_COMPARE_SWAP
                kw["atomic_eth"] = AtomicEth(wr.remote_addr, wr.rkey, wr.swap, wr.compare_add)
            else:
                opcode = Opcode.RC_FETCH_ADD
                kw["atomic_eth"] = AtomicEth(wr.remote_addr, wr.rkey, wr.compare_add, 0)
            npsn, last = 1, True
        else:
            first_op, mid_op, last_op, only_op = _SEND_OPS[op]
            n = wqe.npkts
            last = i == n - 1
            opcode = only_op if n == 1 else first_op if i == 0 else last_op if last else mid_op
            off = i * mtu
            payload = wqe.sgl.gather(off, min(mtu, wqe.length - off))
            if i == 0 and op in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM):
                kw["reth"] = make_reth(wr.remote_addr, wr.rkey, wqe.length)
            if last:
                se = wr.solicited
                if op in (WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM):
                    kw["immdt"] = make_immdt(wr.imm_data)
                elif op is WrOpcode.SEND_WITH_INV:
                    kw["ieth"] = make_ieth(wr.invalidate_rkey)
            npsn = 1
        self.noack_pkts += 1
        ackreq = last or self.noack_pkts >= MAX_PKT_PER_ACK
        if ackreq:
            self.noack_pkts = 0
        self.out.append(make_packet(make_bth(opcode, cfg.dest_qp_num, psn, se, ackreq, cfg.pkey),
                                    payload, **kw))
        self.metrics.tx_packets += 1
        if psn_diff(psn, self.psn_hi) < 0:
            self.metrics.retransmitted_packets += 1
        self.psn = psn_add(psn, npsn)
        if psn_diff(self.psn, self.psn_hi) > 0:
            self.psn_hi = self.psn
        wqe.next_pkt = i + npsn
        if wqe.next_pkt >= wqe.npkts:
            wqe.state = WqeState.PENDING
            self.send_idx += 1
        else:
            wqe.state = WqeState.SENDING
        if self.retrans_deadline is None:
            to = ack_timeout_seconds(cfg.timeout)
            if to is not None:
                self.retrans_deadline = now + to

    # ----------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        a, b = self.retrans_deadline, self.rnr_deadline
        if a is None:
            return b
        return a if b is None or a <= b else b

    def handle_timer(self, now: float) -> None:
        if self.dead:
            return
        if self.rnr_deadline is not None and now >= self.rnr_deadline:
            self.rnr_deadline = None
            self._rewind()
        if self.retrans_deadline is not None and now >= self.retrans_deadline:
            self.retrans_deadline = None
            if self._outstanding():
                self.metrics.timeouts += 1
                self._error_retry(now)

    def _outstanding(self) -> bool:
        return bool(self.sq) and self.sq[0].first_psn is not None and self.comp_psn != self.psn_hi

    def _progress(self, now: float) -> None:
        """The oldest unacked PSN moved forward: reset retry counters and the timer."""
        self.retry_left = self.cfg.retry_cnt
        self.rnr_left = self.cfg.rnr_retry
        self.retry_started = False
        to = ack_timeout_seconds(self.cfg.timeout)
        self.retrans_deadline = now + to if (to is not None and self._outstanding()) else None

    def _error_retry(self, now: float) -> None:
        """Timeout or PSN sequence error NAK: go back N, or give up."""
        if self.retry_left == 0:
            self._fatal(WcStatus.RETRY_EXC_ERR)
            return
        if self.cfg.retry_cnt != 7:
            self.retry_left -= 1
        self._rewind()
        to = ack_timeout_seconds(self.cfg.timeout)
        self.retrans_deadline = None if to is None else now + to

    def _implicit_nak(self, now: float) -> None:
        """A response shows that data before it is missing (IBTA 9.7.5.1.2:
        an implicit NAK): go back to comp_psn, unless a retry already started
        on this burst (its responses are still arriving)."""
        self.metrics.responses_dropped += 1
        if self.retry_started:
            return
        self.retry_started = True
        self._error_retry(now)

    def _rewind(self) -> None:
        """Restart sending at comp_psn (rxe's req_retry)."""
        if not self.sq or self.sq[0].first_psn is None:
            return
        self.metrics.retry_events += 1
        for k in range(min(self.send_idx + 1, len(self.sq))):
            w = self.sq[k]
            if w.first_psn is None:
                break
            if k == 0:
                w.next_pkt = max(0, min(psn_diff(self.comp_psn, w.first_psn), w.npkts - 1))
            else:
                w.next_pkt = 0
            w.state = WqeState.POSTED if w.next_pkt == 0 else WqeState.SENDING
        self.send_idx = 0
        self.psn = psn_add(self.sq[0].first_psn, self.sq[0].next_pkt)

    # -------------------------------------------------------------- completer
    def on_response(self, pkt: RocePacket, now: float, info=None) -> None:
        if self.dead:
            return
        m = self.metrics
        bth = pkt.bth
        psn = bth.psn
        if psn_diff(psn, self.psn_hi) >= 0:     # responds to a PSN never sent
            m.responses_dropped += 1
            return
        if info is None:
            info = OPCODE_TABLE[bth.opcode]
        sq = self.sq
        while True:
            if not sq or sq[0].first_psn is None:
                m.responses_dropped += 1
                return
            wqe = sq[0]
            if psn_diff(psn, (wqe.first_psn + wqe.npkts - 1) & PSN_MASK) > 0:  # type: ignore[operator]  # sent: first_psn is set
                if wqe.state is not WqeState.PENDING:
                    m.responses_dropped += 1
                    return
                if wqe.rd_atomic:
                    # a later PSN is answered but this READ/atomic's data is
                    # missing: implicit NAK, retry from comp_psn (once per burst)
                    self._implicit_nak(now)
                    return
                self.comp_psn = (wqe.first_psn + wqe.npkts) & PSN_MASK  # type: ignore[operator]  # sent: first_psn is set
                self._complete(WcStatus.SUCCESS)
                self._progress(now)
                continue
            break
        d = psn_diff(psn, self.comp_psn)
        if d < 0:
            m.responses_dropped += 1            # stale duplicate
            return
        kind = info.kind
        if kind is Kind.ACK:
            self._ack(wqe, pkt, psn, now)
        elif kind is Kind.READ_RESPONSE:
            self._read_response(wqe, pkt, info, d, now)
        elif kind is Kind.ATOMIC_ACK:
            if wqe.wr.opcode not in _ATOMICS or d != 0:
                m.responses_dropped += 1
                return
            orig = pkt.atomic_ack_eth.orig
            wqe.sgl.scatter(0, orig.to_bytes(8, "little"))
            self.comp_psn = psn_add(psn, 1)
            self._complete(WcStatus.SUCCESS)
            self._progress(now)
        else:
            self._ack(wqe, pkt, psn, now)
        if not self.dead:
            self.fill(now)

    def _read_response(self, wqe: Wqe, pkt: RocePacket, info, d: int, now: float) -> None:
        m = self.metrics
        if wqe.wr.opcode is not WrOpcode.RDMA_READ:
            m.responses_dropped += 1
            return
        if d > 0:  # a READ response packet went missing: ask again from it, once per burst
            self._implicit_nak(now)
            return
        mtu = self.cfg.path_mtu
        idx = psn_diff(pkt.bth.psn, wqe.first_psn)  # type: ignore[arg-type]  # sent: first_psn is set
        plen = len(pkt.payload)
        at_end = idx == wqe.npkts - 1
        if info.ends != at_end or (not at_end and plen != mtu) or \
                (at_end and idx * mtu + plen != wqe.length):
            m.responses_dropped += 1
            return
        wqe.sgl.scatter(idx * mtu, pkt.payload)
        self.comp_psn = psn_add(pkt.bth.psn, 1)
        if at_end:
            self._complete(WcStatus.SUCCESS)
        self._progress(now)

    def _ack(self, wqe: Wqe, pkt: RocePacket, psn: int, now: float) -> None:
        m = self.metrics
        aeth: Aeth = pkt.aeth  # type: ignore[assignment]  # an ACK carries an AETH
        t = (aeth.syndrome >> 5) & 3
        if t == _ACK_T:
            if wqe.rd_atomic:
                m.responses_dropped += 1        # an ACK cannot complete a READ/atomic
                return
            self.comp_psn = (psn + 1) & PSN_MASK
            last = (wqe.first_psn + wqe.npkts - 1) & PSN_MASK  # type: ignore[operator]  # sent: first_psn is set
            if psn == last and wqe.state is WqeState.PENDING:
                self._complete(WcStatus.SUCCESS)
            self._progress(now)
        elif t == _RNR_T:
            m.rnr_naks_received += 1
            self.comp_psn = psn
            if self.rnr_left == 0:
                self._fatal(WcStatus.RNR_RETRY_EXC_ERR)
                return
            if self.cfg.rnr_retry != 7:
                self.rnr_left -= 1
            self.retrans_deadline = None
            self._rewind()
            self.rnr_deadline = now + rnr_timer_seconds(aeth.rnr_timer)
        elif t == _NAK_T:
            code = aeth.nak_code
            if code == NakCode.PSN_SEQ_ERR:
                m.seq_naks_received += 1
                if psn_diff(psn, self.comp_psn) > 0:
                    # it acknowledges the packets before the gap: forward progress,
                    # so the retry budget starts afresh (it counts retries of one PSN)
                    self.comp_psn = psn
                    self._progress(now)
                self._error_retry(now)
            else:
                m.fatal_naks_received += 1
                self.comp_psn = psn
                self._fatal(_FATAL_NAK.get(code, WcStatus.BAD_RESP_ERR))
        else:
            m.responses_dropped += 1

    # ------------------------------------------------------------ completions
    def _complete(self, status: WcStatus) -> None:
        wqe = self.sq.popleft()
        self.send_idx = max(0, self.send_idx - 1)
        if psn_diff(self.psn, self.comp_psn) < 0:
            # a late response completed a WQE rewound (go-back-N) but not yet sent
            # again: the next packet to send is the next WQE's, not this one's
            self.psn = self.comp_psn
        if wqe.rd_atomic:
            self.rd_atomic_outstanding -= 1
        if wqe.wr.signaled or status is not WcStatus.SUCCESS:
            byte_len = wqe.length if wqe.wr.opcode is WrOpcode.RDMA_READ else \
                8 if wqe.rd_atomic else wqe.length
            self.completions.append(Completion(
                wqe.wr.wr_id, status, wc_opcode_of(wqe.wr.opcode), self.cfg.qp_num,
                byte_len=byte_len if status is WcStatus.SUCCESS else 0))

    def _fatal(self, status: WcStatus) -> None:
        """Error-complete the oldest WQE and move the QP to ERR."""
        if self.sq:
            self._complete(status)
        self._on_fatal()

    def flush(self) -> None:
        """QP entered ERR: every queued WQE completes with WR_FLUSH_ERR."""
        self.dead = True
        self.retrans_deadline = self.rnr_deadline = None
        self.out.clear()
        while self.sq:
            self._complete(WcStatus.WR_FLUSH_ERR)
