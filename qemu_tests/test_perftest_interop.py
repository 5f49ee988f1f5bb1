"""Unmodified perftest (Debian 12's perftest 4.5+0.17-1) on kernel rxe, against
``vrdma perftest``, a guest of our back-end daemon on the userspace RoCEv2
fabric.

Topology as in test_rxe_interop.py: a network namespace holds a tap device
(203.0.113.1/24) and the back-end daemon bound to it (``--roce-addr``); the
QEMU guest (Debian's kernel under TCG, rdma_rxe on its virtio-net, rxe0's
GID index 1 the IPv4-mapped RoCEv2 GID) is that tap's other end
(203.0.113.2/24). A boot runs, for each of its tests, the guest's perftest
program as the client of our server, then as the server of our client: one
boot ib_send_lat and ib_write_bw, another ib_read_lat, ib_send_bw,
ib_write_lat and ib_read_bw.

What must hold, each side parsed from its own output: both exit 0; each
side's result rows name the sizes and iteration count run (a write_bw or
read_bw server prints the row the client sent it: our report, through
perftest's report exchange); each side's ``remote address`` (QPN, PSN, and for RDMA tests
RKey and VAddr) is the other's ``local address``, and the GIDs are the two
IPv4-mapped addresses; our ``--check basic`` lines all pass: every SEND
arrived with its length, and a write_bw client's WRITEs covered the window
of our buffer they aim at (perftest's random bytes replaced our canary) and
nothing beyond it. TCG makes the figures meaningless: they are printed, not
judged.
"""
from __future__ import annotations

import re

import pytest

from qemu_tests.interop import GUEST_IP, HOST_IP, backend_in_ns, exchange, sections
from qemu_tests.rxe_guest import RxeGuest, TapNetdev

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

ALL = [1 << i for i in range(1, 24)]  # -a
#: one boot per group: test -> (message size, or ALL for -a; iterations). The default of
#: ib_send_lat is 2 B; 64 KiB WRITEs are 64 packets at MTU 1024
GROUPS: dict[str, dict[str, tuple[int | list[int], int]]] = {
    "send_lat+write_bw": {"send_lat": (2, 100), "write_bw": (65536, 100)},
    "the_others": {"read_lat": (4096, 100), "send_bw": (8192, 100), "write_lat": (300, 100),
                   "read_bw": (16384, 100)},
}
# ib_write_bw -a (every size from 2 B to 8 MiB) both roles passes too, but takes ~100 s under
# TCG: GROUPS["write_bw_sweep"] = {"write_bw": (ALL, 5)} runs it
PERFTEST_OPTS = "-d rxe0 -x 1 -F"

SECTION = re.compile(r"^=== (guest-client|guest-server) (\w+) rc=(\d+)$", re.M)
ADDR = re.compile(r"^ (local|remote) address: LID (\S+) QPN (\S+) PSN (\S+)(?: OUT \S+)?"
                  r"(?: RKey (\S+) VAddr (\S+))?\n GID: (\S+)$", re.M)
LAT_ROW = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                     re.M)
BW_ROW = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


def _args(size: int | list[int], iters: int) -> list[str]:
    return ["-n", str(iters), *(["-a"] if isinstance(size, list) else ["-s", str(size)])]


def _guest_script(runs: dict[str, tuple[int | list[int], int]]) -> str:
    lines = []
    for test, (size, iters) in runs.items():  # the guest's client first: our server waits for it
        opts = " ".join(_args(size, iters))
        lines.append(f"""
i=0
while :; do
  ib_{test} {PERFTEST_OPTS} {opts} {HOST_IP} > /tmp/c.log 2>&1; rc=$?
  grep -q "Couldn't connect\\|Unable to init the socket" /tmp/c.log || break
  i=$((i+1)); [ $i -ge 150 ] && break; sleep 0.2
done
echo "=== guest-client {test} rc=$rc"; cat /tmp/c.log""")
    for test, (size, iters) in runs.items():
        opts = " ".join(_args(size, iters))
        lines.append(f"""
ib_{test} {PERFTEST_OPTS} {opts} > /tmp/s.log 2>&1; rc=$?
echo "=== guest-server {test} rc=$rc"; cat /tmp/s.log""")
    return "\n".join(lines) + "\n"


def _addresses(text: str) -> dict[str, tuple]:
    return {m[0]: m[1:] for m in ADDR.findall(text)}


def _rows(test: str, text: str) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for r in (BW_ROW if test.endswith("_bw") else LAT_ROW).findall(text)]


def _expected_rows(test: str, client: bool, size: int | list[int], iters: int) -> list[tuple[int, int]]:
    """The rows a side prints: a client one per size; an ib_read_lat server none; a
    write/read bw server the client's last report; a send_bw server one per size."""
    sizes = size if isinstance(size, list) else [size]
    if client or test in ("send_lat", "write_lat", "send_bw"):
        return [(s, iters) for s in sizes]
    return [] if test == "read_lat" else [(sizes[-1], iters)]


@pytest.mark.parametrize("group", list(GROUPS))
def test_unmodified_perftest_on_kernel_rxe_against_vrdma_perftest(image, tap_netns, tmp_path, group):
    runs = GROUPS[group]
    png = tmp_path / "sweep.png"
    ns, tap = tap_netns(f"{HOST_IP}/24", "vrtap2")
    guest = RxeGuest(cmd=_guest_script(runs), ip=f"{GUEST_IP}/24", tap=TapNetdev(tap, netns=ns), image=image)
    sock = str(tmp_path / "rdma.sock")
    servers = {test: ["perftest", test, "-d", sock, "-x", "0", *_args(size, iters), "--check", "basic",
                      "--timeout", "120"] for test, (size, iters) in runs.items()}
    clients = {test: ["perftest", test, "-d", sock, "-x", "0", *_args(size, iters),
                      *(["--plot", str(png)] if isinstance(size, list) else []),
                      "--check", "basic", "--timeout", "120", GUEST_IP]
               for test, (size, iters) in runs.items()}
    with backend_in_ns(ns, sock):
        run, ours, report = exchange(guest, ns, servers, clients, guest_timeout=600, run_timeout=180,
                                     retry_for=120, join=200)
        print(report)  # the figures (TCG: reported, not judged)
        guest_sections = sections(SECTION, run.output)
        for test, (size, iters) in runs.items():
            for guest_role, our_role in (("guest-client", "server"), ("guest-server", "client")):
                rc, text = guest_sections.get((guest_role, test), (None, ""))
                mine = ours.get((our_role, test))
                assert rc == 0 and mine is not None and mine.returncode == 0, report
                assert _rows(test, text) == _expected_rows(test, guest_role == "guest-client", size, iters), report
                assert _rows(test, mine.stdout) == _expected_rows(test, our_role == "client", size, iters), report
                theirs, us = _addresses(text), _addresses(mine.stdout)
                assert theirs["remote"] == us["local"] and us["remote"] == theirs["local"], report
                assert us["local"][-1] == "00:00:00:00:00:00:00:00:00:00:255:255:203:00:113:01", report
                assert theirs["local"][-1] == "00:00:00:00:00:00:00:00:00:00:255:255:203:00:113:02", report
                checks = re.findall(r"^# check (\w+): (.*)$", mine.stdout, re.M)
                assert all(ok == "ok" for ok, _ in checks), report
                if test.startswith("send") and (our_role == "server" or test == "send_lat"):
                    assert any(f"{iters} messages received, 0 of another length" in c for _, c in checks), report
                if test == "write_bw" and our_role == "server":
                    assert any("of the first message's" in c for _, c in checks), report
        if any(isinstance(size, list) for size, _ in runs.values()):  # our -a client's plot
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", report
