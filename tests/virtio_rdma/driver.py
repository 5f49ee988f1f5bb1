"""A small driver-side helper for the device tests: it plays the guest driver
(what guest_lib will become). It keeps its rings in a real
``virtio.memory.GuestMemory`` (bytearray-backed region), writes WQEs into the
SQ/RQ rings, rings doorbells and polls CQEs by owner bit, exactly as
docs/virtio-rdma.md prescribes.
"""
from __future__ import annotations

import contextlib
import random
import struct
import types
from dataclasses import dataclass

from virtio.memory import GuestMemory, MemoryRegion
from virtio_rdma import wire
from verbs import Access, QpAttrMask as M, QpState, SendFlags
from virtio_rdma.constants import AQ_SLOT_SIZE, Cmd, DoorbellKind, Status
from virtio_rdma.core import RdmaDeviceCore


@contextlib.contextmanager
def seeded_ids(seed: int = 0):
    """QPNs and MR keys from a seeded generator instead of ``secrets``, so two
    runs that must agree byte for byte (one engine against another) get the
    same numbers; the product always draws them from ``secrets``."""
    from fabric import local as fabric_mod
    from virtio_rdma import mr as mr_mod

    rng = random.Random(seed)
    source = types.SimpleNamespace(randbits=rng.getrandbits, randbelow=rng.randrange)
    saved = fabric_mod.secrets, mr_mod.secrets
    fabric_mod.secrets = mr_mod.secrets = source
    try:
        yield
    finally:
        fabric_mod.secrets, mr_mod.secrets = saved


class DriverError(Exception):
    def __init__(self, cmd, status):
        super().__init__(f"{Cmd(cmd).name} failed: {Status(status).name}")
        self.status = Status(status)


@dataclass
class DCq:
    cqn: int
    depth: int
    ring: int
    dbrec: int
    ci: int = 0


@dataclass
class DQp:
    qpn: int
    layout: wire.WqLayout
    sq: int
    rq: int
    dbrec: int
    send_cq: DCq
    recv_cq: DCq
    sq_pi: int = 0
    rq_pi: int = 0


@dataclass
class DAq:
    aqn: int
    depth: int
    ring: int
    dbrec: int
    cq: DCq
    pi: int = 0


@dataclass
class Buf:
    gpa: int
    length: int
    lkey: int
    rkey: int

    @property
    def addr(self) -> int:  # iova == gpa in these tests unless registered otherwise
        return self.gpa


class Guest:
    def __init__(self, fabric, size: int = 8 << 20, gpa: int = 0x1000_0000, limits=None, clock=None,
                 accel=None, account=None):
        self.buf = bytearray(size)
        self.region = MemoryRegion.from_buffer(self.buf, gpa=gpa)
        self.mem = GuestMemory([self.region])
        self.base = gpa
        self.size = size
        self._brk = gpa
        self.core = RdmaDeviceCore(self.mem, fabric, limits=limits, accel_router=accel, account=account)
        self.clock = clock if clock is not None else [0.0]
        self.events: list[wire.Event] = []

    @property
    def now(self) -> float:
        return self.clock[0]

    # ---- memory ------------------------------------------------------
    def alloc(self, n: int, align: int = 64) -> int:
        g = (self._brk + align - 1) & ~(align - 1)
        if g + n > self.base + self.size:
            raise MemoryError("test guest out of memory")
        self._brk = g + n
        return g

    def write(self, gpa: int, data) -> None:
        o = gpa - self.base
        self.buf[o:o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = gpa - self.base
        return bytes(self.buf[o:o + n])

    # ---- control -----------------------------------------------------
    def raw(self, request: bytes) -> tuple[Status, bytes]:
        resp = self.core.handle_control(request, self.now)
        return Status(int.from_bytes(resp[:4], "little")), resp

    def cmd(self, cmd: Cmd, **fields) -> dict:
        resp = self.core.handle_control(wire.encode_request(cmd, **fields), self.now)
        status, body = wire.decode_response(cmd, resp)
        if status != Status.OK:
            raise DriverError(cmd, status)
        return body

    def status_of(self, cmd: Cmd, **fields) -> Status:
        try:
            self.cmd(cmd, **fields)
        except DriverError as e:
            return e.status
        return Status.OK

    def alloc_pd(self) -> int:
        return self.cmd(Cmd.ALLOC_PD)["pdn"]

    def reg_mr(self, pdn: int, length: int, access=Access.LOCAL_WRITE | Access.REMOTE_WRITE
               | Access.REMOTE_READ | Access.REMOTE_ATOMIC, gpa: int | None = None,
               chunks=None, iova: int | None = None) -> Buf:
        if gpa is None:
            gpa = self.alloc(length)
        if chunks is None:
            chunks = [(gpa, length)]
        r = self.cmd(Cmd.REG_MR, pdn=pdn, access=int(access), iova=gpa if iova is None else iova,
                     length=length, reserved=0, chunks=[dict(gpa=g, length=n) for g, n in chunks])
        return Buf(gpa if iova is None else iova, length, r["lkey"], r["rkey"])

    def create_cq(self, depth: int = 64) -> DCq:
        ring = self.alloc(depth * wire.CQE_SIZE)
        db = self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_CQ, cqe=depth, comp_vector=0, ring_gpa=ring, dbrec_gpa=db)
        return DCq(r["cqn"], depth, ring, db)

    def create_qp(self, pdn: int, scq: DCq, rcq: DCq | None = None, *, max_send_wr=16, max_recv_wr=16,
                  max_send_sge=4, max_recv_sge=4, max_inline_data=64, sq_sig_all=False) -> DQp:
        rcq = rcq or scq
        lay = wire.wq_layout(max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data)
        sq, rq, db = self.alloc(lay.sq_bytes), self.alloc(lay.rq_bytes), self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_QP, pdn=pdn, qp_type=2, send_cqn=scq.cqn, recv_cqn=rcq.cqn,
                     max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=max_send_sge,
                     max_recv_sge=max_recv_sge, max_inline_data=max_inline_data,
                     flags=int(sq_sig_all), sq_gpa=sq, rq_gpa=rq, dbrec_gpa=db)
        assert r["sq_wqe_shift"] == lay.sq_wqe_shift and r["max_send_wr"] == lay.sq_depth
        return DQp(r["qpn"], lay, sq, rq, db, scq, rcq)

    def modify(self, qp: DQp, mask: int, **attr) -> Status:
        return self.status_of(Cmd.MODIFY_QP, qpn=qp.qpn, attr_mask=int(mask),
                              attr=wire.qp_attr_defaults(**attr))

    def connect(self, qp: DQp, remote_qpn: int, *, gid: bytes, access=Access.LOCAL_WRITE
                | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, timeout=14,
                retry_cnt=7, rnr_retry=7, min_rnr_timer=1, sq_psn=0, rq_psn=0, path_mtu=3) -> None:
        st = self.modify(qp, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
                         qp_state=QpState.INIT, port_num=1, qp_access_flags=int(access))
        assert st == Status.OK, st
        st = self.modify(qp, M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN
                         | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER, qp_state=QpState.RTR, dgid=gid,
                         path_mtu=path_mtu, dest_qp_num=remote_qpn, rq_psn=rq_psn,
                         max_dest_rd_atomic=4, min_rnr_timer=min_rnr_timer)
        assert st == Status.OK, st
        st = self.modify(qp, M.STATE | M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY
                         | M.MAX_QP_RD_ATOMIC, qp_state=QpState.RTS, sq_psn=sq_psn, timeout=timeout,
                         retry_cnt=retry_cnt, rnr_retry=rnr_retry, max_rd_atomic=4)
        assert st == Status.OK, st

    # ---- data path -----------------------------------------------------
    def write_send_wqe(self, qp: DQp, wr_id: int, opcode, sges=(), *, flags=SendFlags.SIGNALED,
                       inline: bytes | None = None, raw: bytes | None = None, **kw) -> None:
        slot = 1 << qp.layout.sq_wqe_shift
        data = raw if raw is not None else wire.encode_send_wqe(
            wr_id, opcode, int(flags), sges=[(b.addr + o, n, b.lkey) for b, o, n in sges] if sges
            and isinstance(sges[0][0], Buf) else sges, inline=inline, slot_size=slot, **kw)
        self.write(qp.sq + (qp.sq_pi % qp.layout.sq_depth) * slot, data[:slot])
        qp.sq_pi = (qp.sq_pi + 1) & 0xFFFFFFFF

    def ring_sq(self, qp: DQp) -> None:
        self.write(qp.dbrec, struct.pack("<II", qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qp.qpn, qp.sq_pi), self.now)

    def post_send(self, qp: DQp, wr_id: int, opcode, sges=(), **kw) -> None:
        self.write_send_wqe(qp, wr_id, opcode, sges, **kw)
        self.ring_sq(qp)

    def post_recv(self, qp: DQp, wr_id: int, sges=()) -> None:
        slot = 1 << qp.layout.rq_wqe_shift
        sg = [(b.addr + o, n, b.lkey) for b, o, n in sges] if sges and isinstance(sges[0][0], Buf) else sges
        self.write(qp.rq + (qp.rq_pi % qp.layout.rq_depth) * slot, wire.encode_recv_wqe(wr_id, sg, slot_size=slot))
        qp.rq_pi = (qp.rq_pi + 1) & 0xFFFFFFFF
        self.write(qp.dbrec, struct.pack("<II", qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qp.qpn, qp.rq_pi), self.now)

    def poll(self, cq: DCq, n: int = 1 << 30) -> list[wire.Completion]:
        out = []
        while len(out) < n:
            off = cq.ring + (cq.ci % cq.depth) * wire.CQE_SIZE
            c, owner = wire.decode_cqe(self.read(off, wire.CQE_SIZE))
            if owner != ((cq.ci // cq.depth) & 1) ^ 1:
                break
            out.append(c)
            cq.ci = (cq.ci + 1) & 0xFFFFFFFF
        self.write(cq.dbrec, struct.pack("<II", cq.ci, 0))
        return out

    # ---- accelerator queues (spec 5.x.6.10) -----------------------------
    def create_aq(self, pdn: int, cq: DCq, op, depth: int = 16, *, priority: int = 0,
                  flags: int = 0, target_host: int = 0) -> DAq:
        ring, db = self.alloc(depth * AQ_SLOT_SIZE), self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_AQ, pdn=pdn, cqn=cq.cqn, op=int(op), priority=priority, flags=flags,
                     reserved0=0, depth=depth, ring_gpa=ring, dbrec_gpa=db, target_host=target_host,
                     reserved1=0)
        assert r["depth"] == depth
        return DAq(r["aqn"], depth, ring, db, cq)

    def write_aq_job(self, aq: DAq, wr_id: int, op, *, raw: bytes | None = None, **kw) -> None:
        """Write one job entry into the next slot; ``kw``: wire.encode_accel_job's
        (inputs/outputs as (addr, length, lkey))."""
        data = raw if raw is not None else wire.encode_accel_job(wr_id, op, **kw)
        self.write(aq.ring + (aq.pi % aq.depth) * AQ_SLOT_SIZE, data[:AQ_SLOT_SIZE])
        aq.pi = (aq.pi + 1) & 0xFFFFFFFF

    def ring_aq(self, aq: DAq, pi: int | None = None) -> None:
        pi = aq.pi if pi is None else pi
        self.write(aq.dbrec, struct.pack("<II", pi, 0))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.AQ, aq.aqn, pi), self.now)

    def post_aq_job(self, aq: DAq, wr_id: int, op, **kw) -> None:
        self.write_aq_job(aq, wr_id, op, **kw)
        self.ring_aq(aq)

    def arm(self, cq: DCq, solicited_only: bool = False) -> None:
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.CQ_ARM, cq.cqn, int(solicited_only)), self.now)

    def process(self):
        r = self.core.process(self.now)
        self.events.extend(r.events)
        return r


def pair(fabric, **kw):
    """Two guests on one fabric, each with a PD, a CQ and a connected RC QP."""
    clock = [0.0]
    a, b = Guest(fabric, clock=clock, **kw), Guest(fabric, gpa=0x4000_0000, clock=clock, **kw)
    pa, pb = a.alloc_pd(), b.alloc_pd()
    ca, cb = a.create_cq(64), b.create_cq(64)
    qa, qb = a.create_qp(pa, ca), b.create_qp(pb, cb)
    return a, b, pa, pb, ca, cb, qa, qb


def connect_pair(fabric, a, b, qa, qb, **kw):
    a.connect(qa, qb.qpn, gid=fabric.gid, **kw)
    b.connect(qb, qa.qpn, gid=fabric.gid, **kw)
