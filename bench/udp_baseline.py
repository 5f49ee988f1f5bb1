"""Raw-UDP floors across a veth between two network namespaces.

The RoCE fabric benchmarks compare themselves, in the same run, with what
plain UDP sockets do over the same kind of link:

* :func:`latency`: ping-pong of ``size``-byte datagrams (default 64) between
  a blocking client in namespace A and a blocking echo server in B, one
  process each. Reported like ib_send_lat: half round trips, in usec
  (t_min, t_max, t_typical = median, t_avg, t_stdev, 99%, 99.9%), plus the
  typical full round trip. The first 10% of the iterations are warm-up.
* :func:`throughput`: one-way stream of ``size``-byte datagrams (default
  4096) from a sender in A for ``seconds``, counted by a receiver in B: MB/s
  and datagrams/s as received, what was sent, and the datagrams B's UDP
  layer dropped for want of receive buffer (``RcvbufErrors`` of B's
  /proc/net/snmp, B carries nothing else).

Both take a :class:`netlab.ns.TwoHosts` to run over (so a fabric benchmark
passes the same lab it measures), or build one (MTU 9000, so 4 KiB
datagrams are not fragmented). They return dicts.

The vCPU state matters: on a VM an idle vCPU halts and takes tens of
microseconds to wake, which the blocking sides pay on every round trip
(about 35 us half round trip on this Firecracker VM, 4 us with the vCPUs kept
busy). ``--spinners`` runs the measurements with a SCHED_IDLE spinner per CPU
(:func:`bench.perftest.idle_spinners`), as :mod:`bench.fabric_bench` does for
the floors it compares with.

    python -m bench.udp_baseline [lat|bw|both] [--size N] [--iters N]
                                 [--seconds S] [--mtu M] [--spinners] [--json]

(needs root). The ``_echo``, ``_ping``, ``_sink`` and ``_blast``
subcommands are the per-namespace sides.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time

from netlab.ns import DEFAULT_MTU, TwoHosts, python_argv, two_hosts

LAT_PORT = 5201
BW_PORT = 5202
END = b"END"
SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20


# ----------------------------------------------------------------- the sides
def _echo(bind: str, port: int, size: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    buf = bytearray(max(size, 64))
    print("ready", flush=True)
    n = 0
    while True:
        k, peer = s.recvfrom_into(buf)
        if buf[:k] == END:
            return {"echoed": n}
        s.sendto(memoryview(buf)[:k], peer)
        n += 1


def _ping(bind: str, peer: str, port: int, size: int, iters: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.connect((peer, port))
    s.settimeout(5.0)
    msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
    buf = bytearray(size + 64)
    clock = time.perf_counter_ns
    rtt = []
    for _ in range(iters):
        t0 = clock()
        s.send(msg)
        k = s.recv_into(buf)
        rtt.append(clock() - t0)
        if k != size:
            raise RuntimeError(f"echo returned {k} bytes for {size}")
    s.send(END)
    return {"rtt_ns": rtt}


def _udp_rcvbuf_errors() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def _sink(bind: str, port: int, size: int, idle: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    s.bind((bind, port))
    buf = bytearray(size + 64)
    errors0 = _udp_rcvbuf_errors()
    print("ready", flush=True)
    s.settimeout(30.0)                       # until the first datagram
    n = nbytes = 0
    first = last = 0.0
    clock = time.perf_counter
    while True:
        try:
            k = s.recv_into(buf)
        except socket.timeout:
            break
        if k == len(END) and buf[:k] == END:
            break
        if not n:
            first = clock()
            s.settimeout(idle)
        last = clock()
        n += 1
        nbytes += k
    return {"received": n, "received_bytes": nbytes, "rx_seconds": last - first,
            "rcvbuf_drops": _udp_rcvbuf_errors() - errors0}


def _blast(bind: str, peer: str, port: int, size: int, seconds: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.connect((peer, port))
    msg = bytes(size)
    send = s.send
    clock = time.perf_counter
    sent = errors = 0
    t0 = clock()
    end = t0 + seconds
    while clock() < end:
        for _ in range(64):
            try:
                send(msg)
                sent += 1
            except OSError:                  # ENOBUFS: the send queue is full
                errors += 1
    elapsed = clock() - t0
    for _ in range(5):                       # the sink also stops when idle
        time.sleep(0.01)
        with contextlib.suppress(OSError):   # refused once the sink is gone
            send(END)
    return {"sent": sent, "send_errors": errors, "tx_seconds": elapsed}


# -------------------------------------------------------------- the baselines
@contextlib.contextmanager
def _lab(hosts: TwoHosts | None, mtu: int):
    if hosts is not None:
        yield hosts
    else:
        with two_hosts(mtu=mtu) as h:
            yield h


def _side_argv(role: str, *args) -> list[str]:
    return python_argv("bench.udp_baseline", role, *map(str, args))


def _result(proc, timeout: float) -> dict:
    if proc.wait(timeout) != 0:
        raise RuntimeError(f"{' '.join(proc.argv[7:])} failed: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pin(proc, cpu: int | None) -> None:
    if cpu is not None:
        from bench.perftest import pin_threads
        pin_threads(proc.pid, cpu)


def latency(hosts: TwoHosts | None = None, *, size: int = 64, iters: int = 20000,
            port: int = LAT_PORT, mtu: int = DEFAULT_MTU,
            cpus: tuple[int | None, int | None] = (None, None)) -> dict:
    """UDP ping-pong from A to B; perftest-style half round trip stats.
    ``cpus``: the CPUs to pin A's and B's side to (None: the scheduler's choice)."""
    from vrdma.perftest import latency_stats
    with _lab(hosts, mtu) as h:
        server = h.b.popen(_side_argv("_echo", h.ip_b, port, size))
        try:
            _pin(server, cpus[1])
            server.expect("ready")
            client = h.a.popen(_side_argv("_ping", h.ip_a, h.ip_b, port, size, iters))
            _pin(client, cpus[0])
            rtt = _result(client, 120)["rtt_ns"]
            echoed = _result(server, 10)["echoed"]
        finally:
            server.stop()
    rtt = rtt[len(rtt) // 10:]
    r = latency_stats([t // 2 for t in rtt], size)
    r.update(test="udp_lat", echoed=echoed, rtt_typical=sorted(rtt)[len(rtt) // 2] / 1000.0)
    return r


def throughput(hosts: TwoHosts | None = None, *, size: int = 4096, seconds: float = 1.0,
               port: int = BW_PORT, mtu: int = DEFAULT_MTU, idle: float = 0.5,
               cpus: tuple[int | None, int | None] = (None, None)) -> dict:
    """One-way UDP stream from A to B for ``seconds``; rates as received.
    ``cpus``: the CPUs to pin A's and B's side to (None: the scheduler's choice)."""
    with _lab(hosts, mtu) as h:
        sink = h.b.popen(_side_argv("_sink", h.ip_b, port, size, idle))
        try:
            _pin(sink, cpus[1])
            sink.expect("ready")
            blast = h.a.popen(_side_argv("_blast", h.ip_a, h.ip_b, port, size, seconds))
            _pin(blast, cpus[0])
            tx = _result(blast, seconds + 60)
            rx = _result(sink, 60)
        finally:
            sink.stop()
    r = {"test": "udp_bw", "bytes": size, **tx, **rx}
    secs = rx["rx_seconds"] or float("nan")
    r["MB_per_s"] = rx["received_bytes"] / secs / 1e6
    r["datagrams_per_s"] = rx["received"] / secs
    r["lost"] = tx["sent"] - rx["received"]
    return r


# ------------------------------------------------------------------------ CLI
def print_latency(r: dict) -> None:
    from vrdma.perftest import LAT_HEADER, lat_row
    print(f"# raw UDP ping-pong across veth (half round trip, like ib_send_lat); "
          f"{r.get('vcpu_state', 'idle vCPUs')}")
    print(LAT_HEADER)
    print(lat_row(r))
    print(f"# round trip typical {r['rtt_typical']:.2f} usec")


def print_throughput(r: dict) -> None:
    print(f"# raw UDP one-way stream across veth, one datagram per send() and recv (no UDP GSO "
          f"or GRO: the plain baseline of issue 17); {r.get('vcpu_state', 'idle vCPUs')}")
    print("#bytes #sent      #received  MB/s       datagrams/s  rcvbuf_drops")
    print(f"{r['bytes']:<7}{r['sent']:<11}{r['received']:<11}{r['MB_per_s']:<11.1f}"
          f"{r['datagrams_per_s']:<13.0f}{r['rcvbuf_drops']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sides = {"_echo": (_echo, (str, int, int)), "_ping": (_ping, (str, str, int, int, int)),
             "_sink": (_sink, (str, int, int, float)), "_blast": (_blast, (str, str, int, int, float))}
    if argv and argv[0] in sides:
        fn, types = sides[argv[0]]
        print(json.dumps(fn(*(t(v) for t, v in zip(types, argv[1:], strict=True)))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.udp_baseline",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("test", nargs="?", choices=["lat", "bw", "both"], default="both")
    p.add_argument("--size", type=int, help="datagram bytes (default 64 for lat, 4096 for bw)")
    p.add_argument("--iters", type=int, default=20000, help="lat: round trips")
    p.add_argument("--seconds", type=float, default=1.0, help="bw: sending time")
    p.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    p.add_argument("--spinners", action="store_true",
                   help="keep every vCPU busy with a SCHED_IDLE spinner while measuring")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = []
    cpus = sorted(os.sched_getaffinity(0))
    state = f"SCHED_IDLE spinners on cpus {cpus}" if a.spinners else "idle vCPUs"
    if a.spinners:
        from bench.perftest import idle_spinners
        spin = idle_spinners(cpus)
    else:
        spin = contextlib.nullcontext()
    with two_hosts(mtu=a.mtu) as h, spin:
        if a.test in ("lat", "both"):
            rows.append(latency(h, size=a.size or 64, iters=a.iters))
        if a.test in ("bw", "both"):
            rows.append(throughput(h, size=a.size or 4096, seconds=a.seconds))
    for r in rows:
        r["vcpu_state"] = state
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            (print_latency if r["test"] == "udp_lat" else print_throughput)(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
