"""A daemon-owned RC link to one peer daemon over the host's RDMA device (docs/peering.md).

The verbs counterpart of :class:`peering.link.PeerLink`, for a daemon on
:class:`fabric.hca.VerbsFabric` (kernel rxe or a NIC): the link's QP is a
real device QP (pyverbs) on the fabric's own device context, so every job
message, input, output, probe and board operation is an RDMA operation the
kernel (or the NIC) carries. :class:`peering.remote.PeerTarget` drives it
through the same calls (``send``/``write``/``read``/``fetch_add``, ``table``,
``kick``, the ``peer_*`` fields, :class:`~peering.link.LinkOwner` callbacks).

* **Connection: RDMA CM** (librdmacm through :mod:`pyverbs.cmid`, port
  space TCP, :data:`CM_PORT`). Every daemon listens on its fabric address
  (:class:`CmListener`, one per daemon); as on the RoCE link the lower
  address is the active side. Its CM ID resolves the peer's address and
  route, the link makes its QP (INIT) and connects; the REQ's private data
  is a :class:`ReqHello` (magic, incarnation, attempt, the sender's
  address: pyverbs gives the listener no route of a request, so the
  request names its sender). The passive side finds the link of that
  address, makes its QP, takes it through INIT, RTR and RTS with the
  attributes the CM gives (``rdma_init_qp_attr``) and accepts; the REP's
  private data is its whole :class:`peering.wire.ConnectMsg` (116 bytes:
  a REP carries up to 196, a REQ only 56). The active side, on the
  CONNECT_RESPONSE, takes its QP to RTS, completes the connection
  (``rdma_establish``) and SENDs its own ConnectMsg as the link's first
  message; the passive side is UP when that arrives. A request from a new
  incarnation or attempt replaces the link (the peer restarted or saw it
  fail). The QPs are "external" to the CM (made on the fabric's context,
  the CM only exchanges their numbers), so the windows below can be
  registered with a chosen IOVA (:class:`fabric.uverbs.KernelMr`).
* **Authentication** (``vrdma backend --fabric verbs --cluster-key FILE``;
  every daemon of the cluster the same key). Without a key the hello is
  taken on trust: anyone who can reach the listener can claim to be a peer
  (and be sent that peer's jobs). With one, each link's handshake key
  (:func:`derive_link_key`: HMAC-SHA256 of the cluster key and
  :data:`LINK_KEY_LABEL`, used for nothing else) makes it challenge-response:
  the hello carries a 16-byte tag bound to the listener's address (52 of a
  REQ's 56 bytes), checked before the address it names is looked at; the REP
  carries the passive side's ConnectMsg, a fresh 16-byte challenge and a tag
  over them and the hello (the active side checks it); the active side's
  first SEND carries its ConnectMsg and a tag over the whole exchange,
  challenge included, and the passive side is UP only if it checks. A
  replayed hello is stale (its incarnation and attempt are not newer) or, on
  a link that is DOWN, cannot answer the new challenge. Refusals are counted
  (``auth_failures`` on the listener and on the link). The RDMA traffic of an
  UP link is not authenticated (verbs RC gives no such thing): the key keeps
  an off-path host from joining, not an on-path one from tampering.
* **Liveness**: a CM DISCONNECTED (active side: its own event channel),
  a connection that does not complete within ``connect_timeout``, or an
  error completion (the QP is in ERR: retry budget exceeded, a remote
  access NAK, a flush) takes the link DOWN: ``on_down`` gives its jobs
  back exactly as on the RoCE link, and the active side connects again.
  While UP a zero-length RDMA WRITE goes out every ``keepalive`` seconds,
  so a dead peer is noticed within ``keepalive`` + the retry budget. A
  passive link's CM events reach the listener's channel, which cannot tell
  which link a DISCONNECTED names: it sends a keepalive on every passive
  link at once instead.
* **Messages**: SEND payloads are copied into slots of one registered send
  buffer; receives land in slots of one registered receive buffer (as many
  as the credits both ways allow, plus slack), reposted as consumed.
  Local memory an RDMA WRITE sends from or a READ lands in (a guest's
  input, the staging output, a probe buffer) is registered for that work
  request (LOCAL access only) and deregistered when it completes: every
  work request is signaled on the device, the owner sees the completions
  it asked for.
* **Windows** (:class:`VerbsWindowTable`): each window is a device MR
  registered over the job's buffer at IOVA 0 (so the peer addresses bytes
  by offset, as on the RoCE link), with the window's rights only:
  REMOTE_WRITE (and the LOCAL_WRITE verbs requires with it) for a job's
  output and staging windows and the landing slots; REMOTE_READ for the
  counters; the board's READ, slot WRITE and announced-work ATOMIC windows
  as on the RoCE link. A window is deregistered when its job ends. A
  window whose job was **abandoned** (its queue or device went, or it timed
  out) is deregistered at once: the guest's memory is never written after
  that. A WRITE the peer still sends there is NAKed by the device with a
  remote access error, which on a verbs RC QP is fatal to the peer's QP:
  the link goes DOWN on both sides and reconnects, and the jobs in flight
  on it are given back (re-run locally or REMOTE_FAILED, per queue). That
  is our choice: a link reset, never a write into memory that is no longer
  the job's. An output scattered over several guest buffers is received
  in one registered bounce buffer and copied into them when the result
  closes the window.

Ownership: the link owns one PD (its life), and per connection one CM ID
with its event channel, one CQ with its completion channel, one QP, the
message buffers and the windows; :meth:`VerbsPeerLink._drop_qp` releases
them in the reverse order. :attr:`VerbsLinkMetrics.live_mrs` and
``live_qps`` count what is registered now (the tests assert they return
to zero, and ``rdma resource show`` in a kernel-rxe guest agrees).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import count
from typing import Any

import construct as cs
import numpy as np

from fabric.uverbs import KernelMr
from peering.link import RECV_SLACK, LinkBase, LinkConfig, LinkOwner, LinkState
from peering.wire import CONNECT_SIZE, MAX_MESSAGE, ConnectMsg, ConnectType, PeerWireError
from roce.errors import TransportError
from scheduler.board import counters_offset, inbound_base
from scheduler.wire import COUNTERS_SIZE
from verbs import Access, WcStatus, WrOpcode
from virtio_rdma.errors import FabricError

log = logging.getLogger(__name__)

#: the RDMA CM port (TCP port space) every daemon's listener binds on its fabric address
CM_PORT = 4793
#: "VRPC": vrdma peer connect (the REQ's private data)
HELLO_MAGIC = 0x43505256
HELLO_VERSION = 1
#: private data bytes a REQ carries in the TCP port space over IB/RoCE CM (92 - 36 of CM header)
REQ_PRIVATE_DATA = 56
#: ... and a REP (the IB CM REP's private data; RDMA CM adds no header)
REP_PRIVATE_DATA = 196
#: the peer credits a link's receive queue has room for (a peer offering more is held to this)
MAX_PEER_CREDITS = 1024
#: send work requests in flight on one link QP
SEND_DEPTH = 2048
#: with a link key (``--cluster-key``): the tags of the authenticated handshake, and the
#: passive side's challenge (see "Authentication" in the module doc)
TAG = 16
NONCE = 16
#: the label a link key is derived from the cluster key with (no other use shares it)
LINK_KEY_LABEL = b"vrdma verbs peer link handshake v1"
#: bytes of a send or receive slot: a link message, or the active side's ConnectMsg (its first
#: SEND, tagged when the links are keyed)
SLOT = -(-max(MAX_MESSAGE, CONNECT_SIZE + TAG) // 64) * 64
#: RDMA READs and atomics in flight each way
RD_ATOMIC = 16
_RECV_BIT = 1 << 63
PAGE = 4096
_CM_FD = "/dev/infiniband/rdma_cm"
_EVENT_FD = "anon_inode:[infinibandevent]"


class VerbsLinkError(FabricError):
    """A verbs peer link operation the device or the CM refused."""


# --------------------------------------------------------------------------
# The REQ's private data (pure codec)
# --------------------------------------------------------------------------
HelloLayout = cs.Struct(
    "magic" / cs.Const(HELLO_MAGIC, cs.Int32ul),
    "version" / cs.Int8ul,
    "family" / cs.Int8ul,          # 4 or 6
    "reserved" / cs.Const(0, cs.Int16ul),
    "incarnation" / cs.Int64ul,    # the sender daemon's
    "attempt" / cs.Int32ul,        # its connection attempt (counts up)
    "address" / cs.Bytes(16),      # its fabric address (IPv4: the first 4 bytes, the rest zero)
)
HELLO_SIZE = HelloLayout.sizeof()
assert HELLO_SIZE <= REQ_PRIVATE_DATA


@dataclass(frozen=True, slots=True)
class ReqHello:
    incarnation: int
    attempt: int
    address: str

    def encode(self) -> bytes:
        ip = ipaddress.ip_address(self.address)
        return HelloLayout.build(dict(version=HELLO_VERSION, family=ip.version, incarnation=self.incarnation,
                                      attempt=self.attempt, address=ip.packed.ljust(16, b"\0")))

    @classmethod
    def decode(cls, data: bytes) -> ReqHello:
        if len(data) < HELLO_SIZE:
            raise PeerWireError(f"connect request private data of {len(data)} bytes (need {HELLO_SIZE})",
                                "length")
        try:
            h = HelloLayout.parse(bytes(data[:HELLO_SIZE]))
        except cs.ConstructError as e:
            raise PeerWireError(f"connect request: {e}", "magic/reserved") from None
        if h.version != HELLO_VERSION:
            raise PeerWireError(f"connect request version {h.version} (this daemon: {HELLO_VERSION})",
                                "version")
        if h.family == 4:
            if any(h.address[4:]):
                raise PeerWireError("IPv4 connect request with bytes past its address", "address")
            addr = str(ipaddress.IPv4Address(h.address[:4]))
        elif h.family == 6:
            addr = str(ipaddress.IPv6Address(h.address))
        else:
            raise PeerWireError(f"connect request address family {h.family}", "family")
        return cls(h.incarnation, h.attempt, addr)


assert HELLO_SIZE + TAG <= REQ_PRIVATE_DATA and CONNECT_SIZE + NONCE + TAG <= REP_PRIVATE_DATA


# --------------------------------------------------------------------------
# The authenticated handshake (pure: keys, tags, checks)
# --------------------------------------------------------------------------
def derive_link_key(cluster_key: bytes) -> bytes:
    """The links' handshake key of a cluster key (``vrdma keygen``; 32 bytes)."""
    if len(cluster_key) != 32:
        raise VerbsLinkError(f"cluster key is {len(cluster_key)} bytes, not 32")
    return hmac.new(cluster_key, LINK_KEY_LABEL, hashlib.sha256).digest()


def _tag(key: bytes, label: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, label, hashlib.sha256)
    for part in parts:  # length-prefixed: no two splits of the same bytes give one tag
        h.update(len(part).to_bytes(2, "big"))
        h.update(part)
    return h.digest()[:TAG]


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def sealed_hello(key: bytes, hello: bytes, to: str) -> bytes:
    """The REQ's private data with a link key: the hello and its tag, bound to the
    listener's address ``to`` (a hello for one daemon is refused by another)."""
    return hello + _tag(key, b"req", hello, _packed(to))


def open_hello(key: bytes, private: bytes, me: str) -> bytes:
    """The hello of a keyed REQ received by the listener on ``me``; PeerWireError
    (field ``tag``) if its tag is missing or wrong."""
    hello, tag = bytes(private[:HELLO_SIZE]), bytes(private[HELLO_SIZE:HELLO_SIZE + TAG])
    if len(tag) < TAG or not hmac.compare_digest(tag, _tag(key, b"req", hello, _packed(me))):
        raise PeerWireError("connect request without a valid tag (no key, or another cluster's)", "tag")
    return hello


def sealed_reply(key: bytes, hello: bytes, reply: bytes, nonce: bytes) -> bytes:
    """The REP's private data with a link key: the passive side's ConnectMsg, its fresh
    challenge, and a tag over both and the request they answer."""
    return reply + nonce + _tag(key, b"rep", hello, reply, nonce)


def open_reply(key: bytes, hello: bytes, private: bytes) -> tuple[bytes, bytes]:
    """(ConnectMsg bytes, challenge) of a keyed REP answering ``hello``; PeerWireError if
    its tag is wrong."""
    reply = bytes(private[:CONNECT_SIZE])
    nonce = bytes(private[CONNECT_SIZE:CONNECT_SIZE + NONCE])
    tag = bytes(private[CONNECT_SIZE + NONCE:CONNECT_SIZE + NONCE + TAG])
    if len(tag) < TAG or not hmac.compare_digest(tag, _tag(key, b"rep", hello, reply, nonce)):
        raise PeerWireError("connect reply without a valid tag", "tag")
    return reply, nonce


def connect_tag(key: bytes, hello: bytes, reply: bytes, nonce: bytes, mine: bytes) -> bytes:
    """The tag after the active side's ConnectMsg (its first SEND): over the whole
    exchange, the passive side's challenge included, so it cannot be replayed."""
    return _tag(key, b"connect", hello, reply, nonce, mine)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def address_of(view) -> int:
    """The host address of a buffer's first byte."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def page_aligned(n: int) -> memoryview:
    """``n`` zeroed bytes starting on a page boundary (a window over them can be at IOVA 0)."""
    raw = np.zeros(n + PAGE, dtype=np.uint8)
    off = -int(raw.ctypes.data) % PAGE
    return raw[off:off + n].data


def is_page_aligned(view) -> bool:
    return len(view) > 0 and address_of(view) % PAGE == 0


def _fds(kind: str) -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == kind:
                out.add(int(name))
        except OSError:
            continue
    return out


def _new_fd(before: set[int], kind: str) -> int:
    new = _fds(kind) - before
    if len(new) != 1:
        raise VerbsLinkError(f"cannot tell the new {kind} fd ({sorted(new)})")
    return new.pop()


def _private(ev) -> bytes:
    pd = ev.private_data
    if callable(pd):
        pd = pd()
    return bytes(pd or b"")


def _errno_of(e: Exception) -> int | None:
    for name in ("error_code", "errno"):
        v = getattr(e, name, None)
        if isinstance(v, int):
            return v
    return None


@dataclass(slots=True)
class CmEvent:
    """What the link needs of one RDMA CM event, taken before it is acknowledged
    (destroying a CM ID waits for its events' acknowledgements)."""

    type: int
    name: str
    private: bytes
    child: Any = None   # CONNECT_REQUEST on a listener: the new CM ID (pyverbs CMID)


class CmChannel:
    """An RDMA CM event channel whose fd is non-blocking and watched by the
    daemon's loop (pyverbs does not show the fd: it is found as the one new
    ``rdma_cm`` fd). ``listen_id``: the listening CM ID whose requests make
    new IDs."""

    def __init__(self, watch, on_event: Callable[[CmEvent], None]):
        from pyverbs.cmid import CMEventChannel

        before = _fds(_CM_FD)
        self.channel: Any = CMEventChannel()
        try:
            self.fd = _new_fd(before, _CM_FD)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        except Exception:
            self.channel.close()
            raise
        self.on_event = on_event
        self.listen_id: Any = None
        self._unwatch: Any = None
        if watch is not None:
            watch[0](self.fd, self.drain)
            self._unwatch = watch[1]

    def drain(self) -> None:
        """Take every pending event: copy it, acknowledge it, then handle it."""
        import pyverbs.cm_enums as ce
        from pyverbs.cmid import CMID, CMEvent as PvEvent
        from pyverbs.pyverbs_error import PyverbsError

        while self.channel is not None:
            try:
                ev = PvEvent(self.channel)
            except PyverbsError as e:
                if _errno_of(e) in (errno.EAGAIN, errno.EWOULDBLOCK, None):
                    return
                raise
            try:
                rec = CmEvent(ev.event_type, ev.event_str(), _private(ev))
                if rec.type == ce.RDMA_CM_EVENT_CONNECT_REQUEST and self.listen_id is not None:
                    rec.child = CMID(creator=ev, listen_id=self.listen_id)
            finally:
                ev.close()
            self.on_event(rec)

    def close(self) -> None:
        if self._unwatch is not None:
            un, self._unwatch = self._unwatch, None
            un(self.fd)
        ch, self.channel = self.channel, None
        if ch is not None:
            ch.close()


# --------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------
@dataclass(slots=True)
class VerbsLinkMetrics:
    connects: int = 0            # times the link came UP
    failures: int = 0            # times it went DOWN from UP or CONNECTING
    reqs_sent: int = 0           # CM connect requests
    reps_sent: int = 0           # CM accepts
    stale_connects: int = 0      # requests refused (wrong side, stale attempt)
    auth_failures: int = 0       # keyed links: a reply or first message without a valid tag
    connect_timeouts: int = 0
    cm_events: int = 0
    messages_received: int = 0
    keepalives: int = 0
    access_naks: int = 0         # our requests NAKed by the peer's device (a bad key, rights, bounds)
    mrs_registered: int = 0      # device MRs (windows and per-WR local ones)
    mrs_deregistered: int = 0
    live_mrs: int = 0
    live_qps: int = 0
    bounced_windows: int = 0     # job windows received in a bounce buffer (copied at close)

    def as_dict(self) -> dict:
        return asdict(self)


class _VWindow:
    __slots__ = ("mr", "views", "bounce", "length")

    def __init__(self, mr: KernelMr, views: list, bounce: np.ndarray | None, length: int):
        self.mr, self.views, self.bounce, self.length = mr, views, bounce, length


class VerbsWindowTable:
    """R_Key -> device MR over a job's buffers: the peer's only way into this
    host's memory. Each window is an MR at IOVA 0 with the window's rights."""

    def __init__(self, link: VerbsPeerLink):
        self.link = link
        self._w: dict[int, _VWindow] = {}

    def __len__(self) -> int:
        return len(self._w)

    def open(self, views: list[memoryview], access: Access) -> int:
        """A window over ``views`` (their concatenation) granting ``access``; its R_Key."""
        length = sum(len(v) for v in views)
        if length == 0:
            raise VerbsLinkError("a window of 0 bytes")
        bounce = None
        rights = Access(int(access))
        if len(views) == 1 and is_page_aligned(views[0]):
            start = address_of(views[0])
        elif rights == Access.REMOTE_WRITE:
            # the kernel registers an MR only at an IOVA with its memory's offset in the page,
            # and the peer addresses a window from 0; so a window over several buffers, or one
            # not starting on a page, is a page-aligned bounce buffer, copied into them when it
            # closes (the job's result or GO: the peer's WRITEs are all in)
            b = page_aligned(length)
            bounce = np.frombuffer(b, dtype=np.uint8)
            start = address_of(b)
            self.link.metrics.bounced_windows += 1
        else:
            raise VerbsLinkError(f"a {rights!r} window must be one page-aligned buffer (the peer reads "
                                 "or updates it live)")
        if rights & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC):
            rights |= Access.LOCAL_WRITE  # verbs: remote write and atomic need local write
        mr = self.link.register(start, length, rights, iova=0)
        self._w[mr.rkey] = _VWindow(mr, list(views), bounce, length)
        return mr.rkey

    def close(self, key: int) -> None:
        """The job is done: a scattered window's bytes go to its buffers, the MR is deregistered."""
        w = self._w.pop(key, None)
        if w is None:
            return
        self.link.deregister(w.mr)
        if w.bounce is not None and w.views:
            off = 0
            for v in w.views:
                n = len(v)
                v[:] = w.bounce[off:off + n].data
                off += n

    def sink(self, key: int) -> None:
        """The job behind ``key`` is gone: deregister at once (a late WRITE of the
        peer is NAKed with a remote access error; see the module doc)."""
        w = self._w.pop(key, None)
        if w is not None:
            w.views = []
            self.link.deregister(w.mr)

    def clear(self) -> None:
        for key in list(self._w):
            self.sink(key)


# --------------------------------------------------------------------------
# The link
# --------------------------------------------------------------------------
class _Wr:
    __slots__ = ("wr_id", "signaled", "slot", "mrs", "bounce")

    def __init__(self, wr_id: int, signaled: bool):
        self.wr_id = wr_id
        self.signaled = signaled
        self.slot: int | None = None
        self.mrs: list[KernelMr] = []
        self.bounce: Any = None


class VerbsPeerLink(LinkBase):
    """The RC link to daemon ``peer`` over the verbs fabric ``fabric``."""

    def __init__(self, fabric, peer: str, owner: LinkOwner, *, incarnation: int, active: bool,
                 credits: int, ops, config: LinkConfig | None = None, port: int = CM_PORT,
                 connect_timeout: float = 2.0, key: bytes | None = None):
        super().__init__(fabric, peer, owner, incarnation=incarnation, active=active, credits=credits,
                         ops=ops, config=config)
        #: the handshake key (derive_link_key), or None: the peer's hello is taken on trust
        self.key = key
        #: keyed: the exchange so far, (hello as sent, reply ConnectMsg, challenge)
        self._exchange: tuple[bytes, bytes, bytes] | None = None
        self.port = port
        self.connect_timeout = connect_timeout
        self.metrics = VerbsLinkMetrics()
        self.table = VerbsWindowTable(self)
        self._pd: Any = None
        self._cmid: Any = None
        self._chan: CmChannel | None = None
        self._qp: Any = None
        self._cq: Any = None
        self._cc: Any = None
        self._cc_fd: int | None = None
        self._send_mr: Any = None
        self._free_slots: list[int] = []
        self._recv_mr: Any = None
        self._recv_posted = 0
        self._wrs: dict[int, _Wr] = {}
        self._ids = count(1)
        self._empty: Any = None
        self._connect_deadline: float | None = None
        self._hello_pending = False   # passive: accepted, waiting for the peer's ConnectMsg
        self._polling = False
        self._clock: Callable[[], float] | None = None

    # ------------------------------------------------------------ plumbing
    def _now(self) -> float:
        from time import monotonic

        return (self._clock or monotonic)()

    def _watch(self):
        w, u = getattr(self.fabric, "watch", None), getattr(self.fabric, "unwatch", None)
        return (w, u) if w is not None and u is not None else None

    def register(self, start: int, length: int, access: Access, iova: int | None = None) -> KernelMr:
        """A device MR over host memory [start, +length) in the link's PD."""
        pd = self._ensure_pd()
        try:
            mr = KernelMr(self.fabric.ctx.cmd_fd, pd.handle, start, length,
                          start if iova is None else iova, int(access))
        except FabricError as e:
            raise VerbsLinkError(f"peer link {self.peer}: {e}", e.status) from None
        self.metrics.mrs_registered += 1
        self.metrics.live_mrs += 1
        return mr

    def deregister(self, mr: KernelMr) -> None:
        if mr.cmd_fd is None:
            return
        try:
            mr.close()
        except FabricError as e:
            log.warning("peer link %s: %s", self.peer, e)
        self.metrics.mrs_deregistered += 1
        self.metrics.live_mrs -= 1

    def _ensure_pd(self):
        if self._pd is None:
            from pyverbs.pd import PD

            self._pd = PD(self.fabric.ctx)
        return self._pd

    # ------------------------------------------------------------ connection
    def _make_qp(self) -> None:
        """This connection's CQ, QP (RESET), message buffers and windows."""
        import pyverbs.enums as e
        from pyverbs.cq import CQ, CompChannel
        from pyverbs.mr import MR
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self._drop_conn()
        pd = self._ensure_pd()
        attr = self.fabric.device_attr
        recv_depth = self.credits + RECV_SLACK + MAX_PEER_CREDITS
        send_depth = min(SEND_DEPTH, attr.max_qp_wr)
        recv_depth = min(recv_depth, attr.max_qp_wr)
        before = _fds(_EVENT_FD)
        self._cc = CompChannel(self.fabric.ctx)
        self._cc_fd = fd = _new_fd(before, _EVENT_FD)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._cq = CQ(self.fabric.ctx, min(send_depth + recv_depth, attr.max_cqe), None, self._cc, 0)
        cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
        self._qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap))
        self.metrics.live_qps += 1
        self.qpn = self._qp.qp_num
        self._cq.req_notify()
        w = self._watch()
        if w is not None:
            w[0](self._cc_fd, self._on_cq_event)
        self._send_mr = MR(pd, send_depth * SLOT, e.IBV_ACCESS_LOCAL_WRITE)
        self._free_slots = list(range(send_depth - 1, -1, -1))
        self._recv_mr = MR(pd, recv_depth * SLOT, e.IBV_ACCESS_LOCAL_WRITE)
        self._recv_depth = recv_depth
        self._recv_posted = 0
        self._empty = MR(pd, 64, e.IBV_ACCESS_LOCAL_WRITE)
        self.table = VerbsWindowTable(self)
        # the live windows (the peer writes or reads them in place): offered only when they
        # start on a page (an MR's IOVA keeps its memory's offset in the page; see the module doc)
        if self.landing is not None and is_page_aligned(self.landing[0]):
            self.landing_rkey = self.table.open([self.landing[0]], Access.REMOTE_WRITE)
        if self.counters is not None and is_page_aligned(self.counters):
            self.counters_rkey = self.table.open([self.counters], Access.REMOTE_READ)
        if self.board is not None:
            region, n, slot = self.board
            own = region[counters_offset(slot):counters_offset(slot) + COUNTERS_SIZE]
            inbound = region[inbound_base(n):]
            if all(is_page_aligned(v) for v in (region, own, inbound)):
                self.board_keys = (n, self.table.open([region], Access.REMOTE_READ),
                                   self.table.open([own], Access.REMOTE_WRITE),
                                   self.table.open([inbound], Access.REMOTE_ATOMIC))

    def _modify(self, cmid, state: int) -> None:
        import pyverbs.enums as e

        attr, mask = cmid.init_qp_attr(state)
        if state == e.IBV_QPS_INIT:
            attr.qp_access_flags = int(Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC)
            mask |= e.IBV_QP_ACCESS_FLAGS
        elif state == e.IBV_QPS_RTR:
            attr.min_rnr_timer = self.config.min_rnr_timer
            mask |= e.IBV_QP_MIN_RNR_TIMER
        elif state == e.IBV_QPS_RTS:
            attr.timeout = self.config.timeout
            attr.retry_cnt = self.config.retry_cnt
            attr.rnr_retry = self.config.rnr_retry
            mask |= e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
        self._qp.modify(attr, mask)

    def _conn_param(self, private: bytes):
        from pyverbs.cmid import ConnParam

        rd = min(RD_ATOMIC, self.fabric.device_attr.max_qp_rd_atom,
                 self.fabric.device_attr.max_qp_init_rd_atom)
        p = ConnParam(resources=rd, depth=rd, retry=self.config.retry_cnt,
                      rnr_retry=self.config.rnr_retry, qp_num=self.qpn, data_len=len(private))
        p.set_private_data(private)  # pyverbs 44: sends data_len bytes of it
        return p

    def _connect_msg(self, kind: int, echo: int) -> ConnectMsg:
        slots, kib = self.landing[1:] if self.landing is not None else (0, 0)
        return ConnectMsg(kind, self.incarnation, echo, self.attempt, self.qpn, 0, self.credits,
                          self.config.mtu, tuple(self._ops()), self.landing_rkey if slots else 0, slots, kib,
                          self.counters_rkey,
                          len(self.counters) if self.counters_rkey and self.counters is not None else 0,
                          self.board_keys)

    def _try_connect(self, now: float) -> None:
        """Active side: a new CM ID resolves the peer (the rest follows its events)."""
        import pyverbs.cm_enums as ce
        from pyverbs.cmid import CMID, AddrInfo

        self._drop_qp()
        self.attempt += 1
        self.state = LinkState.CONNECTING
        self._connect_deadline = now + self.connect_timeout * self._backoff
        self._chan = CmChannel(self._watch(), self._on_cm_event)
        self._cmid = CMID(creator=self._chan.channel)
        ai = AddrInfo(src=self.fabric.address, dst=self.peer, dst_service=str(self.port),
                      port_space=ce.RDMA_PS_TCP)
        try:
            self._cmid.resolve_addr(ai, int(self.connect_timeout * 1000))
        finally:
            ai.close()
        self.metrics.reqs_sent += 1

    def _on_cm_event(self, ev: CmEvent) -> None:
        """An event of the active side's CM ID."""
        import pyverbs.cm_enums as ce
        import pyverbs.enums as e

        self.metrics.cm_events += 1
        t = ev.type
        now = self._now()
        if self._cmid is None:
            return
        try:
            if t == ce.RDMA_CM_EVENT_ADDR_RESOLVED:
                self._cmid.resolve_route(int(self.connect_timeout * 1000))
            elif t == ce.RDMA_CM_EVENT_ROUTE_RESOLVED:
                self._make_qp()
                self._modify(self._cmid, e.IBV_QPS_INIT)
                self._post_recvs(self.credits + RECV_SLACK)
                hello = ReqHello(self.incarnation, self.attempt, self.fabric.address).encode()
                if self.key is not None:
                    self._exchange = (hello, b"", b"")
                    self._cmid.connect(self._conn_param(sealed_hello(self.key, hello, self.peer)))
                else:
                    self._cmid.connect(self._conn_param(hello))
            elif t == ce.RDMA_CM_EVENT_CONNECT_RESPONSE:
                try:
                    if self.key is not None:
                        hello = self._exchange[0] if self._exchange is not None else b""
                        try:
                            reply, nonce = open_reply(self.key, hello, ev.private)
                        except PeerWireError:
                            self.metrics.auth_failures += 1
                            raise
                        self._exchange = (hello, reply, nonce)
                    msg = ConnectMsg.decode(ev.private)
                except PeerWireError as err:
                    self.metrics.stale_connects += 1
                    self._down(f"the peer's connect reply is malformed: {err}", now)
                    return
                if msg.type != ConnectType.REP or msg.echo != self.incarnation or msg.attempt != self.attempt:
                    self.metrics.stale_connects += 1
                    self._down("the peer's connect reply names another attempt", now)
                    return
                self._modify(self._cmid, e.IBV_QPS_RTR)
                self._modify(self._cmid, e.IBV_QPS_RTS)
                self._cmid.establish()
                self._accept(msg, now)
                # our ConnectMsg is the link's first message (a REQ's private data is too small)
                mine = self._connect_msg(ConnectType.REQ, 0).encode()
                if self.key is not None and self._exchange is not None:
                    mine += connect_tag(self.key, *self._exchange, mine)
                self._post_send(0, WrOpcode.SEND, [memoryview(mine)], signaled=False)
                self._up(now)
            elif t == ce.RDMA_CM_EVENT_DISCONNECTED:
                self._down("the peer disconnected (RDMA CM)", now)
            elif t in (ce.RDMA_CM_EVENT_ADDR_ERROR, ce.RDMA_CM_EVENT_ROUTE_ERROR,
                       ce.RDMA_CM_EVENT_CONNECT_ERROR, ce.RDMA_CM_EVENT_UNREACHABLE,
                       ce.RDMA_CM_EVENT_REJECTED, ce.RDMA_CM_EVENT_DEVICE_REMOVAL):
                self._down(f"RDMA CM: {ev.name}", now)
        except Exception as err:  # a refusal of the device or the CM: this attempt fails
            log.debug("peer link %s: %s", self.peer, err, exc_info=True)
            self._down(f"connecting failed: {err}", now)
        self._rearm()

    def on_request(self, cmid, hello: ReqHello, now: float, raw: bytes = b"") -> bool:
        """Passive side: the peer's CM connect request (``cmid`` its new ID, owned
        from here if True is returned: accepted; ``raw``: the hello's bytes, which a
        keyed link's reply and the peer's first message are bound to)."""
        import pyverbs.enums as e

        if self.active or self.closed:
            self.metrics.stale_connects += 1
            log.warning("peer link %s: connect request from a peer this daemon connects to (refused)",
                        self.peer)
            return False
        if (hello.incarnation == self.peer_incarnation and hello.attempt <= self.attempt
                and self.state is not LinkState.DOWN):
            self.metrics.stale_connects += 1
            return False
        if self.state is not LinkState.DOWN:
            self._down("the peer connected again (restarted, or saw the link fail)", now)
        self._make_qp()
        self._cmid = cmid
        self.attempt = hello.attempt
        self.peer_incarnation = hello.incarnation
        try:
            self._modify(cmid, e.IBV_QPS_INIT)
            self._post_recvs(self.credits + RECV_SLACK + MAX_PEER_CREDITS)
            self._modify(cmid, e.IBV_QPS_RTR)
            self._modify(cmid, e.IBV_QPS_RTS)
            reply = self._connect_msg(ConnectType.REP, hello.incarnation).encode()
            if self.key is not None:
                nonce = secrets.token_bytes(NONCE)
                self._exchange = (raw, reply, nonce)
                reply = sealed_reply(self.key, raw, reply, nonce)
            cmid.accept(self._conn_param(reply))
        except Exception as err:
            self._cmid = None  # the caller closes it
            self._drop_qp()
            log.warning("peer link %s: accepting its request failed: %s", self.peer, err)
            return False
        self.metrics.reps_sent += 1
        self.state = LinkState.CONNECTING
        self._hello_pending = True
        self._connect_deadline = now + self.connect_timeout
        self._rearm()
        return True

    def _accept(self, msg: ConnectMsg, now: float) -> None:
        self._take_peer(msg, min(msg.credits, MAX_PEER_CREDITS))
        self.peer_qpn = msg.qpn
        if self.active:
            self._post_recvs(self.peer_credits)  # their results for our jobs, and their jobs' messages

    def _up(self, now: float) -> None:
        self.state = LinkState.UP
        self.metrics.connects += 1
        self._next_connect = None
        self._connect_deadline = None
        self._backoff = 1
        self._next_keepalive = now + self.config.keepalive
        self.owner.on_up(self)  # type: ignore[arg-type]
        self.kick(now)

    def fail(self, reason: str, now: float) -> None:
        self._down(reason, now)

    def _down(self, reason: str, now: float) -> None:
        if self.state is LinkState.DOWN:
            self._drop_qp()
            if self.active and not self.closed:
                self._next_connect = now + self.config.connect_interval * self._backoff
                self._backoff = min(self._backoff * 2, 8)
            return
        log.info("peer link %s down: %s", self.peer, reason)
        self.state = LinkState.DOWN
        self.metrics.failures += 1
        self.epoch += 1
        self._hello_pending = False
        self._connect_deadline = None
        self._next_keepalive = None
        self._drop_qp()
        self.owner.on_down(self, reason)  # type: ignore[arg-type]
        if self.active and not self.closed:
            self._next_connect = now + self.config.connect_interval * self._backoff
            self._backoff = min(self._backoff * 2, 8)
        self._rearm()

    def _drop_qp(self) -> None:
        """Release this connection's objects: CM ID and its channel, QP, CQ and its
        channel, buffers, windows."""
        cm, chan, self._cmid, self._chan = self._cmid, self._chan, None, None
        self._exchange = None
        if cm is not None:
            try:
                cm.disconnect()
            except Exception:
                pass
        self._drop_conn()
        if cm is not None:
            try:
                cm.close()
            except Exception as e:
                log.warning("peer link %s: closing its CM ID: %s", self.peer, e)
        if chan is not None:
            chan.close()

    def _drop_conn(self) -> None:
        """Release the QP, CQ, buffers and windows (the CM ID stays)."""
        qp, self._qp = self._qp, None
        if qp is not None:
            self.last_transport = {"qpn": self.qpn}
            qp.close()
            self.metrics.live_qps -= 1
        if self._cc_fd is not None:
            w = self._watch()
            if w is not None:
                w[1](self._cc_fd)
            self._cc_fd = None
        for name in ("_cq", "_cc"):
            obj = getattr(self, name)
            if obj is not None:
                setattr(self, name, None)
                obj.close()
        for wr in self._wrs.values():
            for mr in wr.mrs:
                self.deregister(mr)
        self._wrs.clear()
        self.table.clear()
        for name in ("_send_mr", "_recv_mr", "_empty"):
            obj = getattr(self, name)
            if obj is not None:
                setattr(self, name, None)
                obj.close()
        self._free_slots = []
        self._recv_posted = 0
        self._forget_peer()
        self.qpn = 0

    def close(self, now: float = 0.0) -> None:
        """The daemon stops: the link goes DOWN for good (its jobs given back)."""
        self.closed = True
        self._next_connect = None
        self._down("the daemon is stopping", now)
        self._drop_qp()
        pd, self._pd = self._pd, None
        if pd is not None:
            pd.close()

    # -------------------------------------------------------------- posting
    def _post_recvs(self, n: int) -> None:
        n = min(n, self._recv_depth - self._recv_posted)
        for _ in range(n):
            slot = self._recv_posted
            self._recv_posted += 1
            self._post_recv_slot(slot)

    def _post_recv_slot(self, slot: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        mr = self._recv_mr
        sg = SGE(mr.buf + slot * SLOT, SLOT, mr.lkey)
        try:
            wr = RecvWR(wr_id=_RECV_BIT | slot, num_sge=1, sg=[sg])
        finally:
            sg.close()
        try:
            self._qp.post_recv(wr)
        finally:
            wr.close()

    def _post_send(self, wr_id: int, opcode: WrOpcode, views: list[memoryview], rkey: int = 0, va: int = 0,
                   *, signaled: bool = True, compare_add: int = 0) -> None:
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        if self._qp is None:
            raise TransportError(f"peer link {self.peer} is {self.state.value}")
        w = _Wr(wr_id, signaled)
        length = sum(len(v) for v in views)
        try:
            if opcode is WrOpcode.SEND:
                if length > SLOT or not self._free_slots:
                    raise TransportError(f"peer link {self.peer}: a message of {length} bytes, "
                                         f"{len(self._free_slots)} send slots free")
                w.slot = self._free_slots.pop()
                data = b"".join(bytes(v) for v in views)
                self._send_mr.write(data, len(data), w.slot * SLOT)
                sge = (self._send_mr.buf + w.slot * SLOT, length, self._send_mr.lkey)
            elif length == 0:
                sge = (self._empty.buf, 0, self._empty.lkey)
            else:
                local = Access.LOCAL_WRITE if opcode in (WrOpcode.RDMA_READ, WrOpcode.ATOMIC_FETCH_AND_ADD) \
                    else Access(0)
                if len(views) == 1:
                    src = views[0]
                else:  # several buffers: one copy (the device QP has one SGE)
                    w.bounce = src = memoryview(b"".join(bytes(v) for v in views))
                addr = address_of(src)
                mr = self.register(addr, length, local)
                w.mrs.append(mr)
                sge = (addr, length, mr.lkey)
            internal = next(self._ids)
            sg = SGE(*sge)
            try:
                wr = SendWR(wr_id=internal, opcode=int(opcode), num_sge=1, sg=[sg],
                            send_flags=e.IBV_SEND_SIGNALED)
            finally:
                sg.close()
            try:
                if opcode in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_READ):
                    wr.set_wr_rdma(rkey, va)
                elif opcode is WrOpcode.ATOMIC_FETCH_AND_ADD:
                    wr.set_wr_atomic(rkey, va, compare_add, 0)
                self._qp.post_send(wr)
            finally:
                wr.close()
        except TransportError:
            self._release_wr(w)
            raise
        except self.fabric.device_errors as err:
            self._release_wr(w)
            raise TransportError(f"peer link {self.peer}: the device refused a work request: {err}") from None
        self._wrs[internal] = w

    def _release_wr(self, w: _Wr) -> None:
        for mr in w.mrs:
            self.deregister(mr)
        w.mrs = []
        if w.slot is not None:
            self._free_slots.append(w.slot)
            w.slot = None
        w.bounce = None

    def post(self, wr) -> None:
        raise TransportError("a verbs peer link takes send/write/read/fetch_add, not RoCE work requests")

    def send(self, wr_id: int, payload: bytes) -> None:
        self._check_up()
        self._post_send(wr_id, WrOpcode.SEND, [memoryview(payload)])

    def read(self, wr_id: int, into: memoryview, rkey: int, va: int = 0) -> None:
        self._check_up()
        self._post_send(wr_id, WrOpcode.RDMA_READ, [into], rkey, va)

    def write(self, wr_id: int, views: list[memoryview], rkey: int, va: int = 0, *,
              signaled: bool = True) -> None:
        self._check_up()
        self._post_send(wr_id, WrOpcode.RDMA_WRITE, views, rkey, va, signaled=signaled)

    def fetch_add(self, wr_id: int, rkey: int, va: int, add: int) -> None:
        self._check_up()
        self._post_send(wr_id, WrOpcode.ATOMIC_FETCH_AND_ADD, [memoryview(bytearray(8))], rkey, va,
                        signaled=False, compare_add=add & ((1 << 64) - 1))

    def _check_up(self) -> None:
        if self.state is not LinkState.UP or self._qp is None:
            raise TransportError(f"peer link {self.peer} is {self.state.value}")

    def kick(self, now: float) -> None:
        self._kick_due = False
        self.pump(now)
        self._rearm()

    def kick_soon(self, clock) -> None:
        self._clock = clock
        super().kick_soon(clock)

    def sink_window(self, key: int) -> None:
        self.table.sink(key)

    def _rearm(self) -> None:
        if self.notify is not None:
            self.notify()

    # ---------------------------------------------------------- completions
    def _on_cq_event(self) -> None:
        cc, cq = self._cc, self._cq
        if cc is None or cq is None:
            return
        try:
            cc.get_cq_event(cq)
            cq.ack_events(1)
            cq.req_notify()
        except self.fabric.device_errors:
            pass
        self.pump(self._now())
        self._rearm()

    def pump(self, now: float) -> None:
        """Completions to the owner (which may post more), until none is left."""
        if self._polling:
            return
        self._polling = True
        try:
            while self._cq is not None:
                n, wcs = self._cq.poll(64)
                if not n:
                    return
                for wc in wcs:
                    if self._cq is None:
                        return
                    if wc.status != 0:
                        self._error_completion(wc, now)
                        return
                    if wc.wr_id & _RECV_BIT:
                        self._received(wc.wr_id & ~_RECV_BIT, wc.byte_len, now)
                    else:
                        w = self._wrs.pop(wc.wr_id, None)
                        if w is None:
                            continue
                        self._release_wr(w)
                        if w.signaled:
                            self.owner.on_send_done(self, w.wr_id, WcStatus.SUCCESS)  # type: ignore[arg-type]
        finally:
            self._polling = False

    def _error_completion(self, wc, now: float) -> None:
        try:
            status = WcStatus(wc.status)
        except ValueError:
            status = WcStatus.GENERAL_ERR
        if status in (WcStatus.REM_ACCESS_ERR, WcStatus.REM_INV_REQ_ERR):
            self.metrics.access_naks += 1
        self._down(f"the RC QP failed ({status.name} on a "
                   f"{'receive' if wc.wr_id & _RECV_BIT else 'send'})", now)

    def _received(self, slot: int, n: int, now: float) -> None:
        mr = self._recv_mr
        if mr is None or not 0 <= slot < self._recv_posted:
            return
        data = mr.read(n, slot * SLOT) if n else b""
        self._post_recv_slot(slot)
        self.metrics.messages_received += 1
        if self._hello_pending:  # passive: the peer's ConnectMsg comes first
            try:
                msg = ConnectMsg.decode(data)
            except PeerWireError as e:
                self._down(f"the peer's first message is no connect message: {e}", now)
                return
            if msg.type != ConnectType.REQ or msg.incarnation != self.peer_incarnation \
                    or msg.attempt != self.attempt:
                self._down("the peer's connect message names another attempt", now)
                return
            if self.key is not None:
                ex = self._exchange
                got = bytes(data[CONNECT_SIZE:CONNECT_SIZE + TAG])
                if ex is None or len(got) < TAG or not hmac.compare_digest(
                        got, connect_tag(self.key, *ex, bytes(data[:CONNECT_SIZE]))):
                    self.metrics.auth_failures += 1
                    self._down("the peer's connect message has no valid tag (no key, or another "
                               "cluster's)", now)
                    return
            self._hello_pending = False
            self._accept(msg, now)
            self._up(now)
            return
        self.owner.on_message(self, bytes(data))  # type: ignore[arg-type]

    # -------------------------------------------------------------- timers
    def deadline(self) -> float | None:
        ds = [d for d in (self._next_connect, self._connect_deadline, self._next_keepalive) if d is not None]
        return min(ds) if ds else None

    def on_timer(self, now: float) -> None:
        if self._connect_deadline is not None and now >= self._connect_deadline:
            self.metrics.connect_timeouts += 1
            self._down("connecting timed out", now)
        if self._next_connect is not None and now >= self._next_connect and not self.closed \
                and self.state is LinkState.DOWN:
            self._next_connect = None
            try:
                self._try_connect(now)
            except Exception as err:
                self._down(f"connecting failed: {err}", now)
        if self._next_keepalive is not None and now >= self._next_keepalive:
            self.keepalive(now)
        self.pump(now)

    def keepalive(self, now: float) -> None:
        """A zero-length RDMA WRITE: the peer's ACK says it is there."""
        if self.state is LinkState.UP and self._qp is not None:
            try:
                self._post_send(0, WrOpcode.RDMA_WRITE, [], 0, 0, signaled=False)
                self.metrics.keepalives += 1
            except TransportError:
                pass
            self._next_keepalive = now + self.config.keepalive

    def describe(self) -> dict:
        return {"peer": self.peer, "state": self.state.value, "kind": "verbs", "qpn": self.qpn,
                "peer_qpn": self.peer_qpn, "peer_credits": self.peer_credits,
                "windows": len(self.table), "work_requests": len(self._wrs), **self.metrics.as_dict()}


class CmListener:
    """The daemon's RDMA CM listener on its fabric address: each connect
    request goes to the link of the address its private data names
    (``route(address) -> VerbsPeerLink | None``); malformed ones, and ones
    for no peer, are rejected and counted. With a link ``key`` a request whose
    hello has no valid tag for this daemon's address is rejected before its
    address is looked at (``auth_failures``)."""

    def __init__(self, fabric, route: Callable[[str], VerbsPeerLink | None], *, port: int = CM_PORT,
                 links: Callable[[], list] | None = None, clock: Callable[[], float] | None = None,
                 key: bytes | None = None):
        self.fabric = fabric
        self.key = key
        self.auth_failures = 0
        self.route = route
        self.links = links or (list)
        self.port = port
        self.clock = clock
        self.requests = 0
        self.rejected = 0
        self.events = 0
        self._chan: CmChannel | None = None
        self._id: Any = None

    def start(self) -> None:
        import pyverbs.cm_enums as ce
        from pyverbs.cmid import CMID, AddrInfo

        w, u = getattr(self.fabric, "watch", None), getattr(self.fabric, "unwatch", None)
        self._chan = CmChannel((w, u) if w is not None and u is not None else None, self._on_event)
        try:
            self._id = CMID(creator=self._chan.channel)
            self._chan.listen_id = self._id
            ai = AddrInfo(src=self.fabric.address, src_service=str(self.port), port_space=ce.RDMA_PS_TCP,
                          flags=ce.RAI_PASSIVE)
            try:
                self._id.bind_addr(ai)
            finally:
                ai.close()
            self._id.listen(64)
        except Exception as e:
            self.close()
            raise VerbsLinkError(f"RDMA CM listener on {self.fabric.address} port {self.port}: {e}") from None

    def _now(self) -> float:
        from time import monotonic

        return (self.clock or monotonic)()

    def _on_event(self, ev: CmEvent) -> None:
        import pyverbs.cm_enums as ce

        self.events += 1
        t = ev.type
        if t == ce.RDMA_CM_EVENT_CONNECT_REQUEST and ev.child is not None:
            self.requests += 1
            child = ev.child
            link = None
            raw = b""
            try:
                raw = (open_hello(self.key, ev.private, self.fabric.address) if self.key is not None
                       else bytes(ev.private[:HELLO_SIZE]))
                hello = ReqHello.decode(raw)
                link = self.route(hello.address)
            except PeerWireError as e:
                if e.field == "tag":
                    self.auth_failures += 1
                    log.warning("RDMA CM request refused: %s", e)
                else:
                    log.debug("RDMA CM request: %s", e)
            ok = False
            if link is not None:
                ok = link.on_request(child, hello, self._now(), raw)
            if not ok:
                self.rejected += 1
                try:
                    child.reject()
                except Exception:
                    pass
                try:
                    child.close()
                except Exception:
                    pass
        elif t == ce.RDMA_CM_EVENT_DISCONNECTED:
            # one of the passive links' peers disconnected: which one, the event does not
            # say here; a keepalive on each tells (a dead peer's QP never answers it)
            now = self._now()
            for link in self.links():
                if not link.active:
                    link.keepalive(now)
                    link.kick(now)

    def describe(self) -> dict:
        return {"port": self.port, "requests": self.requests, "rejected": self.rejected,
                "events": self.events, "keyed": self.key is not None, "auth_failures": self.auth_failures}

    def close(self) -> None:
        cid, self._id = self._id, None
        if cid is not None:
            try:
                cid.close()
            except Exception as e:
                log.warning("RDMA CM listener: %s", e)
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()
