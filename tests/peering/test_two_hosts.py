"""Accelerator jobs shipped between two daemons' routers over the userspace
RoCEv2 fabric, sans I/O.

Host A and host B are each a :class:`RoceFabric`, an
:class:`AccelRouter` and a :class:`peering.service.Peering`; every packet
between them is encoded to the bytes a UDP socket carries and decoded on the
other side, through a channel that can lose, duplicate and reorder
datagrams (tests/fabric/test_roce_fabric.Wire). Guests are the in-process
driver (tests/virtio_rdma/driver.py) over real GuestMemory; B's jobs run on
a real AcceleratorService (worker threads). Results are compared with
accel_core called directly.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import accel_core
from accel_core import AcceleratorService, AcceleratorSpec
from fabric.roce import RoceFabric
from peering.link import LinkConfig, LinkState
from peering.service import PeerConfigError, Peering, check_peers, read_cluster_file
from peering.wire import (
    JOB_SIZE,
    ConnectMsg,
    ConnectType,
    GoMsg,
    GrantMsg,
    JobMsg,
    OpInfo,
    ResultMsg,
    decode_link,
)
from tests.fabric.test_roce_fabric import Wire
from tests.virtio_rdma.driver import DriverError, Guest
from verbs import Access
from virtio_rdma import wire
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import AccelDtype, AccelEarlyStop, AccelOp, AccelStatus, AqFlags, Cmd, Status

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
C64 = np.dtype(np.complex64)
FAST = LinkConfig(timeout=10, keepalive=0.05, connect_interval=0.02)  # 4 ms ACK timeout


def _service(slowdown: float = 1.0):
    return AcceleratorService([
        AcceleratorSpec("fft", ops=frozenset({accel_core.Op.FFT, accel_core.Op.IFFT}), slowdown=slowdown),
        AcceleratorSpec("turbo", ops=frozenset({accel_core.Op.TURBO_ENCODE, accel_core.Op.TURBO_DECODE}),
                        slowdown=slowdown)])


class Harness:
    """What a test does with in-process hosts: ``step()`` them until a condition
    holds, and drive the guest ``g`` (its PD ``pd``, its CQ ``cq``)."""

    g: Guest
    pd: int
    cq: Any

    def step(self) -> None:
        raise NotImplementedError

    def run(self, until, timeout=20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "did not converge"
            self.step()
            time.sleep(0.0002)

    def mr(self, data: bytes | int, access=Access.LOCAL_WRITE):
        n = data if isinstance(data, int) else len(data)
        buf = self.g.reg_mr(self.pd, n, access=access)
        if not isinstance(data, int):
            self.g.write(buf.gpa, data)
        return buf

    def cqes(self, n: int, timeout=20.0):
        got: list = []
        self.run(lambda: got.extend(self.g.poll(self.cq)) or len(got) >= n, timeout)
        assert len(got) == n, got
        return [wire.decode_accel_cqe(c) for c in got]


class Cluster(Harness):
    """A (no accelerators unless ``a_local``) and B (FFT and Turbo), linked."""

    def __init__(self, *, a_local=False, config=FAST, credits=64, b_slowdown=1.0, job_timeout=30.0, **wire_kw):
        self.fa, self.fb = RoceFabric(A_IP), RoceFabric(B_IP)
        self.wire = Wire([self.fa, self.fb], **wire_kw)
        self.ra = AccelRouter(_service() if a_local else None)
        self.rb = AccelRouter(_service(b_slowdown))
        self.pa = Peering(self.fa, self.ra, [B_IP], config=config, credits=credits, job_timeout=job_timeout)
        self.pb = Peering(self.fb, self.rb, [A_IP], config=config, credits=credits)
        self.b_up = True
        self.pa.start()
        self.pb.start()
        self.run(lambda: self.link_a.state is LinkState.UP and self.link_b.state is LinkState.UP)
        self.g = Guest(self.fa, size=32 << 20, accel=self.ra)
        self.pd = self.g.alloc_pd()
        self.cq = self.g.create_cq(1024)

    @property
    def link_a(self):
        return self.pa.targets[B_IP].link

    @property
    def link_b(self):
        return self.pb.targets[A_IP].link

    def step(self) -> None:
        now = time.monotonic()
        self.wire.deliver(now)
        for r in (self.ra, self.rb) if self.b_up else (self.ra,):
            r.deliver()
        for p in (self.pa, self.pb) if self.b_up else (self.pa,):
            d = p.next_deadline()
            if d is not None and d <= now:
                p.on_timer(now)

    def kill_b(self) -> None:
        """B's daemon vanishes: its packets stop and nothing reaches it."""
        self.b_up = False
        self.fb.sink = None                   # nothing more leaves B ...
        self.wire.fabrics.pop(B_IP)           # ... or reaches it
        self.wire.queue = [q for q in self.wire.queue if q[0] != B_IP]

    def close(self) -> None:
        self.pa.close()
        self.pb.close()
        self.ra.close()
        self.rb.close()



@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def _fft_job(c: Cluster, aq, wr_id: int, x: np.ndarray, canary=16):
    src = c.mr(x.tobytes())
    dst = c.mr(bytes([0xAB]) * (x.nbytes + 2 * canary))
    c.g.post_aq_job(aq, wr_id, c.g.core.aqs[aq.aqn].op, size=x.shape[-1], batch=x.shape[0],
                    dtype=AccelDtype.COMPLEX64 if x.dtype == C64 else AccelDtype.COMPLEX128,
                    inputs=[(src.addr, x.nbytes, src.lkey)], outputs=[(dst.addr + canary, x.nbytes, dst.lkey)])
    return dst



def _out(c: Cluster, dst, n: int, canary=16) -> bytes:
    whole = c.g.read(dst.gpa, n + 2 * canary)
    assert whole[:canary] == bytes([0xAB]) * canary and whole[-canary:] == bytes([0xAB]) * canary
    return whole[canary:canary + n]


# ----------------------------------------------------------------------------- codecs
def test_connect_and_link_messages_round_trip():
    m = ConnectMsg(ConnectType.REQ, 2**63 + 5, 0, 3, 0x123456, 0xABCDE, 64, 1024,
                   (OpInfo(AccelOp.FFT, 1, 5000, 30), OpInfo(AccelOp.TURBO_DECODE, 2)))
    assert ConnectMsg.decode(m.encode()) == m
    j = JobMsg(7, AccelOp.TURBO_DECODE, AccelDtype.COMPLEX64, 6144, 2, 8, AccelEarlyStop.CRC24B, 0.75, 3,
               100, 0, 0xBEEF, 200)
    assert decode_link(j.encode()) == j and len(j.encode()) == JOB_SIZE
    assert decode_link(GrantMsg(7, 0xFEED).encode()) == GrantMsg(7, 0xFEED)
    assert decode_link(GoMsg(2**64 - 1).encode()) == GoMsg(2**64 - 1)
    r = ResultMsg(7, AccelStatus.SUCCESS, 200, 3, 4000, 6)
    assert decode_link(r.encode()) == r


@pytest.mark.parametrize("mutate", ["type", "op", "len", "reserved", "scaling", "status"])
def test_malformed_link_messages_raise_naming_the_field(mutate):
    from peering.wire import PeerWireError

    j = bytearray(JobMsg(1, AccelOp.FFT, AccelDtype.COMPLEX64, 64, 1, 0, AccelEarlyStop.NONE, None, 0,
                         512, 0, 2, 512).encode())
    r = bytearray(ResultMsg(1, AccelStatus.SUCCESS).encode())
    data = {"type": lambda: bytes([9]) + j[1:], "op": lambda: j[:1] + bytes([99]) + j[2:],
            "len": lambda: j[:-1], "reserved": lambda: j[:7] + b"\x01" + j[8:],
            "scaling": lambda: j[:6] + b"\x00" + j[7:24] + np.float32(np.inf).tobytes() + j[28:],
            "status": lambda: r[:1] + bytes([200]) + r[2:]}[mutate]()
    with pytest.raises(PeerWireError):
        decode_link(bytes(data))


def test_peer_lists_and_cluster_files(tmp_path):
    f = tmp_path / "cluster"
    f.write_text(f"# hosts\n{A_IP}\n\n{B_IP}  # b\n192.0.2.3\n")
    assert read_cluster_file(f, A_IP) == [B_IP, "192.0.2.3"]
    for bad in ([A_IP], [B_IP, B_IP], ["nope"], ["2001:db8::1"]):
        with pytest.raises(PeerConfigError):
            check_peers(bad, A_IP)
    f.write_text("192.0.2.300\n")
    with pytest.raises(PeerConfigError, match="300"):
        read_cluster_file(f, A_IP)


# ----------------------------------------------------------------------------- jobs
def test_links_come_up_and_query_accel_counts_the_peer(cluster):
    c = cluster
    assert c.link_a.active and not c.link_b.active
    assert c.link_a.peer_credits == 64 and c.link_a.peer_ops[int(AccelOp.FFT)].units == 1
    assert not c.link_b.peer_ops  # A has no accelerators: it advertises none
    infos = {i.op: i for i in c.ra.ops_info()}
    assert infos[AccelOp.FFT].local_units == 0 and infos[AccelOp.FFT].reachable_hosts == 1
    assert {i.op: i.reachable_hosts for i in c.rb.ops_info()}[AccelOp.FFT] == 1  # B: itself only


@pytest.mark.parametrize("n,batch", [(2048, 16), (1536, 2), (60, 3)])
@pytest.mark.parametrize("op", [AccelOp.FFT, AccelOp.IFFT])
def test_fft_runs_on_the_peer_byte_exact(cluster, op, n, batch):
    c = cluster
    aq = c.g.create_aq(c.pd, c.cq, op)
    x = (np.random.default_rng(n).standard_normal((batch, n)) * (1 + 1j)).astype(C64)
    dst = _fft_job(c, aq, 5, x)
    (cq,) = c.cqes(1)
    assert cq.status is AccelStatus.SUCCESS and cq.host == 1 and cq.byte_len == x.nbytes
    want = (accel_core.fft if op is AccelOp.FFT else accel_core.ifft)(x)
    assert _out(c, dst, x.nbytes) == want.tobytes()  # the same kernels: byte-exact
    t = c.pa.targets[B_IP]
    assert t.metrics.jobs_sent == 1 and t.metrics.jobs_done == 1 and not t.sent and not len(c.link_a.table)
    tb = c.pb.targets[A_IP]
    assert tb.metrics.jobs_served == 1 and tb.metrics.jobs_landed == 1 and tb.staging == 0
    assert sorted(t.free_slots) == list(range(16))  # the landing slot came back with the result


def test_an_input_larger_than_a_landing_slot_waits_for_a_grant(cluster):
    c = cluster
    aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
    x = _c64_batch(3, 65536, 5)                 # 1.5 MiB: more than a 1 MiB slot
    small = _c64_batch(1, 64, 6)
    d_big, d_small = _fft_job(c, aq, 1, x), _fft_job(c, aq, 2, small)
    q = c.cqes(2)
    assert [w.status for w in q] == [AccelStatus.SUCCESS] * 2
    assert _out(c, d_big, x.nbytes) == accel_core.fft(x).tobytes()
    assert _out(c, d_small, small.nbytes) == accel_core.fft(small).tobytes()
    m = c.pb.targets[A_IP].metrics
    assert m.jobs_granted == 1 and m.jobs_landed == 1 and c.pb.targets[A_IP].staging == 0


@pytest.mark.parametrize("slot", [16, "busy"])
def test_a_job_naming_a_bad_landing_slot_fails_the_link(cluster, slot):
    c = cluster
    tb = c.pb.targets[A_IP]
    if slot == "busy":  # B is given a job in slot 0 and, while it runs, another naming slot 0
        tb._busy_slots.add(0)
        slot = 0
    c.link_a.send(77 << 3, JobMsg(77, AccelOp.FFT, AccelDtype.COMPLEX64, 64, 1, 0, AccelEarlyStop.NONE, None, 0,
                                  512, 0, 2, 512, slot).encode())
    c.link_a.kick(time.monotonic())
    c.run(lambda: tb.metrics.bad_messages == 1)
    c.run(lambda: c.link_a.state is LinkState.UP and c.link_b.state is LinkState.UP)  # made again
    assert c.link_b.metrics.failures == 1


def _c64_batch(b: int, n: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.standard_normal((b, n)) + 1j * r.standard_normal((b, n))).astype(C64)


@pytest.mark.parametrize("K,B", [(40, 1), (1024, 3), (6144, 1)])
def test_turbo_runs_on_the_peer_bit_exact(cluster, K, B):
    c = cluster
    rng = np.random.default_rng(K)
    bits = rng.integers(0, 2, (B, K), dtype=np.uint8)
    enc_aq = c.g.create_aq(c.pd, c.cq, AccelOp.TURBO_ENCODE)
    src = c.mr(bits.tobytes())
    n_enc = B * 3 * (K + 4)
    dst = c.mr(n_enc)
    c.g.post_aq_job(enc_aq, 1, AccelOp.TURBO_ENCODE, size=K, batch=B, dtype=0,
                    inputs=[(src.addr, bits.nbytes, src.lkey)], outputs=[(dst.addr, n_enc, dst.lkey)])
    (e,) = c.cqes(1)
    enc = accel_core.turbo_encode(bits)
    assert e.status is AccelStatus.SUCCESS and e.host == 1 and c.g.read(dst.gpa, n_enc) == enc.tobytes()
    llr = ((1 - 2 * enc.astype(np.float32)) * 2.0 + rng.standard_normal(enc.shape) * 0.8).astype(np.float32)
    dec_aq = c.g.create_aq(c.pd, c.cq, AccelOp.TURBO_DECODE)
    lsrc = c.mr(llr.tobytes())
    ldst = c.mr(B * K + B)
    c.g.post_aq_job(dec_aq, 2, AccelOp.TURBO_DECODE, size=K, batch=B, iterations=6, scaling=0.75,
                    inputs=[(lsrc.addr, llr.nbytes, lsrc.lkey)], outputs=[(ldst.addr, B * K + B, ldst.lkey)])
    (d,) = c.cqes(1)
    want_bits, want_used = accel_core.turbo_decode(llr, iterations=6, scaling=0.75)
    out = c.g.read(ldst.gpa, B * K + B)
    assert d.status is AccelStatus.SUCCESS and out[:B * K] == want_bits.tobytes()
    assert list(out[B * K:]) == [int(u) for u in want_used] and d.iterations == int(np.max(want_used))


def test_scattered_guest_buffers_are_read_and_written_in_place_remotely(cluster):
    c = cluster
    n, B = 256, 2
    x = (np.arange(B * n) * (1 - 0.25j)).astype(C64)
    raw = x.tobytes()
    s1, s2 = c.mr(raw[:1000]), c.mr(raw[1000:])
    d1, d2 = c.mr(1501), c.mr(len(raw) - 1500)
    aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
    c.g.post_aq_job(aq, 3, AccelOp.FFT, size=n, batch=B, inputs=[(s1.addr, 1000, s1.lkey),
                    (s2.addr, len(raw) - 1000, s2.lkey)],
                    outputs=[(d1.addr + 1, 1500, d1.lkey), (d2.addr, len(raw) - 1500, d2.lkey)])
    (cq,) = c.cqes(1)
    assert cq.status is AccelStatus.SUCCESS
    got = c.g.read(d1.gpa + 1, 1500) + c.g.read(d2.gpa, len(raw) - 1500)
    assert got == accel_core.fft(x.reshape(B, n)).tobytes()


@pytest.mark.parametrize("loss,reorder", [(0.03, 0.0), (0.03, 0.05)])
def test_many_jobs_under_loss_and_reordering_complete_once_in_order(loss, reorder):
    # the default ACK timeout (67 ms): this loop's steps take a few ms, so a shorter one fires early
    c = Cluster(loss=loss, reorder=reorder, dup=0.01, credits=8,
                config=LinkConfig(keepalive=0.05, connect_interval=0.02))
    try:
        aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, depth=64)
        rng = np.random.default_rng(3)
        xs, dsts = [], []
        for i in range(40):
            x = (rng.standard_normal((2, 1024)) + 1j).astype(C64)
            xs.append(x)
            dsts.append(_fft_job(c, aq, 100 + i, x))
        cqes = c.cqes(40, timeout=60)
        assert [q.wr_id for q in cqes] == [100 + i for i in range(40)]
        assert all(q.status is AccelStatus.SUCCESS and q.host == 1 for q in cqes)
        for x, d in zip(xs, dsts):
            assert _out(c, d, x.nbytes) == accel_core.fft(x).tobytes()
        t = c.pa.targets[B_IP]
        assert t.metrics.jobs_backlogged > 0  # 40 jobs, 8 credits: the remote queue held them
        assert t.metrics.jobs_done == 40 and not t.metrics.results_dropped
        assert c.link_a.rc.metrics.retransmitted_packets > 0 or c.link_b.rc.metrics.retransmitted_packets > 0
    finally:
        c.close()


def test_force_target_and_the_local_rule():
    c = Cluster(a_local=True)
    try:
        x = (np.ones((1, 64)) * (2 + 1j)).astype(C64)
        local_aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
        _fft_job(c, local_aq, 1, x)
        forced = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, flags=AqFlags.FORCE_TARGET, target_host=1)
        _fft_job(c, forced, 2, x)
        here = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, flags=AqFlags.FORCE_TARGET, target_host=0)
        _fft_job(c, here, 3, x)
        got = {q.wr_id: q.host for q in c.cqes(3)}
        assert got == {1: 0, 2: 1, 3: 0}  # this host has FFT: local unless forced elsewhere
        with pytest.raises(DriverError) as e:
            c.g.create_aq(c.pd, c.cq, AccelOp.FFT, flags=AqFlags.FORCE_TARGET, target_host=2)
        assert e.value.status is Status.EINVAL
    finally:
        c.close()


def test_remote_refusals_and_bad_parameters(cluster):
    c = cluster
    aq = c.g.create_aq(c.pd, c.cq, AccelOp.TURBO_ENCODE)
    bits = np.full((1, 40), 2, dtype=np.uint8)  # not bits: the peer's kernel refuses the values
    src, dst = c.mr(bits.tobytes()), c.mr(bytes(3 * 44))
    c.g.post_aq_job(aq, 9, AccelOp.TURBO_ENCODE, size=40, dtype=0, inputs=[(src.addr, 40, src.lkey)],
                    outputs=[(dst.addr, 3 * 44, dst.lkey)])
    (q,) = c.cqes(1)
    assert q.status is AccelStatus.INVALID_PARAMS and c.g.read(dst.gpa, 3 * 44) == bytes(3 * 44)
    # a peer job whose lengths do not match its parameters is refused by the server's own checks
    tb = c.pb.targets[A_IP]
    before = tb.metrics.jobs_invalid
    c.link_a.send(999 << 3, JobMsg(999, AccelOp.FFT, AccelDtype.COMPLEX64, 64, 1, 0, AccelEarlyStop.NONE,
                                   None, 0, 100, 0, 2, 512).encode())
    c.link_a.kick(time.monotonic())
    c.run(lambda: tb.metrics.jobs_invalid == before + 1)
    c.run(lambda: c.pa.targets[B_IP].metrics.results_dropped == 1)  # no such job at A: dropped
    assert c.link_a.state is LinkState.UP


def test_a_peer_touching_memory_outside_its_windows_fails_only_the_link(cluster):
    c = cluster
    secret = c.mr(b"s" * 4096, access=Access.LOCAL_WRITE | Access.REMOTE_READ | Access.REMOTE_WRITE)
    lb = c.link_b
    # B (hostile) READs with the guest's own rkey: the only window a link READs is the counters
    into = memoryview(bytearray(64))
    lb.read(5 << 3, into, secret.lkey, secret.addr)
    lb.kick(time.monotonic())
    c.run(lambda: c.link_a.metrics.window_faults == 1 and lb.state is not LinkState.UP)
    assert bytes(into) == bytes(64)
    c.run(lambda: c.link_a.state is LinkState.UP and lb.state is LinkState.UP)  # A reconnects
    # ... and WRITEs with it: not a window of this link
    lb = c.link_b
    lb.write(6 << 3, [memoryview(b"x" * 64)], secret.lkey, secret.addr)
    lb.kick(time.monotonic())
    c.run(lambda: c.link_a.metrics.window_faults == 2 and lb.state is not LinkState.UP)
    assert c.g.read(secret.gpa, 4096) == b"s" * 4096
    c.run(lambda: c.link_a.state is LinkState.UP and c.link_b.state is LinkState.UP)  # again
    assert c.link_a.metrics.connects == 3
    # and jobs flow again
    aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
    x = (np.ones((1, 64)) * 1j).astype(C64)
    _fft_job(c, aq, 1, x)
    assert c.cqes(1)[0].status is AccelStatus.SUCCESS


@pytest.mark.parametrize("fallback", [False, True])
def test_peer_killed_mid_job_fails_or_falls_back_within_twice_the_retry_budget(fallback):
    c = Cluster(a_local=fallback, b_slowdown=50.0)  # B takes its time: it dies before answering
    try:
        flags = AqFlags.FORCE_TARGET | (AqFlags.LOCAL_FALLBACK if fallback else 0)
        aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, flags=flags, target_host=1)
        x = (np.random.default_rng(1).standard_normal((16, 2048)) + 0j).astype(C64)
        dsts = [_fft_job(c, aq, i, x) for i in range(3)]
        c.run(lambda: c.pb.targets[A_IP].served)
        assert len(c.pa.targets[B_IP].sent) == 3  # all three in B's hands when it dies
        c.kill_b()
        t0 = time.monotonic()
        cqes = c.cqes(3, timeout=10)
        waited = time.monotonic() - t0
        budget = FAST.retry_budget + FAST.keepalive
        assert waited < 2 * budget + 0.5, (waited, budget)
        if fallback:
            assert all(q.status is AccelStatus.SUCCESS and q.host == 0 for q in cqes)
            for d in dsts:
                assert _out(c, d, x.nbytes) == accel_core.fft(x).tobytes()
            assert c.g.core.aqs[aq.aqn].metrics.fallbacks == 3
        else:
            assert [q.status for q in cqes] == [AccelStatus.REMOTE_FAILED] * 3
            for d in dsts:
                assert _out(c, d, x.nbytes) == bytes([0xAB]) * x.nbytes  # nothing written
        assert c.link_a.state is not LinkState.UP
        # a late packet from the dead peer's jobs could never be delivered twice: the tags are gone
        assert not c.pa.targets[B_IP].sent
    finally:
        c.close()


def test_cancel_destroy_and_device_reset_with_jobs_on_the_peer():
    c = Cluster(b_slowdown=20.0)  # B slow enough that jobs are seen in its hands
    try:
        _cancel_destroy_reset(c)
    finally:
        c.close()


def _cancel_destroy_reset(c: Cluster) -> None:
    t = c.pa.targets[B_IP]
    aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, depth=128)
    x = (np.ones((4, 2048)) * 1j).astype(C64)
    dsts = [_fft_job(c, aq, i, x) for i in range(70)]  # 64 credits: 6 wait in the remote queue
    assert len(t.backlog) == 6
    c.g.cmd(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=69)
    with pytest.raises(DriverError) as e:
        c.g.cmd(Cmd.CANCEL_AQ_JOB, aqn=aq.aqn, reserved=0, wr_id=0)  # sent: running on host 1
    assert e.value.status is Status.EBUSY
    c.g.cmd(Cmd.DESTROY_AQ, aqn=aq.aqn)
    cqes = c.cqes(70, timeout=60)
    by = {q.wr_id: q.status for q in cqes}
    assert by[69] is AccelStatus.CANCELLED
    assert [by[i] for i in range(64, 69)] == [AccelStatus.FLUSHED] * 5
    assert all(by[i] is AccelStatus.SUCCESS for i in range(64))
    assert _out(c, dsts[65], x.nbytes) == bytes([0xAB]) * x.nbytes
    # a device reset while jobs are on the peer: their windows turn into sinks, nothing is written
    aq2 = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
    d = _fft_job(c, aq2, 1, x)
    c.run(lambda: c.pb.targets[A_IP].served)
    assert t.sent  # on B when the device goes
    c.g.core.close()
    c.run(lambda: not t.sent)
    assert _out(c, d, x.nbytes) == bytes([0xAB]) * x.nbytes and not len(c.link_a.table)


def test_a_device_reset_in_the_middle_of_the_peers_output_write_stops_it_landing():
    """B's output WRITE is under way (its FIRST packet placed) when A's guest device is
    reset: the rest of that WRITE lands nowhere (the window and the WRITE already in
    progress are redirected to a sink), the link stays up, the job is never completed."""
    c = Cluster()
    try:
        aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
        x = _c64_batch(16, 2048, 8)                    # 256 KiB out: 256 packets at MTU 1024
        dst = _fft_job(c, aq, 1, x)
        first = 0x06                                  # RC RDMA WRITE FIRST
        while True:                                   # deliver until B's output WRITE starts at A
            c.step()
            q = c.wire.queue
            i = next((k for k, (src, _, data) in enumerate(q) if src == B_IP and data[0] == first), None)
            if i is not None:
                break
        head, rest = c.wire.queue[:i + 1], c.wire.queue[i + 1:]
        c.wire.queue = head
        c.wire.deliver(time.monotonic())              # ... up to and with its FIRST packet
        assert _out(c, dst, x.nbytes)[:1024] != b"\xab" * 1024   # the first MTU landed
        c.g.core.close()                              # the guest's device goes
        c.wire.queue = rest + c.wire.queue
        c.run(lambda: not c.pa.targets[B_IP].sent)    # B's result arrives and is dropped
        assert _out(c, dst, x.nbytes)[1024:] == b"\xab" * (x.nbytes - 1024)
        assert c.link_a.state is LinkState.UP and not c.g.poll(c.cq)
    finally:
        c.close()


def test_a_connect_message_offering_accelerators_without_credits_is_refused():
    from peering.wire import PeerWireError

    m = ConnectMsg(ConnectType.REP, 5, 1, 1, 0x1234, 7, 0, 1024, (OpInfo(AccelOp.FFT, 1),))
    with pytest.raises(PeerWireError, match="credits"):
        ConnectMsg.decode(m.encode())


def test_the_remote_queue_takes_guests_in_turn():
    """One credit on the link: guest 1 queues six jobs for the peer, then guest 2 one. The
    remote queue serves first the guest with the fewest jobs on the peer, then the one
    served longest ago, so guest 2's job goes second, not seventh (as a FIFO would send it)."""
    c = Cluster(credits=1)
    try:
        g2 = Guest(c.fa, size=8 << 20, gpa=0x6000_0000, accel=c.ra)
        pd2, cq2 = g2.alloc_pd(), g2.create_cq(64)
        x = _c64_batch(1, 64, 9)
        aq1 = c.g.create_aq(c.pd, c.cq, AccelOp.FFT)
        for i in range(6):
            _fft_job(c, aq1, i, x)
        aq2 = g2.create_aq(pd2, cq2, AccelOp.FFT)
        src = g2.reg_mr(pd2, x.nbytes)
        g2.write(src.gpa, x.tobytes())
        dst = g2.reg_mr(pd2, x.nbytes)
        g2.post_aq_job(aq2, 100, AccelOp.FFT, size=64, inputs=[(src.addr, x.nbytes, src.lkey)],
                       outputs=[(dst.addr, x.nbytes, dst.lkey)])
        t = c.pa.targets[B_IP]
        assert len(t.sent) == 1 and len(t.backlog) == 6
        order: list[tuple[int, int]] = []
        c.run(lambda: order.extend([(1, q.wr_id) for q in c.g.poll(c.cq)] + [(2, q.wr_id) for q in g2.poll(cq2)])
              or len(order) == 7)
        assert order.index((2, 100)) == 1, order  # right after guest 1's first job
        assert g2.read(dst.gpa, x.nbytes) == accel_core.fft(x).tobytes()
    finally:
        c.close()


@pytest.mark.parametrize("fallback", [False, True])
def test_a_peer_that_keeps_its_link_but_never_answers_a_job_times_it_out(fallback):
    """B is alive (its link answers) but its accelerator is 1000x slow: past the job timeout
    the job is given back (REMOTE_FAILED, or run here with LOCAL_FALLBACK); B's late result
    is dropped, its credit and slot come back then, nothing lands in the guest's buffer."""
    c = Cluster(a_local=fallback, b_slowdown=1000.0, job_timeout=0.05)
    try:
        flags = AqFlags.FORCE_TARGET | (AqFlags.LOCAL_FALLBACK if fallback else 0)
        aq = c.g.create_aq(c.pd, c.cq, AccelOp.FFT, flags=flags, target_host=1)
        x = _c64_batch(16, 2048, 10)                  # ~0.1 ms of work: ~0.1 s at 1000x
        dst = _fft_job(c, aq, 1, x)
        (q,) = c.cqes(1)
        t = c.pa.targets[B_IP]
        assert t.metrics.jobs_timed_out == 1 and len(t.sent) == 1  # still counted on B
        if fallback:
            assert q.status is AccelStatus.SUCCESS and q.host == 0
            assert _out(c, dst, x.nbytes) == accel_core.fft(x).tobytes()
        else:
            assert q.status is AccelStatus.REMOTE_FAILED
        before = _out(c, dst, x.nbytes)
        c.run(lambda: not t.sent, timeout=30)          # B's late result: dropped
        assert _out(c, dst, x.nbytes) == before and not c.g.poll(c.cq)
        assert sorted(t.free_slots) == list(range(16)) and c.link_a.state is LinkState.UP
    finally:
        c.close()
