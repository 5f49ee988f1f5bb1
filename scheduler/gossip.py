"""Load-table dissemination by periodic authenticated datagrams: the embedded
default (issue 15, "Dissemination"; docs/scheduler.md).

Roles, sans-I/O (``now`` and the wall clock passed in):

* :class:`Announcer`: when this host's next row is due (every period x
  U(0.9, 1.1), the first one at a random phase in the first period, so hosts
  started together do not advertise together) and the datagram of the row
  the caller gives; a host without accelerators never advertises (its row
  source returns None, or a row without units: nothing is sent). Sequence
  numbers start at the wall clock in nanoseconds and go up by one per row.
* :class:`Listener`: a datagram (or a Redis value, checked the same way) ->
  the row to put in the table, or None with the reason counted in
  :class:`ListenerMetrics`: truncated, malformed, forged (tag), unknown kind,
  absurd values, own (our own address), wrong_key (a Redis key naming
  another address than the row's), unknown sender (``resolve(address)``
  gives no host id: not a cluster member), from the future (a sequence
  number more than :data:`FUTURE_BOUND` s ahead of our wall clock),
  replayed (older than the newest taken from that address) or duplicate
  (the same one again). The replay rule trusts roughly synchronised clocks
  (NTP): a host whose clock runs more than :data:`FUTURE_BOUND` ahead is
  refused, and one whose clock went back over a restart is refused until its
  sequence passes the old one. Forging a sequence number needs the key.

The asyncio adapter :class:`DatagramBackend` owns one UDP socket (port
:data:`LOAD_PORT` by default) on the fabric network and sends each row to the
interface's broadcast address (SO_BROADCAST; :func:`broadcast_address` finds
it from the fabric address) or, for routed networks, to a list of peers.
Traffic: one datagram (72 + 24 per kind bytes) per accelerator host per
period, so linear in the number of hosts; a broadcast reaches every host at
once. :class:`~scheduler.exchange.LoadExchange` drives either backend.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler.errors import SchedulerError
from scheduler.table import LoadRow
from scheduler.wire import WireError, canonical_address, decode_load, encode_load

log = logging.getLogger(__name__)

#: the UDP port of load datagrams (RoCEv2 is 4791)
LOAD_PORT = 4792
#: how far (seconds) a sequence number may be ahead of the receiver's wall clock
FUTURE_BOUND = 60.0
#: the jitter of the advertisement period: each interval is period x U(JITTER)
JITTER = (0.9, 1.1)

#: a backend hands each received datagram / value here, with the address its
#: Redis key names (None for a datagram or a pub/sub message)
Deliver = Callable[[bytes, str | None], None]


class DisseminationError(SchedulerError):
    """A dissemination backend cannot be set up as configured (the message says why)."""


class Dissemination(Protocol):
    """What :class:`~scheduler.exchange.LoadExchange` needs of a backend."""

    async def start(self, deliver: Deliver, period: float) -> None:
        """Open sockets / connections and start handing received rows to ``deliver``."""

    async def publish(self, data: bytes, address: str) -> None:
        """Send this host's datagram ``data`` (this host is ``address``); never raises
        for a network failure (it is counted)."""

    async def close(self) -> None:
        """Release every socket, task and connection; idempotent."""

    def metrics(self) -> dict[str, object]:
        """The backend's counters."""


async def stop_task(t: asyncio.Task, timeout: float, attempts: int = 1) -> bool:
    """Cancel ``t`` and wait for it, at most ``attempts`` x ``timeout`` seconds (a
    cancellation swallowed inside a client library is asked again); True if it
    ended (its result or error retrieved), False if it is left behind."""
    for _ in range(attempts):
        t.cancel()
        done, _ = await asyncio.wait({t}, timeout=timeout)
        if done:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                t.result()
            return True
    return False


# --------------------------------------------------------------------------
# Sans-I/O core
# --------------------------------------------------------------------------
@dataclass(slots=True)
class AnnouncerMetrics:
    #: datagrams made
    sent: int = 0
    #: periods with nothing to advertise (no accelerators)
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Announcer:
    """This host's advertisement timer and datagram maker."""

    def __init__(self, key: bytes, address: str, period: float, seq0: int,
                 rng: random.Random | None = None) -> None:
        self.key = key
        self.address = canonical_address(address)
        self.period = period
        #: the next row's sequence number (start: the wall clock in ns)
        self.seq = seq0
        self.rng = rng or random.Random()   # noqa: S311 (jitter and phase, not a secret)
        self.due: float | None = None
        self.metrics = AnnouncerMetrics()

    def start(self, now: float) -> float:
        """Schedule the first row at a random phase of the first period; returns when."""
        self.due = now + self.period * self.rng.random()
        return self.due

    def announce(self, row: LoadRow | None, now: float) -> bytes | None:
        """The datagram of ``row`` (None: nothing to advertise) and the next due time set."""
        self.due = now + self.period * self.rng.uniform(*JITTER)
        if row is None or not row.has_accelerators:
            self.metrics.skipped += 1
            return None
        data = encode_load(dataclasses.replace(row, seq=self.seq), self.address, self.period, self.key)
        self.seq += 1
        self.metrics.sent += 1
        return data


#: why a received datagram was not taken, in the order they are checked
REASONS = ("truncated", "malformed", "forged", "unknown_kind", "absurd", "own", "wrong_key",
           "unknown_sender", "future", "replayed", "duplicate")


@dataclass(slots=True)
class ListenerMetrics:
    received: int = 0
    accepted: int = 0
    truncated: int = 0
    malformed: int = 0
    forged: int = 0
    unknown_kind: int = 0
    absurd: int = 0
    own: int = 0
    wrong_key: int = 0
    unknown_sender: int = 0
    future: int = 0
    replayed: int = 0
    duplicate: int = 0

    @property
    def ignored(self) -> int:
        return sum(getattr(self, r) for r in REASONS)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Listener:
    """Received datagrams -> rows to take (module docstring), every refusal counted.

    ``resolve(address) -> host id | None`` maps a sender's fabric address (as
    :func:`~scheduler.wire.address_text` spells it) to the table's host id.
    """

    def __init__(self, key: bytes, own_address: str, resolve: Callable[[str], int | None],
                 future_bound: float = FUTURE_BOUND) -> None:
        self.key = key
        self.own_address = canonical_address(own_address)
        self.resolve = resolve
        self.future_ns = int(future_bound * 1e9)
        #: the newest sequence number taken per sender address (members only: bounded)
        self.newest: dict[str, int] = {}
        self.metrics = ListenerMetrics()
        #: the last refusal's reason and message (for a debug log)
        self.last_refusal: tuple[str, str] | None = None

    def _refuse(self, reason: str, why: str) -> None:
        setattr(self.metrics, reason, getattr(self.metrics, reason) + 1)
        self.last_refusal = (reason, why)

    def receive(self, data: bytes, now: float, wall_ns: int,
                key_address: str | None = None) -> LoadRow | None:
        """The row in ``data`` for the table (``updated`` = ``now``), or None (counted).
        ``key_address``: the address the Redis key holding ``data`` names."""
        m = self.metrics
        m.received += 1
        try:
            ad = decode_load(data, self.key)
        except WireError as e:
            self._refuse(e.reason, str(e))
            return None
        if ad.address == self.own_address:
            self._refuse("own", ad.address)
            return None
        if key_address is not None and key_address != ad.address:
            self._refuse("wrong_key", f"key names {key_address!r}, the row is {ad.address!r}'s")
            return None
        host = self.resolve(ad.address)
        if host is None:
            self._refuse("unknown_sender", f"{ad.address} is not a cluster member")
            return None
        if ad.seq > wall_ns + self.future_ns:
            self._refuse("future", f"{ad.address}: seq {ad.seq} is {(ad.seq - wall_ns) / 1e9:.3g} s ahead")
            return None
        held = self.newest.get(ad.address)
        if held is not None and ad.seq <= held:
            self._refuse("duplicate" if ad.seq == held else "replayed",
                         f"{ad.address}: seq {ad.seq}, newest taken {held}")
            return None
        self.newest[ad.address] = ad.seq
        m.accepted += 1
        return ad.row(host, now)


# --------------------------------------------------------------------------
# Asyncio adapter: UDP
# --------------------------------------------------------------------------
_SIOCGIFADDR = 0x8915
_SIOCGIFBRDADDR = 0x8919
_SIOCGIFNETMASK = 0x891B


def broadcast_address(address: str) -> str | None:
    """The IPv4 broadcast address of the interface holding ``address`` (Linux
    SIOCGIFADDR / SIOCGIFBRDADDR per interface; an address added without
    ``brd``, as ``ip addr add A/P`` does, has none set: then the subnet's, which
    the kernel routes as broadcast anyway), or None if no interface has it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version != 4:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16s16x", name.encode()[:15])
            try:
                got = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)
                if got[20:24] != ip.packed:
                    continue
                brd = fcntl.ioctl(s.fileno(), _SIOCGIFBRDADDR, req)[20:24]
                if brd == bytes(4):
                    mask = fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24]
                    net = ipaddress.IPv4Network(f"{ip}/{ipaddress.IPv4Address(mask)}", strict=False)
                    return str(net.broadcast_address) if net.prefixlen < 31 else None
            except OSError:
                continue
            return str(ipaddress.IPv4Address(brd))
    return None


@dataclass(slots=True)
class DatagramMetrics:
    datagrams_in: int = 0
    datagrams_out: int = 0
    send_errors: int = 0


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, owner: DatagramBackend) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.owner._received(data)

    def error_received(self, exc: Exception) -> None:
        self.owner.metrics_.send_errors += 1


class DatagramBackend:
    """Load datagrams over UDP (module docstring).

    ``bind``/``port``: where the socket listens (default all addresses, so
    broadcasts arrive; :data:`LOAD_PORT`). Sends go to ``peers`` ((address,
    port) pairs: unicast, for routed networks) if given, else to ``broadcast``
    (an address), else to the broadcast address of ``fabric_address``'s
    interface (:func:`broadcast_address`), all on ``port`` unless a peer says.
    ``sock``: an already bound UDP socket to use instead (the backend owns it
    from then on and closes it).
    """

    def __init__(self, *, fabric_address: str | None = None, bind: str = "0.0.0.0",  # noqa: S104 (broadcasts reach wildcard-bound sockets only)
                 port: int = LOAD_PORT, broadcast: str | None = None,
                 peers: Sequence[tuple[str, int]] = (), sock: socket.socket | None = None) -> None:
        self.bind, self.port = bind, port
        self.sock = sock
        if peers:
            self.targets = [(a, p) for a, p in peers]
        else:
            if broadcast is None and fabric_address is not None:
                broadcast = broadcast_address(fabric_address)
            if broadcast is None:
                raise DisseminationError(
                    f"no broadcast address for the load datagrams (fabric address "
                    f"{fabric_address!r} is on no interface with one): give one, or the peers")
            self.targets = [(broadcast, port)]
        self.broadcast = not peers
        self.transport: asyncio.DatagramTransport | None = None
        self.deliver: Deliver | None = None
        self.metrics_ = DatagramMetrics()

    async def start(self, deliver: Deliver, period: float) -> None:
        if self.transport is not None:
            raise DisseminationError("datagram backend already started")
        self.deliver = deliver
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            sock, self.sock = self.sock, None
            if self.broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            try:
                self.transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), sock=sock)
            except BaseException:
                sock.close()
                raise
        else:
            try:
                self.transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self), local_addr=(self.bind, self.port),
                    family=socket.AF_INET6 if ":" in self.bind else socket.AF_INET,
                    allow_broadcast=self.broadcast)
            except OSError as e:
                raise DisseminationError(f"load datagrams: cannot bind UDP {self.bind}:{self.port}: "
                                         f"{e.strerror or e}") from e

    @property
    def local_port(self) -> int:
        """The bound port (the one chosen, if ``port`` was 0)."""
        if self.transport is None:
            raise DisseminationError("datagram backend not started")
        return int(self.transport.get_extra_info("sockname")[1])

    def _received(self, data: bytes) -> None:
        self.metrics_.datagrams_in += 1
        if self.deliver is not None:
            self.deliver(data, None)

    async def publish(self, data: bytes, address: str) -> None:
        if self.transport is None or self.transport.is_closing():
            self.metrics_.send_errors += 1
            return
        for target in self.targets:
            try:
                self.transport.sendto(data, target)
                self.metrics_.datagrams_out += 1
            except OSError as e:
                self.metrics_.send_errors += 1
                log.debug("load datagram to %s failed: %s", target, e)

    async def close(self) -> None:
        t, self.transport = self.transport, None
        self.deliver = None
        if self.sock is not None:     # given but never started
            self.sock.close()
            self.sock = None
        if t is not None:
            t.close()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)   # let the transport's close run (the fd is released)

    def metrics(self) -> dict[str, object]:
        return dict(dataclasses.asdict(self.metrics_), backend="datagram",
                    targets=[f"{a}:{p}" for a, p in self.targets])
