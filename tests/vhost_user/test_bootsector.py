"""Tests of the hand-assembled MBR (vhost_user.bootsector): structure, errors, an independent
disassembly. The real boot from it under QEMU is in qemu_tests/test_bootsector.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from vhost_user.bootsector import (CODE, LISTING, MARKER_OFFSET, MAX_MARKER_LEN, SECTOR_SIZE, BootSectorError,
                                   make_boot_sector, write_boot_disk)
from vhost_user.errors import VhostUserError


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
    with pytest.raises(BootSectorError, match=msg) as e:
        make_boot_sector(bad)
    assert isinstance(e.value, VhostUserError) and isinstance(e.value, ValueError)


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


def test_backend_serves_the_boot_sector_as_sector_0():
    """``vrdma backend --device blk --boot-marker M`` (a real daemon process): a front-end
    reading sector 0 through the virtqueue gets exactly ``make_boot_sector(M)``."""
    from vhost_user.blk_driver import BlkDriver
    from vhost_user.testing import DaemonProcess

    with DaemonProcess("--device", "blk", "--size", "1M", "--boot-marker", "VRDMA-CLI-BOOT") as d:
        with BlkDriver.connect(d.path) as blk:
            assert bytes(blk.read(0, 1)) == make_boot_sector(b"VRDMA-CLI-BOOT")
            assert bytes(blk.read(1, 1)) == bytes(SECTOR_SIZE)
