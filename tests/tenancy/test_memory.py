"""Daemon memory returns to its plateau: cycles of (3 guests connect, fill
their caps, close) against a real ``vrdma backend`` process. After a warm-up
cycle, VmRSS may not grow from cycle to cycle by more than TOLERANCE in
total over the measured cycles (a leak check, not a timing one: one
cycle's guests hold several MB, so leaking even a fraction of their objects
fails it); the daemon's fds come back to their baseline exactly and no
guest memory stays mapped."""
import os
import time

from bench.tenant_hog import Hog
from vhost_user.testing import DaemonProcess

GUESTS = 3
WARMUP = 2          # cycles before the plateau (allocator arenas, caches reach their size)
CYCLES = 6          # so the plateau is checked over 4 cycles
TOLERANCE = 1 << 20  # bytes of VmRSS growth allowed over cycles WARMUP+1..CYCLES
CAPS = ["--limit", "max_qp=256", "--limit", "max_cq=256", "--limit", "max_mr=512", "--limit", "max_pd=64"]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _guest_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:" in line or "/dev/hugepages" in line for line in f)


def _settle(pid: int, fds: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (_fds(pid) != fds or _guest_maps(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_rss_fds_and_mappings_return_to_baseline_over_cycles():
    with DaemonProcess(*CAPS) as d:
        pid = d.proc.pid
        Hog(d.path, mem_size=4 << 20).close()  # the first guest's imports and one-time setup
        time.sleep(0.2)
        fds0 = _fds(pid)
        _settle(pid, fds0)
        rss, peak = [], []
        for cycle in range(CYCLES):
            hogs = [Hog(d.path, mem_size=4 << 20) for _ in range(GUESTS)]
            for h in hogs:
                f = h.fill()
                assert (len(f.pds), len(f.cqs), len(f.mrs), len(f.qps)) == (64, 256, 512, 256)
            peak.append(_rss(pid))
            for h in hogs:
                h.close()
            _settle(pid, fds0)
            assert _fds(pid) == fds0, f"cycle {cycle}: {_fds(pid)} fds, baseline {fds0}"
            assert _guest_maps(pid) == 0, f"cycle {cycle}: guest memory still mapped"
            rss.append(_rss(pid))
        assert d.proc.poll() is None
    growth = rss[-1] - rss[WARMUP]
    print(f"VmRSS after each cycle (KiB): {[r >> 10 for r in rss]}; with guests filled: "
          f"{[p >> 10 for p in peak]}; growth after warm-up {growth >> 10} KiB")
    assert growth <= TOLERANCE, f"VmRSS grew {growth} bytes over cycles {WARMUP + 1}..{CYCLES}: {rss}"
    assert max(rss[WARMUP:]) - rss[WARMUP] <= TOLERANCE
