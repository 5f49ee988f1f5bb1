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
    text = format_report(r)
    assert "added / baseline" in text and text.startswith("# machine:")
