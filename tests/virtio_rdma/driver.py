"""A small driver-side helper for the device tests: it plays the guest driver
(what guest_lib will become). It keeps its rings in a real
``virtio.memory.GuestMemory`` (bytearray-backed region), writes WQEs into the
SQ/RQ rings, rings doorbells and polls CQEs by owner bit, exactly as
docs/virtio-rdma.md prescribes (:class:`virtio_rdma.testing.CoreDriver`, which
the fuzzers' guest drives too); this one adds accelerator queues, events, and
SGEs given as (Buf, offset, length).
"""
from __future__ import annotations

import contextlib
import random
import types
from dataclasses import dataclass

from verbs import Access
from virtio.memory import GuestMemory, MemoryRegion
from virtio_rdma import wire
from virtio_rdma.constants import AQ_SLOT_SIZE, Cmd, DoorbellKind, Status
from virtio_rdma.core import RdmaDeviceCore
from virtio_rdma.testing import DBREC, CoreDriver, DriverCq, DriverError, DriverQp, rc_connect_steps


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


DCq = DriverCq
DQp = DriverQp


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


class Guest(CoreDriver):
    def __init__(self, fabric, size: int = 8 << 20, gpa: int = 0x1000_0000, limits=None, clock=None,
                 accel=None, account=None):
        super().__init__(clock)
        self.buf = bytearray(size)
        self.view = self.buf
        self.region = MemoryRegion.from_buffer(self.buf, gpa=gpa)
        self.mem = GuestMemory([self.region])
        self.base = gpa
        self.size = size
        self._brk = gpa
        self.core = RdmaDeviceCore(self.mem, fabric, limits=limits, accel_router=accel, account=account)
        self.events: list[wire.Event] = []

    # ---- control -----------------------------------------------------
    def raw(self, request: bytes) -> tuple[Status, bytes]:
        resp = self.core.handle_control(request, self.now)
        return Status(int.from_bytes(resp[:4], "little")), resp

    def status_of(self, cmd: Cmd, **fields) -> Status:
        try:
            self.cmd(cmd, **fields)
        except DriverError as e:
            return e.status
        return Status.OK

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

    def modify(self, qp: DQp, mask: int, **attr) -> Status:
        return self.status_of(Cmd.MODIFY_QP, qpn=qp.qpn, attr_mask=int(mask),
                              attr=wire.qp_attr_defaults(**attr))

    def connect(self, qp: DQp, remote_qpn: int, *, gid: bytes, **kw) -> None:
        """INIT, RTR and RTS to ``remote_qpn`` (``kw``: rc_connect_steps'), each asserted OK."""
        for mask, attr in rc_connect_steps(remote_qpn, gid, **kw):
            st = self.modify(qp, mask, **attr)
            assert st == Status.OK, st

    # ---- data path -----------------------------------------------------
    def sges(self, sges):
        """(Buf, offset, length) triples as (address, length, lkey); others as given."""
        return [(b.addr + o, n, b.lkey) for b, o, n in sges] if sges and isinstance(sges[0][0], Buf) else sges

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
        self.write(aq.dbrec, DBREC.pack(pi, 0))
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


@contextlib.asynccontextmanager
async def loopback_fabrics(a_ip: str, b_ip: str, port: int):
    """Two :class:`fabric.roce.RoceFabric` s, each served by its
    :class:`~fabric.roce.RoceFabricService` on a real loopback UDP socket
    (``a_ip`` and ``b_ip``, both on ``port``): yields ``(fa, fb, sa, sb)``;
    B's service closes first, then A's."""
    from fabric.roce import RoceFabric, RoceFabricService

    fa, fb = RoceFabric(a_ip, port=port), RoceFabric(b_ip, port=port)
    sa, sb = RoceFabricService(fa), RoceFabricService(fb)
    await sa.start()
    try:
        await sb.start()
        try:
            yield fa, fb, sa, sb
        finally:
            await sb.aclose()
    finally:
        await sa.aclose()


def fabric_sides(fa, fb, *, size: int, cq: int, mr: int, dbrec_poll: bool = False, **qp_kw) -> list:
    """A guest of each fabric (B's memory at another GPA), each with a PD, a
    CQ of ``cq`` entries, a QP (``qp_kw``: its create_qp limits) and an MR of
    ``mr`` bytes: ``[[guest, qp, cq, mr], [...]]``, not yet connected.
    ``dbrec_poll``: the device scans doorbell records (DBREC_POLL, as a daemon
    under ``--poll-us``)."""
    sides = []
    for g in (Guest(fa, size=size), Guest(fb, size=size, gpa=0x4000_0000)):
        g.core.poll_doorbell_records = dbrec_poll
        pd = g.alloc_pd()
        c = g.create_cq(cq)
        sides.append([g, g.create_qp(pd, c, **qp_kw), c, g.reg_mr(pd, mr)])
    return sides


@contextlib.contextmanager
def wire_native(on: bool):
    """The native wire paths (``virtio_rdma._datapath.wire_enabled``) on or
    off for the block, as they were after it."""
    from virtio_rdma import _datapath

    prev = _datapath.wire_enabled
    _datapath.wire_enabled = on
    try:
        yield
    finally:
        _datapath.wire_enabled = prev
