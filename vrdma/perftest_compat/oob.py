"""The TCP side channel of perftest (perftest_communication.c, Ethernet mode).

Roles: the server (``ethernet_server_connect``) binds IPv4 ``INADDR_ANY`` on
the port with SO_REUSEADDR, listens with a backlog of 1, accepts one client
and closes the listener; the client (``ethernet_client_connect``) connects
to the first IPv4 address of the server's name that accepts. Then every
exchange is symmetric (:meth:`Channel.xchg`): the client writes first and
reads, the server reads first and writes. perftest reads a message with one
``read()`` of its exact size, so ours leave in one ``sendall`` with
TCP_NODELAY; we read until the whole message arrived, within a timeout,
never more than it.
"""
from __future__ import annotations

import socket
import time

from vrdma.perftest_compat.errors import OobError

IO_TIMEOUT = 60.0  # seconds for each exchange once connected


class Channel:
    """One connected side channel; owns its socket (``close()``)."""

    def __init__(self, sock: socket.socket, client: bool, timeout: float | None = IO_TIMEOUT):
        self.sock = sock
        self.client = client
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        self.timeout = timeout
        self.sent = 0       # messages written
        self.received = 0   # messages read

    def _write(self, msg: bytes) -> None:
        try:
            self.sock.sendall(msg)
        except OSError as e:
            raise OobError(f"cannot write {len(msg)} bytes to the peer: {e}") from e
        self.sent += 1

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise OobError(f"the peer closed the channel after {len(buf)} of {n} bytes")
                buf += chunk
        except TimeoutError as e:
            raise OobError(f"no {n}-byte message from the peer within {self.timeout:g} s") from e
        except OSError as e:
            raise OobError(f"cannot read {n} bytes from the peer: {e}") from e
        self.received += 1
        return bytes(buf)

    def xchg(self, mine: bytes, n: int) -> bytes:
        """ctx_xchg_data: send ``mine``, receive the peer's ``n`` bytes."""
        if self.client:
            self._write(mine)
            return self._read(n)
        theirs = self._read(n)
        self._write(mine)
        return theirs

    def write(self, msg: bytes) -> None:
        """A message that is never answered (``done``)."""
        self._write(msg)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def accept(port: int, timeout: float | None = None, io_timeout: float | None = IO_TIMEOUT,
           on_listen=None) -> Channel:
    """The server: listen on ``port`` (all IPv4 addresses), accept one client."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind(("0.0.0.0", port))  # noqa: S104  perftest's server listens on every address
        except OSError as e:
            raise OobError(f"Couldn't listen to port {port}: {e}") from e
        lsock.listen(1)
        if on_listen is not None:
            on_listen()
        lsock.settimeout(timeout)
        try:
            conn, _ = lsock.accept()
        except TimeoutError as e:
            raise OobError(f"no client connected to port {port} within {timeout:g} s") from e
    finally:
        lsock.close()
    return Channel(conn, client=False, timeout=io_timeout)


def connect(host: str, port: int, timeout: float | None = None, io_timeout: float | None = IO_TIMEOUT,
            retry: bool = False) -> Channel:
    """The client: connect to the first IPv4 address of ``host`` that accepts.
    With ``retry`` (not perftest's behaviour) refused connections are tried
    again until ``timeout``."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OobError(f"cannot resolve {host!r}: {e}") from e
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.settimeout(timeout)
            try:
                sock.connect(addr)
                return Channel(sock, client=True, timeout=io_timeout)
            except OSError:
                sock.close()
        if not retry or (deadline is not None and time.monotonic() > deadline):
            raise OobError(f"Couldn't connect to {host}:{port}")
        time.sleep(0.1)
