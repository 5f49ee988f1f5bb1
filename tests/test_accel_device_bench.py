"""bench.accel_device_bench smoke test: the four benchmarks of issue #14
through real daemons (``--quick`` with tiny counts), their same-run
baselines and the report's rows. Structure, counts and correctness are
checked, never timing (benchmarks report, tests do not time)."""
import json

import pytest

from bench import accel_device_bench as b


def test_quick_run_with_tiny_counts_reports_every_figure_and_its_baseline(capsys):
    assert b.main(["--quick", "--json", "--jobs", "10", "--slowdown", "5"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["quick"] is True and r["machine"]["vcpus"] >= 1 and r["goals"] == b.GOALS

    o = r["overhead"]
    assert o["jobs"] == 10 and o["zero_copy"] is True and o["direct"]["n"] == 10
    for layer in ("verbs", "accel_fft", "verbs_daemon_polls", "accel_fft_daemon_polls", "verbs_no_accelerator"):
        s = o[layer]
        assert s["n"] == 10 and 0 < s["median_us"] <= s["p99_us"]
        assert isinstance(s["goal_met"], bool)
    assert o["verbs"]["added_median_us"] == pytest.approx(o["verbs"]["median_us"] - o["direct"]["median_us"])
    assert o["verbs"]["ratio_median"] == pytest.approx(o["verbs"]["median_us"] / o["direct"]["median_us"])

    t = r["throughput"]
    assert t["jobs"] == b.GUESTS * 10 and t["results_ok"] is True and t["workers"] == 1
    assert min(t["device_jobs_per_s"], t["service_jobs_per_s"], t["direct_jobs_per_s"]) > 0
    assert t["ratio_vs_service"] == pytest.approx(t["device_jobs_per_s"] / t["service_jobs_per_s"])

    f = r["fairness"]
    assert f["slowdown"] == 5 and f["jobs"] == 10 and f["flooder_jobs"] > 0
    assert f["idle_wait"]["n"] == f["flooded_wait"]["n"] == 10 and f["service"]["median_us"] > 0
    assert f["bound_us"] == pytest.approx(f["idle_wait"]["p99_us"] + f["service"]["median_us"])

    e = r["estimates"]
    assert list(e) == list(b.ESTIMATE_SHAPES)
    for name, est in e.items():
        assert len(est["shapes"]) == len(b.ESTIMATE_SHAPES[name]) and est["est_unit_ps"] > 0
        assert est["mae"] >= 0 and est["calibrated_mae"] >= 0
        assert all(s["measured_median_us"] > 0 and s["est_us"] > 0 for s in est["shapes"])

    text = b.format_report(r)
    assert text.startswith("# machine: ")
    for row in ("baseline accel_core.fft in-process", "verbs AQ.post + CQ.poll", "daemon --poll-us",
                "guest_lib.accel.fft", "--accelerators none", "in-process service", "direct accel_core.fft",
                "ratio device/service",
                "idle accelerator: wait", "one guest flooding", "p99 flooded /", "TURBO_DECODE",
                "calibrated here"):
        assert row in text, row
    assert text.count("goal") >= 4 + 4


def test_bad_job_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        b.main(["--jobs", "0"])
    assert "--jobs 0 must be positive" in capsys.readouterr().err
