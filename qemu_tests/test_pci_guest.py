"""QEMU 7.2 guests drive the virtio-rdma device with guest_lib's userspace
virtio-pci driver, through the vhost-user-blk carrier (docs/virtio-rdma.md
"Carriers"; qemu_tests/pci_guest.py).

* A guest program (``Context("pci:auto")``, found by the config magic behind
  PCI device ID 0x1042) and a process guest on the host, on one real daemon
  (``vrdma backend``): SEND with immediate, RDMA WRITE, READ, both atomics,
  data checked on both sides; then 64-byte SEND ping-pongs, and the same
  program as a process guest for the latency baseline (printed: TCG, no goal).
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
from qemu_tests.pci_guest import free_port as _free_port, pci_guest, result_of as _result, with_peer
from qemu_tests.pci_traffic import peer
from qemu_tests.rxe_guest import REPO_ROOT

pytestmark = pytest.mark.qemu

APP = "qemu_tests/pci_traffic.py"


@pytest.fixture
def daemon():
    from vhost_user.testing import DaemonProcess

    # QEMU connects when it starts; the rings start once the guest's program
    # sets DRIVER_OK, many seconds later under TCG: no handshake timeout
    with DaemonProcess("--handshake-timeout", "0") as d:
        yield d


def test_pci_guest_does_every_verb_with_a_process_guest(host_root_image, daemon):
    from bench.machine import header

    iters = 50  # more in bench/pci_guest_latency.py
    port = _free_port()
    guest = pci_guest(host_root_image, daemon.path, [APP, "pci:auto", "5000", str(iters)], host_port=port)
    run, peer_res = with_peer(daemon.path, port, iters, lambda: guest.run(timeout=150))
    assert run.returncode == 0, run.output[-4000:]
    r = _result(run.output)
    assert peer_res == {"peer_verified": True}
    assert r["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"]
    assert r["second_driver"].startswith("errno 16: "), r["second_driver"]  # EBUSY: one driver per function
    big = r["big_mr"]  # MRs past one huge page: one chunk inside a run of adjacent pages, or refused
    assert big[str(64 << 20)].startswith("refused") and "longest run" in big[str(64 << 20)], big
    assert big[str(5 << 20)] == ("registered" if max(big["runs"]) >= 4 else big[str(5 << 20)]), big
    c = r["counters"]
    # the driver slept on INTx through uio for control answers, and released all it held
    assert c["interrupts"] > 0 and c["notifies"] > 0 and c["bars_mapped"] >= 1, c
    done = r["closed"]
    assert done["bars_unmapped"] == done["bars_mapped"] and done["fds_closed"] == done["fds_opened"], done
    assert done["hugepages_freed"] == done["hugepages"], done
    # the same program as a process guest on the same daemon: the baseline
    port2 = _free_port()

    def local():
        p = subprocess.run([sys.executable, APP, daemon.path, str(port2), str(iters)], cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONPATH": REPO_ROOT}, capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        return _result(p.stdout)

    base, _ = with_peer(daemon.path, port2, iters, local)
    print(f"\n64-byte SEND latency (half round trip, median of {iters}): QEMU 7.2 TCG guest over "
          f"virtio-pci {r['send64_half_rtt_us']:.1f} us; same program as a process guest "
          f"{base['send64_half_rtt_us']:.1f} us; host {header()} (shared machine); "
          f"guest boot to command {run.timings.get('begin')} s; huge-page runs {big['runs']}, "
          f"5 MiB MR {big[str(5 << 20)]}")


def test_two_qemu_guests_on_one_daemon(host_root_image, daemon):
    """Both sides in QEMU guests: the second reaches the first's exchange port
    through its own user network (the host's loopback is 192.0.2.2 there)."""
    port = _free_port()
    a = pci_guest(host_root_image, daemon.path, [APP, "pci:auto", "5000", "20"], host_port=port)
    b = pci_guest(host_root_image, daemon.path, [APP, "peer", "pci:auto", "192.0.2.2", str(port), "20"])
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


def test_vrdma_rc_pingpong_runs_unchanged_in_the_guest(host_root_image, daemon):
    """``vrdma rc-pingpong -d pci:auto -e`` (sleeping on CQ events, so on
    INTx through uio) as the server in the guest, the same command with the
    socket path as the client on the host."""
    port = _free_port()
    n = "50"
    g = pci_guest(host_root_image, daemon.path,
                  ["-m", "vrdma", "rc-pingpong", "-d", "pci:auto", "-p", "5000", "-n", n, "-e",
                   "-c", "--timeout", "90"], host_port=port)

    def client():
        deadline = time.monotonic() + 120
        while True:  # the user network accepts before the guest listens: retry
            p = subprocess.run([sys.executable, "-m", "vrdma", "rc-pingpong", "--backend", daemon.path,
                                "-p", str(port), "-n", n, "-c", "--timeout", "30", "127.0.0.1"],
                               cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                               capture_output=True, text=True, timeout=120, check=False)
            if p.returncode == 0 or time.monotonic() > deadline:
                return p
            time.sleep(1)

    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("c", _try(client)), daemon=True)
    th.start()
    run = g.run(timeout=150)
    th.join(130)
    c = box["c"]
    assert run.returncode == 0, run.output[-3000:]
    assert not isinstance(c, BaseException) and c.returncode == 0, c
    assert f"{n} iters in" in run.output and f"{n} iters in" in c.stdout, (run.output, c.stdout)


def _rdma_thread_daemon(path: str):
    from fabric.local import LocalFabric
    from vhost_user.tenancy import TenantPolicy
    from vhost_user.testing import BackendThread
    from virtio_rdma.device import RdmaDevice

    fabric = LocalFabric()
    return BackendThread(path, lambda info: RdmaDevice(fabric), policy=TenantPolicy(handshake_timeout=0))


def _state(server):
    return {"connections": len(server.connections), "closed": server.metrics.closed,
            "protocol_errors": server.metrics.protocol_errors, "accepted": server.metrics.accepted}


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


def test_guest_with_garbage_rings_is_dropped_alone(host_root_image, tmp_path):
    from vhost_user.testing import open_fds
    from virtio.memory import proc_maps_count

    path = str(tmp_path / "rdma.sock")
    with _rdma_thread_daemon(path) as d:
        fds, maps = open_fds(), proc_maps_count("memfd:")
        guest = pci_guest(host_root_image, path, [APP, "garbage", "pci:auto"], hugepages=8)
        run = guest.run(timeout=120)
        assert run.returncode == 0, run.output[-4000:]
        r = _result(run.output)
        assert r["answered"] == "WaitTimeout", r  # never answered: the daemon dropped the guest
        assert r["counters"]["polls"] > 0 and not r["counters"].get("interrupts"), r  # the poll-only wait
        assert d.wait_for(lambda s: _state(s)["connections"] == 0, 10)
        st = d.call(_state, d.server)
        assert st["protocol_errors"] >= 1 and st["closed"] == st["accepted"] == 1, st
        _process_guest_works(path)
        assert d.wait_for(lambda s: not s.connections, 10)
        assert open_fds() == fds and proc_maps_count("memfd:") == maps


def test_qemu_killed_mid_traffic_releases_everything(host_root_image, tmp_path):
    from vhost_user.testing import open_fds
    from virtio.memory import proc_maps_count

    path = str(tmp_path / "rdma.sock")
    with _rdma_thread_daemon(path) as d:
        fds, maps = open_fds(), proc_maps_count("memfd:")
        port = _free_port()
        guest = pci_guest(host_root_image, path, [APP, "pci:auto", "5000", "100000"], host_port=port)
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
        assert st["closed"] == st["accepted"] == 2, st
        _process_guest_works(path)
        assert d.wait_for(lambda s: not s.connections, 10)
        assert open_fds() == fds and proc_maps_count("memfd:") == maps


def _try(fn):
    try:
        return fn()
    except BaseException as e:
        return e
