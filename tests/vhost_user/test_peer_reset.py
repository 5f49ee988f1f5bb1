"""A front-end that closes its socket with the daemon's replies unread is
dropped by the daemon, whatever it left half sent (issue #12's fuzz finding
"a daemon connection socket outlived its closed peer").

The mechanism: closing a unix socket with unread data sets ECONNRESET on its
peer, whose epoll entry then reports EPOLLERR. uvloop (libuv's uv_poll) calls
the reader of such a socket once and then stops and closes its poll handle:
no further readiness event ever comes. A reader that returned from that one
call with the EOF still unread (half a message read, or a full batch of
messages and more queued) kept the connection, its fd, device and mappings,
for the daemon's life. Each test makes that one call deterministic: the
daemon's loop is held while the front-end sends and closes, so the first
wake-up sees data, EOF and the error together.
"""
import contextlib
import select
import socket
import struct
import threading

import pytest

from vhost_user.endpoint import ConnectionClosed, MessageReader
from vhost_user.errors import TransportError
from vhost_user.messages import VERSION, FrontendReq as R
from vhost_user.server import READ_BATCH

_HDR = struct.Struct("<III")


@contextlib.contextmanager
def _loop_held(backend):
    """The back-end's loop is blocked inside a callback until the block ends."""
    gate, held = threading.Event(), threading.Event()
    backend.loop.call_soon_threadsafe(lambda: (held.set(), gate.wait(30)))
    assert held.wait(10), "the back-end's loop did not run the holding callback"
    try:
        yield
    finally:
        gate.set()


def _handshaken(sock_path):
    """A front-end past the handshake (so no handshake timeout closes it), with
    the GET_FEATURES reply waiting unread in its receive queue."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(_HDR.pack(R.SET_OWNER, VERSION, 0) + _HDR.pack(R.GET_FEATURES, VERSION, 0))
    readable, _, _ = select.select([s], [], [], 10)
    assert readable, "no GET_FEATURES reply"
    return s


def _enable(index: int) -> bytes:   # answered by nothing: no reply to send to a closed peer
    return _HDR.pack(R.SET_VRING_ENABLE, VERSION, 8) + struct.pack("<II", index, 1)


@pytest.mark.parametrize("tail,why", [
    (b"\x01\0\0\0\x01", "half a header"),
    (_HDR.pack(R.SET_FEATURES, VERSION, 8) + b"\0\0\0", "a header and half its payload"),
    (_enable(0) * (READ_BATCH - 1) + b"\x01\0", "a batch less one message, then half a header"),
], ids=["half-header", "half-payload", "batch-less-one-then-half-header"])
def test_half_message_then_reset(backend, sock_path, tail, why):
    s = _handshaken(sock_path)
    with _loop_held(backend):
        s.sendall(tail)
        s.close()   # the GET_FEATURES reply unread: the daemon's socket reports ECONNRESET
    assert backend.wait_for(lambda srv: not srv.connections), f"{why}: the connection outlived its peer"
    m = backend.metrics()
    assert (m.accepted, m.closed, m.transport_errors) == (1, 1, 1), m


@pytest.mark.parametrize("n", [READ_BATCH, READ_BATCH + 1, 3 * READ_BATCH])
def test_full_batches_then_reset(backend, sock_path, n):
    """More messages queued than one wake-up reads: the rest, and the EOF behind
    them, are read by a continuation, not by a readiness event that never comes."""
    s = _handshaken(sock_path)
    with _loop_held(backend):
        s.sendall(_enable(0) * n)
        s.close()
    assert backend.wait_for(lambda srv: not srv.connections), f"{n} messages: the connection lived on"
    m = backend.metrics()
    assert (m.closed, m.transport_errors, m.protocol_errors) == (1, 1, 0), m
    assert m.read_continuations == n // READ_BATCH, m


def test_full_batches_of_a_live_front_end(backend, sock_path):
    """The continuation reads what a live front-end queued: every message is handled in order."""
    s = _handshaken(sock_path)
    s.settimeout(10)
    with _loop_held(backend):
        s.sendall(_enable(0) * (2 * READ_BATCH) + _HDR.pack(R.GET_FEATURES, VERSION, 0))
    replies = b""
    while len(replies) < 2 * (_HDR.size + 8):
        replies += s.recv(4096)
    assert [_HDR.unpack_from(replies, k)[0] for k in (0, _HDR.size + 8)] == [R.GET_FEATURES] * 2
    m = backend.metrics()
    assert m.read_continuations == 2 and m.closed == 0, m
    assert backend.call(lambda: next(iter(backend.server.connections)).core.metrics.by_request) == {
        "SET_OWNER": 1, "GET_FEATURES": 2, "SET_VRING_ENABLE": 2 * READ_BATCH}
    s.close()
    assert backend.wait_for(lambda srv: not srv.connections)


@pytest.mark.parametrize("unread", [True, False], ids=["peer-reset", "clean-eof"])
def test_reader_reads_to_the_end_after_a_short_read(unread):
    """MessageReader never returns on a short read: an EOF or error behind half a
    message is raised by the same call (the daemon may get no second call)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        if unread:
            ours.sendall(b"a reply the peer never reads")
        peer.sendall(b"\x01\0\0\0\x01")
        peer.close()
        reader = MessageReader(ours)
        with pytest.raises(TransportError) as e:
            reader.read_available()
        if unread:
            assert not isinstance(e.value, ConnectionClosed) and "reset" in str(e.value).lower()
        else:
            assert isinstance(e.value, ConnectionClosed) and e.value.mid_message
    finally:
        ours.close()
