"""Wire interop with the kernel's own RoCEv2 (Debian's kernel under QEMU TCG,
rdma_rxe on its virtio-net), against ``vrdma rc-pingpong``, a guest of our
back-end daemon whose QP runs on the userspace RoCEv2 fabric. The guest side
is either

* an unmodified ``ibv_rc_pingpong`` on rxe0, or
* ``vrdma rc-pingpong``, a guest of a second daemon *inside the VM* whose
  fabric is the verbs transport on rxe0 (``--verbs-device rxe0``: guest
  memory registered with kernel rxe under the guest's addresses, the QP an
  rxe QP). The VM shares the host's root read-only (``host_root``) to run it.

Topology: a network namespace holds a tap device (203.0.113.1/24) and the
back-end daemon bound to it; the QEMU guest's virtio-net NIC is that tap
(203.0.113.2/24, rxe0 on eth0). One boot runs the guest side first as the
client of our server, then as the server of our client, for message sizes
below, at, and above the path MTU: 1024 (rxe on a 1500-byte link), and
4096 with ibv_rc_pingpong, both links at MTU 9000 (rxe follows its netdev's
MTU change).
"""
from __future__ import annotations

import re
import sys

import pytest

from qemu_tests.interop import GUEST_IP, HOST_IP, backend_in_ns, exchange, sections
from qemu_tests.rxe_guest import RxeGuest, TapNetdev

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

SIZES = {1024: (1, 1024, 4096, 8192), 4096: (1, 4096, 16384, 65536)}
LINK_MTU = {1024: None, 4096: 9000}
ITERS = 50
ITERS_RE = re.compile(r"^(\d+) iters in [\d.]+ seconds = [\d.]+ usec/iter$", re.M)
BYTES_RE = re.compile(r"^(\d+) bytes in [\d.]+ seconds = [\d.]+ Mbit/sec$", re.M)
ADDR_RE = re.compile(r"^  (local|remote) address: +LID 0x([0-9a-f]{4}), QPN 0x([0-9a-f]{6}), "
                     r"PSN 0x([0-9a-f]{6}), GID (\S+)$", re.M)


IBV = "ibv_rc_pingpong -d rxe0 -g 1"
VERBS_SOCK = "/tmp/vrdma-verbs.sock"
# a daemon in the VM on the verbs fabric (rxe0), and our rc-pingpong as its guest
VERBS_SETUP = f"""
{sys.executable} -m vrdma backend -s {VERBS_SOCK} --verbs-device rxe0 > /tmp/d.log 2>&1 &
i=0; while [ ! -S {VERBS_SOCK} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -S {VERBS_SOCK} ] || {{ echo "verbs daemon did not start"; cat /tmp/d.log; exit 1; }}
"""
VERBS_TOOL = f"{sys.executable} -m vrdma rc-pingpong --backend {VERBS_SOCK} -g 0 --timeout 90"


def _link_setup(link_mtu: int | None) -> str:
    """Raise eth0's MTU (rxe0's port MTU follows) and wait until rxe0 reports it."""
    if link_mtu is None:
        return ""
    return f"""
ip link set eth0 mtu {link_mtu}
i=0; until ibv_devinfo -d rxe0 -v | grep -q "active_mtu:.*4096"; do
  i=$((i+1)); [ $i -ge 50 ] && {{ echo "rxe0 MTU did not follow"; ibv_devinfo -d rxe0 -v; exit 1; }}
  sleep 0.1
done
"""


def _guest_script(tool: str = IBV, setup: str = "", path_mtu: int = 1024) -> str:
    sizes = " ".join(map(str, SIZES[path_mtu]))
    tool = f"{tool} -m {path_mtu}"
    return _link_setup(LINK_MTU[path_mtu]) + setup + f"""
for s in {sizes}; do
  i=0
  while :; do
    {tool} -n {ITERS} -s $s {HOST_IP} > /tmp/c.log 2>&1; rc=$?
    grep -q "Couldn't connect" /tmp/c.log || break
    i=$((i+1)); [ $i -ge 100 ] && break; sleep 0.2
  done
  echo "=== guest-client size=$s rc=$rc"; cat /tmp/c.log
done
for s in {sizes}; do
  {tool} -n {ITERS} -s $s > /tmp/s.log 2>&1; rc=$?
  echo "=== guest-server size=$s rc=$rc"; cat /tmp/s.log
done
"""


SECTION = re.compile(r"^=== (guest-client|guest-server) size=(\d+) rc=(\d+)$", re.M)


@pytest.mark.parametrize("guest_side,path_mtu", [("ibv_rc_pingpong", 1024), ("vrdma-on-verbs", 1024),
                                                ("ibv_rc_pingpong", 4096)])
def test_kernel_rxe_guest_side_against_vrdma_on_userspace_roce(image, tap_netns, tmp_path,
                                                                guest_side, path_mtu):
    ns, tap = tap_netns(f"{HOST_IP}/24", "vrtap1", mtu=LINK_MTU[path_mtu])
    sizes = SIZES[path_mtu]
    if guest_side == "ibv_rc_pingpong":
        guest = RxeGuest(cmd=_guest_script(path_mtu=path_mtu), ip=f"{GUEST_IP}/24",
                         tap=TapNetdev(tap, netns=ns), image=image)
    else:
        guest = RxeGuest(cmd=_guest_script(VERBS_TOOL, VERBS_SETUP, path_mtu), ip=f"{GUEST_IP}/24",
                         tap=TapNetdev(tap, netns=ns), image=image, host_root=True,
                         memory_mib=1024)
    sock = str(tmp_path / "rdma.sock")
    common = ["rc-pingpong", "--backend", sock, "-g", "0", "-n", str(ITERS), "-m", str(path_mtu),
              "--timeout", "90"]
    with backend_in_ns(ns, sock):
        run, ours, report = exchange(guest, ns, {s: [*common, "-s", str(s)] for s in sizes},
                                     {s: [*common, "-s", str(s), GUEST_IP] for s in sizes},
                                     guest_timeout=300, run_timeout=120, retry_for=90, join=150)
        guest_sections = sections(SECTION, run.output, int)
        for s in sizes:
            for guest_role, our_role in (("guest-client", "server"), ("guest-server", "client")):
                rc, text = guest_sections.get((guest_role, s), (None, ""))
                mine = ours.get((our_role, s))
                assert rc == 0 and mine is not None and mine.returncode == 0, report
                assert ITERS_RE.search(text).group(1) == str(ITERS), report
                assert int(BYTES_RE.search(text).group(1)) == 2 * s * ITERS, report
                assert ITERS_RE.search(mine.stdout).group(1) == str(ITERS), report
                # each side saw the other's real QPN/PSN/GID: ours as the guest's remote
                theirs = {m[0]: m[1:] for m in ADDR_RE.findall(text)}
                us = {m[0]: m[1:] for m in ADDR_RE.findall(mine.stdout)}
                assert theirs["remote"] == us["local"] and us["remote"] == theirs["local"], report
                assert us["local"][3] == f"::ffff:{HOST_IP}", report
                assert theirs["local"][3] == f"::ffff:{GUEST_IP}", report
