"""QEMU 7.2 guests drive the virtio-rdma device with guest_lib's userspace
virtio-pci driver, through the vhost-user-blk carrier (docs/virtio-rdma.md
"Carriers"; qemu_tests/pci_guest.py), and QEMU 11.1 guests through its
generic vhost-user-test-device-pci (every test runs on both, ``QEMUS``).
Every daemon here runs with a 2 s
handshake timeout, far less than a TCG boot: QEMU's realize-time handshake
is what keeps it connected until the guest's driver starts the rings.

* One boot, three programs in turn (``shared_boot``), on one real daemon
  (``vrdma backend --accelerators``): a guest program (``Context("pci:auto")``,
  found by the config magic behind PCI device ID 0x1042) and a process guest
  on the host do SEND with immediate, RDMA WRITE, READ, both atomics, data
  checked on both sides, then 64-byte SEND ping-pongs (the same program as a
  process guest is the latency baseline, printed: TCG, no goal); FFT and
  Turbo jobs through guest_lib.accel's three layers, compared with
  accel_core on the host; ``vrdma rc-pingpong -d pci:auto`` unchanged.
* Two QEMU guests on one daemon.
* Isolation, on the daemon in a thread (its metrics and fds in view): a
  guest that programs descriptors outside its RAM is dropped (a protocol
  error counted) and the process guest is still served; a QEMU killed
  mid-traffic leaves no fd or mapping behind in the daemon.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from qemu_tests.errors import QemuExitedError
from qemu_tests.pci_guest import (
    QEMUS,
    free_port as _free_port,
    pci_guest,
    phase_outputs,
    require_qemu,
    result_of as _result,
    with_peer,
)
from qemu_tests.pci_traffic import peer
from qemu_tests.rxe_guest import REPO_ROOT

pytestmark = pytest.mark.qemu

APP = "qemu_tests/pci_traffic.py"


#: the daemon's handshake timeout in these tests: far shorter than a TCG boot
#: (20+ s before the guest's driver sets DRIVER_OK), so a guest that works
#: shows the daemon keeps a QEMU that only did its realize-time handshake
HANDSHAKE_TIMEOUT = "2"
ACCEL_SEED = 16


@pytest.fixture
def daemon():
    from vhost_user.testing import DaemonProcess

    with DaemonProcess("--handshake-timeout", HANDSHAKE_TIMEOUT) as d:
        yield d


@pytest.fixture(scope="module")
def accel_daemon():
    from vhost_user.testing import DaemonProcess

    with DaemonProcess("--handshake-timeout", HANDSHAKE_TIMEOUT, "--accelerators", "fft=1,turbo=1") as d:
        yield d


def _rc_pingpong_client(path: str, port: int, n: str, deadline_s: float = 150):
    """``vrdma rc-pingpong`` as the client on the host, retried while the
    guest is not listening yet (the user network accepts before it does)."""
    deadline = time.monotonic() + deadline_s
    while True:
        p = subprocess.run([sys.executable, "-m", "vrdma", "rc-pingpong", "--backend", path,
                            "-p", str(port), "-n", n, "-c", "--timeout", "30", "127.0.0.1"],
                           cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                           capture_output=True, text=True, timeout=120, check=False)
        if p.returncode == 0 or time.monotonic() > deadline:
            return p
        time.sleep(1)


PINGPONG_N = "50"
TRAFFIC_ITERS = 50  # more in bench/pci_guest_latency.py


@pytest.fixture(scope="module", params=QEMUS)
def shared_boot(request, host_root_image, accel_daemon):
    """One boot, three phases in the guest, each a process of its own opening
    the device anew: (0) pci_traffic's active side against a host peer,
    (1) pci_accel's FFT and Turbo jobs, (2) ``vrdma rc-pingpong -d pci:auto -e``
    as the server against the same command on the host. The host's side of
    phases 0 and 2 runs in a thread while the guest runs."""
    qemu = request.param
    version = require_qemu(qemu)
    port = _free_port()
    t0 = time.monotonic()
    guest = pci_guest(host_root_image, accel_daemon.path, [APP, "pci:auto", "5000", str(TRAFFIC_ITERS)],
                      host_port=port, qemu=qemu,
                      then=[["qemu_tests/pci_accel.py", "pci:auto", str(ACCEL_SEED)],
                            ["-m", "vrdma", "rc-pingpong", "-d", "pci:auto", "-p", "5000", "-n", PINGPONG_N,
                             "-e", "-c", "--timeout", "90"]])
    box: dict = {}

    def host():  # phase 0's peer, then phase 2's client
        box["peer"] = _try(lambda: peer(accel_daemon.path, ("127.0.0.1", port), TRAFFIC_ITERS))
        box["client"] = _try(lambda: _rc_pingpong_client(accel_daemon.path, port, PINGPONG_N))

    th = threading.Thread(target=host, daemon=True)
    th.start()
    try:
        r = _try(lambda: guest.run(timeout=170))
    finally:
        th.join(60)
    assert not isinstance(r, BaseException), r
    phases = phase_outputs(r.output)
    return {"run": r, "phases": phases, "qemu": qemu, "version": version, "peer": box.get("peer"),
            "client": box.get("client"),
            "seconds": round(time.monotonic() - t0, 1)}


def test_pci_guest_does_every_verb_with_a_process_guest(shared_boot, accel_daemon):
    from bench.machine import header

    run = shared_boot["run"]
    phases = shared_boot["phases"]
    assert len(phases) >= 1, run.output[-4000:]
    r = _result(phases[0])
    assert shared_boot["peer"] == {"peer_verified": True}, shared_boot["peer"]
    assert r["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"]
    assert r["second_driver"].startswith("errno 16: "), r["second_driver"]  # EBUSY: one driver per function
    # the pool was fragmented (every 4th page held): runs of at most 3 pages; an MR one page longer than
    # the longest run is a page list, and RDMA WRITE from / READ into it across a boundary move the bytes
    pl = r["page_list"]
    assert r["held_hugepages"] > 0 and max(pl["runs"]) <= 3 and pl["largest_run"] == max(pl["runs"]) << 21, r
    assert pl["size"] > pl["largest_run"] and pl["chunks"] > 1 and pl["boundary_crossed"], pl
    assert pl["write_ok"] and pl["read_ok"], pl
    big = r["big_mr"]  # MRs past one huge page: 5 MiB registers (a page list if need be); 64 MiB > the memory
    too_big = big[str(64 << 20)]
    assert too_big.startswith("refused") and "free huge pages for the MR" in too_big, big
    assert big[str(5 << 20)] == "registered", big
    c = r["counters"]
    # the driver slept on INTx through uio for control answers, and released all it held
    assert c["interrupts"] > 0 and c["notifies"] > 0 and c["bars_mapped"] >= 1, c
    done = r["closed"]
    assert done["bars_unmapped"] == done["bars_mapped"] and done["fds_closed"] == done["fds_opened"], done
    assert done["hugepages_freed"] == done["hugepages"], done
    # the same program as a process guest on the same daemon: the baseline
    iters = TRAFFIC_ITERS
    port2 = _free_port()

    def local():
        p = subprocess.run([sys.executable, APP, accel_daemon.path, str(port2), str(iters)], cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONPATH": REPO_ROOT}, capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        return _result(p.stdout)

    base, _ = with_peer(accel_daemon.path, port2, iters, local)
    print(f"\n64-byte SEND latency (half round trip, median of {iters}): {shared_boot['version']} "
          f"TCG guest over virtio-pci {r['send64_half_rtt_us']:.1f} us; same program as a process guest "
          f"{base['send64_half_rtt_us']:.1f} us; host {header()} (shared machine); "
          f"guest boot to command {run.timings.get('begin')} s; huge-page runs {big['runs']}, "
          f"{pl['size'] >> 20} MiB MR as {pl['chunks']} chunks; "
          f"the boot's three phases took {shared_boot['seconds']} s")


def test_pci_guest_runs_fft_and_turbo_jobs_through_the_device(shared_boot):
    """guest_lib.accel's three layers in the guest (AQ post/poll, accel_core's
    call shapes, the file-like device); every result equal to accel_core run
    on the host: FFTs within float32 rounding of a differently ordered sum
    (the daemon's kernels are the host's, so in practice exact), Turbo
    bit-exact."""
    import numpy as np

    from qemu_tests.pci_accel import reference, unpack

    phases = shared_boot["phases"]
    assert len(phases) >= 2, shared_boot["run"].output[-4000:]
    r = _result(phases[1])
    assert "error" not in r, r
    wc = r["aq_wc"]
    assert r["device"] == "pci:auto" and wc["wr_id"] == 0xF0F and wc["byte_len"] > 0, wc
    ref = reference(ACCEL_SEED)
    got = {k: unpack(v) for k, v in r["arrays"].items()}
    assert set(got) == set(ref)
    for k in ("aq_fft", "fft", "ifft", "file_fft"):
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-4 * np.abs(ref[k]).max(), err_msg=k)
    for k in ("encode", "decode_bits", "decode_used", "file_decode"):
        assert got[k].dtype == np.asarray(ref[k]).dtype and got[k].shape == np.shape(ref[k]), k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert (got["decode_bits"] == reference_bits(ACCEL_SEED)).all()  # the decoder recovered the data


def reference_bits(seed: int):
    from qemu_tests.pci_accel import inputs

    return inputs(seed)["bits"]


def test_vrdma_rc_pingpong_runs_unchanged_in_the_guest(shared_boot):
    """``vrdma rc-pingpong -d pci:auto -e`` (sleeping on CQ events, so on
    INTx through uio) as the server in the guest, the same command with the
    socket path as the client on the host; the guest's third phase, after
    two other programs opened and closed the device in the same boot."""
    run, phases, c = shared_boot["run"], shared_boot["phases"], shared_boot["client"]
    assert run.returncode == 0, run.output[-3000:]
    assert len(phases) == 3, run.output[-3000:]
    assert not isinstance(c, BaseException) and c.returncode == 0, c
    n = PINGPONG_N
    assert f"{n} iters in" in phases[2] and f"{n} iters in" in c.stdout, (phases[2], c.stdout)


@pytest.mark.parametrize("qemu", QEMUS)
def test_two_qemu_guests_on_one_daemon(host_root_image, daemon, qemu):
    """Both sides in QEMU guests: the second reaches the first's exchange port
    through its own user network (the host's loopback is 192.0.2.2 there)."""
    print(f"\n{require_qemu(qemu)}")
    port = _free_port()
    a = pci_guest(host_root_image, daemon.path, [APP, "pci:auto", "5000", "20"], host_port=port, qemu=qemu)
    b = pci_guest(host_root_image, daemon.path, [APP, "peer", "pci:auto", "192.0.2.2", str(port), "20"],
                  qemu=qemu)
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("b", _try(lambda: b.run(timeout=150))), daemon=True)
    th.start()
    ra = _try(lambda: a.run(timeout=150))
    th.join(160)
    rb = box["b"]
    for r in (ra, rb):
        assert not isinstance(r, BaseException), r
        assert r.returncode == 0, r.output[-4000:]
    assert _result(ra.output)["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD",
                                              "CMP_AND_SWP"]
    assert _result(rb.output) == {"peer_verified": True}


def _rdma_thread_daemon(path: str):
    from fabric.local import LocalFabric
    from vhost_user.tenancy import TenantPolicy
    from vhost_user.testing import BackendThread
    from virtio_rdma.device import RdmaDevice

    fabric = LocalFabric()
    return BackendThread(path, lambda info: RdmaDevice(fabric), policy=TenantPolicy(handshake_timeout=2.0))


def _state(server):
    return {"connections": len(server.connections), "closed": server.metrics.closed,
            "protocol_errors": server.metrics.protocol_errors, "accepted": server.metrics.accepted,
            "handshake_timeouts": server.metrics.handshake_timeouts}


def _process_guest_works(path: str) -> None:
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from guest_lib.wr import SGE, SendWR
    from verbs import WrOpcode

    with RcEndpoint(path, 1 << 16) as a, RcEndpoint(path, 1 << 16) as b:
        connect_pair(a, b)
        a.mr.write(b"still served")
        a.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 12, a.mr.lkey)],
                              remote_addr=b.mr.buf, rkey=b.mr.rkey))
        a.poll_one()
        assert b.mr.read(12) == b"still served"


@pytest.mark.parametrize("qemu", QEMUS)
def test_guest_with_garbage_rings_is_dropped_alone(host_root_image, tmp_path, qemu):
    from vhost_user.testing import open_fds
    from virtio.memory import proc_maps_count

    print(f"\n{require_qemu(qemu)}")
    path = str(tmp_path / "rdma.sock")
    with _rdma_thread_daemon(path) as d:
        fds, maps = open_fds(), proc_maps_count("memfd:")
        guest = pci_guest(host_root_image, path, [APP, "garbage", "pci:auto"], hugepages=8, qemu=qemu)
        run = guest.run(timeout=120)
        assert run.returncode == 0, run.output[-4000:]
        r = _result(run.output)
        assert r["answered"] == "WaitTimeout", r  # never answered: the daemon dropped the guest
        assert r["counters"]["polls"] > 0 and not r["counters"].get("interrupts"), r  # the poll-only wait
        assert d.wait_for(lambda s: _state(s)["connections"] == 0, 10)
        st = d.call(_state, d.server)
        assert st["protocol_errors"] >= 1 and st["closed"] == st["accepted"] == 1, st
        assert st["handshake_timeouts"] == 0, st  # QEMU's realize handshake kept it through the boot
        _process_guest_works(path)
        assert d.wait_for(lambda s: not s.connections, 10)
        assert open_fds() == fds and proc_maps_count("memfd:") == maps


@pytest.mark.parametrize("qemu", QEMUS)
def test_qemu_killed_mid_traffic_releases_everything(host_root_image, tmp_path, qemu):
    from vhost_user.testing import open_fds
    from virtio.memory import proc_maps_count

    print(f"\n{require_qemu(qemu)}")
    path = str(tmp_path / "rdma.sock")
    with _rdma_thread_daemon(path) as d:
        fds, maps = open_fds(), proc_maps_count("memfd:")
        port = _free_port()
        guest = pci_guest(host_root_image, path, [APP, "pci:auto", "5000", "100000"], host_port=port,
                          qemu=qemu)
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("run", _try(lambda: guest.run(timeout=150))),
                              daemon=True)
        th.start()
        # the peer keeps the ping-pong going until QEMU dies under it
        pth = threading.Thread(target=lambda: box.setdefault("peer", _try(
            lambda: peer(path, ("127.0.0.1", port), 100000, timeout=120, poll_timeout=5))), daemon=True)
        pth.start()
        # wait until the guest's QPs exist (two connections: the guest's and the peer's, both busy)
        assert d.wait_for(lambda s: len(s.connections) == 2 and all(
            c.core.device.core is not None and c.core.device.core.qps for c in s.connections), 120)
        time.sleep(1.0)  # mid-traffic
        pids = d.call(lambda s: [c.info.pid for c in s.connections if c.info.pid != os.getpid()], d.server)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        th.join(60)
        assert isinstance(box["run"], QemuExitedError), box["run"]
        pth.join(30)
        assert isinstance(box["peer"], Exception), box["peer"]  # its partner vanished mid-ping-pong
        assert d.wait_for(lambda s: len(s.connections) == 0, 30), d.call(_state, d.server)
        st = d.call(_state, d.server)
        assert st["closed"] == st["accepted"] == 2 and st["handshake_timeouts"] == 0, st
        _process_guest_works(path)
        assert d.wait_for(lambda s: not s.connections, 10)
        assert open_fds() == fds and proc_maps_count("memfd:") == maps


def _try(fn):
    try:
        return fn()
    except BaseException as e:
        return e
