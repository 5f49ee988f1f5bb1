"""Tests of the kernel-rxe guest: pure codecs (cpio newc, vmlinux extraction) and real boots.

The boot tests prove kernel soft-RoCE works inside the guest: rxe0 is PORT_ACTIVE and an
RC ping-pong between two processes of the guest over rxe0 succeeds.  They skip (with the
reason) only when a capability is missing: apt download, dpkg-deb, depmod, QEMU, root/netns.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess

import pytest
from hypothesis import given, strategies as st

from qemu_tests.rxe_guest import RxeGuest, TapNetdev, pingpong_self_test_script
from vrdma.image import cpio
from vrdma.image.errors import BuildError
from vrdma.image.vmlinux import extract_vmlinux

# --- pure parts ---------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=20)


@given(st.dictionaries(names, st.binary(max_size=300), min_size=1, max_size=8))
def test_cpio_roundtrip(files):
    entries = [cpio.directory("d")] + [cpio.file(f"d/{n}", data, 0o640) for n, data in files.items()]
    entries.append(cpio.symlink("link", "d"))
    blob = cpio.encode(entries)
    assert len(blob) % 4 == 0 and blob.startswith(b"070701")
    assert cpio.decode(blob) == entries


def test_cpio_matches_gnu_cpio(tmp_path):
    """GNU cpio (an independent implementation) lists and extracts our archive."""
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    blob = cpio.encode([cpio.directory("etc"), cpio.file("etc/x.sh", b"echo hi\n", 0o755),
                        cpio.symlink("bin", "etc")])
    out = subprocess.run(["cpio", "-i", "-d", "--quiet"], input=blob, cwd=tmp_path,
                         capture_output=True, check=True)
    assert out.returncode == 0
    assert (tmp_path / "etc/x.sh").read_bytes() == b"echo hi\n"
    assert stat.S_IMODE(os.stat(tmp_path / "etc/x.sh").st_mode) == 0o755
    assert os.readlink(tmp_path / "bin") == "etc"


@pytest.mark.parametrize("entries, msg", [
    ([cpio.file("a", b""), cpio.file("a", b"")], "duplicate"),
    ([cpio.CpioEntry("dev", stat.S_IFCHR | 0o600)], "unsupported"),
    ([cpio.CpioEntry("d", stat.S_IFDIR | 0o755, b"x")], "cannot carry data"),
])
def test_cpio_rejects(entries, msg):
    with pytest.raises(BuildError, match=msg):
        cpio.encode(entries)


def test_cpio_decode_rejects_garbage():
    with pytest.raises(BuildError, match="bad cpio header at offset 0"):
        cpio.decode(b"not a cpio archive" * 10)
    blob = cpio.encode([cpio.file("f", b"12345678")])
    with pytest.raises(BuildError):
        cpio.decode(blob[:120])


FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 64


@pytest.mark.parametrize("compress", [
    lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda b: gzip.compress(b, mtime=0),
])
def test_extract_vmlinux_synthetic(compress):
    # setup code containing decoy magics, then the payload, then trailing data
    bz = b"MZ" + b"\x00" * 500 + b"\xfd7zXZ\x00junk" + b"\x1f\x8b\x08bad" + compress(FAKE_ELF) + b"\x00" * 64
    assert extract_vmlinux(bz) == FAKE_ELF


def test_extract_vmlinux_rejects():
    with pytest.raises(BuildError, match="no gzip/xz/zstd payload"):
        extract_vmlinux(b"MZ" + b"\x00" * 1000)
    # compressed data that is not an ELF is not accepted either
    with pytest.raises(BuildError):
        extract_vmlinux(b"MZ" + gzip.compress(b"not an elf" * 100))


def test_guest_arg_validation():
    with pytest.raises(ValueError, match="IPv4 CIDR"):
        RxeGuest(ip="192.0.2.2")
    with pytest.raises(ValueError, match="either"):
        RxeGuest(netdev_args=["-nic", "none"], tap=TapNetdev("tap0"))


# --- real boots -----------------------------------------------------------------------------

@pytest.mark.qemu
def test_rxe_port_active(image):
    run = RxeGuest(cmd="ibv_devinfo -d rxe0", ip="192.0.2.2/24", image=image).run(timeout=60)
    assert run.returncode == 0, run.serial
    assert "hca_id:\trxe0" in run.output
    assert "PORT_ACTIVE" in run.output
    assert "link_layer:\t\tEthernet" in run.output


@pytest.mark.qemu
def test_rxe_rc_pingpong_in_guest(image):
    ip = "198.51.100.7/24"
    run = RxeGuest(cmd=pingpong_self_test_script(ip, iters=50), ip=ip, image=image).run(timeout=90)
    assert run.returncode == 0, run.serial
    # client and server both finished all iterations over RoCEv2 GIDs of the guest address
    assert run.output.count("50 iters in") == 2, run.output
    assert "GID ::ffff:198.51.100.7" in run.output


@pytest.mark.qemu
@pytest.mark.netns
def test_rxe_guest_on_tap_in_netns(image, tap_netns):
    """The guest NIC is a tap device inside a fresh netns; the guest reaches the host side."""
    ns, tap = tap_netns("203.0.113.1/24")
    run = RxeGuest(cmd="ping -c 2 -W 5 203.0.113.1 && rdma link show rxe0/1",
                   ip="203.0.113.2/24", tap=TapNetdev(tap, netns=ns), image=image).run(timeout=60)
    assert run.returncode == 0, run.serial
    assert "2 packets received" in run.output
    assert "state ACTIVE" in run.output and "netdev eth0" in run.output
