"""``vrdma rc-pingpong -d pci:auto`` in a QEMU guest (guest_lib's virtio-pci
driver, our daemon on the userspace RoCEv2 fabric) against an unmodified
``ibv_rc_pingpong`` on kernel rxe in a second QEMU guest, both roles.

Topology (as qemu_tests/test_rxe_interop.py, plus a bridge): one network
namespace holds a bridge (203.0.113.1/24, the daemon's ``--roce-addr``) and
two taps on it: the kernel-rxe guest's NIC (203.0.113.2, rxe0 on eth0) and
the PCI guest's (203.0.113.3, only for rc-pingpong's TCP exchange). Both
QEMUs run in that namespace; the daemon's handshake timeout is 2 s, far
less than the PCI guest takes to load its driver. One boot of each: the
PCI guest serves first (the rxe guest's client retries until it listens),
then connects as the client to the rxe guest's server.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import threading
import time

import pytest

from qemu_tests.pci_guest import QEMUS, pci_guest, phase_outputs, require_qemu
from qemu_tests.rxe_guest import RxeGuest, TapNetdev

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

BRIDGE_IP, RXE_IP, PCI_IP = "203.0.113.1", "203.0.113.2", "203.0.113.3"
ITERS, SIZE = 50, 4096
IBV = f"ibv_rc_pingpong -d rxe0 -g 1 -n {ITERS} -s {SIZE} -m 1024"
OURS = ["-m", "vrdma", "rc-pingpong", "-d", "pci:auto", "-g", "0", "-n", str(ITERS), "-s", str(SIZE),
        "-m", "1024", "--timeout", "90"]
ITERS_RE = re.compile(r"^(\d+) iters in [\d.]+ seconds = [\d.]+ usec/iter$", re.MULTILINE)
BYTES_RE = re.compile(r"^(\d+) bytes in [\d.]+ seconds = [\d.]+ Mbit/sec$", re.MULTILINE)
ADDR_RE = re.compile(r"^  (local|remote) address: +LID 0x([0-9a-f]{4}), QPN 0x([0-9a-f]{6}), "
                     r"PSN 0x([0-9a-f]{6}), GID (\S+)$", re.MULTILINE)

RXE_SCRIPT = f"""
i=0
while :; do
  {IBV} {PCI_IP} > /tmp/c.log 2>&1; rc=$?
  grep -q "Couldn't connect" /tmp/c.log || break
  i=$((i+1)); [ $i -ge 900 ] && break; sleep 0.2
done
echo "=== rxe-client rc=$rc"; cat /tmp/c.log
{IBV} > /tmp/s.log 2>&1; rc=$?
echo "=== rxe-server rc=$rc"; cat /tmp/s.log
"""


def _rxe_sections(text: str) -> dict[str, tuple[int, str]]:
    parts = re.split(r"^=== (rxe-client|rxe-server) rc=(\d+)$", text, flags=re.MULTILINE)
    return {parts[i]: (int(parts[i + 1]), parts[i + 2]) for i in range(1, len(parts) - 2, 3)}


def _try(fn):
    try:
        return fn()
    except BaseException as e:
        return e


def _client_with_retry() -> str:
    """Our client, as a shell line: retried while the rxe guest's server is not listening yet."""
    cmd = " ".join(map(shlex.quote, [sys.executable, *OURS, RXE_IP]))
    return (f"i=0; until {cmd}; do i=$((i+1)); [ $i -ge 5 ] && exit 1; "
            f"echo RETRY; sleep 1; done")


@pytest.mark.parametrize("qemu", QEMUS)
def test_vrdma_rc_pingpong_in_a_pci_guest_against_ibv_rc_pingpong_on_kernel_rxe(image, host_root_image,
                                                                                   tmp_path, qemu):
    if os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    from netlab.ns import Namespace, tap_device

    version = require_qemu(qemu)
    t0 = time.monotonic()
    sock = str(tmp_path / "rdma.sock")
    with Namespace() as ns:
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        ns.ip("link", "set", "br0", "up")
        for tap in ("vrtapR", "vrtapP"):
            tap_device(ns, tap)
            ns.ip("link", "set", tap, "master", "br0")
        daemon = ns.popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock,
                           "--roce-addr", BRIDGE_IP, "--handshake-timeout", "2"])
        daemon.expect("listening", timeout=30)
        rxe = RxeGuest(cmd=RXE_SCRIPT, ip=f"{RXE_IP}/24", image=image,
                       tap=TapNetdev("vrtapR", netns=ns.name, mac="52:54:00:12:34:02"))
        pci = pci_guest(host_root_image, sock, OURS, then=[_client_with_retry()],
                        tap=TapNetdev("vrtapP", netns=ns.name, mac="52:54:00:12:34:03"),
                        tap_ip=f"{PCI_IP}/24", qemu=qemu)
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("rxe", _try(lambda: rxe.run(timeout=200))),
                              daemon=True)
        th.start()
        run = _try(lambda: pci.run(timeout=200))
        th.join(210)
        assert daemon.alive()  # the PCI guest's slow start was no handshake timeout
        daemon.stop()
    rr = box["rxe"]
    assert not isinstance(run, BaseException), run
    assert not isinstance(rr, BaseException), rr
    report = f"--- pci guest ---\n{run.output[-4000:]}\n--- rxe guest ---\n{rr.output[-4000:]}"
    assert run.returncode == 0 and rr.returncode == 0, report
    ours = phase_outputs(run.output)
    theirs = _rxe_sections(rr.output)
    assert len(ours) == 2 and set(theirs) == {"rxe-client", "rxe-server"}, report
    for mine, (rc, text) in ((ours[0], theirs["rxe-client"]), (ours[1], theirs["rxe-server"])):
        assert rc == 0, report
        for out in (mine, text):
            assert ITERS_RE.search(out).group(1) == str(ITERS), report
            assert int(BYTES_RE.search(out).group(1)) == 2 * SIZE * ITERS, report
        # each side saw the other's real QPN/PSN/GID
        t = {m[0]: m[1:] for m in ADDR_RE.findall(text)}
        u = {m[0]: m[1:] for m in ADDR_RE.findall(mine)}
        assert t["remote"] == u["local"] and u["remote"] == t["local"], report
        assert u["local"][3] == f"::ffff:{BRIDGE_IP}" and t["local"][3] == f"::ffff:{RXE_IP}", report
    print(f"\nvrdma rc-pingpong -d pci:auto ({version} guest; the rxe guest on QEMU 7.2) <-> "
          f"ibv_rc_pingpong on kernel rxe, both roles, "
          f"{ITERS} x {SIZE} B: ours {[ITERS_RE.search(o).group(0) for o in ours]}; "
          f"test {time.monotonic() - t0:.1f} s (TCG, shared machine)")

