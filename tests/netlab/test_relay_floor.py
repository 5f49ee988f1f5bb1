"""bench.relay_floor across a veth: every message goes through both relays
and comes back in order (a lost or misrouted one fails the client); the
statistics are consistent (no timing is asserted)."""
import json
import os

import pytest

from bench import relay_floor

pytestmark = pytest.mark.netns


def test_relayed_ping_pong(netns):
    cpus = sorted(os.sched_getaffinity(0))
    r = relay_floor.latency(iters=400, cpus=(cpus[0], cpus[-1]))
    assert r["test"] == "relay_floor" and r["iterations"] == 360          # 10% warm-up dropped
    assert 0 < r["t_min"] <= r["t_typical"] <= r["p99"] <= r["t_max"]
    assert r["rtt_typical"] >= 2 * r["t_min"]
    assert f"cpu {cpus[0]}" in r["layout"]


def test_cli_json(netns, capsys):
    assert relay_floor.main(["--iters", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["udp"]["echoed"] == 200 and out["relay"]["iterations"] == 180
    assert out["machine"]["cpu"] and out["machine"]["vcpus"] >= 1
