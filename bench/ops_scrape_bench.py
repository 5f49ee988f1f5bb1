"""What a Prometheus scrape and an admin request cost a daemon, and its guests.

A real ``vrdma backend --metrics-addr --admin-socket`` with G connected guests
(RC endpoint pairs on its socket, G = 0, 8, 32). Interleaved, in the same run:
an admin ``health`` round trip (the baseline: one loop callback, tiny answer),
an admin ``status`` (what ``vrdma top`` asks each refresh), and an HTTP scrape of
/metrics; then one guest pair's 64 B RDMA WRITE latency with no scraper and
with a scraper hammering /metrics back to back (the loop time a scrape takes
from guests). Prints medians and p99s, the exposition's size and series count.

    PYTHONPATH=$PWD python -m bench.ops_scrape_bench [--rounds 60]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench.machine import header


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _row(name: str, xs: list[float]) -> str:
    return f"{name:<34} median {statistics.median(xs) * 1e3:8.3f} ms   p99 {_pct(xs, 0.99) * 1e3:8.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--guests", default="0,8,32")
    args = ap.parse_args()
    from guest_lib import SGE
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from guest_lib.wr import SendWR
    from verbs import SendFlags, WrOpcode
    from vrdma.ops.admin import AdminClient

    print(header())
    print("# the machine is shared with other work: figures are noisy; compare rows of one run")
    d = tempfile.mkdtemp()
    path, port = os.path.join(d, "v.sock"), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "-s", path, "--accelerators", "fft=1",
                             "--metrics-addr", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
    eps: list = []
    try:
        while not os.path.exists(path + ".admin"):
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read()

        for g in (int(x) for x in args.guests.split(",")):
            while len(eps) < g:
                a, b = RcEndpoint(path, mem_size=16 << 20), RcEndpoint(path, mem_size=16 << 20)
                connect_pair(a, b)
                eps += [a, b]
            h, st, sc = [], [], []
            with AdminClient(path + ".admin") as c:
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    c.call("health")
                    h.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    c.call("status")
                    st.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    body = scrape()
                    sc.append(time.perf_counter() - t)
            series = sum(1 for ln in body.splitlines() if ln and not ln.startswith(b"#"))
            print(f"## {g} guests connected; exposition {len(body)} bytes, {series} samples")
            print(_row("admin health (baseline)", h))
            print(_row("admin status (vrdma top)", st))
            print(_row("HTTP scrape /metrics", sc))
        if len(eps) < 2:
            a, b = RcEndpoint(path, mem_size=16 << 20), RcEndpoint(path, mem_size=16 << 20)
            connect_pair(a, b)
            eps += [a, b]
        a, b = eps[0], eps[1]

        def writes(n: int) -> list[float]:
            out = []
            for i in range(n):
                t = time.perf_counter()
                a.qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                                      sg=[SGE(a.mr.buf, 64, a.mr.lkey)], remote_addr=b.mr.buf,
                                      rkey=b.mr.rkey))
                a.poll_one()
                out.append(time.perf_counter() - t)
            return out

        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                scrape()

        quiet, busy = [], []
        for _ in range(5):  # interleaved blocks: no scraper / a scraper back to back
            quiet += writes(args.rounds * 5)
            th = threading.Thread(target=hammer)
            th.start()
            try:
                busy += writes(args.rounds * 5)
            finally:
                stop.set()
                th.join()
                stop.clear()
        print(f"## one guest pair's 64 B RDMA WRITE latency, {len(eps)} guests connected")
        print(_row("no scraper (baseline)", quiet))
        print(_row("scraper back to back", busy))
    finally:
        for e in eps:
            e.close()
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
