"""guest_lib's accelerator API (docs/accel-api.md): the verbs-shaped AQ, accel_core's call
shapes and the file-like device, through the real daemon.

Three tiers: (1) what the guest library does on its own (job entries against the wire
codec, accelerator CQEs polled from a real CQ's ring, typed errors raised before anything
is submitted, the staging allocator); (2) a device without accelerator queues (EOPNOTSUPP,
nothing leaks); (3) end to end against a daemon whose devices offer VIRTIO_RDMA_F_ACCEL,
every result compared with accel_core called directly. Tier 3 skips, saying why, while the
device side is not there.
"""
from __future__ import annotations

import asyncio
import errno
import time

import numpy as np
import pytest

import accel_core
from accel_core import errors as aerr
from guest_lib import CQ, MR, PD, SGE, Context, RDMAError, UserError, accel
from guest_lib.aq import AQ, AccelWR, encode_wr
from guest_lib.cq import WC, AccelWC
from verbs import Access, WcStatus
from vhost_user.testing import DaemonProcess
from virtio_rdma import wire
from virtio_rdma.constants import AQ_SLOT_SIZE, MAX_ACCEL_SGE, AccelDtype, AccelEarlyStop, AccelOp, AccelStatus

MEM = 32 << 20


@pytest.fixture
def ctx(rdma_backend):
    with Context(rdma_backend.path, mem_size=MEM) as c:
        yield c


@pytest.fixture
def accel_daemon_proc():
    """``vrdma backend --accelerators fft=1,turbo=1`` as a real process."""
    with DaemonProcess("--accelerators", "fft=1,turbo=1") as d:
        yield d.proc, d.path


@pytest.fixture
def accel_daemon(accel_daemon_proc):
    """The socket path of a daemon whose devices offer VIRTIO_RDMA_F_ACCEL."""
    return accel_daemon_proc[1]


@pytest.fixture
def actx(accel_daemon):
    """A Context on a daemon whose devices offer VIRTIO_RDMA_F_ACCEL."""
    with Context(accel_daemon, mem_size=MEM, timeout=20.0) as c:
        assert c.has_accel, "vrdma backend --accelerators does not offer VIRTIO_RDMA_F_ACCEL"
        yield c


rng = np.random.default_rng(14)


def _cplx(shape, dtype):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def _llr(K, B=None, snr_db=1.0):
    bits = rng.integers(0, 2, (K,) if B is None else (B, K), dtype=np.uint8)
    enc = accel_core.turbo_encode(bits)
    sigma = 10 ** (-snr_db / 20)
    y = (1.0 - 2.0 * enc) + sigma * rng.standard_normal(enc.shape)
    return bits, (2 * y / sigma**2).astype(np.float32)


# --- tier 1: the library on its own ---------------------------------------------------------
def test_job_entry_is_the_wire_codecs():
    wr = AccelWR(0x1234, size=2048, batch=3, dtype=AccelDtype.COMPLEX128,
                 inputs=[SGE(0x1000, 49152, 7)], outputs=[SGE(0x20000, 49152, 8), SGE(0x40000, 64, 8)])
    slot = encode_wr(wr, AccelOp.FFT)
    assert len(slot) == AQ_SLOT_SIZE
    job = wire.decode_accel_job(slot)
    assert (job.wr_id, job.op, job.dtype, job.size, job.batch) == (0x1234, AccelOp.FFT, AccelDtype.COMPLEX128,
                                                                    2048, 3)
    assert [(s.addr, s.length, s.lkey) for s in job.inputs] == [(0x1000, 49152, 7)]
    assert [(s.addr, s.length, s.lkey) for s in job.outputs] == [(0x20000, 49152, 8), (0x40000, 64, 8)]
    wr = AccelWR(5, size=6144, iterations=8, early_stop=AccelEarlyStop.CRC24A, scaling=0.75,
                 inputs=[SGE(1, 2, 3)], outputs=[SGE(4, 5, 6)])
    dec = wire.decode_accel_job(encode_wr(wr, AccelOp.TURBO_DECODE))
    assert (dec.op, dec.iterations, dec.early_stop, dec.scaling) == (AccelOp.TURBO_DECODE, 8,
                                                                     AccelEarlyStop.CRC24A, 0.75)


def test_job_entry_that_cannot_be_encoded_is_a_user_error():
    with pytest.raises(UserError, match="SGEs exceed"):
        encode_wr(AccelWR(1, size=16, inputs=[SGE(0, 1, 1)] * 7, outputs=[SGE(0, 1, 1)] * 6), AccelOp.FFT)
    with pytest.raises(UserError, match="0x2"):
        encode_wr(AccelWR(2, size=1 << 32, inputs=[SGE(0, 1, 1)], outputs=[SGE(0, 1, 1)]), AccelOp.FFT)
    with pytest.raises(UserError):
        encode_wr(AccelWR(3, size=16, op=9, inputs=[SGE(0, 1, 1)], outputs=[SGE(0, 1, 1)]), AccelOp.FFT)


def test_cq_poll_returns_accelerator_completions_beside_verbs_ones(ctx):
    """CQEs laid in a real CQ's ring as the device lays them (wire.pack_cqe_into): an
    accelerator completion polls as an AccelWC with every field, a verbs one as a WC."""
    cq = CQ(ctx, 4)
    done = wire.AccelCompletion(77, AccelOp.TURBO_DECODE, AccelStatus.SUCCESS, aqn=5, byte_len=6148,
                                host=2, wait_us=123456, service_us=(1 << 24) - 1, iterations=6)
    failed = wire.AccelCompletion(78, AccelOp.FFT, AccelStatus.LOCAL_PROT, aqn=5)
    verbs = wire.Completion(79, WcStatus.SUCCESS, 0, qp_num=9, byte_len=10)
    for i, c in enumerate((done.to_cqe(), failed.to_cqe(), verbs)):
        wire.pack_cqe_into(cq.ring[i * wire.CQE_SIZE : (i + 1) * wire.CQE_SIZE], c, 1)
    n, wcs = cq.poll(4)
    assert n == 3
    a, b, v = wcs
    assert isinstance(a, AccelWC) and isinstance(b, AccelWC) and isinstance(v, WC)
    assert (a.wr_id, a.op, a.accel_status, a.status, a.byte_len, a.host, a.wait_us, a.service_us,
            a.iterations, a.aqn) == (77, AccelOp.TURBO_DECODE, AccelStatus.SUCCESS, WcStatus.SUCCESS, 6148, 2,
                                     123456, (1 << 24) - 1, 6, 5)
    assert (b.accel_status, b.status, b.op) == (AccelStatus.LOCAL_PROT, WcStatus.LOC_PROT_ERR, AccelOp.FFT)
    assert (v.wr_id, v.byte_len, v.qp_num) == (79, 10, 9)
    assert "TURBO_DECODE" in str(a) and "LOCAL_PROT" in str(b)
    assert cq.ci == 3 and cq.poll(1) == (0, [])


def test_bad_inputs_raise_accel_cores_typed_errors_before_submission(ctx):
    cases = [
        (lambda: accel.fft(ctx, np.zeros(7, np.complex64)), aerr.UnsupportedSize),
        (lambda: accel.fft(ctx, np.zeros(16, np.float64)), aerr.DtypeError),
        (lambda: accel.ifft(ctx, np.zeros((2, 16), np.complex64), out=np.zeros((2, 8), np.complex64)),
         aerr.ShapeError),
        (lambda: accel.fft(ctx, "abc"), aerr.DtypeError),
        (lambda: accel.turbo_encode(ctx, np.full(40, 2, np.uint8)), aerr.ElementError),
        (lambda: accel.turbo_encode(ctx, np.zeros(41, np.uint8)), aerr.BlockSizeError),
        (lambda: accel.turbo_decode(ctx, np.zeros((3, 44), np.float32), iterations=0), aerr.ParameterError),
        (lambda: accel.turbo_decode(ctx, np.zeros((3, 44), np.float32), scaling=1.5), aerr.ParameterError),
        (lambda: accel.turbo_decode(ctx, np.zeros((3, 44), np.float32), early_stop="crc16"),
         aerr.ParameterError),
        (lambda: accel.turbo_decode(ctx, np.zeros((3, 44), np.int32)), aerr.DtypeError),
        (lambda: accel.turbo_decode(ctx, np.zeros((3, 45), np.float32)), aerr.BlockSizeError),
    ]
    for call, err in cases:
        with pytest.raises(err) as direct:
            call()
        assert isinstance(direct.value, accel_core.AccelError)
    bad = np.zeros((3, 44), np.float32)
    bad[1, 5] = np.nan
    with pytest.raises(aerr.ElementError, match=r"llr\[1, 5\]"):
        accel.turbo_decode(ctx, bad)
    with pytest.raises(aerr.ElementError, match=r"llr\[1, 5\]"):
        accel_core.turbo_decode(bad)  # the same words as the library's
    assert ctx.accel_helper is None  # nothing was made on the device for any of them


def test_empty_batches_return_accel_cores_empty_results_without_the_device(ctx):
    x = np.zeros((0, 16), np.complex64)
    assert accel.fft(ctx, x).shape == accel_core.fft(x).shape
    b = np.zeros((0, 40), np.uint8)
    assert accel.turbo_encode(ctx, b).shape == accel_core.turbo_encode(b).shape == (0, 3, 44)
    bits, used = accel.turbo_decode(ctx, np.zeros((0, 3, 44), np.float32))
    rb, ru = accel_core.turbo_decode(np.zeros((0, 3, 44), np.float32))
    assert bits.shape == rb.shape and used.shape == ru.shape and used.dtype == ru.dtype
    assert ctx.accel_helper is None


def test_staging_allocator_first_fit_and_coalescing():
    s = accel._Staging(1024)
    a, b, c = s.alloc(100), s.alloc(64), s.alloc(1)
    assert (a, b, c) == (0, 128, 192)
    assert s.alloc(1024) is None
    s.release(b, 64)
    assert s.alloc(64) == 128  # first fit reuses the hole
    s.release(128, 64)
    s.release(a, 100)
    s.release(c, 1)
    assert s.free == [(0, 1024)]  # everything coalesced back
    assert s.alloc(1024) == 0


def test_file_like_parameters_and_write_sizes_are_checked(ctx):
    with pytest.raises(aerr.UnsupportedSize):
        accel.open(ctx, "fft", n=7)
    with pytest.raises(aerr.DtypeError):
        accel.open(ctx, "fft", n=16, dtype="float32")
    with pytest.raises(aerr.BlockSizeError):
        accel.open(ctx, "turbo_encode", k=41)
    with pytest.raises(aerr.ParameterError):
        accel.open(ctx, "turbo_decode", k=40, iterations=65)
    with pytest.raises(UserError):
        accel.open(ctx, "dct", n=16)
    with pytest.raises(UserError):
        accel.open(ctx, "fft", n=16, batch=0)
    assert ctx.accel_helper is None


def test_file_like_write_sizes_and_contents_are_checked(actx):
    ctx = actx
    with accel.open(ctx, "fft", n=16, batch=2) as f:
        assert f.in_size == f.out_size == 2 * 16 * 8
        with pytest.raises(accel.AccelSizeError) as e:
            f.write(bytes(255))
        assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
        with pytest.raises(UserError, match="no job written"):
            f.read()
    with accel.open(ctx, "turbo_decode", k=40, batch=3) as f:
        assert (f.in_size, f.out_size) == (3 * 3 * 44 * 4, 3 * 40 + 3)
        with pytest.raises(aerr.ElementError):
            f.write(np.full(3 * 3 * 44, np.inf, np.float32).tobytes())
    with accel.open(ctx, "turbo_encode", k=40) as f, pytest.raises(aerr.ElementError):
        f.write(bytes([3] * 40))
    with pytest.raises(UserError, match="closed"):
        f.write(bytes(40))


# --- tier 2: a device without accelerator queues ---------------------------------------------
def test_a_device_without_accelerators_refuses_and_nothing_leaks(ctx):
    if ctx.has_accel:
        pytest.skip("this daemon's devices offer accelerator queues")
    with pytest.raises(RDMAError) as e:
        ctx.query_accel()
    assert e.value.errno == errno.EOPNOTSUPP
    pd, cq = PD(ctx), CQ(ctx, 8)
    with pytest.raises(RDMAError) as e:
        AQ(pd, cq, AccelOp.FFT, depth=8)
    assert e.value.errno == errno.EOPNOTSUPP
    assert not ctx.aqs and not any(isinstance(c, AQ) for c in pd._children)
    with pytest.raises(RDMAError) as e:
        accel.fft(ctx, np.ones(16, np.complex64))
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(RDMAError) as e:
        accel.open(ctx, "turbo_decode", k=6144)
    assert e.value.errno == errno.EOPNOTSUPP
    assert ctx.accel_helper is None  # nothing made for a device that cannot use it
    ctx.close()
    assert pd.closed and cq.closed


def test_aq_arguments_are_checked_before_the_device(ctx):
    pd, cq = PD(ctx), CQ(ctx, 8)
    for kw, what in ((dict(op=9), "unknown"), (dict(op=AccelOp.FFT, depth=0), "depth"),
                     (dict(op=AccelOp.FFT, priority=8), "priority")):
        with pytest.raises(UserError, match=what):
            AQ(pd, cq, **kw)


# --- tier 3: end to end ------------------------------------------------------------------------
FFT_SIZES = [1, 2, 3, 5, 12, 60, 256, 1200, 1536, 2048, 4096, 32768]  # radix 2, 3, 5 and mixed


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_fft_and_ifft_equal_accel_core(actx, dtype):
    for n in FFT_SIZES:
        for shape in ((n,), (3, n)):
            x = _cplx(shape, dtype)
            got = accel.fft(actx, x)
            assert got.dtype == x.dtype and got.shape == x.shape
            np.testing.assert_array_equal(got, accel_core.fft(x))
            np.testing.assert_array_equal(accel.ifft(actx, x), accel_core.ifft(x))
    x = _cplx((2, 2, 48), dtype)  # more than one leading axis, as accel_core takes it
    np.testing.assert_array_equal(accel.fft(actx, x), accel_core.fft(x))
    out = np.empty_like(x)
    assert accel.fft(actx, x, out=out) is out
    np.testing.assert_array_equal(out, accel_core.fft(x))


def test_turbo_encode_and_decode_bit_exact(actx):
    for K in (40, 528, 1008, 6144):
        bits = rng.integers(0, 2, (2, K), dtype=np.uint8)
        np.testing.assert_array_equal(accel.turbo_encode(actx, bits), accel_core.turbo_encode(bits))
        np.testing.assert_array_equal(accel.turbo_encode(actx, bits[0]), accel_core.turbo_encode(bits[0]))
        _, llr = _llr(K, B=3, snr_db=0.5)
        for kw in (dict(), dict(iterations=4, scaling=0.75), dict(iterations=12, early_stop="crc24a")):
            got_bits, got_used = accel.turbo_decode(actx, llr, **kw)
            ref_bits, ref_used = accel_core.turbo_decode(llr, **kw)
            np.testing.assert_array_equal(got_bits, ref_bits)
            assert got_used.dtype == np.int32 and got_used.shape == (3,)
            np.testing.assert_array_equal(got_used, ref_used)
        one_bits, one_used = accel.turbo_decode(actx, llr[0].astype(np.float64), iterations=6)
        ref_bits, ref_used = accel_core.turbo_decode(llr[0].astype(np.float64), iterations=6)
        np.testing.assert_array_equal(one_bits, ref_bits)
        assert type(one_used) is int and one_used == ref_used


def test_arrays_in_registered_memory_are_used_in_place(actx):
    h = accel.helper(actx)
    n = 1024
    mr = MR(h.pd, 2 * n * 8, Access.LOCAL_WRITE)
    mem = np.frombuffer(actx.view_of_uva(mr.buf, mr.length), dtype=np.complex64)
    x, out = mem[:n], mem[n:]
    x[:] = _cplx(n, np.complex64)
    staged_in, zero = h.bytes_staged_in, h.zero_copy_buffers
    assert accel.fft(actx, x, out=out) is out
    np.testing.assert_array_equal(out, accel_core.fft(x))
    assert h.bytes_staged_in == staged_in and h.zero_copy_buffers == zero + 2  # no copy either way
    y = accel.fft(actx, _cplx(n, np.complex64))  # not registered: one copy in, one out
    assert h.bytes_staged_in == staged_in + n * 8 and y.shape == (n,)
    ref = accel_core.ifft(x)
    assert accel.ifft(actx, x, out=x) is x  # in place, as accel_core allows
    np.testing.assert_array_equal(x, ref)
    assert h.bytes_staged_in == staged_in + n * 8
    del x, out, mem
    mr.close()
    K = 1024
    _, llr = _llr(K, B=2)
    lmr = MR(h.pd, llr.nbytes, 0)  # an input needs no LOCAL_WRITE
    lmem = np.frombuffer(actx.view_of_uva(lmr.buf, llr.nbytes), np.float32).reshape(llr.shape)
    lmem[:] = llr
    zero = h.zero_copy_buffers
    bits, used = accel.turbo_decode(actx, lmem, iterations=5)
    rb, ru = accel_core.turbo_decode(llr, iterations=5)
    np.testing.assert_array_equal(bits, rb)
    np.testing.assert_array_equal(used, ru)
    assert h.zero_copy_buffers == zero + 1 and h.bytes_staged_in == staged_in + n * 8
    del lmem
    lmr.close()


def test_a_job_larger_than_the_staging_area_gets_its_own_mr(actx):
    h = accel.helper(actx)
    x = _cplx((5, 65536), np.complex128)  # 5 MiB, more than STAGING_BYTES
    assert x.nbytes > h.staging.size
    np.testing.assert_array_equal(accel.fft(actx, x), accel_core.fft(x))
    assert h.staging.free == [(0, h.staging.size)]
    assert not [c for c in h.pd._children if isinstance(c, MR) and c is not h.mr]


def test_asyncio_forms(actx):
    xs = [_cplx((2, n), np.complex64) for n in (64, 120, 2048)]
    bits = rng.integers(0, 2, 1008, dtype=np.uint8)
    _, llr = _llr(1008)

    async def main():
        return await asyncio.gather(*(accel.afft(actx, x) for x in xs), *(accel.aifft(actx, x) for x in xs),
                                    accel.aturbo_encode(actx, bits), accel.aturbo_decode(actx, llr, 5))

    res = asyncio.run(main())
    for x, got in zip(xs, res[:3], strict=True):
        np.testing.assert_array_equal(got, accel_core.fft(x))
    for x, got in zip(xs, res[3:6], strict=True):
        np.testing.assert_array_equal(got, accel_core.ifft(x))
    np.testing.assert_array_equal(res[6], accel_core.turbo_encode(bits))
    rb, ru = accel_core.turbo_decode(llr, iterations=5)
    np.testing.assert_array_equal(res[7][0], rb)
    assert res[7][1] == ru


def test_file_like_results_come_back_in_write_order(actx):
    with accel.open(actx, "fft", n=240, dtype="complex128", batch=2) as f:
        xs = [_cplx((2, 240), np.complex128) for _ in range(100)]  # more than an AQ's depth
        for x in xs[:70]:
            assert f.write(x.tobytes()) == x.nbytes
        got = [f.read() for _ in range(40)]
        for x in xs[70:]:
            f.write(memoryview(x).cast("B"))
        got += [f.read(timeout=10) for _ in range(60)]
        for x, g in zip(xs, got, strict=True):
            assert g == accel_core.fft(x).tobytes()
    K = 512
    bits = rng.integers(0, 2, (4, K), dtype=np.uint8)
    with (accel.open(actx, "turbo_encode", k=K) as enc,
          accel.open(actx, "turbo_decode", k=K, iterations=4) as dec):
        for b in bits:
            enc.write(b.tobytes())
        for b in bits:
            d = np.frombuffer(enc.read(), np.uint8).reshape(3, K + 4)
            np.testing.assert_array_equal(d, accel_core.turbo_encode(b))
            dec.write((4.0 * (1.0 - 2.0 * d)).astype(np.float32).tobytes())
        for b in bits:
            out = dec.read()
            assert len(out) == K + 1
            np.testing.assert_array_equal(np.frombuffer(out[:K], np.uint8), b)
            assert out[K] >= 1


def test_verbs_layer_post_takes_what_fits_and_completes_in_order(actx):
    infos = {i.op: i for i in actx.query_accel()}
    assert AccelOp.FFT in infos and infos[AccelOp.FFT].max_size >= 2048
    pd = PD(actx)
    cq = CQ(actx, 64)
    n = 256
    mr = MR(pd, 2 * 16 * n * 8, Access.LOCAL_WRITE)
    with AQ(pd, cq, AccelOp.FFT, depth=8, priority=3) as aq:
        assert aq.depth == 8 and actx.aqs[aq.aqn] is aq
        xs = [_cplx(n, np.complex64) for _ in range(16)]
        wrs = []
        for i, x in enumerate(xs):
            mr.write(x.tobytes(), offset=i * n * 8)
            wrs.append(AccelWR(100 + i, size=n, inputs=[SGE(mr.buf + i * n * 8, n * 8, mr.lkey)],
                               outputs=[SGE(mr.buf + (16 + i) * n * 8, n * 8, mr.lkey)]))
        assert aq.post(wrs) == 8 and aq.queue_full == 8 and aq.free_slots == 0
        assert aq.post(wrs[8:]) == 0 and aq.queue_full == 16
        done: list = []
        posted = 8
        while len(done) < 16:
            _, wcs = cq.poll(16)
            done += wcs
            if posted < 16 and aq.free_slots:
                posted += aq.post(wrs[posted:])
        assert [w.wr_id for w in done] == list(range(100, 116))
        for i, w in enumerate(done):
            assert isinstance(w, AccelWC) and w.accel_status == AccelStatus.SUCCESS and w.op == AccelOp.FFT
            assert (w.byte_len, w.host, w.aqn) == (n * 8, 0, aq.aqn)
            got = np.frombuffer(mr.read(n * 8, (16 + i) * n * 8), np.complex64)
            np.testing.assert_array_equal(got, accel_core.fft(xs[i]))
        assert aq.in_flight == 0
        with pytest.raises(RDMAError) as e:
            aq.cancel(12345)
        assert e.value.errno == errno.ENOENT
    assert aq.closed and aq.aqn not in actx.aqs


def test_device_refusals_are_error_completions_and_the_queue_keeps_working(actx):
    pd = PD(actx)
    cq = CQ(actx, 16)
    n = 64
    rw = MR(pd, 4 * n * 8, Access.LOCAL_WRITE)
    ro = MR(pd, n * 8, 0)
    good_in, good_out = SGE(rw.buf, n * 8, rw.lkey), SGE(rw.buf + n * 8, n * 8, rw.lkey)
    cases = [
        (AccelWR(1, size=7, inputs=[good_in], outputs=[good_out]), AccelStatus.INVALID_PARAMS),
        (AccelWR(2, size=n, op=AccelOp.IFFT, inputs=[good_in], outputs=[good_out]),
         AccelStatus.INVALID_PARAMS),
        (AccelWR(3, size=n, inputs=[SGE(rw.buf, n * 8, rw.lkey ^ 0x5A5A)], outputs=[good_out]),
         AccelStatus.LOCAL_PROT),
        (AccelWR(4, size=n, inputs=[good_in], outputs=[SGE(ro.buf, n * 8, ro.lkey)]), AccelStatus.LOCAL_PROT),
        (AccelWR(5, size=n, inputs=[good_in], outputs=[SGE(rw.buf + n * 8, n * 8 - 8, rw.lkey)]),
         AccelStatus.LOCAL_LEN),
        (AccelWR(6, size=n, inputs=[good_in], outputs=[good_out]), AccelStatus.SUCCESS),
    ]
    sentinel = bytes(range(256)) * (n * 8 // 256)
    rw.write(sentinel, offset=n * 8)
    with AQ(pd, cq, AccelOp.FFT, depth=8) as aq:
        assert aq.post([wr for wr, _ in cases]) == len(cases)
        done: list = []
        while len(done) < len(cases):
            done += cq.poll(8)[1]
        for (wr, st), wc in zip(cases, done, strict=True):
            assert (wc.wr_id, wc.accel_status) == (wr.wr_id, st)
            assert (wc.status == WcStatus.SUCCESS) == (st == AccelStatus.SUCCESS)
    # the failed jobs wrote nothing: only the last (good) job changed the output
    x = np.frombuffer(rw.read(n * 8), np.complex64)
    np.testing.assert_array_equal(np.frombuffer(rw.read(n * 8, n * 8), np.complex64), accel_core.fft(x))
    # and through the accel_core-shaped layer the status is an AccelJobError
    h = accel.helper(actx)
    h.aq(AccelOp.FFT)
    with pytest.raises(accel.AccelJobError) as e:
        job = h.submit(AccelOp.FFT, np.zeros(7, np.complex64), 56, None, None, size=7)
        h.wait(job)
        job.result()
    assert e.value.accel_status == AccelStatus.INVALID_PARAMS and e.value.errno == errno.EINVAL


def test_jobs_and_rdma_sends_interleave_on_one_context(accel_daemon):
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from guest_lib.wr import RecvWR, SendWR

    a, z = RcEndpoint(accel_daemon, mem_size=MEM), RcEndpoint(accel_daemon, mem_size=MEM)
    try:
        connect_pair(a, z)
        for i in range(20):
            msg = f"message {i}".encode()
            z.qp.post_recv(RecvWR(i, sg=[SGE(z.mr.buf, 64, z.mr.lkey)]))
            a.mr.write(msg)
            a.qp.post_send(SendWR(i, sg=[SGE(a.mr.buf, len(msg), a.mr.lkey)]))
            x = _cplx(128 * (1 + i % 3), np.complex64)
            np.testing.assert_array_equal(accel.fft(a.ctx, x), accel_core.fft(x))
            assert a.poll_one().status == WcStatus.SUCCESS
            wc = z.poll_one()
            assert (wc.status, wc.byte_len) == (WcStatus.SUCCESS, len(msg)) and z.mr.read(len(msg)) == msg
    finally:
        a.close()
        z.close()


def test_cancel_takes_a_queued_job_and_destroy_flushes_the_rest(actx):
    """One FFT accelerator, 24 jobs of 4 x 65536 points queued behind each other: the last
    ones have not started when CANCEL_AQ_JOB and DESTROY_AQ arrive."""
    pd = PD(actx)
    cq = CQ(actx, 64)
    n, b = 65536, 4
    nbytes = n * b * 8
    mr = MR(pd, 2 * nbytes, Access.LOCAL_WRITE)
    src, dst = SGE(mr.buf, nbytes, mr.lkey), SGE(mr.buf + nbytes, nbytes, mr.lkey)
    aq = AQ(pd, cq, AccelOp.FFT, depth=32)
    assert aq.post([AccelWR(i, size=n, batch=b, inputs=[src], outputs=[dst]) for i in range(24)]) == 24
    aq.cancel(23)
    with pytest.raises(RDMAError) as e:
        aq.cancel(23)  # taken already: no such queued job
    assert e.value.errno == errno.ENOENT
    aq.close()  # DESTROY_AQ: what has not run completes FLUSHED
    done: list = []
    deadline = time.monotonic() + 60
    while len(done) < 24 and time.monotonic() < deadline:
        done += cq.poll(32)[1]
    assert [w.wr_id for w in done] == list(range(24))  # every job completes once, in post order
    st = [w.accel_status for w in done]
    assert st[0] == AccelStatus.SUCCESS and st[23] == AccelStatus.CANCELLED
    assert AccelStatus.FLUSHED in st and all(w.status == WcStatus.WR_FLUSH_ERR for w in done
                                             if w.accel_status != AccelStatus.SUCCESS)
    assert not actx.aqs and cq.poll(1) == (0, [])


def test_the_daemon_going_away_is_enotconn_not_a_hang(accel_daemon_proc):
    """Killed with a job written to a file and one in flight on the verbs layer: every call ends
    in RDMAError ENOTCONN within the liveness interval, and the Context still closes."""
    proc, path = accel_daemon_proc
    ctx = Context(path, mem_size=MEM, timeout=20.0)
    x = _cplx(4096, np.complex64)
    np.testing.assert_array_equal(accel.fft(ctx, x), accel_core.fft(x))
    f = accel.open(ctx, "fft", n=4096)
    proc.kill()
    proc.wait()
    with pytest.raises(RDMAError) as e:
        for _ in range(10_000):  # the first writes may still find room; the read cannot complete
            f.write(x.tobytes())
            f.read()
    assert e.value.errno == errno.ENOTCONN
    with pytest.raises(RDMAError) as e:
        accel.fft(ctx, x)
    assert e.value.errno == errno.ENOTCONN
    f.close()  # its unread jobs are the daemon's no more: no error
    h = accel.helper(ctx)
    ctx.close()
    assert h.closed and ctx.accel_helper is None


def test_closing_the_context_with_jobs_in_flight(accel_daemon):
    """The helper's queues are destroyed with jobs queued and running: it takes their
    completions before it releases the staging MR, PD and CQ, so the close succeeds."""
    for _ in range(3):
        ctx = Context(accel_daemon, mem_size=MEM, timeout=20.0)
        h = accel.helper(ctx)
        x = np.ones((1, 65536), np.complex64)
        jobs = [h.try_submit(AccelOp.FFT, x, x.nbytes, None, None, size=65536, batch=1) for _ in range(4)]
        assert all(j is not None for j in jobs) and len(h.pending) == 4
        ctx.close()
        assert h.closed and not h.pending and all(j.done for j in jobs)
        assert {j.wc.accel_status for j in jobs} <= {AccelStatus.SUCCESS, AccelStatus.FLUSHED}


def test_one_cq_carries_verbs_and_accelerator_completions(accel_daemon):
    """An AQ on an endpoint's own PD and CQ: SENDs and FFT jobs posted alternately, both kinds
    polled from the one CQ, each freeing its own queue's slot."""
    from guest_lib.endpoint import RcEndpoint, connect_pair
    from guest_lib.wr import RecvWR, SendWR

    a, z = RcEndpoint(accel_daemon, mem_size=MEM), RcEndpoint(accel_daemon, mem_size=MEM)
    try:
        connect_pair(a, z)
        n = 512
        x = _cplx(n, np.complex64)
        a.mr.write(x.tobytes(), offset=4096)
        aq = AQ(a.pd, a.cq, AccelOp.FFT, depth=4)
        kinds = []
        for i in range(12):
            z.qp.post_recv(RecvWR(i, sg=[SGE(z.mr.buf, 64, z.mr.lkey)]))
            a.qp.post_send(SendWR(1000 + i, sg=[SGE(a.mr.buf, 16, a.mr.lkey)]))
            assert aq.post(AccelWR(2000 + i, size=n, inputs=[SGE(a.mr.buf + 4096, n * 8, a.mr.lkey)],
                                   outputs=[SGE(a.mr.buf + 8192 + i * n * 8, n * 8, a.mr.lkey)])) == 1
            got = []
            while len(got) < 2:
                got += a.cq.poll(2)[1]
            kinds += [type(w) for w in got]
            assert {w.wr_id for w in got} == {1000 + i, 2000 + i}
            assert all(w.status == WcStatus.SUCCESS for w in got)
            z.poll_one()
            assert aq.in_flight == 0
        assert kinds.count(WC) == kinds.count(AccelWC) == 12
        ref = accel_core.fft(x).tobytes()
        assert all(a.mr.read(n * 8, 8192 + i * n * 8) == ref for i in range(12))
        aq.close()
    finally:
        a.close()
        z.close()


# --------------------------------------------------------------------------- the per-job path
def test_post_packs_the_wire_codecs_bytes_into_the_ring():
    """pack_wr (what AQ.post writes into a slot) gives encode_wr's bytes exactly, over a
    seeded spread of WRs, over a slot holding garbage; and refuses what encode_wr refuses,
    with its UserError."""
    from guest_lib.aq import pack_wr

    r = np.random.default_rng(3)
    for i in range(300):
        nin, nout = int(r.integers(1, 8)), int(r.integers(1, 8))
        nin = min(nin, MAX_ACCEL_SGE - nout)
        sg = [SGE(int(r.integers(0, 1 << 63)), int(r.integers(0, 1 << 32)), int(r.integers(0, 1 << 32)))
              for _ in range(nin + nout)]
        wr = AccelWR(int(r.integers(0, 1 << 63)), size=int(r.integers(0, 1 << 32)),
                     batch=int(r.integers(0, 1 << 32)), dtype=int(r.integers(0, 2)),
                     inputs=sg[:nin], outputs=sg[nin:], iterations=int(r.integers(0, 1 << 16)),
                     early_stop=int(r.integers(0, 3)),
                     scaling=None if i % 3 else float(np.float32(r.random())),
                     op=None if i % 4 else int(r.integers(1, 5)))
        op = AccelOp(int(r.integers(1, 5)))
        buf = bytearray(r.integers(0, 256, 3 * AQ_SLOT_SIZE, dtype=np.uint8).tobytes())
        pack_wr(buf, AQ_SLOT_SIZE, wr, op)
        assert bytes(buf[AQ_SLOT_SIZE:2 * AQ_SLOT_SIZE]) == encode_wr(wr, op), i
    buf = bytearray(AQ_SLOT_SIZE)
    for bad, match in ((AccelWR(1, size=16, inputs=[SGE(0, 1, 1)] * 7, outputs=[SGE(0, 1, 1)] * 6), "SGEs exceed"),
                       (AccelWR(2, size=1 << 32, inputs=[SGE(0, 1, 1)], outputs=[SGE(0, 1, 1)]), "0x2"),
                       (AccelWR(3, size=16, op=9, inputs=[SGE(0, 1, 1)], outputs=[SGE(0, 1, 1)]), "0x3"),
                       (AccelWR(4, size=16, dtype=7, inputs=[SGE(0, 1, 1)], outputs=[SGE(0, 1, 1)]), "0x4"),
                       (AccelWR(5, size=16, inputs=[SGE(-1, 1, 1)], outputs=[SGE(0, 1, 1)]), "0x5")):
        with pytest.raises(UserError, match=match):
            pack_wr(buf, 0, bad, AccelOp.FFT)


def test_post_is_all_or_nothing_with_a_bad_wr_in_the_list(actx):
    """A WR that cannot be encoded anywhere in a list: UserError, the producer index
    and the doorbell record unmoved, no completion ever comes; the queue then works."""
    pd, cq = PD(actx), CQ(actx, 16)
    n = 64
    x = _cplx((1, n), np.complex64)
    mr = MR(pd, 2 * x.nbytes, Access.LOCAL_WRITE)
    mr.write(x.tobytes())
    aq = AQ(pd, cq, AccelOp.FFT, depth=8)
    good = AccelWR(1, size=n, inputs=[SGE(mr.buf, x.nbytes, mr.lkey)],
                   outputs=[SGE(mr.buf + x.nbytes, x.nbytes, mr.lkey)])
    bad = AccelWR(2, size=1 << 40, inputs=good.inputs, outputs=good.outputs)
    with pytest.raises(UserError):
        aq.post([good, good, bad, good])
    assert aq.pi == 0 and aq.in_flight == 0 and bytes(aq.dbrec[:4]) == bytes(4)
    assert aq.post([good]) == 1
    deadline = time.monotonic() + 20  # a hang guard, not a measurement
    wcs: list = []
    while not wcs:
        assert time.monotonic() < deadline
        wcs = cq.poll(4)[1]
    assert [(w.wr_id, w.accel_status) for w in wcs] == [(1, AccelStatus.SUCCESS)]
    got = np.frombuffer(mr.read(x.nbytes, x.nbytes), np.complex64).reshape(1, n)
    np.testing.assert_allclose(got, accel_core.fft(x), rtol=1e-5, atol=1e-4)
    aq.close()


def test_registered_lookup_remembers_mrs_but_checks_them_every_time(actx):
    """The helper remembers the MRs callers' arrays were last found in, and still checks
    each one on every call: an output in a read-only MR is staged, a closed MR is never
    named again, and a remembered MR does not stay alive because of it."""
    import gc
    import weakref

    h = accel.helper(actx)
    n = 256
    ro, rw = MR(h.pd, n * 8, 0), MR(h.pd, n * 8, Access.LOCAL_WRITE)
    x = np.frombuffer(actx.view_of_uva(ro.buf, n * 8), np.complex64)
    y = np.frombuffer(actx.view_of_uva(rw.buf, n * 8), np.complex64)
    x[:] = _cplx(n, np.complex64)
    zero = h.zero_copy_buffers
    for _ in range(3):
        accel.fft(actx, x, out=y)
    assert h.zero_copy_buffers == zero + 6
    assert h.registered(x, False).lkey == ro.lkey and h.registered(x, True) is None
    staged_out = h.bytes_staged_out
    want = accel_core.ifft(y)
    accel.ifft(actx, y, out=x)  # an output in a read-only MR: computed in staging, copied out
    np.testing.assert_array_equal(x, want)
    assert h.bytes_staged_out == staged_out + n * 8
    del x
    ro.close()
    other = MR(h.pd, n * 8, Access.LOCAL_WRITE)
    z = np.frombuffer(actx.view_of_uva(other.buf, n * 8), np.complex64)
    assert h.registered(z, True).lkey == other.lkey
    assert h.registered(y, True).lkey == rw.lkey
    ref = weakref.ref(rw)
    del y, z
    rw.close()
    del rw
    gc.collect()
    assert ref() is None  # the helper's memory of it is weak
    other.close()


def test_a_guest_flooding_batches_and_a_guest_with_single_jobs_both_complete_in_order(accel_daemon):
    """Through the daemon: guest A keeps a 32-deep queue of 16 x 2048 FFT batches full
    (jobs the daemon runs in its loop a slice at a time) while guest B, on the same
    daemon, runs single small FFTs one by one and sends itself nothing but jobs. Every
    result equals accel_core's, every CQE comes in post order, none is lost or doubled."""
    n, b, depth, rounds = 2048, 16, 32, 96
    with Context(accel_daemon, mem_size=MEM, timeout=20.0) as a, \
            Context(accel_daemon, mem_size=MEM, timeout=20.0) as g2:
        pa, ca = PD(a), CQ(a, 64)
        x = _cplx((b, n), np.complex64)
        ma = MR(pa, (depth + 1) * x.nbytes, Access.LOCAL_WRITE)
        ma.write(x.tobytes())
        qa = AQ(pa, ca, AccelOp.FFT, depth=depth)
        wrs = [AccelWR(i, size=n, batch=b, inputs=[SGE(ma.buf, x.nbytes, ma.lkey)],
                       outputs=[SGE(ma.buf + (1 + i % depth) * x.nbytes, x.nbytes, ma.lkey)])
               for i in range(rounds)]
        pb, cb = PD(g2), CQ(g2, 16)
        y = _cplx((1, 256), np.complex64)
        mb = MR(pb, 2 * y.nbytes, Access.LOCAL_WRITE)
        mb.write(y.tobytes())
        qb = AQ(pb, cb, AccelOp.FFT, depth=4)
        wb = AccelWR(0, size=256, inputs=[SGE(mb.buf, y.nbytes, mb.lkey)],
                     outputs=[SGE(mb.buf + y.nbytes, y.nbytes, mb.lkey)])
        done_a: list = []
        posted = qa.post(wrs[:depth])
        singles = 0
        deadline = time.monotonic() + 60  # a hang guard, not a measurement
        while len(done_a) < rounds:
            assert time.monotonic() < deadline, (len(done_a), singles)
            assert qb.post(wb) == 1
            wcs: list = []
            while not wcs:
                assert time.monotonic() < deadline
                wcs = cb.poll(1)[1]
                done_a += ca.poll(depth)[1]
            assert [(w.wr_id, w.accel_status) for w in wcs] == [(0, AccelStatus.SUCCESS)]
            singles += 1
            if posted < rounds and qa.free_slots:
                posted += qa.post(wrs[posted:posted + qa.free_slots])
        assert [w.wr_id for w in done_a] == list(range(rounds))
        assert all(w.accel_status == AccelStatus.SUCCESS for w in done_a)
        want = accel_core.fft(x)
        for k in (1, depth // 2, depth):
            got = np.frombuffer(ma.read(x.nbytes, k * x.nbytes), np.complex64).reshape(b, n)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(np.frombuffer(mb.read(y.nbytes, y.nbytes), np.complex64).reshape(1, 256),
                                      accel_core.fft(y))
        assert singles >= 1 and ca.poll(1) == (0, []) and cb.poll(1) == (0, [])
