import os
import shutil
import socket

import pytest

from netlab.ns import run

SO_RCVBUFFORCE = 33


def our_namespaces() -> set[str]:
    """Namespaces netlab made in this process (other processes have their own)."""
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines()
            if line.startswith(f"vrdma-{os.getpid()}-")}


@pytest.fixture
def netns():
    """Skip without root or iproute2; fail if the test leaves a namespace."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    before = our_namespaces()
    yield
    assert our_namespaces() == before, "namespaces left behind"


def udp_socket(ns, addr: str, port: int = 0, *, rcvbuf: int = 16 << 20) -> socket.socket:
    """A blocking UDP socket bound inside ``ns``, with a large receive buffer."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    s.bind((addr, port))
    return s


def drain(sock: socket.socket, count: int = 0, *, quiet: float = 0.05,
          timeout: float = 10.0, size: int = 65536) -> list[bytes]:
    """Datagrams from ``sock``: wait (up to ``timeout`` each) for the first
    ``count``, then take more until the socket is ``quiet`` for that long."""
    out = []
    sock.settimeout(timeout)
    try:
        while len(out) < count:
            out.append(sock.recv(size))
        sock.settimeout(quiet)
        while True:
            out.append(sock.recv(size))
    except TimeoutError:
        return out
