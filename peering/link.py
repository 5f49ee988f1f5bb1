"""A daemon-owned RC link to one peer daemon, sans-I/O (docs/peering.md).

Each pair of daemons that ship accelerator jobs to each other keeps one RC
queue pair, run by the same RoCE RC engine guests' QPs use
(:class:`roce.rc.qp.RcQp`: segmentation, ACKs, go-back-N, RNR, the retry
timer). :class:`PeerLink` owns that QP on this side:

* **Connection** (:class:`LinkState`): the daemon with the lower address is
  the active side. It makes a QP (INIT, receives posted) and sends a REQ
  datagram (:class:`peering.wire.ConnectMsg`) to the peer's GSI QP, again
  every ``connect_interval`` (doubling up to 8x) until a REP names it. The
  passive side, on a REQ, makes its QP, takes it to RTS at once and answers
  with a REP; a repeated REQ (same incarnation and QPN) gets the same REP
  again; a REQ with a new incarnation or QPN (the peer restarted, or saw
  the link fail) replaces the link. Each side tells the other its credits
  (jobs it accepts in flight) and its accelerators.
* **Liveness**: while UP, a zero-length RDMA WRITE goes out every
  ``keepalive`` seconds; a peer that stops answering exhausts the RC retry
  budget (``(retry_cnt + 1) x`` the ACK timeout) and the QP enters ERR: the
  link goes DOWN, ``on_down`` gives its jobs back, and the active side
  connects again. So a dead peer is noticed within ``keepalive`` + the retry
  budget, and a REQ from a restarted peer replaces the link at once.
* **Messages**: fixed receive buffers of :data:`peering.wire.MAX_MESSAGE`
  bytes (as many as the credits both ways allow, plus slack), reposted as
  each is consumed; SENDs and RDMA WRITEs (and READs) posted by the owner
  (:mod:`peering.remote`).
* **Windows** (:class:`WindowTable`, the QP's
  :class:`~roce.rc.memory.RemoteMemory`): the only memory the peer may
  touch. The owner opens a window over a job's buffer (R_Key random;
  REMOTE_WRITE: a guest's output buffer on the origin, the staging buffer
  of the input on the server) and closes it when the job ends; a window
  whose job was abandoned is redirected to a sink (reads give zeros, writes
  are dropped) until the peer's result closes it,
  so guest memory is never touched after its queue or device is gone, and
  the peer is not punished for it. The one window the peer may READ is the
  owner's counters (its live load, :mod:`scheduler.wire`), opened on every
  new QP and named in the connect message. A table lives as long as its QP.

Inputs: :meth:`PeerLink.on_connect` (a decoded datagram), the fabric's
:meth:`receive`/:meth:`pump`, :meth:`on_timer`; outputs: packets through
``fabric.transmit``, callbacks to the ``owner``. ``now`` is passed in.
"""
from __future__ import annotations

import enum
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

from fabric.roce_qp import Scattered
from peering.wire import MAX_MESSAGE, ConnectMsg, ConnectType, OpInfo
from roce.build import make_bth
from roce.errors import RemoteAccessError, TransportError
from roce.headers import Deth
from roce.opcodes import Opcode
from roce.packet import RocePacket
from roce.rc import verbs as rv
from roce.rc.qp import RcQp
from roce.rc.responder import _WriteCtx
from roce.sport import allowed_source_ports
from scheduler.board import counters_offset, inbound_base
from scheduler.wire import COUNTERS_SIZE
from verbs import GSI_QKEY, GSI_QPN, PSN_MASK, Access, QpState, WcStatus, WrOpcode, ack_timeout_seconds

log = logging.getLogger(__name__)

#: rights a link QP grants its peer; each window narrows them: a job's windows are
#: REMOTE_WRITE only, the counters window REMOTE_READ only; on the board's holder, the
#: board READ, the peer's own slot WRITE and the announced-work array ATOMIC only
LINK_ACCESS = Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC
#: receive buffers beyond the credits
RECV_SLACK = 8
_U64 = (1 << 64) - 1


class LinkState(enum.Enum):
    DOWN = "down"              # no QP (passive: waiting for a REQ; active: until the next try)
    CONNECTING = "connecting"  # active side: QP made, REQ sent, no REP yet
    UP = "up"                  # both QPs in RTS


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Transport parameters of every link of a daemon."""

    mtu: int = 1024                 # path MTU (bytes); the smaller of the two sides' is used
    timeout: int = 14               # ACK timeout code: 4.096 us * 2^14 = 67 ms
    retry_cnt: int = 6              # transport retries before the QP fails (7 would be forever, as in rxe)
    rnr_retry: int = 6              # RNR retries (7 would be forever)
    min_rnr_timer: int = 1          # 0.01 ms
    keepalive: float = 0.25         # seconds between keepalive WRITEs while UP
    connect_interval: float = 0.2   # seconds between REQs (doubling to 8x)

    @property
    def retry_budget(self) -> float:
        """Seconds an unanswered request is retried before the link fails."""
        t = ack_timeout_seconds(self.timeout)
        assert t is not None
        return (self.retry_cnt + 1) * t


@dataclass(slots=True)
class LinkMetrics:
    connects: int = 0            # times the link came UP
    failures: int = 0            # times it went DOWN from UP or CONNECTING
    reqs_sent: int = 0
    reps_sent: int = 0
    stale_connects: int = 0      # REQ/REP that named no attempt of ours (ignored)
    messages_received: int = 0
    keepalives: int = 0
    window_faults: int = 0       # peer accesses outside every open window (NAKed)

    def as_dict(self) -> dict:
        return asdict(self)


class LinkOwner(Protocol):
    """What a link reports to (peering.remote.PeerTarget); loop thread only."""

    def on_up(self, link: PeerLink) -> None: ...
    def on_down(self, link: PeerLink, reason: str) -> None: ...
    def on_message(self, link: PeerLink, data: bytes) -> None: ...
    def on_send_done(self, link: PeerLink, wr_id: int, status: WcStatus) -> None: ...


# --------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------
class _Sink:
    """What an abandoned window becomes: reads give zeros, writes vanish."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> bytes:
        start, stop, _ = s.indices(self.n)
        return bytes(max(0, stop - start))

    def __setitem__(self, s: slice, data) -> None:
        pass


@dataclass(slots=True)
class _Window:
    views: Any              # a memoryview, a Scattered or a _Sink
    length: int
    access: Access


class WindowTable:
    """R_Key -> window over a job's guest buffers: the peer's only way into
    this host's memory (the link QP's :class:`~roce.rc.memory.RemoteMemory`).
    A window's virtual address is 0: the peer addresses bytes by offset."""

    def __init__(self, metrics: LinkMetrics):
        self._w: dict[int, _Window] = {}
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self._w)

    def open(self, views: list[memoryview], access: Access) -> int:
        """A window over ``views`` (their concatenation) granting ``access``; its R_Key."""
        while True:
            key = secrets.randbits(32)
            if key and key not in self._w:
                break
        length = sum(len(v) for v in views)
        body: Any = views[0] if len(views) == 1 else Scattered(views)
        self._w[key] = _Window(body, length, access)
        return key

    def close(self, key: int) -> None:
        self._w.pop(key, None)

    def sink(self, key: int) -> None:
        """Keep ``key`` valid for the peer but point it at nothing."""
        w = self._w.get(key)
        if w is not None:
            w.views = _Sink(w.length)

    def clear(self) -> None:
        self._w.clear()

    def resolve(self, rkey: int, va: int, length: int, access) -> memoryview:
        w = self._w.get(rkey)
        need = Access(int(access))
        if w is None or need & ~w.access or va < 0 or length < 0 or va + length > w.length:
            self.metrics.window_faults += 1
            raise RemoteAccessError(f"R_Key {rkey:#x} [{va:#x}, +{length}) {need!r}: no such window "
                                    "open to this peer", rkey=rkey, va=va, length=length)
        v = w.views
        if type(v) is memoryview:
            return v[va:va + length]
        if va == 0 and length == w.length:
            return cast(memoryview, v)
        return cast(memoryview, _Slice(v, va, length))

    def invalidate(self, rkey: int) -> None:
        raise RemoteAccessError(f"SEND with Invalidate of R_Key {rkey:#x}: not on a peer link",
                                rkey=rkey)


class _Slice:
    """A sub-range of a Scattered or _Sink window, sliceable like a memoryview."""

    __slots__ = ("base", "off", "n")

    def __init__(self, base, off: int, n: int):
        self.base, self.off, self.n = base, off, n

    def __len__(self) -> int:
        return self.n

    def _abs(self, s: slice) -> slice:
        start, stop, step = s.indices(self.n)
        if step != 1:
            raise ValueError("strided access to a window")
        return slice(self.off + start, self.off + max(start, stop))

    def __getitem__(self, s: slice):
        return self.base[self._abs(s)]

    def __setitem__(self, s: slice, data) -> None:
        self.base[self._abs(s)] = data


# --------------------------------------------------------------------------
# The link
# --------------------------------------------------------------------------
class _RingIndex:
    """What the native receive fast path reads of a wire QP's ``qp``: it
    takes a SEND only when ``rq_posted == qp.rq_pi``. A link's receives are
    its own buffers, never a guest ring: its SENDs always take the Python
    path (they are few: job and result descriptors)."""

    rq_pi = 1


class DeferredKick:
    """``kick_soon`` for a link: after posting from outside the link's own
    callbacks (a guest's job being placed), kick from the loop, once for every
    post until then, so that nothing the pump completes runs inside the caller.
    The link sets ``defer`` (``defer(fn, arg)`` runs soon on the loop; None: kick
    at once) and ``_kick_due``, and its ``kick`` clears ``_kick_due``."""

    defer: Any
    _kick_due: bool

    def kick(self, now: float) -> None:
        raise NotImplementedError

    def kick_soon(self, clock) -> None:
        if self.defer is None:
            self.kick(clock())
        elif not self._kick_due:
            self._kick_due = True
            self.defer(self._deferred_kick, clock)

    def _deferred_kick(self, clock) -> None:
        if self._kick_due:
            self.kick(clock())


class LinkBase(DeferredKick):
    """What a link to daemon ``peer`` holds whatever carries it (:class:`PeerLink`:
    the RoCE engine's QP; :class:`peering.verbs_link.VerbsPeerLink`: a device QP
    through RDMA CM): who the peer is and what it told us in its connect message
    (credits, accelerators, its landing, counters and board windows), our own
    windows for it, the connection's state, epoch and attempt, and the connect
    and keepalive schedule. The subclass adds its QP, its window table and its
    metrics (both count ``connects``, ``failures``, ``reps_sent``, ``stale_connects``)."""

    def __init__(self, fabric, peer: str, owner: LinkOwner, *, incarnation: int, active: bool,
                 credits: int, ops, config: LinkConfig | None = None):
        self.fabric = fabric
        self.peer = peer
        self.owner = owner
        self.incarnation = incarnation
        self.active = active
        self.credits = credits          # jobs we accept in flight from the peer
        self._ops = ops                 # () -> tuple[OpInfo, ...]: ours, for REQ/REP
        self.config = config or LinkConfig()
        self.state = LinkState.DOWN
        self.qpn = 0
        self.peer_incarnation = 0
        self.peer_qpn = 0
        self.peer_credits = 0
        self.peer_ops: dict[int, OpInfo] = {}
        #: the owner's landing memory for the peer's job inputs (a window opened on every new QP):
        #: (buffer, slots, slot KiB), or None
        self.landing: tuple[memoryview, int, int] | None = None
        self.landing_rkey = 0
        #: the peer's landing window: (rkey, slots, slot bytes), or None
        self.peer_landing: tuple[int, int, int] | None = None
        #: the owner's live load counters, READ by the peer (a window opened on every new QP)
        self.counters: memoryview | None = None
        self.counters_rkey = 0
        #: the peer's counters window: (rkey, bytes), or None
        self.peer_counters: tuple[int, int] | None = None
        #: the owner holds the cluster's load board (scheduler.board): (region, hosts, the
        #: peer's slot); each new QP opens its three windows on it for the peer
        self.board: tuple[memoryview, int, int] | None = None
        self.board_keys: tuple[int, int, int, int] | None = None
        #: the peer holds the board: (hosts, read rkey, our slot's rkey, inbound rkey), or None
        self.peer_board: tuple[int, int, int, int] | None = None
        self.closed = False
        #: called when deadline() may have moved earlier (the service re-arms its timer)
        self.notify: Any = None
        self.epoch = 0                  # incremented every time the link goes DOWN
        #: active side: the current connection attempt (REQ and its REP carry it);
        #: passive side: the newest attempt accepted from the peer's incarnation
        self.attempt = 0
        #: set by the service: ``defer(fn)`` runs ``fn`` soon on the loop (None: at once)
        self.defer: Any = None
        self._kick_due = False
        self._next_connect: float | None = None
        self._backoff = 1
        self._next_keepalive: float | None = None
        self.last_transport: dict | None = None  # the transport counters of the last QP dropped

    def start(self, now: float) -> None:
        if self.active and self.state is LinkState.DOWN and not self.closed:
            self._next_connect = now

    def _take_peer(self, msg: ConnectMsg, credits: int) -> None:
        """What the peer's REQ or REP tells of it (``credits``: its credits as we take them)."""
        self.peer_incarnation = msg.incarnation
        self.peer_credits = credits
        self.peer_ops = {int(o.op): o for o in msg.ops}
        self.peer_landing = ((msg.landing_rkey, msg.landing_slots, msg.landing_slot_kib << 10)
                             if msg.landing_rkey else None)
        self.peer_counters = (msg.counters_rkey, msg.counters_len) if msg.counters_rkey else None
        self.peer_board = msg.board

    def _forget_peer(self) -> None:
        """The QP is gone: so are the peer's windows and credits, and our keys for it."""
        self.peer_credits = 0
        self.peer_ops = {}
        self.peer_landing = None
        self.landing_rkey = 0
        self.peer_counters = None
        self.counters_rkey = 0
        self.peer_board = None
        self.board_keys = None


class PeerLink(LinkBase):
    """The RC link to daemon ``peer`` (an IP address of the fabric)."""

    rq_posted = 0   # see _RingIndex
    qp = _RingIndex()

    def __init__(self, fabric, peer: str, owner: LinkOwner, *, incarnation: int, active: bool,
                 credits: int, ops, config: LinkConfig | None = None):
        super().__init__(fabric, peer, owner, incarnation=incarnation, active=active, credits=credits,
                         ops=ops, config=config)
        self.metrics = LinkMetrics()
        self.rc: RcQp | None = None
        self.sports: frozenset[int] | None = None
        self.table = WindowTable(self.metrics)
        self.dev = self                 # the fabric re-arms timers through dev.notify
        self._psn = 0
        self._recv: list[memoryview] = []  # receive buffer of each slot (its wr_id)
        self._pumping = False

    # ------------------------------------------------------------ connection
    def _make_qp(self, now: float) -> None:
        self._drop_qp()
        self.qpn = self.fabric.alloc_qpn()
        self.rc = RcQp(self.qpn, self.table)
        self._psn = secrets.randbelow(PSN_MASK + 1)
        self.rc.modify(QpState.INIT, access=LINK_ACCESS)
        self.fabric.attach_wire(self.qpn, self)
        self._post_recvs(self.credits + RECV_SLACK)
        if self.landing is not None:
            self.landing_rkey = self.table.open([self.landing[0]], Access.REMOTE_WRITE)
        if self.counters is not None:
            self.counters_rkey = self.table.open([self.counters], Access.REMOTE_READ)
        if self.board is not None:
            region, n, slot = self.board
            own = region[counters_offset(slot):counters_offset(slot) + COUNTERS_SIZE]
            self.board_keys = (n, self.table.open([region], Access.REMOTE_READ),
                               self.table.open([own], Access.REMOTE_WRITE),
                               self.table.open([region[inbound_base(n):]], Access.REMOTE_ATOMIC))

    def _post_recvs(self, n: int) -> None:
        assert self.rc is not None
        for _ in range(n):
            buf = memoryview(bytearray(MAX_MESSAGE))
            self.rc.post_recv(len(self._recv), [buf])
            self._recv.append(buf)

    def _bring_up(self, dest_qpn: int, dest_psn: int, mtu: int, now: float) -> None:
        rc = self.rc
        assert rc is not None
        c = self.config
        mtu = min(self.config.mtu, mtu)
        rc.modify(QpState.RTR, dest_qp_num=dest_qpn, path_mtu=mtu if mtu in (256, 512, 1024, 2048, 4096)
                  else 1024, rq_psn=dest_psn, min_rnr_timer=c.min_rnr_timer, max_dest_rd_atomic=16)
        rc.modify(QpState.RTS, sq_psn=self._psn, timeout=c.timeout, retry_cnt=c.retry_cnt,
                  rnr_retry=c.rnr_retry, max_rd_atomic=16)
        self.sports = allowed_source_ports(self.fabric.port_check_of(self.peer), self.fabric.port,
                                           dest_qpn, self.qpn)
        self.peer_qpn = dest_qpn
        self.state = LinkState.UP
        self.metrics.connects += 1
        self._next_connect = None
        self._backoff = 1
        self._next_keepalive = now + c.keepalive

    def _connect_msg(self, kind: int, echo: int) -> ConnectMsg:
        slots, kib = self.landing[1:] if self.landing is not None else (0, 0)
        return ConnectMsg(kind, self.incarnation, echo, self.attempt, self.qpn, self._psn, self.credits,
                          self.config.mtu, tuple(self._ops()), self.landing_rkey if slots else 0, slots, kib,
                          self.counters_rkey,
                          len(self.counters) if self.counters_rkey and self.counters is not None else 0,
                          self.board_keys)

    def on_connect(self, msg: ConnectMsg, now: float) -> None:
        """A REQ or REP from this link's peer (decoded, from its address)."""
        if msg.type == ConnectType.REQ:
            if self.active:
                self.metrics.stale_connects += 1  # the peer's view of who connects differs
                log.warning("peer link %s: REQ from a peer this daemon connects to (ignored)", self.peer)
                return
            if msg.incarnation == self.peer_incarnation:
                if self.state is LinkState.UP and msg.attempt == self.attempt and msg.qpn == self.peer_qpn:
                    self._send_connect(self._connect_msg(ConnectType.REP, msg.incarnation))  # REP lost
                    return
                if msg.attempt <= self.attempt:
                    self.metrics.stale_connects += 1  # a delayed REQ of an attempt already taken
                    return
            if self.state is not LinkState.DOWN:
                self._down("the peer connected again (restarted, or saw the link fail)", now)
            self._make_qp(now)
            self.attempt = msg.attempt
            self._accept(msg, now)
            self._send_connect(self._connect_msg(ConnectType.REP, msg.incarnation))
            self.metrics.reps_sent += 1
            self.owner.on_up(self)
            self.kick(now)
            return
        # REP: for this incarnation's current attempt only
        if (self.state is not LinkState.CONNECTING or msg.echo != self.incarnation
                or msg.attempt != self.attempt):
            if not (self.state is LinkState.UP and msg.qpn == self.peer_qpn):
                self.metrics.stale_connects += 1
            return
        self._accept(msg, now)
        self.owner.on_up(self)
        self.kick(now)

    def _accept(self, msg: ConnectMsg, now: float) -> None:
        self._take_peer(msg, msg.credits)
        self._bring_up(msg.qpn, msg.psn, msg.mtu, now)
        self._post_recvs(msg.credits)  # their results (for our jobs, at most their credits)

    def _send_connect(self, msg: ConnectMsg) -> None:
        pkt = RocePacket(make_bth(int(Opcode.UD_SEND_ONLY), GSI_QPN, 0), deth=Deth(GSI_QKEY, GSI_QPN),
                         payload=msg.encode())
        self.fabric.transmit([pkt], self.peer)

    def fail(self, reason: str, now: float) -> None:
        """The owner found the peer misbehaving: the link goes DOWN (the active
        side connects again)."""
        self._down(reason, now)

    def _down(self, reason: str, now: float) -> None:
        if self.state is LinkState.DOWN:
            return
        log.info("peer link %s down: %s", self.peer, reason)
        self.state = LinkState.DOWN
        self.metrics.failures += 1
        self.epoch += 1
        self._drop_qp()
        self._next_keepalive = None
        self.owner.on_down(self, reason)
        if self.active and not self.closed:
            self._next_connect = now + self.config.connect_interval

    def _drop_qp(self) -> None:
        rc = self.rc
        if rc is None:
            return
        self.rc = None
        self.last_transport = asdict(rc.metrics)
        if rc.state is not QpState.ERR:
            rc.modify(QpState.ERR)
        rc.poll_send_cq()
        rc.poll_recv_cq()
        self.fabric.detach_wire(self.qpn)
        self.fabric.free_qpn(self.qpn)
        self.table = WindowTable(self.metrics)
        self._recv = []
        self._forget_peer()

    def close(self, now: float = 0.0) -> None:
        """The daemon stops: the link goes DOWN for good (its jobs given back)."""
        self.closed = True
        self._next_connect = None
        self._down("the daemon is stopping", now)
        self._drop_qp()

    # -------------------------------------------------------------- posting
    def post(self, wr: rv.SendWR) -> None:
        """Post a send WR on the UP link (the caller kicks it after a batch)."""
        if self.state is not LinkState.UP or self.rc is None:
            raise TransportError(f"peer link {self.peer} is {self.state.value}")
        self.rc.post_send(wr)

    def send(self, wr_id: int, payload: bytes) -> None:
        self.post(rv.SendWR(wr_id, WrOpcode.SEND, [memoryview(payload)]))

    def read(self, wr_id: int, into: memoryview, rkey: int, va: int = 0) -> None:
        self.post(rv.SendWR(wr_id, WrOpcode.RDMA_READ, [into], va, rkey))

    def write(self, wr_id: int, views: list[memoryview], rkey: int, va: int = 0, *,
              signaled: bool = True) -> None:
        self.post(rv.SendWR(wr_id, WrOpcode.RDMA_WRITE, views, va, rkey, signaled=signaled))

    def fetch_add(self, wr_id: int, rkey: int, va: int, add: int) -> None:
        """An unsignaled RDMA FETCH_ADD of ``add`` (mod 2^64) at ``va`` of window ``rkey``."""
        self.post(rv.SendWR(wr_id, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(bytearray(8))], va, rkey,
                            compare_add=add & ((1 << 64) - 1), signaled=False))

    def kick(self, now: float) -> None:
        """After posting: send, collect, and re-arm the timer."""
        self._kick_due = False
        self.pump(now)
        if self.notify is not None:
            self.notify()

    def sink_window(self, key: int) -> None:
        """The job behind window ``key`` is gone: what the peer still WRITEs
        there (a WRITE already under way included) lands nowhere."""
        self.table.sink(key)
        cur = self.rc.responder.cur if self.rc is not None else None
        if type(cur) is _WriteCtx and cur.rkey == key:
            cur.view = cast(memoryview, _Sink(len(cur.view)))  # the native path refuses it: Python drops

    # ----------------------------------------------- the fabric's wire QP face
    def receive(self, pkt, now: float, pump: bool = True) -> None:
        rc = self.rc
        if rc is None:
            return
        rc.receive(pkt, now)
        if pump:
            self.pump(now)

    def pump(self, now: float) -> None:
        """Packets out, completions to the owner (which may post more), until quiet."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                rc = self.rc
                if rc is None:
                    return
                pkts = rc.transmit_raw(now)
                if pkts:
                    self.fabric.transmit(pkts, self.peer)
                sends, recvs = rc.poll_send_cq(), rc.poll_recv_cq()
                if rc.state is QpState.ERR:
                    m = rc.metrics
                    self._down(f"the RC QP failed (timeouts {m.timeouts}, NAKs {m.fatal_naks_received}, "
                               f"remote access NAKs sent {m.remote_access_naks})", now)
                    return
                if not sends and not recvs:
                    return
                for c in sends:
                    self.owner.on_send_done(self, c.wr_id, c.status)
                for c in recvs:
                    self._received(c)
        finally:
            self._pumping = False

    def _received(self, c: rv.Completion) -> None:
        if c.status is not WcStatus.SUCCESS or self.rc is None or not 0 <= c.wr_id < len(self._recv):
            return
        mv = self._recv[c.wr_id]
        data = bytes(mv[:c.byte_len])
        self.rc.post_recv(c.wr_id, [mv])
        self.metrics.messages_received += 1
        self.owner.on_message(self, data)

    def deadline(self) -> float | None:
        ds = [d for d in (self.rc.next_deadline() if self.rc is not None else None,
                          self._next_connect, self._next_keepalive) if d is not None]
        return min(ds) if ds else None

    def on_timer(self, now: float) -> None:
        if self.rc is not None:
            self.rc.handle_timer(now)
        c = self.config
        if self._next_connect is not None and now >= self._next_connect and not self.closed:
            self._next_connect = now + c.connect_interval * self._backoff  # first: _make_qp may raise
            self._backoff = min(self._backoff * 2, 8)
            if self.state is not LinkState.CONNECTING:
                self._make_qp(now)
                self.state = LinkState.CONNECTING
                self.attempt += 1
            self._send_connect(self._connect_msg(ConnectType.REQ, 0))
            self.metrics.reqs_sent += 1
        if self._next_keepalive is not None and now >= self._next_keepalive and self.rc is not None:
            try:
                self.write(0, [], 0, signaled=False)  # zero-length: no R_Key, no payload, one ACK
                self.metrics.keepalives += 1
            except TransportError:
                pass
            self._next_keepalive = now + c.keepalive
        self.pump(now)

    def describe(self) -> dict:
        return {"peer": self.peer, "state": self.state.value, "qpn": self.qpn,
                "peer_qpn": self.peer_qpn, "peer_credits": self.peer_credits,
                "windows": len(self.table), **self.metrics.as_dict(),
                "transport": self.last_transport if self.rc is None else asdict(self.rc.metrics)}
