"""A tiny Linux guest with kernel soft-RoCE (rdma_rxe), built from Debian's own packages.

Why: the RoCEv2 interoperability tests need a *real* RDMA stack to talk to, and the host
kernel has none.  Debian's kernel has rdma_rxe as a module, so we boot it under QEMU/TCG:

* Build (``build_image``), cached under /var/tmp/vrdma-rxe-guest/<key>/ where the key hashes
  the exact package versions: ``apt-get download`` the kernel that ``linux-image-amd64``
  depends on, busybox-static, libibverbs1, ibverbs-providers, ibverbs-utils and iproute2
  (for ``rdma link add``); unpack them with ``dpkg-deb -x`` (nothing is installed); run
  ``depmod -b`` on the unpacked tree; extract the ELF vmlinux from vmlinuz (PVH boot);
  collect the shared libraries the binaries need (``ldd`` with the unpacked library dirs
  first, the rest from the host, which is the same Debian release); write a newc initramfs.
* Run (``RxeGuest.run``): boot with ``-kernel vmlinux -initrd base.cpio.gz+overlay`` where
  the overlay carries the command to run.  /init mounts proc/sys/dev, insmods virtio_net,
  ib_uverbs, rdma_rxe and their dependencies in modules.dep order, configures eth0 with the
  address from the kernel command line (``vrdma.ip=``), runs ``rdma link add rxe0 type rxe
  netdev eth0``, runs the command with output on ttyS0 between markers, and powers off.

Network: by default QEMU user networking (``-netdev user``) behind a virtio-net NIC, enough
for loopback RDMA inside the guest.  ``TapNetdev`` attaches the NIC to a tap device instead,
optionally with QEMU run inside a network namespace, so host-side RoCE code can reach it.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Sequence

from . import cpio
from .errors import CapabilityMissing, GuestImageError
from .kernel_image import extract_vmlinux
from .launch import QemuVM

CACHE_ROOT = "/var/tmp/vrdma-rxe-guest"
BUILDER_VERSION = "2"  # bump when the image layout or /init changes
USER_PACKAGES = ("busybox-static", "libibverbs1", "ibverbs-providers", "ibverbs-utils", "iproute2")
BINARIES = ("usr/bin/ibv_devinfo", "usr/bin/ibv_devices", "usr/bin/ibv_rc_pingpong",
            "usr/bin/ibv_ud_pingpong", "usr/bin/ibv_uc_pingpong", "usr/bin/ibv_srq_pingpong",
            "usr/bin/rdma")
PROVIDER = "usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so"
# crc32_generic: rdma_rxe allocates the "crc32" shash (ICRC) and there is no modprobe to load it.
MODULES = ("virtio_pci", "virtio_net", "crc32_generic", "ib_uverbs", "rdma_rxe")
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

BEGIN = "VRDMA-CMD-BEGIN"
END_RE = re.compile(r"VRDMA-CMD-END rc=(\d+)")

_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo VRDMA-GUEST-INIT
while read -r m; do
    insmod "/lib/modules/$m" || echo "VRDMA-INSMOD-FAIL $m"
done < /etc/vrdma/modules
ip=""; iface=eth0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vrdma.ip=*) ip="${arg#vrdma.ip=}" ;;
        vrdma.iface=*) iface="${arg#vrdma.iface=}" ;;
    esac
done
ip link set lo up
i=0
while [ ! -e "/sys/class/net/$iface" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set "$iface" up
[ -n "$ip" ] && ip addr add "$ip" dev "$iface"
rdma link add rxe0 type rxe netdev "$iface" || echo "VRDMA-RXE-FAIL"
echo VRDMA-CMD-BEGIN
sh /etc/vrdma/cmd.sh 2>&1
echo "VRDMA-CMD-END rc=$?"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: ``vmlinux`` (ELF, PVH-bootable) and the base ``initramfs`` (newc, gzip)."""

    vmlinux: str
    initramfs: str
    kernel_release: str
    key: str


def _run(argv: Sequence[str], *, cwd: str | None = None, env: dict | None = None,
         timeout: float = 600) -> str:
    try:
        out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise CapabilityMissing(f"{argv[0]} not available: {exc}") from exc
    if out.returncode != 0:
        raise GuestImageError(f"{' '.join(argv)} failed (rc={out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def kernel_package() -> str:
    """The versioned kernel image package that ``linux-image-amd64`` depends on."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise GuestImageError(f"cannot find the kernel package in apt-cache depends output: {out!r}")


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """Candidate version of each package according to apt (the cache key)."""
    out = _run(["apt-cache", "policy", *packages])
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            versions[current] = line.split(":", 1)[1].strip()
    missing = [p for p in packages if versions.get(p) in (None, "(none)")]
    if missing:
        raise CapabilityMissing(f"apt has no candidate for {missing}")
    return versions


def _modules_in_order(root: str, release: str, wanted: Sequence[str]) -> list[str]:
    """Module paths (relative to lib/modules/<release>) in load order, dependencies first."""
    moddir = os.path.join(root, "lib/modules", release)
    deps: dict[str, list[str]] = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
    builtin = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        with open(bpath) as f:
            builtin = {os.path.basename(l.strip()).split(".ko")[0].replace("-", "_") for l in f}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in stack:
            raise GuestImageError(f"module dependency cycle through {path}")
        for dep in deps.get(path, []):
            visit(dep, stack + (path,))
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise GuestImageError(f"module {name} not found in {moddir}/modules.dep")
        visit(by_name[name], ())
    return order


def _ldd_closure(root: str, files: Sequence[str]) -> dict[str, str]:
    """Map guest path -> source path for every shared library ``files`` need (recursively)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(os.path.join(root, d) for d in LIB_DIRS)
    libs: dict[str, str] = {}
    todo = list(files)
    done: set[str] = set()
    while todo:
        f = todo.pop()
        if f in done:
            continue
        done.add(f)
        out = _run(["ldd", f], env=env)
        for line in out.splitlines():
            line = line.strip()
            if "not found" in line:
                raise GuestImageError(f"{f}: missing shared library: {line}")
            m = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
            if not m:
                continue
            src = m.group(1)
            real = os.path.realpath(src)
            if src.startswith(root + "/"):
                guest = src[len(root):]
            else:
                guest = src
            if guest.startswith("/lib64/"):
                libs[guest] = real  # the loader, at its ABI path
            else:
                libs["/lib/x86_64-linux-gnu/" + os.path.basename(guest)] = real
            todo.append(real)
    return libs


def build_image(cache_root: str = CACHE_ROOT) -> GuestImage:
    """Build (or reuse from cache) the rxe guest image; safe against concurrent callers."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod", "ldd"):
        if shutil.which(tool) is None:
            raise CapabilityMissing(f"{tool} not found: cannot build the rxe guest")
    kpkg = kernel_package()
    packages = (kpkg, *USER_PACKAGES)
    versions = candidate_versions(packages)
    key_src = BUILDER_VERSION + "\n" + "\n".join(f"{p}={versions[p]}" for p in sorted(versions))
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_root, key)
    os.makedirs(cache_root, exist_ok=True)
    release = kpkg[len("linux-image-"):]
    image = GuestImage(os.path.join(out_dir, "vmlinux"), os.path.join(out_dir, "initramfs.cpio.gz"),
                       release, key)
    with open(os.path.join(cache_root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(out_dir, "DONE")):
            return image
        debs = os.path.join(cache_root, "debs")
        os.makedirs(debs, exist_ok=True)
        want = [f"{p}={versions[p]}" for p in packages]
        try:
            _run(["apt-get", "download", *want], cwd=debs)
        except GuestImageError as exc:
            raise CapabilityMissing(f"apt-get download impossible: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix="rxe-build-", dir=cache_root) as tmp:
            root = os.path.join(tmp, "root")
            os.makedirs(root)
            for p in packages:
                ver = versions[p].replace(":", "%3a")
                matches = [d for d in os.listdir(debs) if d.startswith(f"{p}_{ver}_")]
                if not matches:
                    raise GuestImageError(f"downloaded .deb for {p}={versions[p]} not found in {debs}")
                _run(["dpkg-deb", "-x", os.path.join(debs, matches[0]), root])
            _run(["depmod", "-b", root, release])
            with open(os.path.join(root, "boot", f"vmlinuz-{release}"), "rb") as f:
                vmlinux = extract_vmlinux(f.read())
            initramfs = _make_initramfs(root, release)
            stage = os.path.join(tmp, "out")
            os.makedirs(stage)
            with open(os.path.join(stage, "vmlinux"), "wb") as f:
                f.write(vmlinux)
            with open(os.path.join(stage, "initramfs.cpio.gz"), "wb") as f:
                f.write(gzip.compress(initramfs, compresslevel=6, mtime=0))
            with open(os.path.join(stage, "VERSIONS"), "w") as f:
                f.write(key_src + "\n")
            open(os.path.join(stage, "DONE"), "w").close()
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.rename(stage, out_dir)
    return image


def _make_initramfs(root: str, release: str) -> bytes:
    entries: list[cpio.CpioEntry] = []
    dirs: set[str] = set()

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in dirs:
                dirs.add(d)
                entries.append(cpio.directory(d))

    def add_file(guest: str, src: str, perm: int) -> None:
        add_dir(os.path.dirname(guest))
        with open(src, "rb") as f:
            entries.append(cpio.file(guest.lstrip("/"), f.read(), perm))

    for d in ("proc", "sys", "dev", "tmp", "run", "etc/vrdma", "lib/modules", "lib64"):
        add_dir(d)
    add_file("bin/busybox", os.path.join(root, "bin/busybox"), 0o755)
    for b in BINARIES:
        add_file(b, os.path.join(root, b), 0o755)
    add_file(PROVIDER, os.path.join(root, PROVIDER), 0o644)
    add_file("etc/libibverbs.d/rxe.driver", os.path.join(root, "etc/libibverbs.d/rxe.driver"), 0o644)
    libs = _ldd_closure(root, [os.path.join(root, b) for b in BINARIES] + [os.path.join(root, PROVIDER)])
    for guest, src in sorted(libs.items()):
        if guest.lstrip("/") not in {e.name for e in entries}:
            add_file(guest, src, 0o755)
    add_dir("usr/lib/x86_64-linux-gnu")
    order = _modules_in_order(root, release, MODULES)
    moddir = os.path.join(root, "lib/modules", release)
    names = []
    for rel in order:
        name = os.path.basename(rel)
        if name.endswith(".xz"):
            with open(os.path.join(moddir, rel), "rb") as f:
                data = lzma.decompress(f.read())
            name = name[:-3]
            entries.append(cpio.file(f"lib/modules/{name}", data, 0o644))
        else:
            add_file(f"lib/modules/{name}", os.path.join(moddir, rel), 0o644)
        names.append(name)
    entries.append(cpio.file("etc/vrdma/modules", ("\n".join(names) + "\n").encode()))
    entries.append(cpio.file("init", _INIT.encode(), 0o755))
    return cpio.encode(entries)


@dataclass(frozen=True)
class TapNetdev:
    """Attach the guest NIC to tap device ``ifname`` (which must exist, in ``netns`` if given)."""

    ifname: str
    netns: str | None = None
    mac: str = "52:54:00:12:34:56"


@dataclass
class GuestRun:
    """Result of one guest boot: the command's output (between markers), its exit code, all serial."""

    output: str
    returncode: int
    serial: str


@dataclass
class RxeGuest:
    """Boot the rxe guest once per ``run()``; ``cmd`` is a shell script run as root in the guest.

    ``ip`` (CIDR) is configured on eth0 before rxe0 is created.  ``netdev_args`` replaces the
    default QEMU network arguments entirely (they must create a NIC the guest sees as eth0);
    ``tap`` is the shortcut for a tap device (optionally inside a network namespace).
    """

    cmd: str = "ibv_devinfo"
    ip: str = "192.0.2.2/24"
    netdev_args: Sequence[str] | None = None
    tap: TapNetdev | None = None
    memory_mib: int = 512
    image: GuestImage | None = None
    extra_append: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", self.ip):
            raise ValueError(f"ip {self.ip!r} must be an IPv4 CIDR like 192.0.2.2/24")
        if self.netdev_args is not None and self.tap is not None:
            raise ValueError("pass either netdev_args or tap, not both")

    def qemu_net_args(self) -> list[str]:
        if self.netdev_args is not None:
            return list(self.netdev_args)
        if self.tap is not None:
            return ["-netdev", f"tap,id=n0,ifname={self.tap.ifname},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={self.tap.mac}"]
        return ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"]

    def run(self, timeout: float = 60.0) -> GuestRun:
        """Boot, run ``cmd``, power off; return its output.  Raises on boot failure/timeout."""
        image = self.image or build_image()
        wrapper = ["ip", "netns", "exec", self.tap.netns] if self.tap and self.tap.netns else []
        append = (f"console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init vrdma.ip={self.ip} "
                  f"{self.extra_append}").strip()
        with tempfile.TemporaryDirectory(prefix="vrdma-rxe-run-") as tmp:
            overlay = cpio.encode([cpio.directory("etc"), cpio.directory("etc/vrdma"),
                                   cpio.file("etc/vrdma/cmd.sh", self.cmd.encode() + b"\n", 0o755)])
            initrd = os.path.join(tmp, "initrd.img")
            with open(image.initramfs, "rb") as src, open(initrd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.write(gzip.compress(overlay, mtime=0))
            with QemuVM(memory_mib=self.memory_mib, cpu="max", kernel=image.vmlinux, initrd=initrd,
                        append=append, extra_args=self.qemu_net_args(), wrapper=wrapper) as vm:
                # SerialTimeout / QemuExitedError propagate with the serial tail and stderr.
                vm.wait_serial(b"VRDMA-CMD-END", timeout)
                vm.wait(timeout=15)  # /init powers off right after the marker
                serial = vm.serial_output().decode("utf-8", "replace")
        m = END_RE.search(serial)
        if BEGIN not in serial or m is None:
            raise GuestImageError(f"guest output lacks the command markers; serial:\n{serial[-3000:]}")
        body = serial[serial.index(BEGIN) + len(BEGIN):m.start()]
        result = GuestRun(body.replace("\r\n", "\n").strip("\n"), int(m.group(1)), serial)
        return result


def pingpong_self_test_script(ip: str, iters: int = 100, size: int = 4096) -> str:
    """Guest shell: ibv_rc_pingpong server in the background + client to the guest's own IP."""
    addr = shlex.quote(ip.split("/")[0])
    return (f"ibv_rc_pingpong -d rxe0 -g 1 -n {iters} -s {size} > /tmp/srv.log 2>&1 &\n"
            f"sleep 1\n"
            f"ibv_rc_pingpong -d rxe0 -g 1 -n {iters} -s {size} {addr}; rc=$?\n"
            f"wait\n"
            f"echo '--- server ---'; cat /tmp/srv.log\n"
            f"exit $rc\n")
