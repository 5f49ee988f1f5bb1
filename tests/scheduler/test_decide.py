"""The policies (scheduler.decide) on hand-built tables: each one's choice,
the estimates it explains, its counters, and its errors."""
# Seeded random.Random streams make the decisions reproducible; nothing here is a key.
# ruff: noqa: S311
from __future__ import annotations

import random
import re

import pytest

from scheduler.decide import (
    DAEMON_POLICIES,
    DEFAULT_POLICY,
    Decision,
    DecisionCounters,
    Job,
    Plan,
    View,
    decide,
    estimate,
    finish,
    parse_policy,
    plan,
)
from scheduler.errors import NoCandidate, SchedulerError, UnknownPolicy
from scheduler.table import LoadRow, LoadTable, OwnSends
from tests.scheduler.test_table import row

D = 0.1
JOB = Job("fft")


def table(*rows: LoadRow) -> LoadTable:
    t = LoadTable(period=1.0)
    for r in rows:
        t.update(r)
    return t


def view(t: LoadTable, own: OwnSends | None = None, probe=None) -> View:
    return View(t, now=0.5, transfer=D, own=own, probe=probe)


def test_seed_runs_here_when_a_local_unit_is_idle():
    here = row(0, queued=0.0, busy=0)
    t = table(row(1), row(2))
    d = decide(JOB, here, view(t), random.Random(1), "seed")
    assert d.local and d.target == 0 and d.reason == "local idle"


def test_seed_compares_the_local_wait_with_twice_the_transfer_plus_the_remote_estimate():
    t = table(row(1, queued=0.0), row(2, queued=3.0, busy=1))
    # here: one job with 1.0 s left: local cost 1.0 + 1.0 > remote 2 x 0.1 + 0 + 1.0
    d = decide(JOB, row(0, queued=1.0, busy=1), view(t), random.Random(1), "seed")
    assert d.target == 1 and d.reason == "cheapest in table"
    by_host = {c.host: c for c in d.candidates}
    assert by_host[1].cost == pytest.approx(1.2) and by_host[0].cost == pytest.approx(2.0)
    assert by_host[2].cost == pytest.approx(4.2)
    # here: 0.15 s left: 1.15 < 1.2, stay
    d = decide(JOB, row(0, queued=0.15, busy=1), view(t), random.Random(1), "seed")
    assert d.local
    assert "host 1: 1.2 = 2x0.1 + wait 0 + service 1 (table)" in d.explain()


def test_the_estimate_is_the_expected_wait_for_one_of_several_units():
    r = row(1, queued=2.0, busy=2, units=2, service=1.0)   # 2 jobs on 2 units: wait 1/2
    e = estimate(r, "fft", D, fresh=False)
    assert (e.wait, e.service, e.cost) == (pytest.approx(0.5), 1.0, pytest.approx(1.7))
    assert estimate(row(1, queued=1.0, busy=1, units=2), "fft", D, fresh=False).wait == 0.0
    assert estimate(r, "fft", 0.0, fresh=True, size=3.0).service == 3.0


@pytest.mark.parametrize("policy", [*DAEMON_POLICIES, "p2c+own", "probe:3", "oracle", "seed+own"])
def test_no_policy_ever_picks_a_host_without_accelerators(policy):
    t = table(row(1, queued=4.0, busy=1), row(2, queued=9.0, busy=1), row(3, units=0))
    here = row(4, units=0)
    rng = random.Random(7)
    probe = t.rows.__getitem__
    targets = {decide(JOB, here, view(t, OwnSends(), probe), rng, policy).target for _ in range(200)}
    assert targets <= {1, 2} and targets


def test_own_send_accounting_changes_p2cs_choice():
    t = table(row(1, queued=0.0, seq=3), row(2, queued=0.5, busy=1, seq=8))
    here = row(0, queued=5.0, busy=1)
    own = OwnSends()
    assert decide(JOB, here, view(t, own), random.Random(1), "p2c+own").target == 1
    own.note(1, seq=3, seconds=2.0)
    assert decide(JOB, here, view(t, own), random.Random(1), "p2c").target == 1
    d = decide(JOB, here, view(t, own), random.Random(1), "p2c+own")
    assert d.target == 2
    assert next(c for c in d.candidates if c.host == 1).own == 2.0
    own.note(1, seq=2, seconds=0.0)   # a send against another row number restarts the count
    assert decide(JOB, here, view(t, own), random.Random(1), "p2c+own").target == 1


def test_probe_reads_fresh_counters_and_counts_its_probes():
    stale = table(row(1, queued=0.0), row(2, queued=6.0, busy=1), row(3, queued=6.0, busy=1))
    truth = {1: row(1, queued=8.0, busy=1, seq=2, updated=0.5), 2: row(2, queued=0.0, seq=2, updated=0.5),
             3: row(3, queued=8.0, busy=1, seq=2, updated=0.5)}
    reads: list[int] = []

    def probe(host: int) -> LoadRow:
        reads.append(host)
        return truth[host]

    here = row(0, queued=5.0, busy=1)
    assert decide(JOB, here, view(stale), random.Random(1), "seed").target == 1
    d = decide(JOB, here, view(stale, probe=probe), random.Random(1), "probe:3")
    assert d.target == 2 and d.probes == 3 and sorted(reads) == [1, 2, 3]
    assert all(c.fresh for c in d.candidates)
    reads.clear()
    d = decide(JOB, here, view(stale, probe=probe), random.Random(1), "probe")
    assert d.probes == 2 == len(reads)
    # the oracle reads every host too, but they are not probes a daemon makes
    d = decide(JOB, here, view(stale, probe=probe), random.Random(1), "oracle")
    assert d.target == 2 and d.probes == 0


def test_probe_with_own_sends_counts_its_jobs_still_on_their_way():
    t = table(row(1), row(2))
    truth = {1: row(1, queued=1.0, busy=1, seq=2), 2: row(2, queued=1.5, busy=1, seq=2)}
    own = OwnSends()
    own.note(1, seq=1, seconds=1.0, now=0.45)   # sent 0.05 ago, the one-way transfer is 0.1
    here = row(0, queued=5.0, busy=1)
    assert decide(JOB, here, view(t, own, truth.__getitem__), random.Random(1), "probe").target == 1
    d = decide(JOB, here, view(t, own, truth.__getitem__), random.Random(1), "probe+own")
    assert d.target == 2 and d.probes == 2
    own.note(2, seq=1, seconds=1.0, now=0.3)    # landed by now: the fresh counters have it
    assert decide(JOB, here, view(t, own, truth.__getitem__), random.Random(1), "probe+own").target == 2


def test_probe_reads_nothing_when_here_is_idle_and_no_host_could_beat_it():
    t = table(row(1), row(2, service=0.9))   # 2 x 0.1 + 0.9 > 1
    truth = t.rows.__getitem__
    d = decide(JOB, row(0), view(t, probe=truth), random.Random(1), "probe")
    assert d.local and d.probes == 0 and d.reason == "local idle, none faster"
    # a host four times as fast: 2 x 0.1 + 0.25 < 1: worth reading
    t = table(row(1), row(2, service=0.25, seq=2))
    d = decide(JOB, row(0), view(t, probe=t.rows.__getitem__), random.Random(1), "probe")
    assert d.probes == 2 and d.target == 2


def test_plan_names_the_reads_and_finish_decides_on_what_came_back():
    """The daemon's two steps: the plan's reads go out as RDMA READs, finish() takes
    what came back; a failed read (None) is never chosen. Same rng, same as decide()."""
    t = table(row(1), row(2), row(3))
    truth = {1: row(1, queued=4.0, busy=1, seq=2), 2: row(2, queued=0.5, busy=1, seq=2),
             3: row(3, queued=0.0, seq=2)}
    here = row(0, queued=5.0, busy=1)
    p = plan(JOB, here, view(t), random.Random(7), "probe")
    assert isinstance(p, Plan) and len(p.reads) == 2 and set(p.reads) <= {1, 2, 3}
    assert sorted(p.remote) == [1, 2, 3]
    whole = decide(JOB, here, view(t, probe=truth.__getitem__), random.Random(7), "probe")
    rng = random.Random(7)
    p = plan(JOB, here, view(t), rng, "probe")
    assert finish(p, view(t), {h: truth[h] for h in p.reads}, rng) == whole
    # the cheaper read failed: the other one, or here, is chosen; never the failed host
    best = min(p.reads, key=lambda h: truth[h].queued["fft"])
    d = finish(p, view(t), {h: (None if h == best else truth[h]) for h in p.reads}, random.Random(1))
    assert d.target != best and d.probes == 2
    # every read failed: here, which has a unit
    d = finish(p, view(t), dict.fromkeys(p.reads), random.Random(1))
    assert d.local and d.reason == "probes found none"
    # every read late: the table's rows (idle there) stand in for them
    d = finish(p, view(t), {}, random.Random(1))
    assert d.target in p.reads and not any(c.fresh for c in d.candidates if c.host != 0)


def test_a_host_without_units_whose_reads_all_fail_sends_to_an_unread_candidate():
    t = table(row(1), row(2), row(3))
    here = LoadRow(host=0, units={}, service_time={}, queued={}, busy={})
    p = plan(JOB, here, view(t), random.Random(3), "probe")
    assert isinstance(p, Plan) and p.mine is None
    d = finish(p, view(t), dict.fromkeys(p.reads), random.Random(1))
    (unread,) = set(p.remote) - set(p.reads)
    assert d.target == unread and d.reason == "probes found none: random"
    two = table(row(1), row(2))
    p = plan(JOB, here, view(two), random.Random(3), "probe")
    with pytest.raises(NoCandidate, match=r"every read of \[.*\] failed"):
        finish(p, view(two), dict.fromkeys(p.reads), random.Random(1))


def test_probing_without_a_probe_is_an_error():
    with pytest.raises(SchedulerError, match=r"'probe' needs view\.probe"):
        decide(JOB, row(0, queued=1.0, busy=1), view(table(row(1))), random.Random(1), "probe")


@pytest.mark.parametrize("name", ["fastest", "probe:0", "probe:x", "p2c+", "+own", ""])
def test_an_unknown_policy_raises_naming_it(name):
    with pytest.raises(UnknownPolicy, match=re.escape(repr(name))) as e:
        parse_policy(name)
    assert e.value.name == name
    with pytest.raises(UnknownPolicy, match=re.escape(repr(name))):
        decide(JOB, row(0), view(table()), random.Random(1), name)


def test_the_oracle_is_not_a_daemon_policy():
    assert parse_policy("oracle").reference
    with pytest.raises(UnknownPolicy, match="'oracle'"):
        parse_policy("oracle", allow_reference=False)
    assert not parse_policy(DEFAULT_POLICY, allow_reference=False).reference


def test_policy_names_round_trip():
    for name in ("seed", "seed+own", "p2c+own", "probe", "probe:3+own", "guided", "local", "random"):
        assert parse_policy(name).name == name


def test_a_job_nobody_can_run_raises():
    with pytest.raises(NoCandidate, match=r"'fft'.*host 0"):
        decide(JOB, row(0, units=0), view(table(row(1, units=0))), random.Random(1), "seed")


def test_random_is_uniform_over_hosts_with_accelerators_and_local_stays():
    t = table(row(1), row(2), row(3, units=0))
    rng = random.Random(3)
    seen = [decide(JOB, row(0, queued=9.0, busy=1), view(t), rng, "random").target for _ in range(3000)]
    assert set(seen) == {0, 1, 2}
    assert all(abs(seen.count(h) - 1000) < 150 for h in (0, 1, 2))
    assert decide(JOB, row(0, queued=9.0, busy=1), view(t), rng, "local").local


def test_decisions_are_deterministic_given_the_rng_and_counted():
    t = table(*(row(h, queued=float(h % 3), busy=int(h % 3 > 0)) for h in range(1, 9)))
    here = row(0, queued=2.0, busy=1)

    def run(seed: int) -> list[Decision]:
        rng = random.Random(seed)
        return [decide(JOB, here, view(t, probe=t.rows.__getitem__), rng, p)
                for p in ("p2c", "probe", "random", "guided") * 20]

    a, b = run(5), run(5)
    assert a == b
    counters = DecisionCounters()
    for d in a:
        counters.count(d)
    assert counters.decisions == 80 == counters.local + counters.remote
    assert counters.probes == 2 * 40
    assert counters.reasons["random"] == 20


def test_board_reads_every_candidate_in_one_read_and_counts_it_once():
    """``board``: one READ of the board gives every candidate's counters (with the work
    announced to it): the cheapest of here and all of them; a probe counted once."""
    t = table(row(1), row(2), row(3), row(4))
    truth = {1: row(1, queued=3.0, busy=1, seq=2), 2: row(2, queued=2.0, busy=1, seq=2),
             3: row(3, queued=0.5, busy=1, seq=2), 4: row(4, queued=4.0, busy=1, seq=2)}
    here = row(0, queued=5.0, busy=1)
    p = plan(JOB, here, view(t), random.Random(1), "board")
    assert isinstance(p, Plan) and p.board and sorted(p.reads) == [1, 2, 3, 4]
    d = finish(p, view(t), truth, random.Random(1))
    assert d.target == 3 and d.probes == 1 and d.reason == "best on the board"
    assert len(d.candidates) == 5          # here and the four on the board
    assert decide(JOB, here, view(t, probe=truth.__getitem__), random.Random(1), "board").target == 3
    # here idle and nobody faster even idle: no read at all
    d = decide(JOB, row(0), view(t, probe=truth.__getitem__), random.Random(1), "board")
    assert d.local and d.probes == 0
