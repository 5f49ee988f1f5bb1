"""perftest-style tools over the virtio-rdma device: send_lat, write_bw, read_lat.

Like ib_send_lat / ib_write_bw / ib_read_lat, two processes (a server and a
client guest, each with its own Context on the back-end) connect RC QPs out
of band and poll their CQs. Each run also measures, in the same run, the
floor it is compared with: a two-process eventfd ping-pong for latency, a
plain memcpy of the same sizes for bandwidth, and prints the ratio.

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
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

from guest_lib import SGE, QPCap, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint
from vhost_user.testing import DaemonProcess
from verbs import SendFlags, WcOpcode, WrOpcode
LAT_HEADER = ("#bytes #iterations t_min[usec] t_max[usec] t_typical[usec] t_avg[usec] t_stdev[usec] "
              "99% percentile[usec] 99.9% percentile[usec]")
BW_HEADER = "#bytes #iterations BW peak[MiB/sec] BW average[MiB/sec] MsgRate[Mpps]"


def make_guest(path: str, buf_size: int, depth: int = 128) -> RcEndpoint:
    """One perftest side: one MR, one CQ, one RC QP of ``depth`` WRs."""
    return RcEndpoint(path, buf_size, cap=QPCap(depth, depth, 1, 1, 64), cq_size=4 * depth,
                      mem_size=max(32 << 20, 2 * buf_size + (8 << 20)))


def _stats(ns: list[int], size: int) -> dict:
    s = sorted(ns)
    n = len(s)
    us = [v / 1000.0 for v in s]
    return {"bytes": size, "iterations": n, "t_min": us[0], "t_max": us[-1], "t_typical": us[n // 2],
            "t_avg": sum(us) / n, "t_stdev": statistics.pstdev(us), "p99": us[min(n - 1, int(n * 0.99))],
            "p999": us[min(n - 1, int(n * 0.999))]}


def _lat_row(r: dict) -> str:
    return (f"{r['bytes']:<8}{r['iterations']:<12}{r['t_min']:<13.2f}{r['t_max']:<13.2f}{r['t_typical']:<17.2f}"
            f"{r['t_avg']:<12.2f}{r['t_stdev']:<15.2f}{r['p99']:<22.2f}{r['p999']:.2f}")


# --------------------------------------------------------------------------
# the two sides, each in its own process


#: polling mode of the guests: CPU to pin them to, yield between empty polls
_GUEST_CPU: int | None = None


def _poll_one(g):
    """The next completion (must be successful); in polling mode spin with
    sched_yield so that the two guests sharing a CPU take turns."""
    if _GUEST_CPU is None:
        return g.poll_one()
    cq = g.cq
    while True:
        n, wcs = cq.poll(1)
        if n:
            if wcs[0].status:
                raise RuntimeError(f"completion error: {wcs[0]}")
            return wcs[0]
        os.sched_yield()


def _side(role: str, test: str, path: str, size: int, iters: int, batch: int, conn, out,
          cpu: int | None = None, connect_attrs: dict | None = None) -> None:
    global _GUEST_CPU
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
            _GUEST_CPU = cpu
        g = make_guest(path, max(size, 4096) * (2 if test == "write_bw" else 1) + 4096)
        conn.send(g.info())
        peer = conn.recv()
        g.connect(peer, **(connect_attrs or {}))
        result = globals()[f"_{test}_{role}"](g, peer, size, iters, batch, conn)
        g.close()
        out.put((role, result))
    except BaseException as e:  # report, never hang the parent
        out.put((role, {"error": f"{type(e).__name__}: {e}"}))


#: perftest's DEF_CQ_MOD: ib_send_lat signals one send in CQ_MOD (and the last)
#: and polls the send CQ only then
CQ_MOD = 100


class _LatSide:
    """One side of ib_send_lat's loop (perftest's run_iter_lat_send): the
    same WRs posted every time, receives reposted as they complete, a send
    signaled (and waited for) every CQ_MOD sends."""

    def __init__(self, g, size: int):
        self.g = g
        sge = SGE(g.mr.buf, size, g.mr.lkey)
        inline = SendFlags.INLINE if size <= 64 else 0
        self.rwr = RecvWR(wr_id=0, sg=[sge])
        self.wr = SendWR(wr_id=0, opcode=WrOpcode.SEND, sg=[sge], send_flags=inline)
        self.wr_signaled = SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[sge],
                                  send_flags=inline | SendFlags.SIGNALED)
        self.seen = {True: 0, False: 0}   # completions polled ahead: recv?, send?
        self.scnt = 0
        g.qp.post_recv([self.rwr] * 64)

    def _wait(self, recv: bool) -> None:
        seen = self.seen
        while not seen[recv]:
            wc = _poll_one(self.g)       # one CQ for both: the other kind is counted for later
            seen[bool(wc.opcode & WcOpcode.RECV)] += 1
        seen[recv] -= 1

    def receive(self) -> None:
        self._wait(True)
        self.g.qp.post_recv(self.rwr)

    def send(self, iters: int) -> None:
        self.scnt += 1
        signaled = self.scnt % CQ_MOD == 0 or self.scnt == iters
        self.g.qp.post_send(self.wr_signaled if signaled else self.wr)
        if signaled:
            self._wait(False)


def _send_lat_server(g, peer, size, iters, batch, conn):
    side = _LatSide(g, size)
    conn.send("ready")
    for _ in range(iters):
        side.receive()  # the client's message
        side.send(iters)
    return None


def _send_lat_client(g, peer, size, iters, batch, conn):
    side = _LatSide(g, size)
    conn.recv()
    clock = time.perf_counter_ns
    posted = []
    for i in range(iters):
        if i:
            side.receive()  # the server's reply to the previous send
        posted.append(clock())
        side.send(iters)
    side.receive()
    posted.append(clock())
    # ib_send_lat: consecutive post times, halved (a round trip covers two sends)
    samples = [(b - a) // 2 for a, b in zip(posted, posted[1:])]
    return _stats(samples[iters // 10:], size)


def _read_lat_server(g, peer, size, iters, batch, conn):
    conn.recv()  # wait for the client to finish
    return None


def _read_lat_client(g, peer, size, iters, batch, conn):
    clock = time.perf_counter_ns
    samples = []
    sge = SGE(g.mr.buf, size, g.mr.lkey)
    for i in range(iters):
        t0 = clock()
        g.qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.RDMA_READ, sg=[sge], remote_addr=peer["addr"],
                              rkey=peer["rkey"]))
        _poll_one(g)
        samples.append(clock() - t0)
    conn.send("done")
    return _stats(samples[iters // 10:], size)


def _write_bw_server(g, peer, size, iters, batch, conn):
    conn.recv()
    return None


def _write_bw_client(g, peer, size, iters, batch, conn):
    sge = SGE(g.mr.buf, size, g.mr.lkey)
    inline = SendFlags.INLINE if size <= 64 else 0
    wrs = g.qp.prepare_send([
        SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, sg=[sge], remote_addr=peer["addr"], rkey=peer["rkey"],
               send_flags=(SendFlags.SIGNALED if i == batch - 1 else 0) | inline) for i in range(batch)])
    rounds = max(1, iters // batch)
    best = 0.0
    t_start = time.perf_counter()
    for _ in range(rounds):
        t0 = time.perf_counter()
        g.qp.post_list(wrs)  # one doorbell (or none, while the daemon polls) per list
        _poll_one(g)
        dt = time.perf_counter() - t0
        best = max(best, batch * size / dt)
    total = time.perf_counter() - t_start
    conn.send("done")
    n = rounds * batch
    return {"bytes": size, "iterations": n, "bw_peak_MiB": best / 2**20, "bw_avg_MiB": n * size / total / 2**20,
            "msg_rate_Mpps": n / total / 1e6}


# --------------------------------------------------------------------------
# floors measured in the same run


def eventfd_floor(iters: int) -> dict:
    from bench.vhost_user_rtt import eventfd_pingpong

    r = eventfd_pingpong(iters)
    half = {k: v / 2 for k, v in r.items() if k.endswith("_us")}
    return {"t_typical": half["t_typical_us"], "t_min": half["t_min_us"], "t_avg": half["t_avg_us"]}


def memcpy_floor(size: int, reps: int = 200) -> dict:
    src = np.ones(size, np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    t_all = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, size / (time.perf_counter() - t0))
    avg = reps * size / (time.perf_counter() - t_all)
    return {"bw_peak_MiB": best / 2**20, "bw_avg_MiB": avg / 2**20}


# --------------------------------------------------------------------------


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


def run_pair(path: str, test: str, size: int, iters: int, batch: int = 16,
             guest_cpu: int | tuple[int, int] | None = None,
             *, client_path: str | None = None, connect_attrs: dict | None = None) -> dict:
    """Server and client guests in two processes; the client's daemon is
    ``client_path`` if given (two hosts), else the server's.  ``guest_cpu``
    pins both guests to one CPU, or (server CPU, client CPU) each to its own."""
    server_cpu, client_cpu = guest_cpu if isinstance(guest_cpu, tuple) else (guest_cpu, guest_cpu)
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    ps = [ctx.Process(target=_side, args=("server", test, path, size, iters, batch, a, out, server_cpu,
                                           connect_attrs)),
          ctx.Process(target=_side, args=("client", test, client_path or path, size, iters, batch, b, out,
                                           client_cpu, connect_attrs))]
    for p in ps:
        p.start()
    results = {}
    try:
        for _ in ps:
            role, r = out.get(timeout=300)
            results[role] = r
            if isinstance(r, dict) and "error" in r:
                break  # e.g. the daemon died: the other side may wait on the pipe for ever
    finally:
        for p in ps:
            p.join(0 if len(results) < len(ps) else 10)
            if p.is_alive():
                p.kill()
                p.join()
    for role, r in results.items():
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"{test} {role}: {r['error']}")
    return dict(results["client"], batch=batch)


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


def print_rows(test: str, rows: list[dict]) -> None:
    if test == "write_bw":
        print(BW_HEADER)
        for r in rows:
            print(f"{r['bytes']:<8}{r['iterations']:<12}{r['bw_peak_MiB']:<19.2f}{r['bw_avg_MiB']:<22.2f}"
                  f"{r['msg_rate_Mpps']:.6f}")
        for r in rows:
            print(f"# {r['bytes']} B, post list {r['batch']}: memcpy {r['floor_memcpy_MiB']:.0f} MiB/s, "
                  f"ratio {r['ratio_vs_memcpy']:.3f}, {r['msg_rate_Mpps'] * 1e3:.0f} k msg/s")
    else:
        print(LAT_HEADER)
        for r in rows:
            print(_lat_row(r))
        for r in rows:
            key = [k for k in r if k.startswith("floor_eventfd")][0]
            print(f"# {r['bytes']} B: floor ({key}) {r[key]:.2f} us, ratio {r['ratio_vs_floor']:.2f}x")
    for r in rows[:1]:
        if "vcpu_state" in r:  # run() measures it; a caller of run_pair may not
            print(f"# vCPUs during the run: {r['vcpu_state']}; during the floor: "
                  f"{r.get('floor_vcpu_state', 'not measured')}")


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
