"""bench.suite: issue 17's one-command table, run for real on a cheap subset.

``python -m bench.suite --quick --only fft_overhead,local_lat_block`` starts a
real daemon (bench.perftest's same-host send_lat against the eventfd floor)
and runs the FFT call-overhead benchmark; the test checks the printed table's
shape, the JSON file's schema, and that every row carries a baseline measured
in the same run. No timing assertions: the figures are whatever this machine
gives.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench import suite
from tests.netlab.conftest import netns  # noqa: F401  (skips without root; no namespace left)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("fft_overhead", "local_lat_block")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench.suite", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "rows.json"
    p = _run("--quick", "--only", ",".join(GROUPS), "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_json_schema_and_same_run_baselines(quick_run):
    _, res = quick_run
    assert set(res) == {"machine", "quick", "repeat", "rows", "skipped", "notes", "seconds"}
    assert res["quick"] is True and res["repeat"] == 1 and res["skipped"] == []
    assert res["machine"]["vcpus"] == os.cpu_count() and res["machine"]["cpu"]
    from accel_core import simd
    rows = res["rows"]
    # one overhead row per SIMD path the CPU has; same host: split (2+ CPUs) and shared layouts
    assert sum(r["group"] == "fft_overhead" for r in rows) == len(simd.available_paths())
    nlayouts = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    assert sum(r["group"] == "local_lat_block" for r in rows) == nlayouts
    for r in rows:
        assert set(r) == set(suite.SCHEMA_KEYS), r["row"]
        assert r["group"] in GROUPS
        assert r["baseline_source"] == "same run", r["row"]
        for k in ("ours", "baseline", "ratio", "goal"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (r["row"], k)
        assert len(r["rounds"]) == 1 and r["rounds"][0]["baseline"] == r["baseline"]
        want = r["ours"] / r["baseline"] if r["ratio_is"] == "ours/baseline" else r["baseline"] / r["ours"]
        assert r["ratio"] == pytest.approx(want)
        x = r[r["goal_on"]]
        assert r["met"] == (x <= r["goal"] if r["goal_op"] == "<=" else x >= r["goal"])
        assert r["met"] or r["profile"], f"{r['row']} misses its goal without a profile"
        assert r["layout"]
    lat = [r for r in rows if r["group"] == "local_lat_block"]
    assert all(r["goal"] == 4.0 and r["unit"] == "us" and "eventfd" in r["baseline_name"] for r in lat)
    assert all("floor: SCHED_IDLE spinners" in r["layout"] for r in lat)
    ovh = [r for r in rows if r["group"] == "fft_overhead"]
    assert all(r["goal_on"] == "ours" and r["goal"] == 2.0 for r in ovh)
    for g in res["notes"]:
        assert any(r["group"] == g and r["profile"] == "see note" for r in rows)


def test_table_shape(quick_run):
    text, res = quick_run
    lines = text.splitlines()
    assert lines[0].startswith("# machine: ") and "vector extensions" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert lines[head].split() == ["row", "ours", "baseline", "unit", "ratio", "goal", "met"]
    body = lines[head + 1: head + 1 + len(res["rows"])]
    layouts = {line.split()[-1] for line in body}
    for line, r in zip(body, res["rows"], strict=True):
        assert line.startswith(r["row"])
        assert line.split()[-2] == ("yes" if r["met"] else "NO")
    for ref in layouts:  # every row's layout is spelled out under the table
        assert ref.startswith("[L") and any(line.startswith(f"# {ref[1:-1]}: ") for line in lines)
    missed = [r for r in res["rows"] if not r["met"]]
    for r in missed:
        assert f"#   {r['row']}: {r['profile']}" in lines or r["profile"] == "see note"
    for g in res["notes"]:
        assert any(line.startswith("#   ") and line.endswith(f"see note ({g})") for line in lines)
        assert any(line.startswith(f"# note ({g}): ") for line in lines)
    assert lines[-1].startswith(f"# {len(res['rows'])} rows, {sum(r['met'] for r in res['rows'])} goals met")


def test_rejects_unknown_rows_and_repeat():
    p = _run("--only", "fft,nonsense")
    assert p.returncode == 2 and "nonsense" in p.stderr
    p = _run("--repeat", "0")
    assert p.returncode == 2 and "--repeat must be at least 1, got 0" in p.stderr
    with pytest.raises(ValueError, match="bogus"):
        suite.run_suite(("bogus",))


def test_row_medians_goals_and_published_baselines():
    r = suite._row("fabric_write_bw", "w", "fabric_write_bw_rxe", [900.0, 700.0, 800.0], [828.0] * 3,
                   unit="MB/s", baseline_name="rxe", baseline_source="published", ratio_is="ours/baseline",
                   layout="L", profile="peak vs avg")
    assert r["ours"] == 800.0 and r["ratio"] == pytest.approx(800 / 828)
    assert r["met"] is False and r["profile"] == "peak vs avg"
    f = suite._row("fft", "f", "fft", [2.0], [3.0], unit="us", baseline_name="scipy",
                   ratio_is="baseline/ours", layout="L", profile="")
    assert f["ratio"] == 1.5 and f["met"] is True and f["profile"] == ""
    miss = suite._row("fft", "f", "fft", [3.0], [2.0], unit="us", baseline_name="scipy",
                      ratio_is="baseline/ours", layout="L", profile="")
    assert miss["met"] is False and miss["profile"] == "see note"
    res = {"machine": {"cpu": "x", "vcpus": 2, "vector": []}, "quick": False, "repeat": 3,
           "rows": [r, f, miss], "skipped": [{"group": "turbo", "reason": "r"}], "notes": {"fft": "n"},
           "seconds": 1.0}
    text = suite.format_table(res)
    assert "828*" in text and "# *: a published reference figure" in text
    assert "# note (fft): n" in text and "# skipped turbo: r" in text
    with pytest.raises(ValueError, match="sideways"):
        suite._row("fft", "f", "fft", [1.0], [1.0], unit="us", baseline_name="b", ratio_is="sideways",
                   layout="L", profile="")


@pytest.mark.netns
def test_two_host_rows(netns):  # noqa: F811
    """The fabric rows through real namespaces: the --no-pin row's baseline is the pinned
    figure of the same round, the WRITE row has the same-run UDP stream and the published
    rxe figure (marked so), and each names its CPU layout."""
    res = suite.run_suite(("fabric_lat_nopin", "fabric_write_bw"), quick=True)
    rows = {r["row"]: r for r in res["rows"]}
    assert res["skipped"] == [] and len(rows) == 3
    nopin = rows["two hosts 64 B SEND half RTT, --no-pin"]
    assert nopin["baseline_name"] == "the pinned figure, same round" and nopin["goal"] == 2.0
    assert nopin["layout"].startswith("not pinned")
    udp = rows["two hosts 64 KiB RDMA WRITE, MTU 4096, vs raw UDP"]
    rxe = rows["two hosts 64 KiB RDMA WRITE, MTU 4096, vs kernel rxe"]
    assert udp["baseline_source"] == "same run" and udp["goal"] == 0.7
    assert rxe["baseline_source"] == "published" and rxe["baseline"] == 828.0 and rxe["goal"] == 1.0
    assert udp["ours"] == rxe["ours"] > 0 and udp["baseline"] > 0
    assert "busy-polling" in udp["layout"] and "SCHED_IDLE" in udp["layout"]
    for r in rows.values():
        assert r["met"] or r["profile"]
