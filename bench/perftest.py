"""perftest-style tools over the virtio-rdma device: send_lat, write_lat, read_lat, write_bw, send_bw.

Like ib_send_lat / ib_write_lat / ib_read_lat / ib_write_bw / ib_send_bw,
two processes (a server and a client guest, each with its own Context on
the back-end) connect RC QPs out of band and poll their CQs. Each run also
measures, in the same run, the floor it is compared with: a two-process
eventfd ping-pong for latency, a plain memcpy of the same sizes for
bandwidth, and prints the ratio. The guests, the floors and the report are
the product's :mod:`vrdma.perftest` (what ``vrdma demo`` runs); this module
starts the daemon, places the processes and is the command line.

    python -m bench.perftest send_lat [--size 64] [--iters N] [--poll-us 200] [--json]
    python -m bench.perftest write_bw [--size 1048576] [--batch 16]   # --batch: perftest's -l
    python -m bench.perftest send_bw --size 64 --batch 16              # small-message rate
    python -m bench.perftest guest_ops    # the guest library's cost per WR / CQE, native vs Python
    python -m bench.perftest send_lat --poll-us 200 --layout split,shared --path native,python \
        --wait adaptive,yield --repeat 3

``--poll-us`` > 0: the daemon busy-polls (doorbell records, no kicks) for
that long after its last work; 0: it blocks. ``--layout`` places the
processes on the CPUs: ``split`` pins the daemon to the first CPU and both
guests to the last (one CPU for the daemon), ``shared`` pins daemon and
guests to the last CPU (a polling daemon and polling guests on one CPU),
``free`` pins nothing (the kernel places them, as a user would run them).
``--path`` chooses the guests' native fast path (guest_lib._fast) or the
Python reference, ``--wait`` how the guests wait for completions
(vrdma.perftest.CqWaiter: adaptive spin-then-block, sched_yield, spin).
Every combination runs ``--repeat`` times, interleaved, with the floor
measured again in each round; the table gives each run and the median.
With a blocking daemon, and while the floors are measured, a SCHED_IDLE
spinner per CPU keeps idle vCPUs out of halt (an idle vCPU of a Firecracker
VM takes tens of microseconds to wake; any real task preempts the spinner at
once); with a polling daemon there are none (a guest's sched_yield would
hand its CPU to the spinner until the next tick). The processor and the
layout are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

from bench.machine import header, machine
from vhost_user.testing import DaemonProcess
from vrdma.perftest import WAITS, eventfd_floor, memcpy_floor, print_rows, run_pair


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


LAYOUTS = ("split", "shared", "free")
BW_TESTS = ("write_bw", "send_bw")


def _place(layout: str, daemon_pid: int, cpus: list[int]):
    """Pin the daemon for ``layout``; returns the guests' CPU (or None) and a description."""
    if layout == "split":
        pin_threads(daemon_pid, cpus[0])
        return cpus[-1], f"daemon on cpu {cpus[0]}, guests on cpu {cpus[-1]}"
    if layout == "shared":
        pin_threads(daemon_pid, cpus[-1])
        return cpus[-1], f"daemon and guests on cpu {cpus[-1]}"
    return None, f"unpinned on cpus {cpus}"


def _floor(test: str, size: int, iters: int, cpu: int) -> dict:
    """The run's floor: an eventfd ping-pong between two processes pinned to two
    CPUs (the ratio's baseline: the issue's "idle two-process ping-pong", a
    wake-up on another CPU; left to the kernel, the pair lands on one CPU or on
    two, and the ratio's verdict swung 2-3x between runs of the same figures),
    and the same pinned both to ``cpu``, where the guests run in every layout
    (informational: a wake-up on the same CPU)."""
    if test in BW_TESTS:
        return {"floor_memcpy_MiB": memcpy_floor(size)["bw_avg_MiB"]}
    cpus = sorted(os.sched_getaffinity(0))
    f = eventfd_floor(max(2000, iters), (cpus[0], cpus[-1]) if len(cpus) > 1 else None)
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})  # the ping-pong's child inherits it
        one = eventfd_floor(max(2000, iters))
    finally:
        os.sched_setaffinity(0, mask)
    if test in ("send_lat", "write_lat"):  # half round trips
        return {"floor_eventfd_half_rtt_us": f["t_typical"], "one_cpu_floor_us": one["t_typical"]}
    return {"floor_eventfd_rtt_us": 2 * f["t_typical"], "one_cpu_floor_us": 2 * one["t_typical"]}


def run(test: str, sizes, iters: int, batch: int = 16, poll_us: float = 0.0, layouts=("split",),
        paths=("native",), waits=("adaptive",), repeat: int = 1) -> list[dict]:
    """Every (layout, path, wait, size) ``repeat`` times, interleaved; one row each."""
    rows = []
    cpus = sorted(os.sched_getaffinity(0))
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    for rnd in range(repeat):
        with idle_spinners(cpus):
            floors = {size: _floor(test, size, iters, cpus[-1]) for size in sizes}
        for layout in layouts:
            with DaemonProcess("--poll-us", str(poll_us)) as d, idle_spinners(cpus if poll_us <= 0 else []):
                guest_cpu, where = _place(layout, d.proc.pid, cpus)
                spin = "SCHED_IDLE spinners" if poll_us <= 0 else "no spinners"
                for size in sizes:
                    for path in paths:
                        for wait in waits:
                            r = run_pair(d.path, test, size, iters, batch, guest_cpu=guest_cpu,
                                         native=path == "native", wait=wait)
                            r.update(floors[size], test=test, batch=batch, poll_us=poll_us, layout=layout,
                                     path=path, round=rnd, vcpu_state=f"{where}; {spin}",
                                     floor_vcpu_state=f"SCHED_IDLE spinners on cpus {cpus}")
                            if test in BW_TESTS:
                                r["ratio_vs_memcpy"] = r["bw_avg_MiB"] / r["floor_memcpy_MiB"]
                            else:
                                key = next(k for k in r if k.startswith("floor_eventfd"))
                                r["ratio_vs_floor"] = r["t_typical"] / r[key]
                            rows.append(r)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """One line per run and the median per (layout, path, wait, size)."""
    bw = rows[0]["test"] in BW_TESTS
    cols = ("  k msg/s    MiB/s  vs memcpy" if bw
            else "  t_typ[us]  floor[us]  ratio  1-cpu floor[us]  spun/yielded/blocked")
    out = [f"# {'layout':<7} {'path':<7} {'wait':<9} {'size':>6} {'round':>5} " + cols]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["layout"], r["path"], r["wait"], r["bytes"]), []).append(r)
        head = f"# {r['layout']:<7} {r['path']:<7} {r['wait']:<9} {r['bytes']:>6} {r['round']:>5} "
        if bw:
            out.append(head + f"{r['msg_rate_Mpps'] * 1e3:9.1f} {r['bw_avg_MiB']:8.1f} "
                              f"{r['ratio_vs_memcpy']:10.4f}")
        else:
            key = next(k for k in r if k.startswith("floor_eventfd"))
            out.append(head + f"{r['t_typical']:10.2f} {r[key]:10.2f} {r['ratio_vs_floor']:6.2f}x "
                              f"{r['one_cpu_floor_us']:16.2f}  "
                              f"{r['waits_spun']}/{r['waits_yielded']}/{r['waits_blocked']}")
    out.append("# median over rounds:")
    for (layout, path, wait, size), rs in groups.items():
        head = f"# {layout:<7} {path:<7} {wait:<9} {size:>6} {'med':>5} "
        if bw:
            out.append(head + f"{statistics.median(r['msg_rate_Mpps'] for r in rs) * 1e3:9.1f} "
                              f"{statistics.median(r['bw_avg_MiB'] for r in rs):8.1f} "
                              f"{statistics.median(r['ratio_vs_memcpy'] for r in rs):10.4f}")
        else:
            key = next(k for k in rs[0] if k.startswith("floor_eventfd"))
            out.append(head + f"{statistics.median(r['t_typical'] for r in rs):10.2f} "
                              f"{statistics.median(r[key] for r in rs):10.2f} "
                              f"{statistics.median(r['ratio_vs_floor'] for r in rs):6.2f}x")
    return out


def guest_ops(n: int = 20000) -> list[dict]:
    """Per-operation cost of the guest library alone, native vs Python, in
    the same run: rings in plain memory, no daemon (what each path costs a
    guest's CPU per WR and per completion)."""
    import numpy as np

    from guest_lib import _fast
    from guest_lib.cq import WC, WC_DTYPE, PyCompletionRing, _accel_wc
    from guest_lib.qp import PyWorkQueues
    from guest_lib.wr import SGE, RecvWR, SendWR
    from verbs import SendFlags, WcOpcode, WrOpcode
    from virtio_rdma import wire

    mem = bytearray(1 << 16)

    def translate(uva, length):
        return memoryview(mem)[uva : uva + length]

    cqe = 4096
    rows = []
    fill = bytearray(cqe * wire.CQE_SIZE)
    for i in range(cqe):
        fill[i * wire.CQE_SIZE : (i + 1) * wire.CQE_SIZE] = wire.encode_cqe(
            wire.Completion(i, 0, WcOpcode.RECV, 1, 64), 1)
    send = SendWR(1, WrOpcode.SEND, sg=[SGE(0, 64, 1)], send_flags=SendFlags.SIGNALED | SendFlags.INLINE)
    write = SendWR(1, WrOpcode.RDMA_WRITE, sg=[SGE(0, 4096, 1)], send_flags=SendFlags.SIGNALED,
                   remote_addr=1 << 20, rkey=5)
    recv = RecvWR(1, sg=[SGE(0, 64, 1)])
    for rnd in range(3):
        for native in (True, False):
            wq_cls = _fast.WorkQueues if native else PyWorkQueues
            cr_cls = _fast.CompletionRing if native else PyCompletionRing
            wq = wq_cls(1, bytearray(256 * 128), bytearray(256 * 32), bytearray(8), 256, 256, 128, 32, 4, 1,
                        False, translate)
            r = {"path": "native" if native else "python", "round": rnd}
            for name, wr in (("post_send inline 64 B", send), ("post_send 1 SGE", write)):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    wq.post_send(wr)
                    wq.completed(0, 0)
                r[name] = (time.perf_counter_ns() - t0) / n
            t0 = time.perf_counter_ns()
            for _ in range(n):
                wq.post_recv(recv)
                wq.completed(WcOpcode.RECV, 0)
            r["post_recv"] = (time.perf_counter_ns() - t0) / n
            qps: dict = {}
            out = np.zeros(16, WC_DTYPE)
            for how in ("poll 1 (WC)", "poll_into 16", "poll_counts 16"):
                ring, dbrec = bytearray(fill), bytearray(8)
                cr = cr_cls(ring, dbrec, cqe, WC, _accel_wc)
                t0 = time.perf_counter_ns()
                if how.startswith("poll 1"):
                    for _ in range(cqe):
                        cr.poll(1, qps, {})
                elif how.startswith("poll_into"):
                    for _ in range(cqe // 16):
                        cr.poll_into(out, qps, {})
                else:
                    for _ in range(cqe // 16):
                        cr.poll_counts(16, qps, {})
                r[how + " per CQE"] = (time.perf_counter_ns() - t0) / cqe
                assert cr.ci == cqe
            rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("test", choices=["send_lat", "write_lat", "read_lat", "write_bw", "send_bw", "guest_ops"])
    p.add_argument("--size", "-s", type=int, action="append", help="message size (repeatable)")
    p.add_argument("--iters", "-n", type=int, default=2000)
    p.add_argument("--batch", "--post-list", "-l", type=int, default=16, dest="batch",
                   help="write_bw/send_bw: WRs per post list (one doorbell), like perftest's -l")
    p.add_argument("--poll-us", type=float, default=0.0, help="daemon busy-poll window")
    p.add_argument("--layout", default="split", help=f"comma-separated, of {LAYOUTS}")
    p.add_argument("--path", default="native", help="comma-separated: native, python")
    p.add_argument("--wait", default="adaptive", help=f"comma-separated, of {WAITS}")
    p.add_argument("--repeat", type=int, default=1, help="rounds, interleaved")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.test == "guest_ops":
        rows = guest_ops()
        if a.json:
            print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
            return 0
        print(header())
        print("# guest library per operation [ns], rings in memory, no daemon; the machine may be shared")
        keys = [k for k in rows[0] if k not in ("path", "round")]
        print("# " + " | ".join(["path   round", *keys]))
        for r in rows:
            print(f"# {r['path']:<6} {r['round']:>5} | " + " | ".join(f"{r[k]:>{len(k)}.0f}" for k in keys))
        return 0
    sizes = a.size or ([1 << 20] if a.test == "write_bw" else [64])
    rows = run(a.test, sizes, a.iters, a.batch, a.poll_us, a.layout.split(","), a.path.split(","),
               a.wait.split(","), a.repeat)
    if a.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    else:
        print(header())
        print(f"# {a.test}, daemon --poll-us {a.poll_us:g}; the machine may be shared with other work")
        print_rows(a.test, rows)
        print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
