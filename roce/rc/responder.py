"""RC responder (IBTA vol. 1, 9.7.4 "Responder" and 9.7.5.2 "ACK/NAK
generation"; the role of rxe_resp.c), sans-I/O.

For each request packet, in this order (as rxe does):

1. PSN check against the expected PSN: ahead -> one PSN-sequence-error NAK
   per gap, dropped; behind -> duplicate (SEND/WRITE re-ACKed, READ replayed
   from memory, atomics answered from the replay cache of recent results);
2. opcode sequence (a message in progress admits only its MIDDLE/LAST) and
   the QP's remote access flags -> NAK invalid request;
3. resources: a SEND or WRITE-with-immediate needs a receive WQE -> RNR NAK
   with the QP's min_rnr_timer when the receive queue is empty;
4. lengths: FIRST/MIDDLE carry exactly one path MTU, LAST/ONLY at most one,
   WRITE totals match the RETH DMA length, SEND fits the receive buffer;
5. R_Key check through :class:`roce.rc.memory.RemoteMemory` -> NAK remote
   access error;
6. execute, advance the expected PSN and MSN, ACK when AckReq is set
   (ACKs still queued are coalesced: the newest supersedes them).

Class C/D errors (invalid request, remote access, remote operational) put
the QP in the error state after the NAK.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from verbs import (
    MSN_MASK,
    PSN_HALF,
    PSN_MASK,
    Access,
    AethType,
    NakCode,
    WcOpcode,
    WcStatus,
    psn_add,
    psn_diff,
)

from ..build import make_aeth, make_bth, make_packet
from ..errors import RemoteAccessError
from ..headers import CREDITS_INVALID, Aeth, AtomicAckEth
from ..opcodes import Kind, Opcode, OpInfo, Position
from ..packet import RocePacket
from .config import MAX_MSG_SIZE, QpConfig
from .metrics import RcMetrics
from .sgl import SgLengthError, SgList
from .verbs import Completion

_U64 = (1 << 64) - 1
_NAK_COUNTER = {NakCode.INV_REQ: "invalid_request_naks",
                NakCode.REM_ACCESS: "remote_access_naks",
                NakCode.REM_OP: "remote_op_naks"}
#: QP access right each request kind needs (as plain ints: checked per packet)
_NEED = {Kind.WRITE: int(Access.REMOTE_WRITE), Kind.READ_REQUEST: int(Access.REMOTE_READ),
         Kind.ATOMIC: int(Access.REMOTE_ATOMIC)}
_ACK = int(Opcode.RC_ACKNOWLEDGE)
_ACK_SYNDROME = (int(AethType.ACK) << 5) | CREDITS_INVALID
_CONTINUES = (Position.MIDDLE, Position.LAST)
_SEND, _WRITE = Kind.SEND, Kind.WRITE


@dataclass(slots=True)
class _ReadRes:
    first_psn: int
    npkts: int
    rkey: int
    va: int
    length: int


@dataclass(slots=True)
class _AtomicRes:
    psn: int
    orig: int


@dataclass(slots=True)
class _SendCtx:
    wr_id: int
    sgl: SgList
    offset: int = 0


@dataclass(slots=True)
class _WriteCtx:
    view: memoryview
    length: int
    offset: int = 0
    rkey: int = 0   # the R_Key its view was resolved from (its owner may retarget the view)


class Responder:
    def __init__(self, cfg: QpConfig, memory, metrics: RcMetrics, on_fatal) -> None:
        self.cfg = cfg
        self.memory = memory
        self.metrics = metrics
        self._on_fatal = on_fatal
        self.rq: deque[tuple[int, SgList]] = deque()
        self.psn = cfg.rq_psn           # expected PSN
        self.msn = 0
        self.nak_sent = False           # a PSN sequence NAK is out for the current gap
        self.cur: _SendCtx | _WriteCtx | None = None
        self.cur_kind: Kind | None = None
        self.resources: deque = deque(maxlen=cfg.max_dest_rd_atomic)
        self.out: list[RocePacket] = []
        self.completions: list[Completion] = []
        self.dead = False

    # ------------------------------------------------------------------ verbs
    def post_recv(self, wr_id: int, sges) -> None:
        self.rq.append((wr_id, SgList(sges)))

    def flush(self) -> None:
        self.dead = True
        if isinstance(self.cur, _SendCtx):
            self.completions.append(Completion(self.cur.wr_id, WcStatus.WR_FLUSH_ERR,
                                               WcOpcode.RECV, self.cfg.qp_num))
        self.cur = None
        while self.rq:
            wr_id, _ = self.rq.popleft()
            self.completions.append(Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV,
                                               self.cfg.qp_num))

    # --------------------------------------------------------------- sending
    def _send(self, opcode: int, psn: int, payload=b"", aeth=None, atomic_ack_eth=None) -> None:
        cfg = self.cfg
        self.out.append(make_packet(make_bth(opcode, cfg.dest_qp_num, psn, False, False, cfg.pkey),
                                    payload, None, aeth, None, None, atomic_ack_eth))
        self.metrics.tx_packets += 1

    def _ack(self, psn: int, msn: int | None = None) -> None:
        """Queue an ACK of ``psn`` carrying ``msn`` (default: the current
        MSN), coalescing with a plain ACK queued last."""
        out = self.out
        if out:
            last = out[-1]
            if last.bth.opcode == _ACK and (last.aeth.syndrome >> 5) & 3 == AethType.ACK:
                out.pop()                       # coalesce: the newer ACK covers it
                self.metrics.tx_packets -= 1
        self._send(_ACK, psn, aeth=make_aeth(_ACK_SYNDROME, self.msn if msn is None else msn))

    def _nak(self, psn: int, code: NakCode, fatal: bool = True) -> None:
        self._send(_ACK, psn, aeth=Aeth.nak(self.msn, code))
        if fatal:
            name = _NAK_COUNTER[code]
            setattr(self.metrics, name, getattr(self.metrics, name) + 1)
            self._on_fatal()

    def _read_responses(self, psn: int, view: memoryview, length: int) -> None:
        mtu = self.cfg.path_mtu
        n = max(1, -(-length // mtu))
        aeth = make_aeth(_ACK_SYNDROME, self.msn)
        for i in range(n):
            if n == 1:
                op = Opcode.RC_RDMA_READ_RESPONSE_ONLY
            elif i == 0:
                op = Opcode.RC_RDMA_READ_RESPONSE_FIRST
            elif i == n - 1:
                op = Opcode.RC_RDMA_READ_RESPONSE_LAST
            else:
                op = Opcode.RC_RDMA_READ_RESPONSE_MIDDLE
            self._send(op, (psn + i) & PSN_MASK, view[i * mtu:min(length, (i + 1) * mtu)],
                       None if op == Opcode.RC_RDMA_READ_RESPONSE_MIDDLE else aeth)

    # --------------------------------------------------------------- receive
    def on_request(self, pkt: RocePacket, info: OpInfo) -> None:
        m = self.metrics
        if self.dead:
            m.dropped_qp_state += 1
            return
        bth = pkt.bth
        psn = bth.psn
        d = (psn - self.psn) & PSN_MASK         # psn_diff inline: ahead if in (0, 2^23)
        if d:
            if d < PSN_HALF:
                m.out_of_sequence += 1
                if not self.nak_sent:
                    self.nak_sent = True
                    m.seq_naks_sent += 1
                    self._nak(self.psn, NakCode.PSN_SEQ_ERR, fatal=False)
                return
            m.duplicate_requests += 1
            self._duplicate(pkt, info)
            return
        self.nak_sent = False
        kind = info.kind
        cfg = self.cfg
        # 2. opcode sequence and QP access rights
        if self.cur_kind is not None:
            ok = kind is self.cur_kind and info.position in _CONTINUES
        else:
            ok = info.starts
        need = _NEED.get(kind)
        if not ok or (need is not None and not int(cfg.access) & need):
            self._nak(psn, NakCode.INV_REQ)
            return
        # 3. receive WQE for SEND and WRITE with immediate
        if not self.rq and ((kind is _SEND and info.starts) or (kind is _WRITE and info.has_imm)):
            m.rnr_naks_sent += 1
            self._send(_ACK, psn, aeth=Aeth.rnr_nak(self.msn, cfg.min_rnr_timer))
            return
        # 4. payload length against the path MTU
        plen = len(pkt.payload)
        mtu = cfg.path_mtu
        if info.has_payload and (plen > mtu or (not info.ends and plen != mtu)):
            self._nak(psn, NakCode.INV_REQ)
            return
        if kind is _SEND:
            self._do_send(pkt, info, psn, plen)
        elif kind is _WRITE:
            self._do_write(pkt, info, psn, plen)
        elif kind is Kind.READ_REQUEST:
            self._do_read(pkt, psn)
        else:
            self._do_atomic(pkt, psn)

    def _do_send(self, pkt: RocePacket, info: OpInfo, psn: int, plen: int) -> None:
        if info.starts:
            wr_id, sgl = self.rq.popleft()
            self.cur = ctx = _SendCtx(wr_id, sgl)
            self.cur_kind = _SEND
        else:
            ctx = self.cur  # type: ignore[assignment]  # cur_kind says which
        if plen:
            try:
                ctx.sgl.scatter(ctx.offset, pkt.payload)
            except SgLengthError:
                self.completions.append(Completion(ctx.wr_id, WcStatus.LOC_LEN_ERR, WcOpcode.RECV,
                                                   self.cfg.qp_num))
                self.cur = self.cur_kind = None
                self._nak(psn, NakCode.INV_REQ)
                return
            ctx.offset += plen
        inv = None
        if info.ends:
            if info.has_inv:
                inv = pkt.ieth.rkey
                try:
                    self.memory.invalidate(inv)
                except RemoteAccessError:
                    self.completions.append(Completion(ctx.wr_id, WcStatus.REM_INV_REQ_ERR,
                                                       WcOpcode.RECV, self.cfg.qp_num))
                    self.cur = self.cur_kind = None
                    self._nak(psn, NakCode.INV_REQ)
                    return
            self.msn = (self.msn + 1) & MSN_MASK
            immdt = pkt.immdt
            cfg = self.cfg
            self.completions.append(Completion(
                ctx.wr_id, WcStatus.SUCCESS, WcOpcode.RECV, cfg.qp_num, ctx.offset,
                None if immdt is None else immdt.imm, inv, cfg.dest_qp_num))
            self.cur = self.cur_kind = None
        self.psn = (psn + 1) & PSN_MASK
        if pkt.bth.ackreq:
            self._ack(psn)

    def _do_write(self, pkt: RocePacket, info: OpInfo, psn: int, plen: int) -> None:
        ends = info.ends
        if info.starts:
            reth = pkt.reth
            dma_len = reth.dma_len
            if dma_len > MAX_MSG_SIZE or (ends and plen != dma_len) or \
                    (not ends and plen >= dma_len):
                self._nak(psn, NakCode.INV_REQ)
                return
            if dma_len == 0:
                view = memoryview(bytearray(0))     # zero-length WRITE checks no R_Key (9.7.4.1.6)
            else:
                try:
                    view = self.memory.resolve(reth.rkey, reth.va, dma_len, Access.REMOTE_WRITE)
                except RemoteAccessError:
                    self._nak(psn, NakCode.REM_ACCESS)
                    return
            self.cur = ctx = _WriteCtx(view, dma_len, 0, reth.rkey)
            self.cur_kind = _WRITE
        else:
            ctx = self.cur  # type: ignore[assignment]  # cur_kind says which
        off = ctx.offset
        end = off + plen
        if end > ctx.length or (ends and end != ctx.length):
            self.cur = self.cur_kind = None
            self._nak(psn, NakCode.INV_REQ)
            return
        if plen:
            ctx.view[off:end] = pkt.payload
        ctx.offset = end
        if ends:
            self.msn = (self.msn + 1) & MSN_MASK
            if info.has_imm:
                wr_id, _ = self.rq.popleft()
                cfg = self.cfg
                self.completions.append(Completion(
                    wr_id, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, cfg.qp_num,
                    byte_len=ctx.length, imm_data=pkt.immdt.imm, src_qp=cfg.dest_qp_num))
            self.cur = self.cur_kind = None
        self.psn = (psn + 1) & PSN_MASK
        if pkt.bth.ackreq:
            self._ack(psn)

    def _resolve_read(self, rkey: int, va: int, length: int) -> memoryview:
        if length == 0:
            return memoryview(b"")
        return self.memory.resolve(rkey, va, length, Access.REMOTE_READ)

    def _do_read(self, pkt: RocePacket, psn: int) -> None:
        reth = pkt.reth
        if reth.dma_len > MAX_MSG_SIZE:
            self._nak(psn, NakCode.INV_REQ)
            return
        try:
            view = self._resolve_read(reth.rkey, reth.va, reth.dma_len)
        except RemoteAccessError:
            self._nak(psn, NakCode.REM_ACCESS)
            return
        npkts = max(1, -(-reth.dma_len // self.cfg.path_mtu))
        self.resources.append(_ReadRes(psn, npkts, reth.rkey, reth.va, reth.dma_len))
        self.msn = (self.msn + 1) & MSN_MASK
        self._read_responses(psn, view, reth.dma_len)
        self.psn = psn_add(psn, npkts)

    def _do_atomic(self, pkt: RocePacket, psn: int) -> None:
        a = pkt.atomic_eth
        if a.va & 7:
            self._nak(psn, NakCode.INV_REQ)     # misaligned atomic
            return
        try:
            view = self.memory.resolve(a.rkey, a.va, 8, Access.REMOTE_ATOMIC)
        except RemoteAccessError:
            self._nak(psn, NakCode.REM_ACCESS)
            return
        orig = int.from_bytes(view, "little")
        if pkt.bth.opcode == Opcode.RC_COMPARE_SWAP:
            new = a.swap_add if orig == a.compare else orig
        else:
            new = (orig + a.swap_add) & _U64
        view[:] = new.to_bytes(8, "little")
        self.resources.append(_AtomicRes(psn, orig))
        self.msn = (self.msn + 1) & MSN_MASK
        self.psn = psn_add(psn, 1)
        self._send(Opcode.RC_ATOMIC_ACKNOWLEDGE, psn, aeth=Aeth.ack(self.msn),
                   atomic_ack_eth=AtomicAckEth(orig))

    # ------------------------------------------------------------- duplicates
    def _duplicate(self, pkt: RocePacket, info: OpInfo) -> None:
        psn = pkt.bth.psn
        kind = info.kind
        if kind in (Kind.SEND, Kind.WRITE):
            self._ack(psn_add(self.psn, -1))            # C9-105: ACK again, no re-execution
            return
        for res in reversed(self.resources):
            if kind is Kind.READ_REQUEST and isinstance(res, _ReadRes):
                k = psn_diff(psn, res.first_psn)
                if 0 <= k < res.npkts:
                    off = k * self.cfg.path_mtu
                    length = res.length - off
                    try:
                        view = self._resolve_read(res.rkey, res.va + off, length)
                    except RemoteAccessError:
                        break
                    self._read_responses(psn, view, length)
                    return
            elif kind is Kind.ATOMIC and isinstance(res, _AtomicRes) and res.psn == psn:
                self._send(Opcode.RC_ATOMIC_ACKNOWLEDGE, psn, aeth=Aeth.ack(self.msn),
                           atomic_ack_eth=AtomicAckEth(res.orig))
                return
        self.metrics.dropped_other += 1
