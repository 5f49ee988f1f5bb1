"""The verbs transport on a real RDMA device: kernel rxe in a guest.

The host here has no RDMA, so ``tests/fabric/test_hca.py`` skips
on it. This test boots Debian's kernel with rdma_rxe on its virtio-net
(rxe0), shares the host's root read-only with the guest
(``RxeGuest(host_root=True)``) and runs that test module there, where it
finds rxe0: two back-end daemons on the verbs fabric, a guest on each,
every verb through kernel rxe, the device's own view of the guests' keys
and QPs (``rdma resource show``), and an unmodified ibv_rc_pingpong against
a guest of the verbs fabric. Every test of the module must pass; none may
skip.

The verbs fabric against our userspace RoCEv2 across the guest's NIC is in
``test_rxe_interop.py`` (``vrdma-on-verbs``).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from qemu_tests.rxe_guest import REPO_ROOT, RxeGuest

pytestmark = [pytest.mark.qemu]

MODULE = "tests/fabric/test_hca.py"


# the guest's own bound (500 s) is what counts: the suite's 300 s would end it first, and the
# module under TCG took 163 s with a load of 7 on the shared 2 vCPUs
@pytest.mark.timeout(600)
def test_verbs_fabric_tests_pass_on_kernel_rxe(host_root_image):
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", MODULE]
    cmd = (f"cd {shlex.quote(REPO_ROOT)} && VRDMA_VERBS_DEVICE=rxe0 "
           + " ".join(map(shlex.quote, argv)))
    run = RxeGuest(cmd=cmd, image=host_root_image, host_root=True, memory_mib=1024).run(timeout=500)
    out = run.output
    assert run.returncode == 0, out
    summary = re.search(r"^(\d+) passed(.*) in [\d.]+s", out, re.M)
    assert summary is not None, out
    assert "skipped" not in summary.group(2) and "failed" not in summary.group(2), out
    assert int(summary.group(1)) == _collected(), out


def _collected() -> int:
    """How many tests the module has (collected on the host, where they skip)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        MODULE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    m = re.search(r"^(\d+) tests? collected", r.stdout, re.M)
    assert m is not None, r.stdout + r.stderr
    return int(m.group(1))
