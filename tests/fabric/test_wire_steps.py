"""bench.wire_steps smoke test: the in-process step timing of a 64 B SEND
half round trip over two loopback RoCE sockets runs, every step and part is
reported, and the native paths really carried the traffic. Never timing."""
import random

from bench import wire_steps
from virtio_rdma import _datapath


def test_steps_and_parts_are_reported():
    sq0, cq0, p0 = _datapath.wire_started, _datapath.wire_cqes_written, _datapath.wire_pumps
    r = wire_steps.run(iters=60, parts=True, port=random.randrange(40000, 60000))
    assert set(r["steps"]) == {"send", "receive", "ack"}
    assert all(v > 0 for v in r["steps"].values()) and r["sendto"] > 0
    parts = {p.split(": ", 1)[1] for p in r["parts"]}
    assert {"sendmmsg (TX ring flush)", "run_wire_sq (with transmit)",
            "wire_pump (pump body: CQEs, packets out)", "ACK into the TX ring (fast path)",
            "receive fast path (_deliver)"} <= parts
    assert "receive: ACK built (Responder._ack)" not in r["parts"]   # the fast path sent it
    assert _datapath.wire_pumps - p0 >= 240             # every pump after a receive or an ACK
    assert _datapath.wire_started - sq0 == 120          # every SEND went the native way
    assert _datapath.wire_cqes_written - cq0 == 240     # a receive and a send CQE each
    assert r["machine"]["vcpus"] >= 1
