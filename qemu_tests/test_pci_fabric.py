"""A QEMU guest's virtio-rdma device on one host, its partner on another,
across the userspace RoCEv2 fabric (docs/virtio-rdma.md "Carriers";
qemu_tests/pci_guest.py; vrdma/lab.py).

Two hosts of a :class:`vrdma.lab.LabCluster` (namespaces joined by a bridge,
each running a real ``vrdma backend --roce-addr`` with a 2 s handshake
timeout, far less than the guest takes to set DRIVER_OK): QEMU 7.2 runs
inside host A's namespace (its NIC a tap there, for the out-of-band
exchange only), the guest program opens
``Context("pci:auto")`` on host A's daemon; the peer, a process guest of host
B's daemon, runs in host A's namespace to reach the guest's tap address. Every
RDMA operation (SEND with immediate, WRITE, READ, FETCH_AND_ADD, CMP_AND_SWAP,
64-byte SEND ping-pongs) crosses the fabric between the two daemons; data is
checked on both sides, and the two ends' GIDs are the two hosts' addresses.
"""
from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from qemu_tests.pci_guest import QEMUS, pci_guest, require_qemu, result_of
from qemu_tests.pci_traffic import peer
from qemu_tests.rxe_guest import TapNetdev

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

SUBNET = "198.51.100"          # the lab hosts: .1 (A, the QEMU guest's) and .2 (B)
TAP_HOST, TAP_GUEST = "203.0.113.1", "203.0.113.2"  # host A's tap and the guest's NIC on it
ITERS = 20
APP = "qemu_tests/pci_traffic.py"


def _gid_ip(gid_hex: str) -> str:
    return str(ipaddress.IPv6Address(bytes.fromhex(gid_hex)).ipv4_mapped)


def _try(fn):
    try:
        return fn()
    except BaseException as e:
        return e


@pytest.mark.parametrize("qemu", QEMUS)
def test_qemu_guest_and_process_guest_on_two_hosts_over_roce(host_root_image, tmp_path, qemu):
    from vrdma import lab

    why = lab.available()
    if why is not None:
        pytest.skip(why)
    from netlab.ns import tap_device

    version = require_qemu(qemu)
    t0 = time.monotonic()
    spec = lab.HostSpec("none", extra=("--handshake-timeout", "2"))
    with lab.LabCluster([spec, spec], tmp_path / "lab", subnet=SUBNET) as c:
        a, b = c.hosts
        tap = tap_device(a.ns, "vrtap3", f"{TAP_HOST}/24")
        guest = pci_guest(host_root_image, a.sock, [APP, "pci:auto", "5000", str(ITERS)],
                          tap=TapNetdev(tap, netns=a.ns.name), tap_ip=f"{TAP_GUEST}/24", qemu=qemu)
        box: dict = {}

        def host_b_peer():
            with a.ns.entered():  # this thread's sockets live in host A's namespace
                box["peer"] = _try(lambda: peer(b.sock, (TAP_GUEST, 5000), ITERS, timeout=150))

        th = threading.Thread(target=host_b_peer, daemon=True)
        th.start()
        try:
            run = guest.run(timeout=170)
        finally:
            th.join(60)
        assert run.returncode == 0, run.output[-4000:]
        assert box["peer"] == {"peer_verified": True}, box["peer"]
        r = result_of(run.output)
        assert r["verified"] == ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"]
        # the guest's device is host A's, its partner host B's: the traffic crossed the fabric
        assert (_gid_ip(r["local_gid"]), _gid_ip(r["remote_gid"])) == (a.ip, b.ip), r
        assert a.proc.alive() and b.proc.alive()  # QEMU's slow start was no handshake timeout
    print(f"\n{version} guest on {a.ip} <-> process guest on {b.ip} over userspace RoCEv2: "
          f"64-byte SEND half RTT {r['send64_half_rtt_us']:.1f} us (TCG, shared machine); "
          f"boot to command {run.timings.get('begin')} s; test {time.monotonic() - t0:.1f} s")
