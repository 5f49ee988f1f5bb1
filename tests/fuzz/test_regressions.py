"""Minimal reproductions of what the fuzzers found (bench.fuzz), against the
real daemon process."""
import os
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


@pytest.mark.xfail(strict=True, reason="fuzz finding (vhost-user target): vhost_user/server.py "
                   "Connection._on_readable returns when sending a reply fails without closing the fds "
                   "of the messages left in the batch (`for r in replies: if not self._send(r): return`); "
                   "remove this mark with the fix")
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
    after = settle(daemon.fds, base, timeout=2.0)
    print("daemon fds", base, "->", after)
    assert after == base, daemon.fd_targets()
    assert daemon.alive()
