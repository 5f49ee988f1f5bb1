"""Two RC QPs joined by an in-memory, seeded lossy channel (drop, duplicate,
reorder), driven as a discrete-event simulation: ``now`` only moves forward
to the next delivery or timer deadline; nothing sleeps. Every packet goes
through the real codec (encode with ICRC, decode with ICRC check)."""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from roce.errors import MalformedPacket
from roce.icrc import IpContext
from roce.packet import decode
from roce.rc import MemoryTable, RcQp
from verbs import PSN_MASK, QpState

CTX_AB = IpContext("192.0.2.1", "192.0.2.2", sport=50001)
CTX_BA = IpContext("192.0.2.2", "192.0.2.1", sport=50002)


@dataclass
class Channel:
    seed: int = 0
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    latency: float = 5e-6
    cut: bool = False                  # the peer vanished: everything is dropped
    rng: random.Random = field(init=False)
    stats: dict = field(default_factory=lambda: dict(sent=0, dropped=0, duplicated=0,
                                                     malformed=0))

    def __post_init__(self):
        self.rng = random.Random(self.seed)


class Pair:
    def __init__(self, channel: Channel | None = None, mtu: int = 1024, **attrs):
        self.ch = channel or Channel()
        self.mem_a, self.mem_b = MemoryTable(0x100), MemoryTable(0x200)
        self.a, self.b = RcQp(0x11, self.mem_a), RcQp(0x22, self.mem_b)
        for q, peer, psn in ((self.a, self.b, 100), (self.b, self.a, 0xFFFFF0)):
            # PSNs start near the 24-bit wrap on one side to exercise wrap-around
            q.modify(QpState.INIT)
            q.modify(QpState.RTR, dest_qp_num=peer.qp_num, path_mtu=mtu,
                     rq_psn=0xFFFFF0 if q is self.a else 100)
            q.modify(QpState.RTS, sq_psn=psn, **attrs)
        self.now = 0.0
        self.heap: list = []
        self.seq = 0
        self.sent_log: list = []       # (side, RocePacket) of every transmitted packet
        self.max_inflight = {self.a: 0, self.b: 0}

    def _ship(self, src: RcQp, now: float) -> None:
        dst, ctx = (self.b, CTX_AB) if src is self.a else (self.a, CTX_BA)
        for pkt in src.transmit(now):
            self.sent_log.append((src, pkt))
            wire = pkt.encode(ctx)
            ch = self.ch
            ch.stats["sent"] += 1
            r = src.requester
            self.max_inflight[src] = max(self.max_inflight[src],
                                         (r.psn - r.comp_psn) & PSN_MASK)
            if ch.cut or ch.rng.random() < ch.drop:
                ch.stats["dropped"] += 1
                continue
            copies = 2 if ch.rng.random() < ch.dup else 1
            if copies == 2:
                ch.stats["duplicated"] += 1
            for _ in range(copies):
                delay = ch.latency
                if ch.rng.random() < ch.reorder:
                    delay += ch.rng.random() * 20 * ch.latency
                self.seq += 1
                heapq.heappush(self.heap, (now + delay, self.seq, dst, ctx, wire))

    def inject(self, dst: RcQp, wire: bytes) -> None:
        ctx = CTX_AB if dst is self.b else CTX_BA
        self.seq += 1
        heapq.heappush(self.heap, (self.now, self.seq, dst, ctx, wire))

    def run(self, until, max_events: int = 2_000_000) -> None:
        """Advance until ``until()`` is true; fails if the system goes idle or
        runs away first."""
        for _ in range(max_events):
            for q in (self.a, self.b):
                self._ship(q, self.now)
            if until():
                return
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline())
                         if d is not None]
            t_timer = min(deadlines) if deadlines else None
            t_pkt = self.heap[0][0] if self.heap else None
            if t_pkt is None and t_timer is None:
                raise AssertionError("simulation idle before the condition held")
            if t_pkt is not None and (t_timer is None or t_pkt <= t_timer):
                t, _, dst, ctx, wire = heapq.heappop(self.heap)
                self.now = max(self.now, t)
                try:
                    pkt = decode(wire, ctx)
                except MalformedPacket:
                    self.ch.stats["malformed"] += 1
                    continue
                dst.receive(pkt, self.now)
            else:
                self.now = max(self.now, t_timer)
                for q in (self.a, self.b):
                    q.handle_timer(self.now)
        raise AssertionError("simulation did not converge")
