"""An RC queue pair as a sans-I/O state machine (IBTA vol. 1, 10.3 "QP
state machine"; 9.7 reliable service).

Inputs: work requests (:meth:`RcQp.post_send`, :meth:`RcQp.post_recv`),
received packets (:meth:`RcQp.receive`, already syntax-checked by
:func:`roce.packet.decode`) and the current time ``now`` in seconds.
Outputs: packets to send (:meth:`RcQp.transmit`), completions
(:meth:`RcQp.poll_send_cq`, :meth:`RcQp.poll_recv_cq`) and the next timer
deadline (:meth:`RcQp.next_deadline`, then :meth:`RcQp.handle_timer`).
No sockets, no clocks.

States and legal ``modify`` transitions (ibv_modify_qp)::

    RESET -> INIT -> RTR -> RTS <-> SQD ; any -> ERR ; any -> RESET
"""
from __future__ import annotations

from dataclasses import fields

from verbs import QpState

from ..errors import QpStateError
from ..opcodes import OPCODE_TABLE, Transport, opinfo
from ..packet import PacketRun, RocePacket, expand
from .config import QpConfig
from .metrics import RcMetrics
from .requester import Requester
from .responder import Responder
from .verbs import Completion, RecvWR, SendWR, wc_opcode_of

#: Legal modify() transitions of the RC state machine over libibverbs'
#: ``enum ibv_qp_state`` (SQE is never entered here). RESET: just created or
#: reset, nothing queued; INIT: receive WRs may be posted, no traffic; RTR:
#: ready to receive, the responder runs; RTS: ready to send, requester and
#: responder run; SQD: send queue drained, no new requests started; ERR:
#: everything flushed with WR_FLUSH_ERR, packets dropped.
TRANSITIONS: dict[QpState, frozenset[QpState]] = {
    QpState.RESET: frozenset({QpState.RESET, QpState.INIT, QpState.ERR}),
    QpState.INIT: frozenset({QpState.RESET, QpState.INIT, QpState.RTR, QpState.ERR}),
    QpState.RTR: frozenset({QpState.RESET, QpState.RTS, QpState.ERR}),
    QpState.RTS: frozenset({QpState.RESET, QpState.RTS, QpState.SQD, QpState.ERR}),
    QpState.SQD: frozenset({QpState.RESET, QpState.RTS, QpState.SQD, QpState.ERR}),
    QpState.ERR: frozenset({QpState.RESET, QpState.ERR}),
}

_CFG_FIELDS = {f.name for f in fields(QpConfig)}


class RcQp:
    def __init__(self, qp_num: int, memory) -> None:
        self.memory = memory
        self.cfg = QpConfig(qp_num=qp_num)
        self.state = QpState.RESET
        self.metrics = RcMetrics()
        self._send_cq: list[Completion] = []
        self._recv_cq: list[Completion] = []
        self._reset_engines()

    def _reset_engines(self) -> None:
        self.requester = Requester(self.cfg, self.metrics, self._fatal)
        self.responder = Responder(self.cfg, self.memory, self.metrics, self._fatal)

    @property
    def qp_num(self) -> int:
        return self.cfg.qp_num

    # ------------------------------------------------------------ state machine
    def modify(self, state: QpState, **attrs) -> None:
        """ibv_modify_qp: move to ``state``, setting QpConfig fields ``attrs``."""
        if state not in TRANSITIONS[self.state]:
            raise QpStateError(f"QP {self.qp_num}: {self.state.name} -> {state.name} not allowed")
        bad = (set(attrs) - _CFG_FIELDS) | ({"qp_num"} & set(attrs))
        if bad:
            raise QpStateError(f"QP {self.qp_num}: unknown or read-only attributes {sorted(bad)}")
        if attrs:
            if state in (QpState.RTS, QpState.SQD) and self.state in (QpState.RTS, QpState.SQD):
                frozen = {"path_mtu", "sq_psn", "rq_psn", "dest_qp_num"} & set(attrs)
                if frozen:
                    raise QpStateError(f"QP {self.qp_num}: {sorted(frozen)} cannot change in "
                                       f"{self.state.name}")
            new = QpConfig(**{f: getattr(self.cfg, f) for f in _CFG_FIELDS} | attrs)
            for f in _CFG_FIELDS:
                setattr(self.cfg, f, getattr(new, f))
        old, self.state = self.state, state
        if state is QpState.RESET:
            self._send_cq.clear()
            self._recv_cq.clear()
            self._reset_engines()
        elif state is QpState.ERR and old is not QpState.ERR:
            self._flush()
        elif state is QpState.RTR and old is QpState.INIT:
            r = self.responder
            r.psn = self.cfg.rq_psn
            r.resources = type(r.resources)(maxlen=self.cfg.max_dest_rd_atomic)
        elif state is QpState.RTS and old is QpState.RTR:
            q = self.requester
            q.psn = q.psn_hi = q.comp_psn = self.cfg.sq_psn
            q.retry_left, q.rnr_left = self.cfg.retry_cnt, self.cfg.rnr_retry

    def _fatal(self) -> None:
        if self.state is not QpState.ERR:
            self.state = QpState.ERR
            self._flush()

    def _flush(self) -> None:
        self.requester.flush()
        self.responder.flush()
        self._collect()

    # ------------------------------------------------------------------ verbs
    def post_send(self, wr: SendWR) -> None:
        if self.state in (QpState.RESET, QpState.INIT, QpState.RTR):
            raise QpStateError(f"QP {self.qp_num}: post_send in {self.state.name}")
        self.requester.post(wr)
        if self.state is QpState.ERR:
            self.requester.flush()
            self._collect()

    def post_recv(self, wr_id: int, sges) -> None:
        if self.state is QpState.RESET:
            raise QpStateError(f"QP {self.qp_num}: post_recv in RESET")
        if isinstance(wr_id, RecvWR):
            wr_id, sges = wr_id.wr_id, wr_id.sges
        self.responder.post_recv(wr_id, sges)
        if self.state is QpState.ERR:
            self.responder.flush()
            self._collect()

    # -------------------------------------------------------------- packet I/O
    def receive(self, pkt: RocePacket, now: float) -> None:
        m = self.metrics
        m.rx_packets += 1
        bth = pkt.bth
        info = OPCODE_TABLE.get(bth.opcode)
        if info is None:
            info = opinfo(bth.opcode)           # raises UnknownOpcode
        cfg = self.cfg
        if bth.dest_qp != cfg.qp_num or info.transport is not Transport.RC or \
                (bth.pkey & 0x7FFF) != (cfg.pkey & 0x7FFF):
            m.dropped_other += 1
            return
        state = self.state
        if info.is_request:
            if state is not QpState.RTS and state is not QpState.RTR and state is not QpState.SQD:
                m.dropped_qp_state += 1
                return
            self.responder.on_request(pkt, info)
        else:
            if state is not QpState.RTS and state is not QpState.SQD:
                m.dropped_qp_state += 1
                return
            self.requester.on_response(pkt, now, info)
        self._collect()

    def transmit(self, now: float) -> list[RocePacket]:
        """Packets to send now: responses first, then new or retried requests."""
        out = self.transmit_raw(now)
        for p in out:
            if type(p) is PacketRun:
                return expand(out)
        return out

    def transmit_raw(self, now: float) -> list:
        """:meth:`transmit` with runs of data packets left as
        :class:`~roce.packet.PacketRun` s (for a sender that encodes them)."""
        q, r = self.requester, self.responder
        if self.state is QpState.RTS:
            q.fill(now)
        out: list[RocePacket | PacketRun] = r.out  # type: ignore[assignment]  # grows with runs
        if out:
            r.out = []
            if q.out:
                out += q.out
                q.out = []
        elif q.out:
            out, q.out = q.out, []
        else:
            out = []
        self._collect()
        return out

    def next_deadline(self) -> float | None:
        return None if self.state is QpState.ERR else self.requester.next_deadline()

    def handle_timer(self, now: float) -> None:
        if self.state in (QpState.RTS, QpState.SQD):
            self.requester.handle_timer(now)
            self._collect()

    # -------------------------------------------------------------- completions
    def _collect(self) -> None:
        if self.requester.completions:
            self._send_cq.extend(self.requester.completions)
            self.requester.completions.clear()
        if self.responder.completions:
            self._recv_cq.extend(self.responder.completions)
            self.responder.completions.clear()

    def poll_send_cq(self) -> list[Completion]:
        out, self._send_cq = self._send_cq, []
        return out

    def poll_recv_cq(self) -> list[Completion]:
        out, self._recv_cq = self._recv_cq, []
        return out


__all__ = ["RcQp", "TRANSITIONS", "Completion", "wc_opcode_of"]
