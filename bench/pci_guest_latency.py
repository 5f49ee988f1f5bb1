"""64-byte SEND latency: a QEMU 7.2 guest over guest_lib's virtio-pci driver
against the same program as a process guest, interleaved, on one daemon.

Each round boots a guest (qemu_tests/pci_guest.py: the device through the
vhost-user-blk carrier) running qemu_tests/pci_traffic.py against a host
peer, then runs the same program on the host as a process guest against the
same peer; it prints each round's median half round trip and the machine.
TCG emulates the guest's CPU: the QEMU figure is a report, not a goal.

    PYTHONPATH=$PWD .venv/bin/python bench/pci_guest_latency.py [--rounds 2] [--iters 300]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench.machine import header
from qemu_tests.pci_guest import free_port, pci_guest, result_of, with_peer
from qemu_tests.rxe_guest import REPO_ROOT, build_image, portable_extensions
from vhost_user.testing import DaemonProcess

APP = "qemu_tests/pci_traffic.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=300)
    a = ap.parse_args()
    image = build_image()
    portable_extensions()
    print(header())
    print(f"# {a.iters} 64-byte SEND ping-pongs per run; median half round trip, us; "
          f"load average {os.getloadavg()[0]:.1f} at start (a shared machine)")
    print(f"{'round':<7}{'QEMU guest (pci)':>18}{'process guest':>16}")
    with DaemonProcess() as d:
        for r in range(a.rounds):
            port = free_port()
            g = pci_guest(image, d.path, [APP, "pci:auto", "5000", str(a.iters)], host_port=port)
            run, _ = with_peer(d.path, port, a.iters, lambda g=g: g.run(timeout=300))
            q = result_of(run.output)["send64_half_rtt_us"]
            port = free_port()

            def local(port=port):
                p = subprocess.run([sys.executable, APP, d.path, str(port), str(a.iters)], cwd=REPO_ROOT,
                                   env={**os.environ, "PYTHONPATH": REPO_ROOT}, capture_output=True,
                                   text=True, timeout=300, check=False)
                return result_of(p.stdout + p.stderr)

            res, _ = with_peer(d.path, port, a.iters, local)
            print(f"{r:<7}{q:>18.1f}{res['send64_half_rtt_us']:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
