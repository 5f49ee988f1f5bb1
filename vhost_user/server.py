"""asyncio adapter for the back-end: listen, read messages, watch kicks.

One listening unix socket serves many front-ends; each accepted connection
gets its own device instance (from ``device_factory``) and its own
:class:`~vhost_user.backend.BackendConnection`. Everything here is I/O
glue: readiness callbacks (``loop.add_reader``) on the connection socket and
on every ring's kick eventfd, a timer for rings in no-fd polling mode, and
the policy that any protocol error closes that one connection, releases its
fds and mappings, and leaves every other connection untouched.

Admission (:class:`~vhost_user.tenancy.TenantPolicy`): at accept the peer's
credentials are read (SO_PEERCRED) into a
:class:`~vhost_user.tenancy.ConnectionInfo`, logged, and handed to
``device_factory(info)``. A connection past the host-wide limit or its uid's
limit is closed at once (counted, logged with its credentials); one that has
not finished its handshake ``handshake_timeout`` seconds after accept is
closed and counted (``handshake_timeouts``).

The handshake is what every front-end does as soon as it connects: claim the
session (SET_OWNER) and read the device's features (GET_FEATURES). QEMU does
exactly that when it realizes a vhost-user device (``vhost_dev_init``:
GET_FEATURES and the protocol features, SET_OWNER, GET_FEATURES again; then
vhost-user-blk reads the config with GET_CONFIG), at VM start, but it sends
the memory table and starts the rings only when the guest's driver sets
DRIVER_OK, which may be minutes later or never. So a QEMU guest whose driver
has not loaded yet is served under the default timeout, while a client that
connects and stays silent, sends half a message, or stops before SET_OWNER +
GET_FEATURES is dropped. A started ring or DRIVER_OK also counts as done.

The socket is created owner-only and gets ``socket_mode`` and
``socket_group`` before it appears at its path, whatever the umask.

A device may serve a kick itself (``fast_kick(vring) -> bool``, e.g. the
virtio-rdma doorbellq natively): a blocking server (no ``poll_us``) offers it
each kick of a started, enabled ring after reading the eventfd, and falls
back to the generic :meth:`~vhost_user.backend.BackendConnection.kick` when
it returns False.

Run it on uvloop (:func:`run_backend` installs it) for lower wake-up cost.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import random
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic

from vhost_user.backend import BackendConnection
from vhost_user.device import VhostUserDevice
from vhost_user.endpoint import ConnectionClosed, MessageReader, close_fds, send_message
from vhost_user.errors import TransportError, VhostUserError
from vhost_user.spin import CpuShare, SpinPolicy
from vhost_user.tenancy import ConnectionInfo, TenantPolicy
from vhost_user.vring import Vring
from virtio.errors import VirtioError

log = logging.getLogger(__name__)

#: How often a ring in no-fd polling mode is looked at.
POLL_INTERVAL = 50e-6
#: With --poll-us, the busy-poll loop returns to the event loop this often
#: (control messages, kicks of rings not yet spinning, timers).
SPIN_SLICE = 200e-6
#: connections accepted per wake-up of the listening socket: a connect storm
#: then waits its turn behind every other ready fd (guests' kicks) in the loop.
#: bench.isolation_bench, a 1000-connection storm of one uid on the daemon's
#: CPU at nice 19: a victim's 64 B WRITE p99 was 15x its idle value with 16
#: and no back-off; with 4 and ACCEPT_BACKOFF the storm costs the daemon
#: ~4000 accepts/s at most and a newcomer queues behind it ~0.25 s per 1000.
ACCEPT_BATCH = 4
LISTEN_BACKLOG = 4096
#: after accept() fails (EMFILE...), wait this long before accepting again
ACCEPT_PAUSE = 0.1
#: after a wake-up that refused a connection (over a limit), wait this long
#: before accepting again: a storm of refused connects then costs the daemon at
#: most ACCEPT_BATCH accepts per ACCEPT_BACKOFF, and queues in the backlog
ACCEPT_BACKOFF = 0.001
#: messages read per wake-up of a connection's socket: a front-end that floods
#: the daemon waits its turn behind the other ready fds; the rest are read
#: by a continuation scheduled with call_soon (never left to the next
#: readiness event: see ServedConnection._on_readable)
READ_BATCH = 64
#: virtio device status DRIVER_OK
DRIVER_OK = 4
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class ServerMetrics:
    accepted: int = 0
    closed: int = 0
    protocol_errors: int = 0
    transport_errors: int = 0
    device_errors: int = 0
    refused_host_limit: int = 0      # past max_connections
    refused_uid_limit: int = 0       # past max_connections_per_uid
    refused_factory: int = 0         # the device factory raised
    handshake_timeouts: int = 0      # closed: no SET_OWNER + GET_FEATURES within handshake_timeout
    accept_errors: int = 0           # accept() failed (e.g. EMFILE); accepting paused
    accept_backoffs: int = 0         # accepting paused ACCEPT_BACKOFF after a refusal
    read_continuations: int = 0      # a wake-up read READ_BATCH messages; the rest read next
    last_errors: list = field(default_factory=list)

    def record(self, kind: str, err: BaseException) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.last_errors.append(f"{type(err).__name__}: {err}")
        del self.last_errors[:-32]


class ServedConnection:
    """One accepted front-end: socket + reader + dispatcher + watchers."""

    def __init__(self, server: BackendServer, sock: socket.socket, device: VhostUserDevice,
                 info: ConnectionInfo):
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.info = info
        self.name = name = info.name
        self.reader = MessageReader(sock)
        self.core = BackendConnection(device, self, name=name,
                                      require_sealed_memory=server.require_sealed_memory,
                                      poll_us=server.poll_us)
        self._watched: dict[int, int] = {}  # ring index -> fd watched
        #: the device's own service of a kick (``fast_kick(vring) -> bool``), used by a
        #: blocking daemon (no --poll-us: a polling one turns kicks into its spin)
        self._fast_kick = getattr(device, "fast_kick", None) if server.poll_us <= 0 else None
        self._polls: dict[int, asyncio.TimerHandle] = {}
        self.closed = False
        timeout = server.policy.handshake_timeout
        self._handshake = self.loop.call_later(timeout, self._check_handshake) if timeout > 0 else None
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def set_up(self) -> bool:
        """The front-end finished its handshake: SET_OWNER and GET_FEATURES (what
        QEMU sends when it realizes the device), or a ring started, or DRIVER_OK."""
        core = self.core
        if core.owner and core.metrics.by_request.get("GET_FEATURES", 0) > 0:
            return True
        return bool(core.status & DRIVER_OK) or any(v.started for v in core.vrings)

    def _check_handshake(self) -> None:
        self._handshake = None
        if self.closed or self.set_up():
            return
        self.server.metrics.handshake_timeouts += 1
        log.warning("%s: closing: no handshake (SET_OWNER + GET_FEATURES) %.1f s after connecting", self.info,
                    self.server.policy.handshake_timeout)
        self.close()

    # --- Watcher protocol -------------------------------------------------
    def watch_kick(self, vring: Vring) -> None:
        self.unwatch_kick(vring)
        if vring.kick_fd is not None:
            self.loop.add_reader(vring.kick_fd, self._on_kick, vring)
            self._watched[vring.index] = vring.kick_fd
        elif vring.polling:
            self._schedule_poll(vring)
        # Work may already be queued: the spec starts a ring on a kick, and a
        # front-end may have kicked before telling us the fd.
        self.loop.call_soon(self._safe_kick, vring.index)

    def unwatch_kick(self, vring: Vring) -> None:
        fd = self._watched.pop(vring.index, None)
        if fd is not None:
            self.loop.remove_reader(fd)
        handle = self._polls.pop(vring.index, None)
        if handle is not None:
            handle.cancel()

    def start_spin(self) -> None:
        self.server.start_spin()

    def call_soon(self, fn) -> None:
        self.loop.call_soon(self._guarded, fn)

    def call_later(self, delay: float, fn):
        return self.loop.call_later(max(0.0, delay), self._guarded, fn)

    def _guarded(self, fn) -> None:
        if self.closed:
            return
        try:
            fn()
        except (VhostUserError, VirtioError) as e:
            self.fail(e)
        except Exception as e:
            log.exception("%s: device callback raised", self.name)
            self.fail(e)

    def _schedule_poll(self, vring: Vring) -> None:
        self._polls[vring.index] = self.loop.call_later(POLL_INTERVAL, self._poll, vring)

    def _poll(self, vring: Vring) -> None:
        self._polls.pop(vring.index, None)
        if self.closed or not vring.started or not vring.polling:
            return
        self._safe_kick(vring.index)
        if not self.closed and vring.started and vring.polling:
            self._schedule_poll(vring)

    # --- events -------------------------------------------------------
    def _on_kick(self, vring: Vring) -> None:
        try:
            os.eventfd_read(vring.kick_fd)  # type: ignore[arg-type]  # watched: the ring has a kick fd
        except BlockingIOError:
            pass
        except OSError as e:
            self.fail(TransportError(f"ring {vring.index}: kick eventfd read failed: {e.strerror}",
                                     e.errno or errno.EPIPE))
            return
        fast = self._fast_kick
        if fast is not None and vring.started and vring.enabled and not self.closed:
            try:
                served = fast(vring)
            except (VhostUserError, VirtioError) as e:
                vring.signal_error()
                self.fail(e)
                return
            except Exception as e:  # a device bug must not take the daemon down
                log.exception("%s: device raised while processing ring %d", self.name, vring.index)
                self.fail(e)
                return
            if served:
                self.core.metrics.kicks += 1
                vring.pending_kick = False
                return
        self._safe_kick(vring.index)

    def _safe_kick(self, index: int) -> None:
        if self.closed:
            return
        try:
            self.core.kick(index)
        except (VhostUserError, VirtioError) as e:
            self.fail(e)
        except Exception as e:  # a device bug must not take the daemon down
            log.exception("%s: device raised while processing ring %d", self.name, index)
            self.fail(e)

    def poll_once(self) -> bool:
        try:
            return self.core.poll_once()
        except (VhostUserError, VirtioError) as e:
            self.fail(e)
        except Exception as e:  # a device bug must not take the daemon down
            log.exception("%s: device raised while polling", self.name)
            self.fail(e)
        return False

    def end_spin(self) -> bool:
        try:
            return self.core.end_spin()
        except (VhostUserError, VirtioError) as e:
            self.fail(e)
        except Exception as e:
            log.exception("%s: device raised while polling", self.name)
            self.fail(e)
        return False

    def _on_readable(self) -> None:
        if self.closed:   # a continuation scheduled before the connection closed
            return
        try:
            msgs = self.reader.read_available(READ_BATCH)
        except ConnectionClosed as e:
            if e.mid_message:
                self.fail(e)
            else:
                log.info("%s: front-end closed the connection", self.name)
                self.close()
            return
        except (VhostUserError, VirtioError) as e:
            self.fail(e)
            return
        for i, msg in enumerate(msgs):
            if self.closed:
                for m in msgs[i:]:
                    close_fds(m.fds)
                return
            try:
                replies = self.core.handle(msg)
            except (VhostUserError, VirtioError) as e:
                for r in getattr(e, "replies", []):
                    self._send(r)
                for m in msgs[i + 1 :]:
                    close_fds(m.fds)
                self.fail(e)
                return
            except Exception as e:
                log.exception("%s: unexpected error handling request %d", self.name, msg.request)
                for m in msgs[i + 1 :]:
                    close_fds(m.fds)
                self.fail(e)
                return
            for r in replies:
                if not self._send(r):  # the connection failed: the rest of the batch is dropped
                    for m in msgs[i + 1 :]:
                        close_fds(m.fds)
                    return
        if len(msgs) == READ_BATCH and not self.closed:
            # More may be queued. Read it from the loop, not from the next readiness
            # event: uvloop (libuv) calls a reader whose socket reports EPOLLERR (the
            # peer closed with our replies unread) once and then closes it, so that
            # event may never come, and the EOF behind the data would never be read.
            self.server.metrics.read_continuations += 1
            self.loop.call_soon(self._on_readable)

    def _send(self, msg) -> bool:
        try:
            send_message(self.sock, msg)
            return True
        except TransportError as e:
            self.fail(e)
            return False

    def fail(self, err: BaseException) -> None:
        if self.closed:
            return
        kind = ("transport_errors" if isinstance(err, TransportError)
                else "protocol_errors" if isinstance(err, (VhostUserError, VirtioError)) else "device_errors")
        self.server.metrics.record(kind, err)
        log.warning("%s: closing connection: %s", self.name, err)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        for index in list(self._watched) + list(self._polls):
            self.unwatch_kick(self.core.vrings[index])
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        try:
            self.core.close()
        finally:
            self.reader.close()
            self.sock.close()
            self.server._forget(self)


def _current_cpu() -> int:
    """The CPU this thread runs on (/proc/thread-self/stat, field 39)."""
    with open("/proc/thread-self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[36])


class _CpuMover:
    """Moves the busy-poll loop's thread to another CPU of its affinity mask
    (:class:`vhost_user.spin.CpuShare` decides when). The kernel would soon
    put it back (its balancer sees two busy tasks per CPU as balanced, and a
    wake-up may pull it to the waker's CPU), so the thread stays on the CPU
    it moved to, until it moves again; the mask it chooses within is the one
    it had before its first move, or whatever another process set since. A
    thread allowed one CPU stays."""

    def __init__(self) -> None:
        self.mask: set[int] | None = None   # the affinity chosen outside
        self.own: int | None = None         # the CPU of our last move

    def move(self) -> bool:
        """Move now; False: it did not (nowhere to go: a thread allowed one CPU)."""
        try:
            now_mask = os.sched_getaffinity(0)
            if self.mask is None or now_mask != {self.own}:
                self.mask = now_mask        # set by someone else: theirs
            others = sorted(self.mask - {_current_cpu()})
            if not others:
                return False
            target = random.choice(others)  # noqa: S311 (a placement)
            os.sched_setaffinity(0, {target})   # the kernel moves us now
            self.own = target
        except (OSError, ValueError, IndexError):
            return False
        return True


class BackendServer:
    """Listens on one unix socket path and serves every front-end that connects."""

    def __init__(self, path: str, device_factory: Callable[[ConnectionInfo], VhostUserDevice], *,
                 policy: TenantPolicy | None = None, max_connections: int | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 require_sealed_memory: bool = True, poll_us: float = 0.0,
                 socket_mode: int = 0o660, socket_group: int | None = None,
                 per_uid: dict[int, int] | None = None, poll_adaptive: bool = False,
                 poll_move: bool = True):
        self.path = path
        self.poll_us = poll_us
        #: the busy-poll window: poll_us, or adapted within it with poll_adaptive
        self.spin = SpinPolicy(poll_us * 1e-6, adaptive=poll_adaptive)
        #: moves the busy-poll loop off a CPU where its yields are slow (None: stays, --poll-stay)
        self.share: CpuShare | None = CpuShare() if poll_move else None
        self._mover = _CpuMover()
        self.require_sealed_memory = require_sealed_memory
        #: called with the ConnectionInfo of every admitted connection
        self.device_factory = device_factory
        self.policy = policy or TenantPolicy()
        self._max_connections_fixed = max_connections is not None  # else the policy's, reloaded with it
        self.max_connections = self.policy.max_connections if max_connections is None else max_connections
        self.socket_mode = socket_mode
        self.socket_group = socket_group  # gid; None: the daemon's group
        # None until start() takes the running loop; every use comes after start()
        self.loop: asyncio.AbstractEventLoop = loop  # type: ignore[assignment]
        self.sock: socket.socket | None = None
        self.connections: set[ServedConnection] = set()
        #: peer uid -> connections served now; servers of one daemon share it, so
        #: the limits hold over all their sockets
        self.per_uid: dict[int, int] = {} if per_uid is None else per_uid
        self._refusals: dict[int, int] = {}  # peer uid -> connections refused (for the log)
        self._accept_paused = False
        self.metrics = ServerMetrics()
        self._ids = itertools.count(1)
        self._spin_handle: asyncio.Handle | None = None
        self._spin_last = 0.0
        #: other work sources polled in the busy-poll loop (``poll() -> bool``)
        self.pollers: list[Callable[[], bool]] = []

    def set_policy(self, policy: TenantPolicy) -> None:
        """Admission limits for the next connection (a reload): nothing connected is
        dropped; a uid above a lowered limit keeps its connections and is refused new ones."""
        self.policy = policy
        if not self._max_connections_fixed:
            self.max_connections = policy.max_connections

    def add_poller(self, poll: Callable[[], bool]) -> Callable[[], None]:
        """Poll ``poll`` (True: it found work) in the busy-poll loop too, e.g.
        a fabric's socket; returns what starts that loop (a no-op without
        ``poll_us``), for the source to call when it has work."""
        self.pollers.append(poll)
        return self.start_spin if self.poll_us > 0 else (lambda: None)

    async def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind and listen under a temporary name, then rename: the path only
        # appears once connecting to it works (QEMU gives up on ECONNREFUSED),
        # and only with its final owner, group and mode. The temporary name is
        # bound owner-only (umask 0177), so it is never wider than asked either.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                sock.bind(tmp)
            finally:
                os.umask(old)
            if self.socket_group is not None and self.socket_group != os.getegid():
                os.chown(tmp, -1, self.socket_group)
            os.chmod(tmp, self.socket_mode)
            # a deep backlog: a connect storm must fill it before another
            # uid's connect fails with EAGAIN (the kernel caps it at somaxconn)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        log.info("vhost-user back-end listening on %s (mode %04o)", self.path, self.socket_mode)

    def _accept(self) -> None:
        refused = self.metrics.refused_uid_limit + self.metrics.refused_host_limit
        try:
            self._accept_batch()
        finally:
            if (self.metrics.refused_uid_limit + self.metrics.refused_host_limit != refused
                    and self.sock is not None and not self._accept_paused):
                # a connect storm: accept the next ones a little later; they
                # wait in the backlog, the guests already served do not wait
                self.metrics.accept_backoffs += 1
                self._pause_accept(ACCEPT_BACKOFF)

    def _pause_accept(self, seconds: float) -> None:
        self._accept_paused = True
        assert self.sock is not None        # listening: the callers check
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self._resume_accept)

    def _accept_batch(self) -> None:
        sock = self.sock
        assert sock is not None             # called while the socket is watched
        for _ in range(ACCEPT_BATCH):  # the rest stays readable: next loop iteration
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # e.g. EMFILE: the socket stays readable, so stop watching it for
                # a moment instead of spinning on the same error
                self.metrics.accept_errors += 1
                log.warning("accept failed: %s; pausing accept for %.1f s", e, ACCEPT_PAUSE)
                self._pause_accept(ACCEPT_PAUSE)
                return
            try:
                pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _UCRED.size))
            except OSError as e:
                log.warning("refusing connection: SO_PEERCRED failed: %s", e)
                conn.close()
                continue
            info = ConnectionInfo(next(self._ids), pid, uid, gid, self.path)
            total = sum(self.per_uid.values())
            if total >= self.max_connections:
                self.metrics.refused_host_limit += 1
                self._log_refusal(info, "%d connections already (max_connections)", total)
                conn.close()
                continue
            if self.per_uid.get(uid, 0) >= self.policy.max_connections_per_uid:
                self.metrics.refused_uid_limit += 1
                self._log_refusal(info, "uid %d has %d connections (max_connections_per_uid)",
                                  uid, self.per_uid[uid])
                conn.close()
                continue
            conn.setblocking(False)
            try:
                device = self.device_factory(info)
            except Exception:
                self.metrics.refused_factory += 1
                log.exception("%s: device factory failed; refusing connection", info)
                conn.close()
                continue
            try:
                served = ServedConnection(self, conn, device, info)
            except Exception:
                self.metrics.refused_factory += 1
                log.exception("%s: could not serve the connection", info)
                device.close()
                conn.close()
                continue
            self.metrics.accepted += 1
            self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
            log.info("%s: front-end connected", info)
            self.connections.add(served)

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _log_refusal(self, info: ConnectionInfo, why: str, *args) -> None:
        """Log a refused connection with its credentials: every one of a uid's
        first 10, then every 1000th (a connect loop must not flood the log)."""
        n = self._refusals[info.uid] = self._refusals.get(info.uid, 0) + 1
        if n <= 10 or n % 1000 == 0:
            log.warning("refusing %s: " + why + " [%d refused for uid %d%s]",  # noqa: G003 (why is a format)
                        info, *args, n, info.uid,
                        "; logging every 1000th from now" if n == 10 else "")

    # --- busy polling (--poll-us) -------------------------------------
    def start_spin(self) -> None:
        """A ring had work and poll_us > 0: poll every spinning ring of every
        connection in one loop until poll_us passes without work (like
        vhost-net's busyloop, but across guests: one guest's doorbell is
        another's completion)."""
        if self._spin_handle is None:
            self._spin_last = now = monotonic()
            self.spin.woken(now)
            self._spin_handle = self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        policy = self.spin
        now = monotonic()
        end = now + SPIN_SLICE
        conns = [c for c in self.connections if not c.closed]
        for c in conns:
            c.core.join_spin()
        idle = False
        while True:
            work = False
            began = now
            for c in conns:
                if not c.closed and c.core.spinning and c.poll_once():
                    work = True
            served = False
            for poll in self.pollers:
                if poll():
                    work = served = True
            if served:
                # what a source served (a fabric's arrivals: CQEs written, ACKs sent) is for a
                # guest that may share this CPU and poll with sched_yield: hand it the CPU now,
                # not after one more pass that finds nothing (about 2 us of a two-host 64 B
                # half round trip; one cheap syscall when nothing else is runnable)
                os.sched_yield()
            if work:
                now = self._spin_last = monotonic()
                if idle:
                    policy.caught()  # work arrived while we polled
                idle = False
            else:
                idle = True
                before = monotonic()
                os.sched_yield()  # a busy CPU: let a runnable task (a peer daemon, a guest) go first
                now = monotonic()
                policy.pass_took(now - began, now)  # long: another task held our CPU
                share = self.share
                if share is not None and share.yielded(now - before, now) and not self._mover.move():
                    share.metrics.moves -= 1    # asked, but it stayed (pinned): not a move
            if not work and now - self._spin_last > policy.window:
                ended = [c.end_spin() for c in conns if not c.closed]   # every one ends its spin
                if not any(ended):
                    self._spin_handle = None
                    policy.sleeping(now)
                    return
                self._spin_last = now
            if now > end:
                break
        self._spin_handle = self.loop.call_soon(self._spin)

    def _forget(self, conn: ServedConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.closed += 1
            uid = conn.info.uid
            left = self.per_uid.get(uid, 0) - 1
            if left > 0:
                self.per_uid[uid] = left
            else:
                self.per_uid.pop(uid, None)

    async def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for conn in list(self.connections):
            conn.close()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to clobber a live one
    or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"another back-end is listening on {path}")


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run_backend(paths: list[str], device_factory: Callable[[ConnectionInfo], VhostUserDevice], *,
                ready: Callable[[], None] | None = None, poll_us: float = 0.0,
                require_sealed_memory: bool = True, services=(), policy: TenantPolicy | None = None,
                socket_mode: int = 0o660, socket_group: int | None = None,
                on_reload: Callable[[], TenantPolicy | None] | None = None,
                poll_adaptive: bool = False, poll_move: bool = True) -> int:
    """Run the daemon until SIGINT/SIGTERM; close every connection cleanly.
    ``on_reload``: called in the loop on SIGHUP (the tenant configuration is read
    again; connections stay); the TenantPolicy it returns (None: keep the running
    one) is every server's admission policy from the next connection on.

    ``services``: objects with ``async start()`` and ``async aclose()`` that
    live in the daemon's loop (e.g. a fabric's UDP socket), started before the
    sockets listen and closed after the last connection."""
    install_uvloop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        per_uid: dict[int, int] = {}
        if on_reload is not None:
            def reload() -> None:
                new = on_reload()
                if new is not None:
                    for s in servers:
                        s.set_policy(new)

            loop.add_signal_handler(signal.SIGHUP, reload)
        servers = [BackendServer(p, device_factory, loop=loop, poll_us=poll_us, policy=policy,
                                 require_sealed_memory=require_sealed_memory, per_uid=per_uid,
                                 socket_mode=socket_mode, socket_group=socket_group,
                                 poll_adaptive=poll_adaptive, poll_move=poll_move) for p in paths]
        started = []
        for svc in services:  # e.g. the admin socket: it reports the servers' connections
            if hasattr(svc, "bind_servers"):
                svc.bind_servers(servers)
        try:
            for svc in services:
                await svc.start()
                started.append(svc)
                if hasattr(svc, "poll"):  # e.g. a fabric's socket: busy-polled with the rings
                    starts = [s.add_poller(svc.poll) for s in servers]
                    if hasattr(svc, "on_busy"):  # called after every batch: no wrapper for one server
                        svc.on_busy = starts[0] if len(starts) == 1 else (
                            lambda starts=starts: [f() for f in starts])
            for s in servers:
                await s.start()
            if ready:
                ready()
            await stop.wait()
            log.info("signal received, shutting down")
        finally:
            for s in servers:
                await s.close()
            for svc in reversed(started):
                await svc.aclose()
            for s in servers:
                m = s.metrics
                log.info("%s: %d connections served, %d protocol errors, %d transport errors, "
                         "%d refused (uid limit), %d refused (host limit), %d handshake timeouts",
                         s.path, m.accepted, m.protocol_errors, m.transport_errors,
                         m.refused_uid_limit, m.refused_host_limit, m.handshake_timeouts)

    asyncio.run(main())
    return 0
