"""Launchers for QEMU (system emulator) and qemu-storage-daemon, as context managers.

Roles on the vhost-user socket (docs/interop/vhost-user.rst, "Communication"):

* ``QemuVM`` is a vhost-user **frontend**.  It connects as a *client* to a socket that
  **our backend listens on** (``-chardev socket,path=...`` without ``server=on``).  QEMU
  blocks in device realize until the connection is made and the backend has answered
  GET_FEATURES / GET_PROTOCOL_FEATURES / ... / GET_CONFIG, so ``QemuVM.start()`` first
  waits for the socket file to appear (``socket_timeout``), then returns once QMP greets,
  i.e. once every device is realized.  Pass
  ``reconnect=N`` to let QEMU reconnect N seconds after the backend closes the socket.
* ``QemuStorageDaemon`` is a vhost-user **backend** (a real vhost-user-blk export of a raw
  image).  It listens; our frontend connects.

Both own their child process and their private work directory (serial log, QMP socket,
stderr log): leaving the ``with`` block, or ``close()``, terminates the process (QMP
``quit`` first where possible, then SIGTERM, then SIGKILL), reaps it and removes the
directory.  Nothing is left behind on any path, including a failed start.

Carrier device: QEMU 7.2 has no generic vhost-user device, so our virtio device rides on
``vhost-user-blk-pci-non-transitional`` (the guest sees virtio-blk, device id 2).  QEMU >= 10.2
has ``vhost-user-test-device-pci``; stock QEMU aborts on ``virtio-id=42`` (no name in its
table), so the generic carrier presents the borrowed id ``VIRTIO_ID_BORROWED``
(docs/qemu-virtio-id-42.md; the one definition is ``vrdma.image.vm.BORROWED_VIRTIO_ID``,
and ``vrdma.image.vm`` builds the carrier's arguments, the memfd RAM and the headless flags
for both ``vrdma vm run`` and these launchers);
``carrier="auto"`` picks it when ``qemu-system-x86_64 -device help`` lists it.  QEMU 11.1
from the trixie root: ``qemu_tests.qemu11``.  See /tmp/briefs/qemu_notes.md for the
message sequences.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from virtio_rdma.constants import VIRTIO_ID_RDMA
from vrdma.image.vm import (
    BLK_CARRIER,
    BORROWED_VIRTIO_ID as VIRTIO_ID_BORROWED,
    GENERIC_CARRIER_PCI,
    HEADLESS_ARGS,
    carrier_args,
    memfd_ram_args,
    unix_socket_appears,
)

from .errors import CapabilityMissing, QemuExitedError, QemuStartError, QmpError, SerialTimeout
from .qmp import QmpClient

QEMU_SYSTEM = "qemu-system-x86_64"
QEMU_STORAGE_DAEMON = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"

GENERIC_CARRIER = GENERIC_CARRIER_PCI


def find_binary(name: str) -> str:
    """Absolute path of ``name`` on PATH, or CapabilityMissing."""
    path = shutil.which(name)
    if path is None:
        raise CapabilityMissing(f"{name} not found on PATH")
    return path


@functools.lru_cache(maxsize=None)
def qemu_device_names(binary: str = QEMU_SYSTEM) -> frozenset[str]:
    """Device type names that ``binary -device help`` lists (cached per binary)."""
    out = subprocess.run([find_binary(binary), "-machine", "none", "-device", "help"],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise QemuStartError(f"{binary} -device help failed (rc={out.returncode})", stderr=out.stderr)
    names = set()
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith('name "'):
            names.add(line.split('"', 2)[1])
    return frozenset(names)


def has_generic_vhost_user_device(binary: str = QEMU_SYSTEM) -> bool:
    """True when QEMU offers ``vhost-user-test-device-pci`` (QEMU >= 10.2)."""
    return GENERIC_CARRIER in qemu_device_names(binary)


def create_raw_image(path: str, size: int) -> None:
    """Create (or overwrite) a raw image of ``size`` bytes with ``qemu-img create -f raw``."""
    if size <= 0 or size % 512:
        raise ValueError(f"image size {size} must be a positive multiple of 512")
    out = subprocess.run([find_binary(QEMU_IMG), "create", "-q", "-f", "raw", path, str(size)],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise QemuStartError(f"qemu-img create {path} failed", stderr=out.stderr)


def wait_for_unix_socket(path: str, timeout: float) -> None:
    """Wait until a unix socket file exists at ``path`` (our backend bound it).

    No probe connection is made (a backend serving one frontend must not see a stray
    connection); bind() and listen() are back to back in any sane listener.
    """
    if not unix_socket_appears(path, timeout, interval=0.02):
        raise QemuStartError(f"no unix socket at {path} after {timeout:.1f}s")


def wait_for_path(path: str, timeout: float, proc: subprocess.Popen | None = None,
                  stderr_path: str | None = None) -> None:
    """Wait until ``path`` exists; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise QemuStartError(f"process exited with rc={proc.returncode} before creating {path}",
                                 stderr=_read_tail(stderr_path))
        if time.monotonic() >= deadline:
            raise QemuStartError(f"{path} did not appear within {timeout:.1f}s",
                                 stderr=_read_tail(stderr_path))
        time.sleep(0.05)


def _read_tail(path: str | None, limit: int = 8000) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _ManagedProcess:
    """A child process plus a private work directory, both released by ``close()``."""

    name = "process"

    def __init__(self, workdir: str | None) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"vrdma-{self.name}-")
        os.makedirs(self.workdir, exist_ok=True)
        self.stderr_path = os.path.join(self.workdir, f"{self.name}.stderr")
        self.proc: subprocess.Popen | None = None
        self._qmp: QmpClient | None = None
        self.argv: list[str] = []

    # -- process lifecycle -------------------------------------------------
    def _spawn(self, argv: list[str]) -> None:
        self.argv = argv
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, close_fds=True)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def stderr_text(self) -> str:
        return _read_tail(self.stderr_path)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; return its exit code."""
        if self.proc is None:
            raise QemuStartError(f"{self.name} was never started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise QemuExitedError(f"{self.name} still running after {timeout:.1f}s",
                                  returncode=None, stderr=self.stderr_text) from exc

    def _stop_process(self, grace: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except ProcessLookupError:  # pragma: no cover - raced with exit
            proc.wait(10)

    # -- QMP -----------------------------------------------------------------
    @property
    def qmp_path(self) -> str:
        return os.path.join(self.workdir, "qmp.sock")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute a QMP command (connecting on first use)."""
        if self._qmp is None:
            if self.returncode is not None:
                raise QemuExitedError(f"{self.name} exited (rc={self.returncode}); no QMP",
                                      returncode=self.returncode, stderr=self.stderr_text)
            self._qmp = QmpClient(self.qmp_path)
        return self._qmp.execute(command, **arguments)

    def quit(self, timeout: float = 10.0) -> int:
        """Ask the process to exit via QMP ``quit``, wait, and return its exit code."""
        if self.proc is None:
            raise QemuStartError(f"{self.name} was never started")
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except QmpError:
                # QEMU may close the monitor before the reply; only the exit matters.
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._stop_process(grace=2.0)
            raise QemuExitedError(f"{self.name} did not quit within {timeout:.1f}s",
                                  returncode=self.proc.returncode, stderr=self.stderr_text)

    def close(self) -> None:
        """Stop and reap the process, close QMP, remove the private work directory. Idempotent."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._stop_process(grace=5.0)
        if self._own_workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class VhostUserDevice:
    """The vhost-user carrier device of a QemuVM (our backend listens on ``socket_path``).

    ``carrier``: "blk" -> vhost-user-blk-pci-non-transitional (QEMU 7.2);
    "generic" -> vhost-user-test-device-pci with ``virtio_id`` (QEMU >= 10.2; default the
    borrowed id, since stock QEMU asserts on 42);
    "auto" -> generic when available, else blk.
    """

    socket_path: str
    num_queues: int = 1
    queue_size: int = 128
    bootindex: int | None = None
    carrier: str = "auto"
    virtio_id: int = VIRTIO_ID_BORROWED
    config_size: int = 0
    reconnect: int | None = None
    device_id: str = "vu0"
    extra_props: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.carrier not in ("auto", "blk", "generic"):
            raise ValueError(f"carrier must be 'auto', 'blk' or 'generic', got {self.carrier!r}")
        if not 1 <= self.num_queues <= 1024:
            raise ValueError(f"num_queues {self.num_queues} out of range 1..1024")
        if not 1 <= self.queue_size <= 1024 or self.queue_size & (self.queue_size - 1):
            raise ValueError(f"queue_size {self.queue_size} must be a power of two in 1..1024")
        if self.reconnect is not None and self.reconnect < 1:
            raise ValueError(f"reconnect {self.reconnect} must be >= 1 second")

    def resolved_carrier(self, binary: str = QEMU_SYSTEM) -> str:
        if self.carrier == "auto":
            return "generic" if has_generic_vhost_user_device(binary) else "blk"
        return self.carrier

    def qemu_args(self, binary: str = QEMU_SYSTEM) -> list[str]:
        blk = self.resolved_carrier(binary) == "blk"
        return carrier_args(self.socket_path, BLK_CARRIER if blk else GENERIC_CARRIER,
                            device_id=self.device_id, num_queues=self.num_queues, queue_size=self.queue_size,
                            virtio_id=self.virtio_id, config_size=self.config_size, reconnect=self.reconnect,
                            bootindex=self.bootindex if blk else None, extra_props=self.extra_props)

    @property
    def qom_path(self) -> str:
        """QOM path of the virtio backend object, for x-query-virtio-* commands."""
        return f"/machine/peripheral/{self.device_id}/virtio-backend"


class QemuVM(_ManagedProcess):
    """qemu-system-x86_64 under TCG with shared memfd RAM, a QMP socket and serial to a file.

    Typical use with our backend (which must already listen on ``sock``)::

        with QemuVM(vhost_user=VhostUserDevice(sock, num_queues=2, bootindex=0)) as vm:
            vm.wait_serial(b"VRDMA-BOOT-OK", timeout=30)
            print(vm.virtio_status()["status"])

    ``drives`` are extra ``-drive`` option strings; ``kernel``/``initrd``/``append`` boot a
    Linux kernel directly; ``extra_args`` are appended verbatim; ``wrapper`` is an argv prefix
    (e.g. ``["ip", "netns", "exec", "ns0"]`` to run QEMU inside a network namespace).
    """

    name = "qemu"

    def __init__(self, *, vhost_user: VhostUserDevice | None = None, memory_mib: int = 256,
                 cpus: int = 1, cpu: str | None = None, drives: Sequence[str] = (),
                 kernel: str | None = None, initrd: str | None = None, append: str | None = None,
                 extra_args: Sequence[str] = (), socket_timeout: float = 10.0,
                 binary: str = QEMU_SYSTEM, workdir: str | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        if memory_mib < 16:
            raise ValueError(f"memory_mib {memory_mib} too small (min 16)")
        if cpus < 1:
            raise ValueError(f"cpus {cpus} must be >= 1")
        super().__init__(workdir)
        self.vhost_user = vhost_user
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.cpu = cpu
        self.drives = list(drives)
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.extra_args = list(extra_args)
        self.socket_timeout = socket_timeout
        self.binary = binary
        self.wrapper = list(wrapper)
        self.serial_path = os.path.join(self.workdir, "serial.log")

    def build_argv(self) -> list[str]:
        """The full command line (also useful for debugging a failed start)."""
        argv = [*self.wrapper, find_binary(self.binary), "-accel", "tcg",
                *memfd_ram_args(self.memory_mib, self.cpus), "-numa", "node,memdev=mem", *HEADLESS_ARGS,
                "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.cpu:
            argv += ["-cpu", self.cpu]
        if self.vhost_user is not None:
            argv += self.vhost_user.qemu_args(self.binary)
        for drive in self.drives:
            argv += ["-drive", drive]
        if self.kernel:
            argv += ["-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        if self.append is not None:
            argv += ["-append", self.append]
        return argv + self.extra_args

    def start(self) -> None:
        if self.proc is not None:
            raise QemuStartError("QemuVM already started")
        argv = self.build_argv()
        if self.vhost_user is not None and self.vhost_user.reconnect is None:
            # QEMU (client) fails at startup if nobody listens: wait for our backend first.
            wait_for_unix_socket(self.vhost_user.socket_path, self.socket_timeout)
        self._spawn(argv)
        # The QMP socket is created before the devices; the greeting is only sent once the
        # main loop runs, i.e. after every device (vhost-user realize included) is realized.
        # Connecting QMP here therefore makes start() return with the machine running, and a
        # realize failure (e.g. the backend rejected the connection) surfaces as QemuStartError.
        wait_for_path(self.qmp_path, self.socket_timeout + 30, self.proc, self.stderr_path)
        try:
            self._qmp = QmpClient(self.qmp_path, timeout=self.socket_timeout + 60)
        except QmpError as exc:
            rc = self.proc.poll()
            if rc is None:
                try:
                    rc = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    rc = None
            raise QemuStartError(f"QEMU did not come up (rc={rc}): {exc}",
                                 stderr=self.stderr_text) from exc

    # -- guest output -----------------------------------------------------------
    def serial_output(self) -> bytes:
        try:
            with open(self.serial_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def wait_serial(self, marker: bytes | str, timeout: float) -> bytes:
        """Wait until ``marker`` appears in the serial output; return all output so far.

        Raises SerialTimeout (with the output tail) on timeout, QemuExitedError if QEMU
        exits first without having printed the marker.
        """
        if isinstance(marker, str):
            marker = marker.encode()
        deadline = time.monotonic() + timeout
        while True:
            out = self.serial_output()
            if marker in out:
                return out
            rc = self.returncode
            if rc is not None:
                out = self.serial_output()
                if marker in out:
                    return out
                raise QemuExitedError(f"QEMU exited (rc={rc}) before printing {marker!r}; serial "
                                      f"tail: {out[-1000:].decode('utf-8', 'replace')}",
                                      returncode=rc, stderr=self.stderr_text)
            if time.monotonic() >= deadline:
                raise SerialTimeout(marker, timeout, out)
            time.sleep(0.05)

    # -- introspection --------------------------------------------------------
    def virtio_devices(self) -> list[dict[str, Any]]:
        """``x-query-virtio``: [{"name": ..., "path": ...}]."""
        return self.qmp("x-query-virtio")

    def virtio_status(self, path: str | None = None) -> dict[str, Any]:
        """``x-query-virtio-status`` of the vhost-user device (or ``path``)."""
        if path is None:
            if self.vhost_user is None:
                raise ValueError("no vhost-user device: pass the QOM path explicitly")
            path = self.vhost_user.qom_path
        return self.qmp("x-query-virtio-status", path=path)

    def virtio_queue_status(self, queue: int, path: str | None = None, *, vhost: bool = False) -> dict:
        """``x-query-virtio-queue-status`` (or the vhost variant) of one queue."""
        if path is None:
            if self.vhost_user is None:
                raise ValueError("no vhost-user device: pass the QOM path explicitly")
            path = self.vhost_user.qom_path
        cmd = "x-query-virtio-vhost-queue-status" if vhost else "x-query-virtio-queue-status"
        return self.qmp(cmd, path=path, queue=queue)


class QemuStorageDaemon(_ManagedProcess):
    """qemu-storage-daemon exporting a raw image as a vhost-user-blk backend on ``socket_path``.

    The image is created with ``qemu-img create -f raw`` when ``create_size`` is given (or the
    file is missing and ``create_size`` defaults).  ``start()`` returns once the export socket
    exists.  ``close()`` sends QMP ``quit`` and waits for a clean exit (rc 0).
    """

    name = "qsd"

    def __init__(self, image_path: str, socket_path: str, *, num_queues: int = 1,
                 writable: bool = True, logical_block_size: int = 512,
                 create_size: int | None = None, export_id: str = "exp0",
                 start_timeout: float = 10.0, binary: str = QEMU_STORAGE_DAEMON,
                 workdir: str | None = None) -> None:
        if not 1 <= num_queues <= 1024:
            raise ValueError(f"num_queues {num_queues} out of range 1..1024")
        if logical_block_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768):
            raise ValueError(f"logical_block_size {logical_block_size} must be a power of two 512..32768")
        super().__init__(workdir)
        self.image_path = image_path
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.create_size = create_size
        self.export_id = export_id
        self.start_timeout = start_timeout
        self.binary = binary
        self.clean_exit: bool | None = None

    def build_argv(self) -> list[str]:
        return [
            find_binary(self.binary),
            "--blockdev", f"driver=file,node-name=file0,filename={self.image_path}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", (f"type=vhost-user-blk,id={self.export_id},node-name=disk0,"
                         f"addr.type=unix,addr.path={self.socket_path},"
                         f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues},"
                         f"logical-block-size={self.logical_block_size}"),
            "--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=mon0",
        ]

    def start(self) -> None:
        if self.proc is not None:
            raise QemuStartError("QemuStorageDaemon already started")
        if self.create_size is not None:
            create_raw_image(self.image_path, self.create_size)
        elif not os.path.exists(self.image_path):
            raise QemuStartError(f"image {self.image_path} does not exist (pass create_size=)")
        if os.path.exists(self.socket_path):
            raise QemuStartError(f"socket path {self.socket_path} already exists")
        self._spawn(self.build_argv())
        wait_for_path(self.socket_path, self.start_timeout, self.proc, self.stderr_path)
        wait_for_path(self.qmp_path, self.start_timeout, self.proc, self.stderr_path)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.clean_exit = self.quit(timeout=10.0) == 0
            except (QemuExitedError, QmpError):
                self.clean_exit = False
        super().close()
        # qsd removes its socket on clean exit; remove a stale one after a kill.
        if os.path.exists(self.socket_path) and self.proc is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass


__all__ = [
    "BLK_CARRIER", "GENERIC_CARRIER", "VIRTIO_ID_BORROWED", "VIRTIO_ID_RDMA", "QmpClient", "QemuVM", "QemuStorageDaemon",
    "VhostUserDevice", "create_raw_image", "find_binary", "has_generic_vhost_user_device",
    "qemu_device_names", "wait_for_unix_socket",
]
