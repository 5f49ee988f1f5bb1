"""A daemon's peer links, and their asyncio adapter (docs/peering.md).

:class:`Peering` (sans-I/O) owns one :class:`~peering.link.PeerLink` and one
:class:`~peering.remote.PeerTarget` per peer host, registers the targets
with the daemon's accelerator router (host ids 1, 2, ... in the order the
peers are given), and takes the fabric's GSI datagrams
(:attr:`fabric.roce.RoceFabric.gsi`): a connect message from an address that
is not a configured peer, or not a well-formed one, is counted and dropped.
:class:`PeeringService` runs it in the daemon's event loop: one timer for the
earliest deadline of all links (RC retransmission, REQ retries,
keepalives).

On a verbs fabric (:class:`fabric.hca.VerbsFabric`: kernel rxe or a NIC)
the links are :class:`~peering.verbs_link.VerbsPeerLink`: device QPs
connected by RDMA CM, whose requests this daemon's
:class:`~peering.verbs_link.CmListener` takes (no GSI datagrams there).

Peers are given as ``--peer ADDR`` options or a cluster file
(:func:`read_cluster_file`: one address per line, ``#`` comments; the
daemon's own address is skipped).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

from fabric.roce import RoceFabric, roce_mtu
from peering.dispatch import Board, Dispatcher
from peering.link import LinkConfig, PeerLink
from peering.remote import DEFAULT_CREDITS, DEFAULT_JOB_TIMEOUT, PeerTarget
from peering.verbs_link import CmListener, VerbsPeerLink, page_aligned
from peering.wire import MAX_OPS, ConnectMsg, OpInfo, PeerWireError
from roce.opcodes import Opcode
from scheduler.board import board_size, cluster_order
from scheduler.table import DEFAULT_PERIOD
from verbs import GSI_QKEY
from virtio_rdma.constants import AccelOp

if TYPE_CHECKING:
    from fabric.hca import VerbsFabric
    from roce.packet import RocePacket
    from scheduler.exchange import LoadExchange
    from virtio_rdma.accel import AccelRouter

log = logging.getLogger(__name__)


class PeerConfigError(ValueError):
    """A peer list or cluster file names something that is not a usable peer."""


def read_cluster_file(path: str | Path, own: str) -> list[str]:
    """The peer addresses of a cluster file (one IP address per line, ``#``
    comments, blank lines ignored), without ``own``, in file order."""
    peers = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            addr = str(ipaddress.ip_address(text))
        except ValueError:
            raise PeerConfigError(f"{path}:{i}: {text!r} is not an IP address") from None
        if addr != str(ipaddress.ip_address(own)):
            peers.append(addr)
    return peers


def check_peers(peers: list[str], own: str) -> list[str]:
    """Normalised peer addresses: each an IP address of ``own``'s family, not
    ``own``, each once."""
    out: list[str] = []
    me = ipaddress.ip_address(own)
    for p in peers:
        try:
            ip = ipaddress.ip_address(p)
        except ValueError:
            raise PeerConfigError(f"peer {p!r} is not an IP address") from None
        if ip == me:
            raise PeerConfigError(f"peer {p} is this daemon's own address")
        if ip.version != me.version:
            raise PeerConfigError(f"peer {p} is not of the fabric address {own}'s IP version")
        if str(ip) in out:
            raise PeerConfigError(f"peer {p} is named twice")
        out.append(str(ip))
    return out


class Peering:
    """This daemon's links to ``peers`` over ``fabric`` (see the module doc)."""

    def __init__(self, fabric: RoceFabric | VerbsFabric, router: AccelRouter, peers: list[str], *,
                 credits: int = DEFAULT_CREDITS, config: LinkConfig | None = None,
                 clock: Callable[[], float] = monotonic, job_timeout: float = DEFAULT_JOB_TIMEOUT,
                 policy: str | None = None, load_period: float = DEFAULT_PERIOD,
                 link_key: bytes | None = None):
        self.fabric = fabric
        self.router = router
        self.clock = clock
        #: a verbs fabric: links by RDMA CM, not GSI datagrams
        self.verbs = not isinstance(fabric, RoceFabric)
        self.listener: CmListener | None = None
        #: the links' transport parameters; the path MTU the largest this host's interface carries
        self.config = config or LinkConfig(mtu=roce_mtu(fabric.address))
        self.incarnation = secrets.randbits(63) | 1
        me = ipaddress.ip_address(fabric.address)
        self.targets: dict[str, PeerTarget] = {}
        self.gsi_dropped = 0       # datagrams to QPN 1 that were no peer's connect message
        #: called when the earliest deadline may have moved (the adapter re-arms its timer)
        self.rearm: Callable[[], None] | None = None
        #: the cluster scheduler: where a job no queue pins runs (None: here if this
        #: host can, else the first peer that can)
        self.dispatcher = (Dispatcher(router, policy, period=load_period, clock=clock)
                           if policy is not None else None)
        if self.dispatcher is not None:
            self.dispatcher.rearm = self._rearm
            if self.verbs:  # a window the peer READs in place starts on a page (verbs_link)
                aligned = page_aligned(len(self.dispatcher.region))
                aligned[:] = self.dispatcher.region
                self.dispatcher.region = aligned
        for host, addr in enumerate(check_peers(peers, fabric.address), 1):
            def link_factory(target, addr=addr):
                active = me.packed < ipaddress.ip_address(addr).packed
                link: PeerLink | VerbsPeerLink
                if self.verbs:
                    link = VerbsPeerLink(fabric, addr, target, incarnation=self.incarnation, active=active,
                                         credits=credits, ops=self.ops, config=self.config, key=link_key)
                else:
                    link = PeerLink(fabric, addr, target, incarnation=self.incarnation, active=active,
                                    credits=credits, ops=self.ops, config=self.config)
                link.notify = self._rearm
                if self.dispatcher is not None:
                    link.counters = self.dispatcher.region
                return link
            t = PeerTarget(host, router, link_factory, credits=credits, clock=clock, job_timeout=job_timeout)
            t.name = f"peer:{addr}"  # its [[tenant]] entry in this host's configuration
            self.targets[addr] = t
            router.add_remote(t)
        if self.dispatcher is not None and self.dispatcher.policy.base == "board":
            self._set_up_board(str(me))
        if isinstance(fabric, RoceFabric):
            fabric.gsi = self.on_gsi
        else:
            self.listener = CmListener(fabric, self._verbs_link, clock=clock, key=link_key,
                                       links=lambda: [t.link for t in self.targets.values()])

    def _verbs_link(self, address: str):
        """The verbs link to peer ``address`` (a CM request names it), or None."""
        t = self.targets.get(address)
        return t.link if t is not None else None

    def _set_up_board(self, own: str) -> None:
        """Policy ``board``: the cluster's load board is on its lowest address
        (scheduler.board); this host holds it if that is its own, and then each
        link offers the board's windows to its peer."""
        assert self.dispatcher is not None
        order = cluster_order([own, *self.targets])
        n = len(order)
        slots = {t.host: order.index(a) for a, t in self.targets.items()}
        holder = 0 if order[0] == own else self.targets[order[0]].host
        region = memoryview(bytearray(board_size(n))) if holder == 0 else None
        if region is not None:
            for t in self.targets.values():
                t.link.board = (region, n, slots[t.host])
        self.dispatcher.use_board(Board(n, order.index(own), holder, slots, region))
        log.info("load board: on %s (%s), %d hosts", order[0], "here" if holder == 0 else f"host {holder}", n)

    def resolve(self, address: str) -> int | None:
        """The host id of a peer address (None: not a peer of this daemon)."""
        t = self.targets.get(address)
        return t.host if t is not None else None

    def ops(self) -> tuple[OpInfo, ...]:
        """This host's accelerators, as a connect message carries them."""
        local = self.router.local
        out: list[OpInfo] = []
        for info in self.router.ops_info():
            if local is not None and info.local_units and len(out) < MAX_OPS:
                out.append(OpInfo(AccelOp(info.op), info.local_units, info.est_fixed_ns, info.est_unit_ps))
        return tuple(out)

    def _rearm(self) -> None:
        if self.rearm is not None:
            self.rearm()

    def start(self) -> None:
        if self.listener is not None:
            self.listener.start()
        now = self.clock()
        for t in self.targets.values():
            t.link.start(now)
        self._rearm()

    def on_gsi(self, pkt: RocePacket, src: str, sport: int, now: float) -> None:
        t = self.targets.get(src)
        deth = pkt.deth
        if (t is None or pkt.bth.opcode != Opcode.UD_SEND_ONLY or deth is None
                or deth.qkey != GSI_QKEY):
            self.gsi_dropped += 1
            return
        try:
            msg = ConnectMsg.decode(bytes(pkt.payload))
        except PeerWireError as e:
            self.gsi_dropped += 1
            log.debug("connect message from %s: %s", src, e)
            return
        t.link.on_connect(msg, self.clock())
        self._rearm()

    def next_deadline(self) -> float | None:
        """The earliest deadline of any link (transport, REQ retry, keepalive) or job timeout."""
        ds = [d for t in self.targets.values() for d in (t.link.deadline(), t.next_deadline())
              if d is not None]
        if self.dispatcher is not None:
            d = self.dispatcher.next_deadline()
            if d is not None:
                ds.append(d)
        return min(ds) if ds else None

    def on_timer(self, now: float) -> None:
        for t in list(self.targets.values()):
            try:
                d = t.link.deadline()
                if d is not None and d <= now:
                    t.link.on_timer(now)
                d = t.next_deadline()
                if d is not None and d <= now:
                    t.on_timer(now)
            except Exception:  # one link's failure must not starve the others' timers
                log.exception("peer link %s: internal error in a timer", t.link.peer)
        disp = self.dispatcher
        if disp is not None:
            at = disp.next_deadline()
            if at is not None and at <= now:
                try:
                    disp.on_timer(now)
                except Exception:
                    log.exception("scheduler: internal error in a timer")

    def close(self) -> None:
        now = self.clock()
        for t in self.targets.values():
            t.link.close(now)
        if self.listener is not None:
            self.listener.close()
        if isinstance(self.fabric, RoceFabric) and self.fabric.gsi == self.on_gsi:
            self.fabric.gsi = None

    def describe(self) -> dict:
        return {"incarnation": self.incarnation, "gsi_dropped": self.gsi_dropped,
                "cm_listener": None if self.listener is None else self.listener.describe(),
                "scheduler": self.dispatcher.describe() if self.dispatcher is not None else None,
                "peers": {a: t.describe() for a, t in self.targets.items()}}


class PeeringService:
    """Runs a :class:`Peering` in the daemon's event loop (start after the
    fabric's own service, which owns the socket)."""

    def __init__(self, peering: Peering, exchange: LoadExchange | None = None):
        self.peering = peering
        #: the load table's dissemination (owned: started and closed with the links)
        self.exchange = exchange
        #: its counters when it closed (None: none ran)
        self.load_metrics: dict | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # served jobs complete on this loop even before any guest's device attaches it
        self.peering.router.attach_loop(self._loop)
        self.peering.rearm = self._schedule
        for t in self.peering.targets.values():
            t.link.defer = self._loop.call_soon
        if self.peering.dispatcher is not None:
            self.peering.dispatcher.defer = self._loop.call_soon
        self.peering.start()
        log.info("peer links: %s", ", ".join(
            f"host {t.host} = {a}" for a, t in self.peering.targets.items()) or "none")
        if self.exchange is not None:
            await self.exchange.start()
            log.info("load table: advertising every %.3g s (%s)", self.exchange.period,
                     type(self.exchange.backend).__name__)

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None:
            return
        d = self.peering.next_deadline()
        if d is None or (self._at is not None and self._at <= d):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._at = d
        # loop.time() is time.monotonic(), the clock the links run on
        self._timer = loop.call_at(d, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._at = None
        try:
            self.peering.on_timer(monotonic())
        except Exception:  # the daemon boundary: one bad link must not stop the others
            log.exception("peer links: internal error in a timer")
        self._schedule()

    async def aclose(self) -> None:
        if self.exchange is not None:
            ex, self.exchange = self.exchange, None
            await ex.close()
            self.load_metrics = ex.metrics()
            log.info("load table at exit: %s", self.load_metrics)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.peering.rearm = None
        self.peering.close()
        log.info("peer links at exit: %s", self.peering.describe())
