"""guest_lib's virtio-mmio driver end to end in a QEMU 11.1 microvm guest.

A real ``vrdma backend`` (default options) serves two guests: a
process guest in this test (``RcEndpoint`` on the socket) and a microvm
booted by the real command line (``python -m vrdma vm run --qemu 11.1
--machine microvm``) whose image runs :mod:`qemu_tests.mmio_traffic` over
``Context("mmio:auto")``, i.e. :class:`VirtioMmioTransport` on the
``vhost-user-test-device`` at the machine's virtio-mmio block. QP information
goes in on the guest's command line and out on its console. Verified: SEND
with immediate (payload and immediate here, the reply in the guest), RDMA
WRITE (256 KiB, here), RDMA READ (in the guest), FETCH_AND_ADD and
CMP_AND_SWAP (old values in the guest, the final value here), a second
driver on the block refused with EBUSY, and the driver's counters
(notifications, the release of every page, the mapping and the lock on
close). Then 30 64-byte SEND ping-pongs are timed and printed beside the
same program run as a process guest on the same daemon (no assertion on
time; TCG emulates every guest instruction).
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

    with DaemonProcess() as d:
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


def _serve(argv: list[str], iters: int, timeout: float = 140) -> tuple[dict, str, list[str]]:
    """Run the active side (``argv`` + its peer info + ``iters``) against a
    process guest here on the daemon, answer it, check what it wrote into our
    memory; its result, stderr and console lines."""
    from guest_lib import SGE, RecvWR, SendWR
    from guest_lib.endpoint import RcEndpoint
    from verbs import WcOpcode, WrOpcode

    sock = argv[argv.index("--backend") + 1] if "--backend" in argv else argv[-1]
    with RcEndpoint(sock, 1 << 20) as host:
        mr, qp = host.mr, host.qp
        mr.write(struct.pack("<Q", app.ATOMIC_START), offset=app.ATOMIC_AT)
        mr.write(app.READ_DATA, offset=app.READ_AT)
        mr.write(app.GO, offset=app.REPLY_AT)
        proc = subprocess.Popen([*argv, app.encode_info(host.info()), str(iters)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": REPO},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines: queue.Queue = queue.Queue()
        seen: list[str] = []
        threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
        try:
            host.connect(app.decode_info(_expect(lines, "VRDMA-MMIO-INFO", seen, timeout)))
            qp.post_recv(RecvWR(wr_id=1, sg=[SGE(mr.buf, 4096, mr.lkey)]))
            qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.SEND, sg=[SGE(mr.buf + app.REPLY_AT, 2, mr.lkey)]))
            got = {}
            for _ in range(2):
                wc = host.poll_one(30)
                got[wc.opcode] = wc
            recv = got[WcOpcode.RECV]
            assert recv.imm_data == app.IMM and mr.read(recv.byte_len, 0) == app.MSG
            mr.write(app.MSG.upper(), offset=app.REPLY_AT)
            qp.post_recv(RecvWR(wr_id=3, sg=[SGE(mr.buf, 64, mr.lkey)]))
            qp.post_send(SendWR(wr_id=4, opcode=WrOpcode.SEND,
                                sg=[SGE(mr.buf + app.REPLY_AT, len(app.MSG), mr.lkey)]))
            host.poll_one(30)
            pings = []  # when each ping arrived, by this host's clock (the guest's may tick coarsely)
            for i in range(iters):  # echo the pings
                wc = host.poll_one(30)
                pings.append(time.perf_counter())
                assert wc.opcode == WcOpcode.RECV, wc
                qp.post_recv(RecvWR(wr_id=10 + i, sg=[SGE(mr.buf, 64, mr.lkey)]))
                qp.post_send(SendWR(wr_id=1000 + i, opcode=WrOpcode.SEND,
                                    sg=[SGE(mr.buf + 8192, 64, mr.lkey)]))
                assert host.poll_one(30).opcode == WcOpcode.SEND
            result = json.loads(_expect(lines, "VRDMA-MMIO-RESULT", seen, 40))
            if iters > 1:
                result["host_half_rtt_us"] = (pings[-1] - pings[0]) / (iters - 1) / 2 * 1e6
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        assert proc.returncode == 0, ("\n".join(seen[-40:]), err[-3000:])
        # what the active side wrote and swapped into our memory
        assert mr.read(len(app.WRITE_DATA), app.WRITE_AT) == app.WRITE_DATA
        assert struct.unpack("<Q", mr.read(8, app.ATOMIC_AT))[0] == 7
    assert result["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"]
    return result, err, seen


def test_microvm_guest_does_every_verb_over_virtio_mmio(daemon, image):
    from bench.machine import header

    iters = 30
    vm = [sys.executable, "-m", "vrdma", "vm", "run", "--backend", daemon, "--image", image.directory,
          "--qemu", "11.1", "--machine", "microvm", "--timeout", "150", "--", "active", "mmio:auto"]
    result, err, _ = _serve(vm, iters)
    assert "-machine microvm,acpi=off" in err and "vhost-user-test-device,id=vrdma0" in err
    assert result["transport"] == "VirtioMmioTransport" and result["name"].startswith("mmio:0x")
    assert result["second_driver"] == "errno 16"  # EBUSY: one driver per block
    assert result["kernel_virtio_mmio"] is False  # the guest kernel never drove the device
    c, closed = result["counters"], result["closed"]
    assert c["regions_mapped"] == 1 and c["fds_opened"] == 1 and c["notifies"] > 0 and c["hugepages"] > 0
    assert closed["regions_unmapped"] == 1 and closed["fds_closed"] == 1
    assert closed["hugepages_freed"] == c["hugepages"] and "hugepages_kept" not in closed
    # the same program as a process guest on the same daemon: the baseline
    base, _, _ = _serve([sys.executable, APP, "active", daemon], iters)
    assert base["transport"] == "VhostUserTransport" and base["second_driver"] is None
    print(f"\n64-byte SEND ping-pong, half round trip, mean of {iters} by the host's clock (median by the "
          f"active side's): QEMU 11.1 TCG microvm guest over virtio-mmio {result['host_half_rtt_us']:.1f} us "
          f"({result['send64_half_rtt_us']:.1f}); same program as a process guest "
          f"{base['host_half_rtt_us']:.1f} us ({base['send64_half_rtt_us']:.1f}); host {header()} "
          "(shared machine)")
