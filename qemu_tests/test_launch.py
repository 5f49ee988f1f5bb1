"""Tests of the launchers: qemu-storage-daemon export lifecycle, QemuVM vhost-user socket handling.

The vhost-user byte-level checks here only read the first message / first reply: they test
the launchers (who listens, who connects, clean shutdown), not a vhost-user implementation.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from qemu_tests.errors import QemuStartError, QmpError
from qemu_tests.launch import (BLK_CARRIER, QemuStorageDaemon, QemuVM, VhostUserDevice,
                               qemu_device_names)
from vhost_user.bootsector import write_boot_disk

pytestmark = pytest.mark.qemu

GET_FEATURES = 1
F_RO = 1 << 5
F_MQ = 1 << 12
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32


def _get_features(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(struct.pack("<III", GET_FEATURES, 0x1, 0))
        hdr = s.recv(12, socket.MSG_WAITALL)
        req, flags, size = struct.unpack("<III", hdr)
        assert (req, flags, size) == (GET_FEATURES, 0x5, 8)  # version 1 | reply
        return struct.unpack("<Q", s.recv(8, socket.MSG_WAITALL))[0]


def test_storage_daemon_lifecycle(tmp_path, qemu_storage_daemon):
    image, sock = str(tmp_path / "disk.raw"), str(tmp_path / "vhost.sock")
    qsd = QemuStorageDaemon(image, sock, num_queues=2, create_size=16 << 20)
    with qsd:
        assert os.path.getsize(image) == 16 << 20
        feats = _get_features(sock)
        assert feats & F_VERSION_1 and feats & F_PROTOCOL_FEATURES and feats & F_MQ
        assert not feats & F_RO
        exports = qsd.qmp("query-block-exports")
        assert [e["id"] for e in exports] == ["exp0"]
        assert exports[0]["type"] == "vhost-user-blk"
        workdir = qsd.workdir
    assert qsd.clean_exit is True and qsd.returncode == 0
    assert not os.path.exists(workdir)


def test_storage_daemon_read_only(tmp_path, qemu_storage_daemon):
    image, sock = str(tmp_path / "ro.raw"), str(tmp_path / "ro.sock")
    with QemuStorageDaemon(image, sock, writable=False, create_size=1 << 20,
                           logical_block_size=4096):
        assert _get_features(sock) & F_RO
    assert not os.path.exists(sock)


def test_storage_daemon_refuses_existing_socket(tmp_path, qemu_storage_daemon):
    sock = tmp_path / "busy.sock"
    sock.write_bytes(b"")
    with pytest.raises(QemuStartError, match="already exists"):
        with QemuStorageDaemon(str(tmp_path / "x.raw"), str(sock), create_size=1 << 20):
            pass
    assert sock.exists()  # never removes a path it did not create


def test_storage_daemon_bad_args(tmp_path):
    with pytest.raises(ValueError, match="logical_block_size 1000"):
        QemuStorageDaemon("x", "y", logical_block_size=1000)
    with pytest.raises(ValueError, match="num_queues 0"):
        QemuStorageDaemon("x", "y", num_queues=0)


def test_vhost_user_device_args(tmp_path):
    dev = VhostUserDevice("/run/x.sock", num_queues=4, queue_size=256, bootindex=0,
                          carrier="blk", reconnect=1)
    args = dev.qemu_args()
    assert args[0] == "-chardev" and args[1] == "socket,id=vu0-chr,path=/run/x.sock,reconnect=1"
    assert args[3] == (f"{BLK_CARRIER},id=vu0,chardev=vu0-chr,num-queues=4,queue-size=256,bootindex=0")
    gen = VhostUserDevice("/s", num_queues=2, carrier="generic", config_size=64).qemu_args()
    assert "vhost-user-test-device-pci" in gen[3] and "virtio-id=21" in gen[3] and "num_vqs=2" in gen[3]  # borrowed
    for bad in (dict(queue_size=100), dict(num_queues=0), dict(carrier="x"), dict(reconnect=0)):
        with pytest.raises(ValueError):
            VhostUserDevice("/s", **bad)


def test_carrier_detection(qemu_system):
    names = qemu_device_names()
    assert BLK_CARRIER in names
    expected = "generic" if "vhost-user-test-device-pci" in names else "blk"
    assert VhostUserDevice("/s").resolved_carrier() == expected


def test_vm_waits_for_backend_socket(tmp_path, qemu_system):
    vm = QemuVM(vhost_user=VhostUserDevice(str(tmp_path / "none.sock")), socket_timeout=0.3)
    with pytest.raises(QemuStartError, match="no unix socket"):
        with vm:
            pass
    assert vm.proc is None and not os.path.exists(vm.workdir)


def test_vm_connects_to_backend_and_fails_cleanly_when_rejected(tmp_path, qemu_system):
    """Our side listens, QEMU connects and sends GET_FEATURES first; we hang up and QEMU
    fails realize: start() raises QemuStartError with QEMU's stderr, and nothing leaks."""
    path = str(tmp_path / "backend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen: list[tuple[int, int, int]] = []

    def backend():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            seen.append(struct.unpack("<III", conn.recv(12, socket.MSG_WAITALL)))
        listener.close()
        os.unlink(path)  # QEMU's realize retries now get ECONNREFUSED/ENOENT

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    vm = QemuVM(vhost_user=VhostUserDevice(path, num_queues=2, carrier="blk"), memory_mib=64)
    with pytest.raises(QemuStartError) as info:
        with vm:
            pass
    t.join(10)
    assert seen == [(GET_FEATURES, 0x1, 0)]
    assert "vu0" in info.value.stderr or "vhost" in info.value.stderr
    assert vm.returncode not in (None, 0)
    assert not os.path.exists(vm.workdir)


def test_vm_qmp_and_virtio_status(tmp_path, qemu_system):
    """A plain virtio-blk boot disk: virtio_status() shows the driver (SeaBIOS) reached DRIVER_OK."""
    disk = tmp_path / "b.img"
    write_boot_disk(str(disk), b"QMP-TEST-OK")
    with QemuVM(memory_mib=64, drives=[f"file={disk},format=raw,if=virtio"]) as vm:
        vm.wait_serial(b"QMP-TEST-OK", timeout=30)
        devs = vm.virtio_devices()
        assert [d["name"] for d in devs] == ["virtio-blk"]
        st = vm.virtio_status(devs[0]["path"])
        assert st["device-id"] == 2
        assert any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in st["status"]["statuses"])
        q = vm.virtio_queue_status(0, devs[0]["path"])
        assert q["vring-num"] > 0 and q["used-idx"] >= 1
        with pytest.raises(QmpError, match="CommandNotFound"):
            vm.qmp("no-such-command")
        assert vm.quit() == 0
