"""bench.fabric_bench smoke test: two daemons in two namespaces, both
benchmarks and their same-run floors, short runs. Structure and counts are
checked, never timing (benchmarks report, tests do not time)."""
import pytest

from bench import fabric_bench
from tests.netlab.conftest import netns  # noqa: F401  (skips without root; no namespace left)

pytestmark = pytest.mark.netns


def test_short_run_reports_ours_and_floors(netns):
    r = fabric_bench.run(["send_lat", "write_bw"], iters=200, bw_iters=160, batch=16)
    lat, bw = r["send_lat"], r["write_bw"]
    assert lat["ours"]["bytes"] == 64 and lat["ours"]["iterations"] > 0
    assert 0 < lat["ours"]["t_min"] <= lat["ours"]["t_typical"]
    for floor in (lat["udp_floor"], lat["udp_floor_idle_vcpus"]):
        assert floor["echoed"] == 2000
    assert lat["ratio_typical"] == pytest.approx(lat["ours"]["t_typical"] / lat["udp_floor"]["t_typical"])
    assert bw["ours"]["bytes"] == 65536 and bw["ours"]["iterations"] == 160
    assert bw["MB_per_s"] > 0 and bw["udp_floor"]["MB_per_s"] > 0
    best = max(bw["udp_floor"]["MB_per_s"], bw["udp_floor_idle_vcpus"]["MB_per_s"])
    assert bw["fraction_of_udp"] == pytest.approx(bw["MB_per_s"] / best)
    assert "busy-polling" in r["vcpu_state"] and "SCHED_IDLE" in r["floor_vcpu_state"]
    # the daemons' scheduler counters per half round trip: a busy-polling daemon that
    # served 200 round trips was switched out (it yields to its guest) at least once
    sched = lat["ours"]["daemon_sched_per_half_rtt"]
    assert set(sched) == {"A", "B"}
    for c in sched.values():
        assert set(c) == set(fabric_bench.SCHED_FIELDS)
        assert c["nr_switches"] > 0 and all(v >= 0 for v in c.values())
        assert c["nr_switches"] == pytest.approx(c["nr_voluntary_switches"]
                                                 + c["nr_involuntary_switches"])


def test_sched_counts_of_this_process():
    """sched_counts sums /proc/PID/task/*/sched; a sleep is a voluntary switch."""
    import os
    import time

    before = fabric_bench.sched_counts(os.getpid())
    time.sleep(0.01)
    after = fabric_bench.sched_counts(os.getpid())
    assert set(before) == set(fabric_bench.SCHED_FIELDS)
    assert after["nr_voluntary_switches"] > before["nr_voluntary_switches"]
    assert after["nr_switches"] >= before["nr_switches"] + 1


@pytest.mark.parametrize(("layout", "state"), [
    ("one-cpu", "daemons A and B and both guests on cpu {0}"),
    ("daemons-together", "daemons A and B on cpu {0}, both guests on cpu {1}")])
def test_slow_no_pin_placements_as_layouts(netns, layout, state):
    """The placements of the slow --no-pin rounds, pinned on purpose (guests waiting
    with plain sched_yield: --wait)."""
    r = fabric_bench.run(["send_lat"], iters=100, layout=layout, wait="yield")
    cpus = sorted(r["cpus"])
    if len(cpus) < 2:
        pytest.skip("one CPU: the layouts need two")
    assert r["vcpu_state"].startswith(state.format(*cpus))
    assert r["send_lat"]["ours"]["iterations"] > 0
    assert r["send_lat"]["ours"]["wait"] == "yield"    # --wait reached the guests


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="sideways"):
        fabric_bench.run(["send_lat"], layout="sideways")


def test_short_run_with_auth_reports_both_modes(netns):
    r = fabric_bench.run(["send_lat", "write_bw"], iters=200, bw_iters=160, batch=16, auth=True)
    lat, bw = r["send_lat"], r["write_bw"]
    assert lat["ours_auth"]["bytes"] == 64 and lat["ours_auth"]["iterations"] > 0
    assert lat["auth_ratio_typical"] == pytest.approx(
        lat["ours_auth"]["t_typical"] / lat["ours"]["t_typical"])
    assert bw["ours_auth"]["iterations"] == 160 and bw["MB_per_s_auth"] > 0
    assert bw["auth_ratio"] == pytest.approx(bw["MB_per_s_auth"] / bw["MB_per_s"])


def test_mac_cost_reports_both_sides():
    c = fabric_bench.mac_cost(rounds=20)
    assert set(c) == {"tx_plain_us", "tx_sealed_us", "rx_open_us"}
    assert all(v > 0 for v in c.values())
