import socket
import threading
import time

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (IPv4 and IPv6)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    """Whether some socket of this host LISTENs on ``port`` (from /proc/net/tcp*)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port: int, timeout: float = 20.0, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if not alive() or time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port}")
        time.sleep(0.01)


class Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its error."""

    def __init__(self, fn, *args, **kw):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kw), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kw):
        try:
            self._value = fn(*args, **kw)
        except BaseException as e:
            self._error = e

    def result(self, timeout: float = 10.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture
def port():
    return free_port()
