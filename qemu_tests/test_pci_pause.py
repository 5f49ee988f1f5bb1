"""A QEMU guest paused and continued (QMP ``stop``/``cont``, what ``virsh
suspend``/``resume`` and a live snapshot do) keeps its RDMA objects.

QEMU stops a vhost-user device's rings when the VM stops (GET_VRING_BASE on
each) and starts them again on ``cont`` (SET_VRING_BASE with the index it was
given, the same ring addresses, new kick fds), which on the wire looks much
like a guest driver's reset (QEMU 11.1's vhost-user-base sends no SET_STATUS 0
on one). The device tells the two apart (docs/virtio-rdma.md "Carriers"): a
pause must not drop the guest's QPs, CQs and MRs, a driver reset must.

The guest program (qemu_tests/pci_pause.py) moves data between two of its own
QPs, prints a marker and sleeps; the test stops the VM there for a while and
continues it; the program then moves data again on the same objects.
"""
from __future__ import annotations

import time

import pytest

from qemu_tests.pci_guest import QEMUS, pci_guest, require_qemu, result_of

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("qemu", QEMUS)
def test_a_paused_and_continued_guest_keeps_its_objects(host_root_image, qemu):
    from vhost_user.testing import DaemonProcess

    print(f"\n{require_qemu(qemu)}")
    events: list = []

    def pause(vm) -> None:
        vm.qmp("stop")
        events.append(vm.qmp("query-status")["status"])
        time.sleep(2.0)
        vm.qmp("cont")
        events.append(vm.qmp("query-status")["status"])

    with DaemonProcess("--handshake-timeout", "2") as d:
        g = pci_guest(host_root_image, d.path, ["qemu_tests/pci_pause.py", "pci:auto", "8"], qemu=qemu)
        r = g.run(timeout=180, during=[(b"VRDMA-PAUSE-NOW", pause)])
        assert events == ["paused", "running"], events
        assert r.returncode == 0, r.output[-4000:]
        res = result_of(r.output)
        assert res["before"] == res["after"] == {"send": 512, "write": 4096}, res
