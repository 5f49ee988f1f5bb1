"""``vrdma image build``: a single-application image from Debian packages, cached.

The real command builds (or finds in /var/tmp/vrdma-image) the probe image and copies
it to ``--out``; a second run is a cache hit with the same key.  The initramfs is
decoded and must hold what the guest needs: /init, busybox, Debian's python3.11 with
its stdlib and numpy (precompiled), the repository's modules with portable extensions,
the uio modules and the application.  The key changes with the application.  Booting
the images is test_vm_run's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vrdma.image import ImageError, builder, closure, cpio, initscript

pytestmark = pytest.mark.qemu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "vrdma", "image", "probe.py")


def _cli_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrdma", "image", "build", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800, check=False)


@pytest.fixture(scope="module")
def probe_image():
    try:
        return builder.build(PROBE)
    except ImageError as exc:
        pytest.skip(f"cannot build the guest image: {exc}")


def test_build_copies_out_and_second_build_is_a_cache_hit(probe_image, tmp_path):
    out = tmp_path / "img"
    first = _cli_build("--app", PROBE, "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli_build("--app", PROBE, "--out", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"key {probe_image.key} (cache hit)" in second.stdout
    assert f"image {out}" in second.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"] == probe_image.key
    for name in ("vmlinux", builder.INITRAMFS):
        assert (out / name).read_bytes() == open(os.path.join(probe_image.directory, name), "rb").read()
    with open(out / "vmlinux", "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the PVH-bootable ELF, not the bzImage
    assert builder.load(str(out)).key == probe_image.key


def test_initramfs_holds_the_application_and_its_runtime(probe_image):
    with open(probe_image.initramfs, "rb") as f:
        entries = {e.name: e for e in cpio.decode(f.read())}
    assert entries["init"].data == initscript.INIT.encode()
    assert entries["app/app.py"].data == open(PROBE, "rb").read()
    assert entries["usr/bin/python3"].data == b"python3.11"  # symlink target
    for name in ("bin/busybox", "usr/bin/python3.11", "usr/lib/python3.11/os.py",
                 "usr/lib/python3/dist-packages/numpy/__init__.py", "opt/vrdma/guest_lib/__init__.py",
                 "opt/vrdma/virtio_rdma/wire.py", "opt/vrdma/construct/__init__.py",
                 "lib/modules/uio.ko", "lib/modules/uio_pci_generic.ko", "etc/vrdma/modules",
                 "lib64/ld-linux-x86-64.so.2"):
        assert name in entries, name
    assert entries["etc/vrdma/modules"].data == b"uio.ko\nuio_pci_generic.ko\n"
    # portable extensions of the shipped packages, and precompiled stdlib / numpy / repo
    assert any(n.startswith("opt/vrdma/virtio/_split.cpython-311") and n.endswith(".so") for n in entries)
    for pyc in ("usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
                "usr/lib/python3/dist-packages/numpy/__pycache__/__init__.cpython-311.pyc",
                "opt/vrdma/guest_lib/__pycache__/context.cpython-311.pyc"):
        assert pyc in entries, pyc
    assert not any(n.startswith("usr/lib/python3.11/test/") for n in entries)
    sizes = probe_image.manifest["sizes"]
    print(f"probe image: vmlinux {sizes['vmlinux']} B, initramfs {sizes['initramfs_cpio']} B")


def test_default_image_runs_rc_pingpong_and_ships_what_it_imports():
    clos = closure.find(REPO, builder.DEFAULT_APP)
    assert {"vrdma", "guest_lib", "verbs", "virtio", "virtio_rdma", "vhost_user"} <= clos.packages
    assert "vrdma/commands/rc_pingpong.py" in clos.files and "vrdma/rc_pingpong/pingpong.py" in clos.files
    assert "vrdma/commands/backend.py" not in clos.files  # only what the app imports
    assert clos.third_party == {"construct"}
    # the Cython modules it reaches, and what their .pyx import at run time
    assert {"virtio._split", "virtio._memory", "accel_core._fft"} <= clos.extensions
    assert "virtio_rdma._datapath" not in clos.extensions
    pyx = closure.find(REPO, None, "import virtio_rdma._datapath")
    assert "virtio_rdma._datapath" in pyx.extensions and "virtio_rdma/cq.py" in pyx.files


def test_key_follows_the_application(probe_image):
    inputs = probe_image.manifest["inputs"]
    versions = dict(line.split("=", 1) for line in inputs if line.startswith(("linux-image", "python3", "lib",
                                                                             "busybox")))
    clos = closure.find(REPO, PROBE)
    third = builder._third_party_dirs(sorted(clos.third_party))
    app = open(PROBE, "rb").read()
    key, _ = builder.image_key(versions, "app.py", app, clos, third, REPO)
    assert key == probe_image.key
    other, _ = builder.image_key(versions, "app.py", app + b"\n# changed\n", clos, third, REPO)
    assert other != key
