"""bench.accel_remote_bench runs end to end (a smoke test: its figures are not judged here)."""
from __future__ import annotations

import pytest

from vrdma import lab

pytestmark = pytest.mark.netns


def test_remote_bench_quick_run_reports_both_ops_with_their_baselines():
    why = lab.available()
    if why:
        pytest.skip(why)
    from bench.accel_remote_bench import format_report, run

    r = run(quick=True)
    assert set(r) == {"fft", "turbo_decode"}
    for x in r.values():
        assert x["remote"]["n"] == x["local"]["n"] == 30
        assert x["transfer_baseline_us"] > 0 and x["local_jobs_per_s"] > 0 and x["remote_jobs_per_s"] > 0
        for where in ("local_profile", "remote_profile"):  # where the time went: CPU and run-queue time
            pr = x[where]
            assert pr["vcpus_busy"] > 0 and pr["daemon_a_cpu_us_per_job"] > 0
            assert all(pr[f"{k}_{m}_us_per_job"] >= 0 for k in ("daemon_a", "daemon_b", "guest")
                       for m in ("cpu", "runq"))
    assert r["turbo_decode"]["remote_profile"]["daemon_b_cpu_us_per_job"] > 0  # B ran the remote jobs
    text = format_report(r)
    assert "added / baseline" in text and text.startswith("# machine:") and "waiting for a CPU" in text
