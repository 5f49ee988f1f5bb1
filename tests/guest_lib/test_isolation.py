"""Tenant isolation on one host, tried as an attacker would (issue #12).

Three process guests of one real daemon (unix socket, memfd, eventfds): a
connected victim pair and an attacker. The attacker uses only the public
guest_lib API, and is given what a guessing attack would have to find (the
victim's QPN, the peer's rkey and address, a PSN): its requests must never
reach the victim. Every byte of the victims' buffers is checked, the victim
QPs must keep working after every attempt, and the daemon must count each
dropped request (``foreign_requests``)."""
from __future__ import annotations

import pytest

from guest_lib import QPCap, RecvWR, SendWR, SGE
from guest_lib.endpoint import RcEndpoint, connect_pair, new_psn
from vhost_user.testing import BackendThread
from verbs import SendFlags, WcStatus, WrOpcode
from virtio_rdma.device import RdmaDevice
from fabric.local import LocalFabric

BUF = 1 << 16
CANARY = bytes(range(256)) * (BUF // 256)


class Daemon:
    """The daemon in a thread, keeping its devices so tests can read counters."""

    def __init__(self, path: str):
        self.fabric = LocalFabric()
        self.devices: list[RdmaDevice] = []
        self.thread = BackendThread(path, self._device)
        self.path = path

    def _device(self, *_who):
        d = RdmaDevice(self.fabric)
        self.devices.append(d)
        return d

    def counter(self, name: str) -> int:
        return sum(getattr(d.core.metrics, name) for d in self.devices if d.core is not None)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path / "rdma.sock"))
    with d.thread:
        yield d


@pytest.fixture
def guests(daemon):
    made = []

    def make():
        ep = RcEndpoint(daemon.path, BUF, cap=QPCap(16, 16, 2, 2, 64), mem_size=16 << 20)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


def _victims(guests):
    a, b = guests(), guests()
    connect_pair(a, b)
    for ep in (a, b):
        ep.mr.write(CANARY, BUF)
    return a, b


def _victims_still_work(a, b, tag: int) -> None:
    """SEND both ways and an RDMA WRITE a -> b, data verified (all in the
    buffers' last 192 bytes); every other canary byte stays."""
    msg = tag.to_bytes(4, "little") * 16
    for src, dst in ((a, b), (b, a)):
        dst.qp.post_recv(RecvWR(wr_id=tag, sg=[SGE(dst.mr.buf + BUF - 64, 64, dst.mr.lkey)]))
        src.mr.write(msg, 64, BUF - 192)
        src.qp.post_send(SendWR(wr_id=tag, opcode=WrOpcode.SEND, send_flags=SendFlags.SIGNALED,
                                sg=[SGE(src.mr.buf + BUF - 192, 64, src.mr.lkey)]))
        assert src.poll_one().status == WcStatus.SUCCESS
        assert dst.poll_one().byte_len == 64
        assert dst.mr.read(64, BUF - 64) == msg
    info = b.info()
    wr = SendWR(wr_id=tag, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                sg=[SGE(a.mr.buf + BUF - 192, 64, a.mr.lkey)])
    wr.set_wr_rdma(info["rkey"], info["addr"] + BUF - 128)
    a.qp.post_send(wr)
    a.poll_one()
    assert b.mr.read(64, BUF - 128) == msg
    for ep in (a, b):
        ep.mr.write(CANARY[BUF - 192:], 192, BUF - 192)  # restore for the next canary check
        assert ep.mr.read(BUF, 0) == CANARY, "a victim byte changed"


def _attacker_towards(guests, victim_qpn: int, victim_gid: bytes):
    """A guest whose QP is connected to the victim's QPN (it claims to be the
    victim's peer); a short retry budget so each attempt ends quickly."""
    m = guests()
    m.connect(dict(qpn=victim_qpn, gid=victim_gid), rq_psn=new_psn(), timeout=1, retry_cnt=1,
              rnr_retry=0)
    return m


def test_another_guest_cannot_write_or_read_a_connected_qps_memory(daemon, guests):
    a, b = _victims(guests)
    bi = b.info()
    m = _attacker_towards(guests, bi["qpn"], bi["gid"])
    m.mr.write(b"\xEE" * 4096, 4096)
    before = daemon.counter("foreign_requests")

    write = SendWR(wr_id=1, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                   sg=[SGE(m.mr.buf, 4072, m.mr.lkey)])
    write.set_wr_rdma(bi["rkey"], bi["addr"])  # the victim's real rkey and address
    m.qp.post_send(write)
    (wc,) = m.poll(1, timeout=10)
    assert wc.status == WcStatus.RETRY_EXC_ERR  # no responder ever answered

    # a fresh attacker QP for the READ (the first one is in ERR now)
    m2 = _attacker_towards(guests, bi["qpn"], bi["gid"])
    read = SendWR(wr_id=2, opcode=WrOpcode.RDMA_READ, send_flags=SendFlags.SIGNALED,
                  sg=[SGE(m2.mr.buf, 8192, m2.mr.lkey)])
    read.set_wr_rdma(bi["rkey"], bi["addr"])
    m2.mr.write(bytes(8192), 8192)
    m2.qp.post_send(read)
    (wc,) = m2.poll(1, timeout=10)
    assert wc.status == WcStatus.RETRY_EXC_ERR
    assert m2.mr.read(8192, 0) == bytes(8192), "the attacker read victim bytes"

    assert b.mr.read(BUF, 0) == CANARY, "the attacker wrote victim bytes"
    assert daemon.counter("foreign_requests") - before >= 4  # each try and its retry
    _victims_still_work(a, b, 1)


def test_bad_rkey_requests_from_other_guests_do_not_kill_victim_qps(daemon, guests):
    """With IBTA semantics a request with a bad rkey moves the responder QP to
    ERR; from anyone but the connected peer it must not even arrive. Every
    live QP of the host is tried, by QPN, several times."""
    pairs = [_victims(guests) for _ in range(3)]
    targets = [(ep.info()["qpn"], ep.info()["gid"]) for pair in pairs for ep in pair]
    before = daemon.counter("foreign_requests")
    for round_ in range(3):
        for qpn, gid in targets:
            m = _attacker_towards(guests, qpn, gid)
            wr = SendWR(wr_id=round_, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                        sg=[SGE(m.mr.buf, 8, m.mr.lkey)])
            wr.set_wr_rdma(0xDEAD_BEEF, 0)  # a wrong rkey: an access NAK would kill the QP
            m.qp.post_send(wr)
            (wc,) = m.poll(1, timeout=10)
            assert wc.status == WcStatus.RETRY_EXC_ERR
            m.close()
    assert daemon.counter("foreign_requests") - before >= 2 * 3 * len(targets)
    assert daemon.counter("remote_access_errors") == 0  # no victim ever judged the rkey
    for i, (a, b) in enumerate(pairs):
        _victims_still_work(a, b, 10 + i)


def test_sends_from_another_guest_consume_no_receive(daemon, guests):
    a, b = _victims(guests)
    bi = b.info()
    b.qp.post_recv(RecvWR(wr_id=77, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    m = _attacker_towards(guests, bi["qpn"], bi["gid"])
    m.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND_WITH_IMM, send_flags=SendFlags.SIGNALED,
                          sg=[SGE(m.mr.buf, 64, m.mr.lkey)], imm_data=0x41414141))
    (wc,) = m.poll(1, timeout=10)
    assert wc.status == WcStatus.RETRY_EXC_ERR
    assert b.cq.poll(4) == (0, [])  # the victim's receive is still posted, unused
    # ... and it takes the victim peer's next SEND
    a.mr.write(b"x" * 64, 64, 0)
    a.qp.post_send(SendWR(wr_id=5, opcode=WrOpcode.SEND, send_flags=SendFlags.SIGNALED,
                          sg=[SGE(a.mr.buf, 64, a.mr.lkey)]))
    a.poll_one()
    wc = b.poll_one()
    assert wc.wr_id == 77 and wc.src_qp == a.qp.qp_num and b.mr.read(64, 0) == b"x" * 64


def test_qpns_keys_and_psns_are_not_predictable_from_a_guests_own(guests):
    """What a guest can learn of its own objects tells it nothing of its
    neighbours': no sequence between QPNs, keys or PSNs of consecutive guests."""
    eps = [guests() for _ in range(6)]
    qpns = [ep.qp.qp_num for ep in eps]
    keys = [ep.mr.rkey for ep in eps]
    psns = [ep.psn for ep in eps]
    for seq in (qpns, keys, psns):
        assert len(set(seq)) == len(seq)
        steps = {(y - x) for x, y in zip(seq, seq[1:])}
        assert len(steps) > 1, seq  # not an arithmetic sequence
    assert max(keys) >= 1 << 24 and max(qpns) >= 1 << 16  # drawn from the whole space
