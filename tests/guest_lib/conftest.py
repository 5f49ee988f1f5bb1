import pytest

from vhost_user.testing import BackendThread
from virtio_rdma.device import RdmaDevice
from virtio_rdma.fabric import LocalFabric


@pytest.fixture
def rdma_backend(tmp_path):
    """The real daemon (in a thread) serving virtio-rdma devices on one LocalFabric."""
    fabric = LocalFabric()
    path = str(tmp_path / "rdma.sock")
    with BackendThread(path, lambda: RdmaDevice(fabric)) as b:
        b.fabric = fabric
        yield b
