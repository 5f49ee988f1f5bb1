"""What load-table dissemination costs (issue 15; docs/scheduler.md, "Dissemination").

``python -m bench.load_dissem_bench [--n N] [--rows R] [--no-redis]``

1. Codec CPU per row: ``encode_load`` / ``decode_load`` (tag + every check) /
   ``Listener.receive``, ``encode_counters`` / ``decode_counters``; same-run
   baselines: HMAC-SHA256 of the same bytes alone, and ``struct`` packing /
   unpacking of the same fields without checks.
2. Bytes per period: datagram size by kinds, and the cluster's traffic per
   period for N hosts (broadcast vs unicast).
3. Propagation, one host's row to another's table over loopback, through an
   exchange: UDP and Redis (a redis-server started here), against the same
   run's raw one-way latency of the transport (asyncio UDP socket to socket;
   Redis PUBLISH to a subscriber) without the load-table code.

Figures only; nothing here is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from bench.machine import header
from scheduler.exchange import LoadExchange
from scheduler.gossip import DatagramBackend, Listener
from scheduler.redis_table import RedisBackend
from scheduler.table import LoadRow, LoadTable
from scheduler.wire import (
    decode_counters,
    decode_load,
    derive_load_key,
    encode_counters,
    encode_load,
    load_size,
)

KEY = derive_load_key(bytes(range(32)))
ROW = LoadRow(1, {"fft": 2, "turbo_decode": 1}, {"fft": 0.001, "turbo_decode": 0.004},
              {"fft": 0.5, "turbo_decode": 0.1}, {"fft": 2, "turbo_decode": 1}, seq=1)


def per_op(fn, n: int) -> float:
    """Microseconds per call (best of 3 runs of n)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def codec(n: int) -> None:
    data = encode_load(ROW, "192.0.2.1", 0.1, KEY)
    counters = encode_counters(ROW)
    li = Listener(KEY, "192.0.2.9", lambda a: 1)
    seq = iter(range(10**18, 10**18 + 10**9))
    fmt = struct.Struct("<IBBHQ16sfI" + "BBHHHdd" * 2)
    fields = (1, 1, 2, 0, 1, b"\0" * 16, 0.1, 0, 1, 0, 2, 2, 0, 0.001, 0.5, 4, 0, 1, 1, 0, 0.004, 0.1)
    packed = fmt.pack(*fields)

    def receive() -> None:
        data = encode_load(dataclasses.replace(ROW, seq=next(seq)), "192.0.2.1", 0.1, KEY)
        li.receive(data, 0.0, 2 * 10**18)

    rows = [
        ("encode_load (2 kinds, 120 B)", per_op(lambda: encode_load(ROW, "192.0.2.1", 0.1, KEY), n)),
        ("decode_load (tag + all checks)", per_op(lambda: decode_load(data, KEY), n)),
        ("encode_load + Listener.receive", per_op(receive, n)),
        ("encode_counters (120 B)", per_op(lambda: encode_counters(ROW), n)),
        ("decode_counters", per_op(lambda: decode_counters(counters, 1, 0.0), n)),
        ("baseline: HMAC-SHA256 of 88 B",
         per_op(lambda: hmac.new(KEY, data[:-32], hashlib.sha256).digest(), n)),
        ("baseline: struct.pack same fields", per_op(lambda: fmt.pack(*fields), n)),
        ("baseline: struct.unpack same fields", per_op(lambda: fmt.unpack(packed), n)),
    ]
    print("## codec CPU per row (us, best of 3 x", n, "calls)")
    for name, us in rows:
        print(f"  {name:38s} {us:8.2f}")


def traffic() -> None:
    print("## bytes per period")
    print("  datagram: " + ", ".join(f"{k} kinds {load_size(k)} B" for k in range(5)))
    size = load_size(2)
    for hosts in (16, 64, 256):
        accel = hosts // 2
        print(f"  {hosts} hosts ({accel} with accelerators, 2 kinds): broadcast {accel} datagrams "
              f"= {accel * size} B/period; unicast {accel * (hosts - 1)} "
              f"= {accel * (hosts - 1) * size} B/period")


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[int(0.99 * (len(xs) - 1))]
    return f"median {statistics.median(xs) * 1e6:7.1f} us, p99 {p99 * 1e6:7.1f} us (n={len(xs)})"


async def udp_raw(rows: int) -> list[float]:
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[float] = asyncio.Queue()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            got.put_nowait(time.perf_counter())

    rx, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
    tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    dest = rx.get_extra_info("sockname")
    data = encode_load(ROW, "192.0.2.1", 0.1, KEY)
    out = []
    for _ in range(rows):
        t = time.perf_counter()
        tx.sendto(data, dest)
        out.append(await got.get() - t)
    rx.close()
    tx.close()
    return out


async def exchange_latency(rows: int, make_backend) -> list[float]:
    """Publish one row at a time from host 1's exchange to host 2's table."""
    seen: asyncio.Queue[float] = asyncio.Queue()
    resolve = {"192.0.2.1": 1, "192.0.2.2": 2}.get
    b1, b2 = make_backend(1), make_backend(2)
    t1, t2 = LoadTable(100.0), LoadTable(100.0)
    e1 = LoadExchange(table=t1, own_row=lambda: None, address="192.0.2.1", key=KEY, resolve=resolve,
                      backend=b1, period=100.0)
    e2 = LoadExchange(table=t2, own_row=lambda: None, address="192.0.2.2", key=KEY, resolve=resolve,
                      backend=b2, period=100.0, on_row=lambda r: seen.put_nowait(time.perf_counter()))
    out = []
    async with e1, e2:
        await asyncio.sleep(0.05)
        for _ in range(rows):
            t = time.perf_counter()
            data = e1.announcer.announce(ROW, time.monotonic())
            assert data is not None
            await b1.publish(data, "192.0.2.1")
            out.append(await seen.get() - t)
    return out


def udp_backends():
    socks = {h: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for h in (1, 2)}
    for s in socks.values():
        s.bind(("127.0.0.1", 0))
    s1, s2 = socks[1], socks[2]
    ports = {1: s1.getsockname()[1], 2: s2.getsockname()[1]}
    return lambda h: DatagramBackend(peers=[("127.0.0.1", ports[3 - h])], sock=socks[h])


async def redis_raw(url: str, rows: int) -> list[float]:
    from redis.asyncio import Redis

    pub, sub = Redis.from_url(url), Redis.from_url(url)
    ps = sub.pubsub()
    await ps.subscribe("bench")
    await ps.get_message(timeout=1.0)
    data = encode_load(ROW, "192.0.2.1", 0.1, KEY)
    out = []
    for _ in range(rows):
        t = time.perf_counter()
        await pub.publish("bench", data)
        while (await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)) is None:
            pass
        out.append(time.perf_counter() - t)
    await ps.aclose()
    await pub.aclose()
    await sub.aclose()
    return out


def propagation(rows: int, with_redis: bool) -> None:
    print("## propagation of one row, loopback (sender's publish -> receiver's table)")
    print("  UDP baseline (raw datagram, asyncio):", stats(asyncio.run(udp_raw(rows))))
    print("  UDP exchange (encode, send, tag, checks, table):",
          stats(asyncio.run(exchange_latency(rows, udp_backends()))))
    server = shutil.which("redis-server")
    if not with_redis or server is None:
        print("  Redis: skipped", "(no redis-server)" if server is None else "")
        return
    with tempfile.TemporaryDirectory() as d:
        sock = str(Path(d) / "redis.sock")
        p = subprocess.Popen([server, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
                              "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(500):
                if Path(sock).exists():
                    break
                time.sleep(0.01)
            url = f"unix://{sock}"
            print("  Redis baseline (raw PUBLISH -> subscriber):", stats(asyncio.run(redis_raw(url, rows))))
            print("  Redis exchange (SET+PUBLISH pipeline, checks, table):",
                  stats(asyncio.run(exchange_latency(rows, lambda h: RedisBackend(url, "bench", poll=1.0)))))
        finally:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="calls per codec measurement")
    ap.add_argument("--rows", type=int, default=500, help="rows per propagation measurement")
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    print(header())
    codec(args.n)
    traffic()
    propagation(args.rows, not args.no_redis)


if __name__ == "__main__":
    main()
