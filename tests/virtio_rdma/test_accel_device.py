"""The device side of accelerator queues (spec 5.x.6.10), in process: a
guest driver (tests/virtio_rdma/driver.py) writes job entries into an AQ ring
in its memory and rings kind 4 doorbells; the jobs run on a real
accel_core AcceleratorService (worker threads) and come back as CQEs.
Results are compared with calling accel_core directly."""
from __future__ import annotations

import time

import numpy as np
import pytest

import accel_core
from accel_core import AcceleratorService, AcceleratorSpec
from fabric.local import LocalFabric
from verbs import Access, WcStatus
from virtio_rdma import accel, wire
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import (
    ACCEL_CQE_OPCODE_BASE,
    AccelDtype,
    AccelEarlyStop,
    AccelOp,
    AccelStatus,
    Cmd,
    Status,
)

from .driver import Guest, seeded_ids

C64, C128 = np.dtype(np.complex64), np.dtype(np.complex128)


@pytest.fixture
def router():
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT, accel_core.Op.IFFT})),
                              AcceleratorSpec("turbo", ops=frozenset({accel_core.Op.TURBO_ENCODE,
                                                                      accel_core.Op.TURBO_DECODE}),
                                              workers=2)])
    r = AccelRouter(svc)
    yield r
    r.close()


def _guest(router, gpa=0x1000_0000, size=16 << 20):
    g = Guest(LocalFabric(), size=size, gpa=gpa, accel=router)
    pd = g.alloc_pd()
    cq = g.create_cq(256)
    return g, pd, cq


def _wait(router, guests, n_cqes=None, timeout=20.0):
    """Deliver finished jobs until every AQ of ``guests`` is empty."""
    deadline = time.monotonic() + timeout
    while any(aq.entries for g in guests for aq in g.core.aqs.values()):
        assert time.monotonic() < deadline, "accelerator jobs did not finish"
        router.wait(0.05)
        router.deliver()


def _mr(g, pd, data: bytes | int, access=Access.LOCAL_WRITE):
    n = data if isinstance(data, int) else len(data)
    buf = g.reg_mr(pd, n, access=access)
    if not isinstance(data, int):
        g.write(buf.gpa, data)
    return buf


def _acc(g, cq, n=1):
    cqes = g.poll(cq)
    assert len(cqes) == n, cqes
    return [wire.decode_accel_cqe(c) for c in cqes], cqes


def _run(router, g, pd, cq, op, inp: bytes, out_len: int, canary=16, **kw):
    """One job with one input and one output SGE (output surrounded by canaries)."""
    aq = g.create_aq(pd, cq, op)
    src = _mr(g, pd, inp)
    dst = _mr(g, pd, bytes([0xAB]) * (out_len + 2 * canary))
    g.post_aq_job(aq, 7, op, inputs=[(src.addr, len(inp), src.lkey)],
                  outputs=[(dst.addr + canary, out_len, dst.lkey)], **kw)
    _wait(router, [g])
    (c,), (raw,) = _acc(g, cq)
    whole = g.read(dst.gpa, out_len + 2 * canary)
    assert whole[:canary] == bytes([0xAB]) * canary and whole[-canary:] == bytes([0xAB]) * canary
    return c, raw, whole[canary:canary + out_len], aq


@pytest.mark.parametrize("n,batch,dt", [(64, 1, C64), (1536, 2, C64), (60, 3, C128), (1200, 1, C128)])
@pytest.mark.parametrize("op", [AccelOp.FFT, AccelOp.IFFT])
def test_fft_equals_accel_core(router, op, n, batch, dt):
    g, pd, cq = _guest(router)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((batch, n)) + 1j * rng.standard_normal((batch, n))).astype(dt)
    c, raw, out, _ = _run(router, g, pd, cq, op, x.tobytes(), x.nbytes, size=n, batch=batch,
                          dtype=AccelDtype.COMPLEX64 if dt == C64 else AccelDtype.COMPLEX128)
    assert c.status is AccelStatus.SUCCESS and raw.status == WcStatus.SUCCESS
    assert raw.opcode == ACCEL_CQE_OPCODE_BASE | op and c.wr_id == 7 and c.byte_len == x.nbytes
    want = (accel_core.fft if op is AccelOp.FFT else accel_core.ifft)(x)
    got = np.frombuffer(out, dtype=dt).reshape(batch, n)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dt == C64 else 1e-12, atol=1e-4 if dt == C64 else 1e-9)
    assert np.allclose(got, np.fft.fft(x) if op is AccelOp.FFT else np.fft.ifft(x), rtol=1e-4, atol=1e-3)
    assert g.core.metrics.aq_jobs == 1 and g.core.metrics.aq_completions == 1 and not g.core.metrics.aq_errors


def test_turbo_encode_bit_exact(router):
    g, pd, cq = _guest(router)
    K, B = 1024, 3
    bits = np.random.default_rng(1).integers(0, 2, (B, K), dtype=np.uint8)
    c, _, out, _ = _run(router, g, pd, cq, AccelOp.TURBO_ENCODE, bits.tobytes(), B * 3 * (K + 4), size=K,
                        batch=B, dtype=0)
    assert c.status is AccelStatus.SUCCESS and c.byte_len == B * 3 * (K + 4)
    assert out == accel_core.turbo_encode(bits).tobytes()


@pytest.mark.parametrize("early_stop", [AccelEarlyStop.NONE, AccelEarlyStop.CRC24A])
def test_turbo_decode_bit_exact(router, early_stop):
    g, pd, cq = _guest(router)
    K, B, its = 512, 4, 6
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2, (B, K), dtype=np.uint8)
    if early_stop is AccelEarlyStop.CRC24A:
        bits = accel_core.attach_crc24a(bits[:, :K - 24])
    enc = accel_core.turbo_encode(bits).astype(np.float32)
    llr = ((1 - 2 * enc) * 2.0 + rng.standard_normal(enc.shape) * 0.9).astype(np.float32)
    es = None if early_stop is AccelEarlyStop.NONE else "crc24a"
    want_bits, want_used = accel_core.turbo_decode(llr, iterations=its, scaling=0.75, early_stop=es)
    c, _raw, out, _ = _run(router, g, pd, cq, AccelOp.TURBO_DECODE, llr.tobytes(), B * K + B, size=K,
                          batch=B, iterations=its, scaling=0.75, early_stop=early_stop)
    assert c.status is AccelStatus.SUCCESS and c.byte_len == B * K + B
    assert out[:B * K] == want_bits.tobytes()
    assert list(out[B * K:]) == [int(u) for u in want_used]
    assert c.iterations == int(np.max(want_used))


def test_scattered_sges_and_misaligned(router):
    """Input in three pieces of two MRs, output in two pieces, one misaligned: gathered/scattered."""
    g, pd, cq = _guest(router)
    n, B = 256, 2
    x = (np.arange(B * n) * (1 + 0.5j)).astype(C64)
    data = x.tobytes()
    m1 = _mr(g, pd, 4096 * 2)
    m2 = _mr(g, pd, 4096 * 2)
    g.write(m1.gpa + 3, data[:1000])
    g.write(m2.gpa, data[1000:3000])
    g.write(m1.gpa + 5000, data[3000:])
    out = _mr(g, pd, 8192)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    g.post_aq_job(aq, 1, AccelOp.FFT, size=n, batch=B,
                  inputs=[(m1.addr + 3, 1000, m1.lkey), (m2.addr, 2000, m2.lkey),
                          (m1.addr + 5000, len(data) - 3000 + 100, m1.lkey)],
                  outputs=[(out.addr + 1, 1500, out.lkey), (out.addr + 4000, 4000, out.lkey)])
    _wait(router, [g])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.SUCCESS and c.byte_len == len(data)
    got = g.read(out.gpa + 1, 1500) + g.read(out.gpa + 4000, len(data) - 1500)
    np.testing.assert_allclose(np.frombuffer(got, C64).reshape(B, n), accel_core.fft(x.reshape(B, n)),
                               rtol=1e-5, atol=1e-3)
    # nothing past the output's bytes
    assert g.read(out.gpa + 4000 + len(data) - 1500, 64) == bytes(64)


def test_fft_in_place(router):
    g, pd, cq = _guest(router)
    n = 128
    x = np.exp(2j * np.pi * np.arange(n) / n * 5).astype(C64)
    buf = _mr(g, pd, x.tobytes())
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    g.post_aq_job(aq, 3, AccelOp.FFT, size=n, inputs=[(buf.addr, x.nbytes, buf.lkey)],
                  outputs=[(buf.addr, x.nbytes, buf.lkey)])
    _wait(router, [g])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.SUCCESS
    np.testing.assert_allclose(np.frombuffer(g.read(buf.gpa, x.nbytes), C64), accel_core.fft(x),
                               rtol=1e-5, atol=1e-3)


def _bad(router, g, pd, cq, aq, *, wr_id=9, raw=None, **kw):
    before = g.read(kw["outputs"][0][0] - 16, 16 + 4096) if "outputs" in kw else None
    g.post_aq_job(aq, wr_id, kw.pop("op", aq_op(g, aq)), raw=raw, **kw)
    _wait(router, [g])
    (c,), (cqe,) = _acc(g, cq)
    if before is not None:
        assert g.read(kw["outputs"][0][0] - 16, 16 + 4096) == before
    return c, cqe


def aq_op(g, aq):
    return g.core.aqs[aq.aqn].op


def test_bad_jobs_get_the_right_status(router):
    g, pd, cq = _guest(router)
    other_pd = g.alloc_pd()
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    src = _mr(g, pd, 8192)
    dst = _mr(g, pd, 8192)
    ro = _mr(g, pd, 8192, access=0)
    foreign = _mr(g, other_pd, 8192)
    n = 64
    ok_in = [(src.addr, n * 8, src.lkey)]
    ok_out = [(dst.addr + 16, n * 8, dst.lkey)]
    cases = [
        (dict(size=7, inputs=ok_in, outputs=ok_out), AccelStatus.INVALID_PARAMS),      # 7 not 2^a3^b5^c
        (dict(size=n, batch=0, inputs=ok_in, outputs=ok_out), AccelStatus.INVALID_PARAMS),
        (dict(op=AccelOp.IFFT, size=n, inputs=ok_in, outputs=ok_out), AccelStatus.INVALID_PARAMS),
        (dict(size=n, iterations=3, inputs=ok_in, outputs=ok_out), AccelStatus.INVALID_PARAMS),
        (dict(size=n, inputs=[(src.addr, n * 8, src.lkey ^ 1)], outputs=ok_out), AccelStatus.LOCAL_PROT),
        (dict(size=n, inputs=[(src.addr + 8000, n * 8, src.lkey)], outputs=ok_out), AccelStatus.LOCAL_PROT),
        (dict(size=n, inputs=[(foreign.addr, n * 8, foreign.lkey)], outputs=ok_out), AccelStatus.LOCAL_PROT),
        (dict(size=n, inputs=ok_in, outputs=[(ro.addr + 16, n * 8, ro.lkey)]), AccelStatus.LOCAL_PROT),
        (dict(size=n, inputs=[(src.addr, n * 8 - 1, src.lkey)], outputs=ok_out), AccelStatus.LOCAL_LEN),
        (dict(size=n, inputs=ok_in, outputs=[(dst.addr + 16, n * 8 - 8, dst.lkey)]), AccelStatus.LOCAL_LEN),
    ]
    g.write(dst.gpa, bytes([0x5A]) * 8192)
    for i, (kw, want) in enumerate(cases):
        c, cqe = _bad(router, g, pd, cq, aq, wr_id=100 + i, **kw)
        assert (c.status, c.wr_id, c.byte_len) == (want, 100 + i, 0), (i, kw, c)
        assert cqe.status == wire.ACCEL_WC_STATUS[want]
    # garbage slots: reserved bytes, SGE counts, unknown op
    for i, raw in enumerate([bytes([1] * 256), bytes(256), wire.encode_accel_job(5, AccelOp.FFT, size=n)]):
        c, _ = _bad(router, g, pd, cq, aq, wr_id=0, raw=raw, size=0)
        assert c.status is AccelStatus.INVALID_PARAMS, i
    m = g.core.aqs[aq.aqn].metrics
    assert m.jobs_posted == m.jobs_completed == len(cases) + 3
    assert m.errors == {"INVALID_PARAMS": 7, "LOCAL_PROT": 4, "LOCAL_LEN": 2}
    assert g.core.metrics.aq_errors == 13
    # the queue still works
    c, *_ = _run(router, g, pd, cq, AccelOp.FFT, bytes(n * 8), n * 8, size=n)
    assert c.status is AccelStatus.SUCCESS


def test_turbo_bad_params(router):
    g, pd, cq = _guest(router)
    aq = g.create_aq(pd, cq, AccelOp.TURBO_DECODE)
    src, dst = _mr(g, pd, 65536), _mr(g, pd, 8192)
    K = 40
    ins, outs = [(src.addr, 3 * (K + 4) * 4, src.lkey)], [(dst.addr + 16, K + 1, dst.lkey)]
    for kw in (dict(size=41), dict(size=K, iterations=0), dict(size=K, iterations=65),
               dict(size=K, iterations=4, scaling=1.5), dict(size=K, iterations=4, dtype=1)):
        c, _ = _bad(router, g, pd, cq, aq, inputs=ins, outputs=outs, **kw)
        assert c.status is AccelStatus.INVALID_PARAMS, kw
    # non-finite LLRs: refused by the kernel, INVALID_PARAMS
    g.write(src.gpa, np.full(3 * (K + 4), np.nan, np.float32).tobytes())
    c, _ = _bad(router, g, pd, cq, aq, inputs=ins, outputs=outs, size=K, iterations=4)
    assert c.status is AccelStatus.INVALID_PARAMS


def test_other_guests_key_and_other_guests_unaffected(router):
    a, pa, ca = _guest(router)
    b, pb, cb = _guest(router, gpa=0x4000_0000)
    n = 64
    bsrc = _mr(b, pb, bytes(n * 8))
    _asrc, adst = _mr(a, pa, bytes(n * 8)), _mr(a, pa, n * 8 + 32)
    aqa = a.create_aq(pa, ca, AccelOp.FFT)
    aqb = b.create_aq(pb, cb, AccelOp.FFT)
    # a names b's lkey at b's address: LOCAL_PROT (keys are per device)
    a.post_aq_job(aqa, 1, AccelOp.FFT, size=n, inputs=[(bsrc.addr, n * 8, bsrc.lkey)],
                  outputs=[(adst.addr, n * 8, adst.lkey)])
    x = np.ones(n, C64)
    b.write(bsrc.gpa, x.tobytes())
    bdst = _mr(b, pb, n * 8)
    b.post_aq_job(aqb, 2, AccelOp.FFT, size=n, inputs=[(bsrc.addr, n * 8, bsrc.lkey)],
                  outputs=[(bdst.addr, n * 8, bdst.lkey)])
    # and a floods garbage
    for i in range(8):
        a.write_aq_job(aqa, 10 + i, AccelOp.FFT, raw=bytes([0xFF]) * 256)
    a.ring_aq(aqa)
    _wait(router, [a, b])
    ac, _ = _acc(a, ca, 9)
    assert ac[0].status is AccelStatus.LOCAL_PROT
    assert all(c.status is AccelStatus.INVALID_PARAMS for c in ac[1:])
    (bc,), _ = _acc(b, cb)
    assert bc.status is AccelStatus.SUCCESS
    np.testing.assert_allclose(np.frombuffer(b.read(bdst.gpa, n * 8), C64), accel_core.fft(x), atol=1e-4)
    assert b.core.metrics.aq_errors == 0


def test_completions_in_posted_order_and_full_ring(router):
    g, pd, cq = _guest(router)
    aq = g.create_aq(pd, cq, AccelOp.FFT, depth=8)
    n = 4096
    src, dst = _mr(g, pd, n * 8), _mr(g, pd, 8 * n * 8)
    for i in range(8):
        if i % 3 == 1:  # a failing job between slow ones completes in its place
            g.write_aq_job(aq, i, AccelOp.FFT, size=7, inputs=[(src.addr, 56, src.lkey)],
                           outputs=[(dst.addr, 56, dst.lkey)])
        else:
            g.write_aq_job(aq, i, AccelOp.FFT, size=n, batch=1, inputs=[(src.addr, n * 8, src.lkey)],
                           outputs=[(dst.addr + i * n * 8, n * 8, dst.lkey)])
    fft = router.local.service.accelerator("fft")
    fft.pause()  # the jobs stay in flight (none runs in the doorbell itself)
    g.ring_aq(aq)
    # one more than depth ahead of the completed jobs: counted, ignored
    g.ring_aq(aq, aq.pi + 1)
    assert g.core.aqs[aq.aqn].metrics.bad_doorbells == 1
    # behind: also counted
    g.ring_aq(aq, aq.pi - 1)
    assert g.core.aqs[aq.aqn].metrics.bad_doorbells == 2
    fft.resume()
    _wait(router, [g])
    cs, _ = _acc(g, cq, 8)
    assert [c.wr_id for c in cs] == list(range(8))
    assert [c.status for c in cs] == [AccelStatus.INVALID_PARAMS if i % 3 == 1 else AccelStatus.SUCCESS
                                      for i in range(8)]
    # slots are free again: 8 more fit
    for i in range(8):
        g.write_aq_job(aq, 100 + i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                       outputs=[(dst.addr, 512, dst.lkey)])
    g.ring_aq(aq)
    _wait(router, [g])
    cs, _ = _acc(g, cq, 8)
    assert all(c.status is AccelStatus.SUCCESS for c in cs)
    assert g.core.aqs[aq.aqn].metrics.bad_doorbells == 2


def _blocked_router():
    """A router whose one FFT worker is held up (paused accelerator): jobs stay queued."""
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
    return AccelRouter(svc), svc.accelerator("fft")


def test_destroy_aq_flushes_queued_jobs():
    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        src, dst = _mr(g, pd, 512), _mr(g, pd, 4096)
        acc.pause()
        for i in range(3):
            g.write_aq_job(aq, i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr + 512 * i, 512, dst.lkey)])
        g.ring_aq(aq)
        assert g.status_of(Cmd.DESTROY_CQ, cqn=cq.cqn) == Status.EBUSY
        assert g.status_of(Cmd.DEALLOC_PD, pdn=pd) == Status.EBUSY
        g.write(dst.gpa, bytes([0x77]) * 4096)
        assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.OK
        cs, _ = _acc(g, cq, 3)
        assert [(c.wr_id, c.status) for c in cs] == [(i, AccelStatus.FLUSHED) for i in range(3)]
        assert aq.aqn not in g.core.aqs
        assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.ENOENT
        acc.resume()
        acc.drain(10)
        router.deliver()
        assert g.read(dst.gpa, 4096) == bytes([0x77]) * 4096  # never ran
        assert router.in_flight == 0
        assert g.status_of(Cmd.DESTROY_CQ, cqn=cq.cqn) == Status.OK
        # an AQ doorbell for the destroyed queue is counted
        bad = g.core.metrics.bad_doorbells
        g.ring_aq(aq)
        assert g.core.metrics.bad_doorbells == bad + 1
    finally:
        router.close()


def test_cancel_aq_job():
    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        src, dst = _mr(g, pd, 512), _mr(g, pd, 4096)
        acc.pause()
        for wr in (1, 2, 2, 3):
            g.write_aq_job(aq, wr, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr, 512, dst.lkey)])
        g.ring_aq(aq)
        assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=2) == Status.OK
        assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=99) == Status.ENOENT
        assert g.poll(cq) == []  # job 1 is still ahead
        acc.resume()
        _wait(router, [g])
        cs, _ = _acc(g, cq, 4)
        assert [(c.wr_id, c.status) for c in cs] == [(1, AccelStatus.SUCCESS), (2, AccelStatus.CANCELLED),
                                                    (2, AccelStatus.SUCCESS), (3, AccelStatus.SUCCESS)]
        assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=3) == Status.ENOENT
    finally:
        router.close()


def test_close_with_jobs_queued_writes_nothing():
    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        src, dst = _mr(g, pd, 512), _mr(g, pd, 4096)
        acc.pause()
        g.post_aq_job(aq, 1, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                      outputs=[(dst.addr, 512, dst.lkey)])
        g.core.close()
        acc.resume()
        acc.drain(10)
        router.deliver()
        assert g.read(dst.gpa, 512) == bytes(512) and g.poll(cq) == []
        assert router.in_flight == 0
    finally:
        router.close()


def test_query_create_errors_and_no_accelerator():
    g = Guest(LocalFabric())  # no router: the commands are not offered
    assert g.status_of(Cmd.QUERY_ACCEL) == Status.EOPNOTSUPP
    none = AccelRouter(None)
    g, pd, cq = _guest(none)
    q = g.cmd(Cmd.QUERY_ACCEL)
    assert q["num_ops"] == 4 and all(o["local_units"] == 0 for o in q["ops"][:4])
    aq = g.create_aq(pd, cq, AccelOp.TURBO_ENCODE)
    src, dst = _mr(g, pd, 40), _mr(g, pd, 3 * 44)
    g.post_aq_job(aq, 5, AccelOp.TURBO_ENCODE, size=40, inputs=[(src.addr, 40, src.lkey)],
                  outputs=[(dst.addr, 3 * 44, dst.lkey)])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.NO_ACCELERATOR
    base = dict(pdn=pd, cqn=cq.cqn, op=1, priority=0, flags=0, reserved0=0, depth=8, ring_gpa=g.alloc(2048),
                dbrec_gpa=g.alloc(8), target_host=0, reserved1=0)
    for bad, st in ((dict(pdn=99), Status.ENOENT), (dict(cqn=99), Status.ENOENT),
                    (dict(op=9), Status.EINVAL), (dict(op=0), Status.EINVAL),
                    (dict(depth=6), Status.EINVAL), (dict(depth=0), Status.EINVAL),
                    (dict(priority=8), Status.EINVAL), (dict(flags=4), Status.EINVAL),
                    (dict(flags=1, target_host=3), Status.EINVAL), (dict(ring_gpa=0x10), Status.EFAULT)):
        assert g.status_of(Cmd.CREATE_AQ, **{**base, **bad}) == st, bad


def test_query_accel_reports_units(router):
    g, *_ = _guest(router)
    q = g.cmd(Cmd.QUERY_ACCEL)
    ops = {o["op"]: o for o in q["ops"][:q["num_ops"]]}
    assert ops[AccelOp.FFT]["local_units"] == 1 and ops[AccelOp.TURBO_DECODE]["local_units"] == 2
    assert ops[AccelOp.TURBO_ENCODE]["min_size"] == 40 and ops[AccelOp.TURBO_ENCODE]["max_size"] == 6144
    assert ops[AccelOp.FFT]["max_size"] == 65536 and ops[AccelOp.FFT]["est_unit_ps"] > 0


def test_snapshot_counters(router):
    g, pd, cq = _guest(router)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    g.ring_aq(aq, 100)
    assert accel.snapshot(g.core)[aq.aqn]["bad_doorbells"] == 1
    assert "accelerators" in router.metrics()["service"]


def test_device_offers_accel_with_a_router(router):
    from virtio_rdma.constants import Feature
    from virtio_rdma.device import RdmaDevice

    fabric = LocalFabric()
    assert RdmaDevice(fabric, accel=router).features() & (1 << Feature.ACCEL)
    assert RdmaDevice(fabric, accel=AccelRouter(None)).features() & (1 << Feature.ACCEL)
    assert not RdmaDevice(fabric).features() & (1 << Feature.ACCEL)


def _completed(acc) -> int:
    return sum(c.completed for c in acc.metrics.ops.values())


def _wait_running(acc, done_before: int, timeout=20.0):
    """Until the accelerator runs a job or has finished one more than ``done_before``
    (a fast kernel may finish between two looks; its completion waits for the
    router's deliver())."""
    deadline = time.monotonic() + timeout
    while not (acc.running_count() or _completed(acc) > done_before):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.001)


def test_destroy_aq_with_a_running_job_completes_it_first():
    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        n, B = 65536, 8
        big, dst = _mr(g, pd, n * B * 8), _mr(g, pd, n * B * 8)
        done = _completed(acc)
        g.post_aq_job(aq, 1, AccelOp.FFT, size=n, batch=B, inputs=[(big.addr, n * B * 8, big.lkey)],
                      outputs=[(dst.addr, n * B * 8, dst.lkey)])
        _wait_running(acc, done)   # job 1 runs (or has run; it is not delivered before deliver())
        acc.pause()
        for i in (2, 3):
            g.post_aq_job(aq, i, AccelOp.FFT, size=64, inputs=[(big.addr, 512, big.lkey)],
                          outputs=[(dst.addr, 512, dst.lkey)])
        assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.OK
        assert g.poll(cq) == []           # 2 and 3 are flushed, but wait behind 1
        assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.ENOENT
        bad = g.core.metrics.bad_doorbells
        g.ring_aq(aq)                     # a draining queue takes no jobs
        assert g.core.metrics.bad_doorbells == bad + 1
        _wait(router, [g])
        cs, _ = _acc(g, cq, 3)
        assert [(c.wr_id, c.status) for c in cs] == [(1, AccelStatus.SUCCESS), (2, AccelStatus.FLUSHED),
                                                    (3, AccelStatus.FLUSHED)]
        assert aq.aqn not in g.core.aqs and g.status_of(Cmd.DESTROY_CQ, cqn=cq.cqn) == Status.OK
        assert router.in_flight == 0
    finally:
        router.close()


def test_output_mr_deregistered_while_queued():
    """The job was checked when fetched: it still writes its own output
    buffer (guest memory, views kept), nothing else; a new job with the
    stale key fails LOCAL_PROT."""
    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        x = np.arange(64, dtype=C64)
        src = _mr(g, pd, x.tobytes())
        dst = _mr(g, pd, 512 + 64)
        g.write(dst.gpa, bytes([0xEE]) * (512 + 64))
        acc.pause()
        g.post_aq_job(aq, 1, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                      outputs=[(dst.addr + 32, 512, dst.lkey)])
        g.cmd(Cmd.DEREG_MR, lkey=dst.lkey)
        acc.resume()
        g.post_aq_job(aq, 2, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                      outputs=[(dst.addr + 32, 512, dst.lkey)])
        _wait(router, [g])
        cs, _ = _acc(g, cq, 2)
        assert [c.status for c in cs] == [AccelStatus.SUCCESS, AccelStatus.LOCAL_PROT]
        whole = g.read(dst.gpa, 512 + 64)
        assert whole[:32] == whole[-32:] == bytes([0xEE]) * 32
        np.testing.assert_allclose(np.frombuffer(whole[32:-32], C64), accel_core.fft(x), atol=1e-3)
    finally:
        router.close()


def test_aq_slots_are_charged_as_wqes(router):
    from vhost_user.tenancy import Resource, TenantLedger, TenantPolicy

    ledger = TenantLedger(TenantPolicy(max_wqes=40))
    account = ledger.account(None)
    g = Guest(LocalFabric(), accel=router, account=account)
    pd, cq = g.alloc_pd(), g.create_cq(64)
    aq = g.create_aq(pd, cq, AccelOp.FFT, depth=32)
    assert account.used[Resource.WQES] == 32
    ring, db = g.alloc(16 * 256), g.alloc(8, 8)
    req = dict(pdn=pd, cqn=cq.cqn, op=1, priority=0, flags=0, reserved0=0, depth=16, ring_gpa=ring,
               dbrec_gpa=db, target_host=0, reserved1=0)
    assert g.status_of(Cmd.CREATE_AQ, **req) == Status.ENOMEM   # 32 + 16 > max_wqes 40
    assert len(g.core.aqs) == 1
    assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.OK
    assert account.used[Resource.WQES] == 0
    assert g.status_of(Cmd.CREATE_AQ, **req) == Status.OK
    g.core.close()
    assert account.used.get(Resource.WQES, 0) == 0


def test_backend_accelerators_option():
    from vrdma.commands.backend import make_accel_router, parse_accelerators

    assert parse_accelerators("fft=1,turbo=2") == [("fft", ("fft", "ifft"), 1),
                                                   ("turbo", ("turbo_encode", "turbo_decode"), 2)]
    assert parse_accelerators("none") == [] and parse_accelerators("turbo") == [
        ("turbo", ("turbo_encode", "turbo_decode"), 1)]
    from vrdma.commands.backend import auto_accelerators

    assert auto_accelerators(2) == "fft=1,turbo=1" and auto_accelerators(64) == "fft=8,turbo=8"
    assert parse_accelerators("auto") == parse_accelerators(auto_accelerators())
    for bad in ("gpu=1", "fft=x", "fft=0", "fft=1,fft=2", "fft=65"):
        with pytest.raises(SystemExit, match="--accelerators"):
            parse_accelerators(bad)
    r = make_accel_router(type("Args", (), {"accelerators": "none"})())
    assert r.local is None
    r = make_accel_router(type("Args", (), {"accelerators": "fft=2"})())
    try:
        assert r.local is not None and r.local.units(AccelOp.IFFT) == 2
        assert r.local.units(AccelOp.TURBO_DECODE) == 0
        assert [a.slowdown for a in r.local.accelerators()] == [1.0]  # default: full speed
    finally:
        r.close()


def test_backend_accel_slowdown_option():
    """``--accel-slowdown FACTOR`` reaches every accelerator the backend makes; bad factors exit."""
    import argparse

    from vrdma.commands.backend import add_arguments, make_accel_router, parse_slowdown

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--socket", "x", "--accelerators", "fft=1,turbo=2", "--accel-slowdown", "4.5"])
    r = make_accel_router(args)
    try:
        assert r.local is not None
        assert {a.name: (a.slowdown, a.workers) for a in r.local.accelerators()} == {
            "fft": (4.5, 1), "turbo": (4.5, 2)}
    finally:
        r.close()
    assert make_accel_router(p.parse_args(["--socket", "x", "--accel-slowdown", "1"])).local is not None
    assert parse_slowdown("1") == 1.0 and parse_slowdown(" 2.5 ") == 2.5 and parse_slowdown("1000") == 1000.0
    for bad in ("0.5", "0", "-2", "x", "", "nan", "inf", "1e9"):
        with pytest.raises(SystemExit, match="--accel-slowdown"):
            parse_slowdown(bad)
    with pytest.raises(SystemExit, match="--accel-slowdown"):  # checked before any accelerator starts
        make_accel_router(type("Args", (), {"accelerators": "fft=1", "accel_slowdown": "0.9"})())


def test_random_jobs_never_hurt_the_daemon_or_memory_outside_outputs(router):
    """Hostile slots: random headers (reserved bytes zero, so many pass the
    syntax check) and SGEs mixing the guest's keys, wrong keys and wild
    addresses. Every job gets exactly one CQE, no internal error, and only
    the one writable MR changes."""
    g, pd, cq = _guest(router)
    rng = np.random.default_rng(99)
    src = _mr(g, pd, bytes(rng.integers(0, 2, 65536, dtype=np.uint8)), access=0)
    dst = _mr(g, pd, 65536)
    keys = [src.lkey, dst.lkey, 0, 12345]
    aq = g.create_aq(pd, cq, AccelOp.TURBO_ENCODE, depth=64)
    snapshot = bytes(g.buf)
    total = 0
    for _round in range(4):
        for i in range(64):
            op = int(rng.choice([3, 3, 3, 1, 4]))
            size = int(rng.choice([40, 48, 1024, 41, 0, 6144]))
            sges = []
            for _ in range(int(rng.integers(1, 4))):
                k = keys[int(rng.integers(0, 4))]
                base = src.addr if k == src.lkey else dst.addr
                sges.append((base + int(rng.integers(-64, 65536)), int(rng.integers(0, 20000)), k))
            cut = int(rng.integers(1, len(sges) + 1)) if len(sges) > 1 else 1
            if i % 3 == 0:  # a valid job at a random place, so that some run
                b = int(rng.integers(1, 4))
                sges = [(src.addr + int(rng.integers(0, 60000)), b * 40, src.lkey),
                        (dst.addr + int(rng.integers(0, 60000)), b * 132, dst.lkey)]
                op, size, cut = 3, 40, 1
            try:
                batch = b if i % 3 == 0 else int(rng.integers(0, 4))
                raw = wire.encode_accel_job(i, op, size=size, batch=batch, dtype=0, inputs=sges[:cut],
                                            outputs=sges[cut:] or sges[:1])
            except wire.WireError:
                raw = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
            g.write_aq_job(aq, i, op, raw=raw)
        g.ring_aq(aq)
        _wait(router, [g])
        total += len(g.poll(cq))
    assert total == 256 and g.core.metrics.internal_errors == 0 and g.core.metrics.aq_completions == 256
    m = g.core.aqs[aq.aqn].metrics
    assert m.jobs_completed - sum(m.errors.values()) >= 40  # valid ones ran
    after = bytes(g.buf)
    lo, hi = dst.gpa - g.base, dst.gpa - g.base + 65536
    ring_lo, ring_hi = cq.ring - g.base, cq.ring - g.base + 256 * wire.CQE_SIZE
    changed = [i for i in np.flatnonzero(np.frombuffer(after, np.uint8) != np.frombuffer(snapshot, np.uint8))
               if not (lo <= i < hi or ring_lo <= i < ring_hi or aq.ring - g.base <= i < aq.ring - g.base
                       + 64 * 256 or aq.dbrec - g.base <= i < aq.dbrec - g.base + 8
                       or cq.dbrec - g.base <= i < cq.dbrec - g.base + 8)]
    assert changed == []


def test_temporaries_are_bounded_per_device(router, monkeypatch):
    """Jobs whose buffers need daemon temporaries (here: misaligned outputs) stop being fetched
    while the device's temporaries are at accel.MAX_TEMP_BYTES, stay in the ring, and run as
    earlier jobs release theirs: every job completes, in order, and the bound holds throughout."""
    monkeypatch.setattr(accel, "MAX_TEMP_BYTES", 3 * 4096)
    g, pd, cq = _guest(router)
    n = 256
    x = (np.arange(n) * (0.5 - 1j)).astype(C64)
    src = _mr(g, pd, x.tobytes())
    out = _mr(g, pd, 16 * 4096)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    jobs = 10
    for i in range(jobs):  # each output misaligned by one byte: a 2 KiB temporary per job
        g.write_aq_job(aq, i, AccelOp.FFT, size=n, inputs=[(src.addr, x.nbytes, src.lkey)],
                       outputs=[(out.addr + 1 + i * 4096, x.nbytes, out.lkey)])
    g.ring_aq(aq)
    core = g.core
    peak = core.accel_temp_bytes
    assert core.accel_stalled and core.aqs[aq.aqn].metrics.temp_stalls >= 1
    deadline = time.monotonic() + 20
    while core.aqs[aq.aqn].entries or core.accel_stalled:
        assert time.monotonic() < deadline, "stalled jobs did not resume"
        router.wait(0.05)
        router.deliver()
        peak = max(peak, core.accel_temp_bytes)
    assert peak < accel.MAX_TEMP_BYTES + x.nbytes  # the bound plus one job's temporary
    assert core.accel_temp_bytes == 0
    accs, _ = _acc(g, cq, jobs)
    assert [c.wr_id for c in accs] == list(range(jobs))
    assert all(c.status is AccelStatus.SUCCESS for c in accs)
    want = accel_core.fft(x).tobytes()
    for i in range(jobs):
        assert g.read(out.gpa + 1 + i * 4096, x.nbytes) == want


# --------------------------------------------------------------------------- native job path
def _mixed_jobs(router, g, pd, cq, seed):
    """Post a seeded mix of FFT / IFFT jobs on two queues (small ones the native path
    takes, and every kind it must leave to the Python path); returns the AQs. No job
    touches another's buffers (their order against each other is not defined)."""
    other_pd = g.alloc_pd()
    rng = np.random.default_rng(seed)
    src = _mr(g, pd, (rng.standard_normal(32768) * 3).astype(np.float32).tobytes())
    stride = 69632  # each job's output has its own range: no job reads or writes another's
    dst = _mr(g, pd, bytes([0x3C]) * (48 * stride))
    ro = _mr(g, pd, 8192, access=0)
    foreign = _mr(g, other_pd, 8192)
    aqs = [g.create_aq(pd, cq, AccelOp.FFT, depth=64), g.create_aq(pd, cq, AccelOp.IFFT, depth=64)]
    for i in range(48):
        aq = aqs[i % 2]
        op = AccelOp.FFT if aq is aqs[0] else AccelOp.IFFT
        n = int(rng.choice([16, 64, 60, 256, 2048, 7]))
        batch = int(rng.choice([1, 1, 2, 16]))
        dt = int(rng.integers(0, 2))
        if n * batch * 16 > 65536:
            batch = 1
        nb = n * batch * (8 if dt == 0 else 16)
        ins = [(src.addr + int(rng.choice([0, 0, 8, 16, 4])), nb, src.lkey)]
        outs = [(dst.addr + stride * i + int(rng.choice([0, 0, 16, 2])), nb, dst.lkey)]
        kw: dict = {}
        case = int(rng.integers(0, 16))  # 0 and 9..15: plain
        if case == 1:
            ins = [(ins[0][0], nb, src.lkey ^ 1)]                       # bad key
        elif case == 2:
            outs = [(ro.addr, nb, ro.lkey)]                             # output without LOCAL_WRITE
        elif case == 3:
            ins = [(foreign.addr, nb, foreign.lkey)]                    # another PD
        elif case == 4:
            outs = [(outs[0][0], nb - 8, dst.lkey)]                     # too short
        elif case == 5 and nb >= 32:
            ins = [(src.addr, nb // 2, src.lkey), (src.addr + nb // 2, nb - nb // 2, src.lkey)]  # two SGEs
        elif case == 6:
            ins = [(dst.addr + stride * i + 8, nb, dst.lkey)]           # overlaps its output
        elif case == 7:
            ins = outs                                                  # in place
        elif case == 8:
            kw["op"] = AccelOp.IFFT if op is AccelOp.FFT else AccelOp.FFT  # other op than the queue's
        try:
            g.write_aq_job(aq, 1000 + i, kw.pop("op", op), size=n, batch=batch, dtype=dt, inputs=ins,
                           outputs=outs)
        except wire.WireError:
            g.write_aq_job(aq, 1000 + i, op, raw=bytes(256))
        if i % 6 == 5:  # rung in groups; a group completes before the next is rung
            g.ring_aq(aqs[0])
            g.ring_aq(aqs[1])
            _wait(router, [g])
    for aq in aqs:
        g.ring_aq(aq)
    return aqs


def _strip_times(c: wire.Completion) -> tuple:
    """A CQE without the times it carries (wait, service: measured, not deterministic)."""
    return (c.wr_id, c.status, c.opcode, c.qp_num, c.byte_len, c.imm_data, c.wc_flags,
            c.vendor_err >> 24)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_path_equals_python_path(seed):
    """The same seeded job mix through a router with the native path and one
    without (inline_max_seconds=0: every job takes start() and a worker): the
    same CQEs in the same order per queue (times aside), the same guest memory byte for
    byte, the same counters; and the native path really ran and really declined."""
    results = []
    for inline in (accel.INLINE_MAX_SECONDS, 0.0):
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT,
                                                                       accel_core.Op.IFFT}))])
        native = accel.NATIVE_MAX_SECONDS if inline else 0.0
        router = AccelRouter(svc, inline_max_seconds=inline, native_max_seconds=native)
        try:
            assert (router.native is not None) == bool(inline)
            with seeded_ids(seed):  # the same MR keys in both runs (they are in the job entries)
                g, pd, cq = _guest(router)
                _mixed_jobs(router, g, pd, cq, seed)
            _wait(router, [g])
            cqes = g.poll(cq)
            ring_lo, ring_hi = cq.ring - g.base, cq.ring - g.base + 256 * wire.CQE_SIZE
            mem = bytes(g.buf[:ring_lo]) + bytes(g.buf[ring_hi:])
            m = g.core.metrics
            counters = (m.aq_jobs, m.aq_completions, m.aq_errors, m.completions, m.local_prot_errors,
                        m.local_len_errors, m.internal_errors,
                        [(a.metrics.jobs_posted, a.metrics.jobs_completed, a.metrics.errors, a.ci, a.fetched)
                         for a in g.core.aqs.values()])
            native = None
            if router.native is not None:
                why = router.native.declines()  # every decline has a reason
                assert sum(why.values()) == router.native.declined and "none" not in why
                native = (router.native.jobs, router.native.declined)
            svc_ops = svc.metrics()["accelerators"]["fft"]["ops"]
            # in post order per queue (between the two queues sharing the CQ it is not defined)
            per_aq = sorted((_strip_times(c) for c in cqes), key=lambda c: c[3])
            results.append((per_aq, mem, counters, native, svc_ops))
        finally:
            router.close()
    (c1, mem1, k1, native, ops1), (c2, mem2, k2, none, ops2) = results
    assert len(c1) == 48 and c1 == c2
    assert mem1 == mem2
    assert k1 == k2 and k1[6] == 0
    assert none is None and native[0] > 0 and native[1] > 0
    # the service counts the native jobs: submitted, completed and inline
    for op in ("fft", "ifft"):
        assert ops1[op]["completed"] == ops2[op]["completed"]
    assert ops1["fft"]["inline"] + ops1["ifft"]["inline"] >= native[0]
    assert ops2["fft"]["inline"] + ops2["ifft"]["inline"] == 0


def test_native_path_never_overtakes_queued_jobs_nor_uses_a_held_unit():
    """A paused accelerator (or one with a job queued) has no unit for the native
    path: small jobs then queue like any other and complete in post order after
    the earlier ones; once the queue is empty the native path takes them again."""
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
    router = AccelRouter(svc)
    acc = svc.accelerator("fft")
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        x = (np.arange(64) * (1 - 0.5j)).astype(C64)
        src, dst = _mr(g, pd, x.tobytes()), _mr(g, pd, 8 * 512)
        acc.pause()
        for i in range(3):
            g.write_aq_job(aq, i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr + 512 * i, 512, dst.lkey)])
        g.ring_aq(aq)
        assert router.native.jobs == 0 and acc.queue_depth() == 3 and not g.poll(cq)
        acc.resume()
        _wait(router, [g])
        cs, _ = _acc(g, cq, 3)
        assert [(c.wr_id, c.status) for c in cs] == [(i, AccelStatus.SUCCESS) for i in range(3)]
        # idle again: the next ones complete in the doorbell itself, no deliver() needed
        for i in range(3, 6):
            g.write_aq_job(aq, i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr + 512 * i, 512, dst.lkey)])
        g.ring_aq(aq)
        cs, _ = _acc(g, cq, 3)
        assert [(c.wr_id, c.status, c.host, c.wait_us) for c in cs] == [
            (i, AccelStatus.SUCCESS, 0, 0) for i in range(3, 6)]
        assert router.native.jobs == 3 and router.native.calls == 1
        want = accel_core.fft(x).tobytes()
        for i in range(6):
            assert g.read(dst.gpa + 512 * i, 512) == want
        ops = svc.metrics()["accelerators"]["fft"]["ops"]["fft"]
        assert ops["completed"] == 6 and ops["inline"] == 3 and acc.running_count() == 0
    finally:
        router.close()


def test_native_path_leaves_armed_cqs_and_flagged_queues_to_python(router):
    """An armed CQ (a completion event is due) and an AQ with flags take the
    Python path: the event is raised, the job still succeeds."""
    from virtio_rdma.constants import AqFlags

    g, pd, cq = _guest(router)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    src, dst = _mr(g, pd, 512), _mr(g, pd, 1024)
    g.arm(cq)
    g.post_aq_job(aq, 1, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                  outputs=[(dst.addr, 512, dst.lkey)])
    _wait(router, [g])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.SUCCESS and router.native.jobs == 0
    assert g.core.metrics.completion_events == 1
    fb = g.create_aq(pd, cq, AccelOp.FFT, flags=int(AqFlags.LOCAL_FALLBACK))
    g.post_aq_job(fb, 2, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                  outputs=[(dst.addr + 512, 512, dst.lkey)])
    _wait(router, [g])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.SUCCESS and router.native.jobs == 0
    # unarmed, no flags: native
    g.post_aq_job(aq, 3, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                  outputs=[(dst.addr, 512, dst.lkey)])
    (c,), _ = _acc(g, cq)
    assert c.status is AccelStatus.SUCCESS and router.native.jobs == 1


def test_router_wakes_the_loop_once_per_batch_of_finished_jobs():
    """Worker completions wake the daemon's loop with one deliver() per batch:
    jobs finishing while a deliver is pending ride along (router.wakeups): 64
    jobs finished while the loop was busy cost one wake-up."""
    import asyncio

    async def main():
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
        router = AccelRouter(svc, inline_max_seconds=0.0, native_max_seconds=0.0)  # all through the worker
        try:
            router.attach_loop(asyncio.get_running_loop())
            g, pd, cq = _guest(router)
            aq = g.create_aq(pd, cq, AccelOp.FFT, depth=64)
            src, dst = _mr(g, pd, 8 * 1024), _mr(g, pd, 64 * 8 * 1024)
            for i in range(64):
                g.write_aq_job(aq, i, AccelOp.FFT, size=1024, inputs=[(src.addr, 8192, src.lkey)],
                               outputs=[(dst.addr + 8192 * i, 8192, dst.lkey)])
            g.ring_aq(aq)
            assert svc.accelerator("fft").drain(20)  # the loop is busy (blocked): every job finishes
            deadline = time.monotonic() + 20
            got = []
            while len(got) < 64:
                assert time.monotonic() < deadline, "jobs did not complete"
                await asyncio.sleep(0.01)
                got += g.poll(cq)
            assert [c.wr_id for c in got] == list(range(64))
            assert router.wakeups == 1 and router.metrics()["wakeups"] == 1
        finally:
            router.close()

    asyncio.run(main())


def test_native_jobs_run_in_slices_of_the_loop_and_destroy_flushes_the_rest():
    """On a loop, a queue's native jobs run a slice (NATIVE_SLICE_SECONDS) at a time:
    the rest stay in the ring and the router comes back for them after the loop served
    what else was ready (here: a callback queued behind the first slice), all in post
    order. A queue destroyed between slices gets its unfetched jobs back FLUSHED, in
    order, and is released."""
    import asyncio

    async def main():
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
        router = AccelRouter(svc)
        try:
            loop = asyncio.get_running_loop()
            router.attach_loop(loop)
            g, pd, cq = _guest(router, size=64 << 20)
            n, b, jobs = 2048, 16, 32  # 32 x ~50+ us: more than a few slices
            x = (np.random.default_rng(7).standard_normal((b, n)) * (1 + 1j)).astype(C64)
            src, dst = _mr(g, pd, x.tobytes()), _mr(g, pd, jobs * x.nbytes)
            aq = g.create_aq(pd, cq, AccelOp.FFT, depth=64)
            for i in range(jobs):
                g.write_aq_job(aq, i, AccelOp.FFT, size=n, batch=b, inputs=[(src.addr, x.nbytes, src.lkey)],
                               outputs=[(dst.addr + i * x.nbytes, x.nbytes, dst.lkey)])
            g.ring_aq(aq)
            first = len(g.poll(cq))
            seen = []
            loop.call_soon(lambda: seen.append(len(g.poll(cq))))  # queued behind the next slice
            got = first
            deadline = time.monotonic() + 20
            while got + sum(seen) < jobs:
                assert time.monotonic() < deadline, "native slices did not finish the queue"
                await asyncio.sleep(0)
                got += len(g.poll(cq))
            assert 1 <= first < jobs and seen and seen[0] < jobs - first  # served between slices
            assert router.native.jobs == jobs and router.native_slices >= 2
            want = accel_core.fft(x)
            for i in (0, jobs // 2, jobs - 1):
                np.testing.assert_allclose(np.frombuffer(g.read(dst.gpa + i * x.nbytes, x.nbytes), C64)
                                           .reshape(b, n), want, rtol=1e-4, atol=1e-3)
            # destroyed between two slices: the jobs left in the ring complete FLUSHED
            for i in range(jobs):
                g.write_aq_job(aq, 100 + i, AccelOp.FFT, size=n, batch=b,
                               inputs=[(src.addr, x.nbytes, src.lkey)],
                               outputs=[(dst.addr + i * x.nbytes, x.nbytes, dst.lkey)])
            g.ring_aq(aq)
            assert router.native.yielded
            assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.OK
            cs, _ = _acc(g, cq, jobs)
            k = sum(c.status is AccelStatus.SUCCESS for c in cs)
            assert [c.wr_id for c in cs] == [100 + i for i in range(jobs)]
            assert 1 <= k < jobs and all(c.status is AccelStatus.FLUSHED for c in cs[k:])
            assert aq.aqn not in g.core.aqs and g.core.metrics.internal_errors == 0
            await asyncio.sleep(0)  # the pending slice finds the queue gone
            assert not router._pending
        finally:
            router.close()

    asyncio.run(main())


def test_native_slices_go_round_robin_across_guests_then_by_priority(monkeypatch):
    """Guest A keeps three queues full, guest B one: slices alternate between the
    guests (not the queues), so B's queue is done when A has done as many jobs, and
    within A its priority-7 queue goes before its priority-0 ones. One job a slice
    here (NATIVE_SLICE_SECONDS ~ 0), so the order is exact."""
    import asyncio

    monkeypatch.setattr(accel, "NATIVE_SLICE_SECONDS", 1e-9)

    async def main():
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
        router = AccelRouter(svc)
        try:
            router.attach_loop(asyncio.get_running_loop())
            n, jobs = 256, 12
            a, pa, ca = _guest(router)
            b, pb, cb = _guest(router, gpa=0x4000_0000)

            def queues(g, pd, cq, prios):
                src, dst = _mr(g, pd, n * 8), _mr(g, pd, n * 8)
                out = []
                for p in prios:
                    q = g.create_aq(pd, cq, AccelOp.FFT, depth=16, priority=p)
                    for i in range(jobs):
                        g.write_aq_job(q, p * 100 + i, AccelOp.FFT, size=n, inputs=[(src.addr, n * 8, src.lkey)],
                                       outputs=[(dst.addr, n * 8, dst.lkey)])
                    out.append(q)
                return out

            qa = queues(a, pa, ca, (0, 0, 7))
            (qb,) = queues(b, pb, cb, (0,))
            for q in qa:
                a.ring_aq(q)
            b.ring_aq(qb)
            done_a: list = []
            done_b: list = []
            while len(done_b) < jobs:
                await asyncio.sleep(0)
                done_a += a.poll(ca)
                done_b += b.poll(cb)
            # the three doorbells of A and the one of B ran a job each; then turns alternate
            assert len(done_a) <= jobs + 3 + 1, len(done_a)
            while len(done_a) < 3 * jobs:
                await asyncio.sleep(0)
                done_a += a.poll(ca)
            ids = [c.wr_id for c in done_a]
            # after the first job of each (its doorbell), A's priority-7 queue went first
            hi = [i for i, w in enumerate(ids) if w >= 700]
            assert hi == list(range(2, 2 + jobs)), ids
        finally:
            router.close()

    asyncio.run(main())


def test_commands_take_the_jobs_the_doorbell_record_shows_first():
    """The doorbell and a command travel on different queues: CANCEL_AQ_JOB and
    DESTROY_AQ first take the jobs the queue's doorbell record shows (written before
    any doorbell), so a cancel right after a post finds its job; the late doorbell
    then changes nothing. An absurd record is not taken by a command."""
    import struct

    router, acc = _blocked_router()
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT, depth=8)
        src, dst = _mr(g, pd, 512), _mr(g, pd, 4096)
        acc.pause()
        for i in range(3):
            g.write_aq_job(aq, i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr + 512 * i, 512, dst.lkey)])
        g.write(aq.dbrec, struct.pack("<II", aq.pi, 0))  # the record, no doorbell yet
        assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=2) == Status.OK
        g.ring_aq(aq)  # the doorbell arrives late: nothing new
        daq = g.core.aqs[aq.aqn]
        assert daq.metrics.jobs_posted == 3 and daq.metrics.bad_doorbells == 0
        acc.resume()
        _wait(router, [g])
        cs, _ = _acc(g, cq, 3)
        assert [(c.wr_id, c.status) for c in cs] == [(0, AccelStatus.SUCCESS), (1, AccelStatus.SUCCESS),
                                                    (2, AccelStatus.CANCELLED)]
        # an absurd record (more than depth ahead) is left to the doorbell path
        g.write(aq.dbrec, struct.pack("<II", aq.pi + 100, 0))
        assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=7) == Status.ENOENT
        assert daq.metrics.jobs_posted == 3
        # jobs shown by the record alone, then DESTROY_AQ: each completes FLUSHED, in order
        acc.pause()
        for i in range(4):
            g.write_aq_job(aq, 10 + i, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                           outputs=[(dst.addr, 512, dst.lkey)])
        g.write(aq.dbrec, struct.pack("<II", aq.pi, 0))
        assert g.status_of(Cmd.DESTROY_AQ, aqn=aq.aqn) == Status.OK
        cs, _ = _acc(g, cq, 4)
        assert [(c.wr_id, c.status) for c in cs] == [(10 + i, AccelStatus.FLUSHED) for i in range(4)]
        assert aq.aqn not in g.core.aqs
    finally:
        router.close()


def test_a_kernel_failure_on_the_native_path_hands_the_job_to_the_workers(router, monkeypatch):
    """A planned kernel that raises (its scratch allocation) inside the native path:
    the job is left in the ring and run by the Python path instead, the shape is not
    tried natively again, nothing is lost or doubled."""
    from accel_core import dft

    g, pd, cq = _guest(router)
    aq = g.create_aq(pd, cq, AccelOp.FFT)
    x = (np.arange(120) * (1 + 2j)).astype(C64)
    src, dst = _mr(g, pd, x.tobytes()), _mr(g, pd, 4 * x.nbytes)

    real = dft._core
    calls = []

    class FailingOnce:  # the first execute (the native path's) fails; the Python path's works
        def __init__(self, n, d, inv):
            self.plan = real(n, d, inv)

        def execute(self, a, b):
            calls.append(1)
            if len(calls) == 1:
                raise MemoryError("fft scratch")
            return self.plan.execute(a, b)

    monkeypatch.setattr(dft, "_core", lambda n, d, inv: FailingOnce(n, d, inv) if n == 120 else real(n, d, inv))
    g.post_aq_job(aq, 1, AccelOp.FFT, size=120, inputs=[(src.addr, x.nbytes, src.lkey)],
                  outputs=[(dst.addr, x.nbytes, dst.lkey)])
    _wait(router, [g])
    g.post_aq_job(aq, 2, AccelOp.FFT, size=120, inputs=[(src.addr, x.nbytes, src.lkey)],
                  outputs=[(dst.addr + x.nbytes, x.nbytes, dst.lkey)])
    _wait(router, [g])
    cs, _ = _acc(g, cq, 2)
    assert [(c.wr_id, c.status) for c in cs] == [(1, AccelStatus.SUCCESS), (2, AccelStatus.SUCCESS)]
    want = accel_core.fft(x).tobytes()
    assert g.read(dst.gpa, x.nbytes) == want and g.read(dst.gpa + x.nbytes, x.nbytes) == want
    assert router.native.jobs == 0 and router.native.declines() == {"shape": 2}
    assert g.core.metrics.internal_errors == 0


def test_a_job_waiting_for_a_native_slice_can_be_cancelled():
    """Jobs left in the ring by a native slice have not started: CANCEL_AQ_JOB finds
    one (the queue's waiting jobs then take the Python path), it completes CANCELLED
    in its place, every other job SUCCESS, in post order; no slice runs afterwards."""
    import asyncio

    async def main():
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
        router = AccelRouter(svc)
        try:
            router.attach_loop(asyncio.get_running_loop())
            g, pd, cq = _guest(router, size=64 << 20)
            n, b, jobs = 2048, 16, 32
            x = (np.random.default_rng(8).standard_normal((b, n)) * (1 - 1j)).astype(C64)
            src, dst = _mr(g, pd, x.tobytes()), _mr(g, pd, jobs * x.nbytes)
            aq = g.create_aq(pd, cq, AccelOp.FFT, depth=64)
            for i in range(jobs):
                g.write_aq_job(aq, i, AccelOp.FFT, size=n, batch=b, inputs=[(src.addr, x.nbytes, src.lkey)],
                               outputs=[(dst.addr + i * x.nbytes, x.nbytes, dst.lkey)])
            g.ring_aq(aq)
            assert router.native.yielded and router.resuming(g.core, g.core.aqs[aq.aqn])
            ran = router.native.jobs
            assert g.status_of(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=jobs - 1) == Status.OK
            assert not router.resuming(g.core, g.core.aqs[aq.aqn])
            got: list = []
            deadline = time.monotonic() + 20
            while len(got) < jobs:
                assert time.monotonic() < deadline, "jobs did not complete"
                await asyncio.sleep(0.001)
                router.deliver()
                got += g.poll(cq)
            cs = [wire.decode_accel_cqe(c) for c in got]
            assert [c.wr_id for c in cs] == list(range(jobs))
            assert [c.status for c in cs] == [AccelStatus.SUCCESS] * (jobs - 1) + [AccelStatus.CANCELLED]
            assert router.native.jobs == ran  # the rest went to the worker
            want = accel_core.fft(x)
            np.testing.assert_allclose(np.frombuffer(g.read(dst.gpa + (jobs - 2) * x.nbytes, x.nbytes), C64)
                                       .reshape(b, n), want, rtol=1e-4, atol=1e-3)
        finally:
            router.close()

    asyncio.run(main())


def test_native_spin_takes_the_next_job_from_the_doorbell_record():
    """A native call that emptied its queue watches the doorbell record (``spin``):
    a job the driver posts then (slot and record written, no doorbell: the device
    is in the call) runs in the same call, counted as applied from the record; an
    absurd record value ends the spin untouched and is the Python path's to count
    (once); the results equal accel_core's."""
    import struct
    import threading

    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
    router = AccelRouter(svc)
    try:
        g, pd, cq = _guest(router)
        g.core.poll_doorbell_records = True  # the driver acked DBREC_POLL
        aq = g.create_aq(pd, cq, AccelOp.FFT, depth=8)
        dev = g.core.aqs[aq.aqn]
        xs = [(np.arange(256) * (1 + 0.25j * k)).astype(C64) for k in range(2)]
        src, dst = _mr(g, pd, b"".join(x.tobytes() for x in xs)), _mr(g, pd, 2 * 2048)

        def job(i):
            g.write_aq_job(aq, 10 + i, AccelOp.FFT, size=256, inputs=[(src.addr + 2048 * i, 2048, src.lkey)],
                           outputs=[(dst.addr + 2048 * i, 2048, dst.lkey)])

        def cqe_written(i):  # the owner byte of CQE i (first pass: 1)
            return g.buf[cq.ring - g.base + i * wire.CQE_SIZE + wire.CQE_OWNER_OFFSET] == 1

        def driver():  # the guest, while the device is in run(): one job, then an absurd record
            deadline = time.monotonic() + 20
            while not cqe_written(0) and time.monotonic() < deadline:
                time.sleep(1e-4)
            job(1)
            g.write(aq.dbrec, struct.pack("<II", 2, 0))
            while not cqe_written(1) and time.monotonic() < deadline:
                time.sleep(1e-4)
            g.write(aq.dbrec, struct.pack("<II", 2 + 100, 0))  # more than depth ahead

        job(0)
        g.write(aq.dbrec, struct.pack("<II", 1, 0))
        dev.pi = 1  # as the kind 4 doorbell would have set it
        t = threading.Thread(target=driver)
        t.start()
        done = router.native.run(g.core, dev, 0.0, 10.0)
        t.join()
        assert done == 2 and router.native.spun == 1 and router.native.spins == 2  # the second ended absurd
        assert dev.pi == 2 and dev.fetched == 2 and dev.ci == 2 and dev.metrics.dbrec_applied == 1
        infos, _ = _acc(g, cq, 2)
        assert [i.wr_id for i in infos] == [10, 11] and all(i.status is AccelStatus.SUCCESS for i in infos)
        for i, x in enumerate(xs):
            y = np.frombuffer(g.read(dst.addr + 2048 * i, 2048), C64)
            np.testing.assert_allclose(y, accel_core.fft(x), rtol=1e-4, atol=1e-3)
        assert g.core.metrics.bad_doorbells == 0
        accel.poll_records(g.core, 0.0)  # the absurd value: counted once, nothing fetched
        accel.poll_records(g.core, 0.0)
        assert g.core.metrics.bad_doorbells == 1 and dev.pi == 2 and dev.fetched == 2
        assert router.metrics()["native"]["spun"] == 1
        # a queue with a burst posted (a guest keeping jobs queued) is not spun on
        for i in range(2):
            job(i)
        g.write(aq.dbrec, struct.pack("<II", 4, 0))
        dev.pi = 4
        assert router.native.run(g.core, dev, 0.0, 10.0) == 2 and router.native.spins == 2
        assert len(_acc(g, cq, 2)[0]) == 2
    finally:
        router.close()


def test_native_spin_only_on_a_loop_for_a_polling_driver():
    """The spin is asked for only where a driver acked DBREC_POLL and the router
    serves a loop (an in-process user driving the router by hand never waits)."""
    import asyncio

    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
    router = AccelRouter(svc)
    loop = asyncio.new_event_loop()
    try:
        g, _, _ = _guest(router)
        assert router.native_spin(g.core) == 0.0
        g.core.poll_doorbell_records = True
        assert router.native_spin(g.core) == 0.0
        router.attach_loop(loop)
        assert router.native_spin(g.core) == accel.NATIVE_SPIN_SECONDS > 0
        g.core.poll_doorbell_records = False
        assert router.native_spin(g.core) == 0.0
    finally:
        router.close()
        loop.close()


def test_attach_loop_lowers_the_switch_interval_for_local_accelerators():
    """A router with local accelerators, given its loop, brings the process's switch
    interval down to SWITCH_INTERVAL_SECONDS (never up); one without leaves it."""
    import asyncio
    import sys

    before = sys.getswitchinterval()
    loop = asyncio.new_event_loop()
    try:
        sys.setswitchinterval(0.005)
        bare = AccelRouter(None)
        bare.attach_loop(loop)
        assert sys.getswitchinterval() == pytest.approx(0.005)
        svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
        router = AccelRouter(svc)
        try:
            router.attach_loop(loop)
            assert sys.getswitchinterval() == pytest.approx(accel.SWITCH_INTERVAL_SECONDS)
            sys.setswitchinterval(1e-5)  # already lower: kept
            router.attach_loop(asyncio.new_event_loop())
            assert sys.getswitchinterval() == pytest.approx(1e-5)
        finally:
            router.close()
    finally:
        sys.setswitchinterval(before)
        loop.close()


def test_native_path_keeps_no_stale_mr_or_buffer():
    """The native path remembers what the checks need of an MR and the arrays over a
    guest's buffers between calls; a deregistered MR's key is refused at once
    (LOCAL_PROT, through the Python path), and a job on the same buffers under a
    new MR runs natively with its result in place."""
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT}))])
    router = AccelRouter(svc)
    try:
        g, pd, cq = _guest(router)
        aq = g.create_aq(pd, cq, AccelOp.FFT)
        x = (np.arange(64) * (1 - 0.5j)).astype(C64)
        src = _mr(g, pd, x.tobytes())
        dst = _mr(g, pd, 512)

        def post(wr_id, out_key):
            g.post_aq_job(aq, wr_id, AccelOp.FFT, size=64, inputs=[(src.addr, 512, src.lkey)],
                          outputs=[(dst.addr, 512, out_key)])
            return _acc(g, cq)[0][0]

        assert post(1, dst.lkey).status is AccelStatus.SUCCESS and router.native.jobs == 1
        g.write(dst.gpa, bytes(512))
        g.cmd(Cmd.DEREG_MR, lkey=dst.lkey)
        assert post(2, dst.lkey).status is AccelStatus.LOCAL_PROT and router.native.jobs == 1
        assert g.read(dst.gpa, 512) == bytes(512)  # nothing written under the dead key
        r = g.cmd(Cmd.REG_MR, pdn=pd, access=int(Access.LOCAL_WRITE), iova=dst.gpa, length=512, reserved=0,
                  chunks=[dict(gpa=dst.gpa, length=512)])
        assert post(3, r["lkey"]).status is AccelStatus.SUCCESS and router.native.jobs == 2
        np.testing.assert_allclose(np.frombuffer(g.read(dst.gpa, 512), C64), accel_core.fft(x),
                                   rtol=1e-4, atol=1e-3)
    finally:
        router.close()
