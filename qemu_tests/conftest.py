"""Shared fixtures for the QEMU harness tests: skip cleanly when a binary is missing."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def qemu_system() -> str:
    return require_binary("qemu-system-x86_64")


@pytest.fixture
def qemu_storage_daemon() -> str:
    require_binary("qemu-img")
    return require_binary("qemu-storage-daemon")


@pytest.fixture(scope="session")
def image():
    """The kernel-rxe guest image (Debian's kernel + initramfs), built once and cached."""
    from qemu_tests.errors import CapabilityMissing
    from qemu_tests.rxe_guest import build_image

    require_binary("qemu-system-x86_64")
    try:
        return build_image()
    except CapabilityMissing as exc:
        pytest.skip(f"cannot build the rxe guest: {exc}")


@pytest.fixture(scope="session")
def host_root_image(image):
    """The rxe image, with the host side of ``RxeGuest(host_root=True)`` ready: the repo's
    Cython extensions built for a CPU TCG emulates (the first build takes ~20 s)."""
    from qemu_tests.errors import CapabilityMissing
    from qemu_tests.rxe_guest import portable_extensions

    try:
        portable_extensions()
    except CapabilityMissing as exc:
        pytest.skip(f"cannot build portable extensions for the rxe guest: {exc}")
    return image


@pytest.fixture
def tap_netns():
    """Make ``(namespace name, tap name)``: a fresh netlab namespace holding a
    tap device (``make(addr, tap="vrtap0", mtu=None)``) for a guest NIC; all
    are removed after the test."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    from netlab.errors import CommandFailed
    from netlab.ns import Namespace, tap_device

    made = []

    def make(addr: str, tap: str = "vrtap0", mtu: int | None = None) -> tuple[str, str]:
        try:
            ns = Namespace()
        except CommandFailed as exc:
            pytest.skip(f"cannot create a network namespace: {exc}")
        made.append(ns)
        return ns.name, tap_device(ns, tap, addr, mtu=mtu)

    yield make
    for ns in made:
        ns.close()
