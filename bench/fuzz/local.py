"""The in-process targets: ``control`` and ``rings``.

Both drive :class:`~virtio_rdma.core.RdmaDeviceCore` instances sharing one
:class:`~fabric.local.LocalFabric`, each over real memfd-backed guest
memory (:mod:`bench.fuzz.guest`), which is the deepest level that reaches the
device model at tens of thousands of inputs per second (the vhost-user and
virtqueue layers in front of it carry the same bytes unchanged and are
fuzzed by the ``vhost-user`` target).

The cast of every run:

* a **victim** pair (V1 <-> V2, connected RC QPs, all-access MRs, random
  PSNs) that stays idle: every byte of both guests' memory is canary, their
  objects and QP states must not change, and at the end their QPs must still
  carry a verified round trip;
* an **attacker** A whose inputs are fuzzed, knowing every victim handle
  (PD, CQ, QP numbers, lkeys, rkeys, addresses, the victim's expected PSN),
  learned from the victim's device responses;
* for ``rings``, an **accomplice** B connected to A (so A's WQEs reach a
  real responder), and a hijack QP of A connected to the victim's QPN;
* every ``live_every`` inputs and at the end, two **fresh** guests connect
  and run SEND / RDMA WRITE / RDMA READ with data verified.
"""
from __future__ import annotations

import random
import struct
import time

from virtio_rdma import wire
from verbs import Access, QpState
from virtio_rdma.constants import Cmd, DoorbellKind
from virtio_rdma.errors import UnknownValueError, VirtioRdmaError
from fabric.local import LocalFabric

from .common import Canary, Hang, Report, Watchdog, check_canaries, fd_count, maps_count
from .guest import CoreGuest, round_trip, setup_pair

U32 = 0xFFFFFFFF
_SEND_HDR = struct.Struct("<QBBHIQIIQQ16s")
_RECV_HDR = struct.Struct("<QHHI")
_SGE = struct.Struct("<QII")
_DB = struct.Struct("<II")

VICTIM_GPA = (0x4000_0000, 0x5000_0000)
ATTACKER_GPA, ACCOMPLICE_GPA, FRESH_GPA = 0x1000_0000, 0x2000_0000, (0x6000_0000, 0x7000_0000)


class Victim:
    """The idle victim pair and everything an attacker could learn about it."""

    def __init__(self, fabric, rng: random.Random, clock):
        self.psn = (rng.getrandbits(24), rng.getrandbits(24))
        self.g = (CoreGuest(fabric, gpa=VICTIM_GPA[0], clock=clock),
                  CoreGuest(fabric, gpa=VICTIM_GPA[1], clock=clock))
        self.objs = setup_pair(*self.g, psn_a=self.psn[0], psn_b=self.psn[1])
        # a read-only MR too: its bytes must never change, even through its own rkey
        self.ro = [g.reg_mr(g.pds[0], 8192, Access.REMOTE_READ) for g in self.g]
        self.canaries = [Canary(g.view, (), f"victim V{i + 1}") for i, g in enumerate(self.g)]

    def handles(self) -> dict:
        h = dict(pdn=set(), cqn=set(), qpn=set(), lkey=set(), rkey=set(), addr=set())
        for g in self.g:
            h["pdn"].update(g.pds)
            h["cqn"].update(c.cqn for c in g.cqs)
            h["qpn"].update(q.qpn for q in g.qps)
            for m in g.mrs:
                h["lkey"].add(m.lkey)
                h["rkey"].add(m.rkey)
                h["addr"].update((m.gpa, m.gpa + m.length - 8, m.gpa + m.length))
        return {k: sorted(v) for k, v in h.items()}

    def snapshot(self):
        """The victim's objects as its own device reports them."""
        out = []
        for g in self.g:
            c = g.core
            out.append((sorted(c.pds), sorted(c.cqs), sorted(c.qps), c.mrs.count,
                        tuple(g.qp_state(q) for q in g.qps)))
        return out

    def round_trip(self, tag: int) -> None:
        round_trip(*self.g, self.objs, tag=tag)

    def reconnect(self) -> None:
        (_, _, q1, _), (_, _, q2, _) = self.objs
        g1, g2 = self.g
        g1.connect(q1, q2.qpn, g2.fabric.gid, sq_psn=self.psn[0], rq_psn=self.psn[1])
        g2.connect(q2, q1.qpn, g1.fabric.gid, sq_psn=self.psn[1], rq_psn=self.psn[0])

    def close(self) -> None:
        for g in self.g:
            g.close()


def fresh_round_trip(fabric, clock, tag: int) -> None:
    a = CoreGuest(fabric, gpa=FRESH_GPA[0], clock=clock)
    b = CoreGuest(fabric, gpa=FRESH_GPA[1], clock=clock)
    try:
        round_trip(a, b, setup_pair(a, b), tag=tag)
    finally:
        a.close()
        b.close()


def _values(rng: random.Random, pool: list, width_bits: int):
    """A value for a handle field: from the pool most of the time, else a boundary or random."""
    r = rng.random()
    if pool and r < 0.6:
        return rng.choice(pool)
    if r < 0.8:
        return rng.choice((0, 1, 2, 0xFF, 0x100, 0xFFFFFF, 0x1000000, (1 << width_bits) - 1,
                           (1 << (width_bits - 1))))
    return rng.getrandbits(width_bits)


class _Run:
    """Shared skeleton: baseline, watchdog, periodic checks, final report."""

    name = ""

    def __init__(self, seed: int, *, live_every: int = 20000, check_every: int = 1000,
                 bound_s: float = 10.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report(self.name, seed)
        self.live_every, self.check_every, self.bound = live_every, check_every, bound_s
        self.clock = [0.0]
        self.fabric = LocalFabric()
        self._internal: dict[int, int] = {}
        self.victim_qp_kills = 0

    def _checks(self, i: int) -> None:
        self._victim_checks(i)
        self.extra_checks(i)
        self.internal_errors(i)

    def _victim_checks(self, i: int) -> None:
        rep = self.report
        check_canaries(rep, self.victim.canaries, i)
        snap = self.victim.snapshot()
        if snap != self.victim_snapshot:
            rep.fail(i, f"victim objects changed: {self.victim_snapshot} -> {snap}")
            self.victim_snapshot = snap

    def internal_errors(self, i: int) -> None:
        """The core catches what escapes a handler and counts it: each one is a crash."""
        for g in self.guests():
            n = g.core.metrics.internal_errors
            seen = self._internal.get(id(g), 0)
            if n > seen:
                self.report.crashes += n - seen
                self.report.fail(i, f"{n - seen} internal errors in the device core of {g.base:#x}")
                self._internal[id(g)] = n

    def guests(self) -> list:
        return list(self.victim.g)

    def extra_checks(self, i: int) -> None:
        pass

    def _live(self, i: int) -> None:
        try:
            fresh_round_trip(self.fabric, self.clock, i & 0xFF)
            self.report.liveness_checks += 1
        except Exception as e:  # noqa: BLE001 - a finding, reported with the index
            self.report.fail(i, f"fresh guest round trip failed: {e!r}")

    def run(self, count: int, progress=None) -> Report:
        rep = self.report
        fd0, maps0 = fd_count(), maps_count()
        self.victim = Victim(self.fabric, self.rng, self.clock)
        self.vh = self.victim.handles()
        self.victim_snapshot = self.victim.snapshot()
        self.setup()
        vqps = [g.core.qps[q.qpn] for g in self.victim.g for q in g.qps]
        vstates = tuple(qp.state for qp in vqps)
        t0 = time.perf_counter()
        with Watchdog(self.bound, rep) as wd:
            for i in range(count):
                wd.arm()
                try:
                    self.one(i)
                except Hang:
                    rep.hangs += 1
                    rep.fail(i, f"input took more than {self.bound} s")
                    self.recover()
                except Exception as e:  # noqa: BLE001 - the core must never raise
                    rep.crashes += 1
                    rep.fail(i, f"exception escaped the core: {e!r}")
                    self.recover()
                finally:
                    wd.disarm(i)
                rep.count += 1
                states = tuple(qp.state for qp in vqps)
                if states != vstates:       # cheap, every input: the exact index of a killed victim QP
                    self.victim_qp_kills += 1
                    rep.fail(i, f"victim QP states {[s.name for s in vstates]} -> {[s.name for s in states]}")
                    # the victim does what an application does: reconnects its QPs (same PSNs), and the
                    # attack goes on against live QPs
                    self.victim.reconnect()
                    states = tuple(qp.state for qp in vqps)
                    vstates = states
                if (i + 1) % self.check_every == 0:
                    self._checks(i)
                if (i + 1) % self.live_every == 0:
                    self._live(i)
                    if progress:
                        progress(rep, time.perf_counter() - t0)
        rep.seconds = time.perf_counter() - t0
        last = count - 1
        self._checks(last)
        self._live(last)
        self.teardown()
        self._victim_checks(last)
        try:
            self.victim.round_trip(0x5A)      # the victim's own QPs still work
        except Exception as e:  # noqa: BLE001
            rep.fail(last, f"victim round trip failed after the run: {e!r}")
        self.victim.close()
        rep.fd_delta = fd_count() - fd0
        rep.maps_delta = maps_count() - maps0
        if rep.fd_delta or rep.maps_delta:
            rep.fail(last, f"fd delta {rep.fd_delta}, maps delta {rep.maps_delta} after closing every guest")
        rep.counters = self.counters()
        return rep

    # target hooks
    def setup(self) -> None: ...
    def one(self, i: int) -> None: ...
    def recover(self) -> None: ...
    def teardown(self) -> None: ...
    def counters(self) -> dict:
        return {}


# ---------------------------------------------------------------------------
# control
# ---------------------------------------------------------------------------
_CMD_FIELDS = {
    Cmd.QUERY_PORT: dict(port_num=("port", 32)),
    Cmd.QUERY_GID: dict(port_num=("port", 32), index=("small", 32)),
    Cmd.DEALLOC_PD: dict(pdn=("pdn", 32)),
    Cmd.CREATE_CQ: dict(cqe=("depth", 32), comp_vector=("small", 32), ring_gpa=("addr", 64),
                        dbrec_gpa=("addr", 64)),
    Cmd.DESTROY_CQ: dict(cqn=("cqn", 32)),
    Cmd.REQ_NOTIFY_CQ: dict(cqn=("cqn", 32), flags=("small", 32)),
    Cmd.DEREG_MR: dict(lkey=("lkey", 32)),
    Cmd.CREATE_QP: dict(pdn=("pdn", 32), qp_type=("small", 32), send_cqn=("cqn", 32), recv_cqn=("cqn", 32),
                        max_send_wr=("depth", 32), max_recv_wr=("depth", 32), max_send_sge=("small", 32),
                        max_recv_sge=("small", 32), max_inline_data=("depth", 32), flags=("small", 32),
                        sq_gpa=("addr", 64), rq_gpa=("addr", 64), dbrec_gpa=("addr", 64)),
    Cmd.QUERY_QP: dict(qpn=("qpn", 32), attr_mask=("mask", 32)),
    Cmd.DESTROY_QP: dict(qpn=("qpn", 32)),
}
_ALL_CMDS = list(Cmd)
_HDR = struct.Struct("<HHI")
_I, _Q = struct.Struct("<I"), struct.Struct("<Q")
#: struct virtio_rdma_qp_attr (docs/virtio-rdma.md; wire.QpAttrLayout): 16 u8, 2 u16, 6 u32, gid, 5 u32
_QP_ATTR = struct.Struct("<16BHHIIIIII16sIIIII")
assert _QP_ATTR.size == wire.QP_ATTR_SIZE


def encode_reg_mr(pdn: int, access: int, iova: int, length: int, chunks) -> bytes:
    """A REG_MR body with struct (as wire.LAYOUTS[wire.RegMrReq] lays it out), for speed."""
    return struct.pack("<IIQQII", pdn, access, iova, length, len(chunks), 0) + b"".join(
        struct.pack("<QQ", g, n) for g, n in chunks)


_CREATES = {Cmd.ALLOC_PD: ("pdn",), Cmd.CREATE_CQ: ("cqn",), Cmd.REG_MR: ("lkey", "rkey"),
            Cmd.CREATE_QP: ("qpn",)}


class ControlTarget(_Run):
    """Hostile control commands from the attacker's device: random commands,
    mutated valid ones, random bytes; handle fields drawn from the victim's
    live handles, the attacker's own and boundary values."""

    name = "control"
    RESET_EVERY = 3000   # the attacker's device is closed and a new one opened

    def setup(self) -> None:
        self._new_attacker()
        self.statuses: dict[int, int] = {}

    def _new_attacker(self) -> None:
        self.a = CoreGuest(self.fabric, gpa=ATTACKER_GPA, clock=self.clock)
        pd = self.a.alloc_pd()
        cq = self.a.create_cq(16)
        self.a.create_qp(pd, cq)
        self.a.reg_mr(pd, 8192)
        self.own = dict(pdn=list(self.a.pds), cqn=[c.cqn for c in self.a.cqs],
                        qpn=[q.qpn for q in self.a.qps], lkey=[m.lkey for m in self.a.mrs],
                        rkey=[m.rkey for m in self.a.mrs])
        base = self.a.base
        self.own_addr = [base, base + 4096, base + self.a.size - 64, base + self.a.size]

    def guests(self) -> list:
        return [*self.victim.g, self.a]

    def recover(self) -> None:
        self.internal_errors(self.report.count)
        self._internal.pop(id(self.a), None)
        self.a.close()
        self._new_attacker()

    def teardown(self) -> None:
        self.internal_errors(self.report.count - 1)
        self.a.close()
        self.a = None

    def _field(self, kind: str, bits: int):
        rng = self.rng
        if kind in ("pdn", "cqn", "qpn", "lkey"):
            pool = self.vh[kind] + self.own[kind]
            if kind == "lkey":
                pool = pool + self.vh["rkey"]
            return _values(rng, pool, bits)
        if kind == "addr":
            return _values(rng, self.vh["addr"] + self.own_addr, bits)
        if kind == "depth":
            return rng.choice((0, 1, 2, 15, 16, 17, 64, 4096, 4097, 65536, 65537, 1 << 31, U32,
                               rng.getrandbits(bits)))
        if kind == "port":
            return rng.choice((0, 1, 1, 2, U32))
        if kind == "mask":
            return rng.getrandbits(bits)
        return rng.choice((0, 1, 2, 3, rng.getrandbits(4), rng.getrandbits(bits)))

    def _valid_like(self) -> bytes:
        rng = self.rng
        cmd = rng.choice(_ALL_CMDS)
        hdr_flags = 0 if rng.random() < 0.95 else rng.getrandbits(16)
        if cmd == Cmd.REG_MR:
            n = rng.choice((0, 1, 1, 2, 3, 16))
            chunks = [(self._field("addr", 64), rng.choice((0, 1, 8, 4096, 8192, 1 << 20, 1 << 40,
                                                             rng.getrandbits(64)))) for _ in range(n)]
            body = encode_reg_mr(self._field("pdn", 32), rng.getrandbits(rng.choice((4, 8, 32))),
                                 self._field("addr", 64),
                                 rng.choice((0, 8, 4096, 8192, rng.getrandbits(64))), chunks)
        elif cmd == Cmd.MODIFY_QP:
            u8 = [rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 255)), rng.getrandbits(3),
                  rng.choice((0, 1, 3, 5, 6, 255)), 0, rng.getrandbits(8), rng.getrandbits(4),
                  rng.getrandbits(4), rng.getrandbits(5), rng.getrandbits(8), rng.getrandbits(8),
                  rng.choice((0, 1, 2)), 0, 0, 0, 0, 0]
            if rng.random() < 0.2:
                u8 = [rng.getrandbits(8) for _ in range(16)]
            attr = _QP_ATTR.pack(*u8, 0, 0, 0, rng.getrandbits(32), rng.getrandbits(32),
                                 self._field("qpn", 32), rng.getrandbits(5), 0,
                                 rng.choice((self.fabric.gid, bytes(16), rng.randbytes(16))),
                                 self._field("depth", 32), self._field("depth", 32), rng.choice((0, 1, 4, 64)),
                                 rng.choice((0, 1, 4, 64)), rng.choice((0, 64, 1 << 20)))
            body = struct.pack("<II", self._field("qpn", 32), rng.getrandbits(rng.choice((8, 21, 32)))) + attr
        else:
            fields = _CMD_FIELDS.get(cmd, {})
            body = b"".join((_Q if bits == 64 else _I).pack(self._field(kind, bits))
                            for kind, bits in fields.values())
        return _HDR.pack(cmd, hdr_flags, len(body)) + body

    def _mutate(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(7)
            if op == 0 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 1 and b:
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            elif op == 2:
                del b[rng.randrange(len(b) + 1):]
            elif op == 3:
                b += rng.randbytes(rng.choice((1, 4, 8, 16, 64)))
            elif op == 4 and len(b) >= 8:      # header length lies
                struct.pack_into("<I", b, 4, rng.choice((0, len(b), len(b) - 8, len(b) + 8, U32,
                                                          rng.getrandbits(32))))
            elif op == 5 and len(b) >= 2:      # another command code
                struct.pack_into("<H", b, 0, rng.choice((0, 15, 16, 255, 0xFFFF, rng.getrandbits(16))))
            elif op == 6 and len(b) >= 12:     # a victim handle in the first body word
                struct.pack_into("<I", b, 8, rng.choice(self.vh["qpn"] + self.vh["cqn"] + self.vh["lkey"]))
        return bytes(b)

    def one(self, i: int) -> None:
        rng = self.rng
        if i and i % self.RESET_EVERY == 0:
            self.recover()
        r = rng.random()
        if r < 0.55:
            req = self._valid_like()
        elif r < 0.9:
            req = self._mutate(self._valid_like())
        else:
            req = rng.randbytes(rng.choice((0, 1, 4, 7, 8, 12, 16, 64, 200)))
        resp = self.a.raw(req)
        if not isinstance(resp, (bytes, bytearray)) or len(resp) < 4:
            raise AssertionError(f"malformed response {resp!r} to {req.hex()}")
        status = int.from_bytes(resp[:4], "little")
        self.statuses[status] = self.statuses.get(status, 0) + 1
        rep = self.report
        if status:
            rep.rejected += 1
            return
        rep.accepted += 1
        cmd = int.from_bytes(req[:2], "little")
        names = _CREATES.get(cmd)
        if names:
            try:
                _, body = wire.decode_response(cmd, resp)
            except Exception as e:  # noqa: BLE001 - the device's own response must decode
                raise AssertionError(f"OK response to {Cmd(cmd).name} does not decode: {e}") from None
            for n in names:
                if len(self.own[n]) < 64:
                    self.own[n].append(body[n])

    def counters(self) -> dict:
        return {"statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "attacker_devices": self.report.count // self.RESET_EVERY + 1}


# ---------------------------------------------------------------------------
# rings
# ---------------------------------------------------------------------------
class RingsTarget(_Run):
    """Garbage in the attacker's send/receive WQE rings, CQ rings, doorbell
    records and doorbellq buffers, on a live QP pair (A <-> accomplice B) and
    on a hijack QP of A connected to the victim's QPN with the victim's
    expected PSN. SGEs and remote addresses/keys come from A's, B's and the
    victim's MRs, boundaries and random values."""

    name = "rings"
    RECONNECT_EVERY = 1024     # and whenever a QP left RTS (checked every 32 inputs)

    def __init__(self, seed: int, *, hijack: bool = True, **kw):
        super().__init__(seed, **kw)
        self.hijack = hijack

    NEW_PAIR_EVERY = 5000      # and whenever a CQ overflowed (it stays broken, as on hardware)

    def setup(self) -> None:
        self.reconnects = self.pairs = 0
        self.plausible = False
        self.totals: dict[str, dict[str, int]] = {"attacker": {}, "accomplice": {}}
        self._new_pair()

    def _retire_pair(self, i: int) -> None:
        """Check the pair's canaries and internal errors, keep its counters, close it."""
        self.extra_checks(i)
        self.internal_errors(i)
        for nm, g in (("attacker", self.a), ("accomplice", self.b)):
            t = self.totals[nm]
            for k, v in g.core.metrics.as_dict().items():
                if v:
                    t[k] = t.get(k, 0) + v
            self._internal.pop(id(g), None)
            g.close()

    def _new_pair(self) -> None:
        self.pairs += 1
        clock = self.clock
        self.a = CoreGuest(self.fabric, gpa=ATTACKER_GPA, clock=clock)
        self.b = CoreGuest(self.fabric, gpa=ACCOMPLICE_GPA, clock=clock)
        (pa, ca, qa, ma), (pb, cb, qb, mb) = setup_pair(self.a, self.b)
        self.qa, self.qb, self.ca, self.cb = qa, qb, ca, cb
        self.ma_ro = self.a.reg_mr(pa, 8192, Access.REMOTE_READ)       # no LOCAL_WRITE: canary
        self.mb_ro = self.b.reg_mr(pb, 8192, Access.REMOTE_READ)       # no REMOTE_WRITE: canary
        self.mb_w = self.b.reg_mr(pb, 8192, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        # a hijack QP: A's second QP aimed at the victim's second QP with its expected PSN
        self.hijack_buf = ma
        self.ch = self.a.create_cq(64)
        self.qh = self.a.create_qp(pa, self.ch)
        v2qp = self.victim.g[1].qps[0]
        self.hijack_target = v2qp.qpn
        self.a.connect(self.qh, v2qp.qpn, self.fabric.gid, sq_psn=self.victim.psn[0])
        self.qps = [(self.a, qa, self.qb.qpn, 0, 0), (self.b, qb, qa.qpn, 0, 0)]
        if self.hijack:
            self.qps.append((self.a, self.qh, v2qp.qpn, self.victim.psn[0], 0))
        else:       # the hijack QP stays in RTS, idle
            self.a.qps.remove(self.qh)
        # A's and B's rings and dbrecs are theirs to write (the fuzzer does)
        for g in (self.a, self.b):
            for q in g.qps:
                g.writable += [(q.sq, q.layout.sq_bytes), (q.rq, q.layout.rq_bytes), (q.dbrec, 8)]
            for c in g.cqs:
                g.writable.append((c.dbrec, 8))
        self.canaries = [Canary(g.view, g.allowed_offsets(), nm) for g, nm in ((self.a, "attacker"),
                                                                               (self.b, "accomplice"))]
        mrs = self.a.mrs + self.b.mrs + [m for g in self.victim.g for m in g.mrs]
        self.keys = sorted({m.lkey for m in mrs} | {m.rkey for m in mrs})
        self.addrs = sorted({x for m in mrs for x in (m.gpa, m.gpa + 8, m.gpa + m.length - 8, m.gpa + m.length,
                                                      m.gpa - 8)})
        self.nums = sorted({q.qpn for g in (self.a, self.b, *self.victim.g) for q in g.qps}
                           | {c.cqn for g in (self.a, self.b, *self.victim.g) for c in g.cqs})
        self.peer_mrs = self.a.mrs + self.b.mrs + [m for v in self.victim.g for m in v.mrs]
        self._pick = (0, 0, 1, 2, 2) if self.hijack else (0, 0, 1)

    def extra_checks(self, i: int) -> None:
        check_canaries(self.report, self.canaries, i)

    def _reconnect(self) -> None:
        self.reconnects += 1
        for g, q, dest, sq_psn, rq_psn in self.qps:
            g.connect(q, dest, self.fabric.gid, sq_psn=sq_psn, rq_psn=rq_psn)

    def recover(self) -> None:
        try:
            self._reconnect()
        except Exception as e:  # noqa: BLE001
            self.report.fail(-1, f"reconnect after a finding failed: {e!r}")

    def guests(self) -> list:
        return [*self.victim.g, self.a, self.b]

    def teardown(self) -> None:
        self._retire_pair(self.report.count - 1)

    # ---- input generators ---------------------------------------------------
    def _len(self) -> int:
        return self.rng.choice((0, 1, 7, 8, 64, 512, 4096, 8192, 65536, 65537, 1 << 31, U32,
                                self.rng.getrandbits(32)))

    def _sge(self, buf, off) -> None:
        rng = self.rng
        addr = rng.choice(self.addrs) + rng.choice((0, 0, 1, -1, 64)) if rng.random() < 0.8 else rng.getrandbits(64)
        _SGE.pack_into(buf, off, addr & (2 ** 64 - 1), self._len(),
                       rng.choice(self.keys) if rng.random() < 0.8 else rng.getrandbits(32))

    def _plausible_wqe(self, slot: int, g) -> bytearray:
        """A WQE a correct driver could post, at the edges: own MR for the SGE,
        a peer MR (or a victim's) for the remote side, lengths near bounds."""
        rng = self.rng
        b = bytearray(slot)
        own = rng.choice(g.mrs)
        peer = rng.choice(self.peer_mrs)
        opcode = rng.choice((0, 0, 1, 2, 2, 3, 4, 4, 5, 6))
        n = 8 if opcode in (5, 6) else rng.choice((0, 1, 8, 64, 512, 4096, own.length))
        loff = rng.choice((0, 8, own.length - n, own.length - n + 1)) if n <= own.length else 0
        roff = rng.choice((0, 8, peer.length - n, peer.length - n + 8, -8))
        _SEND_HDR.pack_into(b, 0, rng.getrandbits(64), opcode, rng.choice((2, 2, 0, 6, 3)), 1,
                            rng.getrandbits(32), (peer.gpa + roff) & (2 ** 64 - 1),
                            peer.rkey if rng.random() < 0.9 else rng.choice(self.keys), 0,
                            rng.getrandbits(64), rng.getrandbits(64), bytes(16))
        _SGE.pack_into(b, 64, (own.gpa + loff) & (2 ** 64 - 1), n,
                       own.lkey if rng.random() < 0.95 else rng.choice(self.keys))
        return b

    def _send_wqe(self, slot: int) -> bytearray:
        rng = self.rng
        b = bytearray(slot)
        nsge = rng.choice((0, 1, 1, 2, 4, 5, 16, 0xFFFF))
        flags = rng.getrandbits(8) if rng.random() < 0.3 else rng.choice((0, 2, 8, 10))
        inline_len = rng.choice((0, 0, 8, 64, slot, U32)) if flags & 8 else 0
        opcode = rng.randrange(12) if rng.random() < 0.9 else rng.getrandbits(8)
        raddr = rng.choice(self.addrs) if rng.random() < 0.8 else rng.getrandbits(64)
        _SEND_HDR.pack_into(b, 0, rng.getrandbits(64), opcode, flags, nsge, rng.getrandbits(32), raddr,
                            rng.choice(self.keys) if rng.random() < 0.8 else rng.getrandbits(32),
                            inline_len, rng.getrandbits(64), rng.getrandbits(64),
                            bytes(16) if rng.random() < 0.9 else rng.randbytes(16))
        off = 64
        for _ in range(min(nsge, (slot - 64) // 16)):
            self._sge(b, off)
            off += 16
        if inline_len and rng.random() < 0.5:
            b[64:] = rng.randbytes(slot - 64)
        return b

    def _recv_wqe(self, slot: int) -> bytearray:
        rng = self.rng
        b = bytearray(slot)
        nsge = rng.choice((0, 1, 1, 2, 4, 5, 0xFFFF))
        _RECV_HDR.pack_into(b, 0, rng.getrandbits(64), nsge, 0 if rng.random() < 0.9 else rng.getrandbits(16), 0)
        off = 16
        for _ in range(min(nsge, (slot - 16) // 16)):
            self._sge(b, off)
            off += 16
        return b

    def _index(self, pi: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return (pi + rng.choice((1, 1, 1, 2, 3))) & U32
        if r < 0.8:
            return (pi + rng.choice((0, -1, 17, 64, 65, 1 << 16, 1 << 31))) & U32
        return rng.getrandbits(32)

    def one(self, i: int) -> None:
        rng = self.rng
        if i and (i % self.NEW_PAIR_EVERY == 0 or (i % 32 == 0 and (
                self.a.core.metrics.cq_overflows or self.b.core.metrics.cq_overflows))):
            self._retire_pair(i)
            self._new_pair()
        if i % self.RECONNECT_EVERY == 0 or (i % 32 == 0 and any(
                g.core.qps[q.qpn].state != QpState.RTS for g, q, *_ in self.qps)):
            self._reconnect()
        if i % 256 == 0:
            self.plausible = rng.random() < 0.5
        g, q, _, _, _ = self.qps[rng.choice(self._pick)]
        kind = rng.random()
        now = self.clock[0]
        if self.plausible and q is not self.qh:
            # an epoch of work requests a correct driver could post, at the edges of every bound;
            # the QPs live long enough for requests to flow
            if i % 8 == 0 and any(gg.core.qps[qq.qpn].state != QpState.RTS for gg, qq, *_ in self.qps[:2]):
                self._reconnect()
            slot = 1 << q.layout.sq_wqe_shift
            if kind < 0.7:
                g.write(q.sq + (q.sq_pi % q.layout.sq_depth) * slot, self._plausible_wqe(slot, g))
                q.sq_pi = (q.sq_pi + 1) & U32
                g.write(q.dbrec, _DB.pack(q.sq_pi, q.rq_pi))
                g.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, q.qpn, q.sq_pi), now)
            else:
                rslot = 1 << q.layout.rq_wqe_shift
                own = rng.choice([m for m in g.mrs if m.access & Access.LOCAL_WRITE])
                n = rng.choice((0, 64, 4096, own.length))
                g.write(q.rq + (q.rq_pi % q.layout.rq_depth) * rslot,
                        wire.encode_recv_wqe(i, [(own.gpa + rng.choice((0, own.length - n)), n, own.lkey)],
                                             slot_size=rslot))
                q.rq_pi = (q.rq_pi + 1) & U32
                g.write(q.dbrec, _DB.pack(q.sq_pi, q.rq_pi))
                g.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, q.qpn, q.rq_pi), now)
        elif q is self.qh and rng.random() < 0.3:     # a well-formed attack on the victim's memory
            slot = 1 << q.layout.sq_wqe_shift
            b = bytearray(slot)
            vm = rng.choice([m for v in self.victim.g[1:] for m in v.mrs])
            off = rng.choice((0, 8, 64, vm.length - 64))
            opcode = rng.choice((0, 0, 1, 4, 5, 6))      # WRITE, WRITE_IMM, READ, CMP_SWP, FETCH_ADD
            n = 8 if opcode in (5, 6) else rng.choice((8, 64))
            _SEND_HDR.pack_into(b, 0, i, opcode, 2, 1, 0, vm.gpa + off, vm.rkey, 0, 1, 2, bytes(16))
            _SGE.pack_into(b, 64, self.hijack_buf.gpa, n, self.hijack_buf.lkey)
            g.write(q.sq + (q.sq_pi % q.layout.sq_depth) * slot, b)
            q.sq_pi = (q.sq_pi + 1) & U32
            g.write(q.dbrec, _DB.pack(q.sq_pi, q.rq_pi))
            g.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, q.qpn, q.sq_pi), now)
        elif kind < 0.45:       # send WQEs, then the dbrec and a doorbell
            slot = 1 << q.layout.sq_wqe_shift
            for _ in range(rng.choice((1, 1, 2, 4))):
                pos = q.sq_pi % q.layout.sq_depth if rng.random() < 0.9 else rng.randrange(q.layout.sq_depth)
                g.write(q.sq + pos * slot, self._plausible_wqe(slot, g) if rng.random() < 0.5
                        else self._send_wqe(slot))
                q.sq_pi = (q.sq_pi + 1) & U32
            value = q.sq_pi if rng.random() < 0.7 else self._index(q.sq_pi)
            g.write(q.dbrec, _DB.pack(value, q.rq_pi))
            db = wire.encode_doorbell(DoorbellKind.SQ, q.qpn if rng.random() < 0.9 else rng.choice(self.nums) & 0xFFFFFF,
                                      value)
            g.core.doorbell(db, now)
        elif kind < 0.7:      # receive WQEs
            slot = 1 << q.layout.rq_wqe_shift
            for _ in range(rng.choice((1, 2, 4))):
                pos = q.rq_pi % q.layout.rq_depth
                g.write(q.rq + pos * slot, self._recv_wqe(slot))
                q.rq_pi = (q.rq_pi + 1) & U32
            value = q.rq_pi if rng.random() < 0.7 else self._index(q.rq_pi)
            g.write(q.dbrec, _DB.pack(q.sq_pi, value))
            g.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, q.qpn, value), now)
        elif kind < 0.85:     # raw doorbellq buffer garbage
            n = rng.choice((1, 1, 2, 3, 8))
            b = bytearray()
            for _ in range(n):
                word = (rng.choice(self.nums) & 0xFFFFFF) if rng.random() < 0.8 else rng.getrandbits(24)
                word |= (rng.randrange(4) if rng.random() < 0.9 else rng.getrandbits(8)) << 24
                b += _DB.pack(word, self._index(rng.getrandbits(8)))
            if rng.random() < 0.1:
                b += rng.randbytes(rng.randrange(1, 8))
            g.core.doorbell(bytes(b), now)
        elif kind < 0.95:     # CQ ring and CQ dbrec garbage, then arm
            c = rng.choice(g.cqs)
            if rng.random() < 0.5:
                off = rng.randrange(c.depth) * wire.CQE_SIZE
                g.write(c.ring + off, rng.randbytes(wire.CQE_SIZE))
            g.write(c.dbrec, _DB.pack(self._index(c.ci), rng.getrandbits(32) if rng.random() < 0.1 else 0))
            g.core.doorbell(wire.encode_doorbell(DoorbellKind.CQ_ARM, c.cqn, rng.randrange(2)), now)
        else:                 # QP dbrec garbage alone (doorbell-record polling reads it)
            g.write(q.dbrec, _DB.pack(self._index(q.sq_pi), self._index(q.rq_pi)))
            g.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, q.qpn, rng.getrandbits(32)), now)
        self.clock[0] += 0.001
        for gg in (self.a, self.b):
            gg.core.process(self.clock[0])
            if True:              # the driver keeps up with its CQs (an overflowed CQ stays broken)
                for c in gg.cqs:
                    try:
                        gg.poll(c, 64)
                    except (VirtioRdmaError, UnknownValueError):   # the garbage this fuzzer wrote into the ring itself
                        pass

    _REJECTS = ("bad_doorbells", "malformed_doorbell_buffers", "bad_wqes", "wqe_fetch_faults",
                "local_prot_errors", "local_len_errors", "remote_access_errors", "remote_inv_req_errors",
                "psn_seq_errors", "dropped_requests", "foreign_requests", "cq_faults", "cq_overflows")

    def counters(self) -> dict:
        out = {"reconnects": self.reconnects, "attacker_pairs": self.pairs,
               "victim_qp_kills": self.victim_qp_kills}
        for nm, d in (("attacker", self.totals["attacker"]), ("accomplice", self.totals["accomplice"]),
                      ("victim1", self.victim.g[0].core.metrics.as_dict()),
                      ("victim2", self.victim.g[1].core.metrics.as_dict())):
            out[nm] = {k: v for k, v in d.items() if v}
            self.report.rejected += sum(d.get(k, 0) for k in self._REJECTS)
        self.report.accepted = self.report.count
        return out
