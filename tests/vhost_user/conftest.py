import os

import pytest

from vhost_user.blk import BlkDevice, Disk
from vhost_user.testing import BackendThread

DISK_SIZE = 4 << 20


def ram_blk_factory(size=DISK_SIZE, **kw):
    return lambda info: BlkDevice(Disk.ram(size), owns_disk=True, **kw)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vu.sock")


@pytest.fixture
def backend(sock_path):
    with BackendThread(sock_path, ram_blk_factory(num_queues=2)) as b:
        yield b


@pytest.fixture
def fd_baseline():
    """Open fds before the test; the test asserts we return to it."""
    return {int(n) for n in os.listdir("/proc/self/fd")}
