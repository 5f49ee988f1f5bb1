"""bench.udp_baseline smoke tests: both baselines run across a veth and
report consistent counts (no timing is asserted)."""
import json

import pytest

from bench import udp_baseline
from netlab.ns import two_hosts

pytestmark = pytest.mark.netns


def test_latency_and_throughput_on_one_lab(netns):
    with two_hosts() as h:
        lat = udp_baseline.latency(h, size=64, iters=500)
        bw = udp_baseline.throughput(h, size=4096, seconds=0.1)
    assert lat["echoed"] == 500 and lat["iterations"] == 450     # 10% warm-up dropped
    assert 0 < lat["t_min"] <= lat["t_typical"] <= lat["p99"] <= lat["t_max"]
    assert lat["rtt_typical"] >= lat["t_min"] * 2
    assert bw["sent"] > 0 and 0 < bw["received"] <= bw["sent"]
    assert bw["received_bytes"] == 4096 * bw["received"]
    assert bw["lost"] >= bw["rcvbuf_drops"] >= 0 and bw["MB_per_s"] > 0


def test_cli_json(netns, capsys):
    assert udp_baseline.main(["both", "--iters", "200", "--seconds", "0.05", "--json"]) == 0
    lat, bw = json.loads(capsys.readouterr().out)
    assert (lat["test"], lat["bytes"], bw["test"], bw["bytes"]) == ("udp_lat", 64, "udp_bw", 4096)


def test_cli_spinners_reports_the_vcpu_state(netns, capsys):
    assert udp_baseline.main(["lat", "--iters", "200", "--spinners", "--json"]) == 0
    (lat,) = json.loads(capsys.readouterr().out)
    assert lat["echoed"] == 200 and lat["vcpu_state"].startswith("SCHED_IDLE spinners")
