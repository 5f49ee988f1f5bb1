"""The TCP side channel of ibv_rc_pingpong: swap addresses, then ``done``.

Roles (rdma-core libibverbs/examples/rc_pingpong.c, pp_*_exch_dest):

- server: ``getaddrinfo(NULL, port, AI_PASSIVE, AF_UNSPEC, SOCK_STREAM)``,
  bind the first address that binds (SO_REUSEADDR), ``listen(1)``, accept
  one client and close the listener; read the client's 52-byte message;
  move its QP to RTR and RTS towards the client (the caller's ``connect``);
  only then send its own message, so the client cannot send before the
  server can receive; read the client's 5-byte ``"done\\0"``; close.
- client: connect to the first address of ``getaddrinfo(servername, port)``
  that accepts; send its message; read the server's; send ``"done\\0"``;
  close. It connects its QP after the exchange.

rc_pingpong reads each message with one ``read()``, so a message must leave
in one ``send``; we read until the full length arrived (or EOF), time out
instead of hanging on a silent peer, and check what we read (see
:mod:`.exchange`). Errors carry rc_pingpong's messages.
"""
from __future__ import annotations

import socket
from collections.abc import Callable

from vrdma.rc_pingpong import exchange
from vrdma.rc_pingpong.errors import OobError, OobTimeout, PingpongError, SetupError

PORT = 18515
IO_TIMEOUT = 30.0  # seconds for each read or write once connected


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only if the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _io_error(message: str, who: str, e: OSError, timeout: float | None) -> OobError:
    """rc_pingpong's ``message``, after a perror-like line saying why."""
    if isinstance(e, TimeoutError):
        return OobTimeout(message, f"{who}: no answer within {timeout:g} s")
    return OobError(message, f"{who}: {e.strerror or e}")


def _first_socket(infos, setup) -> socket.socket | None:
    """The first socket of getaddrinfo's ``infos`` on which ``setup(sock,
    addr)`` succeeds (as rc_pingpong walks the list); None if none does."""
    for family, type_, proto, _, addr in infos:
        try:
            sock = socket.socket(family, type_, proto)
        except OSError:
            continue
        try:
            setup(sock, addr)
            return sock
        except OSError:
            sock.close()
    return None


def listen(port: int) -> socket.socket:
    """The server's listening socket, bound as rc_pingpong binds it."""
    try:
        infos = socket.getaddrinfo(None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OobError(f"{e.strerror} for port {port}") from e

    def bind(sock, addr):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)

    sock = _first_socket(infos, bind)
    if sock is not None:
        return sock
    raise OobError(f"Couldn't listen to port {port}")


def accept(listener: socket.socket, timeout: float | None = None) -> socket.socket:
    """One client; ``timeout`` None waits as long as rc_pingpong does (forever)."""
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError as e:
        raise OobTimeout("accept() failed", f"accept: no client within {timeout:g} s") from e
    except OSError as e:
        raise OobError("accept() failed", f"accept: {e.strerror}") from e
    return conn


def connect(servername: str, port: int, timeout: float | None = IO_TIMEOUT) -> socket.socket:
    """A connection to the first address of ``servername`` that accepts."""
    try:
        infos = socket.getaddrinfo(servername, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OobError(f"{e.strerror} for {servername}:{port}") from e

    def connect_to(sock, addr):
        sock.settimeout(timeout)
        sock.connect(addr)

    sock = _first_socket(infos, connect_to)
    if sock is not None:
        return sock
    raise OobError(f"Couldn't connect to {servername}:{port}")


def client_exchange(servername: str, port: int, my_dest: exchange.Dest, *,
                    timeout: float | None = IO_TIMEOUT) -> exchange.Dest:
    """The client's side: returns the server's destination."""
    msg = exchange.encode(my_dest)
    with connect(servername, port, timeout) as sock:
        try:
            sock.sendall(msg)
        except OSError as e:
            raise _io_error("Couldn't send local address", "client write", e, timeout) from e
        fail = "Couldn't read/write remote address"
        try:
            reply = _recv_exact(sock, exchange.MSG_SIZE)
        except OSError as e:
            raise _io_error(fail, "client read/write", e, timeout) from e
        if len(reply) != exchange.MSG_SIZE:
            raise OobError(fail, f"client read/write: {len(reply)}/{exchange.MSG_SIZE} bytes before "
                                 "the server closed")
        # Parse before "done": a server we cannot use is told so by the close.
        rem = exchange.decode(reply)
        try:
            sock.sendall(exchange.DONE)
        except OSError as e:
            raise _io_error(fail, "client read/write", e, timeout) from e
    return rem


def server_exchange(port: int, my_dest: exchange.Dest, connect_qp: Callable[[exchange.Dest], None], *,
                    accept_timeout: float | None = None, timeout: float | None = IO_TIMEOUT) -> exchange.Dest:
    """The server's side: accept one client, call ``connect_qp(client_dest)``
    (RTR and RTS; raise :class:`PingpongError` on failure), then answer.
    Returns the client's destination."""
    msg = exchange.encode(my_dest)
    with listen(port) as listener:
        conn = accept(listener, accept_timeout)
    with conn:
        conn.settimeout(timeout)
        try:
            got = _recv_exact(conn, exchange.MSG_SIZE)
        except OSError as e:
            raise _io_error(f"0/{exchange.MSG_SIZE}: Couldn't read remote address", "server read", e,
                            timeout) from e
        if len(got) != exchange.MSG_SIZE:
            raise OobError(f"{len(got)}/{exchange.MSG_SIZE}: Couldn't read remote address",
                           "server read: the client closed the connection")
        rem = exchange.decode(got)
        try:
            connect_qp(rem)
        except PingpongError as e:
            raise SetupError("Couldn't connect to remote QP", "\n".join(e.lines())) from e
        fail = "Couldn't send/recv local address"
        try:
            conn.sendall(msg)
            done = _recv_exact(conn, len(exchange.DONE))
        except OSError as e:
            raise _io_error(fail, "server write/read", e, timeout) from e
        if done != exchange.DONE:
            raise OobError(fail, f"server read: expected {exchange.DONE!r} from the client, got {done!r}")
    return rem
