"""Issue 17's table in one command: every goal, each against its baseline from the same run.

Runs the project's own benchmarks (their functions, imported: no measurement
code lives here) and prints one table, ``row | ours | baseline | ratio | goal |
met`` plus the CPU layout each row used and, where a goal is missed, what the
benchmark measured about where the time goes (``profile``):

==================  ==========================================  ===============================
row group (--only)  ours                                        baseline (same run)
==================  ==========================================  ===============================
local_lat_poll      same-host 64 B SEND half round trip,        two-process eventfd ping-pong,
                    daemon ``--poll-us 200`` (bench.perftest),  one process per CPU (goal: at
                    layouts split and shared                    most 2.5x)
local_lat_block     the same, blocking daemon                   the same floor (at most 4x)
fabric_lat          two hosts (namespaces), 64 B SEND, pinned   raw UDP 64 B ping-pong over
                    (bench.fabric_bench)                        the same veth (at most 1.5x)
fabric_lat_nopin    the same, ``--no-pin``                      the pinned figure of the same
                                                                round (at most 2x)
fabric_write_bw     64 KiB RDMA WRITE, path MTU 4096, MB/s      raw UDP 4 KiB stream (at least
                                                                0.7); kernel rxe's published
                                                                828 MB/s (above it)
fft                 2048-point batch in L2 (all LTE/NR sizes    scipy.fft and pyFFTW, both
                    unless --quick), both dtypes, every SIMD    measured interleaved (at least
                    path the CPU has (vrdma.accel_bench)        1.0x; pyFFTW parity)
fft_overhead        fft() on one row with a cached plan, minus  the empty Cython call (goal: at
                    the bare kernel                             most 2 us absolute)
turbo               Turbo decode K=6144, 8 iterations, Mbit/s   commpy's turbo_decode (goal: at
                    per thread-CPU second, the AVX2 and         least 15 Mbit/s absolute)
                    AVX-512 paths
==================  ==========================================  ===============================

When the two-host latency goal is missed, its profile also gives
:mod:`bench.relay_floor` from the same rounds: the same layout (two processes
sharing each host's CPU, handing over through shared memory) forwarding UDP
with no protocol work, which separates what the layout costs from what the
daemons and guests do per message.

``--repeat N`` runs the daemon benchmarks N rounds, interleaved (each round
measures its floor again), and reports the medians; for the kernels it is the
number of best-of samples. ``--quick`` shortens every benchmark (fewer
iterations, FFT size 2048 only, fewer Turbo frames). The fabric rows need root
(network namespaces); without it they are listed as skipped, with the reason.

    python -m bench.suite [--quick] [--json FILE] [--only ROW,...] [--repeat N]

Timings taken while other work shares the machine are noisy: the ratios, each
against a baseline from the same run, are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from bench.machine import header, machine

# numpy's OpenBLAS starts a worker thread per CPU that busy-waits after a BLAS
# call: on 2 vCPUs it took 2-12% of the samples of the kernel rows' process
# (and the daemons' processes inherit the environment). No row uses BLAS
# threading, so one thread; set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

GROUPS = ("local_lat_poll", "local_lat_block", "fabric_lat", "fabric_lat_nopin", "fabric_write_bw",
          "fft", "fft_overhead", "turbo")
FABRIC = ("fabric_lat", "fabric_lat_nopin", "fabric_write_bw")
TURBO_PATHS = ("avx2", "avx512")
KERNEL_LAYOUT = "one thread, unpinned; times are the thread's CPU time (time.thread_time)"
TURBO_LAYOUT = ("one thread, unpinned; ours per second of the thread's CPU time (time.thread_time, as the "
                "FFT rows: a shared machine deschedules the thread), commpy per second of wall time")
SCHEMA_KEYS = ("row", "group", "ours", "unit", "baseline", "baseline_name", "baseline_source",
               "ratio", "ratio_is", "goal", "goal_op", "goal_on", "met", "layout", "profile", "rounds")

# the goals of issue 17's table: (on "ratio" or "ours", "<=" or ">=", value)
GOALS: dict[str, tuple[str, str, float]] = {
    "local_lat_poll": ("ratio", "<=", 2.5),
    "local_lat_block": ("ratio", "<=", 4.0),
    "fabric_lat": ("ratio", "<=", 1.5),
    "fabric_lat_nopin": ("ratio", "<=", 2.0),
    "fabric_write_bw_udp": ("ratio", ">=", 0.7),
    "fabric_write_bw_rxe": ("ratio", ">=", 1.0),
    "fft": ("ratio", ">=", 1.0),
    "fft_overhead": ("ours", "<=", 2.0),
    "turbo": ("ours", ">=", 15.0),
}


def _row(group: str, name: str, goal_key: str, ours: list[float], baseline: list[float], *, unit: str,
         baseline_name: str, ratio_is: str, layout: str, profile: str,
         baseline_source: str = "same run") -> dict:
    """One table row from per-round (ours, baseline) figures: medians, and the goal checked."""
    if ratio_is == "ours/baseline":
        ratios = [o / b for o, b in zip(ours, baseline, strict=True)]
    elif ratio_is == "baseline/ours":
        ratios = [b / o for o, b in zip(ours, baseline, strict=True)]
    else:
        raise ValueError(f"ratio_is {ratio_is!r}")
    on, op, value = GOALS[goal_key]
    r: dict = {"row": name, "group": group, "ours": statistics.median(ours), "unit": unit,
               "baseline": statistics.median(baseline), "baseline_name": baseline_name,
               "baseline_source": baseline_source, "ratio": statistics.median(ratios), "ratio_is": ratio_is,
               "goal": value, "goal_op": op, "goal_on": on, "layout": layout, "profile": "",
               "rounds": [{"ours": o, "baseline": b, "ratio": q}
                          for o, b, q in zip(ours, baseline, ratios, strict=True)]}
    x: float = r[on]
    r["met"] = bool(x <= value if op == "<=" else x >= value)
    if not r["met"]:
        r["profile"] = profile or "see note"
    return r


# ------------------------------------------------------------- same host (bench.perftest)
def _waits(r: dict) -> str:
    return (f"client waits spun/yielded/blocked {r['waits_spun']}/{r['waits_yielded']}/{r['waits_blocked']}, "
            f"server {r.get('server_waits_spun', '?')}/{r.get('server_waits_yielded', '?')}/"
            f"{r.get('server_waits_blocked', '?')}; t_avg {r['t_avg']:.1f} us, p99 {r['p99']:.1f} us")


def local_rows(groups, quick: bool, repeat: int) -> list[dict]:
    from bench import perftest

    iters = 1000 if quick else 5000
    layouts = ("split", "shared") if len(os.sched_getaffinity(0)) >= 2 else ("shared",)
    modes = [(g, p) for g, p in (("local_lat_poll", 200.0), ("local_lat_block", 0.0)) if g in groups]
    per: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeat):  # the rounds interleave polling and blocking, each with its own floor
        for group, poll_us in modes:
            for r in perftest.run("send_lat", [64], iters, poll_us=poll_us, layouts=layouts):
                per.setdefault((group, r["layout"]), []).append(r)
    rows = []
    for (group, layout), rs in per.items():
        how = "daemon polling --poll-us 200" if group == "local_lat_poll" else "daemon blocking"
        mid = sorted(rs, key=lambda r: r["ratio_vs_floor"])[len(rs) // 2]
        rows.append(_row(group, f"same host 64 B SEND half RTT, {how}, layout {layout}", group,
                         [r["t_typical"] for r in rs], [r["floor_eventfd_half_rtt_us"] for r in rs],
                         unit="us", baseline_name="eventfd ping-pong half RTT, two processes on two CPUs",
                         ratio_is="ours/baseline",
                         layout=f"{rs[0]['vcpu_state']}; floor: {rs[0]['floor_vcpu_state']}",
                         profile=_waits(mid)))
    return rows


# ------------------------------------------------------------- two hosts (bench.fabric_bench)
NOTES = {
    "fft": ("the FFT benchmark times whole transforms (no per-stage timings): what it shows about where the "
            "time goes is the same size on each SIMD path and the call-overhead rows (kernel alone vs "
            "fft()); every size and path: python -m vrdma.accel_bench.fft_bench --simd all"),
}
FABRIC_NOTE = "where the daemons' time goes: python -m bench.fabric_bench --profile DIR (cProfile of both)"


def _relay_note(ours: list[dict], relay: list[dict]) -> str:
    """What the layout itself costs (bench.relay_floor, same rounds) next to ours."""
    o = statistics.median(x["ours"]["t_typical"] for x in ours)
    f = statistics.median(x["t_typical"] for x in relay)
    u = statistics.median(x["udp_floor"]["t_typical"] for x in ours)
    return (f"the same layout with no protocol work (bench.relay_floor: a relay sharing each host's CPU, "
            f"two hand-overs per half RTT) {f:.1f} us = {f / u:.2f}x raw UDP, so {o - f:.1f} us of ours "
            f"is the daemons' and guests' work per half RTT (one daemon's steps: python -m bench.wire_steps "
            f"--parts)")


def fabric_rows(groups, quick: bool, repeat: int) -> list[dict]:
    from bench import fabric_bench, relay_floor

    iters, bw_iters = (1000, 2000) if quick else (2000, 20000)
    lat = "fabric_lat" in groups or "fabric_lat_nopin" in groups
    pinned, nopin, bw, relay = [], [], [], []
    cpus = sorted(os.sched_getaffinity(0))
    for _ in range(repeat):
        tests = (["send_lat"] if lat else []) + (["write_bw"] if "fabric_write_bw" in groups else [])
        r = fabric_bench.run(tests, iters=iters, bw_iters=bw_iters)
        if lat:
            pinned.append(r)
        if "fabric_lat" in groups:
            relay.append(relay_floor.latency(iters=iters, cpus=(cpus[0], cpus[-1])))
        if "fabric_write_bw" in groups:
            bw.append(r)
        if "fabric_lat_nopin" in groups:
            nopin.append(fabric_bench.run(["send_lat"], iters=iters, pin=False))
    rows = []
    if "fabric_lat" in groups:
        s = [p["send_lat"] for p in pinned]
        rows.append(_row("fabric_lat", "two hosts 64 B SEND half RTT, pinned", "fabric_lat",
                         [x["ours"]["t_typical"] for x in s], [x["udp_floor"]["t_typical"] for x in s],
                         unit="us", baseline_name="raw UDP 64 B ping-pong half RTT, same veth",
                         ratio_is="ours/baseline",
                         layout=f"{pinned[0]['vcpu_state']}; floor: {pinned[0]['floor_vcpu_state']}",
                         profile=(f"{_waits(s[len(s) // 2]['ours'])}; {_relay_note(s, relay)}; "
                                  f"{FABRIC_NOTE}")))
    if "fabric_lat_nopin" in groups:
        s = [p["send_lat"] for p in nopin]
        mid = s[len(s) // 2]
        rows.append(_row("fabric_lat_nopin", "two hosts 64 B SEND half RTT, --no-pin", "fabric_lat_nopin",
                         [x["ours"]["t_typical"] for x in s],
                         [p["send_lat"]["ours"]["t_typical"] for p in pinned],
                         unit="us", baseline_name="the pinned figure, same round",
                         ratio_is="ours/baseline", layout=nopin[0]["vcpu_state"],
                         profile=(f"{_waits(mid['ours'])}; vs raw UDP unpinned {mid['ratio_typical']:.2f}x; "
                                  f"{FABRIC_NOTE}")))
    if "fabric_write_bw" in groups:
        w = [p["write_bw"] for p in bw]
        mid = w[len(w) // 2]
        prof = (f"peak {mid['ours']['bw_peak_MiB']:.0f} MiB/s vs avg {mid['ours']['bw_avg_MiB']:.0f}; "
                f"UDP floor rcvbuf drops {mid['udp_floor']['rcvbuf_drops']}; {FABRIC_NOTE}")
        layout = f"{bw[0]['vcpu_state']}; floor: {bw[0]['floor_vcpu_state']}"
        mb = [x["MB_per_s"] for x in w]
        rows.append(_row("fabric_write_bw", "two hosts 64 KiB RDMA WRITE, MTU 4096, vs raw UDP",
                         "fabric_write_bw_udp", mb,
                         [max(x["udp_floor"]["MB_per_s"], x["udp_floor_idle_vcpus"]["MB_per_s"]) for x in w],
                         unit="MB/s",
                         baseline_name="raw UDP 4 KiB stream, same veth (higher of spinners/idle)",
                         ratio_is="ours/baseline", layout=layout, profile=prof))
        rows.append(_row("fabric_write_bw", "two hosts 64 KiB RDMA WRITE, MTU 4096, vs kernel rxe",
                         "fabric_write_bw_rxe", mb, [fabric_bench.RXE_LOOPBACK_WRITE_BW_MB] * len(mb),
                         unit="MB/s", baseline_name="kernel rxe loopback ib_write_bw 64 KiB",
                         baseline_source="published", ratio_is="ours/baseline", layout=layout, profile=prof))
    return rows


# ------------------------------------------------------------- kernels (vrdma.accel_bench)
def fft_rows(groups, quick: bool, repeat: int) -> list[dict]:
    from accel_core import simd
    from vrdma.accel_bench import fft_bench

    sizes = () if "fft" not in groups else (2048,) if quick else fft_bench.DEFAULT_SIZES
    paths = simd.available_paths()
    res = fft_bench.run_fft_bench(sizes=sizes, repeat=max(3, repeat), paths=paths,
                                  sample_s=0.01 if quick else 0.02, overhead="fft_overhead" in groups)
    rows = []
    if "fft" in groups:
        for r in (r for r in res if r["case"] == "fft"):
            name = f"FFT {r['size']} {r['dtype']} x{r['batch']} ({r['batch_kib']} KiB) [{r['simd_path']}]"
            for base in ("scipy", "pyfftw"):
                if r[f"{base}_us"] is None:
                    continue
                rows.append(_row("fft", f"{name} vs {base}", "fft", [r["ours_us"]], [r[f"{base}_us"]],
                                 unit="us/transform", baseline_name={"scipy": "scipy.fft (pocketfft)",
                                                                     "pyfftw": "pyFFTW FFTW_MEASURE"}[base],
                                 ratio_is="baseline/ours", layout=KERNEL_LAYOUT, profile=""))
    for r in (r for r in res if r["case"] == "call overhead"):
        if r["size"] != 16:
            continue
        rows.append(_row("fft_overhead", f"FFT call overhead, n=16 1 row {r['dtype']} [{r['simd_path']}]",
                         "fft_overhead", [r["overhead_us"]], [r["noop_us"]], unit="us",
                         baseline_name="empty Cython call", ratio_is="ours/baseline", layout=KERNEL_LAYOUT,
                         profile=(f"fft(out=) {r['fft_out_us']:.2f} us = kernel {r['kernel_us']:.2f} us + "
                                  f"validation/dispatch; fft() allocating {r['fft_alloc_us']:.2f} us")))
    return rows


def turbo_rows(groups, quick: bool, repeat: int) -> list[dict]:
    from accel_core import simd
    from vrdma.accel_bench import turbo_bench

    paths = tuple(p for p in TURBO_PATHS if p in simd.available_paths())
    if not paths:
        return []
    res = turbo_bench.run_turbo_bench(frames=32 if quick else 128, commpy_frames=1 if quick else 2,
                                      repeat=max(2, repeat), paths=paths)
    commpy = next(r for r in res if "ratio_vs_commpy" in r and "simd_path" not in r)
    rows = []
    for p in paths:
        batch = next(r for r in res if r.get("simd_path") == p and r["batch"] > 1)
        one = next(r for r in res if r.get("simd_path") == p and r["batch"] == 1)
        rows.append(_row("turbo", f"Turbo decode K={batch['K']} {batch['iterations']} it, batch "
                                  f"{batch['batch']} [{p}]", "turbo", [batch["mbit_s_cpu"]],
                         [commpy["mbit_s"]], unit="Mbit/s",
                         baseline_name="commpy turbo_decode (Python log-MAP)",
                         ratio_is="ours/baseline", layout=TURBO_LAYOUT,
                         profile=(f"per wall second {batch['mbit_s']:.3g} Mbit/s; "
                                  f"one block per call {one['mbit_s']:.3g} Mbit/s; bit errors "
                                  f"{batch['bit_errors']}")))
    return rows


RUNNERS: list[tuple[tuple[str, ...], Callable[..., list[dict]]]] = [
    (("local_lat_poll", "local_lat_block"), local_rows),
    (FABRIC, fabric_rows),
    (("fft", "fft_overhead"), fft_rows),
    (("turbo",), turbo_rows),
]


def run_suite(groups=GROUPS, *, quick: bool = False, repeat: int = 1) -> dict:
    """Every selected row group; returns {"machine", "quick", "repeat", "rows", "skipped", "notes",
    "seconds"}: each row has :data:`SCHEMA_KEYS`, a row that misses its goal a non-empty "profile"
    ("see note": the group's entry in "notes")."""
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"row group {g!r} is not one of {GROUPS}")
    if repeat < 1:
        raise ValueError(f"repeat {repeat} must be at least 1")
    rows: list[dict] = []
    skipped: list[dict] = []
    t0 = time.perf_counter()
    for owned, fn in RUNNERS:
        mine = [g for g in owned if g in groups]
        if not mine:
            continue
        if fn is fabric_rows and os.geteuid() != 0:
            skipped.extend({"group": g, "reason": "needs root (network namespaces)"} for g in mine)
            continue
        got = fn(mine, quick, repeat)
        rows.extend(got)
        skipped.extend({"group": g, "reason": "no such SIMD path on this CPU" if g == "turbo" else "no rows"}
                       for g in mine if not any(r["group"] == g for r in got))
    if "turbo" in groups:
        from accel_core import simd
        skipped.extend({"group": "turbo", "reason": f"SIMD path {p} not available on this CPU"}
                       for p in TURBO_PATHS if p not in simd.available_paths())
    notes = {g: NOTES.get(g, "the benchmark exposes no per-stage timings")
             for g in sorted({r["group"] for r in rows if r["profile"] == "see note"})}
    return {"machine": machine(), "quick": quick, "repeat": repeat, "rows": rows, "skipped": skipped,
            "notes": notes, "seconds": time.perf_counter() - t0}


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _ratio(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.3g}"


def format_table(res: dict) -> str:
    """The machine header, one line per row, the layouts and the profiles of missed goals."""
    out = [header(res["machine"]),
           (f"# bench.suite{' --quick' if res['quick'] else ''} --repeat {res['repeat']}: each baseline "
            "measured in the same run unless marked (published); the machine may be shared with other work")]
    w = max([len(r["row"]) for r in res["rows"]] + [3])
    out.append(f"{'row':<{w}}  {'ours':>9} {'baseline':>9} {'unit':<12} {'ratio':>7}  {'goal':<16} met")
    layouts: list[str] = []
    for r in res["rows"]:
        goal = f"{r['goal_on']} {r['goal_op']} {r['goal']:g}"
        if r["layout"] not in layouts:
            layouts.append(r["layout"])
        base = _num(r["baseline"]) + ("*" if r["baseline_source"] != "same run" else "")
        out.append(f"{r['row']:<{w}}  {_num(r['ours']):>9} {base:>9} {r['unit']:<12} "
                   f"{_ratio(r['ratio']):>6}x  {goal:<16} {'yes' if r['met'] else 'NO'}  "
                   f"[L{layouts.index(r['layout']) + 1}]")
    out.append("# ratio: " + "; ".join(sorted({f"{r['group']} {r['ratio_is']}" for r in res["rows"]})))
    names = sorted({f"{r['group']}: {r['baseline_name']}" for r in res["rows"]})
    out.append("# baselines: " + "; ".join(names))
    if any(r["baseline_source"] != "same run" for r in res["rows"]):
        out.append("# *: a published reference figure, not measured here")
    out.extend(f"# L{i + 1}: {lay}" for i, lay in enumerate(layouts))
    missed = [r for r in res["rows"] if not r["met"]]
    if missed:
        out.append("# where the time goes, for the goals not met:")
        out.extend(f"#   {r['row']}: {r['profile']}" for r in missed if r["profile"] != "see note")
        for g in res["notes"]:
            n = sum(r["group"] == g and r["profile"] == "see note" for r in missed)
            out.append(f"#   {n} {g} rows (marked NO above): see note ({g})")
    out.extend(f"# note ({g}): {note}" for g, note in res["notes"].items())
    out.extend(f"# skipped {s['group']}: {s['reason']}" for s in res["skipped"])
    out.append(f"# {len(res['rows'])} rows, {sum(r['met'] for r in res['rows'])} goals met, "
               f"{res['seconds']:.0f} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, FFT 2048 only")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE ('-': stdout)")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated row groups, of {GROUPS}")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (daemon benchmarks) / samples (kernels)")
    a = ap.parse_args(argv)
    groups = tuple(g for g in a.only.split(",") if g)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        ap.error(f"--only: unknown row group(s) {bad}; choose from {GROUPS}")
    if a.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {a.repeat}")
    res = run_suite(groups, quick=a.quick, repeat=a.repeat)
    if a.json == "-":
        print(json.dumps(res, indent=1))
        return 0
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
