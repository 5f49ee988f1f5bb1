"""bench.sched_sim on short runs with a fixed seed: its invariants (every
job completes exactly once, fractions in [0, 1], random no better than the
oracle, seed herding on a stale table) and its command line. No timing."""
from __future__ import annotations

import dataclasses
import json

import pytest

from bench import sched_sim
from bench.sched_sim import Params, simulate
from scheduler.decide import DEFAULT_POLICY
from scheduler.errors import UnknownPolicy

P = Params(hosts=16, accel_hosts=8, load=0.9, period=1.0, transfer=0.1, jobs=3000, seed=3)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, float], sched_sim.Result]:
    out = {}
    for t in (0.5, 20.0):
        for pol in ("seed", "p2c+own", "probe", "random", "oracle"):
            out[pol, t] = simulate(dataclasses.replace(P, period=t), pol)
    return out


def test_every_job_completes_exactly_once_and_the_fractions_are_fractions(runs):
    for r in runs.values():
        assert (r.completed, r.duplicates, r.submitted) == (P.jobs, 0, P.jobs)
        assert 0.0 <= r.remote_fraction <= 1.0
        assert r.counters.decisions == P.jobs
        assert r.mean > 0 and r.p99 >= r.mean


def test_random_is_no_better_than_the_oracle(runs):
    for t in (0.5, 20.0):
        assert runs["random", t].mean >= runs["oracle", t].mean


def test_seed_herds_on_a_stale_table(runs):
    assert runs["seed", 20.0].mean > 2 * runs["seed", 0.5].mean
    assert runs["seed", 20.0].mean > runs["probe", 20.0].mean


def test_probes_and_dissemination_are_counted(runs):
    assert 1.0 < runs["probe", 0.5].probes_per_job <= 2.0   # none when here is idle
    assert runs["p2c+own", 0.5].probes_per_job == 0.0
    # one advertisement per accelerator host per period (with jitter); none from the others
    for t in (0.5, 20.0):
        assert 6.0 < runs["seed", t].bcasts_per_period <= 8.5


def test_hosts_without_accelerators_get_no_jobs_and_speeds_are_honoured():
    p = Params(hosts=6, accel_hosts=2, load=0.8, period=1.0, transfer=0.1, speeds=(2.0, 1.0), jobs=1500,
               seed=1)
    r = simulate(p, "probe")
    assert r.completed == p.jobs and r.duplicates == 0
    assert r.remote_fraction > 0.6   # 4 of 6 hosts must send everything away


def test_the_command_line_marks_the_default_and_refuses_unknown_policies(capsys, tmp_path):
    assert sched_sim.main(["--jobs", "300", "--period", "1", "--policy", f"{DEFAULT_POLICY},random",
                           "--json", "--seed", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["default"] == DEFAULT_POLICY
    assert [r["default"] for r in out["results"]] == [True, False]
    with pytest.raises(SystemExit) as e:
        sched_sim.main(["--jobs", "300", "--policy", "fastest"])
    assert e.value.code == 2 and "'fastest'" in capsys.readouterr().err
    with pytest.raises(UnknownPolicy):
        simulate(P, "fastest")
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    assert sched_sim.main(["--jobs", "300", "--period", "0.5,2", "--policy", "seed,oracle",
                           "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
