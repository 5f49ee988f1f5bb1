"""perftest-style tools over the virtio-rdma device: send_lat, write_bw, read_lat.

Like ib_send_lat / ib_write_bw / ib_read_lat, two processes (a server and a
client guest, each with its own Context on the back-end) connect RC QPs out
of band and poll their CQs. Each run also measures, in the same run, the
floor it is compared with: a two-process eventfd ping-pong for latency, a
plain memcpy of the same sizes for bandwidth, and prints the ratio. The
guests, the floors and the report are the product's :mod:`vrdma.perftest`
(what ``vrdma demo`` runs); this module starts the daemon, sets the vCPUs'
state and is the command line.

    python -m bench.perftest send_lat [--size 64] [--iters N] [--poll-us 200] [--json]
    python -m bench.perftest write_bw [--size 1048576] [--batch 16]   # --batch: perftest's -l
    python -m bench.perftest read_lat

Polling mode (``--poll-us`` > 0), the way perftest runs: the daemon
busy-polls (doorbell records, no kicks) and both guests spin on their CQs.
This VM has two vCPUs, so the daemon is pinned to CPU 0 and the two guests
share CPU 1, yielding (sched_yield) between empty polls; every CPU is busy
and none halts. Without polling, and while the floors are measured, a
SCHED_IDLE spinner per CPU keeps idle vCPUs out of halt (an idle vCPU of
this Firecracker VM takes tens of microseconds to wake). The state is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from vhost_user.testing import DaemonProcess
from vrdma.perftest import eventfd_floor, memcpy_floor, print_rows, run_pair


def pin_threads(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` to ``cpu``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


@contextlib.contextmanager
def idle_spinners(cpus):
    """A SCHED_IDLE busy loop pinned to each CPU in ``cpus``: the vCPUs never
    halt, and any real task preempts the spinner at once."""
    pids = []
    try:
        for cpu in cpus:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    os.sched_setaffinity(0, {cpu})
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                    while True:
                        pass
                finally:
                    os._exit(0)
            pids.append(pid)
        yield list(cpus)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def run(test: str, sizes, iters: int, batch: int = 16, poll_us: float = 0.0) -> list[dict]:
    rows = []
    cpus = sorted(os.sched_getaffinity(0))
    polling = poll_us > 0 and len(cpus) >= 2
    with DaemonProcess("--poll-us", str(poll_us)) as d:
        if polling:
            os.sched_setaffinity(d.proc.pid, {cpus[0]})
        for size in sizes:
            if polling:  # daemon spins on cpus[0], the guests share cpus[1]
                r = run_pair(d.path, test, size, iters, batch, guest_cpu=cpus[1])
                r["vcpu_state"] = f"polling: daemon on cpu {cpus[0]}, guests on cpu {cpus[1]} (sched_yield)"
            else:
                with idle_spinners(cpus):
                    r = run_pair(d.path, test, size, iters, batch)
                r["vcpu_state"] = f"SCHED_IDLE spinners on cpus {cpus}"
            with idle_spinners(cpus):
                if test == "write_bw":
                    floor = memcpy_floor(size)
                    r["floor_memcpy_MiB"] = floor["bw_avg_MiB"]
                    r["ratio_vs_memcpy"] = r["bw_avg_MiB"] / floor["bw_avg_MiB"]
                else:
                    floor = eventfd_floor(max(2000, iters))
                    key = "floor_eventfd_half_rtt_us" if test == "send_lat" else "floor_eventfd_rtt_us"
                    r[key] = floor["t_typical"] if test == "send_lat" else 2 * floor["t_typical"]
                    r["ratio_vs_floor"] = r["t_typical"] / r[key]
            r["floor_vcpu_state"] = f"SCHED_IDLE spinners on cpus {cpus}"
            r["test"] = test
            r["batch"] = batch
            r["poll_us"] = poll_us
            rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("test", choices=["send_lat", "write_bw", "read_lat"])
    p.add_argument("--size", "-s", type=int, action="append", help="message size (repeatable)")
    p.add_argument("--iters", "-n", type=int, default=2000)
    p.add_argument("--batch", "--post-list", "-l", type=int, default=16, dest="batch",
                   help="write_bw: WRs per post list (one doorbell), like perftest's -l")
    p.add_argument("--poll-us", type=float, default=0.0, help="daemon busy-poll window")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    sizes = a.size or ([1 << 20] if a.test == "write_bw" else [64])
    rows = run(a.test, sizes, a.iters, a.batch, a.poll_us)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(a.test, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
