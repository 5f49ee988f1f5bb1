"""QEMU 11.1 (Debian trixie-backports) for the harness, run from its mmdebstrap root.

install.sh makes the root once (``mmdebstrap --variant=apt`` with trixie-backports as the
default release, ``--include=qemu-system-x86``: ~255 MB, ~15-30 s) at
``vrdma.image.vm.QEMU11_ROOT`` (/var/tmp/vrdma-qemu11/root, or $VRDMA_QEMU11_ROOT).  QEMU
runs from there with the root's dynamic loader and libraries (trixie's glibc is newer
than the host's), its firmware (``-L``) and modules (``QEMU_MODULE_DIR``) — no chroot,
so sockets, kernels and images keep their host paths.  ``vrdma vm run --qemu 11.1``
uses the same root through ``vrdma.image.vm.qemu11_prefix``; this module gives the
harness's ``QemuVM`` the same binary (``qemu11_vm_kwargs``) and a skip when the root is
absent (``require_qemu11``).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from vrdma.image import ToolMissing
from vrdma.image.vm import QEMU11_ROOT, qemu11_prefix

VERSION_PREFIX = "QEMU emulator version 11.1"


def qemu11_argv(root: str = QEMU11_ROOT) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) that run the root's qemu-system-x86_64; ToolMissing if none."""
    return qemu11_prefix(root)


def qemu11_version(root: str = QEMU11_ROOT) -> str:
    argv, env = qemu11_argv(root)
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **env}, check=False)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def require_qemu11(root: str = QEMU11_ROOT) -> str:
    """The root's QEMU version line, or skip the test saying what is missing."""
    try:
        version = qemu11_version(root)
    except ToolMissing as exc:
        pytest.skip(str(exc))
    if not version.startswith(VERSION_PREFIX):
        pytest.skip(f"the trixie root at {root} runs {version!r}, not QEMU 11.1")
    return version


def qemu11_vm_kwargs(root: str = QEMU11_ROOT) -> dict:
    """Keyword arguments that make a ``qemu_tests.launch.QemuVM`` run QEMU 11.1 (use with
    ``VhostUserDevice(carrier="generic")``: "auto" would probe the host's binary)."""
    argv, _env = qemu11_argv(root)
    loader_args, binary, firmware = argv[:3], argv[3], argv[4:]
    return {"wrapper": loader_args, "binary": binary, "extra_args": firmware}
