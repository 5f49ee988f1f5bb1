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

from dataclasses import dataclass

from verbs import Access, QpAttrMask as M, QpState, WcStatus, WrOpcode
from virtio.memory import GuestMemory, MemoryRegion
from virtio_rdma import wire
from virtio_rdma.constants import Cmd
from virtio_rdma.core import RdmaDeviceCore
from virtio_rdma.testing import (
    ALL_ACCESS as ALL,
    CoreDriver,
    DriverCq,
    DriverError,
    DriverQp,
    rc_connect_steps,
)

_MODIFY_CACHE: dict = {}

GuestError = DriverError
Cq = DriverCq
Qp = DriverQp


@dataclass
class Mr:
    gpa: int
    length: int
    lkey: int
    rkey: int
    access: int


class CoreGuest(CoreDriver):
    """One guest: memfd memory at ``gpa``, a device core on ``fabric``
    (:class:`virtio_rdma.testing.CoreDriver` drives it).

    ``writable`` lists the (gpa, length) ranges the device may legitimately
    write in this guest (CQ rings, MRs with LOCAL_WRITE or REMOTE_WRITE):
    everything else is canary for :class:`bench.fuzz.common.Canary`."""

    alloc_guard = 256

    def __init__(self, fabric, *, size: int = 4 << 20, gpa: int = 0x1000_0000, clock=None, limits=None):
        super().__init__(clock)
        self.region = MemoryRegion.memfd(size, gpa=gpa, name="vrdma-fuzz", hugetlb=False)
        self.mem = GuestMemory([self.region])
        self.view = self.region.view
        self.base, self.size = gpa, size
        self._brk = gpa + 4096           # a guard page before the first object
        self.core = RdmaDeviceCore(self.mem, fabric, limits=limits)
        self.fabric = fabric
        self.writable: list[tuple[int, int]] = []
        self.mrs: list[Mr] = []
        self.cqs: list[Cq] = []
        self.qps: list[Qp] = []
        self.pds: list[int] = []

    # ---- memory ------------------------------------------------------------
    def off(self, gpa: int) -> int:
        return gpa - self.base

    def allowed_offsets(self) -> list[tuple[int, int]]:
        return [(g - self.base, n) for g, n in self.writable]

    # ---- control -----------------------------------------------------------
    def raw(self, request: bytes) -> bytes:
        return self.core.handle_control(request, self.now)

    def alloc_pd(self) -> int:
        pdn = super().alloc_pd()
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
        cq = super().create_cq(depth)
        self.writable.append((cq.ring, depth * wire.CQE_SIZE))
        self.cqs.append(cq)
        return cq

    def create_qp(self, pdn: int, scq: Cq, rcq: Cq | None = None, **kw) -> Qp:
        qp = super().create_qp(pdn, scq, rcq, **kw)
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
        """RESET, then INIT, RTR and RTS to ``remote_qpn`` (from any state the fuzzer left)."""
        steps = ((M.STATE, dict(qp_state=QpState.RESET)),
                 *rc_connect_steps(remote_qpn, gid, access=access, timeout=timeout, retry_cnt=retry_cnt,
                                   rnr_retry=rnr_retry, sq_psn=sq_psn, rq_psn=rq_psn))
        for mask, attr in steps:
            st = self.modify(qp, mask, **attr)
            if st:
                raise GuestError(Cmd.MODIFY_QP, st)
        qp.sq_pi = qp.rq_pi = 0

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
