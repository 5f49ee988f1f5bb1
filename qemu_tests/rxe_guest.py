"""A tiny Linux guest with kernel soft-RoCE (rdma_rxe), built from Debian's own packages.

Why: the RoCEv2 interoperability tests need a *real* RDMA stack to talk to, and the host
kernel has none.  Debian's kernel has rdma_rxe as a module, so we boot it under QEMU/TCG:

* Build (``build_image``), cached under /var/tmp/vrdma-rxe-guest/<key>/ where the key hashes
  the exact package versions and /init: ``apt-get download`` the kernel that
  ``linux-image-amd64`` depends on, busybox-static, libibverbs1, ibverbs-providers,
  ibverbs-utils and iproute2 (for ``rdma link add``); unpack them with ``dpkg-deb -x``
  (nothing is installed); run ``depmod -b`` on the unpacked tree; extract the ELF vmlinux
  from vmlinuz (PVH boot); collect the shared libraries the binaries need (``ldd`` with the
  unpacked library dirs first, the rest from the host, which is the same Debian release);
  write a newc initramfs.
* Run (``RxeGuest.run``): boot with ``-kernel vmlinux -initrd base.cpio.gz+overlay`` where
  the overlay carries the command to run.  /init mounts proc/sys/dev, insmods virtio_net,
  ib_uverbs, rdma_rxe and their dependencies in modules.dep order, configures eth0 with the
  address from the kernel command line (``vrdma.ip=``), runs ``rdma link add rxe0 type rxe
  netdev eth0``, runs the command with output on ttyS0 between markers, and powers off.

Network: by default QEMU user networking (``-netdev user``) behind a virtio-net NIC, enough
for loopback RDMA inside the guest.  ``TapNetdev`` attaches the NIC to a tap device instead,
optionally with QEMU run inside a network namespace, so host-side RoCE code can reach it.

Host programs in the guest (``RxeGuest(host_root=True)``, ``RxeGuest.python_script``): QEMU
shares the host's / read-only over virtio-9p (``-fsdev local,path=/,readonly=on`` +
``virtio-9p-pci``, tag ``hostroot``); /init loads the 9p modules (``HOSTROOT_MODULES``, only
for such runs), mounts the share at /host (``cache=loose``, ``msize=512000``), mounts fresh
proc/sysfs/devtmpfs and tmpfs on /tmp, /run, /var/tmp, /dev/shm in it (the host's /tmp is
hidden), and runs the command chrooted there, after rxe0 exists.  So our venv's Python,
pyverbs (Debian's, via the venv's .pth) and the repo run at their host paths.  Two host-side
steps make that work and fast under TCG: ``portable_extensions`` rebuilds the repo's Cython
extensions without ``-march=native`` (on an AVX-512 host the native ones die of SIGILL in the
guest) and the guest bind-mounts them over the repo's; ``warm_pycache`` pre-compiles what a
guest's Python needs into a PYTHONPYCACHEPREFIX tree the guest uses (the read-only guest
cannot write .pyc and the host's tree may have none).  Measured (QEMU 7.2 TCG, 1 vCPU): the
command starts ~2.8 s after QEMU starts; Python's first line ~0.6 s later; pyverbs imports
in ~0.55 s; ``vrdma.cli`` + ``virtio_rdma.core`` in ~0.9 s.  The guest sees the whole host
filesystem read-only (QEMU runs as root): only run code you would run on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Iterator, Mapping, Sequence

from vrdma.image import cpio, debs, extensions
from vrdma.image.errors import BuildError, ToolMissing
from vrdma.image.vmlinux import extract_vmlinux

from .errors import CapabilityMissing, GuestImageError
from .launch import QemuVM

CACHE_ROOT = "/var/tmp/vrdma-rxe-guest"
BUILDER_VERSION = "4"  # bump when the image layout changes (the key hashes /init too)
USER_PACKAGES = ("busybox-static", "libibverbs1", "ibverbs-providers", "ibverbs-utils", "iproute2",
                 "perftest", "librdmacm1", "libibumad3", "libpci3")  # perftest and what its programs link
PERFTEST = ("ib_send_lat", "ib_write_lat", "ib_read_lat", "ib_send_bw", "ib_write_bw", "ib_read_bw")
BINARIES = ("usr/bin/ibv_devinfo", "usr/bin/ibv_devices", "usr/bin/ibv_rc_pingpong",
            "usr/bin/ibv_ud_pingpong", "usr/bin/ibv_uc_pingpong", "usr/bin/ibv_srq_pingpong",
            "usr/bin/rdma", *(f"usr/bin/{b}" for b in PERFTEST))
PROVIDER = "usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so"
# rdma_ucm: /dev/infiniband/rdma_cm, for RDMA CM (peering.verbs_link); with rdma_cm, ib_cm, iw_cm.
# crc32_generic: rdma_rxe allocates the "crc32" shash (ICRC) and there is no modprobe to load it.
MODULES = ("virtio_pci", "virtio_net", "crc32_generic", "ib_uverbs", "rdma_rxe", "rdma_ucm")
# Loaded only for ``host_root`` runs (with their modules.dep closure: 9pnet, netfs, fscache).
HOSTROOT_MODULES = ("9pnet_virtio", "9p")
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

# The repository (this file's parent's parent): a host path, the same in a host_root guest.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_FILES_DIR = "/tmp/vrdma"  # where RxeGuest.files appear in the guest

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
ip=""; iface=eth0; hostroot=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vrdma.ip=*) ip="${arg#vrdma.ip=}" ;;
        vrdma.iface=*) iface="${arg#vrdma.iface=}" ;;
        vrdma.hostroot=*) hostroot="${arg#vrdma.hostroot=}" ;;
    esac
done
# The host's / read-only over virtio-9p at /host, for a command chrooted into it, with fresh
# proc, sysfs and devtmpfs and writable tmpfs on /tmp, /run, /var/tmp, /dev/shm.  Each
# "src dst" line of /etc/vrdma/binds shows host path src (file or directory) at dst: src is
# pinned under /keep before the tmpfs mounts hide it, dst is created if it is in a tmpfs.
hostroot_setup() {
    mkdir -p /host /keep
    i=0
    until mount -t 9p -o "$hostroot" hostroot /host; do
        i=$((i+1)); [ $i -ge 20 ] && return 1; sleep 0.1
    done
    touch /etc/vrdma/binds
    n=0
    while read -r src dst; do
        n=$((n+1))
        if [ -d "/host$src" ]; then mkdir "/keep/$n"; else touch "/keep/$n"; fi
        mount --bind "/host$src" "/keep/$n" || { echo "VRDMA-BIND-FAIL $src"; return 1; }
    done < /etc/vrdma/binds
    mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys \
        && mount -t devtmpfs devtmpfs /host/dev && mkdir -p /host/dev/shm \
        && mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm \
        && mount -t tmpfs -o mode=1777 tmpfs /host/tmp && mount -t tmpfs -o mode=755 tmpfs /host/run \
        && mount -t tmpfs -o mode=1777 tmpfs /host/var/tmp || return 1
    n=0
    while read -r src dst; do
        n=$((n+1))
        if [ ! -e "/host$dst" ]; then
            mkdir -p "/host${dst%/*}"
            if [ -d "/keep/$n" ]; then mkdir "/host$dst"; else touch "/host$dst"; fi
        fi
        mount --bind "/keep/$n" "/host$dst" || { echo "VRDMA-BIND-FAIL $dst"; return 1; }
    done < /etc/vrdma/binds
    touch /etc/vrdma/env
    mkdir -p /host/run/vrdma && cp /etc/vrdma/cmd.sh /etc/vrdma/env /host/run/vrdma/ || return 1
    [ ! -d /tmp/vrdma ] || cp -a /tmp/vrdma /host/tmp/
}
mods=/etc/vrdma/modules
[ -n "$hostroot" ] && mods="/etc/vrdma/modules /etc/vrdma/modules-hostroot"
cat $mods | while read -r m; do
    insmod "/lib/modules/$m" || echo "VRDMA-INSMOD-FAIL $m"
done
ip link set lo up
i=0
while [ ! -e "/sys/class/net/$iface" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set "$iface" up
[ -n "$ip" ] && ip addr add "$ip" dev "$iface"
rdma link add rxe0 type rxe netdev "$iface" || echo "VRDMA-RXE-FAIL"
if [ -n "$hostroot" ]; then
    if hostroot_setup; then echo VRDMA-HOSTROOT-OK; else echo VRDMA-HOSTROOT-FAIL; hostroot=failed; fi
fi
echo VRDMA-CMD-BEGIN
if [ "$hostroot" = failed ]; then
    (exit 125)
elif [ -n "$hostroot" ]; then
    chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/tmp LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 \
        /bin/sh -c 'cd /tmp && . /run/vrdma/env && exec /bin/sh /run/vrdma/cmd.sh' 2>&1
else
    sh /etc/vrdma/cmd.sh 2>&1
fi
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


@contextlib.contextmanager
def _harness_errors() -> Iterator[None]:
    """vrdma.image's build errors as the harness's: a missing tool, package or
    download skips the QEMU tests (CapabilityMissing); a failed step fails them."""
    try:
        yield
    except ToolMissing as exc:
        raise CapabilityMissing(str(exc)) from exc
    except BuildError as exc:
        raise GuestImageError(str(exc)) from exc


def kernel_package() -> str:
    """The versioned kernel image package that ``linux-image-amd64`` depends on."""
    with _harness_errors():
        return debs.kernel_package()


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """Candidate version of each package according to apt (the cache key)."""
    with _harness_errors():
        return debs.candidate_versions(packages)


def _modules_in_order(root: str, release: str, wanted: Sequence[str]) -> list[str]:
    """Module paths (relative to lib/modules/<release>) in load order, dependencies first."""
    with _harness_errors():
        return debs.modules_in_order(root, release, wanted)


def _ldd_closure(root: str, files: Sequence[str]) -> dict[str, str]:
    """Map guest path -> source path for every shared library ``files`` need (recursively):
    the loader at /lib64, the others in /lib/x86_64-linux-gnu (vrdma.image.debs's walk)."""
    with _harness_errors():
        libs, missing = debs.ldd_closure(root, files, lib_dirs=LIB_DIRS, guest_lib_dir="lib/x86_64-linux-gnu")
    if missing:
        f, line = next(iter(missing.items()))
        raise GuestImageError(f"{f}: missing shared library: {line}")
    return {"/" + guest: src for guest, src in libs.items()}


def build_image(cache_root: str = CACHE_ROOT) -> GuestImage:
    """Build (or reuse from cache) the rxe guest image; safe against concurrent callers."""
    with _harness_errors():
        debs.check_tools()
    kpkg = kernel_package()
    packages = (kpkg, *USER_PACKAGES)
    versions = candidate_versions(packages)
    init_hash = hashlib.sha256(_INIT.encode()).hexdigest()[:16]
    key_src = (f"{BUILDER_VERSION}\ninit={init_hash}\n"
               + "\n".join(f"{p}={versions[p]}" for p in sorted(versions)))
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
        with tempfile.TemporaryDirectory(prefix="rxe-build-", dir=cache_root) as tmp:
            root = os.path.join(tmp, "root")
            os.makedirs(root)
            with _harness_errors():
                debs.download_and_unpack(versions, os.path.join(cache_root, "debs"), root)
                debs.run(["depmod", "-b", root, release])
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

    def add_module(rel: str) -> str:
        name = os.path.basename(rel)
        if name.endswith(".xz"):
            with open(os.path.join(moddir, rel), "rb") as f:
                data = lzma.decompress(f.read())
            name = name[:-3]
            entries.append(cpio.file(f"lib/modules/{name}", data, 0o644))
        else:
            add_file(f"lib/modules/{name}", os.path.join(moddir, rel), 0o644)
        return name

    names = [add_module(rel) for rel in order]
    entries.append(cpio.file("etc/vrdma/modules", ("\n".join(names) + "\n").encode()))
    extra = [add_module(rel) for rel in _modules_in_order(root, release, HOSTROOT_MODULES)
             if rel not in order]
    entries.append(cpio.file("etc/vrdma/modules-hostroot", ("\n".join(extra) + "\n").encode()))
    entries.append(cpio.file("init", _INIT.encode(), 0o755))
    return cpio.encode(entries)


EXT_BUILDS_KEPT = 4


def portable_extensions(repo: str = REPO_ROOT, cache_root: str = CACHE_ROOT,
                        timeout: float = 900) -> dict[str, str]:
    """Build (or reuse) the repo's Cython extensions for a generic x86-64 CPU.

    Why: the in-place extensions are compiled with ``-march=native``; on a host with
    AVX-512 they use instructions QEMU's TCG does not emulate (7.2's ``-cpu max`` stops at
    AVX2), and the guest Python dies of SIGILL (``virtio_rdma._datapath`` already on import).
    The build is the guest image's (:func:`vrdma.image.extensions.build`: the repo's own
    setup.py with ``VRDMA_NATIVE=0`` on a staged copy, cached by a hash of the sources),
    kept in this harness's own cache.

    Returns {repo .so path: portable .so path} for every extension built in place on the
    host (one that is not has nothing to stand in for: the guest lacks it as the host does);
    ``RxeGuest(host_root=True)`` bind-mounts each portable file over the repo's in the
    guest. A missing Cython/numpy skips (CapabilityMissing); a failed build is GuestImageError.
    """
    with _harness_errors():
        out_dir = extensions.build(repo, cache_root, timeout=timeout, kept=EXT_BUILDS_KEPT)
    binds: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(out_dir):
        for name in sorted(filenames):
            if name.endswith(".so"):
                rel = os.path.relpath(os.path.join(dirpath, name), out_dir)
                target = os.path.join(repo, rel)
                if os.path.exists(target):  # else the guest lacks it as the host does
                    binds[target] = os.path.join(dirpath, name)
    return binds


# Third-party modules a verbs transport's processes import, pre-compiled for guest runs
# (the stdlib and the repo are compiled whole).
WARM_IMPORTS = ("pyverbs.device", "pyverbs.pd", "pyverbs.mr", "pyverbs.cq", "pyverbs.qp",
                "pyverbs.addr", "pyverbs.enums", "uvloop", "numpy")
_WARM = r"""
import compileall, importlib, re, sys, sysconfig
repo, modules = sys.argv[1], sys.argv[2:]
stdlib = sysconfig.get_paths()["stdlib"]
skip = "test|idlelib|tkinter|turtledemo|lib2to3|ensurepip|site-packages|dist-packages"
compileall.compile_dir(stdlib, quiet=2, rx=re.compile(re.escape(stdlib) + f"/({skip})/"))
compileall.compile_dir(repo, quiet=2, rx=re.compile(re.escape(repo) + r"/(\.|build/|var/)"))
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:
        print(f"warm_pycache: {name}: {exc!r}", file=sys.stderr)
"""


def warm_pycache(modules: Sequence[str] = WARM_IMPORTS, python: str | None = None,
                 cache_root: str = CACHE_ROOT, repo: str = REPO_ROOT) -> str:
    """Pre-compile the .pyc a guest's Python needs into a ``PYTHONPYCACHEPREFIX`` tree.

    Why: the guest's root is read-only and TCG compiles slowly, so a module without a current
    .pyc costs its compilation in every guest process (~1.2 s for our backend's imports).
    The repo may have no .pyc at all (PYTHONDONTWRITEBYTECODE on the host), and writing into
    it is not ours to do.  With the prefix set Python ignores every __pycache__, so the tree
    must cover what they would: ``python`` compiles its whole stdlib and the whole ``repo``
    into it (``compileall``: only missing or stale files, ~0.3 s once done) and imports
    ``modules`` (third-party: their .pyc are written as they load).  Python checks each .pyc
    against its source's mtime and size, so a stale one is recompiled in memory, never used.
    Failures are reported on stderr and skipped (the guest then compiles in memory).
    Returns the prefix, ``cache_root/pycache``.
    """
    prefix = os.path.join(cache_root, "pycache")
    os.makedirs(prefix, exist_ok=True)
    env = {**os.environ, "PYTHONPYCACHEPREFIX": prefix}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        subprocess.run([python or sys.executable, "-c", _WARM, repo, *modules], cwd=repo, env=env,
                       stdout=subprocess.DEVNULL, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageError(f"warming {prefix} with {python or sys.executable} failed: {exc}") from exc
    return prefix


@dataclass(frozen=True)
class TapNetdev:
    """Attach the guest NIC to tap device ``ifname`` (which must exist, in ``netns`` if given)."""

    ifname: str
    netns: str | None = None
    mac: str = "52:54:00:12:34:56"


@dataclass
class GuestRun:
    """Result of one guest boot: the command's output (between markers), its exit code, all serial.

    ``timings``: seconds from QEMU's start until the host saw each marker on the serial port
    ("init": /init runs, "begin": the command starts, "end": it finished), to 50 ms.
    """

    output: str
    returncode: int
    serial: str
    timings: dict[str, float] = field(default_factory=dict)


_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NINEP_CACHES = ("none", "loose", "fscache", "mmap")


# Host directories a host_root guest covers with its own tmpfs.
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _hidden_roots(paths: Sequence[str]) -> list[str]:
    """The ``paths`` inside a HIDDEN_DIRS tree, minus those inside another one listed."""
    hidden = [p for p in dict.fromkeys(os.path.normpath(p) for p in paths)
              if p not in HIDDEN_DIRS and any(_under(p, d) for d in HIDDEN_DIRS)]
    return [p for p in hidden if not any(q != p and _under(p, q) for q in hidden)]


def _check_bind_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or re.search(r"\s", path) \
            or "/../" in path + "/" or path.endswith("/.."):
        raise ValueError(f"bind path {path!r} must be absolute, without whitespace or '..'")


@dataclass
class RxeGuest:
    """Boot the rxe guest once per ``run()``; ``cmd`` is a shell script run as root in the guest.

    ``ip`` (CIDR) is configured on eth0 before rxe0 is created.  ``netdev_args`` replaces the
    default QEMU network arguments entirely (they must create a NIC the guest sees as eth0);
    ``tap`` is the shortcut for a tap device (optionally inside a network namespace).
    ``files`` (name -> bytes) ride in the per-run initrd and appear in the guest as
    ``/tmp/vrdma/<name>`` (``GUEST_FILES_DIR``), in either mode.

    ``host_root=True`` shares the host's ``/`` read-only over virtio-9p (mount tag
    ``hostroot``, ``ninep_msize``/``ninep_cache`` its mount options) and runs ``cmd`` with
    ``/bin/sh`` chrooted into it, so host programs (our venv, pyverbs, the repo at its host
    path) run on rxe0.  The chroot gets fresh proc, sysfs and devtmpfs
    (``/dev/infiniband/uverbs0``) and empty tmpfs on /tmp, /run, /var/tmp and /dev/shm:
    **the host's /tmp and /var/tmp are not visible** (pass files in ``files``, or a host
    directory in ``host_binds``), except the repository and ``python``'s venv, bound back
    at their own paths when they live there (a clone in /tmp).  The command starts in /tmp with ``env -i`` plus PATH,
    HOME=/tmp, LANG=C.UTF-8, TERM=dumb, PYTHONDONTWRITEBYTECODE=1 (the root is read-only)
    and ``env``.  Before booting, the host prepares (``prepare()``):

    * ``portable_ext``: the repo's Cython extensions rebuilt for a CPU TCG emulates
      (``portable_extensions()``), each bind-mounted over the repo's ``-march=native`` build;
    * ``pyc_prefix``: .pyc of ``python``'s stdlib, the repo and ``warm_imports`` in a
      PYTHONPYCACHEPREFIX tree (``warm_pycache()``) the guest's environment names; False
      disables it (the guest then uses the host's own __pycache__ where current, else
      compiles in memory).  Another Python in the guest (e.g. /usr/bin/python3) misses
      its own .pyc under the prefix: pass ``pyc_prefix=False`` for such commands.

    ``host_binds`` ({guest path: host path}, absolute) shows a host file or directory at a
    path of the chrooted root, read-only; either side may be under /tmp or /var/tmp, e.g.
    ``{str(tmp_path): str(tmp_path)}`` keeps a pytest directory visible.
    """

    cmd: str = "ibv_devinfo"
    ip: str = "192.0.2.2/24"
    netdev_args: Sequence[str] | None = None
    tap: TapNetdev | None = None
    memory_mib: int = 512
    image: GuestImage | None = None
    extra_append: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict)
    host_root: bool = False
    ninep_msize: int = 512000
    ninep_cache: str = "loose"
    host_binds: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    portable_ext: bool = True
    pyc_prefix: bool = True
    warm_imports: Sequence[str] = WARM_IMPORTS
    python: str = field(default_factory=lambda: sys.executable)
    #: more QEMU arguments, appended (e.g. a vhost-user device: ``VhostUserDevice.qemu_args()``)
    extra_qemu_args: Sequence[str] = ()
    #: QemuVM keyword arguments selecting another QEMU (``wrapper``, ``binary``, ``extra_args``,
    #: as ``qemu_tests.qemu11.qemu11_vm_kwargs()`` gives); None: the host's qemu-system-x86_64
    qemu: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", self.ip):
            raise ValueError(f"ip {self.ip!r} must be an IPv4 CIDR like 192.0.2.2/24")
        if self.netdev_args is not None and self.tap is not None:
            raise ValueError("pass either netdev_args or tap, not both")
        if self.memory_mib < 64:
            raise ValueError(f"memory_mib {self.memory_mib} too small for the guest (min 64)")
        if self.ninep_cache not in NINEP_CACHES:
            raise ValueError(f"ninep_cache {self.ninep_cache!r} must be one of {NINEP_CACHES}")
        if not 4096 <= self.ninep_msize <= 1 << 24:
            raise ValueError(f"ninep_msize {self.ninep_msize} out of range 4096..16777216")
        for name, data in self.files.items():
            if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
                raise ValueError(f"file name {name!r} must match {_FILE_NAME.pattern}")
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(f"file {name!r} content must be bytes, not {type(data).__name__}")
        if (self.host_binds or self.env) and not self.host_root:
            raise ValueError("host_binds and env need host_root=True")
        for path in (*self.host_binds, *self.host_binds.values()):
            _check_bind_path(path)
        for key, value in self.env.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise ValueError(f"environment variable name {key!r} is not a shell name")
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"environment variable {key} value {value!r} must be a str without NUL")

    @classmethod
    def python_script(cls, script: str | os.PathLike, *args: object, cwd: str | None = None,
                      **fields) -> "RxeGuest":
        """A ``host_root`` guest running ``python script args`` in ``cwd``; ``run()`` it.

        The script's text rides in the initrd (``files``), so it may live anywhere on the
        host, /tmp included.  ``python`` (a field) defaults to the interpreter running this
        code (the venv's under ``.venv/bin/pytest``), ``cwd`` to the repository root: host
        paths, valid in the guest because the whole root is shared.  Output is unbuffered
        (stdout and stderr interleave as written).  ``fields`` are RxeGuest fields, e.g.
        ``tap=TapNetdev(...)``, ``ip=``, ``memory_mib=``, ``files=`` (more files for the
        script, beside it in /tmp/vrdma), ``env=``, ``host_binds=``.
        """
        if "cmd" in fields or fields.get("host_root") is False:
            raise ValueError("python_script sets cmd and host_root itself")
        with open(script, "rb") as f:
            text = f.read()
        name = "script-" + os.path.basename(os.fspath(script))
        files = {**dict(fields.pop("files", {})), name: text}
        python = fields.setdefault("python", sys.executable)
        argv = [python, f"{GUEST_FILES_DIR}/{name}", *map(str, args)]
        cmd = (f"cd {shlex.quote(cwd or REPO_ROOT)} && PYTHONUNBUFFERED=1 exec "
               + " ".join(map(shlex.quote, argv)))
        fields.pop("host_root", None)
        return cls(cmd=cmd, host_root=True, files=files, **fields)

    def qemu_net_args(self) -> list[str]:
        if self.netdev_args is not None:
            return list(self.netdev_args)
        if self.tap is not None:
            return ["-netdev", f"tap,id=n0,ifname={self.tap.ifname},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={self.tap.mac}"]
        return ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"]

    def qemu_fs_args(self) -> list[str]:
        """The read-only 9p share of the host's / (empty unless ``host_root``).

        ``multidevs=remap`` keeps inode numbers unique when the share spans several host
        filesystems (a clone on another mount), which the guest's inode cache relies on.
        """
        if not self.host_root:
            return []
        return ["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]

    def kernel_append(self) -> str:
        append = f"console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init vrdma.ip={self.ip}"
        if self.host_root:
            append += (f" vrdma.hostroot=trans=virtio,version=9p2000.L,msize={self.ninep_msize},"
                       f"cache={self.ninep_cache},ro")
        return f"{append} {self.extra_append}".strip()

    def prepare(self) -> tuple[dict[str, str], dict[str, str]]:
        """Host-side work of a host_root run: (binds {guest path: host path}, environment).

        Builds the portable extensions and warms the .pyc prefix as configured; both are
        cached, so this costs ~0.5 s once they exist.  Empty for a default run.
        """
        if not self.host_root:
            return {}, {}
        # A clone or venv under a directory the guest hides behind a tmpfs (CI may clone
        # into /tmp) is bound back first, before the extension binds that land inside it.
        binds: dict[str, str] = {root: root for root in _hidden_roots(
            (REPO_ROOT, os.path.dirname(os.path.dirname(os.path.abspath(self.python)))))}
        env: dict[str, str] = {}
        if self.portable_ext:
            binds.update(portable_extensions())
        if self.pyc_prefix:
            prefix = warm_pycache(self.warm_imports, python=self.python)
            binds[prefix] = prefix  # under the host's /var/tmp, which the guest hides
            env["PYTHONPYCACHEPREFIX"] = prefix
        binds.update(self.host_binds)
        env.update(self.env)
        for path in (*binds, *binds.values()):
            _check_bind_path(path)
        return binds, env

    def _overlay(self, binds: Mapping[str, str], env: Mapping[str, str]) -> bytes:
        entries = [cpio.directory("etc"), cpio.directory("etc/vrdma"),
                   cpio.file("etc/vrdma/cmd.sh", self.cmd.encode() + b"\n", 0o755)]
        if binds:
            text = "".join(f"{src} {dst}\n" for dst, src in binds.items())
            entries.append(cpio.file("etc/vrdma/binds", text.encode()))
        if env:
            text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
            entries.append(cpio.file("etc/vrdma/env", text.encode()))
        if self.files:
            entries += [cpio.directory("tmp"), cpio.directory(GUEST_FILES_DIR.lstrip("/"))]
            entries += [cpio.file(f"{GUEST_FILES_DIR.lstrip('/')}/{name}", bytes(data), 0o755)
                        for name, data in sorted(self.files.items())]
        return cpio.encode(entries)

    def run(self, timeout: float = 60.0,
            during: Sequence[tuple[bytes, Callable[[QemuVM], None]]] = ()) -> GuestRun:
        """Boot, run ``cmd``, power off; return its output.  Raises on boot failure/timeout.

        ``timeout`` bounds the whole boot, from QEMU's start to the end marker.
        ``during``: (marker, fn) pairs, in order: once the command has started, wait for
        each marker on the serial console and call ``fn(vm)`` (e.g. QMP ``stop`` and
        ``cont``) while the guest runs on.
        """
        image = self.image or build_image()
        wrapper = ["ip", "netns", "exec", self.tap.netns] if self.tap and self.tap.netns else []
        other = dict(self.qemu or {})
        wrapper += list(other.pop("wrapper", ()))  # type: ignore[call-overload]
        qemu_args = list(other.pop("extra_args", ()))  # type: ignore[call-overload]
        timings: dict[str, float] = {}
        binds, env = self.prepare()
        with tempfile.TemporaryDirectory(prefix="vrdma-rxe-run-") as tmp:
            initrd = os.path.join(tmp, "initrd.img")
            with open(image.initramfs, "rb") as src, open(initrd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.write(gzip.compress(self._overlay(binds, env), mtime=0))
            t0 = time.monotonic()
            with QemuVM(memory_mib=self.memory_mib, cpu="max", kernel=image.vmlinux, initrd=initrd,
                        append=self.kernel_append(),
                        extra_args=[*qemu_args, *self.qemu_net_args(), *self.qemu_fs_args(),
                                    *self.extra_qemu_args],
                        wrapper=wrapper, **other) as vm:  # type: ignore[arg-type]
                # SerialTimeout / QemuExitedError propagate with the serial tail and stderr.
                marks: list[tuple[str, bytes, Callable[[QemuVM], None] | None]] = [
                    ("init", b"VRDMA-GUEST-INIT", None), ("begin", BEGIN.encode(), None),
                    *((m.decode(), m, fn) for m, fn in during), ("end", b"VRDMA-CMD-END", None)]
                for label, marker, fn in marks:
                    vm.wait_serial(marker, max(0.0, timeout - (time.monotonic() - t0)))
                    timings.setdefault(label, round(time.monotonic() - t0, 3))
                    if fn is not None:
                        fn(vm)
                vm.wait(timeout=15)  # /init powers off right after the marker
                serial = vm.serial_output().decode("utf-8", "replace")
        if self.host_root and "VRDMA-HOSTROOT-OK" not in serial:
            raise GuestImageError("the guest could not set up the host root (9p mount tag hostroot, "
                                  f"binds, proc/tmpfs mounts); serial:\n{serial[-3000:]}")
        m = END_RE.search(serial)
        if BEGIN not in serial or m is None:
            raise GuestImageError(f"guest output lacks the command markers; serial:\n{serial[-3000:]}")
        body = serial[serial.index(BEGIN) + len(BEGIN):m.start()]
        return GuestRun(body.replace("\r\n", "\n").strip("\n"), int(m.group(1)), serial, timings)


def pingpong_self_test_script(ip: str, iters: int = 100, size: int = 4096) -> str:
    """Guest shell: ibv_rc_pingpong server in the background + client to the guest's own IP."""
    addr = shlex.quote(ip.split("/")[0])
    return (f"ibv_rc_pingpong -d rxe0 -g 1 -n {iters} -s {size} > /tmp/srv.log 2>&1 &\n"
            f"sleep 1\n"
            f"ibv_rc_pingpong -d rxe0 -g 1 -n {iters} -s {size} {addr}; rc=$?\n"
            f"wait\n"
            f"echo '--- server ---'; cat /tmp/srv.log\n"
            f"exit $rc\n")
