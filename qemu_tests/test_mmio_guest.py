"""guest_lib's virtio-mmio driver end to end in a QEMU 11.1 microvm guest.

A real ``vrdma backend`` (default options, but no handshake timeout: a TCG
guest reaches its driver after the default 10 s) serves two guests: a
process guest in this test (``RcEndpoint`` on the socket) and a microvm
booted by the real command line (``python -m vrdma vm run --qemu 11.1
--machine microvm``) whose image runs :mod:`qemu_tests.mmio_traffic` over
``Context("mmio:auto")``, i.e. :class:`VirtioMmioTransport` on the
``vhost-user-test-device`` at the machine's virtio-mmio block. QP information
goes in on the guest's command line and out on its console. Verified: SEND
with immediate (payload and immediate here, the reply in the guest), RDMA
WRITE (256 KiB, here), RDMA READ (in the guest), FETCH_AND_ADD and
CMP_AND_SWAP (old values in the guest, the final value here), and the
driver's counters (notifications, the release of every page, the mapping and
the lock on close).
"""
from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time

import pytest

from qemu_tests import mmio_traffic as app
from vrdma.image import ImageError, builder

from .qemu11 import require_qemu11

pytestmark = pytest.mark.qemu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "qemu_tests", "mmio_traffic.py")


@pytest.fixture(scope="module")
def image() -> builder.Image:
    require_qemu11()
    try:
        return builder.build(APP)
    except ImageError as exc:
        pytest.skip(f"cannot build the guest image: {exc}")


@pytest.fixture(scope="module")
def daemon():
    """A real ``vrdma backend`` on a unix socket: its path."""
    from vhost_user.testing import DaemonProcess

    with DaemonProcess("--handshake-timeout", "0") as d:
        yield d.path


def _lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        out.put(line.decode("utf-8", "replace").rstrip("\n"))
    out.put(None)


def _expect(lines: queue.Queue, prefix: str, seen: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or time.monotonic() > deadline:
            raise AssertionError(f"no {prefix} line; the guest said:\n" + "\n".join(seen[-60:]))
        seen.append(line)
        if line.startswith(prefix):
            return line[len(prefix):].strip()


def test_microvm_guest_does_every_verb_over_virtio_mmio(daemon, image):
    from guest_lib import SGE, RecvWR, SendWR
    from guest_lib.endpoint import RcEndpoint
    from verbs import WcOpcode, WrOpcode

    with RcEndpoint(daemon, 1 << 20) as host:
        mr, qp = host.mr, host.qp
        mr.write(struct.pack("<Q", app.ATOMIC_START), offset=app.ATOMIC_AT)
        mr.write(app.READ_DATA, offset=app.READ_AT)
        mr.write(app.GO, offset=app.REPLY_AT)
        argv = [sys.executable, "-m", "vrdma", "vm", "run", "--backend", daemon, "--image", image.directory,
                "--qemu", "11.1", "--machine", "microvm", "--timeout", "50",
                "--", "active", "mmio:auto", app.encode_info(host.info())]
        vm = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines: queue.Queue = queue.Queue()
        seen: list[str] = []
        threading.Thread(target=_lines, args=(vm.stdout, lines), daemon=True).start()
        try:
            guest = app.decode_info(_expect(lines, "VRDMA-MMIO-INFO", seen, 45))
            host.connect(guest)
            qp.post_recv(RecvWR(wr_id=1, sg=[SGE(mr.buf, 4096, mr.lkey)]))
            qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.SEND, sg=[SGE(mr.buf + app.REPLY_AT, 2, mr.lkey)]))
            got = {}
            for _ in range(2):
                wc = host.poll_one(30)
                got[wc.opcode] = wc
            recv = got[WcOpcode.RECV]
            assert recv.imm_data == app.IMM and mr.read(recv.byte_len, 0) == app.MSG
            mr.write(app.MSG.upper(), offset=app.REPLY_AT)
            qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.SEND,
                                sg=[SGE(mr.buf + app.REPLY_AT, len(app.MSG), mr.lkey)]))
            host.poll_one(30)
            result = json.loads(_expect(lines, "VRDMA-MMIO-RESULT", seen, 40))
            vm.wait(30)
        finally:
            if vm.poll() is None:
                vm.kill()
                vm.wait()
            err = vm.stderr.read().decode("utf-8", "replace") if vm.stderr else ""
            vm.stdout.close()  # type: ignore[union-attr]
            vm.stderr.close()  # type: ignore[union-attr]
        assert vm.returncode == 0, ("\n".join(seen[-40:]), err[-3000:])
        assert "-machine microvm,acpi=off" in err and "vhost-user-test-device,id=vrdma0" in err
        # what the guest wrote and swapped into our memory
        assert mr.read(len(app.WRITE_DATA), app.WRITE_AT) == app.WRITE_DATA
        assert struct.unpack("<Q", mr.read(8, app.ATOMIC_AT))[0] == 7
    assert result["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"]
    assert result["transport"] == "VirtioMmioTransport" and result["name"].startswith("mmio:0x")
    c, closed = result["counters"], result["closed"]
    assert c["regions_mapped"] == 1 and c["fds_opened"] == 1 and c["notifies"] > 0 and c["hugepages"] > 0
    assert closed["regions_unmapped"] == 1 and closed["fds_closed"] == 1
    assert closed["hugepages_freed"] == c["hugepages"] and "hugepages_kept" not in closed
