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
socket (the sides of :mod:`vrdma.perftest`); the daemons run inside the
namespaces with ``--roce-addr``, so every request and response crosses the
veth as RoCEv2 packets.

CPU state, printed with the results. This machine has few vCPUs and an idle
vCPU takes tens of microseconds to wake (halt exits), so every measurement
keeps the vCPUs busy:

* ours: the daemons busy-poll (``--poll-us``; the fabric's socket is polled
  in the same loop) pinned one per CPU (A on the first, B on the second), and
  the two guests share the second CPU, polling their CQs with sched_yield
  (perftest's polling mode);
* the raw-UDP floors: blocking sockets with a SCHED_IDLE spinner on every CPU
  (:func:`bench.perftest.idle_spinners`). The floors with idle vCPUs are
  measured too and printed for reference (what earlier reports compared
  with).

``--layout one-cpu`` puts both daemons and both guests on the first CPU:
what the kernel did in the slowest ``--no-pin`` rounds sampled on this
machine (~170 us there and in this layout); ``--layout daemons-together``
puts both daemons on the first CPU and both guests on the second: the ~2x
rounds (~102 us both ways). The kernel chose these placements at start and
kept them (two busy tasks per CPU look balanced; no migration in a run), and
a daemon sharing its CPU with the other daemon is switched out about 0.7
times per half round trip against about 3 beside its own guest: its
sched_yield rarely hands the CPU to the other poller. A daemon that is not
pinned now moves itself off such a CPU (:class:`vhost_user.spin.CpuShare`);
pinned, as in these layouts, it stays, so they still show the cost. With ``send_lat``
the daemons' scheduler counters (``/proc/PID/task/*/sched``: context
switches, those that slept and those that yielded or were preempted,
migrations) are reported per half round trip.

The bandwidth fraction is taken against the higher of the two UDP stream
floors. ``--auth`` measures ours twice in the same run: plain, then with a
fresh pair of daemons sharing a cluster key (every packet sealed and
verified, roce.auth), and prints both side by side with their ratio. ``--profile DIR`` runs both daemons under cProfile and prints where
their time went (figures are then inflated by the profiler).

    python -m bench.fabric_bench [send_lat|write_bw|both] [--iters N] [--bw-iters N]
                                 [--poll-us US] [--no-pin] [--layout L] [--wait W] [--profile DIR]
                                 [--auth] [--json]

Needs root (network namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench import perftest, udp_baseline
from bench.machine import header as machine_header, machine
from netlab.ns import two_hosts
from vrdma.perftest import BW_HEADER, LAT_HEADER, WAITS, lat_row, run_pair

RXE_LOOPBACK_WRITE_BW_MB = 828.0  # ib_write_bw over rxe loopback, 64 KiB (published figure)
MTU_4096 = 5


CONNECT = dict(path_mtu=MTU_4096, timeout=14, retry_cnt=7, rnr_retry=7)


def _pair(path_server: str, path_client: str, test: str, size: int, iters: int, batch: int,
          guest_cpu: int | tuple[int, int] | None = None, wait: str = "adaptive") -> dict:
    return run_pair(path_server, test, size, iters, batch, guest_cpu,
                    client_path=path_client, connect_attrs=CONNECT, wait=wait)


def _daemon(ns, ip: str, sock: str, poll_us: float, profile: str | None = None,
            key: str | None = None, adaptive: bool = False):
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    auth = ["--cluster-key", key] if key else []
    p = ns.popen([sys.executable, *prof, "-m", "vrdma", "backend", "--socket", sock,
                  "--roce-addr", ip, "--poll-us", str(poll_us), *auth,
                  *(["--poll-adaptive"] if adaptive else [])])
    p.expect("listening", timeout=30)
    return p


def _print_profile(path: str, label: str, top: int = 25) -> None:
    import pstats

    print(f"# {label}: cProfile, top {top} functions by own time")
    pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(top)


#: /proc/PID/sched fields summed over a daemon's threads (:func:`sched_counts`)
SCHED_FIELDS = ("nr_switches", "nr_voluntary_switches", "nr_involuntary_switches", "se.nr_migrations")


def sched_counts(pid: int) -> dict[str, int]:
    """The scheduler's counters of process ``pid`` (every thread): context
    switches (voluntary: it slept; involuntary: preempted, or a sched_yield
    that ran another task) and migrations between CPUs."""
    out = dict.fromkeys(SCHED_FIELDS, 0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    k = k.strip()
                    if k in out:
                        out[k] += int(float(v))
        except OSError:  # a thread that ended meanwhile
            continue
    return out


def _per_half_rtt(before: dict, after: dict, halves: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / halves for k in SCHED_FIELDS}


LAYOUTS = ("per-host", "guests-together", "one-cpu", "daemons-together")
#: pin layouts: per-host (each simulated host on its own CPU: daemon + its
#: guest), guests-together (both guests on daemon B's CPU), one-cpu (all four
#: on the first CPU: what the kernel does in the slow --no-pin rounds when
#: another task holds the other CPU), daemons-together (both daemons on the
#: first CPU, both guests on the second: the ~2x --no-pin rounds)


def run(tests, *, iters: int = 2000, bw_iters: int = 20000, batch: int = 16,
        poll_us: float = 50.0, pin: bool = True, profile_dir: str | None = None,
        layout: str = "per-host", auth: bool = False, adaptive: bool = False,
        wait: str = "adaptive") -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    cpus = sorted(os.sched_getaffinity(0))
    pin = pin and len(cpus) >= 2
    out: dict = {"cpus": cpus, "poll_adaptive": adaptive}
    if pin and layout == "per-host":  # each simulated host on its own CPU: daemon + its guest
        guest_cpu = (cpus[1], cpus[0])  # (server guest on daemon B, client guest on daemon A)
        out["vcpu_state"] = (f"host A (daemon + client guest) on cpu {cpus[0]}, host B (daemon + "
                             f"server guest) on cpu {cpus[1]}; daemons busy-polling (--poll-us "
                             f"{poll_us:g}), guests polling with sched_yield")
    elif pin and layout == "one-cpu":  # what the kernel sometimes does with --no-pin
        guest_cpu = cpus[0]
        out["vcpu_state"] = (f"daemons A and B and both guests on cpu {cpus[0]}; daemons busy-"
                             f"polling (--poll-us {poll_us:g}), guests polling with sched_yield")
    elif pin and layout == "daemons-together":  # the other slow --no-pin placement
        guest_cpu = cpus[1]
        out["vcpu_state"] = (f"daemons A and B on cpu {cpus[0]}, both guests on cpu {cpus[1]}; "
                             f"daemons busy-polling (--poll-us {poll_us:g}), guests polling with "
                             "sched_yield")
    elif pin:
        guest_cpu = cpus[1]
        out["vcpu_state"] = (f"daemon A on cpu {cpus[0]}, daemon B on cpu {cpus[1]}, both busy-"
                             f"polling (--poll-us {poll_us:g}); guests on cpu {cpus[1]}, polling "
                             "with sched_yield")
    else:
        guest_cpu = None
        out["vcpu_state"] = (f"not pinned; daemons busy-polling (--poll-us {poll_us:g}); guests "
                             "polling with sched_yield (adaptive: a learnt spin first)")
    out["floor_vcpu_state"] = (f"SCHED_IDLE spinners on cpus {cpus}" + (
        f"; sender on cpu {cpus[0]}, receiver on cpu {cpus[1]}" if pin else ""))
    with two_hosts() as lab, tempfile.TemporaryDirectory() as d:
        sa, sb = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
        prof = [os.path.join(profile_dir, f"daemon_{n}.prof") if profile_dir else None
                for n in "ab"]
        da = _daemon(lab.a, lab.ip_a, sa, poll_us, prof[0], adaptive=adaptive)
        db = _daemon(lab.b, lab.ip_b, sb, poll_us, prof[1], adaptive=adaptive)
        if pin:
            perftest.pin_threads(da.pid, cpus[0])
            perftest.pin_threads(db.pid, cpus[0] if layout in ("one-cpu", "daemons-together")
                                 else cpus[1])
        # the floors' two sides sit where the two simulated hosts do (a wakeup
        # across CPUs costs an IPI: on this VM ~20 us against ~5 us on one CPU)
        sides = (cpus[0], cpus[1]) if pin else (None, None)
        if "send_lat" in tests:
            n = max(iters, 2000)
            idle = udp_baseline.latency(lab, size=64, iters=n, cpus=sides)
            with perftest.idle_spinners(cpus):
                floor = udp_baseline.latency(lab, size=64, iters=n, cpus=sides)
            before = [sched_counts(p.pid) for p in (da, db)]
            ours = _pair(sb, sa, "send_lat", 64, iters, batch, guest_cpu, wait)
            after = [sched_counts(p.pid) for p in (da, db)]
            # per half round trip: the pair makes ``iters`` round trips (and a few to connect)
            ours["daemon_sched_per_half_rtt"] = {
                n: _per_half_rtt(b, a, 2 * iters) for n, b, a in zip("AB", before, after, strict=True)}
            out["send_lat"] = {"ours": ours, "udp_floor": floor, "udp_floor_idle_vcpus": idle,
                               "ratio_typical": ours["t_typical"] / floor["t_typical"],
                               "ratio_vs_idle_floor": ours["t_typical"] / idle["t_typical"]}
        if "write_bw" in tests:
            idle = udp_baseline.throughput(lab, size=4096, seconds=1.0, cpus=sides)
            with perftest.idle_spinners(cpus):
                floor = udp_baseline.throughput(lab, size=4096, seconds=1.0, cpus=sides)
            best = max(idle["MB_per_s"], floor["MB_per_s"])
            ours = _pair(sb, sa, "write_bw", 65536, bw_iters, batch, guest_cpu)
            mb = ours["bw_avg_MiB"] * 2**20 / 1e6
            out["write_bw"] = {"ours": ours, "udp_floor": floor, "udp_floor_idle_vcpus": idle,
                               "MB_per_s": mb, "fraction_of_udp": mb / best,
                               "fraction_of_rxe_828": mb / RXE_LOOPBACK_WRITE_BW_MB}
        if profile_dir:
            for p in (da, db):
                p.stop(timeout=30)  # SIGTERM: the daemons exit cleanly and cProfile writes
        if auth:
            _auth_runs(out, lab, d, tests, iters, bw_iters, batch, poll_us, pin, cpus, guest_cpu,
                       (da, db))
    if profile_dir:
        out["profiles"] = prof
    return out


def mac_cost(rounds: int = 200) -> dict:
    """CPU time of sealing and of verifying the 16 packets of one 64 KiB
    WRITE at MTU 4096 on the rings alone (no network), against building them
    unsealed: what the authenticated fabric adds per 64 KiB on each side."""
    import time

    from roce.auth import derive_mac_key
    from roce._auth import RxAuth, TxAuth
    from roce._codec import Envelope
    from roce._udpio import RxRing, TxRing
    from roce.headers import Bth
    from roce.packet import RocePacket
    from roce.udp import make_socket

    key = derive_mac_key(os.urandom(32))
    pkt = RocePacket(Bth(opcode=0x07, dest_qp=0x44, psn=1), payload=os.urandom(4096))
    out = {}
    a, b = make_socket("127.0.0.1", 0), make_socket("127.0.0.1", 0)
    try:
        env = Envelope("127.0.0.1", "127.0.0.1", a.getsockname()[1], b.getsockname()[1])
        for seal in (False, True):
            tx = TxRing(64)
            tx.set_auth(TxAuth(key, 1))
            t = time.perf_counter()
            for _ in range(rounds):
                for _ in range(16):
                    tx.add(pkt, env, seal)
                tx.clear()
            out["tx_sealed_us" if seal else "tx_plain_us"] = (time.perf_counter() - t) / rounds * 1e6
        tx, rx, spent = TxRing(64), RxRing(64), 0.0
        tx.set_auth(TxAuth(key, 1))
        for _ in range(rounds // 2):
            for _ in range(16):
                tx.add(pkt, env, True)
            tx.flush(a.fileno())
            n = 0
            while n < 16:
                time.sleep(0.0005)
                n = rx.recv(b.fileno()) if n == 0 else n
            ra = RxAuth(key, "127.0.0.1", b.getsockname()[1])
            t = time.perf_counter()
            rx.open_sealed(n, ra)
            spent += time.perf_counter() - t
            assert ra.opened == 16, "sealed datagrams did not verify"
        out["rx_open_us"] = spent / (rounds // 2) * 1e6
    finally:
        a.close()
        b.close()
    return out


def _auth_runs(out, lab, d, tests, iters, bw_iters, batch, poll_us, pin, cpus, guest_cpu,
               plain_daemons) -> None:
    """The same measurements between two daemons sharing a cluster key."""
    from roce.auth import write_key_file

    for p in plain_daemons:
        if p.alive():
            p.stop(timeout=30)
    key = os.path.join(d, "cluster.key")
    write_key_file(key)
    sa, sb = os.path.join(d, "a-auth.sock"), os.path.join(d, "b-auth.sock")
    da = _daemon(lab.a, lab.ip_a, sa, poll_us, key=key)
    db = _daemon(lab.b, lab.ip_b, sb, poll_us, key=key)
    if pin:
        perftest.pin_threads(da.pid, cpus[0])
        perftest.pin_threads(db.pid, cpus[1])
    if "send_lat" in tests:
        s = out["send_lat"]
        s["ours_auth"] = _pair(sb, sa, "send_lat", 64, iters, batch, guest_cpu)
        s["auth_ratio_typical"] = s["ours_auth"]["t_typical"] / s["ours"]["t_typical"]
    out["mac_cost"] = mac_cost()
    if "write_bw" in tests:
        w = out["write_bw"]
        w["ours_auth"] = _pair(sb, sa, "write_bw", 65536, bw_iters, batch, guest_cpu)
        w["MB_per_s_auth"] = w["ours_auth"]["bw_avg_MiB"] * 2**20 / 1e6
        w["auth_ratio"] = w["MB_per_s_auth"] / w["MB_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fabric_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("test", nargs="?", default="both", choices=["send_lat", "write_bw", "both"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--bw-iters", type=int, default=20000,
                    help="64 KiB WRITEs (a long run: perftest's write_bw client may start before "
                         "the server's QP is ready, which costs one retransmission timeout)")
    ap.add_argument("--batch", type=int, default=16, help="WRITEs posted per signaled batch")
    ap.add_argument("--poll-us", type=float, default=50.0, help="daemons' busy-poll window")
    ap.add_argument("--poll-adaptive", action="store_true",
                    help="daemons adapt their busy-poll window within --poll-us (vhost_user.spin)")
    ap.add_argument("--no-pin", action="store_true", help="leave daemons and guests unpinned")
    ap.add_argument("--layout", choices=LAYOUTS, default="per-host",
                    help="per-host: each daemon shares its CPU with its own guest (as on two "
                         "hosts); guests-together: both guests on daemon B's CPU; one-cpu: "
                         "daemons and guests all on the first CPU (the slow --no-pin rounds)")
    ap.add_argument("--wait", choices=WAITS, default="adaptive",
                    help="how the send_lat guests wait for completions (vrdma.perftest.CqWaiter)")
    ap.add_argument("--profile", metavar="DIR", help="run the daemons under cProfile into DIR")
    ap.add_argument("--auth", action="store_true",
                    help="also measure between daemons sharing a cluster key (authenticated "
                         "fabric), printed beside the plain figures with the ratio")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.fabric_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    tests = ["send_lat", "write_bw"] if a.test == "both" else [a.test]
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    r = run(tests, iters=a.iters, bw_iters=a.bw_iters, batch=a.batch, poll_us=a.poll_us,
            pin=not a.no_pin, profile_dir=a.profile, layout=a.layout, auth=a.auth,
            adaptive=a.poll_adaptive, wait=a.wait)
    r["machine"] = machine()
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(machine_header(r["machine"]))
    if "send_lat" in r:
        s = r["send_lat"]
        print("# 64 B SEND across veth, two daemons (half round trip, ib_send_lat columns)")
        print(LAT_HEADER)
        print(lat_row(s["ours"]))
        print("# raw UDP 64 B ping-pong over the same veth (half round trip), spinners")
        print(lat_row(s["udp_floor"]))
        print("# the same with idle vCPUs")
        print(lat_row(s["udp_floor_idle_vcpus"]))
        for n, c in s["ours"]["daemon_sched_per_half_rtt"].items():
            print(f"# daemon {n} per half round trip: {c['nr_switches']:.2f} context switches "
                  f"({c['nr_voluntary_switches']:.2f} slept, {c['nr_involuntary_switches']:.2f} "
                  f"yielded or preempted), {c['se.nr_migrations']:.3f} migrations")
        print(f"# ratio (typical): {s['ratio_typical']:.2f}x   goal <= 1.5x   "
              f"(vs the idle-vCPU floor: {s['ratio_vs_idle_floor']:.2f}x)")
        if "ours_auth" in s:
            print("# the same SEND between daemons sharing a cluster key (authenticated)")
            print(lat_row(s["ours_auth"]))
            print(f"# authenticated / plain (typical): {s['ours_auth']['t_typical']:.2f} / "
                  f"{s['ours']['t_typical']:.2f} us = {s['auth_ratio_typical']:.2f}x")
    if "write_bw" in r:
        w = r["write_bw"]
        print("# 64 KiB RDMA WRITE across veth, path MTU 4096 (ib_write_bw columns)")
        print(BW_HEADER)
        o = w["ours"]
        print(f"{o['bytes']:<7}{o['iterations']:<12}{o['bw_peak_MiB']:<19.2f}{o['bw_avg_MiB']:<22.2f}"
              f"{o['msg_rate_Mpps']:.6f}")
        print(f"# = {w['MB_per_s']:.1f} MB/s; raw UDP 4 KiB stream over the same veth: "
              f"{w['udp_floor']['MB_per_s']:.1f} MB/s (spinners), "
              f"{w['udp_floor_idle_vcpus']['MB_per_s']:.1f} MB/s (idle vCPUs) -> "
              f"{w['fraction_of_udp']:.2f} of the higher (goal >= 0.5); "
              f"vs rxe loopback 828 MB/s: {w['fraction_of_rxe_828']:.2f}")
        if "ours_auth" in w:
            o = w["ours_auth"]
            print("# the same WRITE between daemons sharing a cluster key (authenticated)")
            print(f"{o['bytes']:<7}{o['iterations']:<12}{o['bw_peak_MiB']:<19.2f}"
                  f"{o['bw_avg_MiB']:<22.2f}{o['msg_rate_Mpps']:.6f}")
            print(f"# authenticated / plain: {w['MB_per_s_auth']:.1f} / {w['MB_per_s']:.1f} MB/s "
                  f"= {w['auth_ratio']:.2f}")
    if "mac_cost" in r:
        c = r["mac_cost"]
        print(f"# MAC CPU time per 64 KiB WRITE (16 x 4 KiB packets, rings only): build "
              f"{c['tx_plain_us']:.1f} us plain, {c['tx_sealed_us']:.1f} us sealed; verify + "
              f"strip {c['rx_open_us']:.1f} us")
    print(f"# vCPUs during our runs: {r['vcpu_state']}"
          f"{' (adaptive poll window)' if r['poll_adaptive'] else ''}; during the UDP floors: "
          f"{r['floor_vcpu_state']} (and idle, for reference)")
    for path, label in zip(r.get("profiles", ()), ("daemon A (client side)",
                                                    "daemon B (server side)")):
        _print_profile(path, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
