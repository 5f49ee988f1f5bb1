"""The native guest fast path (guest_lib/_fast.pyx) against its Python reference.

The same random program (send WRs of every opcode and flag, inline and SGE
payloads, too many SGEs, too much inline data, fields out of range, post
lists, receives, full queues, ring wrap-around, RESET) runs on
:class:`guest_lib._fast.WorkQueues` / :class:`~guest_lib._fast.CompletionRing`
and on :class:`guest_lib.qp.PyWorkQueues` / :class:`guest_lib.cq.PyCompletionRing`
over plain bytearrays, with a small device model between the rings that
consumes the published WQEs and writes CQEs (verbs and accelerator ones,
successes and errors, for known and unknown QPs). After every step the ring
bytes, doorbell records, completions (objects, raw ``poll_into`` records and
``poll_counts``), indices and errors must be identical. Then both paths run
over a real daemon.
"""
import errno
import random
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guest_lib import SGE, QPCap, RDMAError, RecvWR, SendWR, UserError, _fast, cq as cq_mod
from guest_lib.cq import WC, WC_DTYPE, PyCompletionRing, _accel_wc
from guest_lib.endpoint import RcEndpoint, connect_pair
from guest_lib.qp import PyWorkQueues
from verbs import SendFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma import wire
from virtio_rdma.constants import ACCEL_CQE_OPCODE_BASE

QPN, AQN, UNKNOWN_QPN = 0x11, 0x22, 0x33
MEM = bytes(range(256)) * 64  # what inline SGEs point at: uva = offset
WC_OF = {WrOpcode.SEND: WcOpcode.SEND, WrOpcode.SEND_WITH_IMM: WcOpcode.SEND,
         WrOpcode.RDMA_WRITE: WcOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM: WcOpcode.RDMA_WRITE,
         WrOpcode.RDMA_READ: WcOpcode.RDMA_READ, WrOpcode.ATOMIC_CMP_AND_SWP: WcOpcode.COMP_SWAP,
         WrOpcode.ATOMIC_FETCH_AND_ADD: WcOpcode.FETCH_ADD}


def _translate(uva: int, length: int) -> memoryview:
    if uva < 0 or length < 0 or uva + length > len(MEM):
        raise UserError(f"address {uva:#x}+{length} is not registered memory")
    return memoryview(MEM)[uva : uva + length]


class _QP:
    """What a CQ finds in Context.qps: the QP's work queues."""

    def __init__(self, wq):
        self._wq = wq

    def _completed(self, opcode, status):
        self._wq.completed(opcode, status)


class _AQ:
    def __init__(self):
        self.completed = 0

    def _completed(self):
        self.completed += 1


class Side:
    """One implementation's rings and the device model behind them."""

    def __init__(self, native: bool, geo: dict):
        self.sq = bytearray(geo["sq_depth"] * geo["sq_slot"])
        self.rq = bytearray(geo["rq_depth"] * geo["rq_slot"])
        self.dbrec = bytearray(wire.DBREC_SIZE)
        self.ring = bytearray(geo["cqe"] * wire.CQE_SIZE)
        self.cq_dbrec = bytearray(wire.DBREC_SIZE)
        wq_cls = _fast.WorkQueues if native else PyWorkQueues
        cr_cls = _fast.CompletionRing if native else PyCompletionRing
        self.wq = wq_cls(QPN, self.sq, self.rq, self.dbrec, geo["sq_depth"], geo["rq_depth"], geo["sq_slot"],
                         geo["rq_slot"], geo["max_send_sge"], geo["max_recv_sge"], geo["sig_all"], _translate)
        self.cr = cr_cls(self.ring, self.cq_dbrec, geo["cqe"], WC, _accel_wc)
        self.aq = _AQ()
        self.qps, self.aqs = {QPN: _QP(self.wq)}, {AQN: self.aq}
        self.geo = geo
        self.sq_next = self.rq_next = self.cq_pi = 0  # the device's side

    def _cqe(self, c: wire.Completion) -> bool:
        cqe = self.geo["cqe"]
        if self.cq_pi - int.from_bytes(self.cq_dbrec[:4], "little") >= cqe:
            return False  # the CQ is full: the model waits
        off = (self.cq_pi % cqe) * wire.CQE_SIZE
        self.ring[off : off + wire.CQE_SIZE] = wire.encode_cqe(c, ((self.cq_pi // cqe) & 1) ^ 1)
        self.cq_pi += 1
        return True

    def device(self, nsend: int, nrecv: int, status: int, extra: str | None) -> None:
        """Consume up to ``nsend`` published send WQEs (a CQE for the signaled
        ones, the last with ``status``) and ``nrecv`` receives."""
        g = self.geo
        sq_pi, rq_pi = (int.from_bytes(self.dbrec[i : i + 4], "little") for i in (0, 4))
        nsend = min(nsend, (sq_pi - self.sq_next) & 0xFFFFFFFF)
        for k in range(nsend):
            off = (self.sq_next % g["sq_depth"]) * g["sq_slot"]
            wr_id = int.from_bytes(self.sq[off : off + 8], "little")
            op, flags = self.sq[off + 8], self.sq[off + 9]
            st_ = status if k == nsend - 1 else 0
            if (flags & SendFlags.SIGNALED or g["sig_all"] or st_) and not self._cqe(
                    wire.Completion(wr_id, st_, WC_OF.get(op, WcOpcode.SEND), QPN, 8)):
                break
            self.sq_next += 1
        for _ in range(nrecv):
            if self.rq_next == rq_pi:
                break
            off = (self.rq_next % g["rq_depth"]) * g["rq_slot"]
            wr_id = int.from_bytes(self.rq[off : off + 8], "little")
            op = WcOpcode.RECV_RDMA_WITH_IMM if wr_id & 1 else WcOpcode.RECV
            if not self._cqe(wire.Completion(wr_id, 0, op, QPN, 64, imm_data=wr_id & 0xFFFF, wc_flags=2,
                                             src_qp=7)):
                break
            self.rq_next += 1
        if extra == "accel":
            self._cqe(wire.Completion(99, 0, ACCEL_CQE_OPCODE_BASE | 2, AQN, 4096, imm_data=1, wc_flags=0,
                                      src_qp=12, vendor_err=(3 << 20) | 77))
        elif extra == "stranger":
            self._cqe(wire.Completion(98, 5, WcOpcode.SEND, UNKNOWN_QPN, 0))

    def state(self) -> tuple:
        wq = self.wq
        return (bytes(self.sq), bytes(self.rq), bytes(self.dbrec), bytes(self.cq_dbrec), bytes(self.ring),
                wq.sq_pi, wq.sq_ci, wq.rq_pi, wq.rq_ci, self.cr.ci, self.aq.completed)


def _outcome(fn):
    try:
        return ("ok", fn())
    except (RDMAError, UserError) as e:
        return (type(e).__name__, getattr(e, "errno", None), str(e).split(" (")[0])


geo_st = st.fixed_dictionaries({
    "sq_depth": st.sampled_from([2, 4, 8]), "rq_depth": st.sampled_from([2, 4, 8]),
    "sq_slot": st.sampled_from([64, 128, 128, 256]), "rq_slot": st.sampled_from([32, 64]),
    "cqe": st.sampled_from([2, 4, 16]), "sig_all": st.booleans(),
})
BAD = {"wr_id": -1, "imm_data": 2**32, "opcode": 256, "remote_addr": 2**64, "lkey": -2}


def _sges(rng, n: int, short: bool) -> list:
    return [SGE(rng.randrange(len(MEM) - 300), rng.choice([0, 1, 7, 16, 24] if short else [8, 100, 200, 300]),
                rng.getrandbits(32)) for _ in range(n)]


def _send_wr(rng, g) -> SendWR:
    inline = rng.random() < 0.2
    room = g["sq_slot"] - wire.SEND_WQE_HEADER_SIZE
    nsge = rng.randint(0, 3) if inline else rng.randint(0, g["max_send_sge"] + (rng.random() < 0.05))
    flags = sum(f for f in (SendFlags.SIGNALED, SendFlags.SOLICITED, SendFlags.FENCE, SendFlags.IP_CSUM)
                if rng.random() < 0.4) | (SendFlags.INLINE if inline else 0)
    wr = SendWR(wr_id=rng.getrandbits(64), opcode=rng.choice(list(WrOpcode)),
                num_sge=rng.choice([None] * 8 + [0, 1, 2]),
                sg=_sges(rng, nsge, rng.random() < 0.9 or room > 100),
                send_flags=flags, imm_data=rng.getrandbits(32), remote_addr=rng.getrandbits(64),
                rkey=rng.getrandbits(32), compare_add=rng.getrandbits(64), swap=rng.getrandbits(64))
    if rng.random() < 0.04:  # a field out of range
        field = rng.choice(list(BAD))
        if field == "lkey":
            if wr.sg:
                wr.sg[-1].lkey = BAD[field]
        else:
            setattr(wr, field, BAD[field])
    return wr


def _recv_wr(rng, g) -> RecvWR:
    wr = RecvWR(rng.getrandbits(64), sg=_sges(rng, rng.randint(0, g["max_recv_sge"] + (rng.random() < 0.05)),
                                              True))
    if rng.random() < 0.04:
        wr.wr_id = rng.choice([-5, 2**64])
    return wr


def _program(rng, g, n: int) -> list:
    """``n`` steps: posts, device work, polls, now and then a RESET."""
    kinds = ["send"] * 30 + ["list"] * 8 + ["recv"] * 15 + ["device"] * 25 + ["poll"] * 20 + ["reset"]
    out = []
    for _ in range(n):
        k = rng.choice(kinds)
        if k == "send":
            out.append((k, [_send_wr(rng, g) for _ in range(rng.randint(1, 5))]))
        elif k == "list":
            out.append((k, [_send_wr(rng, g) for _ in range(rng.randint(1, 4))]))
        elif k == "recv":
            out.append((k, [_recv_wr(rng, g) for _ in range(rng.randint(1, 5))]))
        elif k == "device":
            out.append((k, rng.randint(0, 6), rng.randint(0, 6), rng.choice([0] * 6 + [5, 12]),
                        rng.choice([None] * 8 + ["accel", "stranger"])))
        elif k == "poll":
            out.append((k, rng.choice(["poll", "into", "counts"]), rng.randint(1, 8)))
        else:
            out.append((k,))
    return out


def _step(side: Side, step, prepared: dict):
    kind = step[0]
    if kind == "send":
        return _outcome(lambda: side.wq.post_send(step[1]))
    if kind == "list":
        wrs = step[1]
        r = _outcome(lambda: side.wq.prepare(wrs))
        if r[0] != "ok":
            return r
        return r, _outcome(lambda: side.wq.post_list(*r[1]))
    if kind == "recv":
        return _outcome(lambda: side.wq.post_recv(step[1]))
    if kind == "device":
        return side.device(*step[1:])
    if kind == "poll":
        how, n = step[1:]
        if how == "poll":
            return [(type(w).__name__, vars(w)) for w in side.cr.poll(n, side.qps, side.aqs)]
        if how == "counts":
            return side.cr.poll_counts(n, side.qps, side.aqs)
        out = np.full(8 * wire.CQE_SIZE, 0xEE, np.uint8).view(WC_DTYPE)  # 8 dirty records
        got = side.cr.poll_into(out, side.qps, side.aqs, n)
        return got, out.tobytes()
    side.wq.reset()
    side.sq_next = side.rq_next = 0  # the device resets the QP with it
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geo_st, seed=st.integers(0, 2**32 - 1), length=st.integers(1, 100))
def test_native_and_python_rings_agree(geo, seed, length):
    rng = random.Random(seed)  # noqa: S311  the program from a seed: small to draw, replayed exactly
    geo = dict(geo, max_send_sge=(geo["sq_slot"] - wire.SEND_WQE_HEADER_SIZE) // wire.SGE_SIZE,
               max_recv_sge=(geo["rq_slot"] - wire.RECV_WQE_HEADER_SIZE) // wire.SGE_SIZE)
    program = _program(rng, geo, length)
    fast, ref = Side(True, geo), Side(False, geo)
    for i, step in enumerate(program):
        a, b = _step(fast, step, {}), _step(ref, step, {})
        assert a == b, (i, step)
        assert fast.state() == ref.state(), (i, step)


def test_errors_keep_their_messages_and_errno():
    geo = dict(sq_depth=2, rq_depth=2, sq_slot=64, rq_slot=32, cqe=4, sig_all=False, max_send_sge=0,
               max_recv_sge=1)
    for native in (True, False):
        s = Side(native, geo)
        with pytest.raises(UserError, match="1 SGEs exceed max_send_sge 0"):
            s.wq.post_send(SendWR(sg=[SGE(0, 8, 1)]))
        with pytest.raises(UserError, match="8 bytes of inline data exceed the QP's 0"):
            s.wq.post_send(SendWR(sg=[SGE(0, 8, 1)], send_flags=SendFlags.INLINE))
        with pytest.raises(UserError, match="send WR 18446744073709551616: a field is out of range"):
            s.wq.post_send(SendWR(wr_id=2**64))
        s.wq.post_send([SendWR(1), SendWR(2)])
        with pytest.raises(RDMAError, match="send queue of QP 0x11 is full \\(2 WRs\\)") as e:
            s.wq.post_send(SendWR(3))
        assert e.value.errno == errno.ENOMEM
        # a list with a bad WR in the middle: the ones before it are posted
        with pytest.raises(UserError, match="2 SGEs exceed max_recv_sge 1"):
            s.wq.post_recv([RecvWR(1), RecvWR(2, sg=[SGE(0, 1, 1)] * 2), RecvWR(3)])
        assert (s.wq.sq_pi, s.wq.rq_pi, bytes(s.dbrec)) == (2, 1, bytes([2, 0, 0, 0, 1, 0, 0, 0]))


# --------------------------------------------------------------------------
# both paths over a real daemon


def _traffic(a, b):
    """SENDs (inline and not), WRITEs by post list, READs; what each side saw."""
    seen = []
    for i in range(40):
        b.qp.post_recv(RecvWR(i, sg=[SGE(b.mr.buf + 8192, 256, b.mr.lkey)]))
        a.mr.write(bytes([i]) * 64)
        flags = SendFlags.SIGNALED | (SendFlags.INLINE if i % 2 else 0)
        a.qp.post_send(SendWR(100 + i, WrOpcode.SEND_WITH_IMM, sg=[SGE(a.mr.buf, 64, a.mr.lkey)],
                              send_flags=flags, imm_data=i))
        seen += [(w.wr_id, w.status, w.opcode, w.byte_len, w.imm_data) for w in (a.poll_one(), b.poll_one())]
        assert b.mr.read(64, 8192) == bytes([i]) * 64
    plist = a.qp.prepare_send([SendWR(j, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf + 512 * j, 512, a.mr.lkey)],
                                      remote_addr=b.mr.buf + 512 * j, rkey=b.mr.rkey,
                                      send_flags=SendFlags.SIGNALED if j == 5 else 0) for j in range(6)])
    for r in range(30):  # 6 of 64 slots a list: wraps the ring
        a.mr.write(bytes([r]) * 3072)
        a.qp.post_list(plist)
        w = a.poll_one()
        seen.append((w.wr_id, w.status, w.opcode))
        assert b.mr.read(3072) == bytes([r]) * 3072
    a.qp.post_send(SendWR(7, WrOpcode.RDMA_READ, sg=[SGE(a.mr.buf + 4096, 128, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey))
    w = a.poll_one()
    seen.append((w.wr_id, w.status, w.opcode, w.byte_len))
    return seen, [(q.sq_pi, q.sq_ci, q.rq_pi, q.rq_ci) for q in (a.qp, b.qp)], (a.cq.ci, b.cq.ci)


CAP = QPCap(64, 64, 1, 1, 64)


def test_both_paths_over_a_daemon(rdma_backend, monkeypatch):
    out = {}
    for native in (True, False):
        monkeypatch.setattr(cq_mod, "NATIVE", native)
        with RcEndpoint(rdma_backend.path, 1 << 16, cap=CAP, mem_size=16 << 20) as a, \
                RcEndpoint(rdma_backend.path, 1 << 16, cap=CAP, mem_size=16 << 20) as b:
            assert a.qp.native is a.cq.native is native
            connect_pair(a, b)
            out[native] = _traffic(a, b)
    assert out[True] == out[False]
    assert out[True][1][0] == (40 + 180 + 1,) * 2 + (0, 0)


def test_poll_into_and_poll_counts(pair):
    a, b = pair
    assert a.qp.native and a.cq.native
    wcs = np.zeros(16, WC_DTYPE)
    for i in range(10):
        b.qp.post_recv(RecvWR(i, sg=[SGE(b.mr.buf, 128, b.mr.lkey)]))
    a.qp.post_send([SendWR(50 + i, WrOpcode.SEND_WITH_IMM, sg=[SGE(a.mr.buf, 8 * i, a.mr.lkey)], imm_data=i,
                           send_flags=SendFlags.SIGNALED if i % 3 == 0 else 0) for i in range(10)])
    got = 0
    deadline = time.monotonic() + 10
    while got < 10 and time.monotonic() < deadline:
        got += b.cq.poll_into(wcs[got:])
    assert got == 10
    assert list(wcs["wr_id"][:10]) == list(range(10))
    assert list(wcs["byte_len"][:10]) == [8 * i for i in range(10)]
    assert list(wcs["imm_data"][:10]) == list(range(10)) and not wcs["owner"].any()
    assert set(wcs["opcode"][:10]) == {WcOpcode.RECV} and not wcs["status"].any()
    assert b.qp.rq_ci == 10 and b.cq.ci == 10
    counts = [0, 0, 0]
    while counts[1] < 4 and time.monotonic() < deadline:  # 50, 53, 56, 59 signaled
        for k, v in enumerate(a.cq.poll_counts(16)):
            counts[k] += v
    assert counts == [0, 4, 0] and a.qp.sq_ci == a.qp.sq_pi == 10
    assert b.cq.poll_into(wcs) == 0 and a.cq.poll_counts() == (0, 0, 0)
    # an error completion is counted as one
    a.qp.post_send(SendWR(9, WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf, 8, a.mr.lkey)], remote_addr=b.mr.buf,
                          rkey=b.mr.rkey ^ 0x5A5A))
    (wc,) = a.poll()
    assert wc.status == WcStatus.REM_ACCESS_ERR


def test_bad_geometry_and_buffers_are_refused_alike():
    """A ring smaller than the device's geometry (a device's bad answer) or
    a buffer poll_into cannot write is an error on both paths, never a
    write outside the memory."""
    for cr_cls, wq_cls in ((_fast.CompletionRing, _fast.WorkQueues), (PyCompletionRing, PyWorkQueues)):
        with pytest.raises(ValueError, match="CQ size 3 must be a power of two"):
            cr_cls(bytearray(4 * 32), bytearray(8), 3, WC, _accel_wc)
        with pytest.raises(ValueError, match="the CQ ring of 96 bytes is smaller"):
            cr_cls(bytearray(3 * 32), bytearray(8), 4, WC, _accel_wc)
        with pytest.raises(ValueError, match="the send queue of 1024 bytes is smaller"):
            wq_cls(1, bytearray(1024), bytearray(1024), bytearray(8), 8, 8, 256, 32, 4, 1, False, _translate)
        with pytest.raises(ValueError, match="must be powers of two"):
            wq_cls(1, bytearray(1024), bytearray(1024), bytearray(8), 3, 8, 64, 32, 0, 1, False, _translate)
        cr = cr_cls(bytearray(4 * 32), bytearray(8), 4, WC, _accel_wc)
        for out in (np.zeros(8, WC_DTYPE)[::2], bytes(64)):
            with pytest.raises(BufferError, match="writable, C-contiguous"):
                cr.poll_into(out, {}, {})


def test_a_device_cannot_push_rq_ci_past_what_was_posted():
    geo = dict(sq_depth=4, rq_depth=4, sq_slot=64, rq_slot=32, cqe=16, sig_all=False, max_send_sge=0,
               max_recv_sge=1)
    for native in (True, False):
        s = Side(native, geo)
        s.wq.post_recv(RecvWR(1))
        for _ in range(3):  # one receive posted, three receive completions
            s._cqe(wire.Completion(1, 0, WcOpcode.RECV, QPN, 0))
        assert len(s.cr.poll(8, s.qps, s.aqs)) == 3
        assert (s.wq.rq_pi, s.wq.rq_ci) == (1, 1)
        s.wq.post_recv([RecvWR(2)] * 4)  # the RQ is not wrongly full
