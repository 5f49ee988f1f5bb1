"""The driver side of the virtio-rdma device, for tests, fuzzers and benchmarks.

What a guest driver does (docs/virtio-rdma.md), in-process and without a
transport: control commands as bytes straight to an :class:`RdmaDeviceCore`,
WQEs written into the QP's SQ/RQ rings in guest memory, the doorbell record
written and a doorbell given to the core, CQEs polled by their owner bit, the
CQ's consumer index written back to its doorbell record. Handles (CQN, QPN,
keys) are learned from the device's responses.

:class:`CoreDriver` holds the memory-neutral part; a subclass decides the
guest memory (``base``, ``size``, ``view``: a writable buffer of it, the
allocator's start ``_brk``) and makes ``core``. The device tests
(tests/virtio_rdma/driver.py: a bytearray) and the fuzzers
(bench/fuzz/guest.py: memfd memory with canary guards) are two such.
Nothing here is used by the daemon (as rust-vmm ships a driver-side mock
queue for device tests).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from verbs import Access, QpAttrMask as M, QpState, SendFlags
from virtio_rdma import wire
from virtio_rdma.constants import Cmd, DoorbellKind, Status

#: a doorbell record: (SQ or CQ consumer index, RQ index)
DBREC = struct.Struct("<II")
#: every access right an RC QP or MR may grant
ALL_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC


class DriverError(Exception):
    """A control command the device answered with a status other than OK."""

    def __init__(self, cmd, status):
        super().__init__(f"{Cmd(cmd).name} failed: {Status(status).name}")
        self.status = Status(status)


@dataclass
class DriverCq:
    cqn: int
    depth: int
    ring: int
    dbrec: int
    ci: int = 0


@dataclass
class DriverQp:
    qpn: int
    layout: wire.WqLayout
    sq: int
    rq: int
    dbrec: int
    send_cq: DriverCq
    recv_cq: DriverCq
    sq_pi: int = 0
    rq_pi: int = 0


def rc_connect_steps(remote_qpn: int, gid: bytes, *, access: int = ALL_ACCESS, timeout: int = 14,
                     retry_cnt: int = 7, rnr_retry: int = 7, min_rnr_timer: int = 1, sq_psn: int = 0,
                     rq_psn: int = 0, path_mtu: int = 3) -> tuple[tuple[M, dict[str, Any]], ...]:
    """The MODIFY_QP (mask, attributes) taking an RC QP from RESET to INIT, RTR (to
    ``remote_qpn`` at ``gid``) and RTS."""
    return (
        (M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
         dict(qp_state=QpState.INIT, port_num=1, qp_access_flags=int(access))),
        (M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER,
         dict(qp_state=QpState.RTR, dgid=gid, path_mtu=path_mtu, dest_qp_num=remote_qpn, rq_psn=rq_psn,
              max_dest_rd_atomic=4, min_rnr_timer=min_rnr_timer)),
        (M.STATE | M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.MAX_QP_RD_ATOMIC,
         dict(qp_state=QpState.RTS, sq_psn=sq_psn, timeout=timeout, retry_cnt=retry_cnt,
              rnr_retry=rnr_retry, max_rd_atomic=4)),
    )


class CoreDriver:
    """A guest driver of one device core; see the module doc for what a subclass sets."""

    base: int
    size: int
    view: Any
    core: Any
    _brk: int
    #: untouched bytes after each allocation (a fuzzer's canary)
    alloc_guard = 0
    #: raised for a command that failed
    error: type[DriverError] = DriverError

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else [0.0]

    @property
    def now(self) -> float:
        return self.clock[0]

    # ---- memory ------------------------------------------------------------
    def alloc(self, n: int, align: int = 64, guard: int | None = None) -> int:
        """``n`` bytes aligned to ``align``, ``guard`` bytes left untouched after them."""
        guard = self.alloc_guard if guard is None else guard
        g = (self._brk + align - 1) & ~(align - 1)
        if g + n + guard > self.base + self.size:
            raise MemoryError(f"{type(self).__name__} out of memory")
        self._brk = g + n + guard
        return g

    def write(self, gpa: int, data) -> None:
        o = gpa - self.base
        self.view[o:o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = gpa - self.base
        return bytes(self.view[o:o + n])

    # ---- control -----------------------------------------------------------
    def cmd(self, cmd: Cmd, **fields) -> dict:
        resp = self.core.handle_control(wire.encode_request(cmd, **fields), self.now)
        status, body = wire.decode_response(cmd, resp)
        if status != Status.OK or body is None:
            raise self.error(cmd, status)
        return body

    def alloc_pd(self) -> int:
        return self.cmd(Cmd.ALLOC_PD)["pdn"]

    def create_cq(self, depth: int = 64) -> DriverCq:
        ring = self.alloc(depth * wire.CQE_SIZE)
        db = self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_CQ, cqe=depth, comp_vector=0, ring_gpa=ring, dbrec_gpa=db)
        return DriverCq(r["cqn"], depth, ring, db)

    def create_qp(self, pdn: int, scq: DriverCq, rcq: DriverCq | None = None, *, max_send_wr=16,
                  max_recv_wr=16, max_send_sge=4, max_recv_sge=4, max_inline_data=64,
                  sq_sig_all=False) -> DriverQp:
        """An RC QP whose rings and doorbell record this driver allocates."""
        rcq = rcq or scq
        lay = wire.wq_layout(max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data)
        sq, rq, db = self.alloc(lay.sq_bytes), self.alloc(lay.rq_bytes), self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_QP, pdn=pdn, qp_type=2, send_cqn=scq.cqn, recv_cqn=rcq.cqn,
                     max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=max_send_sge,
                     max_recv_sge=max_recv_sge, max_inline_data=max_inline_data,
                     flags=int(sq_sig_all), sq_gpa=sq, rq_gpa=rq, dbrec_gpa=db)
        assert r["sq_wqe_shift"] == lay.sq_wqe_shift and r["max_send_wr"] == lay.sq_depth
        return DriverQp(r["qpn"], lay, sq, rq, db, scq, rcq)

    # ---- data path -----------------------------------------------------------
    def sges(self, sges):
        """The (address, length, lkey) triples of ``sges`` (a subclass may take others)."""
        return sges

    def write_send_wqe(self, qp: DriverQp, wr_id: int, opcode, sges=(), *, flags=SendFlags.SIGNALED,
                       inline: bytes | None = None, raw: bytes | None = None, **kw) -> None:
        """Write a send WQE (or ``raw`` bytes) into the SQ's next slot; no doorbell."""
        slot = 1 << qp.layout.sq_wqe_shift
        data = raw if raw is not None else wire.encode_send_wqe(
            wr_id, opcode, int(flags), sges=self.sges(sges), inline=inline, slot_size=slot, **kw)
        self.write(qp.sq + (qp.sq_pi % qp.layout.sq_depth) * slot, data[:slot])
        qp.sq_pi = (qp.sq_pi + 1) & 0xFFFFFFFF

    def ring_sq(self, qp: DriverQp) -> None:
        self.write(qp.dbrec, DBREC.pack(qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qp.qpn, qp.sq_pi), self.now)

    def post_send(self, qp: DriverQp, wr_id: int, opcode, sges=(), **kw) -> None:
        self.write_send_wqe(qp, wr_id, opcode, sges, **kw)
        self.ring_sq(qp)

    def post_recv(self, qp: DriverQp, wr_id: int, sges=()) -> None:
        slot = 1 << qp.layout.rq_wqe_shift
        self.write(qp.rq + (qp.rq_pi % qp.layout.rq_depth) * slot,
                   wire.encode_recv_wqe(wr_id, self.sges(sges), slot_size=slot))
        qp.rq_pi = (qp.rq_pi + 1) & 0xFFFFFFFF
        self.write(qp.dbrec, DBREC.pack(qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qp.qpn, qp.rq_pi), self.now)

    def poll(self, cq: DriverCq, n: int = 1 << 30) -> list[wire.Completion]:
        """Up to ``n`` completions the device owns no more (by owner bit); the consumer
        index goes to the CQ's doorbell record."""
        out: list[wire.Completion] = []
        while len(out) < n:
            off = cq.ring + (cq.ci % cq.depth) * wire.CQE_SIZE
            c, owner = wire.decode_cqe(self.read(off, wire.CQE_SIZE))
            if owner != ((cq.ci // cq.depth) & 1) ^ 1:
                break
            out.append(c)
            cq.ci = (cq.ci + 1) & 0xFFFFFFFF
        self.write(cq.dbrec, DBREC.pack(cq.ci, 0))
        return out
