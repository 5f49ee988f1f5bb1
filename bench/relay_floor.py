"""The floor of the two-host latency layout itself: a UDP ping-pong through a
forwarding process on each host that shares the application's CPU.

``bench.fabric_bench send_lat`` (pinned) runs, on each of two hosts, a
daemon and its guest on ONE CPU: a guest posts a WQE in shared memory and
polls its CQ with ``sched_yield``; the daemon busy-polls the doorbell
records and its UDP socket, and yields the CPU after it served something.
Its goal is set against a raw UDP ping-pong (:mod:`bench.udp_baseline`):
one process per host, no hand-over. This benchmark measures what the
*structure* costs with no protocol work at all, over the same kind of veth:

* host A: the client application and its relay, both pinned to CPU ``a``;
  host B: the echo application and its relay, pinned to CPU ``b``;
* application <-> relay through a shared page (a 64-bit sequence number each
  way), each side polling it, calling ``sched_yield`` when there is nothing;
* relay <-> relay: one 64-byte UDP datagram per message, the socket read
  without blocking on every pass.

Each half round trip thus costs two CPU hand-overs (application to relay on
the sender, relay to application on the receiver) on top of the datagram,
which is what a daemon sharing its guest's CPU pays before any RoCE work.
Reported like :func:`bench.udp_baseline.latency` (half round trips, usec;
the first 10% of the iterations are warm-up).

    python -m bench.relay_floor [--iters N] [--json]

(needs root: network namespaces). ``_host`` is the per-namespace side.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import socket
import sys
import time

from netlab.ns import DEFAULT_MTU, TwoHosts, python_argv, two_hosts

PORT = 5203
SIZE = 64
#: the shared page: [0] application -> relay sequence, [1] relay -> application sequence
TO_RELAY, TO_APP = 0, 1


def _relay(sock: socket.socket, peer: tuple[str, int], seq, first_out: int) -> None:
    """Forward: a new ``seq[TO_RELAY]`` leaves as a datagram, a datagram's
    number is written to ``seq[TO_APP]``; yield the CPU when neither moved."""
    buf = bytearray(SIZE)
    out = memoryview(bytearray(SIZE)).cast("Q")
    recv_into, sendto, yield_ = sock.recv_into, sock.sendto, os.sched_yield
    sent = first_out
    while True:
        busy = False
        s = seq[TO_RELAY]
        if s != sent:
            sent = out[0] = s
            sendto(out, peer)
            busy = True
        try:
            k = recv_into(buf, SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            k = 0
        if k == SIZE:
            seq[TO_APP] = int.from_bytes(buf[:8], "little")
            busy = True
        if not busy:
            yield_()


def _client(seq, iters: int) -> dict:
    clock, yield_ = time.perf_counter_ns, os.sched_yield
    rtt = []
    deadline = time.monotonic() + 30
    for i in range(1, iters + 1):
        t0 = clock()
        seq[TO_RELAY] = i
        while seq[TO_APP] != i:
            yield_()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to message {i} in 30 s")
        rtt.append(clock() - t0)
    return {"rtt_ns": rtt}


def _echo(seq) -> None:
    yield_ = os.sched_yield
    last = 0
    while True:
        s = seq[TO_APP]
        if s != last:
            last = seq[TO_RELAY] = s
        else:
            yield_()


def _host(role: str, bind: str, peer: str, iters: int, cpu: int) -> dict | None:
    """One host: pin to ``cpu``, fork the relay, run the application."""
    os.sched_setaffinity(0, {cpu})
    # the echo side ends on SIGTERM (NsProcess.stop): unwind, so the relay child is killed and reaped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
    seq = memoryview(page).cast("Q")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, PORT))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the relay child
        try:
            _relay(sock, (peer, PORT), seq, 0)
        finally:
            os._exit(0)
    sock.close()                       # the relay owns the socket
    try:
        print("ready", flush=True)
        if role == "client":
            return _client(seq, iters)
        _echo(seq)
        return None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        del seq
        page.close()


def latency(hosts: TwoHosts | None = None, *, iters: int = 20000, mtu: int = DEFAULT_MTU,
            cpus: tuple[int, int] = (0, 1)) -> dict:
    """The relayed ping-pong from A to B, perftest-style half round trip stats;
    ``cpus``: host A's CPU and host B's CPU."""
    from bench.udp_baseline import _lab, _result
    from vrdma.perftest import latency_stats
    with _lab(hosts, mtu) as h:
        server = h.b.popen(python_argv("bench.relay_floor", "_host", "echo", h.ip_b, h.ip_a,
                                       "0", str(cpus[1])))
        try:
            server.expect("ready")
            client = h.a.popen(python_argv("bench.relay_floor", "_host", "client", h.ip_a, h.ip_b,
                                           str(iters), str(cpus[0])))
            rtt = _result(client, 180)["rtt_ns"]
        finally:
            server.stop()
    rtt = rtt[len(rtt) // 10:]
    r = latency_stats([t // 2 for t in rtt], SIZE)
    r.update(test="relay_floor", rtt_typical=sorted(rtt)[len(rtt) // 2] / 1000.0,
             layout=f"host A (client + relay) on cpu {cpus[0]}, host B (echo + relay) on cpu {cpus[1]}; "
                    "application and relay hand over through shared memory with sched_yield")
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_host":
        r = _host(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        print(json.dumps(r), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.relay_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from bench import udp_baseline
    from bench.machine import header, machine
    from vrdma.perftest import LAT_HEADER, lat_row
    cpus = sorted(os.sched_getaffinity(0))
    pair = (cpus[0], cpus[-1])
    from bench.perftest import idle_spinners
    with two_hosts() as h:
        with idle_spinners(cpus):        # as bench.fabric_bench measures its UDP floor
            udp = udp_baseline.latency(h, iters=a.iters, cpus=pair)
        relay = latency(h, iters=a.iters, cpus=pair)
    if a.json:
        print(json.dumps({"machine": machine(), "udp": udp, "relay": relay}))
        return 0
    print(header(machine()))
    print(f"# raw UDP ping-pong, one process per host (cpus {pair}, SCHED_IDLE spinners), then the "
          "same through a relay sharing each host's CPU; half round trips")
    print(LAT_HEADER)
    print(lat_row(udp))
    print(lat_row(relay))
    print(f"# relay / raw UDP typical: {relay['t_typical'] / udp['t_typical']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
