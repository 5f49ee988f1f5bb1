"""How perftest's guests wait for completions (vrdma.perftest.CqWaiter), and
every perftest test on both guest paths, against a real daemon process."""
import threading

import pytest

from guest_lib import SGE, QPCap, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint, connect_pair
from verbs import SendFlags, WrOpcode
from vhost_user.testing import DaemonProcess
from vrdma.perftest import CqWaiter, run_pair

CAP = QPCap(64, 64, 1, 1, 64)


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess() as d:
        yield d


def test_adaptive_wait_blocks_on_the_event_when_nothing_comes(daemon):
    with RcEndpoint(daemon.path, 1 << 16, cap=CAP) as a, RcEndpoint(daemon.path, 1 << 16, cap=CAP) as b:
        connect_pair(a, b)
        b.qp.post_recv(RecvWR(7, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
        send = SendWR(9, WrOpcode.SEND, sg=[SGE(a.mr.buf, 16, a.mr.lkey)],
                      send_flags=SendFlags.SIGNALED | SendFlags.INLINE)
        late = threading.Timer(0.5, a.qp.post_send, (send,))  # long after the waiter gave up spinning
        late.start()
        try:
            w = CqWaiter(b.cq)
            assert w.wait() == (1, 0)
        finally:
            late.join()
        assert (w.spun, w.yielded, w.blocked) == (0, 0, 1)
        assert w.spin_ns == 2_000  # blocking teaches the budget nothing
        assert CqWaiter(a.cq, "yield").wait() == (0, 1)
        assert a.qp.sq_ci == a.qp.sq_pi == 1 and b.qp.rq_ci == 1
        # a completion in error is an error of the wait
        a.qp.post_send(SendWR(10, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 8, a.mr.lkey)], remote_addr=b.mr.buf,
                              rkey=b.mr.rkey ^ 0x5A5A, send_flags=SendFlags.SIGNALED))
        with pytest.raises(RuntimeError, match="1 completion"):
            CqWaiter(a.cq, "spin").wait()
    with pytest.raises(ValueError, match="'nap' is not one of"):
        CqWaiter(None, "nap")


@pytest.mark.parametrize("test,size,native,wait,poll_us", [
    ("send_lat", 64, True, "adaptive", 200),
    ("send_lat", 64, False, "adaptive", 0),
    ("write_lat", 64, True, "adaptive", 200),
    ("read_lat", 64, True, "yield", 0),
    ("send_bw", 64, True, "adaptive", 200),
    ("write_bw", 4096, False, "spin", 200),
])
def test_perftest_runs_on_both_paths(test, size, native, wait, poll_us):
    with DaemonProcess("--poll-us", str(poll_us)) as d:
        r = run_pair(d.path, test, size, 200, 8, native=native, wait=wait)
    assert (r["native"], r["wait"], r["bytes"]) == (native, wait, size)
    if test.endswith("_bw"):
        assert r["iterations"] == 200 and r["msg_rate_Mpps"] > 0 and r["bw_avg_MiB"] > 0
    else:
        assert r["iterations"] == 180 and 0 < r["t_min"] <= r["t_typical"] <= r["t_max"]
    counts = [r[f"{side}waits_{how}"] for side in ("", "server_") for how in ("spun", "yielded", "blocked")]
    if wait != "adaptive":  # only the adaptive wait counts how its waits ended
        assert counts == [0] * 6
    elif test in ("send_lat", "send_bw"):  # the server waited for the client's first message
        assert sum(counts[3:]) >= 1


def test_adaptive_budget_after_a_yielding_wait():
    """The spin budget after a wait that ended while yielding: yields that
    came straight back double it (from none: MIN_NS); a yield that gave the
    CPU away (the producer shares it) quarters it, and below MIN_NS there
    is no spin at all; MAX_NS caps it."""
    w = CqWaiter(None)
    short, long_ = CqWaiter.SWITCH_NS, CqWaiter.SWITCH_NS + 1
    assert w.spin_ns == 2_000
    w._learn_yield(long_)
    assert w.spin_ns == 0
    w._learn_yield(long_)
    assert w.spin_ns == 0
    w._learn_yield(short)
    assert w.spin_ns == CqWaiter.MIN_NS
    for _ in range(10):
        w._learn_yield(short)
    assert w.spin_ns == CqWaiter.MAX_NS
    w._learn_yield(long_)
    assert w.spin_ns == CqWaiter.MAX_NS // 4


def test_adaptive_wait_that_spun_keeps_its_counts_and_learns():
    """A wait that ended while spinning returns what it consumed and sets the
    budget to twice the moving average of such waits (at least MIN_NS)."""
    w = CqWaiter(None)
    assert w._adapted(16, 1, 9_000, (2, 1, 0)) == (2, 1, 0)
    assert w.spun == 1 and w.avg_ns == 1_000 + (9_000 - 1_000) / 8
    assert w.spin_ns == int(2 * w.avg_ns)
