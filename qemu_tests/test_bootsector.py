"""Tests of the hand-assembled MBR: structure, errors, an independent disassembly, a real boot."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from qemu_tests.bootsector import (CODE, LISTING, MARKER_OFFSET, MAX_MARKER_LEN, SECTOR_SIZE,
                                   make_boot_sector, write_boot_disk)
from qemu_tests.errors import BootSectorError
from qemu_tests.launch import QemuVM


def test_layout():
    s = make_boot_sector(b"HELLO")
    assert len(s) == SECTOR_SIZE
    assert s[510:] == b"\x55\xaa"
    assert s[: len(CODE)] == CODE
    assert s[MARKER_OFFSET : MARKER_OFFSET + 6] == b"HELLO\x00"
    # mov si, imm16 points at the marker as loaded at 0x7c00
    i = CODE.index(b"\xbe")
    assert int.from_bytes(CODE[i + 1 : i + 3], "little") == 0x7C00 + MARKER_OFFSET
    assert "out dx, al" in LISTING and "hlt" in LISTING


@given(st.binary(min_size=1, max_size=MAX_MARKER_LEN).filter(lambda b: 0 not in b))
def test_marker_roundtrip(marker):
    s = make_boot_sector(marker)
    end = s.index(b"\x00", MARKER_OFFSET)
    assert s[MARKER_OFFSET:end] == marker
    assert len(s) == SECTOR_SIZE and s.endswith(b"\x55\xaa")


@pytest.mark.parametrize("bad, msg", [
    (b"", "empty"),
    (b"AB\x00C", "NUL byte at index 2"),
    (b"x" * (MAX_MARKER_LEN + 1), f"length {MAX_MARKER_LEN + 1}"),
    ("text", "must be bytes"),
])
def test_bad_marker(bad, msg):
    with pytest.raises(BootSectorError, match=msg):
        make_boot_sector(bad)


def test_bad_disk_size(tmp_path):
    with pytest.raises(BootSectorError, match="1000"):
        write_boot_disk(str(tmp_path / "d.img"), b"X", size=1000)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils objdump not installed")
def test_independent_disassembly(tmp_path):
    """objdump (GNU binutils) decodes the same instructions and jump targets as LISTING."""
    path = tmp_path / "mbr.bin"
    path.write_bytes(make_boot_sector(b"M"))
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi8086",
                          f"--stop-address={MARKER_OFFSET:#x}", str(path)],
                         capture_output=True, text=True, check=True).stdout
    insns = [line.split("\t")[-1].split()[0] for line in out.splitlines() if line.startswith("  ")]
    ours = [line[22:].split()[0] if not line[22:].split()[0].endswith(":") else line[22:].split()[1]
            for line in LISTING.splitlines()[:-2]]
    mapping = {"lods": "lodsb", "je": "jz"}
    assert [mapping.get(i, i) for i in insns] == ours
    assert "je     0x3d" in out and "je     0x2f" in out and "jmp    0x28" in out
    assert "jmp    0x3d" in out


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
