"""Tenant isolation under load (issue #12, "Exhaustion").

A victim guest pair on one ``vrdma backend`` measures 64 B RDMA WRITE latency
(post to completion, one WR at a time, signaled) in three phases:

- idle: nothing else on the daemon (the same-run baseline);
- idle connections: another process holds up to 1000 connections of one uid
  and keeps reconnecting those the daemon refuses or times out (a connect
  storm against the per-uid limit);
- greedy guest: another guest fills every cap of its connection (PDs, CQs,
  MRs, QPs) and then keeps hammering refused control commands (one at a time
  and 120 queued with one kick) while a second pair of its QPs streams 4 KiB
  RDMA WRITEs.

The daemon is pinned to CPU 0 and the (busy-polling) victim to CPU 1 in
every phase. Each load runs twice: unpinned at normal priority ("shared
CPUs"), where on a machine with few vCPUs the loads' own busy loops take CPU
time from the victim and the daemon (the scheduler's share, not the
daemon's); and "isolated": pinned to the daemon's CPU at nice 19, so the
daemon preempts them whenever it has work (as vCPU pinning or cgroups would
keep guests off the daemon's core) and what the victim still sees is the
work the daemon does for the loads. A SCHED_IDLE spinner keeps the daemon's
vCPU from halting in every phase (``bench.perftest.idle_spinners``), so an
isolated load's busy loop does not lower the daemon's wake-up latency
against the idle baseline.

It prints p50/p99 per phase, the ratio p99(loaded)/p99(idle) (goal: within
2x), the daemon's CPU use, what the load achieved (connections
held/refused, objects, commands), the daemon's VmRSS cost of one connection
filled to the default caps, and the machine (processor model, vector
extensions)::

    python -m bench.isolation_bench [--iters 20000] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

from bench.machine import header as machine_header, machine
from bench.tenant_hog import Hog, closed_by_peer, idle_connections

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------
# the victim


class Victim:
    def __init__(self, path: str):
        from guest_lib import SGE, SendWR
        from guest_lib.endpoint import RcEndpoint, connect_pair
        from verbs import SendFlags, WrOpcode

        self.a = RcEndpoint(path, 8192, mem_size=8 << 20)
        self.b = RcEndpoint(path, 8192, mem_size=8 << 20)
        connect_pair(self.a, self.b)
        a, b = self.a, self.b
        self.wr = SendWR(wr_id=1, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 64, a.mr.lkey)],
                         remote_addr=b.mr.buf, rkey=b.mr.rkey, send_flags=SendFlags.SIGNALED)

    def run(self, iters: int, warmup: int = 200) -> list[int]:
        from verbs import WcStatus

        qp, cq, wr = self.a.qp, self.a.cq, self.wr
        out = []
        clock = time.perf_counter_ns
        for i in range(warmup + iters):
            t0 = clock()
            qp.post_send(wr)
            while True:
                n, wcs = cq.poll(1)
                if n:
                    break
            t1 = clock()
            if wcs[0].status != WcStatus.SUCCESS:
                raise RuntimeError(f"victim completion error: {wcs[0]}")
            if i >= warmup:
                out.append(t1 - t0)
        return out

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(ns: list[int]) -> dict:
    s = sorted(ns)
    n = len(s)
    return {"iters": n, "p50_us": s[n // 2] / 1e3, "p90_us": s[int(n * 0.9)] / 1e3,
            "p99_us": s[min(n - 1, int(n * 0.99))] / 1e3,
            "max_us": s[-1] / 1e3}


# --------------------------------------------------------------------------
# the loads (each in its own process, stopped through ``stop``)


def _place(cpu: int | None, nice: int) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.nice(nice)


def _storm(path: str, n: int, cpu: int | None, nice: int, stop, ready, out) -> None:
    _place(cpu, nice)
    socks = idle_connections(path, n)
    refused = sum(closed_by_peer(s) for s in socks)
    ready.set()
    reconnects = 0
    while not stop.is_set():
        for i, s in enumerate(socks):
            if closed_by_peer(s):
                s.close()
                fresh = idle_connections(path, 1)
                socks[i] = fresh[0] if fresh else s
                reconnects += 1
        time.sleep(0.001)
    held = sum(not closed_by_peer(s) for s in socks)
    for s in socks:
        s.close()
    out.put({"connections": n, "refused_at_start": refused, "held_at_end": held, "reconnects": reconnects})


def _greedy(path: str, rss_pid: int, cpu: int | None, nice: int, stop, ready, out) -> None:
    _place(cpu, nice)
    from guest_lib import SGE, SendWR
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from verbs import SendFlags, WrOpcode

    before = _rss(rss_pid)
    h = Hog(path, mem_size=16 << 20)
    f = h.fill()
    filled_rss = _rss(rss_pid) - before
    a, b = RcEndpoint(path, 1 << 16, mem_size=8 << 20), RcEndpoint(path, 1 << 16, mem_size=8 << 20)
    connect_pair(a, b)
    wrs = [SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 4096, a.mr.lkey)],
                  remote_addr=b.mr.buf + 4096 * i, rkey=b.mr.rkey, send_flags=SendFlags.SIGNALED)
           for i in range(8)]
    ready.set()
    commands: dict[int, int] = {}
    writes = 0
    from virtio_rdma.constants import Cmd

    while not stop.is_set():
        for k, v in h.hammer(1).items():
            commands[k] = commands.get(k, 0) + v
        for k, v in h.burst(120, Cmd.ALLOC_PD).items():  # 120 at once, one kick
            commands[k] = commands.get(k, 0) + v
        a.qp.post_send(wrs)
        got = 0
        while got < len(wrs):
            got += a.cq.poll(len(wrs) - got)[0]
        writes += len(wrs)
    objects = {k: len(getattr(f, k)) for k in ("pds", "cqs", "mrs", "qps")}
    a.close()
    b.close()
    h.close()
    out.put({"objects": objects, "stopped_by": f.stopped, "daemon_rss_fill_bytes": filled_rss,
             "commands_by_errno": commands, "writes_4k": writes})


NOBODY = 65534


def _newcomer(path: str) -> dict:
    """A new guest of another uid (forked, setuid nobody) connects during the load
    and does one 64 B RDMA WRITE; how long from connect to completion."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            t0 = time.monotonic()
            v = Victim(path)
            v.run(1, warmup=0)
            v.close()
            os.write(w, json.dumps({"admitted": True, "seconds": time.monotonic() - t0}).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"admitted": False, "error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data or b'{"admitted": false, "error": "no output"}')


def _phase(victim: Victim, iters: int, daemon: int, target=None, args=()) -> tuple[dict, dict | None]:
    """The victim's latency while ``target`` loads the daemon; with the
    daemon's CPU use (share of one CPU) during the measurement."""
    if target is None:
        c0, t0 = _cpu_s(daemon), time.monotonic()
        lat = _pct(victim.run(iters))
        lat["daemon_cpu"] = (_cpu_s(daemon) - c0) / (time.monotonic() - t0)
        return lat, None
    ctx = mp.get_context("fork")
    stop, ready, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=target, args=(*args, stop, ready, out))
    p.start()
    try:
        if not ready.wait(120):
            raise RuntimeError(f"{target.__name__} did not get ready")
        c0, t0 = _cpu_s(daemon), time.monotonic()
        lat = _pct(victim.run(iters))
        lat["daemon_cpu"] = (_cpu_s(daemon) - c0) / (time.monotonic() - t0)
        newcomer = _newcomer(args[0]) if os.geteuid() == 0 else {"admitted": None}
    finally:
        stop.set()
    load = out.get(timeout=120)
    load["newcomer_other_uid"] = newcomer
    p.join(30)
    return lat, load


#: where the loads run: (name, CPU or None for anywhere, nice)
LAYOUTS = (("shared", None, 0), ("isolated", 0, 19))
DAEMON_CPU, VICTIM_CPU = 0, 1


def run(iters: int = 20000, storm: int = 1000) -> dict:
    from bench.perftest import idle_spinners, pin_threads
    from vhost_user.testing import DaemonProcess

    pinned = (os.cpu_count() or 1) >= 2
    with DaemonProcess("--socket-mode", "0666") as d:  # the newcomer is another uid
        os.chmod(os.path.dirname(d.path), 0o755)
        pid = d.proc.pid
        if pinned:
            pin_threads(pid, DAEMON_CPU)
        victim = Victim(d.path)
        old = os.sched_getaffinity(0)
        if pinned:
            os.sched_setaffinity(0, {VICTIM_CPU})
        spin = idle_spinners([DAEMON_CPU] if pinned else [])
        spin.__enter__()
        try:
            r = {"machine": machine(), "pinned": pinned}
            idles = []
            # an idle phase before every loaded one and at the end: this machine's
            # other tenants move the idle p99 too, so the baseline is their median
            for name, cpu, nice in LAYOUTS:
                cpu = cpu if pinned else None
                idles.append(_phase(victim, iters, pid)[0])
                r[f"idle_connections_{name}"], r[f"storm_{name}"] = _phase(
                    victim, iters, pid, _storm, (d.path, storm, cpu, nice))
                idles.append(_phase(victim, iters, pid)[0])
                r[f"greedy_guest_{name}"], r[f"greedy_{name}"] = _phase(
                    victim, iters, pid, _greedy, (d.path, pid, cpu, nice))
            idles.append(_phase(victim, iters, pid)[0])
        finally:
            spin.__exit__(None, None, None)
            os.sched_setaffinity(0, old)
            victim.close()
    r["idle_phases"] = idles
    p99s = sorted(x["p99_us"] for x in idles)
    r["idle"] = dict(idles[0], p99_us=p99s[len(p99s) // 2],
                     p50_us=sorted(x["p50_us"] for x in idles)[len(idles) // 2],
                     p90_us=sorted(x["p90_us"] for x in idles)[len(idles) // 2],
                     max_us=max(x["max_us"] for x in idles),
                     daemon_cpu=sorted(x["daemon_cpu"] for x in idles)[len(idles) // 2])
    base = r["idle"]["p99_us"]
    for k in list(r):
        if k.startswith(("idle_connections", "greedy_guest")):
            r[f"ratio_p99_{k}"] = r[k]["p99_us"] / base
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.isolation_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=1000, help="idle connections of the storm")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.iters, args.connections)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    print(machine_header(r["machine"]))
    if r["pinned"]:
        print(f"# daemon on CPU {DAEMON_CPU}, victim on CPU {VICTIM_CPU}; loads: shared = anywhere at nice 0, "
              f"isolated = CPU {DAEMON_CPU} at nice 19")
    print("# victim: 64 B RDMA WRITE, post to completion, one at a time (us)")
    print(f"{'phase':<38}{'iters':>7}{'p50':>9}{'p90':>9}{'p99':>10}{'max':>10}{'p99/idle':>10}{'daemon CPU':>12}")
    base = r["idle"]["p99_us"]
    print("# idle phases p99 (us): " + ", ".join(f"{x['p99_us']:.1f}" for x in r["idle_phases"]))
    rows = [("idle", "idle (median of the idle phases)")]
    for name, _, _ in LAYOUTS:
        rows += [(f"idle_connections_{name}", f"{args.connections} idle connections, {name}"),
                 (f"greedy_guest_{name}", f"greedy guest, {name}")]
    for key, label in rows:
        x = r[key]
        print(f"{label:<38}{x['iters']:>7}{x['p50_us']:>9.2f}{x['p90_us']:>9.2f}{x['p99_us']:>10.2f}{x['max_us']:>10.1f}"
              f"{x['p99_us'] / base:>9.2f}x{x['daemon_cpu'] * 100:>11.0f}%")
    for nice, _, _ in LAYOUTS:
        s, g = r[f"storm_{nice}"], r[f"greedy_{nice}"]
        print(f"# {nice}: storm: {s['connections']} connections, {s['refused_at_start']} refused at "
              f"once, {s['held_at_end']} open at the end (held or queued), {s['reconnects']} reconnects during the phase")
        print(f"# {nice}: greedy guest: objects {g['objects']} (stopped by errno {g['stopped_by']}), "
              f"{sum(g['commands_by_errno'].values())} control commands {g['commands_by_errno']}, "
              f"{g['writes_4k']} 4 KiB writes")
        for what, x in (("storm", s), ("greedy guest", g)):
            n = x["newcomer_other_uid"]
            print(f"# {nice}: during the {what}, a new guest of uid {NOBODY}: "
                  + (f"admitted, connected and wrote in {n['seconds'] * 1e3:.0f} ms" if n.get("admitted")
                     else f"NOT admitted ({n.get('error', 'not run: needs root')})"))
    g = r["greedy_shared"]
    print(f"# daemon VmRSS for the greedy connection filled to the default caps: "
          f"{g['daemon_rss_fill_bytes'] / (1 << 20):.1f} MiB")
    print("# goal: p99 within 2x of idle -> " + ", ".join(
        f"{k[len('ratio_p99_'):]} {v:.2f}x" for k, v in r.items() if k.startswith("ratio_p99_")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
