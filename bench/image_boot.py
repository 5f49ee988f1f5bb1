"""Boot-to-application time of the single-application guest image under TCG.

Usage: python -m bench.image_boot [--rounds N] [--qemu 7.2,11.1]

Starts a real ``vrdma backend`` and boots, interleaved round by round on each QEMU:

* ``shell``: an image whose application is ``/bin/sh -c 'exit 0'`` (the same-run
  baseline: kernel, initramfs and /init, no Python);
* ``probe``: vrdma.image.probe (Debian's python3.11, stdlib only, reads the device config);
* ``default``: the default image, ``vrdma rc-pingpong -d pci:auto --help`` (imports
  guest_lib, virtio_rdma, numpy...).

Prints, per image and QEMU, the median seconds from QEMU's start to /init, to the
application's start and to its exit, the image sizes, and the machine.  TCG on a
shared machine is noisy: compare within one run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.machine import header
from vrdma.image import builder, vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--qemu", default="7.2,11.1")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="image-boot-") as tmp:
        shell = os.path.join(tmp, "exit0")
        with open(shell, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        images = {"shell": (builder.build(shell), ()),
                  "probe": (builder.build(os.path.join(REPO, "vrdma/image/probe.py")), ()),
                  "default": (builder.build(), ("--help",))}
        sock = os.path.join(tmp, "vrdma.sock")
        daemon = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock, "--fabric",
                                   "local", "--accelerators", "none"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not os.path.exists(sock):
                time.sleep(0.05)
            times: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for qemu in args.qemu.split(","):
                    for name, (image, app_args) in images.items():
                        spec = vm.VmSpec(backend=sock, image=image, qemu=qemu, app_args=app_args)
                        res = vm.run(spec, timeout=120)
                        if res.status != 0:
                            print(f"{name} on {qemu}: status {res.status}", file=sys.stderr)
                            continue
                        times.setdefault((name, qemu), []).append(res.timings)
        finally:
            daemon.terminate()
            daemon.wait(15)
    print(header())
    print("# seconds from QEMU start (median); the machine is shared, TCG, 1 vCPU, 512 MiB")
    print(f"{'image':8} {'qemu':5} {'init':>6} {'app':>6} {'exit':>6} {'app-exit':>8}  n")
    for (name, qemu), runs in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = {k: statistics.median(r[k] for r in runs) for k in ("init", "app", "exit")}
        print(f"{name:8} {qemu:5} {med['init']:6.2f} {med['app']:6.2f} {med['exit']:6.2f} "
              f"{med['exit'] - med['app']:8.2f}  {len(runs)}")
    for name, (image, _) in images.items():
        s = image.manifest["sizes"]
        print(f"# {name}: vmlinux {s['vmlinux'] / 1e6:.1f} MB, initramfs {s['initramfs_cpio'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
