"""A QEMU 7.2 guest whose program drives the virtio-rdma device through
guest_lib's userspace virtio-pci driver (guest_lib.transports.virtio_pci).

Built on :class:`~qemu_tests.rxe_guest.RxeGuest` (Debian's kernel booted
PVH, busybox initramfs, the host's / read-only over virtio-9p so the venv
and this repository run in the guest), plus:

* the device: ``vhost-user-blk-pci-non-transitional`` on the daemon's
  socket (QEMU 7.2 has no generic vhost-user device; docs/virtio-rdma.md
  "Carriers"), or on QEMU 11.1 (``qemu="11.1"``) the generic
  ``vhost-user-test-device-pci`` under a borrowed virtio ID; 3 queues, over
  the memfd-backed shared RAM QemuVM gives every guest;
* huge pages reserved at boot (``hugepages=N`` on the kernel command line);
* ``uio`` and ``uio_pci_generic``, taken from the same kernel package the
  image was built from (:func:`uio_modules`, cached) and insmod-ed by the
  command before the program starts;
* user networking with one forwarded TCP port (host 127.0.0.1:PORT -> guest
  GUEST_IP:GUEST_PORT) for the out-of-band exchange with a host peer;
* ``PYTHONPATH`` = this repository (the venv's editable install may point
  at another checkout);
* several phases per boot (``then=``): each a Python process of its own, run
  one after another while the guest stays up, the next only if the previous
  exited 0. Each opens the device anew (the previous one's driver reset it
  when it closed), so one boot (24-38 s under TCG) serves several checks.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence

from .errors import CapabilityMissing, GuestImageError
from .launch import VhostUserDevice
from .rxe_guest import CACHE_ROOT, GUEST_FILES_DIR, REPO_ROOT, WARM_IMPORTS, GuestImage, RxeGuest, TapNetdev

GUEST_IP = "192.0.2.15"
GUEST_PORT = 5000
UIO_MODULES = ("uio.ko", "uio_pci_generic.ko")
PCI_WARM_IMPORTS = (*WARM_IMPORTS, "guest_lib", "guest_lib.endpoint", "guest_lib.transports.virtio_pci",
                    "qemu_tests.pci_traffic", "qemu_tests.pci_accel", "guest_lib.accel", "vrdma.commands")


def uio_modules(image: GuestImage, cache_root: str = CACHE_ROOT) -> dict[str, bytes]:
    """{name: bytes} of uio.ko and uio_pci_generic.ko of the image's kernel
    (from the kernel .deb the image was built from, cached beside it)."""
    out_dir = os.path.join(cache_root, f"uio-{image.kernel_release}")
    if not all(os.path.exists(os.path.join(out_dir, m)) for m in UIO_MODULES):
        debs = os.path.join(cache_root, "debs")
        pkg = f"linux-image-{image.kernel_release}_"
        matches = sorted(d for d in os.listdir(debs) if d.startswith(pkg)) if os.path.isdir(debs) else []
        if not matches:
            raise CapabilityMissing(f"no {pkg}*.deb in {debs} (build the rxe image first)")
        with tempfile.TemporaryDirectory(prefix="uio-", dir=cache_root) as tmp:
            moddir = f"./lib/modules/{image.kernel_release}/kernel/drivers/uio"
            tar = subprocess.run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" "$3" "$4"', "sh",
                                  os.path.join(debs, matches[-1]), tmp, f"{moddir}/uio.ko",
                                  f"{moddir}/uio_pci_generic.ko"],
                                 capture_output=True, text=True, timeout=300, check=False)
            if tar.returncode != 0:
                raise GuestImageError(f"extracting the uio modules failed: {tar.stderr[-1000:]}")
            stage = os.path.join(tmp, "out")
            os.makedirs(stage)
            for m in UIO_MODULES:
                shutil.copy(os.path.join(tmp, moddir, m), os.path.join(stage, m))
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.rename(stage, out_dir)
    result = {}
    for m in UIO_MODULES:
        with open(os.path.join(out_dir, m), "rb") as f:
            result[m] = f.read()
    return result


def pci_guest(image: GuestImage, socket_path: str, argv: Sequence[str], *, host_port: int | None = None,
              hugepages: int = 48, memory_mib: int = 512, queue_size: int = 256,
              files: dict[str, bytes] | None = None, then: Sequence[Sequence[str] | str] = (),
              tap: TapNetdev | None = None, tap_ip: str | None = None, qemu: str = "7.2") -> RxeGuest:
    """An RxeGuest running ``python argv...`` (argv[0] a repo-relative script)
    after loading uio, then ``python`` with each argv of ``then`` in turn (a
    str there is a shell command line, run as it is), each only if the one
    before exited 0 (the boot's exit status is the first failure's), with
    the virtio-rdma device on ``socket_path`` through the blk carrier;
    ``host_port`` forwards 127.0.0.1:host_port to the guest's GUEST_PORT.
    Each phase's output starts with a line ``PHASE i``.
    ``tap`` (with the guest's ``tap_ip``, "ADDR/PREFIX") puts the guest's NIC
    on that tap instead of the user network, and QEMU in the tap's namespace.
    ``qemu``: "7.2" (the host's, the blk carrier) or "11.1" (the trixie
    root's, ``vhost-user-test-device-pci`` with the borrowed virtio ID and
    the device's full config; qemu_tests/qemu11.py)."""
    if shutil.which("insmod") is None and not os.path.exists("/usr/sbin/insmod"):
        raise CapabilityMissing("insmod (kmod) is not installed on the host, whose / the guest runs")
    mods = uio_modules(image)
    fwd = f",hostfwd=tcp:127.0.0.1:{host_port}-{GUEST_IP}:{GUEST_PORT}" if host_port else ""
    netdev = (None if tap is not None else
              ["-netdev", f"user,id=n0,net=192.0.2.0/24{fwd}", "-device", "virtio-net-pci,netdev=n0"])
    if tap is not None and (tap_ip is None or host_port is not None):
        raise ValueError("a tap guest takes tap_ip= and no host_port")
    if qemu == "7.2":
        dev = VhostUserDevice(socket_path, num_queues=3, queue_size=queue_size, carrier="blk")
        qemu_kw = None
    elif qemu == "11.1":
        from vrdma.image.vm import device_config_size

        from .qemu11 import qemu11_vm_kwargs

        dev = VhostUserDevice(socket_path, num_queues=3, queue_size=queue_size, carrier="generic",
                              config_size=device_config_size())
        qemu_kw = qemu11_vm_kwargs()
    else:
        raise ValueError(f"qemu {qemu!r}: one of '7.2', '11.1'")
    phases = [" ".join(map(shlex.quote, [sys.executable, *argv])),
              *(a if isinstance(a, str) else " ".join(map(shlex.quote, [sys.executable, *a])) for a in then)]
    runs = [f"echo PHASE {i} && {{ {line}; }}" for i, line in enumerate(phases)]
    cmd = (" && ".join(f"insmod {GUEST_FILES_DIR}/{m}" for m in UIO_MODULES)
           + f" && cd {shlex.quote(REPO_ROOT)} && export PYTHONUNBUFFERED=1 && " + " && ".join(runs))
    return RxeGuest(cmd=cmd, image=image, host_root=True, memory_mib=memory_mib,
                    ip=tap_ip if tap is not None else f"{GUEST_IP}/24", netdev_args=netdev, tap=tap,
                    extra_append=f"hugepages={hugepages}",
                    files={**mods, **(files or {})}, env={"PYTHONPATH": REPO_ROOT},
                    warm_imports=PCI_WARM_IMPORTS, extra_qemu_args=dev.qemu_args(), qemu=qemu_kw)


#: the QEMUs every pci-guest end-to-end test runs on (pytest params)
QEMUS = ("7.2", "11.1")


def require_qemu(which: str) -> str:
    """The version line of QEMU ``which`` ("7.2": the host's; "11.1": the trixie
    root's), or skip the calling test saying what is missing."""
    import pytest

    if which == "11.1":
        from .qemu11 import require_qemu11

        return require_qemu11()
    from .launch import QEMU_SYSTEM, find_binary

    try:
        out = subprocess.run([find_binary(QEMU_SYSTEM), "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, CapabilityMissing) as e:
        pytest.skip(f"no {QEMU_SYSTEM}: {e}")
    version = out.stdout.splitlines()[0] if out.stdout else ""
    if "version 7.2" not in version:
        pytest.skip(f"the host's {QEMU_SYSTEM} is {version!r}, not QEMU 7.2")
    return version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_of(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT line in the guest's output:\n{output[-3000:]}")


def phase_outputs(output: str) -> list[str]:
    """A multi-phase boot's output (:func:`pci_guest` ``then=``), split at its
    ``PHASE i`` lines: one string per phase that started."""
    parts: list[list[str]] = []
    for line in output.splitlines():
        if line.strip() == f"PHASE {len(parts)}":
            parts.append([])
        elif parts:
            parts[-1].append(line)
    return ["\n".join(p) for p in parts]


def with_peer(sock: str, port: int, iters: int, run):
    """Run the host peer (a process guest on ``sock``) in a thread while
    ``run()`` runs the active side; returns (run's value, peer's result or
    the exception it raised)."""
    box: dict = {}

    def go():
        try:
            from .pci_traffic import peer

            box["peer"] = peer(sock, ("127.0.0.1", port), iters)
        except BaseException as e:
            box["error"] = e

    th = threading.Thread(target=go, daemon=True)
    th.start()
    try:
        value = run()
    finally:
        th.join(120)
    return value, box.get("peer", box.get("error"))


__all__ = ["GUEST_IP", "GUEST_PORT", "QEMUS", "free_port", "require_qemu", "pci_guest", "phase_outputs", "result_of", "uio_modules",
           "with_peer"]
