"""Two hosts' device cores joined by the RoCEv2 fabric, sans I/O.

Each host is a :class:`RoceFabric` with its own address; every packet is
encoded to the bytes a UDP socket would carry (ICRC for the real addresses)
and decoded and verified on the other side, through a channel that can lose,
duplicate and reorder datagrams. Guests are the test driver of
``tests/virtio_rdma/driver.py`` over real GuestMemory.
"""
from __future__ import annotations

import dataclasses
import random
import struct

import pytest

from roce.icrc import IpContext
from roce.packet import decode
from verbs import Access, QpState, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma import wire
from virtio_rdma.errors import FabricError
from fabric.roce import RoceFabric, address_of_gid, gid_of_address

from tests.virtio_rdma.driver import Guest

A_IP, B_IP = "192.0.2.1", "192.0.2.2"


class Wire:
    """Datagrams between the two fabrics, with seeded impairments."""

    def __init__(self, fabrics, loss=0.0, dup=0.0, reorder=0.0, seed=1):
        self.fabrics = {f.address: f for f in fabrics}
        self.queue: list[tuple[str, str, bytes]] = []
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.cut = False
        self.sent = 0
        for f in fabrics:
            f.sink = self._sink_for(f.address)

    def _sink_for(self, src):
        def sink(pkt, peer):
            self.sent += 1
            if self.cut or self.rng.random() < self.loss:
                return
            data = pkt.encode(IpContext(src, peer, sport=4791, dport=4791))
            self.queue.append((src, peer, data))
            if self.rng.random() < self.dup:
                self.queue.append((src, peer, data))
        return sink

    def deliver(self, now) -> int:
        n = 0
        while self.queue:
            if self.reorder and len(self.queue) > 1 and self.rng.random() < self.reorder:
                i = self.rng.randrange(1, len(self.queue))
                self.queue[0], self.queue[i] = self.queue[i], self.queue[0]
            src, dst, data = self.queue.pop(0)
            f = self.fabrics.get(dst)
            if f is None:
                continue
            pkt = decode(data, IpContext(src, dst, sport=4791, dport=4791))
            f.receive(pkt, src, now)
            n += 1
        return n


class Hosts:
    def __init__(self, **wire_kw):
        self.fa, self.fb = RoceFabric(A_IP), RoceFabric(B_IP)
        self.clock = [0.0]
        self.a = Guest(self.fa, size=24 << 20, clock=self.clock)
        self.b = Guest(self.fb, size=24 << 20, gpa=0x4000_0000, clock=self.clock)
        self.wire = Wire([self.fa, self.fb], **wire_kw)
        self.pa, self.pb = self.a.alloc_pd(), self.b.alloc_pd()
        self.ca, self.cb = self.a.create_cq(256), self.b.create_cq(256)
        self.qa = self.a.create_qp(self.pa, self.ca, max_send_wr=64, max_recv_wr=64)
        self.qb = self.b.create_qp(self.pb, self.cb, max_send_wr=64, max_recv_wr=64)

    def connect(self, psn_a=0, psn_b=0, **kw):
        """``psn_a``: first PSN a sends (b expects it); ``psn_b`` likewise."""
        self.a.connect(self.qa, self.qb.qpn, gid=self.fb.gid, sq_psn=psn_a, rq_psn=psn_b, **kw)
        self.b.connect(self.qb, self.qa.qpn, gid=self.fa.gid, sq_psn=psn_b, rq_psn=psn_a, **kw)

    def run(self, until=None, limit=20000, step=0.001):
        """Deliver packets and fire timers until ``until()`` holds (or quiet)."""
        for _ in range(limit):
            moved = self.wire.deliver(self.clock[0])
            if until is not None and until():
                return
            if not moved:
                ds = [d for d in (self.a.process().next_deadline, self.b.process().next_deadline)
                      if d is not None]
                if not ds:
                    if until is None:
                        return
                    raise AssertionError("stalled: nothing in flight, no timer, condition unmet")
                self.clock[0] = max(self.clock[0] + step / 10, min(ds))
                self.a.process()
                self.b.process()
        raise AssertionError("did not converge")


def _collect(g, cq, want, hosts):
    got = []

    def done():
        got.extend(g.poll(cq))
        return len(got) >= want
    hosts.run(done)
    return got


def test_gid_mapping():
    assert gid_of_address("192.0.2.7") == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert address_of_gid(gid_of_address("192.0.2.7")) == "192.0.2.7"
    assert address_of_gid(gid_of_address("2001:db8::1")) == "2001:db8::1"
    assert address_of_gid(bytes(16)) is None
    with pytest.raises(FabricError, match="0.0.0.0"):
        RoceFabric("0.0.0.0")
    with pytest.raises(FabricError, match="not an IP"):
        RoceFabric("host-a")


def test_query_gid_is_the_hosts_ipv4_mapped_address():
    h = Hosts()
    from virtio_rdma.constants import Cmd
    assert h.a.cmd(Cmd.QUERY_GID, port_num=1, index=0)["gid"] == gid_of_address(A_IP)


@pytest.mark.parametrize("mtu_code,size", [(3, 1), (3, 1024), (3, 5000), (5, 4096), (5, 200_000),
                                           (1, 3000)])
def test_send_across_hosts(mtu_code, size):
    h = Hosts()
    h.connect(psn_a=0xFFFFF0, psn_b=0x123, path_mtu=mtu_code)  # a's PSNs wrap mid-message
    src = h.a.reg_mr(h.pa, size)
    dst = h.b.reg_mr(h.pb, size + 64)
    payload = random.Random(size).randbytes(size)
    h.a.write(src.gpa, payload)
    h.b.post_recv(h.qb, 7, [(dst, 0, size + 64)])
    h.a.post_send(h.qa, 9, WrOpcode.SEND_WITH_IMM, [(src, 0, size)], imm_data=0x11223344)
    (rc,) = _collect(h.b, h.cb, 1, h)
    assert (rc.status, rc.wr_id, rc.byte_len, rc.opcode) == (WcStatus.SUCCESS, 7, size, WcOpcode.RECV)
    assert rc.wc_flags & WcFlags.WITH_IMM and rc.imm_data == 0x11223344 and rc.src_qp == h.qa.qpn
    assert h.b.read(dst.gpa, size) == payload
    (sc,) = _collect(h.a, h.ca, 1, h)
    assert (sc.status, sc.wr_id, sc.opcode) == (WcStatus.SUCCESS, 9, WcOpcode.SEND)


def test_write_read_atomics_across_hosts():
    h = Hosts()
    h.connect()
    la, rb = h.a.reg_mr(h.pa, 1 << 16), h.b.reg_mr(h.pb, 1 << 16)
    data = bytes(range(256)) * 40
    h.a.write(la.gpa, data)
    h.a.post_send(h.qa, 1, WrOpcode.RDMA_WRITE, [(la, 0, len(data))], remote_addr=rb.addr + 8,
                  rkey=rb.rkey)
    h.b.write(rb.gpa + 20000, b"R" * 3000)
    h.a.post_send(h.qa, 2, WrOpcode.RDMA_READ, [(la, 30000, 3000)], remote_addr=rb.addr + 20000,
                  rkey=rb.rkey)
    h.b.write(rb.gpa + 40000, struct.pack("<Q", 5))
    h.a.post_send(h.qa, 3, WrOpcode.ATOMIC_FETCH_AND_ADD, [(la, 40000, 8)], remote_addr=rb.addr + 40000,
                  rkey=rb.rkey, compare_add=10)
    h.a.post_send(h.qa, 4, WrOpcode.ATOMIC_CMP_AND_SWP, [(la, 40008, 8)], remote_addr=rb.addr + 40000,
                  rkey=rb.rkey, compare_add=15, swap=99)
    cs = _collect(h.a, h.ca, 4, h)
    assert [(c.wr_id, c.status) for c in cs] == [(i, WcStatus.SUCCESS) for i in (1, 2, 3, 4)]
    assert [c.opcode for c in cs] == [WcOpcode.RDMA_WRITE, WcOpcode.RDMA_READ, WcOpcode.FETCH_ADD,
                                      WcOpcode.COMP_SWAP]
    assert h.b.read(rb.gpa + 8, len(data)) == data
    assert h.a.read(la.gpa + 30000, 3000) == b"R" * 3000
    assert struct.unpack("<QQ", h.a.read(la.gpa + 40000, 16)) == (5, 15)
    assert struct.unpack("<Q", h.b.read(rb.gpa + 40000, 8)) == (99,)


def test_unsignaled_wrs_complete_silently_and_retire_their_slots():
    h = Hosts()
    h.connect()
    la, rb = h.a.reg_mr(h.pa, 4096), h.b.reg_mr(h.pb, 4096)
    for i in range(100):  # > ring depth 64: slots must be retired by unsignaled completions
        flags = SendFlags.SIGNALED if i % 10 == 9 else SendFlags(0)
        h.a.post_send(h.qa, i, WrOpcode.RDMA_WRITE, [(la, 0, 64)], remote_addr=rb.addr, rkey=rb.rkey,
                      flags=flags)
        if i % 10 == 9:
            (c,) = _collect(h.a, h.ca, 1, h)
            assert (c.wr_id, c.status) == (i, WcStatus.SUCCESS)


@pytest.mark.parametrize("loss,dup,reorder", [(0.05, 0, 0), (0, 0.1, 0), (0, 0, 0.3), (0.03, 0.05, 0.2)])
def test_impaired_wire_delivers_everything_once_in_order(loss, dup, reorder):
    h = Hosts(loss=loss, dup=dup, reorder=reorder, seed=int(loss * 100 + dup * 10 + reorder * 1000))
    h.connect(path_mtu=3, timeout=8)
    n, size = 12, 6000
    src, dst = h.a.reg_mr(h.pa, n * size), h.b.reg_mr(h.pb, n * size)
    rng = random.Random(5)
    msgs = [rng.randbytes(size) for _ in range(n)]
    for i, m in enumerate(msgs):
        h.a.write(src.gpa + i * size, m)
        h.b.post_recv(h.qb, 100 + i, [(dst, i * size, size)])
    for i in range(n):
        h.a.post_send(h.qa, i, WrOpcode.SEND, [(src, i * size, size)])
    rcs = _collect(h.b, h.cb, n, h)
    assert [(c.wr_id, c.status, c.byte_len) for c in rcs] == [(100 + i, WcStatus.SUCCESS, size)
                                                               for i in range(n)]
    for i, m in enumerate(msgs):
        assert h.b.read(dst.gpa + i * size, size) == m
    scs = _collect(h.a, h.ca, n, h)
    assert [c.wr_id for c in scs] == list(range(n)) and all(c.status == 0 for c in scs)
    assert not h.b.poll(h.cb)  # exactly once


def test_wrong_rkey_gives_remote_access_error_and_writes_nothing():
    h = Hosts()
    h.connect()
    la, rb = h.a.reg_mr(h.pa, 4096), h.b.reg_mr(h.pb, 4096, access=Access.LOCAL_WRITE)
    h.a.write(la.gpa, b"x" * 4096)
    h.a.post_send(h.qa, 1, WrOpcode.RDMA_WRITE, [(la, 0, 100)], remote_addr=rb.addr, rkey=rb.rkey)
    (c,) = _collect(h.a, h.ca, 1, h)
    assert c.status == WcStatus.REM_ACCESS_ERR
    assert h.b.read(rb.gpa, 4096) == bytes(4096)
    assert h.a.core.qps[h.qa.qpn].state is QpState.ERR
    assert h.fb.wire[h.qb.qpn].rc.metrics.remote_access_naks == 1


def test_rnr_retry_exceeded_when_no_receive_is_posted():
    h = Hosts()
    h.connect(rnr_retry=2, min_rnr_timer=1)
    la = h.a.reg_mr(h.pa, 4096)
    h.a.post_send(h.qa, 5, WrOpcode.SEND, [(la, 0, 10)])
    (c,) = _collect(h.a, h.ca, 1, h)
    assert (c.wr_id, c.status) == (5, WcStatus.RNR_RETRY_EXC_ERR)


def test_vanished_peer_gives_retry_exceeded_then_flush():
    h = Hosts()
    h.connect(timeout=10, retry_cnt=3)
    la = h.a.reg_mr(h.pa, 4096)
    h.wire.cut = True
    h.a.post_send(h.qa, 1, WrOpcode.RDMA_WRITE, [(la, 0, 10)], remote_addr=0, rkey=1)
    h.a.post_send(h.qa, 2, WrOpcode.RDMA_WRITE, [(la, 0, 10)], remote_addr=0, rkey=1)
    cs = _collect(h.a, h.ca, 2, h)
    assert [(c.wr_id, c.status) for c in cs] == [(1, WcStatus.RETRY_EXC_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert h.clock[0] > 3 * 4.096e-6 * (1 << 10)


def test_packets_from_strangers_are_dropped_and_counted():
    h = Hosts()
    h.connect()
    rb = h.b.reg_mr(h.pb, 4096)
    from roce.headers import Bth, Reth
    from roce.opcodes import Opcode
    from roce.packet import RocePacket
    pkt = RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=h.qb.qpn, psn=0, ackreq=True),
                     reth=Reth(rb.addr, rb.rkey, 4), payload=b"evil")
    h.fb.receive(pkt, "192.0.2.99", 0.0)           # right QPN, wrong source address
    assert h.fb.metrics.rx_addr_mismatch == 1
    pkt.bth = dataclasses.replace(pkt.bth, dest_qp=0xABCDE)
    h.fb.receive(pkt, A_IP, 0.0)                   # unknown QPN
    assert h.fb.metrics.rx_unknown_qpn == 1
    assert h.b.read(rb.gpa, 4) == bytes(4)


def test_destroy_detaches_the_wire_qp():
    h = Hosts()
    h.connect()
    assert h.qa.qpn in h.fa.wire
    from virtio_rdma.constants import Cmd
    h.a.cmd(Cmd.DESTROY_QP, qpn=h.qa.qpn)
    assert h.qa.qpn not in h.fa.wire


def test_guest_moves_qp_to_err_flushes_posted_work():
    h = Hosts()
    h.connect()
    la = h.a.reg_mr(h.pa, 4096)
    h.wire.cut = True
    h.a.post_send(h.qa, 1, WrOpcode.SEND, [(la, 0, 10)])
    h.a.post_recv(h.qa, 2, [(la, 0, 10)])
    from verbs import QpAttrMask as M
    assert h.a.modify(h.qa, M.STATE, qp_state=QpState.ERR) == 0
    got = h.a.poll(h.ca)
    assert sorted((c.wr_id, c.status) for c in got) == [(1, WcStatus.WR_FLUSH_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert h.a.process().next_deadline is None


def test_local_key_and_length_errors_on_a_wire_qp():
    """The wire engine applies the same WQE checks as the message path (rings.check_wqe)."""
    h = Hosts()
    h.connect()
    la = h.a.reg_mr(h.pa, 4096)
    h.wire.cut = True
    h.a.post_send(h.qa, 1, WrOpcode.SEND, [(la, 0, 10)])                     # posted, in the engine
    h.a.post_send(h.qa, 2, WrOpcode.SEND, [(la.addr, 10, la.lkey ^ 0x100)])  # bad lkey
    h.a.post_send(h.qa, 3, WrOpcode.SEND, [(la, 0, 10)])
    got = h.a.poll(h.ca)
    assert [(c.wr_id, c.status) for c in got] == [(1, WcStatus.WR_FLUSH_ERR), (2, WcStatus.LOC_PROT_ERR),
                                                  (3, WcStatus.WR_FLUSH_ERR)]
    assert h.a.core.metrics.local_prot_errors == 1
    assert h.a.core.qps[h.qa.qpn].state is QpState.ERR



@pytest.mark.parametrize("byte,value", [(8, 0x77), (9, 0x80)], ids=["opcode", "send_flags"])
def test_unknown_verbs_numbers_in_a_send_wqe_fail_it_on_a_wire_qp(byte, value):
    """A WQE opcode or send flag that is no verbs number (verbs.UnknownValueError,
    which is not a VirtioRdmaError) fails that WQE with LOC_QP_OP_ERR and is
    counted, as a malformed WQE is on the local path."""
    h = Hosts()
    h.connect()
    la = h.a.reg_mr(h.pa, 4096)
    raw = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, int(SendFlags.SIGNALED), sges=[(la.addr, 8, la.lkey)],
                                         slot_size=1 << h.qa.layout.sq_wqe_shift))
    raw[byte] = value
    h.a.post_send(h.qa, 1, WrOpcode.SEND, raw=bytes(raw))
    assert [(c.wr_id, c.status) for c in h.a.poll(h.ca)] == [(1, WcStatus.LOC_QP_OP_ERR)]
    assert h.a.core.metrics.bad_wqes == 1

def test_receives_posted_before_a_send_reach_the_engine_after_the_send():
    """Receives posted with a send go to the engine once the send is on the
    wire (off the round trip); a bad one is left for the arrival that needs
    it, which fails it as before."""
    h = Hosts()
    h.connect()
    la = h.a.reg_mr(h.pa, 4096)
    nqp = h.fa.wire[h.qa.qpn]
    h.a.post_recv(h.qa, 1, [(la, 0, 64)])
    assert len(nqp.rc.responder.rq) == 0                 # nothing yet: the RQ doorbell alone
    h.a.post_send(h.qa, 2, WrOpcode.SEND, [(la, 64, 8)])
    assert len(nqp.rc.responder.rq) == 1 and h.wire.queue  # the send left, then the receive went in
    h.a.post_recv(h.qa, 3, [(la.addr, 64, la.lkey ^ 0x100)])  # bad lkey
    h.a.post_recv(h.qa, 4, [(la, 0, 64)])
    h.a.post_send(h.qa, 5, WrOpcode.SEND, [(la, 64, 8)])
    assert len(nqp.rc.responder.rq) == 1                 # stopped at the bad one, no error yet
    assert h.a.core.qps[h.qa.qpn].state is QpState.RTS and h.a.core.metrics.bad_wqes == 0
    rb = h.b.reg_mr(h.pb, 4096)
    h.b.post_recv(h.qb, 6, [(rb, 0, 64)])
    h.b.post_recv(h.qb, 7, [(rb, 0, 64)])
    h.b.post_send(h.qb, 8, WrOpcode.SEND, [(rb, 0, 8)])  # a's arrival pass meets the bad WQE
    h.run(lambda: h.a.core.metrics.bad_wqes)
    assert h.a.core.metrics.bad_wqes == 1 and h.a.core.qps[h.qa.qpn].state is QpState.ERR
