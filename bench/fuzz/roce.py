"""The ``roce`` target: RoCEv2 packets aimed at live wire QPs, through the
real UDP endpoints.

Two hosts live in this process, each a :class:`RoceFabric` served by its
:class:`RoceFabricService` (the daemon's own adapter: :mod:`roce.udp` over a
real UDP socket, with the native receive fast path) on a loopback address of
its own (127.X.Y.1 and .2, one port for both, picked free). Guest VA on host
A and guest VB on host B have connected RC QPs (random PSNs). The fuzzer
sends datagrams to A *from B's own socket*, so source address and port are
exactly the connection's: only the packet itself can be wrong. Packets carry
VA's QPN most of the time, PSNs near the one VA's responder expects, VA's
real rkeys and addresses some of the time, any opcode; a share is mutated
after encoding, with the ICRC recomputed (valid) or not (invalid).

Checked: nothing escapes the endpoint (its handler logs and counts), no
batch exceeds its time bound, canary bytes of VA and VB outside their
writable MRs and CQ rings never change, nor any byte of an idle local pair
VC <-> VD on host A; a fresh pair of guests on A and B still gets a
verified SEND / WRITE / READ round trip over the wire; fds and guest
mappings come back to baseline.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import time

from roce.icrc import IpContext, compute_icrc
from roce.opcodes import Ext, Opcode, opinfo
from verbs import PSN_HALF, PSN_MASK, Access
from fabric.roce import RoceFabric, RoceFabricService

from .common import Canary, Hang, Report, Watchdog, check_canaries, fd_count, maps_count
from .guest import CoreGuest, round_trip, setup_pair

_BTH = struct.Struct("!BBHII")
_RETH = struct.Struct("!QII")
_ATOMIC = struct.Struct("!QIQQ")
_U32 = struct.Struct("!I")
_OPCODES = [int(o) for o in Opcode]
_REQUESTS = [int(o) for o in Opcode if opinfo(o).is_request and int(o) < 0x20]


def _pick_hosts() -> tuple[str, str, int]:
    """Two loopback addresses of our own and a UDP port free on both."""
    pid = os.getpid()
    base = f"127.{100 + pid % 100}.{(pid // 100) % 250 + 1}."
    a, b = base + "1", base + "2"
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s1:
            s1.bind((a, 0))
            port = s1.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s2:
                    s2.bind((b, port))
            except OSError:
                continue
        return a, b, port
    raise RuntimeError("no UDP port free on both fuzz addresses")


class RoceTarget:
    name = "roce"
    BATCH = 8

    def __init__(self, seed: int, *, live_every: int = 20000, check_every: int = 2000, bound_s: float = 10.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report(self.name, seed)
        self.live_every, self.check_every, self.bound = live_every, check_every, bound_s
        self.clock = [time.monotonic()]
        self.reconnects = 0
        self.rc_totals: dict[str, int] = {}
        self._hdr_cache: dict[int, tuple[bytes, bytes]] = {}

    # ---- driving both hosts --------------------------------------------------
    def pump(self, until=None, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.sa.poll()
            self.sb.poll()
            self.clock[0] = time.monotonic()
            for g in self.guests:
                g.core.process(self.clock[0])
            if until is not None and until():
                return True
            if until is None and not (self.sa.poll() or self.sb.poll()):
                return True
            if time.monotonic() > deadline:
                raise AssertionError("the fabric did not converge")

    @property
    def guests(self):
        return [g for g in (self.va, self.vb, self.vc, self.vd, *self.fresh) if g is not None]

    def _setup(self) -> None:
        rng = self.rng
        self.loop = asyncio.new_event_loop()
        self.ip_a, self.ip_b, self.port = _pick_hosts()
        self.fa, self.fb = RoceFabric(self.ip_a), RoceFabric(self.ip_b)
        self.sa, self.sb = RoceFabricService(self.fa, self.port), RoceFabricService(self.fb, self.port)
        self.loop.run_until_complete(self.sa.start())
        self.loop.run_until_complete(self.sb.start())
        self.fresh = []
        self.va = CoreGuest(self.fa, gpa=0x1000_0000, clock=self.clock)
        self.vb = CoreGuest(self.fb, gpa=0x2000_0000, clock=self.clock)
        self.vc = CoreGuest(self.fa, gpa=0x4000_0000, clock=self.clock)
        self.vd = CoreGuest(self.fa, gpa=0x5000_0000, clock=self.clock)
        self.psn_a, self.psn_b = rng.getrandbits(24), rng.getrandbits(24)
        self.ab = setup_pair(self.va, self.vb, psn_a=self.psn_a, psn_b=self.psn_b)
        self.cd = setup_pair(self.vc, self.vd)
        pd = self.va.pds[0]
        self.ro = self.va.reg_mr(pd, 8192, Access.REMOTE_READ)
        self.wo = self.va.reg_mr(pd, 8192, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.qpn_a = self.ab[0][2].qpn
        self.qpn_b = self.ab[1][2].qpn
        round_trip(self.va, self.vb, self.ab, pump=self.pump, tag=1)   # the wire QPs work before we start
        self.canaries = [Canary(self.va.view, self.va.allowed_offsets(), "VA"),
                         Canary(self.vb.view, self.vb.allowed_offsets(), "VB"),
                         Canary(self.vc.view, (), "VC"), Canary(self.vd.view, (), "VD")]
        mrs = self.va.mrs + self.vc.mrs
        self.rkeys = sorted({m.rkey for m in mrs} | {m.lkey for m in mrs})
        self.addrs = sorted({x for m in mrs for x in (m.gpa, m.gpa + 8, m.gpa + m.length - 8, m.gpa + m.length,
                                                      m.gpa - 8)})
        self.qpns = sorted({self.qpn_a, self.qpn_b, self.cd[0][2].qpn, self.cd[1][2].qpn})
        self.ctx = IpContext(self.ip_b, self.ip_a, sport=self.port, dport=self.port)
        self.sock = self.sb.endpoint.sock
        self.dst = (self.ip_a, self.port)

    def _reconnect(self) -> None:
        """VA's QP went to ERR (a forged packet may legitimately do that):
        connect VA <-> VB afresh, with new PSNs, so packets keep reaching a
        live responder."""
        self.reconnects += 1
        self._fold_rc()
        self.psn_a, self.psn_b = self.rng.getrandbits(24), self.rng.getrandbits(24)
        (_, _, qa, _), (_, _, qb, _) = self.ab
        self.va.connect(qa, qb.qpn, self.fb.gid, sq_psn=self.psn_a, rq_psn=self.psn_b)
        self.vb.connect(qb, qa.qpn, self.fa.gid, sq_psn=self.psn_b, rq_psn=self.psn_a)

    def _fold_rc(self) -> None:
        """Add the metrics of VA's current wire QP engine to the run's totals."""
        n = self.fa.wire.get(self.qpn_a)
        if n is None:
            return
        m = n.rc.metrics
        for k, v in (m.as_dict() if hasattr(m, "as_dict") else {k: getattr(m, k) for k in m.__slots__}).items():
            if isinstance(v, int) and v:
                self.rc_totals[k] = self.rc_totals.get(k, 0) + v

    def _va_live(self) -> bool:
        n = self.fa.wire.get(self.qpn_a)
        return n is not None and n.rc.state.name == "RTS"

    def _expected_psn(self) -> int:
        n = self.fa.wire.get(self.qpn_a)
        try:
            return n.rc.responder.psn
        except AttributeError:
            return self.psn_b

    # ---- packets ---------------------------------------------------------------
    def _headers(self, n: int):
        h = self._hdr_cache.get(n)
        if h is None:
            h = self._hdr_cache[n] = self.ctx.headers(n)
        return h

    def _packet(self) -> tuple[bytes, bool]:
        """One datagram and whether its ICRC is meant to be valid."""
        rng = self.rng
        r = rng.random()
        if r < 0.03:
            return rng.randbytes(rng.choice((0, 1, 11, 12, 16, 28, 64, 200))), False
        op = rng.choice(_REQUESTS) if r < 0.6 else rng.choice(_OPCODES)
        if rng.random() < 0.02:
            op = rng.getrandbits(8)
        try:
            info = opinfo(op)
            exts, hlen, has_payload = info.exts, info.length, info.has_payload
        except Exception:  # noqa: BLE001 - an opcode the table does not know: send it anyway
            exts, hlen, has_payload = (), 12, True
        qpn = self.qpn_a if rng.random() < 0.85 else (rng.choice(self.qpns) if rng.random() < 0.7
                                                        else rng.getrandbits(24))
        exp = self._expected_psn()
        psn = (exp + rng.choice((0, 0, 0, 1, -1, 2, 5, -5, 64, -64, PSN_HALF))) & PSN_MASK \
            if rng.random() < 0.9 else rng.getrandbits(24)
        plen = 0
        if has_payload:
            plen = rng.choice((0, 1, 4, 8, 64, 256, 1024, 4096, 4097)) if rng.random() < 0.95 \
                else rng.randrange(8000)
        pad = -plen % 4
        b1 = (rng.getrandbits(2) << 6) | (pad << 4) if rng.random() < 0.95 else rng.getrandbits(8)
        pkey = 0xFFFF if rng.random() < 0.95 else rng.getrandbits(16)
        w3 = (rng.getrandbits(1) << 31) | psn
        if rng.random() < 0.02:
            w3 |= rng.getrandbits(7) << 24
        buf = bytearray(hlen + plen + pad + 4)
        _BTH.pack_into(buf, 0, op, b1, pkey, qpn, w3)
        off = 12
        for e in exts:
            if e in (Ext.RETH, Ext.ATOMIC_ETH):
                va = rng.choice(self.addrs) + rng.choice((0, 0, 8, -8, 1)) if rng.random() < 0.85 \
                    else rng.getrandbits(64)
                rkey = rng.choice(self.rkeys) if rng.random() < 0.7 else rng.getrandbits(32)
                if e is Ext.RETH:
                    ln = plen if rng.random() < 0.6 else rng.choice((0, 1, 8, 4096, 1 << 20, 1 << 31,
                                                                     0xFFFFFFFF))
                    _RETH.pack_into(buf, off, va & (2 ** 64 - 1), rkey, ln)
                else:
                    _ATOMIC.pack_into(buf, off, va & (2 ** 64 - 1), rkey, rng.getrandbits(64),
                                      rng.getrandbits(64))
            elif e is Ext.AETH:
                _U32.pack_into(buf, off, (rng.choice((0, 0x1F, 0x20, 0x60, 0x61, 0x62, 0x63,
                                                      rng.getrandbits(8))) << 24) | rng.getrandbits(24))
            elif e is Ext.IETH:
                _U32.pack_into(buf, off, rng.choice(self.rkeys) if rng.random() < 0.7 else rng.getrandbits(32))
            else:
                buf[off:off + e.size] = rng.randbytes(e.size)
            off += e.size
        if plen:
            buf[off:off + plen] = rng.randbytes(plen) if plen <= 64 else bytes([rng.getrandbits(8)]) * plen
        valid = True
        r = rng.random()
        if r < 0.15:        # mutate the encoded bytes (ICRC recomputed below, mostly)
            for _ in range(rng.randint(1, 3)):
                if len(buf) > 4:
                    buf[rng.randrange(len(buf) - 4)] ^= 1 << rng.randrange(8)
        elif r < 0.2:
            del buf[rng.randrange(len(buf)):-4]
        elif r < 0.22:
            buf[-4:-4] = rng.randbytes(rng.choice((1, 4, 8)))
        if rng.random() < 0.25:
            valid = False
        if len(buf) >= 16:   # BTH + ICRC: shorter ones keep whatever trailer they have
            ip, udp = self._headers(len(buf))
            icrc = compute_icrc(ip, udp, memoryview(buf)[:-4])
            if not valid:
                icrc ^= 1 << rng.randrange(32)
            struct.pack_into("<I", buf, len(buf) - 4, icrc)
        return bytes(buf), valid

    # ---- checks ----------------------------------------------------------------
    def _checks(self, i: int) -> None:
        rep = self.report
        check_canaries(rep, self.canaries, i)
        for g in self.guests:
            n = g.core.metrics.internal_errors
            if n:
                rep.crashes += n
                rep.fail(i, f"{n} internal errors in the device core of guest {g.base:#x}")
                g.core.metrics.internal_errors = 0

    def _live(self, i: int) -> None:
        a = CoreGuest(self.fa, gpa=0x6000_0000, clock=self.clock)
        b = CoreGuest(self.fb, gpa=0x7000_0000, clock=self.clock)
        self.fresh = [a, b]
        try:
            objs = setup_pair(a, b, psn_a=self.rng.getrandbits(24), psn_b=self.rng.getrandbits(24))
            round_trip(a, b, objs, pump=self.pump, tag=i & 0xFF)
            self.report.liveness_checks += 1
        except Exception as e:  # noqa: BLE001 - a finding
            self.report.fail(i, f"fresh guests' round trip over the wire failed: {e!r}")
        finally:
            self.fresh = []
            a.close()
            b.close()

    def _received(self) -> int:
        return self.sa.endpoint.metrics.rx_packets

    # ---- the run ----------------------------------------------------------------
    def run(self, count: int, progress=None) -> Report:
        rep = self.report
        fd0, maps0 = fd_count(), maps_count()
        # the endpoint logs (and survives) an exception in a handler: count those as crashes
        crashes = _CountErrors()
        for name in _CRASH_LOGGERS:
            logging.getLogger(name).addHandler(crashes)
        try:
            self._setup()
            rep0 = self._received()
            t0 = time.perf_counter()
            sent = 0
            with Watchdog(self.bound, rep) as wd:
                i = 0
                while i < count:
                    k = min(self.BATCH, count - i)
                    wd.arm()
                    try:
                        if i % 16 < k and not self._va_live():
                            self._reconnect()
                        for _ in range(k):
                            data, valid = self._packet()
                            if not valid:
                                rep.rejected += 1
                            self.sock.sendto(data, self.dst)
                            sent += 1
                        while self._received() - rep0 < sent:
                            if not self.sa.poll():
                                time.sleep(0)
                        self.sb.poll()
                        self.clock[0] = time.monotonic()
                        for g in (self.va, self.vb):
                            g.core.process(self.clock[0])
                    except Hang:
                        rep.hangs += 1
                        rep.fail(i, f"a batch of {k} packets was not taken within {self.bound} s")
                        rep0 = self._received() - sent
                    except Exception as e:  # noqa: BLE001
                        rep.crashes += 1
                        rep.fail(i, f"exception: {e!r}")
                    finally:
                        wd.disarm(i)
                    i += k
                    rep.count += k
                    if i % self.check_every < k:
                        self._checks(i - 1)
                        self._crash_log(crashes, i - 1)
                    if i % self.live_every < k:
                        self._live(i - 1)
                        if progress:
                            progress(rep, time.perf_counter() - t0)
            rep.seconds = time.perf_counter() - t0
            self.pump(timeout=2.0)
            self._checks(count - 1)
            self._live(count - 1)
            self._checks(count - 1)
            self._crash_log(crashes, count - 1)
            rep.counters = self._counters()
            rep.rejected = rep.counters["udp"]["rx_icrc_errors"] + rep.counters["udp"]["rx_malformed"] + \
                rep.counters["fabric"]["rx_unknown_qpn"] + rep.counters["fabric"]["rx_addr_mismatch"]
            rep.accepted = rep.count - rep.rejected
        finally:
            for name in _CRASH_LOGGERS:
                logging.getLogger(name).removeHandler(crashes)
            self._teardown()
        rep.fd_delta = fd_count() - fd0
        rep.maps_delta = maps_count() - maps0
        if rep.fd_delta or rep.maps_delta:
            rep.fail(count - 1, f"fd delta {rep.fd_delta}, maps delta {rep.maps_delta} after closing everything")
        return rep

    def _crash_log(self, h: "_CountErrors", i: int) -> None:
        if h.count > h.seen:
            self.report.crashes += h.count - h.seen
            self.report.fail(i, f"{h.count - h.seen} exceptions logged by the fabric: {h.last}")
            h.seen = h.count

    def _counters(self) -> dict:
        ua, fa = self.sa.endpoint.metrics, self.fa.metrics
        out = {"udp": {k: getattr(ua, k) for k in ua.__slots__} if hasattr(ua, "__slots__") else vars(ua),
               "fabric": fa.as_dict()}
        out["reconnects"] = self.reconnects
        out["va_core"] = {k: v for k, v in self.va.core.metrics.as_dict().items() if v}
        self._fold_rc()
        out["va_rc_totals"] = dict(sorted(self.rc_totals.items()))
        return out

    def _teardown(self) -> None:
        for g in (getattr(self, n, None) for n in ("va", "vb", "vc", "vd")):
            if g is not None:
                g.close()
        for s in (getattr(self, "sa", None), getattr(self, "sb", None)):
            if s is not None:
                self.loop.run_until_complete(s.aclose())
        if getattr(self, "loop", None) is not None:
            self.loop.close()


#: the loggers whose errors are crashes: the RoCE transport and the device
#: core's entry points (control commands, doorbells, timers)
_CRASH_LOGGERS = ("roce.udp", "fabric.roce", "fabric.roce_qp", "virtio_rdma.control",
                  "virtio_rdma.doorbells", "virtio_rdma.timers")


class _CountErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = self.seen = 0
        self.last = ""

    def emit(self, record):
        self.count += 1
        self.last = record.getMessage()[:200]
