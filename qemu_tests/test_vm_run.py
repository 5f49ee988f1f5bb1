"""``vrdma vm run`` boots guest images under QEMU 7.2 and 11.1 against a real daemon.

A real ``vrdma backend`` (module fixture) serves the virtio-rdma device on its socket;
each test runs the real command line (``python -m vrdma vm run``), which starts QEMU
(TCG) with the device on that socket.  The probe image's application
(``vrdma.image.probe``) finds the virtio function in the guest's sysfs, reads its
device configuration through the BAR, and exits with the status it is told; the
command's exit status must be the application's.  Killing QEMU mid-run must leave the
daemon serving, with its fds back to what they were.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from vrdma.image import ImageError, builder
from virtio_rdma.constants import ABI_VERSION, CONFIG_MAGIC
from vrdma.image.vm import BORROWED_VIRTIO_ID, device_config_size

from .qemu11 import require_qemu11

pytestmark = pytest.mark.qemu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "vrdma", "image", "probe.py")
PROBE_LINE = re.compile(r"VRDMA-PROBE transport=(\S+) address=(\S+) virtio-id=(\d+) config=(\S+)")


def _build(app: str | None) -> builder.Image:
    if not os.access("/usr/bin/qemu-system-x86_64", os.X_OK):
        pytest.skip("qemu-system-x86_64 (Debian 12 QEMU 7.2) not installed")
    try:
        return builder.build(app)
    except ImageError as exc:
        pytest.skip(f"cannot build the guest image: {exc}")


@pytest.fixture(scope="module")
def probe_image() -> builder.Image:
    return _build(PROBE)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A real ``vrdma backend`` on a unix socket: (socket path, process)."""
    sock = str(tmp_path_factory.mktemp("vmrun") / "vrdma.sock")
    log = open(os.path.join(os.path.dirname(sock), "backend.log"), "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock, "--fabric", "local",
                             "--accelerators", "none"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, f"backend exited rc={proc.returncode}"
            assert time.monotonic() < deadline, "backend did not create its socket"
            time.sleep(0.05)
        yield sock, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


#: a hang guard, not a measurement: these runs take 10-30 s under TCG with a load of 8 on the
#: shared 2 vCPUs (the numpy import in the guest 29 s), too close to the 55 s they had
VM_RUN_TIMEOUT = 150


def vm_run(sock: str, image: builder.Image, qemu: str, *app_args: str, timeout: float = VM_RUN_TIMEOUT,
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "vrdma", "vm", "run", "--backend", sock, "--image", image.directory,
            "--qemu", qemu, "--timeout", str(timeout - 5), *extra, "--", *app_args]
    return subprocess.run(argv, cwd=REPO, capture_output=True, timeout=timeout, check=False)


def _probe_lines(out: bytes) -> list[tuple[str, str, int, str]]:
    return [(t, a, int(i), c) for t, a, i, c in PROBE_LINE.findall(out.decode("utf-8", "replace"))]


def test_probe_boots_on_qemu72_blk_carrier(daemon, probe_image):
    sock, _ = daemon
    res = vm_run(sock, probe_image, "7.2", "--expect-id", "2")
    err = res.stderr.decode()
    assert res.returncode == 0, (res.stdout.decode()[-3000:], err[-3000:])
    # the command printed the QEMU it ran: memfd-backed shared RAM, the blk carrier on our socket
    cmd = next(line for line in err.splitlines() if line.startswith("vrdma vm run: /usr/bin/qemu-system-x86_64"))
    assert "memory-backend-memfd,id=mem" in cmd and "share=on" in cmd
    assert "vhost-user-blk-pci-non-transitional,id=vrdma0,chardev=vrdma0-chr" in cmd and sock in cmd
    devices = _probe_lines(res.stdout)
    assert [(t, i) for t, _, i, _ in devices] == [("pci", 2)]
    assert "VRDMA-PROBE-ENV uio_pci_generic=yes hugepages=64" in res.stdout.decode()
    assert "VRDMA-APP-EXIT status=0" in res.stdout.decode()


#: the first bytes of virtio-rdma's device config, in hex: the magic, then the ABI version
_CONFIG_HEAD = (CONFIG_MAGIC.to_bytes(4, "little") + ABI_VERSION.to_bytes(2, "little")).hex()


def test_probe_boots_on_qemu111_generic_device(daemon, probe_image):
    require_qemu11()
    sock, _ = daemon
    res = vm_run(sock, probe_image, "11.1", "--expect-id", str(BORROWED_VIRTIO_ID))
    err = res.stderr.decode()
    assert res.returncode == 0, (res.stdout.decode()[-3000:], err[-3000:])
    assert (f"vhost-user-test-device-pci,id=vrdma0,chardev=vrdma0-chr,virtio-id={BORROWED_VIRTIO_ID},"
            f"num_vqs=3,") in err
    (transport, _, vid, config), = _probe_lines(res.stdout)
    assert (transport, vid) == ("pci", BORROWED_VIRTIO_ID)
    # the device configuration is the daemon's, read through the BAR: all of it, magic and ABI first
    assert len(config) == 2 * device_config_size()
    assert config.startswith(_CONFIG_HEAD)


def test_probe_boots_on_microvm_virtio_mmio(daemon, probe_image):
    require_qemu11()
    sock, _ = daemon
    res = vm_run(sock, probe_image, "11.1", "--expect-id", str(BORROWED_VIRTIO_ID), extra=("--machine", "microvm"))
    err = res.stderr.decode()
    assert res.returncode == 0, (res.stdout.decode()[-3000:], err[-3000:])
    assert "-machine microvm,acpi=off" in err and "vhost-user-test-device,id=vrdma0" in err
    (transport, _, vid, config), = _probe_lines(res.stdout)
    assert (transport, vid) == ("mmio", BORROWED_VIRTIO_ID)
    assert "version=2" in res.stdout.decode()  # modern virtio-mmio (force-legacy=false)
    assert len(config) == 2 * device_config_size() and config.startswith(_CONFIG_HEAD)


def test_application_status_is_the_commands(daemon, probe_image):
    sock, _ = daemon
    res = vm_run(sock, probe_image, "7.2", "--expect-id", "2", "--exit", "7")
    assert res.returncode == 7, res.stdout.decode()[-2000:]
    assert b"VRDMA-APP-EXIT status=7" in res.stdout
    res = vm_run(sock, probe_image, "7.2", "--expect-id", "99")  # the probe's own failure
    assert res.returncode == 3, res.stdout.decode()[-2000:]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def test_killing_qemu_leaves_the_daemon_serving(daemon, probe_image):
    sock, backend = daemon
    fds_before = _fd_count(backend.pid)
    argv = [sys.executable, "-m", "vrdma", "vm", "run", "--backend", sock, "--image", probe_image.directory,
            "--qemu", "7.2", "--timeout", "100", "--", "--sleep", "120"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen = b""
        for line in iter(proc.stdout.readline, b""):
            seen += line
            if b"VRDMA-PROBE-SLEEP" in line:
                break
        assert b"VRDMA-PROBE-SLEEP" in seen, seen[-2000:]
        assert _fd_count(backend.pid) > fds_before  # the VM's connection: socket, memfd, eventfds
        (qemu,) = _children(proc.pid)
        os.kill(qemu, signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 255, (rest[-2000:], err[-2000:])
    assert b"without an application status" in err
    assert backend.poll() is None
    deadline = time.monotonic() + 10
    while _fd_count(backend.pid) != fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fd_count(backend.pid) == fds_before
    # and it serves: a process guest opens the device and queries it
    from guest_lib import Context

    with Context(sock) as ctx:
        assert ctx.query_device().phys_port_cnt == 1


def test_default_image_runs_rc_pingpong(daemon):
    image = _build(None)
    assert image.manifest["app"] == "app.py"
    sock, _ = daemon
    res = vm_run(sock, image, "7.2", "--help")
    out = res.stdout.decode("utf-8", "replace")
    assert res.returncode == 0, (out[-3000:], res.stderr.decode()[-2000:])
    assert "usage: vrdma rc-pingpong" in out and "--ib-dev" in out
    timings = re.search(r"seconds from QEMU start: init ([\d.]+), app ([\d.]+), exit ([\d.]+)",
                        res.stderr.decode())
    assert timings, res.stderr.decode()[-1000:]
    print(f"default image under TCG (QEMU 7.2): /init at {timings[1]} s, application at {timings[2]} s, "
          f"its exit at {timings[3]} s after QEMU started; sizes {image.manifest['sizes']}")


def test_harness_qemuvm_runs_qemu11_with_the_borrowed_id(daemon, probe_image, tmp_path):
    """qemu_tests.launch.QemuVM on the trixie root's QEMU (qemu11_vm_kwargs): QEMU names the
    borrowed id (x-query-virtio), which 42 would have made it abort on."""
    require_qemu11()
    from .launch import QemuVM, VhostUserDevice
    from .qemu11 import qemu11_vm_kwargs

    sock, _ = daemon
    dev = VhostUserDevice(sock, num_queues=3, carrier="generic", config_size=device_config_size())
    with QemuVM(vhost_user=dev, memory_mib=512, cpu="max", kernel=probe_image.vmlinux,
                initrd=probe_image.initramfs, workdir=str(tmp_path / "vm"),
                append=f"console=ttyS0 quiet panic=-1 rdinit=/init hugepages=16 -- --expect-id {BORROWED_VIRTIO_ID}",
                **qemu11_vm_kwargs()) as vm:
        assert {"name": "virtio-signal", "path": dev.qom_path} in vm.virtio_devices()
        out = vm.wait_serial(b"VRDMA-APP-EXIT", timeout=VM_RUN_TIMEOUT)
        vm.wait(timeout=15)
    assert b"VRDMA-APP-EXIT status=0" in out


def test_command_line_and_spec_checks_without_booting():
    """The argv vm run composes, and what it refuses (no QEMU started)."""
    from vrdma.image import initscript
    from vrdma.image.vm import VmSpec, kernel_append, qemu_command

    image = builder.Image("/img", "k", True)
    spec = VmSpec(backend="/run/v.sock", image=image, qemu="7.2", app_args=("-n", "5"))
    argv, env = qemu_command(spec)
    assert env == {} and argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-initrd") + 1] == "/img/initramfs.cpio"
    assert kernel_append(spec).endswith("hugepages=64 -- -n 5")
    for bad in (dict(app_args=("a b",)), dict(app_args=('"x',)), dict(app_args=("",)),
                dict(machine="microvm"), dict(qemu="9.0"), dict(hugepages=400), dict(memory_mib=64)):
        with pytest.raises(ValueError):
            VmSpec(backend="/s", image=image, **bad)  # type: ignore[arg-type]
    # the status line: /init's last one counts, a forged out-of-range one does not
    assert initscript.parse_exit(b"VRDMA-APP-EXIT status=0\nVRDMA-APP-EXIT status=7\r\n") == 7
    assert initscript.parse_exit(b"VRDMA-APP-EXIT status=999\n") is None
    assert initscript.parse_exit(b"VRDMA-APP-START\n") is None
    require_qemu11()
    argv, env = qemu_command(VmSpec(backend="/s", image=image, qemu="11.1", machine="microvm"))
    assert argv[0].endswith("/lib64/ld-linux-x86-64.so.2") and "QEMU_MODULE_DIR" in env
    assert argv[argv.index("-machine") + 1] == "microvm,acpi=off,memory-backend=mem"
    assert argv[argv.index("-global") + 1] == "virtio-mmio.force-legacy=false"
    dev = argv[argv.index("-device") + 1]
    assert dev.startswith(f"vhost-user-test-device,id=vrdma0,chardev=vrdma0-chr,virtio-id={BORROWED_VIRTIO_ID},")


def test_terminating_vm_run_takes_its_qemu_down(daemon, probe_image):
    sock, _ = daemon
    argv = [sys.executable, "-m", "vrdma", "vm", "run", "--backend", sock, "--image", probe_image.directory,
            "--qemu", "7.2", "--timeout", "100", "--", "--sleep", "120"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            if b"VRDMA-PROBE-SLEEP" in line:
                break
        (qemu,) = _children(proc.pid)
        proc.terminate()
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}"), "QEMU outlived vrdma vm run"


def test_portable_extensions_and_numpy_load_in_the_tcg_guest(daemon, probe_image):
    """Debian's python3.11 in the guest (TCG's CPU, no AVX-512) imports the portable
    extensions the image ships and Debian's numpy."""
    sock, _ = daemon
    mods = [*probe_image.manifest["extensions"], "numpy"]
    assert {"virtio._split", "accel_core._fft"} <= set(mods)
    res = vm_run(sock, probe_image, "7.2", "--import", ",".join(mods), "--expect-id", "2")
    out = res.stdout.decode("utf-8", "replace")
    assert res.returncode == 0, out[-3000:]
    for mod in mods:
        assert re.search(rf"VRDMA-PROBE-IMPORT {re.escape(mod)} \S+ [\d.]+s", out), (mod, out[-2000:])
    assert "cpython-311-x86_64-linux-gnu.so" in out
