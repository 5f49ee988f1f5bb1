"""Minimal reproductions of what the fuzzers found (bench.fuzz), against the
real daemon process."""
import os
import random
import signal
import socket
import struct
import time

import pytest

from bench.fuzz.common import settle
from bench.fuzz.vhost import Daemon, FuzzConnection
from vhost_user.messages import VERSION, FrontendReq as R


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    yield d
    d.close()


def test_fds_of_a_batch_are_closed_when_a_reply_cannot_be_sent(daemon):
    """GET_FEATURES, then SET_VRING_CALL with an eventfd, from a front-end
    that shut its reading side (as one that exits, or never reads, does):
    the daemon reads both in one batch, its reply to GET_FEATURES fails
    (EPIPE), and SET_VRING_CALL's fd must still be closed. The daemon is
    stopped (SIGSTOP) while the front-end writes, so that it reads the whole
    batch at once, as it does whenever a front-end is faster than it."""
    time.sleep(0.3)
    base = daemon.fds()
    conns = []
    for _ in range(5):
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            c = FuzzConnection(daemon.path, 5)
            c.sock.shutdown(socket.SHUT_RD)
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            c.send(R.GET_FEATURES, VERSION, b"")
            c.send(R.SET_VRING_CALL, VERSION, struct.pack("<Q", 0), [efd])
            os.close(efd)
            conns.append(c)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    time.sleep(0.5)
    for c in conns:
        c.close()
    after = settle(daemon.fds, base, timeout=20.0)
    print("daemon fds", base, "->", after)
    assert after == base, daemon.fd_targets()
    assert daemon.alive()


def test_a_kick_fd_that_cannot_be_polled_is_a_protocol_error(daemon):
    """Fuzz finding (vhost-user target, seed 1204, inputs 604002 and 624000):
    SET_VRING_KICK with /dev/null or a memfd as the kick fd reached the event
    loop's add_reader, whose PermissionError (EPERM from epoll) escaped the
    back-end as an unexpected error with a traceback. It is a protocol error
    naming the ring; the fd is closed and the daemon serves on."""
    from bench.fuzz.vhost import VhostUserTarget

    class Valid(random.Random):       # the handshake without its random variations
        def random(self):
            return 0.99

    t = VhostUserTarget(0)
    t.rng = Valid(0)
    t._open_fds()
    try:
        time.sleep(0.3)
        base = daemon.fds()
        prefix = t._setup_prefix()
        # the handshake up to ring 0's SET_VRING_CALL, then a kick fd epoll refuses
        end = next(k for k, m in enumerate(prefix) if m[0] == R.SET_VRING_KICK)
        for bad in (t.null_fd, t.mem_fd):
            c = FuzzConnection(daemon.path, 5)
            for req, flags, payload, fds in prefix[:end]:
                assert c.send(req, flags, payload, fds)
            c.send(R.SET_VRING_KICK, VERSION, struct.pack("<Q", 0), [bad])
            while c._recv_some():                           # replies to the handshake, then EOF:
                pass
            assert c.closed_by_peer                         # closed by the daemon
            c.close()
        assert settle(daemon.fds, base, timeout=20.0) == base
        daemon.scan_log()
        assert daemon.tracebacks == 0, daemon.first_traceback
        c = FuzzConnection(daemon.path, 5)
        assert c.call(R.GET_FEATURES) is not None          # and serves the next front-end
        c.close()
    finally:
        t._close_fds()


@pytest.mark.parametrize("kind", ["own socket", "pipe"])
def test_a_ring_fd_that_is_not_an_eventfd_is_a_protocol_error(daemon, kind):
    """A front-end that passes its own end of the vhost-user socket as a ring's
    call fd: held by the daemon, it kept the connection open from the inside, so
    the front-end's close never reached the daemon as EOF and the connection
    (socket, rings, memory) outlived it. Kick, call and error fds must be
    eventfds: anything else closes that connection with a protocol error, the fd
    is released, and the daemon serves on."""
    time.sleep(0.3)
    base = daemon.fds()
    for req in (R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_KICK):
        c = FuzzConnection(daemon.path, 5)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            assert c.call(R.GET_FEATURES) is not None
            bad = c.sock.fileno() if kind == "own socket" else r
            c.send(req, VERSION, struct.pack("<Q", 0), [bad])
            while c._recv_some():
                pass
            assert c.closed_by_peer, f"{R(req).name} with {kind} as its fd was accepted"
        finally:
            c.close()
            os.close(r)
            os.close(w)
    after = settle(daemon.fds, base, timeout=20.0)
    assert after == base, daemon.fd_targets()
    daemon.scan_log()
    assert daemon.tracebacks == 0, daemon.first_traceback
    c = FuzzConnection(daemon.path, 5)
    assert c.call(R.GET_FEATURES) is not None
    c.close()
