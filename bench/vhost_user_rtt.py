"""Request round trip through a virtqueue, against its floor, in one run.

Three measurements, each a blocking request/response between two processes:

* floor: a two-process eventfd ping-pong (write, the other side wakes,
  writes back, we wake): the least any kick/call round trip can cost;
* ours: a virtio-blk request from our front-end through a split virtqueue to
  our back-end daemon (a separate process, uvloop) and back;
* qsd: the same request to qemu-storage-daemon's vhost-user-blk export.

Usage: python -m bench.vhost_user_rtt [--iterations N] [--request get-id|read-512] [--spin-us US] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from vhost_user.blk_driver import BlkDriver
from vhost_user.testing import DaemonProcess
from vrdma.perftest import eventfd_pingpong, rtt_stats


def blk_roundtrip(sock: str, iterations: int, request: str, spin_us: float = 0.0) -> dict:
    with BlkDriver.connect(sock, queue_size=256, spin_us=spin_us) as blk:
        if request == "get-id":
            op = blk.get_id
        else:
            op = lambda: blk.read(0, 1)
        clock = time.perf_counter_ns
        samples = []
        for i in range(iterations + 100):
            t0 = clock()
            op()
            if i >= 100:
                samples.append(clock() - t0)
    return rtt_stats(samples)


def run(iterations: int = 20000, request: str = "get-id", with_qsd: bool = True, spin_us: float = 50.0) -> dict:
    """Blocking mode: nobody spins. Polling mode: the front-end spins up to
    ``spin_us`` on the used ring and the daemon polls its ring as long."""
    results = {"request": request, "spin_us": spin_us}
    results["floor_eventfd_pingpong"] = eventfd_pingpong(iterations)
    with tempfile.TemporaryDirectory() as d:
        for mode, poll in (("blocking", 0.0), ("polling", spin_us)):
            with DaemonProcess("--device", "blk", "--size", "8M", "--poll-us", str(poll)) as daemon:
                results[f"vrdma_{mode}"] = blk_roundtrip(daemon.path, iterations, request, spin_us=poll)
        if with_qsd and shutil.which("qemu-storage-daemon"):
            from qemu_tests.launch import QemuStorageDaemon

            qsock = os.path.join(d, "qsd.sock")
            with QemuStorageDaemon(os.path.join(d, "disk.raw"), qsock, create_size=8 << 20,
                                   workdir=os.path.join(d, "qsd")):
                results["qsd_blocking"] = blk_roundtrip(qsock, iterations, request)
                results["qsd_client_spin"] = blk_roundtrip(qsock, iterations, request, spin_us=spin_us)
    floor = results["floor_eventfd_pingpong"]["t_typical_us"]
    for key in list(results):
        if isinstance(results[key], dict) and key != "floor_eventfd_pingpong":
            results[f"ratio_{key}_vs_floor"] = results[key]["t_typical_us"] / floor
    if "qsd_blocking" in results:
        results["ratio_vrdma_vs_qsd_blocking"] = (results["vrdma_blocking"]["t_typical_us"]
                                                  / results["qsd_blocking"]["t_typical_us"])
        results["ratio_vrdma_vs_qsd_spin"] = (results["vrdma_polling"]["t_typical_us"]
                                              / results["qsd_client_spin"]["t_typical_us"])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", "-n", type=int, default=20000)
    p.add_argument("--request", choices=["get-id", "read-512"], default="get-id")
    p.add_argument("--no-qsd", action="store_true")
    p.add_argument("--spin-us", type=float, default=50.0, help="polling window of the polling mode")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a.iterations, a.request, not a.no_qsd, a.spin_us)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"# request round trip ({a.request}), {a.iterations} iterations, latencies in usec")
    print(f"{'path':<26}{'t_min':>9}{'t_typical':>11}{'t_avg':>9}{'t_stdev':>9}{'99%':>9}{'99.9%':>9}")
    for key in ("floor_eventfd_pingpong", "vrdma_blocking", "vrdma_polling", "qsd_blocking", "qsd_client_spin"):
        if key in r:
            s = r[key]
            print(f"{key:<26}{s['t_min_us']:9.2f}{s['t_typical_us']:11.2f}{s['t_avg_us']:9.2f}"
                  f"{s['t_stdev_us']:9.2f}{s['p99_us']:9.2f}{s['p999_us']:9.2f}")
    for k, v in r.items():
        if k.startswith("ratio_"):
            print(f"{k}: {v:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
