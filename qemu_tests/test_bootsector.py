"""A real boot from the hand-assembled MBR (vhost_user.bootsector) under QEMU: SeaBIOS loads it
from a plain raw disk. Its structure, errors and disassembly are tested in
tests/vhost_user/test_bootsector.py."""

from __future__ import annotations

import pytest

from qemu_tests.launch import QemuVM
from vhost_user.bootsector import write_boot_disk


@pytest.mark.qemu
@pytest.mark.parametrize("interface", ["virtio", "ide"])
def test_boot_prints_marker(tmp_path, qemu_system, interface):
    """SeaBIOS loads sector 0 from a plain raw disk and our code prints the marker on COM1."""
    disk = tmp_path / "boot.img"
    marker = f"VRDMA-BOOT-{interface.upper()}-OK".encode()
    write_boot_disk(str(disk), marker + b"\r\n")
    with QemuVM(memory_mib=64, drives=[f"file={disk},format=raw,if={interface}"]) as vm:
        out = vm.wait_serial(marker, timeout=30)
        assert out.startswith(marker)
        # the guest halted in our cli;hlt loop: QEMU is still running
        assert vm.returncode is None
        assert vm.quit() == 0
