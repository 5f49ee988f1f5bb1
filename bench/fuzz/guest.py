"""An in-process guest for the fuzzers: one :class:`RdmaDeviceCore` over a
real memfd-backed :class:`virtio.memory.GuestMemory`, driven as the guest
driver would (docs/virtio-rdma.md): control commands as bytes, WQEs written
into its SQ/RQ rings, doorbell records and doorbellq buffers, CQEs polled by
owner bit.

Handles (PD, CQ, QP numbers, keys) are learned from the device's responses,
never assumed sequential. :func:`round_trip` is the liveness check every
target runs: two fresh guests connect RC QPs and SEND, RDMA WRITE and RDMA
READ, every byte verified.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.memory import GuestMemory, MemoryRegion
from virtio_rdma import wire
from verbs import Access, QpAttrMask as M, QpState, SendFlags, WcStatus, WrOpcode
from virtio_rdma.constants import Cmd, DoorbellKind, Status
from virtio_rdma.core import RdmaDeviceCore

ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC
_DBREC = struct.Struct("<II")
_MODIFY_CACHE: dict = {}


class GuestError(Exception):
    def __init__(self, cmd, status):
        super().__init__(f"{Cmd(cmd).name} failed: {Status(status).name}")
        self.status = status


@dataclass
class Cq:
    cqn: int
    depth: int
    ring: int
    dbrec: int
    ci: int = 0


@dataclass
class Qp:
    qpn: int
    layout: wire.WqLayout
    sq: int
    rq: int
    dbrec: int
    send_cq: Cq
    recv_cq: Cq
    sq_pi: int = 0
    rq_pi: int = 0


@dataclass
class Mr:
    gpa: int
    length: int
    lkey: int
    rkey: int
    access: int


class CoreGuest:
    """One guest: memfd memory at ``gpa``, a device core on ``fabric``.

    ``writable`` lists the (gpa, length) ranges the device may legitimately
    write in this guest (CQ rings, MRs with LOCAL_WRITE or REMOTE_WRITE):
    everything else is canary for :class:`bench.fuzz.common.Canary`."""

    def __init__(self, fabric, *, size: int = 4 << 20, gpa: int = 0x1000_0000, clock=None, limits=None):
        self.region = MemoryRegion.memfd(size, gpa=gpa, name="vrdma-fuzz", hugetlb=False)
        self.mem = GuestMemory([self.region])
        self.view = self.region.view
        self.base, self.size = gpa, size
        self._brk = gpa + 4096           # a guard page before the first object
        self.clock = clock if clock is not None else [0.0]
        self.core = RdmaDeviceCore(self.mem, fabric, limits=limits)
        self.fabric = fabric
        self.writable: list[tuple[int, int]] = []
        self.mrs: list[Mr] = []
        self.cqs: list[Cq] = []
        self.qps: list[Qp] = []
        self.pds: list[int] = []

    # ---- memory ------------------------------------------------------------
    def alloc(self, n: int, align: int = 64, guard: int = 256) -> int:
        """``n`` bytes, with ``guard`` untouched bytes after them (canary)."""
        g = (self._brk + align - 1) & ~(align - 1)
        if g + n + guard > self.base + self.size:
            raise MemoryError("fuzz guest out of memory")
        self._brk = g + n + guard
        return g

    def off(self, gpa: int) -> int:
        return gpa - self.base

    def write(self, gpa: int, data) -> None:
        o = gpa - self.base
        self.view[o:o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = gpa - self.base
        return bytes(self.view[o:o + n])

    def allowed_offsets(self) -> list[tuple[int, int]]:
        return [(g - self.base, n) for g, n in self.writable]

    @property
    def now(self) -> float:
        return self.clock[0]

    # ---- control -----------------------------------------------------------
    def raw(self, request: bytes) -> bytes:
        return self.core.handle_control(request, self.now)

    def cmd(self, cmd: Cmd, **fields) -> dict:
        resp = self.core.handle_control(wire.encode_request(cmd, **fields), self.now)
        status, body = wire.decode_response(cmd, resp)
        if status != Status.OK:
            raise GuestError(cmd, status)
        return body

    def alloc_pd(self) -> int:
        pdn = self.cmd(Cmd.ALLOC_PD)["pdn"]
        self.pds.append(pdn)
        return pdn

    def reg_mr(self, pdn: int, length: int, access=ALL) -> Mr:
        gpa = self.alloc(length, 4096, guard=4096)
        r = self.cmd(Cmd.REG_MR, pdn=pdn, access=int(access), iova=gpa, length=length, reserved=0,
                     chunks=[dict(gpa=gpa, length=length)])
        mr = Mr(gpa, length, r["lkey"], r["rkey"], int(access))
        self.mrs.append(mr)
        if access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE):
            self.writable.append((gpa, length))
        return mr

    def create_cq(self, depth: int = 64) -> Cq:
        ring = self.alloc(depth * wire.CQE_SIZE)
        db = self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_CQ, cqe=depth, comp_vector=0, ring_gpa=ring, dbrec_gpa=db)
        cq = Cq(r["cqn"], depth, ring, db)
        self.writable.append((ring, depth * wire.CQE_SIZE))
        self.cqs.append(cq)
        return cq

    def create_qp(self, pdn: int, scq: Cq, rcq: Cq | None = None, *, max_send_wr=16, max_recv_wr=16,
                  max_send_sge=4, max_recv_sge=4, max_inline_data=64) -> Qp:
        rcq = rcq or scq
        lay = wire.wq_layout(max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data)
        sq, rq, db = self.alloc(lay.sq_bytes), self.alloc(lay.rq_bytes), self.alloc(8, 8)
        r = self.cmd(Cmd.CREATE_QP, pdn=pdn, qp_type=2, send_cqn=scq.cqn, recv_cqn=rcq.cqn,
                     max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=max_send_sge,
                     max_recv_sge=max_recv_sge, max_inline_data=max_inline_data,
                     flags=0, sq_gpa=sq, rq_gpa=rq, dbrec_gpa=db)
        qp = Qp(r["qpn"], lay, sq, rq, db, scq, rcq)
        self.qps.append(qp)
        return qp

    def modify(self, qp: Qp, mask: int, **attr) -> int:
        """MODIFY_QP; the status (0 for OK). Encodings are cached: reconnecting
        is what the fuzzers do most after sending garbage."""
        key = (qp.qpn, int(mask), tuple(sorted(attr.items())))
        req = _MODIFY_CACHE.get(key)
        if req is None:
            req = wire.encode_request(Cmd.MODIFY_QP, qpn=qp.qpn, attr_mask=int(mask),
                                      attr=wire.qp_attr_defaults(**attr))
            if len(_MODIFY_CACHE) > 4096:
                _MODIFY_CACHE.clear()
            _MODIFY_CACHE[key] = req
        resp = self.core.handle_control(req, self.now)
        return int.from_bytes(resp[:4], "little")

    def qp_state(self, qp: Qp) -> QpState:
        r = self.cmd(Cmd.QUERY_QP, qpn=qp.qpn, attr_mask=0)
        return QpState(r["attr"]["qp_state"])

    def connect(self, qp: Qp, remote_qpn: int, gid: bytes, *, sq_psn=0, rq_psn=0, timeout=14,
                retry_cnt=7, rnr_retry=7, access=ALL) -> None:
        steps = (
            (M.STATE, dict(qp_state=QpState.RESET)),
            (M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS,
             dict(qp_state=QpState.INIT, port_num=1, qp_access_flags=int(access))),
            (M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER,
             dict(qp_state=QpState.RTR, dgid=gid, path_mtu=3, dest_qp_num=remote_qpn, rq_psn=rq_psn,
                  max_dest_rd_atomic=4, min_rnr_timer=1)),
            (M.STATE | M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.MAX_QP_RD_ATOMIC,
             dict(qp_state=QpState.RTS, sq_psn=sq_psn, timeout=timeout, retry_cnt=retry_cnt,
                  rnr_retry=rnr_retry, max_rd_atomic=4)),
        )
        for mask, attr in steps:
            st = self.modify(qp, mask, **attr)
            if st:
                raise GuestError(Cmd.MODIFY_QP, st)
        qp.sq_pi = qp.rq_pi = 0

    # ---- data path -----------------------------------------------------------
    def post_send(self, qp: Qp, wr_id: int, opcode, sges=(), **kw) -> None:
        slot = 1 << qp.layout.sq_wqe_shift
        data = wire.encode_send_wqe(wr_id, opcode, int(SendFlags.SIGNALED), sges=sges, slot_size=slot, **kw)
        self.write(qp.sq + (qp.sq_pi % qp.layout.sq_depth) * slot, data)
        qp.sq_pi = (qp.sq_pi + 1) & 0xFFFFFFFF
        self.write(qp.dbrec, _DBREC.pack(qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qp.qpn, qp.sq_pi), self.now)

    def post_recv(self, qp: Qp, wr_id: int, sges=()) -> None:
        slot = 1 << qp.layout.rq_wqe_shift
        self.write(qp.rq + (qp.rq_pi % qp.layout.rq_depth) * slot,
                   wire.encode_recv_wqe(wr_id, sges, slot_size=slot))
        qp.rq_pi = (qp.rq_pi + 1) & 0xFFFFFFFF
        self.write(qp.dbrec, _DBREC.pack(qp.sq_pi, qp.rq_pi))
        self.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qp.qpn, qp.rq_pi), self.now)

    def poll(self, cq: Cq, n: int = 1 << 30) -> list[wire.Completion]:
        out = []
        while len(out) < n:
            off = cq.ring + (cq.ci % cq.depth) * wire.CQE_SIZE
            c, owner = wire.decode_cqe(self.read(off, wire.CQE_SIZE))
            if owner != ((cq.ci // cq.depth) & 1) ^ 1:
                break
            out.append(c)
            cq.ci = (cq.ci + 1) & 0xFFFFFFFF
        self.write(cq.dbrec, _DBREC.pack(cq.ci, 0))
        return out

    def close(self) -> None:
        self.core.close()
        del self.view
        self.mem.close()


def setup_pair(a: CoreGuest, b: CoreGuest, *, mr_size: int = 64 << 10, depth: int = 64,
               gid_a: bytes | None = None, gid_b: bytes | None = None, psn_a: int = 0, psn_b: int = 0):
    """A PD, a CQ, an RC QP and an all-access MR in each guest; QPs connected
    to each other. ``gid_X`` is the GID of X's host (default: the fabric's)."""
    objs = []
    for g in (a, b):
        pd = g.alloc_pd()
        cq = g.create_cq(depth)
        qp = g.create_qp(pd, cq)
        mr = g.reg_mr(pd, mr_size)
        objs.append((pd, cq, qp, mr))
    (_, _, qa, _), (_, _, qb, _) = objs
    a.connect(qa, qb.qpn, gid_b or b.fabric.gid, sq_psn=psn_a, rq_psn=psn_b)
    b.connect(qb, qa.qpn, gid_a or a.fabric.gid, sq_psn=psn_b, rq_psn=psn_a)
    return objs


def round_trip(a: CoreGuest, b: CoreGuest, objs, pump=None, tag: int = 0) -> None:
    """SEND, RDMA WRITE and RDMA READ from a to b with data verified; raises
    AssertionError naming what went wrong. ``pump(until)`` drives a network
    fabric until ``until()`` holds (None: the local fabric is synchronous)."""
    (_, ca, qa, ma), (_, cb, qb, mb) = objs
    pattern = bytes((tag + i * 7) & 0xFF for i in range(512))

    def wait(g, cq, n=1):
        got = []

        def done():
            got.extend(g.poll(cq, n - len(got)))
            return len(got) >= n
        if pump is None:
            done()
        else:
            pump(done)
        assert len(got) == n, f"{len(got)} of {n} completions"
        for c in got:
            assert c.status == WcStatus.SUCCESS, f"completion {c}"
        return got

    a.write(ma.gpa, pattern)
    b.post_recv(qb, 1, [(mb.gpa, 512, mb.lkey)])
    a.post_send(qa, 2, WrOpcode.SEND, [(ma.gpa, 512, ma.lkey)])
    wait(a, ca)
    wait(b, cb)
    assert b.read(mb.gpa, 512) == pattern, "SEND payload differs"
    a.write(ma.gpa + 1024, pattern[::-1])
    a.post_send(qa, 3, WrOpcode.RDMA_WRITE, [(ma.gpa + 1024, 512, ma.lkey)],
                remote_addr=mb.gpa + 2048, rkey=mb.rkey)
    wait(a, ca)
    assert b.read(mb.gpa + 2048, 512) == pattern[::-1], "RDMA WRITE payload differs"
    b.write(mb.gpa + 4096, pattern[1:] + b"!")
    a.post_send(qa, 4, WrOpcode.RDMA_READ, [(ma.gpa + 8192, 512, ma.lkey)],
                remote_addr=mb.gpa + 4096, rkey=mb.rkey)
    wait(a, ca)
    assert a.read(ma.gpa + 8192, 512) == pattern[1:] + b"!", "RDMA READ payload differs"
