"""bench.wire_steps smoke test: the in-process step timing of a 64 B SEND
half round trip over two loopback RoCE sockets runs, every step and part is
reported, and the native paths really carried the traffic. Never timing."""
import random

from bench import wire_steps
from virtio_rdma import _datapath


def test_steps_and_parts_are_reported():
    sq0, cq0, s0 = _datapath.wire_started, _datapath.wire_cqes_written, _datapath.wire_settled
    r = wire_steps.run(iters=60, parts=True, port=random.randrange(40000, 60000))
    assert set(r["steps"]) == {"send", "receive", "ack"}
    assert all(v > 0 for v in r["steps"].values()) and r["sendto"] > 0
    parts = {p.split(": ", 1)[1] for p in r["parts"]}
    assert {"sendmmsg (TX ring flush)",
            "apply_records (run_wire_sq, run_wire_rq)",
            "wire_settle (CQEs at once, no pump)", "ACK into the TX ring (fast path)",
            "receive fast path (_deliver)"} <= parts
    # the fast path sent the ACKs and settled the QPs: no ACK packet built, no pump;
    # run_wire_sq flushed the TX ring natively (TxRing.flush_direct): no Python flush
    assert not {"receive: ACK built (Responder._ack)", "receive: deferred pumps",
                "ack: deferred pumps", "send: packets counted, ring flushed (TxRoute.done)",
                "send: sendmmsg (TX ring flush)"} & set(r["parts"])
    assert _datapath.wire_settled - s0 > 200            # (nearly) every receive and ACK
    assert _datapath.wire_started - sq0 == 120          # every SEND went the native way
    assert _datapath.wire_cqes_written - cq0 == 240     # a receive and a send CQE each
    assert r["machine"]["vcpus"] >= 1


def test_ab_times_both_sides_of_a_change():
    """--ab: the change on and off on alternate round trips of one run, each
    step reported for both; off, the Python flush carried the sends."""
    r = wire_steps.run(iters=40, parts=True, port=random.randrange(40000, 60000), ab="tx_direct")
    assert set(r["steps"]) == {f"{s} [tx_direct {o}]" for s in ("send", "receive", "ack")
                               for o in ("on", "off")}
    assert "send [tx_direct off]: packets counted, ring flushed (TxRoute.done)" in r["parts"]
    assert "send [tx_direct on]: packets counted, ring flushed (TxRoute.done)" not in r["parts"]
