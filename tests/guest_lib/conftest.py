import pytest

from vhost_user.testing import BackendThread
from virtio_rdma.device import RdmaDevice
from fabric.local import LocalFabric


@pytest.fixture
def rdma_backend(tmp_path):
    """The real daemon (in a thread) serving virtio-rdma devices on one LocalFabric."""
    fabric = LocalFabric()
    path = str(tmp_path / "rdma.sock")
    with BackendThread(path, lambda info: RdmaDevice(fabric)) as b:
        b.fabric = fabric
        yield b


@pytest.fixture
def endpoints(rdma_backend):
    """Factory of RC endpoints (each its own guest) on the daemon; all closed at teardown."""
    from guest_lib import QPCap
    from guest_lib.endpoint import RcEndpoint

    made = []

    def make(**kw):
        kw.setdefault("cap", QPCap(64, 64, 4, 4, 64))
        kw.setdefault("mem_size", 16 << 20)
        ep = RcEndpoint(rdma_backend.path, **kw)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


@pytest.fixture
def pair(endpoints):
    from guest_lib.endpoint import connect_pair

    a, b = endpoints(), endpoints()
    connect_pair(a, b)
    return a, b
