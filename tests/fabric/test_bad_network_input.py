"""Bad input from the network, against the real daemon's RoCEv2 socket.

The daemon (in a thread, so its counters can be read) serves one guest whose
QP is connected to a "peer" that is only a UDP socket of this test on
another loopback address. The test sends hand-built datagrams: truncated, bad
ICRC, unknown QPN, wrong source, PSNs out of sequence, wrong rkey, RETH out
of the MR's bounds, oversized lengths. Each is dropped or NAKed as rxe does
and counted; the daemon keeps serving; guest memory outside what a valid
request may touch (canaries around the MR) is never written.
"""
from __future__ import annotations

import dataclasses
import select

import pytest

from guest_lib import MR, RecvWR, SGE
from guest_lib.endpoint import RcEndpoint
from roce.headers import Bth, Reth
from roce.icrc import IpContext
from roce.opcodes import Opcode
from roce.packet import RocePacket, decode
from roce.udp import make_socket
from vhost_user.testing import BackendThread
from virtio_rdma.device import RdmaDevice
from fabric.roce import RoceFabric, RoceFabricService, gid_of_address
from verbs import AethType, NakCode

HOST, PEER, STRANGER = "127.0.0.3", "127.0.0.4", "127.0.0.5"
PEER_QPN = 0x777
MR_LEN = 8192


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    fabric = RoceFabric(HOST)
    svc = RoceFabricService(fabric)
    path = str(tmp_path_factory.mktemp("bad") / "rdma.sock")
    with BackendThread(path, lambda info: RdmaDevice(fabric), services=[svc]) as bt:
        bt.fabric, bt.svc = fabric, svc
        yield bt


@pytest.fixture
def peer():
    s = make_socket(PEER)
    yield s
    s.close()


class Target:
    """A guest QP connected to the test's socket, with an MR between canaries."""

    def __init__(self, bt, rq_psn=100):
        self.ep = RcEndpoint(bt.path, buf_size=4096)
        self.guard_lo = MR(self.ep.pd, 4096, 0)
        self.mr = MR(self.ep.pd, MR_LEN, 0xF)
        self.guard_hi = MR(self.ep.pd, 4096, 0)
        for g in (self.guard_lo, self.guard_hi):
            g.write(b"\xa5" * 4096, 4096, 0)
        self.ep.connect(dict(qpn=PEER_QPN, gid=gid_of_address(PEER)), rq_psn=rq_psn, sq_psn=5,
                        path_mtu=3)
        self.ep.qp.post_recv(RecvWR(1, 1, [SGE(self.ep.mr.buf, 64, self.ep.mr.lkey)]))
        self.qpn = self.ep.qp.qp_num
        self.bt = bt

    def canaries_intact(self) -> bool:
        return all(g.read(4096, 0) == b"\xa5" * 4096 for g in (self.guard_lo, self.guard_hi))

    def rc_metrics(self):
        return self.bt.call(lambda: self.bt.fabric.wire[self.qpn].rc.metrics.as_dict())

    def close(self):
        self.ep.close()


@pytest.fixture
def target(daemon):
    t = Target(daemon)
    yield t
    t.close()


def send(sock, pkt: RocePacket, dst=HOST, src=PEER) -> None:
    sock.sendto(pkt.encode(IpContext(src, dst, sport=4791, dport=4791)), (dst, 4791))


def replies(sock, timeout=0.5) -> list[RocePacket]:
    out = []
    while select.select([sock], [], [], timeout)[0]:
        data, addr = sock.recvfrom(65536)
        out.append(decode(data, IpContext(addr[0], PEER, sport=addr[1], dport=4791),
                          recover_ipv4_id=True))
        timeout = 0.05
    return out


def write_only(qpn, psn, va, rkey, payload, dma_len=None):
    return RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=qpn, psn=psn, ackreq=True),
                      reth=Reth(va, rkey, len(payload) if dma_len is None else dma_len),
                      payload=payload)


def udp_metrics(daemon):
    return daemon.call(lambda: dataclasses.asdict(daemon.svc.endpoint.metrics))


def test_valid_write_is_acked_and_lands(daemon, target, peer):
    send(peer, write_only(target.qpn, 100, target.mr.buf, target.mr.rkey, b"hello"))
    (ack,) = replies(peer)
    assert ack.bth.opcode == Opcode.RC_ACKNOWLEDGE and ack.bth.psn == 100
    assert ack.aeth.type is AethType.ACK and ack.bth.dest_qp == PEER_QPN
    assert target.mr.read(5, 0) == b"hello" and target.canaries_intact()


def test_truncated_and_bad_icrc_are_dropped_and_counted(daemon, target, peer):
    before = udp_metrics(daemon)
    peer.sendto(b"\x0a\x00", (HOST, 4791))                       # 2 bytes: not even a BTH
    good = write_only(target.qpn, 100, target.mr.buf, target.mr.rkey, b"x" * 16)
    data = bytearray(good.encode(IpContext(PEER, HOST, sport=4791, dport=4791)))
    peer.sendto(bytes(data[:20]), (HOST, 4791))                  # RETH cut short
    data[-1] ^= 0xFF
    peer.sendto(bytes(data), (HOST, 4791))                       # ICRC wrong
    assert replies(peer, 0.3) == []
    after = udp_metrics(daemon)
    assert after["rx_malformed"] - before["rx_malformed"] == 2
    assert after["rx_icrc_errors"] - before["rx_icrc_errors"] == 1
    assert target.mr.read(16, 0) == bytes(16) and target.canaries_intact()


def test_unknown_qpn_and_wrong_source_are_dropped(daemon, target, peer):
    m0 = daemon.call(lambda: daemon.fabric.metrics.as_dict())
    send(peer, write_only(0xFEDCB, 100, target.mr.buf, target.mr.rkey, b"zz"))
    stranger = make_socket(STRANGER)
    try:
        send(stranger, write_only(target.qpn, 100, target.mr.buf, target.mr.rkey, b"zz"),
             src=STRANGER)
        assert replies(stranger, 0.2) == []
    finally:
        stranger.close()
    assert replies(peer, 0.2) == []
    m1 = daemon.call(lambda: daemon.fabric.metrics.as_dict())
    assert m1["rx_unknown_qpn"] - m0["rx_unknown_qpn"] == 1
    assert m1["rx_addr_mismatch"] - m0["rx_addr_mismatch"] == 1
    assert target.mr.read(2, 0) == bytes(2)


def test_psn_out_of_sequence_gets_one_nak_then_silence(daemon, target, peer):
    for psn in (105, 106, 107):                                  # ahead of the expected 100
        send(peer, write_only(target.qpn, psn, target.mr.buf, target.mr.rkey, b"ahead"))
    (nak,) = replies(peer)
    assert nak.aeth.type is AethType.NAK and nak.aeth.value == NakCode.PSN_SEQ_ERR
    assert nak.bth.psn == 100
    assert target.rc_metrics()["out_of_sequence"] == 3
    send(peer, write_only(target.qpn, 0x800100, target.mr.buf, target.mr.rkey, b"far"))  # 2^23 away
    assert target.mr.read(5, 0) == bytes(5)
    # duplicates (behind the expected PSN) are re-ACKed, not executed
    send(peer, write_only(target.qpn, 100, target.mr.buf, target.mr.rkey, b"first"))
    replies(peer)
    send(peer, write_only(target.qpn, 100, target.mr.buf, target.mr.rkey, b"again"))
    (ack,) = [p for p in replies(peer) if p.bth.opcode == Opcode.RC_ACKNOWLEDGE]
    assert ack.aeth.type is AethType.ACK
    assert target.mr.read(5, 0) == b"first" and target.rc_metrics()["duplicate_requests"] >= 1


@pytest.mark.parametrize("case", ["wrong_rkey", "beyond_mr", "before_mr", "dma_len_2G",
                                  "len_mismatch"])
def test_bad_rdma_write_is_naked_and_writes_nothing(daemon, target, peer, case):
    mr = target.mr
    pkt = {
        "wrong_rkey": write_only(target.qpn, 100, mr.buf, mr.rkey ^ 0x100, b"x" * 64),
        "beyond_mr": write_only(target.qpn, 100, mr.buf + MR_LEN - 32, mr.rkey, b"x" * 64),
        "before_mr": write_only(target.qpn, 100, mr.buf - 32, mr.rkey, b"x" * 64),
        "dma_len_2G": write_only(target.qpn, 100, mr.buf, mr.rkey, b"x" * 64, dma_len=(1 << 31) + 1),
        "len_mismatch": write_only(target.qpn, 100, mr.buf, mr.rkey, b"x" * 64, dma_len=32),
    }[case]
    send(peer, pkt)
    (nak,) = replies(peer)
    want = NakCode.REM_ACCESS if case in ("wrong_rkey", "beyond_mr", "before_mr") \
        else NakCode.INV_REQ
    assert nak.aeth.type is AethType.NAK and nak.aeth.value == want
    assert mr.read(MR_LEN, 0) == bytes(MR_LEN) and target.canaries_intact()
    # class C error: the QP is in ERR, its posted receive flushed, reported to the guest
    (wc,) = target.ep.poll()
    assert wc.status == 5  # IBV_WC_WR_FLUSH_ERR


def test_send_larger_than_mtu_packet_is_rejected(daemon, target, peer):
    big = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=target.qpn, psn=100, ackreq=True),
                     payload=b"y" * 2048)                          # path MTU is 1024
    send(peer, big)
    (nak,) = replies(peer)
    assert nak.aeth.type is AethType.NAK and nak.aeth.value == NakCode.INV_REQ
    assert target.ep.mr.read(64, 0) == bytes(64)


def test_daemon_still_serves_after_the_abuse(daemon, peer):
    t = Target(daemon)
    try:
        send(peer, write_only(t.qpn, 100, t.mr.buf, t.mr.rkey, b"still alive"))
        (ack,) = replies(peer)
        assert ack.aeth.type is AethType.ACK and t.mr.read(11, 0) == b"still alive"
    finally:
        t.close()
    assert daemon.call(lambda: daemon.server.metrics.transport_errors) == 0
