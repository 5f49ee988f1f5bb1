"""The daemon's admin socket (asyncio adapter) and its client.

A unix stream socket, mode 0600, created under a temporary name and renamed
into place (it never appears wider). At accept the peer's uid (SO_PEERCRED)
must be 0 or the daemon's own; anyone else is answered one ``refused`` error
and closed. Requests are the lines of :mod:`vrdma.ops.wire`, answered in
order by :class:`~vrdma.ops.view.DaemonView` on the daemon's loop. A hostile
client costs bounded work: at most :data:`MAX_CLIENTS` at once (more are
refused), a line past ``MAX_REQUEST_BYTES`` ends the connection after an
error, a client that sends no complete line for ``idle_timeout`` seconds
(trickling bytes or not) is closed, and one that does not read its answers is closed once
:data:`MAX_UNSENT_BYTES` wait for it, or once answers past the transport's high-water mark
have waited ``idle_timeout`` for it. Counters: :class:`AdminMetrics`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass
from typing import Any

from vrdma.ops import wire
from vrdma.ops.view import DaemonView

log = logging.getLogger(__name__)

#: admin clients served at once
MAX_CLIENTS = 16
#: a client that sent no complete request this long is closed (seconds)
IDLE_TIMEOUT = 30.0
#: answers waiting to be read by a client past which it is closed (bytes)
MAX_UNSENT_BYTES = 4 * 1024 * 1024
_UCRED = struct.Struct("3i")


@dataclass
class AdminMetrics:
    accepted: int = 0
    refused_uid: int = 0        # peer uid neither 0 nor the daemon's
    refused_busy: int = 0       # MAX_CLIENTS already
    requests: int = 0
    errors: int = 0             # answered with an error (bad request, unknown command, ...)
    too_long: int = 0           # lines past MAX_REQUEST_BYTES (connection closed)
    idle_closed: int = 0        # no complete request within idle_timeout
    slow_readers: int = 0       # closed with MAX_UNSENT_BYTES unread, or not reading for idle_timeout

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_path(vhost_socket: str) -> str:
    """The admin socket next to the daemon's first vhost-user socket."""
    return vhost_socket + ".admin"


class AdminService:
    """The admin socket as a service of ``run_backend`` (``start``/``aclose``;
    ``bind_servers`` gives it the daemon's vhost-user servers)."""

    def __init__(self, path: str, view: DaemonView, *, idle_timeout: float = IDLE_TIMEOUT,
                 allowed_uids: frozenset[int] | None = None):
        self.path = path
        self.view = view
        self.idle_timeout = idle_timeout
        self.allowed = allowed_uids if allowed_uids is not None else frozenset({0, os.geteuid()})
        self.metrics = AdminMetrics()
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    def bind_servers(self, servers) -> None:
        self.view.bind_servers(servers)

    async def start(self) -> None:
        self.view.bind_loop(asyncio.get_running_loop())
        sock = _listen_owner_only(self.path)
        self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                      limit=wire.MAX_REQUEST_BYTES)
        log.info("admin socket on %s (mode 0600; uids %s)", self.path, sorted(self.allowed))

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._clients):
            t.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _pid, uid, _gid = _UCRED.unpack(cred)
            if uid not in self.allowed:
                self.metrics.refused_uid += 1
                log.warning("admin socket: refusing uid %d (allowed: %s)", uid, sorted(self.allowed))
                writer.write(wire.encode_error(0, wire.Refused(f"uid {uid} may not use the admin socket")))
                return
            if len(self._clients) > MAX_CLIENTS:
                self.metrics.refused_busy += 1
                writer.write(wire.encode_error(0, wire.Refused(f"{MAX_CLIENTS} admin clients already")))
                return
            self.metrics.accepted += 1
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        split = wire.LineSplitter()
        loop = asyncio.get_running_loop()
        # the clock runs from the last complete request: trickling bytes does not keep a slot
        deadline = loop.time() + self.idle_timeout
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self.metrics.idle_closed += 1
                return
            if not data:
                return
            try:
                lines = split.feed(data)
            except wire.TooLong as e:
                self.metrics.too_long += 1
                self.metrics.errors += 1
                writer.write(wire.encode_error(0, e))
                return
            if lines:
                deadline = loop.time() + self.idle_timeout
            for line in lines:
                writer.write(self._answer(line))
            if writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                self._drop_slow_reader(writer)
                return
            # answers past the transport's high-water mark wait for the client to read; one that
            # stops reading is dropped after idle_timeout, not kept (and its slot held) for good
            try:
                await asyncio.wait_for(writer.drain(), self.idle_timeout)
            except TimeoutError:
                self._drop_slow_reader(writer)
                return

    def _drop_slow_reader(self, writer: asyncio.StreamWriter) -> None:
        """Abort, not close: a close would keep the unread answers and flush them for as long as
        the client lets it."""
        self.metrics.slow_readers += 1
        writer.transport.abort()

    def _answer(self, line: bytes) -> bytes:
        self.metrics.requests += 1
        rid = 0
        try:
            req = wire.decode_request(line)
            rid = req.id
            return wire.encode_result(rid, self._dispatch(req))
        except wire.AdminError as e:
            self.metrics.errors += 1
            return wire.encode_error(rid or wire.request_id(line), e)
        except Exception as e:  # a bug answering must not end the daemon: say it, count it
            self.metrics.errors += 1
            log.exception("admin socket: internal error answering %r", line[:200])
            return wire.encode_error(rid, wire.AdminError(f"internal error: {type(e).__name__}: {e}"))

    def _dispatch(self, req: wire.Request) -> Any:
        v = self.view
        a = req.args
        match req.cmd:
            case "health":
                return {**v.health(), "admin": self.metrics.as_dict()}
            case "guests":
                return v.guests()
            case "qps":
                return v.qps()
            case "queues":
                return v.queues()
            case "jobs":
                return v.jobs()
            case "peers":
                return v.peers()
            case "cancel":
                return v.cancel(a.get("job"))
            case "tenant_set":
                return v.tenant_set(a)
            case "tenant_reset":
                return v.tenant_reset(a)
            case "tenants":
                return v.tenants()
            case "drain":
                return v.drain()
            case "undrain":
                return v.undrain()
            case "status":
                return v.status()
        raise wire.UnknownCommand(f"unknown command {req.cmd!r}")


def _listen_owner_only(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the start (bound under a
    temporary name with umask 0177, then renamed); a stale socket there is replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        for p in (tmp,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return sock


class AdminClient:
    """A blocking client of the admin socket (``vrdma ctl``, ``vrdma top``, tests)."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self._split = wire.LineSplitter(wire.MAX_RESPONSE_BYTES)
        self._lines: list[bytes] = []
        self._next = 1

    def call(self, cmd: str, **args: Any) -> Any:
        rid = self._next
        self._next += 1
        self.sock.sendall(wire.encode_request(wire.Request(rid, cmd, args)))
        while not self._lines:
            data = self.sock.recv(1 << 16)
            if not data:
                raise wire.ProtocolError("the daemon closed the admin connection")
            self._lines += self._split.feed(data)
        got, result = wire.decode_response(self._lines.pop(0))
        if got != rid:
            raise wire.ProtocolError(f"response id {got} answers no request of ours (sent {rid})")
        return result

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
