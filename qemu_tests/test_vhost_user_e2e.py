"""End to end with real third-party peers.

(a) Debian's QEMU 7.2 is the front-end of our back-end: vhost-user-blk-pci
    is the carrier, SeaBIOS negotiates the device, QEMU maps its memfd RAM
    into our daemon, sets up and enables the ring, and SeaBIOS reads the boot
    sector *through our virtqueue* and runs it: the marker on the serial port
    proves the data moved.
(b) qemu-storage-daemon's vhost-user-blk export is the back-end of our
    front-end: we write sectors, read them back, and check the image file.
"""
import os

import pytest

from qemu_tests.launch import QemuStorageDaemon, QemuVM, VhostUserDevice
from vhost_user.blk import BlkDevice, Disk
from vhost_user.blk_driver import BlkDriver
from vhost_user.bootsector import make_boot_sector
from vhost_user.testing import BackendThread, open_fds

pytestmark = pytest.mark.qemu

MARKER = b"VRDMA-VHOST-USER-OK"


def test_qemu72_frontend_boots_from_our_backend(tmp_path, qemu_system):
    sock = str(tmp_path / "blk.sock")
    devices = []

    def factory(info):
        dev = BlkDevice(Disk.ram(1 << 20, make_boot_sector(MARKER)), num_queues=2, owns_disk=True)
        devices.append(dev)
        return dev

    with BackendThread(sock, factory) as backend:
        fds_before = open_fds()
        vm = QemuVM(vhost_user=VhostUserDevice(sock, num_queues=2, queue_size=128, bootindex=0, carrier="blk"),
                    memory_mib=128, workdir=str(tmp_path / "vm"))
        with vm:
            out = vm.wait_serial(MARKER, timeout=60)
            assert MARKER in out
            st = vm.virtio_status()
            # QEMU's view: the guest driver (SeaBIOS) reached DRIVER_OK with VERSION_1.
            assert st["status"]["statuses"] and "VIRTIO_CONFIG_S_DRIVER_OK" in str(st["status"])
            assert "VIRTIO_F_VERSION_1" in str(st["guest-features"])

            # Our view: one connection, memory mapped, ring 0 started and enabled,
            # the boot sector read through the ring.
            def state(server):
                (conn,) = list(server.connections)
                core = conn.core
                r0 = core.vrings[0]
                return dict(regions=[(r.gpa, r.size) for r in core.mem.regions()],
                            protocol=int(core.protocol), status=core.status,
                            r0=(r0.started, r0.enabled, r0.size), r0_used=r0.queue.used_idx if r0.queue else 0)
            s = backend.call(state, backend.server)
            assert s["regions"] and sum(size for _, size in s["regions"]) == 128 << 20
            assert s["r0"] == (True, True, 128)
            assert s["r0_used"] >= 1
            assert s["status"] & 0x4  # DRIVER_OK via SET_STATUS
            assert devices[0].requests["IN"] >= 1
            assert vm.quit() == 0
        # QEMU stopped the rings (GET_VRING_BASE) and closed the socket: all released.
        assert backend.wait_for(lambda s: not s.connections, timeout=10)
        assert open_fds() == fds_before
        assert backend.metrics().protocol_errors == 0


def test_our_frontend_against_qemu_storage_daemon(tmp_path, qemu_storage_daemon):
    image = str(tmp_path / "disk.raw")
    sock = str(tmp_path / "qsd.sock")
    size = 8 << 20
    with QemuStorageDaemon(image, sock, num_queues=1, create_size=size, workdir=str(tmp_path / "qsd")):
        with BlkDriver.connect(sock, queue_size=128) as blk:
            assert blk.capacity == size // 512
            payloads = {}
            for sector, count in [(0, 1), (5, 8), (1000, 32), (blk.capacity - 4, 4)]:
                data = os.urandom(count * 512)
                blk.write(sector, data)
                payloads[sector] = data
            blk.flush()
            for sector, data in payloads.items():
                assert bytes(blk.read(sector, len(data) // 512)) == data
    # independent check: the bytes are in qemu-storage-daemon's image file
    with open(image, "rb") as f:
        for sector, data in payloads.items():
            f.seek(sector * 512)
            assert f.read(len(data)) == data
