"""The cluster scheduler in the daemon (peering.dispatch), sans I/O: three
hosts' routers, fabrics and peer links in one process, every packet encoded
and decoded on its way (tests/fabric/test_roce_fabric.Wire).

Host A has no accelerators (unless asked), B and C run FFT and Turbo on real
AcceleratorServices. A's guest is the in-process driver over real guest
memory. What is checked: one-sided READs of the peers' counters windows
decide where A's jobs go, a busy host is avoided, a failed READ marks its
host down at once, a dead host's jobs are placed again elsewhere (or fail,
per the queue), none lost or delivered twice, and the counters window can
be READ and nothing else.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from accel_core import AcceleratorService, AcceleratorSpec, Op
from fabric.roce import RoceFabric
from peering.dispatch import Dispatcher, TransferEstimates, job_size
from peering.link import LinkConfig, LinkState
from peering.service import Peering
from scheduler.board import decode_board, inbound_base
from scheduler.wire import COUNTERS_SIZE, decode_counters
from tests.fabric.test_roce_fabric import Wire
from tests.peering.test_two_hosts import Harness
from tests.virtio_rdma.driver import Guest
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import AccelDtype, AccelOp, AccelStatus, AqFlags, Cmd

IPS = {"a": "192.0.2.1", "b": "192.0.2.2", "c": "192.0.2.3"}
C64 = np.dtype(np.complex64)
FAST = LinkConfig(timeout=10, keepalive=0.05, connect_interval=0.02)  # 4 ms ACK timeout


def _service(slowdown: float = 1.0) -> AcceleratorService:
    return AcceleratorService([
        AcceleratorSpec("fft", ops=frozenset({Op.FFT, Op.IFFT}), slowdown=slowdown),
        AcceleratorSpec("turbo", ops=frozenset({Op.TURBO_ENCODE, Op.TURBO_DECODE}), slowdown=slowdown)])


class Trio(Harness):
    """A (a guest; accelerators if ``a_local``), B and C, all linked, each
    with a dispatcher running ``policy``."""

    def __init__(self, *, policy="probe", a_local=False, b_slowdown=1.0, c_slowdown=1.0, seed=1, guest_on="a"):
        self.fab = {n: RoceFabric(ip) for n, ip in IPS.items()}
        self.wire = Wire(list(self.fab.values()))
        self.router = {"a": AccelRouter(_service() if a_local else None),
                       "b": AccelRouter(_service(b_slowdown)), "c": AccelRouter(_service(c_slowdown))}
        self.peering = {n: Peering(self.fab[n], self.router[n], [ip for m, ip in IPS.items() if m != n],
                                   config=FAST, policy=policy) for n in IPS}
        self.up = {n: True for n in IPS}
        self.da: Dispatcher = self.peering[guest_on].dispatcher   # the guest's host's
        self.da.rng.seed(seed)
        self.guest_on = guest_on
        for p in self.peering.values():
            p.start()
        self.run(lambda: all(t.link.state is LinkState.UP for p in self.peering.values()
                             for t in p.targets.values()))
        self.g = Guest(self.fab[guest_on], size=32 << 20, accel=self.router[guest_on])
        self.pd = self.g.alloc_pd()
        self.cq = self.g.create_cq(1024)

    def host(self, name: str) -> int:
        """Host ``name`` as the guest's host numbers it."""
        return 0 if name == self.guest_on else self.peering[self.guest_on].resolve(IPS[name])

    def target(self, frm: str, to: str):
        return self.peering[frm].targets[IPS[to]]

    def step(self) -> None:
        now = time.monotonic()
        self.wire.deliver(now)
        for n in IPS:
            if self.up[n]:
                self.router[n].deliver()
                p = self.peering[n]
                d = p.next_deadline()
                if d is not None and d <= now:
                    p.on_timer(now)

    def kill(self, n: str) -> None:
        self.up[n] = False
        self.fab[n].sink = None
        self.wire.fabrics.pop(IPS[n])
        self.wire.queue = [q for q in self.wire.queue if q[0] != IPS[n]]

    def close(self) -> None:
        for p in self.peering.values():
            p.close()
        for r in self.router.values():
            r.close()

    def fft(self, aq, wr_id: int, x: np.ndarray):
        src = self.mr(x.tobytes())
        dst = self.mr(x.nbytes)
        self.g.post_aq_job(aq, wr_id, AccelOp.FFT, size=x.shape[-1], batch=x.shape[0],
                           dtype=AccelDtype.COMPLEX64, inputs=[(src.addr, x.nbytes, src.lkey)],
                           outputs=[(dst.addr, x.nbytes, dst.lkey)])
        return dst



@pytest.fixture
def trio():
    t = Trio()
    yield t
    t.close()


def _x(seed: int, batch=4, n=1024) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.standard_normal((batch, n)) + 1j * r.standard_normal((batch, n))).astype(C64)


def test_a_host_without_accelerators_reads_its_peers_counters_and_spreads_its_jobs(trio):
    t = trio
    aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
    xs = [_x(i) for i in range(24)]
    dsts = [t.fft(aq, i, x) for i, x in enumerate(xs)]
    cqes = t.cqes(24)
    assert sorted(c.wr_id for c in cqes) == list(range(24))          # each once
    for c in cqes:
        assert c.status is AccelStatus.SUCCESS
        got = np.frombuffer(t.g.read(dsts[c.wr_id].gpa, xs[c.wr_id].nbytes), C64).reshape(xs[c.wr_id].shape)
        np.testing.assert_allclose(got, np.fft.fft(xs[c.wr_id]), rtol=1e-4, atol=1e-3)
    ran = {c.host for c in cqes}
    assert ran <= {t.host("b"), t.host("c")} and 0 not in ran
    d = t.da
    # two READs per decision, each decision deferred until they were in
    assert d.counters.decisions == 24 and d.counters.remote == 24
    assert d.metrics.deferred == 24 and d.metrics.reads == 48 == d.counters.probes
    assert d.metrics.reads_failed == d.metrics.reads_bad == 0
    assert d.counters.reasons == {"best of probed": 24}
    # READ round trips and the jobs' time on the wire were measured
    est = d.transfer.describe()
    assert set(est) == {t.host("b"), t.host("c")} and all(e["samples"] > 0 for e in est.values())
    # the peers published their counters as their load moved, and nobody READ A (it decided nothing)
    assert t.peering["b"].dispatcher.metrics.publishes > 1


def test_a_busy_host_is_seen_in_its_counters_and_avoided():
    t = Trio(b_slowdown=200.0)
    try:
        pinned = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64, flags=AqFlags.FORCE_TARGET,
                               target_host=t.host("b"))
        x = _x(0, batch=8, n=2048)
        for i in range(6):   # B is busy for a good while: queued work in its counters
            t.fft(pinned, 100 + i, x)
        t.run(lambda: t.router["b"].local.service.queued_work_seconds() > 0)
        t.run(lambda: decode_counters(t.peering["b"].dispatcher.region, 0, 0).queued["fft"] > 0)
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
        for i in range(8):
            t.fft(aq, i, _x(i))
        cqes = [c for c in t.cqes(14, timeout=60) if c.wr_id < 100]
        assert len(cqes) == 8 and all(c.status is AccelStatus.SUCCESS for c in cqes)
        # every unpinned job went to C: a READ of B's counters showed its queue
        assert {c.host for c in cqes} == {t.host("c")}
    finally:
        t.close()


def test_the_counters_window_can_be_read_and_nothing_else(trio):
    t = trio
    la = t.target("a", "b").link
    rkey, n = la.peer_counters
    assert n == COUNTERS_SIZE
    into = memoryview(bytearray(COUNTERS_SIZE))
    la.read(7 << 3, into, rkey, 0)
    la.kick(time.monotonic())
    t.run(lambda: any(into))
    row = decode_counters(into, 2, 0.0)
    assert row.units == {"fft": 1, "ifft": 1, "turbo_encode": 1, "turbo_decode": 1}
    # a WRITE to it is a window fault at B, and fails the link (A reconnects)
    lb = t.target("b", "a").link
    faults = lb.metrics.window_faults
    la.write(8 << 3, [memoryview(b"x" * 16)], rkey, 0)
    la.kick(time.monotonic())
    t.run(lambda: lb.metrics.window_faults == faults + 1)
    assert decode_counters(t.peering["b"].dispatcher.region, 2, 0.0).units == row.units


def test_a_failed_read_marks_its_host_down_at_once_and_the_job_goes_elsewhere(trio):
    t = trio
    lb = t.target("b", "a").link
    lb.table.close(lb.counters_rkey)     # B's counters window is gone: A's READs of it fail
    aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
    x = _x(3)
    dsts = [t.fft(aq, i, x) for i in range(6)]
    cqes = t.cqes(6)
    assert all(c.status is AccelStatus.SUCCESS for c in cqes)
    assert t.da.metrics.reads_failed >= 1   # (its link failed with it: a remote access error)
    # no job ran on the host whose READ failed while it was marked down
    assert {c.host for c in cqes} == {t.host("c")}
    for d in dsts:
        got = np.frombuffer(t.g.read(d.gpa, x.nbytes), C64).reshape(x.shape)
        np.testing.assert_allclose(got, np.fft.fft(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("redispatch", [True, False])
def test_a_dead_hosts_jobs_are_placed_again_elsewhere_or_fail_per_the_queue(redispatch):
    t = Trio(policy="random", b_slowdown=300.0)
    try:
        flags = AqFlags.LOCAL_FALLBACK if redispatch else 0
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64, flags=flags)
        x = _x(5, batch=8, n=2048)
        dsts = {i: t.fft(aq, i, x) for i in range(12)}
        tb = t.target("a", "b")
        t.run(lambda: t.router["a"].remotes[t.host("b")].sent or tb.backlog)
        t.run(lambda: t.target("b", "a").served)          # B holds some of them when it dies
        on_b = len(tb.sent) + len(tb.backlog)
        assert on_b > 0
        t.kill("b")
        cqes = t.cqes(12, timeout=30)
        assert sorted(c.wr_id for c in cqes) == list(range(12))   # none lost, none twice
        failed = [c for c in cqes if c.status is not AccelStatus.SUCCESS]
        if redispatch:
            assert not failed
            assert t.g.core.aqs[aq.aqn].metrics.fallbacks == on_b == t.da.metrics.redispatched
            for c in cqes:
                got = np.frombuffer(t.g.read(dsts[c.wr_id].gpa, x.nbytes), C64).reshape(x.shape)
                np.testing.assert_allclose(got, np.fft.fft(x), rtol=1e-4, atol=1e-3)
        else:
            assert failed and {c.status for c in failed} == {AccelStatus.REMOTE_FAILED}
        assert t.host("b") in t.da.down
        # after B is down nothing more goes there
        aq2 = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
        for i in range(4):
            t.fft(aq2, 50 + i, _x(i))
        assert {c.host for c in t.cqes(4)} == {t.host("c")}
    finally:
        t.close()


def test_a_job_cancelled_while_its_reads_are_out_completes_cancelled_once(trio):
    t = trio
    aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=16)
    t.fft(aq, 1, _x(1))
    assert t.da.metrics.deferred == 1 and t.da._deferred   # READs posted, not yet answered
    t.g.cmd(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=1)
    (c,) = t.cqes(1)
    assert c.status is AccelStatus.CANCELLED
    t.run(lambda: not t.da._reads)                    # the READs come back and are ignored
    for _ in range(50):
        t.step()
    assert t.g.poll(t.cq) == [] and t.da.counters.decisions == 0


def test_job_size_and_transfer_estimates():
    from virtio_rdma.constants import AccelEarlyStop
    from virtio_rdma.wire import AccelJob

    def job(op, size, batch, it=0):
        return AccelJob(0, op, AccelDtype.COMPLEX64, size, batch, it, AccelEarlyStop.NONE, None, [], [])
    assert job_size(job(AccelOp.FFT, 4096, 1)) == 1.0
    assert job_size(job(AccelOp.FFT, 4096, 3)) == 3.0
    assert job_size(job(AccelOp.TURBO_DECODE, 6144, 2, 4)) == 1.0
    te = TransferEstimates()
    assert te.one_way(1, 0) > 0                          # defaults before any sample
    te.read_rtt(1, 200e-6)
    assert te.one_way(1, 0) == pytest.approx(100e-6)
    te.job(1, 1_000_000, 200e-6 + 1e-3)                   # 1 MB moved in 1 ms beyond latency
    assert te.one_way(1, 1_000_000) == pytest.approx(100e-6 + 0.5e-3)


@pytest.mark.parametrize("policy", ["seed", "local", "random", "p2c", "p2c+own", "probe:3", "guided+own"])
def test_every_daemon_policy_places_and_counts_its_decisions(policy):
    t = Trio(policy=policy, a_local=True)
    try:
        # a queue with a flag: its jobs skip the native path (small FFTs on an idle local unit)
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64, flags=AqFlags.LOCAL_FALLBACK)
        x = _x(9)
        dsts = [t.fft(aq, i, x) for i in range(8)]
        cqes = t.cqes(8)
        assert all(c.status is AccelStatus.SUCCESS for c in cqes)
        for d in dsts:
            got = np.frombuffer(t.g.read(d.gpa, x.nbytes), C64).reshape(x.shape)
            np.testing.assert_allclose(got, np.fft.fft(x), rtol=1e-4, atol=1e-3)
        c = t.da.counters
        assert c.decisions == c.local + c.remote == 8
        assert t.da.policy.name == policy and sum(c.reasons.values()) == c.decisions
        assert c.probes == t.da.metrics.reads <= 3 * c.decisions
    finally:
        t.close()


# ----------------------------------------------------------------------------- the load board
def _inbound(t: Trio) -> bytes:
    b = t.peering["a"].dispatcher.board
    assert b is not None and b.region is not None
    return bytes(b.region[inbound_base(b.hosts):])


def test_the_board_on_the_lowest_address_is_read_once_per_decision_and_balances():
    """Policy board: A (192.0.2.1, no accelerators) holds the board; B and C WRITE their
    counters into their slots as their load moves. A decides on its own copy (no READ),
    announces each job on its target's slot, the target takes it off as the job arrives:
    when all is done the announced work is zero again."""
    t = Trio(policy="board")
    try:
        d = t.da
        assert d.board is not None and d.board.holder == 0 and d.board.hosts == 3
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
        x = _x(4)
        dsts = [t.fft(aq, i, x) for i in range(16)]
        cqes = t.cqes(16)
        assert all(c.status is AccelStatus.SUCCESS for c in cqes)
        assert {c.host for c in cqes} <= {t.host("b"), t.host("c")}
        for dst in dsts:
            got = np.frombuffer(t.g.read(dst.gpa, x.nbytes), C64).reshape(x.shape)
            np.testing.assert_allclose(got, np.fft.fft(x), rtol=1e-4, atol=1e-3)
        assert d.counters.decisions == 16 and d.counters.reasons == {"best on the board": 16}
        assert d.metrics.board_reads == 16 and d.metrics.reads == 0 and d.counters.probes == 16
        assert d.metrics.announced == 16
        mb, mc = (t.peering[n].dispatcher.metrics for n in "bc")
        assert mb.board_writes > 0 and mc.board_writes > 0 and mb.landed + mc.landed == 16
        t.run(lambda: _inbound(t) == bytes(len(_inbound(t))))   # every announcement taken off
        # the slots hold B's and C's counters
        b = d.board
        rows = decode_board(b.region, b.hosts, b.slots, 0.0)
        assert all(r is not None and r.units.get("fft") == 1 for r in rows.values())
    finally:
        t.close()


def test_a_host_away_from_the_board_reads_it_with_one_read_and_falls_back_when_it_is_gone():
    """C (accelerators, slowed and busy) sends its guest's jobs away after one READ of the
    board A holds; B's announced jobs show on the board. With A dead, C probes instead."""
    t = Trio(policy="board", c_slowdown=300.0, guest_on="c")
    try:
        d = t.da
        assert d.board is not None and d.board.holder == t.host("a") and d.board.region is None
        pinned = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64, flags=AqFlags.FORCE_TARGET, target_host=0)
        xb = _x(0, batch=8, n=2048)
        for i in range(4):   # C's own accelerator is busy for a while
            t.fft(pinned, 100 + i, xb)
        t.run(lambda: decode_board(t.peering["a"].dispatcher.board.region, 3,
                                   {2: 2}, 0.0)[2] is not None)
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=64)
        for i in range(6):
            t.fft(aq, i, _x(i))
        cqes = [c for c in t.cqes(10, timeout=60) if c.wr_id < 100]
        assert all(c.status is AccelStatus.SUCCESS for c in cqes)
        assert {c.host for c in cqes} == {t.host("b")}       # not A (none), not C (busy)
        assert d.metrics.board_reads == d.metrics.reads == d.counters.probes == 6
        assert d.metrics.announced == 6
        t.run(lambda: _inbound(t) == bytes(len(_inbound(t))))
        # the holder dies: C's next decisions probe B's own counters instead
        t.kill("a")
        t.run(lambda: d.board_down)
        for i in range(3):
            t.fft(aq, 50 + i, _x(i))
        cqes = t.cqes(3 + 0, timeout=30)
        assert all(c.status is AccelStatus.SUCCESS for c in cqes)
        assert d.metrics.board_fallbacks >= 3
    finally:
        t.close()


def test_a_board_whose_slots_hold_no_current_row_fails_the_job_once_and_does_not_hang():
    """The board's holder decides on its own copy; if none of the slots it would read
    holds a well-formed row (torn, wiped), the decision has no candidate: the job
    completes NO_ACCELERATOR at once (a later job, once the peers have written their
    slots again, runs), never an error inside the doorbell handler that leaves it pending."""
    t = Trio(policy="board")
    try:
        d = t.da
        b = d.board
        assert b is not None and b.region is not None and b.holder == 0
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=8)
        x = _x(5)
        for n in "bc":                     # the peers stop writing their slots ...
            t.peering[n].dispatcher.board = None
        b.region[:] = bytes(len(b.region))  # ... and the holder's copy is wiped
        t.fft(aq, 1, x)
        (cqe,) = t.cqes(1)
        assert cqe.wr_id == 1 and cqe.status is AccelStatus.NO_ACCELERATOR
        assert d.metrics.no_candidate == 1
    finally:
        t.close()


def test_a_read_that_races_the_peers_update_lets_its_table_row_stand_in(monkeypatch):
    """B and C caught mid-update of their counters (the seqlock's head and tail differ) for
    as long as A decides: each READ comes back torn, which says nothing against the host:
    its table row stands in (as for a late read) and the jobs run there, counted as torn;
    only a malformed region leaves a host out. (A host's own writer is held still here to
    keep the region torn; a real race lasts a few instructions.)"""
    t = Trio()
    try:
        for n in "bc":
            dp = t.peering[n].dispatcher
            head = int.from_bytes(dp.region[:8], "little")
            dp.region[COUNTERS_SIZE - 8:COUNTERS_SIZE] = (head + 1).to_bytes(8, "little")
            monkeypatch.setattr(dp, "publish", lambda: None)
        aq = t.g.create_aq(t.pd, t.cq, AccelOp.FFT, depth=16)
        x = _x(6)
        dsts = [t.fft(aq, i, x) for i in range(4)]
        cqes = t.cqes(4)
        assert all(c.status is AccelStatus.SUCCESS for c in cqes), cqes
        assert {c.host for c in cqes} <= {t.host("b"), t.host("c")}
        d = t.da
        assert d.metrics.reads_torn >= 4 and d.metrics.reads_bad == d.metrics.reads_failed == 0
        assert d.counters.decisions == 4
        for dst in dsts:
            got = np.frombuffer(t.g.read(dst.gpa, x.nbytes), C64).reshape(x.shape)
            np.testing.assert_allclose(got, np.fft.fft(x), rtol=1e-4, atol=1e-3)
    finally:
        t.close()
