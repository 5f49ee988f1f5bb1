"""Boot a guest image under QEMU with the virtio-rdma device on a back-end's socket.

Two QEMUs, both stock Debian builds, nothing built from source:

* ``7.2``: Debian 12's ``qemu-system-x86_64``.  It has no generic vhost-user device, so
  the device rides on ``vhost-user-blk-pci-non-transitional`` (the guest sees a virtio
  function with device id 0x1042; QEMU filters features to the block device's set and
  sizes the config space as a block device's).
* ``11.1``: Debian trixie-backports' QEMU, in a trixie root made with mmdebstrap
  (install.sh; ``QEMU11_ROOT``), run from there with the root's own dynamic loader
  (``ld-linux-x86-64.so.2 --library-path``), firmware (``-L``) and modules
  (``QEMU_MODULE_DIR``): no chroot, so the socket and image paths are the host's.  Its
  ``vhost-user-test-device-pci`` passes every feature bit, ``NUM_QUEUES`` queues and our
  config size through.  Stock QEMU aborts on virtio-id 42 (``virtio_id_to_name`` asserts
  on an unnamed id), so the device borrows ``BORROWED_VIRTIO_ID`` (21, "signal
  distribution": named in QEMU's table, no driver in Linux, hence none in the image) and
  the guest's driver recognises virtio-rdma by its config space
  (docs/qemu-virtio-id-42.md).  ``microvm`` takes the virtio-mmio variant
  (``vhost-user-test-device`` on the machine's virtio-mmio bus).

Guest RAM is ``memory-backend-memfd,share=on`` (the daemon maps it), the serial console
is QEMU's stdio, copied to our stdout as it comes; the application's exit status is read
from /init's ``VRDMA-APP-EXIT status=N`` line (:mod:`vrdma.image.initscript`).
``qemu_command`` is pure (a spec in, an argv out); ``run`` does the I/O.

The pieces of a command line both this module and the test launchers
(``qemu_tests.launch``) build are here, once: the carriers and their device
argument (:func:`carrier_args`), shared memfd RAM (:func:`memfd_ram_args`),
a headless machine (:data:`HEADLESS_ARGS`), and the wait for the back-end's
socket (:func:`unix_socket_appears`).
"""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from . import initscript
from .builder import DEFAULT_HUGEPAGES, Image
from .errors import LaunchError, ToolMissing

QEMU72_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU11_ROOT = os.environ.get("VRDMA_QEMU11_ROOT", "/var/tmp/vrdma-qemu11/root")  # noqa: S108 (install.sh)
QEMU_VERSIONS = ("7.2", "11.1")
MACHINES = ("q35", "microvm")

BLK_CARRIER = "vhost-user-blk-pci-non-transitional"
GENERIC_CARRIER_PCI = "vhost-user-test-device-pci"
GENERIC_CARRIER_MMIO = "vhost-user-test-device"
#: The virtio device id the generic carrier presents: VIRTIO_ID_SIGNAL_DIST.  QEMU 11.1's
#: virtio_device_names[] names it ("virtio-signal"), and no Linux driver has it in its id
#: table (docs/qemu-virtio-id-42.md), so no kernel driver claims the function.
BORROWED_VIRTIO_ID = 21
QUEUE_SIZE = 256
MAX_LINE = 64 << 10  # console bytes read at once (a guest need not send newlines)
SERIAL_KEPT = 1 << 20  # console tail kept for the result (the rest only goes to ``console``)
#: a machine with no default devices, no user config, no display, and no reboot (QEMU exits)
HEADLESS_ARGS = ("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot")
#: seconds a guest gets to power off after its status line; then QEMU is killed (microvm
#: without ACPI cannot power off: the kernel halts and QEMU would wait for ever)
POWEROFF_GRACE = 5.0


def device_config_size() -> int:
    """Bytes of the virtio-rdma device configuration (the one definition is virtio_rdma's)."""
    from virtio_rdma import constants, wire

    size = getattr(constants, "CONFIG_SIZE", None)
    return int(size) if size is not None else int(wire.Config.sizeof())


def num_queues() -> int:
    from virtio_rdma.constants import NUM_QUEUES

    return int(NUM_QUEUES)


def carrier_args(socket_path: str, carrier: str, *, device_id: str, num_queues: int, queue_size: int,
                 virtio_id: int = BORROWED_VIRTIO_ID, config_size: int = 0, reconnect: int | None = None,
                 bootindex: int | None = None, extra_props: Sequence[tuple[str, str]] = ()) -> list[str]:
    """``-chardev``/``-device`` of a vhost-user carrier (QEMU the front-end, a client of the
    back-end listening on ``socket_path``; ``reconnect``: seconds after the back-end closes).
    ``carrier`` is :data:`BLK_CARRIER` (``num_queues``, ``queue_size``, ``bootindex``) or a
    generic one, :data:`GENERIC_CARRIER_PCI` or :data:`GENERIC_CARRIER_MMIO` (``virtio_id``,
    ``num_queues``, ``queue_size``, ``config_size``)."""
    chardev = f"socket,id={device_id}-chr,path={socket_path}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    if carrier == BLK_CARRIER:
        dev = (f"{carrier},id={device_id},chardev={device_id}-chr,num-queues={num_queues},"
               f"queue-size={queue_size}")
        if bootindex is not None:
            dev += f",bootindex={bootindex}"
    elif carrier in (GENERIC_CARRIER_PCI, GENERIC_CARRIER_MMIO):
        dev = (f"{carrier},id={device_id},chardev={device_id}-chr,virtio-id={virtio_id},"
               f"num_vqs={num_queues},vq_size={queue_size},config_size={config_size}")
    else:
        raise ValueError(f"carrier {carrier!r} must be one of "
                         f"{(BLK_CARRIER, GENERIC_CARRIER_PCI, GENERIC_CARRIER_MMIO)}")
    for key, value in extra_props:
        dev += f",{key}={value}"
    return ["-chardev", chardev, "-device", dev]


def memfd_ram_args(memory_mib: int, cpus: int) -> list[str]:
    """``memory_mib`` of guest RAM in a shared memfd (the back-end maps it), object id ``mem``,
    and ``cpus`` CPUs."""
    mem = f"{memory_mib}M"
    return ["-m", mem, "-smp", str(cpus), "-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]


def unix_socket_appears(path: str, timeout: float, interval: float = 0.05) -> bool:
    """Whether a unix socket file is at ``path`` within ``timeout`` seconds (the back-end
    bound it). No probe connection is made: a back-end serving one front-end must not
    see a stray one; bind() and listen() are back to back in any sane listener."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return True
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


_ARG = re.compile(r'[^\s"\\]+')


@dataclass(frozen=True)
class VmSpec:
    """Everything a ``vrdma vm run`` command line decides."""

    backend: str
    image: Image
    qemu: str = "7.2"
    machine: str = "q35"
    app_args: tuple[str, ...] = ()
    memory_mib: int = 512
    hugepages: int = DEFAULT_HUGEPAGES
    cpus: int = 1
    qemu11_root: str = QEMU11_ROOT
    extra_append: str = ""
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.qemu not in QEMU_VERSIONS:
            raise ValueError(f"qemu {self.qemu!r} must be one of {QEMU_VERSIONS}")
        if self.machine not in MACHINES:
            raise ValueError(f"machine {self.machine!r} must be one of {MACHINES}")
        if self.machine == "microvm" and self.qemu != "11.1":
            raise ValueError("microvm needs --qemu 11.1 (QEMU 7.2 has no vhost-user device for virtio-mmio "
                             "that is not a block device)")
        for arg in self.app_args:
            if not _ARG.fullmatch(arg):
                raise ValueError(f"application argument {arg!r} must be non-empty, without whitespace, "
                                 "quotes or backslashes (it travels on the kernel command line)")
        if not 128 <= self.memory_mib <= 65536:
            raise ValueError(f"memory_mib {self.memory_mib} out of range 128..65536")
        if not 0 <= self.hugepages * 2 <= self.memory_mib - 96:
            raise ValueError(f"{self.hugepages} huge pages (2 MiB) do not fit in {self.memory_mib} MiB "
                             "with 96 MiB left for the guest")
        if not 1 <= self.cpus <= 64:
            raise ValueError(f"cpus {self.cpus} out of range 1..64")


def qemu11_prefix(root: str = QEMU11_ROOT) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, extra environment) running QEMU 11.1 from the trixie root ``root``."""
    loader = os.path.join(root, "lib64/ld-linux-x86-64.so.2")
    binary = os.path.join(root, "usr/bin/qemu-system-x86_64")
    if not (os.path.exists(loader) and os.path.exists(binary)):
        raise ToolMissing(f"no QEMU 11.1 trixie root at {root} (install.sh makes it with mmdebstrap)")
    libs = ":".join(os.path.join(root, d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"))
    argv = [loader, "--library-path", libs, binary,
            "-L", os.path.join(root, "usr/share/qemu"), "-L", os.path.join(root, "usr/share/seabios")]
    return argv, {"QEMU_MODULE_DIR": os.path.join(root, "usr/lib/x86_64-linux-gnu/qemu")}


def qemu_prefix(spec: VmSpec) -> tuple[list[str], dict[str, str]]:
    """(argv prefix up to the QEMU options, extra environment) for the chosen QEMU."""
    if spec.qemu == "7.2":
        if not os.access(QEMU72_BINARY, os.X_OK):
            raise ToolMissing(f"{QEMU72_BINARY} not found (Debian 12 qemu-system-x86)")
        return [QEMU72_BINARY], {}
    return qemu11_prefix(spec.qemu11_root)


def device_args(spec: VmSpec) -> list[str]:
    if spec.qemu == "7.2":
        return carrier_args(spec.backend, BLK_CARRIER, device_id="vrdma0", num_queues=num_queues(),
                            queue_size=QUEUE_SIZE)
    carrier = GENERIC_CARRIER_MMIO if spec.machine == "microvm" else GENERIC_CARRIER_PCI
    return carrier_args(spec.backend, carrier, device_id="vrdma0", num_queues=num_queues(),
                        queue_size=QUEUE_SIZE, config_size=device_config_size())


def kernel_append(spec: VmSpec) -> str:
    append = f"console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init hugepages={spec.hugepages}"
    if spec.extra_append:
        append += " " + spec.extra_append
    if spec.app_args:
        append += " -- " + " ".join(spec.app_args)
    return append


def machine_option(spec: VmSpec) -> str:
    """q35, or microvm without ACPI: with ACPI, QEMU 11.1 puts the initrd at the top of low RAM
    over qboot's ACPI tables (the guest reads a corrupted FADT and hangs in ACPI init);
    without it the kernel finds the virtio-mmio device on its command line
    (``virtio_mmio.device=``, added by QEMU's ``auto-kernel-cmdline``)."""
    return "microvm,acpi=off" if spec.machine == "microvm" else spec.machine


def qemu_command(spec: VmSpec) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the QEMU that boots ``spec``."""
    argv, env = qemu_prefix(spec)
    argv += ["-machine", f"{machine_option(spec)},memory-backend=mem", "-accel", "tcg", "-cpu", "max",
             *memfd_ram_args(spec.memory_mib, spec.cpus), *HEADLESS_ARGS,
             "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
             *device_args(spec),
             "-kernel", spec.image.vmlinux, "-initrd", spec.image.initramfs,
             "-append", kernel_append(spec)]
    if spec.machine == "microvm":
        # virtio-mmio is legacy (version 1) unless told otherwise; the driver is virtio 1.x
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += spec.extra_args
    return argv, env


@dataclass
class VmResult:
    """The application's exit status (None: it never reported one), QEMU's, the console
    output, and seconds from QEMU's start to each /init marker seen."""

    status: int | None
    qemu_returncode: int
    serial: bytes
    timings: dict[str, float]


def _wait_socket(path: str, timeout: float) -> None:
    if not unix_socket_appears(path, timeout):
        raise LaunchError(f"no back-end listening at {path} (no unix socket after {timeout:.0f} s)")


def run(spec: VmSpec, *, console: IO[bytes] | None = None, timeout: float | None = None,
        socket_timeout: float = 10.0, on_start=None) -> VmResult:
    """Boot ``spec``, copy the console to ``console`` as it comes, return when QEMU exits.

    ``timeout``: kill QEMU after that many seconds (the result then has no status unless
    the application had already reported one).  ``on_start(proc)`` is called with the
    QEMU process once it runs (the tests use it to kill QEMU).
    """
    argv, extra_env = qemu_command(spec)
    _wait_socket(spec.backend, socket_timeout)
    env = {**os.environ, **extra_env}
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise LaunchError(f"cannot start {argv[0]}: {exc}") from exc
    serial = bytearray()
    timings: dict[str, float] = {}
    errs: list[bytes] = []
    err_thread = threading.Thread(target=lambda: errs.append(proc.stderr.read() if proc.stderr else b""),
                                  daemon=True)
    err_thread.start()
    def kill() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    timers = []
    if timeout is not None:
        timers.append(threading.Timer(timeout, kill))
    for t in timers:
        t.daemon = True
        t.start()
    try:
        if on_start is not None:
            on_start(proc)
        assert proc.stdout is not None
        # the console is the guest's: bounded lines, and only the tail is kept
        for line in iter(lambda: proc.stdout.readline(MAX_LINE), b""):  # type: ignore[union-attr]
            serial += line
            if len(serial) > SERIAL_KEPT:
                del serial[:len(serial) - SERIAL_KEPT]
            for label, marker in (("init", initscript.INIT_MARKER), ("app", initscript.START_MARKER),
                                  ("exit", "VRDMA-APP-EXIT")):
                if label not in timings and marker.encode() in line:
                    timings[label] = round(time.monotonic() - t0, 3)
                    if label == "exit":
                        timers.append(threading.Timer(POWEROFF_GRACE, kill))
                        timers[-1].daemon = True
                        timers[-1].start()
            if console is not None:
                console.write(line)
                console.flush()
        rc = proc.wait()
    finally:
        for t in timers:
            t.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err_thread.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    result = VmResult(initscript.parse_exit(bytes(serial)), rc, bytes(serial), timings)
    if result.status is None and errs and errs[0]:
        result.serial += b"\n[qemu stderr] " + errs[0][-4000:]
    return result


def format_command(argv: Sequence[str], env: dict[str, str]) -> str:
    import shlex

    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def main_status(result: VmResult, stderr: IO[str] = sys.stderr) -> int:
    """The command's exit status: the application's, or 255 with a reason on stderr."""
    if result.status is not None:
        return result.status
    tail = result.serial[-1500:].decode("utf-8", "replace")
    print(f"vrdma vm run: the guest ended without an application status (QEMU exit "
          f"{result.qemu_returncode}); last output:\n{tail}", file=stderr)
    return 255
