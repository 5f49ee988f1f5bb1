"""Accelerator queue priority and AQ doorbell records (spec 5.x.6.10), in
process: the test driver (tests/virtio_rdma/driver.py) plays the guest, the
jobs run on a real accel_core AcceleratorService (worker threads).

Priority: with the accelerator paused, every job waits in the service's fair
receive queue; the order in which the workers then *start* them (each job's
``t_started``, compared, never thresholded) shows what the queue chose.
Doorbell records: under DBREC_POLL the driver writes the record only and
``core.poll(now)`` (the daemon's busy-poll entry) picks it up."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

import accel_core
from accel_core import AcceleratorService, AcceleratorSpec
from fabric.local import LocalFabric
from verbs import Access
from virtio_rdma import wire
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import AccelDtype, AccelOp, AccelStatus, Cmd, DoorbellKind, Status

from .driver import Guest

C64 = np.dtype(np.complex64)
N = 256


@pytest.fixture
def router():
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT, accel_core.Op.IFFT}))])
    r = AccelRouter(svc)
    yield r
    r.close()


def _guest(router, gpa=0x1000_0000):
    g = Guest(LocalFabric(), size=8 << 20, gpa=gpa, accel=router)
    pd = g.alloc_pd()
    return g, pd, g.create_cq(256)


def _wait(router, guests, timeout=20.0):
    deadline = time.monotonic() + timeout
    while any(aq.entries for g in guests for aq in g.core.aqs.values()):
        assert time.monotonic() < deadline, "accelerator jobs did not finish"
        router.wait(0.05)
        router.deliver()


class Src:
    """One input and one output MR holding ``slots`` N-point transforms."""

    def __init__(self, g, pd, slots=16, seed=0):
        rng = np.random.default_rng(seed)
        self.x = (rng.standard_normal((slots, N)) + 1j * rng.standard_normal((slots, N))).astype(C64)
        self.inp = g.reg_mr(pd, self.x.nbytes, access=Access.LOCAL_WRITE)
        g.write(self.inp.gpa, self.x.tobytes())
        self.out = g.reg_mr(pd, self.x.nbytes, access=Access.LOCAL_WRITE)
        self.g = g

    def job(self, i):
        b = N * C64.itemsize
        return dict(size=N, batch=1, dtype=AccelDtype.COMPLEX64,
                    inputs=[(self.inp.addr + i * b, b, self.inp.lkey)],
                    outputs=[(self.out.addr + i * b, b, self.out.lkey)])

    def check(self, i):
        b = N * C64.itemsize
        got = np.frombuffer(self.g.read(self.out.gpa + i * b, b), C64)
        np.testing.assert_allclose(got, accel_core.fft(self.x[i]), rtol=1e-5, atol=1e-3)


def _jobs(g, aq):
    """The accel_core jobs of a queue's in-flight entries, in posted order."""
    return [e.job for e in g.core.aqs[aq.aqn].entries]


def _cqes(g, cq, n):
    cqes = [wire.decode_accel_cqe(c) for c in g.poll(cq)]
    assert len(cqes) == n, cqes
    return cqes


# --------------------------------------------------------------------------- priority
def test_priority_7_queue_overtakes_the_same_guests_priority_0_queue(router):
    g, pd, cq = _guest(router)
    src = Src(g, pd)
    lo = g.create_aq(pd, cq, AccelOp.FFT, priority=0)
    hi = g.create_aq(pd, cq, AccelOp.FFT, priority=7)
    acc = router.local.service.accelerator("fft")
    acc.pause()
    for i in range(4):
        g.post_aq_job(lo, 100 + i, AccelOp.FFT, **src.job(i))
    for i in range(4):
        g.post_aq_job(hi, 200 + i, AccelOp.FFT, **src.job(4 + i))
    lo_jobs, hi_jobs = _jobs(g, lo), _jobs(g, hi)
    assert [j.priority for j in lo_jobs + hi_jobs] == [0] * 4 + [7] * 4
    assert acc.queued_jobs() == hi_jobs + lo_jobs  # the queue's plan, before anything runs
    acc.resume()
    _wait(router, [g])
    started = sorted(lo_jobs + hi_jobs, key=lambda j: j.t_started)
    assert started == hi_jobs + lo_jobs  # posted last, run first; FIFO within each queue
    cqes = _cqes(g, cq, 8)
    assert {c.wr_id for c in cqes} == {*range(100, 104), *range(200, 204)}
    assert all(c.status is AccelStatus.SUCCESS for c in cqes)
    for i in range(8):
        src.check(i)
    # CQEs of each queue stay in posted order
    assert [c.wr_id for c in cqes if c.aqn == lo.aqn] == list(range(100, 104))
    assert [c.wr_id for c in cqes if c.aqn == hi.aqn] == list(range(200, 204))


def test_priority_never_beats_another_guests_fair_share(router):
    """Guest A posts at priority 7, then guest B at priority 0 (same job
    size): they alternate, A first only because it arrived first."""
    a, pda, cqa = _guest(router, gpa=0x1000_0000)
    b, pdb, cqb = _guest(router, gpa=0x2000_0000)
    sa, sb = Src(a, pda, seed=1), Src(b, pdb, seed=2)
    hi = a.create_aq(pda, cqa, AccelOp.FFT, priority=7)
    lo = b.create_aq(pdb, cqb, AccelOp.FFT, priority=0)
    acc = router.local.service.accelerator("fft")
    acc.pause()
    for i in range(4):
        a.post_aq_job(hi, i, AccelOp.FFT, **sa.job(i))
    for i in range(4):
        b.post_aq_job(lo, i, AccelOp.FFT, **sb.job(i))
    ja, jb = _jobs(a, hi), _jobs(b, lo)
    acc.resume()
    _wait(router, [a, b])
    started = sorted(ja + jb, key=lambda j: j.t_started)
    assert started == [j for pair in zip(ja, jb, strict=True) for j in pair]
    assert len(_cqes(a, cqa, 4)) == 4 and len(_cqes(b, cqb, 4)) == 4


def test_create_aq_priority_out_of_range_is_einval(router):
    g, pd, cq = _guest(router)
    assert g.status_of(Cmd.CREATE_AQ, pdn=pd, cqn=cq.cqn, op=int(AccelOp.FFT), priority=8, flags=0,
                       reserved0=0, depth=4, ring_gpa=g.alloc(4 * 256), dbrec_gpa=g.alloc(8, 8),
                       target_host=0, reserved1=0) == Status.EINVAL


# --------------------------------------------------------------------------- doorbell records
def _record(g, aq, pi):
    g.write(aq.dbrec, struct.pack("<II", pi & 0xFFFFFFFF, 0))


def test_polled_record_starts_jobs_without_a_doorbell(router):
    g, pd, cq = _guest(router)
    g.core.poll_doorbell_records = True
    src = Src(g, pd)
    aq = g.create_aq(pd, cq, AccelOp.FFT, depth=4)
    dev = g.core.aqs[aq.aqn]
    assert g.core.poll(g.now) == 0  # nothing written yet
    for i in range(2):
        g.write_aq_job(aq, i, AccelOp.FFT, **src.job(i))
    assert dev.metrics.jobs_posted == 0  # written, not published
    _record(g, aq, aq.pi)
    assert g.core.poll(g.now) == 1
    assert dev.metrics.jobs_posted == 2 and dev.pi == 2
    assert g.core.poll(g.now) == 0  # the same record is no news
    # the doorbell the driver may still ring afterwards, or an older one, is stale: no error
    g.core.doorbell(wire.encode_doorbell(DoorbellKind.AQ, aq.aqn, 1), g.now)
    g.core.doorbell(wire.encode_doorbell(DoorbellKind.AQ, aq.aqn, 2), g.now)
    assert dev.metrics.bad_doorbells == 0 and g.core.metrics.bad_doorbells == 0
    assert dev.metrics.jobs_posted == 2
    _wait(router, [g])
    assert [c.wr_id for c in _cqes(g, cq, 2)] == [0, 1]
    src.check(0)
    src.check(1)
    # a record moving backwards is stale too: ignored, not counted
    _record(g, aq, 1)
    assert g.core.poll(g.now) == 1 and dev.metrics.bad_doorbells == 0 and dev.pi == 2
    # the ring wraps: 4 more jobs through the record alone
    for i in range(2, 6):
        g.write_aq_job(aq, i, AccelOp.FFT, **src.job(i))
    _record(g, aq, aq.pi)
    g.core.poll(g.now)
    _wait(router, [g])
    assert [c.wr_id for c in _cqes(g, cq, 4)] == [2, 3, 4, 5]
    for i in range(2, 6):
        src.check(i)
    assert dev.metrics.jobs_posted == dev.metrics.jobs_completed == 6
    assert dev.metrics.dbrec_applied == 2  # pi 2, then pi 6; the stale 1 was not applied


def test_absurd_record_is_counted_once_and_the_queue_keeps_working(router):
    g, pd, cq = _guest(router)
    g.core.poll_doorbell_records = True
    src = Src(g, pd)
    aq = g.create_aq(pd, cq, AccelOp.FFT, depth=4)
    dev = g.core.aqs[aq.aqn]
    for bad in (5, 0x8000_0000, 0xFFFF_FFF0):  # past depth; far ahead; "behind" but past ci - depth
        _record(g, aq, bad)
        g.core.poll(g.now)
        g.core.poll(g.now)  # the same value again: not counted twice
    # 0xFFFF_FFF0 is behind pi 0 by 16: stale under DBREC_POLL, not absurd
    assert dev.metrics.bad_doorbells == 2 and g.core.metrics.bad_doorbells == 2
    assert dev.pi == 0 and dev.metrics.jobs_posted == 0 and dev.metrics.dbrec_applied == 0
    g.write_aq_job(aq, 9, AccelOp.FFT, **src.job(0))
    _record(g, aq, aq.pi)
    assert g.core.poll(g.now) == 1
    _wait(router, [g])
    (c,) = _cqes(g, cq, 1)
    assert c.wr_id == 9 and c.status is AccelStatus.SUCCESS
    src.check(0)


def test_records_are_not_read_without_dbrec_poll_or_after_destroy(router):
    g, pd, cq = _guest(router)
    src = Src(g, pd)
    aq = g.create_aq(pd, cq, AccelOp.FFT, depth=4)
    dev = g.core.aqs[aq.aqn]
    g.write_aq_job(aq, 1, AccelOp.FFT, **src.job(0))
    _record(g, aq, aq.pi)
    assert g.core.poll(g.now) == 0 and dev.metrics.jobs_posted == 0  # not negotiated
    # without DBREC_POLL a doorbell behind pi is a driver error, as before
    g.ring_aq(aq)
    assert dev.metrics.jobs_posted == 1
    g.core.doorbell(wire.encode_doorbell(DoorbellKind.AQ, aq.aqn, 0), g.now)
    assert dev.metrics.bad_doorbells == 1
    _wait(router, [g])
    _cqes(g, cq, 1)
    g.core.poll_doorbell_records = True
    g.cmd(Cmd.DESTROY_AQ, aqn=aq.aqn)
    g.write_aq_job(aq, 2, AccelOp.FFT, **src.job(1))
    _record(g, aq, aq.pi)
    assert g.core.poll(g.now) == 0 and g.core.metrics.bad_doorbells == 1
    assert aq.aqn not in g.core.aqs


# --------------------------------------------------------------------------- through the daemon
@pytest.mark.parametrize("mode", [pytest.param(("--poll-us", "20000"), id="poll-us"),
                                  pytest.param((), id="kicked")])
def test_guest_lib_skips_aq_doorbells_while_the_daemon_polls(mode):
    """guest_lib's AQ.post writes the doorbell record and rings no doorbell
    while the daemon busy-polls (DBREC_POLL, --poll-us); every job still
    completes, correct, through the record alone. Kicked daemon: posts ring,
    except those made while the daemon still drains the doorbellq with
    notifications off (a job completed in the loop lets the guest post again
    then; how many depends on timing): the daemon reads the records once more
    before it sleeps, so they complete too."""
    from guest_lib import CQ, MR, PD, SGE, Context
    from guest_lib.aq import AQ, AccelWR
    from vhost_user.testing import DaemonProcess

    n, rounds = 256, 200
    b = n * C64.itemsize
    x = (np.random.default_rng(5).standard_normal((rounds, n)) * (1 + 1j)).astype(C64)
    with DaemonProcess(*mode, "--accelerators", "fft=1") as d, Context(d.path, mem_size=16 << 20) as ctx:
        pd, cq = PD(ctx), CQ(ctx, 64)
        mr = MR(pd, 2 * rounds * b, Access.LOCAL_WRITE)
        mr.write(x.tobytes())
        aq = AQ(pd, cq, AccelOp.FFT, depth=8, priority=5)
        skipped0 = ctx.doorbells_skipped
        deadline = time.monotonic() + 60  # a hang guard, not a measurement
        for i in range(rounds):
            wr = AccelWR(i, size=n, inputs=[SGE(mr.buf + i * b, b, mr.lkey)],
                         outputs=[SGE(mr.buf + (rounds + i) * b, b, mr.lkey)])
            assert aq.post(wr) == 1
            wcs: list = []
            while not wcs:
                assert time.monotonic() < deadline, f"job {i} did not complete"
                wcs = cq.poll(1)[1]
            (wc,) = wcs
            assert (wc.wr_id, wc.accel_status) == (i, AccelStatus.SUCCESS)
        got = np.frombuffer(mr.read(rounds * b, rounds * b), C64).reshape(rounds, n)
        np.testing.assert_allclose(got, accel_core.fft(x), rtol=1e-5, atol=1e-3)
        skipped = ctx.doorbells_skipped - skipped0
        if mode:
            assert ctx.dbrec_poll and skipped > rounds // 2, skipped
        else:
            # how many posts find the daemon still draining (notifications off) depends on
            # the machine's timing; the first finds it asleep and must ring
            assert skipped < rounds, skipped
        aq.close()


def test_queues_created_and_destroyed_while_polling_are_tracked(router):
    """The record scanner follows CREATE_AQ / DESTROY_AQ between polls."""
    g, pd, cq = _guest(router)
    g.core.poll_doorbell_records = True
    src = Src(g, pd)
    a = g.create_aq(pd, cq, AccelOp.FFT, depth=4)
    assert g.core.poll(g.now) == 0
    b = g.create_aq(pd, cq, AccelOp.FFT, depth=4)
    g.write_aq_job(b, 2, AccelOp.FFT, **src.job(1))
    _record(g, b, b.pi)
    assert g.core.poll(g.now) == 1
    g.cmd(Cmd.DESTROY_AQ, aqn=a.aqn)
    c = g.create_aq(pd, cq, AccelOp.FFT, depth=4)  # same count of queues, a new one
    g.write_aq_job(c, 3, AccelOp.FFT, **src.job(2))
    _record(g, c, c.pi)
    assert g.core.poll(g.now) == 1
    _wait(router, [g])
    assert sorted(x.wr_id for x in _cqes(g, cq, 2)) == [2, 3]
    src.check(1)
    src.check(2)
    g.core.close()
    assert not router.scanners  # the device's scanner went with it
