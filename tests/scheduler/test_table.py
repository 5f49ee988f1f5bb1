"""The load table (scheduler.table): rows checked, newest sequence number
wins, expiry after DROP_AFTER_PERIODS silent periods and return, hosts
without accelerators never candidates, own sends since a row."""
from __future__ import annotations

import math

import pytest

from scheduler.errors import BadRow, SchedulerError
from scheduler.table import DROP_AFTER_PERIODS, RECENT_SENDS, LoadRow, LoadTable, OwnSends


def row(host: int, queued: float = 0.0, busy: int = 0, seq: int = 1, updated: float = 0.0,
        units: int = 1, service: float = 1.0) -> LoadRow:
    if not units:
        return LoadRow(host, {}, {}, {}, {}, seq, updated)
    return LoadRow(host, {"fft": units}, {"fft": service}, {"fft": queued}, {"fft": busy}, seq, updated)


def test_a_host_silent_for_three_periods_drops_out_and_comes_back_when_it_speaks():
    t = LoadTable(period=1.0)
    t.update(row(1, updated=0.0))
    t.update(row(2, updated=0.0))
    assert {r.host for r in t.candidates("fft", now=DROP_AFTER_PERIODS * 1.0)} == {1, 2}
    t.update(row(2, seq=2, updated=2.5))
    later = DROP_AFTER_PERIODS * 1.0 + 0.01
    assert [r.host for r in t.candidates("fft", now=later)] == [2]
    assert t.get(1, later) is None
    assert 1 not in {r.host for r in t.view(later)}
    t.update(row(1, seq=2, updated=10.0))
    assert {r.host for r in t.candidates("fft", now=10.0)} == {1}   # 2 is silent since 2.5
    assert t.get(1, 10.0) is not None


def test_an_old_or_repeated_sequence_number_is_ignored_and_counted():
    t = LoadTable(period=1.0)
    assert t.update(row(1, queued=5.0, seq=7))
    assert not t.update(row(1, queued=0.0, seq=7))
    assert not t.update(row(1, queued=0.0, seq=3))
    assert t.rows[1].queued["fft"] == 5.0
    assert (t.accepted, t.stale) == (1, 2)


def test_a_host_without_accelerators_is_never_a_candidate():
    t = LoadTable(period=1.0)
    t.update(row(3, units=0))
    t.update(row(4))
    assert [r.host for r in t.candidates("fft", 0.0)] == [4]
    assert not t.rows[3].has_accelerators
    assert t.candidates("turbo", 0.0) == []
    assert [r.host for r in t.candidates("fft", 0.0, exclude=4)] == []


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_absurd_loads_are_refused_naming_the_value(bad):
    with pytest.raises(BadRow, match=f"host 5: queued\\['fft'\\] = {bad!r}"):
        row(5, queued=bad)


def test_rows_naming_kinds_they_have_no_units_of_are_refused():
    with pytest.raises(BadRow, match="turbo"):
        LoadRow(1, {"fft": 1}, {"fft": 1.0}, {"turbo": 1.0}, {}, 1, 0.0)
    with pytest.raises(BadRow, match="service time"):
        LoadRow(1, {"fft": 1}, {}, {}, {}, 1, 0.0)
    with pytest.raises(BadRow, match="units\\['fft'\\] = 0"):
        LoadRow(1, {"fft": 0}, {"fft": 1.0}, {}, {}, 1, 0.0)
    with pytest.raises(SchedulerError, match="period"):
        LoadTable(period=0.0)


def test_jobs_and_idle_follow_the_counters():
    r = row(1, queued=3.0, busy=1, units=2, service=0.5)
    assert r.jobs("fft") == 6.0 and r.jobs("fft", extra=1.0) == 8.0
    assert r.idle("fft") and not r.idle("turbo")
    assert not row(1, busy=1).idle("fft")


def test_own_sends_count_since_the_row_and_restart_with_a_newer_one():
    own = OwnSends()
    own.note(2, seq=4, seconds=1.0, now=0.0)
    own.note(2, seq=4, seconds=0.5, now=0.05)
    assert own.pending(2, 4) == 1.5
    assert own.pending(2, 5) == 0.0   # the table has a newer row: it includes them
    own.note(2, seq=5, seconds=1.0, now=1.0)
    assert own.pending(2, 5) == 1.0
    assert own.pending(3, 5) == 0.0
    assert own.in_flight(2, now=1.05, window=0.1) == 1.0
    assert own.in_flight(2, now=2.0, window=0.1) == 0.0
    for i in range(2 * RECENT_SENDS):
        own.note(3, seq=1, seconds=1.0, now=float(i))
    assert len(own.recent[3]) == RECENT_SENDS
