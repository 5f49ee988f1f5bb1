"""The vhost-user socket endpoint: messages and SCM_RIGHTS fds over AF_UNIX.

A message's fds arrive as ancillary data with its header. The reader asks
the kernel for exactly the bytes it still needs (first the 12-byte header,
then the payload), so a recvmsg never runs past one message and fds can only
arrive with header bytes; fds that arrive anywhere else are a protocol
violation. Linux never merges data from two sendmsg calls across an skb that
carries fds, which is what makes this exact.

Ownership: fds received are owned by the reader until a whole message is
returned, then by whoever holds the :class:`Message`. On any error the reader
closes what it holds.
"""
from __future__ import annotations

import array
import errno
import os
import socket

from vhost_user.errors import MessageError, TransportError
from vhost_user.messages import HEADER_SIZE, MAX_FDS, Message, decode_header

_FD_SIZE = array.array("i").itemsize
# Room for one more fd than any message may carry, so "too many" is seen as
# such rather than as a truncation.
_ANC_SIZE = socket.CMSG_SPACE((MAX_FDS + 1) * _FD_SIZE)


class ConnectionClosed(TransportError):
    """The peer closed the connection (cleanly, between messages or not)."""

    def __init__(self, message: str = "peer closed the connection", *, mid_message: bool = False):
        super().__init__(message, errno.ECONNRESET)
        self.mid_message = mid_message


def close_fds(fds) -> None:
    """Close every fd; negative entries (slots whose fd was taken) are skipped."""
    for fd in fds:
        if fd < 0:
            continue
        try:
            os.close(fd)
        except OSError:
            pass


def _take_fds(ancdata, flags: int) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise MessageError(f"message carried more than {MAX_FDS} file descriptors (ancillary data truncated)")
    return fds


class MessageReader:
    """Incremental, non-blocking message reader for one socket."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._header = bytearray()
        self._payload = bytearray()
        self._hdr: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    def close(self) -> None:
        close_fds(self._fds)
        self._fds = []

    def read_available(self, max_messages: int = 64) -> list[Message]:
        """Read whatever the socket has; return the complete messages.

        Unless it returns ``max_messages`` messages, it has read until the socket
        would block: an EOF or error behind the data is raised in this call.

        Raises ConnectionClosed on EOF, MessageError on a malformed header or
        misplaced fds, TransportError on socket errors.
        """
        out: list[Message] = []
        try:
            while len(out) < max_messages:
                msg = self._step()
                if msg is None:
                    break
                out.append(msg)
        except BaseException:
            for m in out:
                close_fds(m.fds)
            self.close()
            raise
        return out

    def _recv(self, n: int, want_fds: bool):
        try:
            if want_fds:
                data, anc, flags, _ = self._sock.recvmsg(n, _ANC_SIZE)
                return data, _take_fds(anc, flags)
            data, anc, flags, _ = self._sock.recvmsg(n, _ANC_SIZE)
            fds = _take_fds(anc, flags)
            if fds:
                close_fds(fds)
                raise MessageError("file descriptors arrived in the middle of a message payload")
            return data, []
        except (BlockingIOError, InterruptedError):
            return None, []
        except MessageError:
            raise
        except TimeoutError as e:  # a blocking socket's timeout (the front-end's): no errno of its own
            raise TransportError("recvmsg timed out", errno.ETIMEDOUT) from e
        except OSError as e:
            raise TransportError(f"recvmsg failed: {e.strerror}", e.errno or errno.EPIPE) from e

    def _step(self) -> Message | None:
        # A short read is followed by another until the kernel says it has nothing
        # (EAGAIN), EOF or an error: never return to the event loop on a short read.
        # uvloop (libuv) stops and closes a reader whose socket reports EPOLLERR (a
        # unix socket's peer closed with our replies unread: ECONNRESET) after calling
        # it once; had that one call read half a message and returned, the EOF behind
        # it would never be read and the connection would outlive its peer.
        while self._hdr is None:
            data, fds = self._recv(HEADER_SIZE - len(self._header), want_fds=True)
            if data is None:
                return None
            if fds and self._header:
                close_fds(fds)
                raise MessageError("file descriptors arrived in the middle of a message header")
            self._fds.extend(fds)
            if not data:
                if self._header or self._fds:
                    raise ConnectionClosed("peer closed the connection in the middle of a message header",
                                           mid_message=True)
                raise ConnectionClosed()
            self._header += data
            if len(self._header) == HEADER_SIZE:
                self._hdr = decode_header(bytes(self._header))
        request, flags, size = self._hdr
        while len(self._payload) < size:
            data, _ = self._recv(size - len(self._payload), want_fds=False)
            if data is None:
                return None
            if not data:
                raise ConnectionClosed("peer closed the connection in the middle of a message payload",
                                       mid_message=True)
            self._payload += data
        msg = Message(request=request, flags=flags, payload=bytes(self._payload), fds=self._fds)
        self._header = bytearray()
        self._payload = bytearray()
        self._hdr = None
        self._fds = []
        return msg


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message (header + payload in one sendmsg, fds attached).

    Works on blocking sockets; on a non-blocking one a full send buffer is a
    TransportError (a peer that does not read its replies is not waited for).
    """
    data = msg.encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())] if msg.fds else []
    try:
        sent = sock.sendmsg([data], anc)
        while sent < len(data):
            sent += sock.send(data[sent:])
    except BlockingIOError as e:
        raise TransportError("peer is not reading: socket send buffer full", errno.EAGAIN) from e
    except OSError as e:
        raise TransportError(f"sendmsg failed: {e.strerror}", e.errno or errno.EPIPE) from e


def recv_message(sock: socket.socket) -> Message:
    """Blocking read of exactly one message (the front-end's side)."""
    reader = MessageReader(sock)
    while True:
        msgs = reader.read_available(max_messages=1)
        if msgs:
            return msgs[0]
