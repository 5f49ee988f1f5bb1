"""RoCEv2 fabric benchmarks across a veth, each against its raw-UDP floor
measured over the same veth in the same run (issue 4's goals):

* ``send_lat``: 64-byte SEND half round trip (ib_send_lat columns) between a
  guest of a daemon in namespace A and a guest of a daemon in namespace B,
  versus a raw UDP ping-pong of 64-byte datagrams (goal: <= 1.5x);
* ``write_bw``: 64 KiB RDMA WRITE bandwidth at path MTU 4096 (ib_write_bw
  columns), versus a raw one-way stream of 4 KiB UDP datagrams (goal:
  >= 50%), and in absolute terms versus kernel rxe's published loopback
  ib_write_bw of about 828 MB/s at 64 KiB.

Guests are processes of this host talking to their daemon over its unix
socket (the sides of :mod:`bench.perftest`); the daemons run inside the
namespaces with ``--roce-addr``, so every request and response crosses the
veth as RoCEv2 packets.

    python -m bench.fabric_bench [send_lat|write_bw|both] [--iters N] [--json]

Needs root (network namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench import perftest, udp_baseline
from netlab.ns import two_hosts

RXE_LOOPBACK_WRITE_BW_MB = 828.0  # ib_write_bw over rxe loopback, 64 KiB (published figure)
MTU_4096 = 5


CONNECT = dict(path_mtu=MTU_4096, timeout=14, retry_cnt=7, rnr_retry=7)


def _pair(path_server: str, path_client: str, test: str, size: int, iters: int, batch: int) -> dict:
    return perftest.run_pair(path_server, test, size, iters, batch, client_path=path_client,
                             connect_attrs=CONNECT)


def _daemon(ns, ip: str, sock: str, poll_us: float):
    p = ns.popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock, "--roce-addr", ip,
                  "--poll-us", str(poll_us)])
    p.expect("listening", timeout=30)
    return p


def run(tests, *, iters: int = 2000, bw_iters: int = 2000, batch: int = 16,
        poll_us: float = 50.0) -> dict:
    out: dict = {}
    with two_hosts() as lab, tempfile.TemporaryDirectory() as d:
        sa, sb = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
        _daemon(lab.a, lab.ip_a, sa, poll_us)
        _daemon(lab.b, lab.ip_b, sb, poll_us)
        if "send_lat" in tests:
            floor = udp_baseline.latency(lab, size=64, iters=max(iters, 2000))
            ours = _pair(sb, sa, "send_lat", 64, iters, batch)
            out["send_lat"] = {"ours": ours, "udp_floor": floor,
                               "ratio_typical": ours["t_typical"] / floor["t_typical"]}
        if "write_bw" in tests:
            floor = udp_baseline.throughput(lab, size=4096, seconds=1.0)
            ours = _pair(sb, sa, "write_bw", 65536, bw_iters, batch)
            mb = ours["bw_avg_MiB"] * 2**20 / 1e6
            out["write_bw"] = {"ours": ours, "udp_floor": floor, "MB_per_s": mb,
                               "fraction_of_udp": mb / floor["MB_per_s"],
                               "fraction_of_rxe_828": mb / RXE_LOOPBACK_WRITE_BW_MB}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fabric_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("test", nargs="?", default="both", choices=["send_lat", "write_bw", "both"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--bw-iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16, help="WRITEs posted per signaled batch")
    ap.add_argument("--poll-us", type=float, default=50.0, help="daemons' busy-poll window")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.fabric_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    tests = ["send_lat", "write_bw"] if a.test == "both" else [a.test]
    r = run(tests, iters=a.iters, bw_iters=a.bw_iters, batch=a.batch, poll_us=a.poll_us)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    if "send_lat" in r:
        s = r["send_lat"]
        print("# 64 B SEND across veth, two daemons (half round trip, ib_send_lat columns)")
        print(perftest.LAT_HEADER)
        print(perftest._lat_row(s["ours"]))
        print("# raw UDP 64 B ping-pong over the same veth (half round trip)")
        print(perftest._lat_row(s["udp_floor"]))
        print(f"# ratio (typical): {s['ratio_typical']:.2f}x   goal <= 1.5x")
    if "write_bw" in r:
        w = r["write_bw"]
        print("# 64 KiB RDMA WRITE across veth, path MTU 4096 (ib_write_bw columns)")
        print(perftest.BW_HEADER)
        o = w["ours"]
        print(f"{o['bytes']:<7}{o['iterations']:<12}{o['bw_peak_MiB']:<19.2f}{o['bw_avg_MiB']:<22.2f}"
              f"{o['msg_rate_Mpps']:.6f}")
        print(f"# = {w['MB_per_s']:.1f} MB/s; raw UDP 4 KiB stream over the same veth: "
              f"{w['udp_floor']['MB_per_s']:.1f} MB/s -> {w['fraction_of_udp']:.2f} (goal >= 0.5); "
              f"vs rxe loopback 828 MB/s: {w['fraction_of_rxe_828']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
