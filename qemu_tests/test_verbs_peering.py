"""Peer links over a real verbs device: kernel rxe in a guest (issue #14, item 4).

The host here has no RDMA, so ``tests/peering/test_verbs_peering.py`` skips
on it. This test boots Debian's kernel with rdma_rxe (and rdma_ucm, for
RDMA CM) on its virtio-net, gives eth0 a second address (two daemons, one
rxe device, each listening for RDMA CM on its own address), shares the
host's root read-only with the guest (``RxeGuest(host_root=True)``) and
runs that module there: two ``vrdma backend --fabric verbs --peer``
daemons, guests on each, remote FFT and Turbo jobs over the device, a peer
killed mid-job, bad keys NAKed by the device, and ``rdma resource show``
confirming the kernel objects are released. Every test of the module must
pass; none may skip.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from qemu_tests.rxe_guest import REPO_ROOT, RxeGuest

pytestmark = [pytest.mark.qemu]

MODULE = "tests/peering/test_verbs_peering.py"
#: the guest's eth0 address (RxeGuest's default) and a second one for the other daemon
ADDRS = ("192.0.2.2", "192.0.2.3")


@pytest.mark.timeout(900)  # seven daemons start under TCG: about 4 minutes in the guest
def test_verbs_peering_tests_pass_on_kernel_rxe(host_root_image):
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", MODULE]
    cmd = (f"ip addr add {ADDRS[1]}/24 dev eth0 && sleep 0.5 && cd {shlex.quote(REPO_ROOT)} && "
           f"VRDMA_VERBS_DEVICE=rxe0 VRDMA_VERBS_ADDRS={','.join(ADDRS)} "
           + " ".join(map(shlex.quote, argv)))
    run = RxeGuest(cmd=cmd, image=host_root_image, ip=f"{ADDRS[0]}/24", host_root=True,
                   memory_mib=1536).run(timeout=840)
    out = run.output
    assert run.returncode == 0, out
    summary = re.search(r"^(\d+) passed(.*) in [\d.]+s", out, re.MULTILINE)
    assert summary is not None, out
    assert "skipped" not in summary.group(2) and "failed" not in summary.group(2), out
    assert int(summary.group(1)) == _collected(), out


def _collected() -> int:
    """How many tests the module has (collected on the host, where they skip)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        MODULE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"^(\d+) tests? collected", r.stdout, re.MULTILINE)
    assert m is not None, r.stdout + r.stderr
    return int(m.group(1))
