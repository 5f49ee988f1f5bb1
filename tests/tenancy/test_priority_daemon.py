"""Tenant classes, weights and aging through the real daemon (issue #18,
"Priority"): ``vrdma backend`` as a process with one emulated slow FFT unit
and four sockets mapped to tenants by ``--config`` (H high, L low, A normal
weight 3, B normal weight 1), one guest process per tenant submitting FFT jobs
with guest_lib's accelerator API (bench/tenant_priority_daemon.py's guest).

Nothing here compares a time with a threshold: the class order is read from
the CQEs (a burst's consecutive jobs ran back to back: the waits of H's jobs
grow by H's own service times, not by L's jobs in between) and from the
daemon's counters (class overtakes, aged dispatches, written to
``--metrics-file`` at exit); the weights from job counts; aging from whether
L completes jobs while H saturates.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from bench.tenant_priority_daemon import AGING_SECONDS, TENANTS, Daemon, tenant_guests

#: ~2-3 ms a 1024-point FFT: long against the daemon's per-job overheads
SLOWDOWN = 300.0


@pytest.fixture(scope="module")
def prio():
    d = Daemon(SLOWDOWN)
    try:
        with tenant_guests(d) as guests:
            yield d, guests
    finally:
        d.cleanup()


def _ok(jobs):
    assert jobs and all(j[3] == 0 for j in jobs), [j[3] for j in jobs if j[3]]
    return jobs


def test_high_runs_before_low_jobs_queued_earlier_and_weights_share_3_to_1(prio):
    _, g = prio
    # class order: L keeps 16 jobs queued; H posts a burst of 8 behind them
    g["L"].run(depth=16, seconds=1.5)
    g["L"].expect("running")
    g["H"].run(depth=8, jobs=8)
    h = _ok(g["H"].result())
    _ok(g["L"].result())
    service = float(np.median([j[2] for j in h]))
    # H's jobs were queued together: with the class order they ran back to back, so each
    # one's wait exceeds the one before by that job's service alone. L's jobs queued
    # earlier in between (classes ignored: one after each of H's) would add 7 services.
    between = sum(h[i][1] - h[i - 1][1] - h[i - 1][2] for i in range(1, len(h)))
    assert between < 3 * service, (between, service, [j[1:3] for j in h])
    # weights 3:1 within one class: job counts while both kept 32 queued (1:1 fails the band)
    t0 = time.monotonic()
    g["A"].run(depth=32, seconds=2.5)
    g["B"].run(depth=32, seconds=2.5)
    a, b = _ok(g["A"].result()), _ok(g["B"].result())
    lo, hi = t0 + 0.5, min(a[-1][0], b[-1][0]) - 0.2
    na = sum(1 for j in a if lo <= j[0] < hi)
    nb = sum(1 for j in b if lo <= j[0] < hi)
    assert nb > 0 and 2.0 <= na / nb <= 4.5, (na, nb)


def test_aging_lets_low_progress_under_saturating_high(prio):
    d, g = prio

    def low_under_high():
        g["H"].run(depth=32, seconds=2.0)
        g["H"].expect("running")
        t1 = time.monotonic()
        g["L"].run(depth=2, seconds=1.5)
        lj, hj = _ok(g["L"].result()), _ok(g["H"].result())
        return sum(1 for j in lj if t1 <= j[0] < hj[-1][0])  # L's jobs done while H still had work

    without = low_under_high()
    d.set_aging(AGING_SECONDS)
    try:
        with_aging = low_under_high()
    finally:
        d.set_aging(0.0)
    assert with_aging >= 5 and without < with_aging, (without, with_aging)


def test_the_daemon_counted_class_overtakes_and_aged_dispatches(prio):
    """Last (module order): the daemon's counters at exit, and its accounting of each
    tenant's accelerator time."""
    d, g = prio
    for guest in g.values():
        guest.close()
    assert d.close() == 0
    acc = d.metrics()["accelerators"]["service"]["accelerators"]["fft"]
    assert acc["class_overtakes"] >= 8  # at least H's burst, each ahead of L's older jobs
    assert acc["aged_dispatches"] >= 1
    assert set(acc["class_dispatches"]) == {"0", "1", "2"}  # low, normal, high all ran
    rows = d.accounting()
    tenants = {r["tenant"] for r in rows if r["op"] == "fft" and r["jobs"]}
    assert tenants == set(TENANTS)
