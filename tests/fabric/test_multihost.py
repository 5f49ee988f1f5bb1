"""Two hosts in two network namespaces, a back-end daemon on each with its
RoCE address there, a guest on each (this test process, over the daemons'
unix sockets): every verb across the veth, 1 byte to 8 MiB, path MTU 1024
and 4096; then the same under random loss (iptables statistic match in both
namespaces), reordering and duplication (an L2 relay in a middle namespace,
frames untouched), with every byte delivered intact, exactly once, in order;
and a peer that vanishes, which must end in retry-exceeded completions.
"""
from __future__ import annotations

import os
import random
import struct
import sys
import time

import pytest

from guest_lib import RecvWR, SGE, SendWR
from guest_lib.endpoint import RcEndpoint
from verbs import WcOpcode, WcStatus, WrOpcode

netlab = pytest.importorskip("netlab.ns")
from netlab.loss import lossy_link  # noqa: E402
from netlab.relay import Policy, RelayProcess  # noqa: E402

pytestmark = pytest.mark.netns

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
BUF = 9 << 20


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


class Host:
    def __init__(self, ns, ip, sock):
        self.ns, self.ip, self.sock = ns, ip, sock
        self.proc = ns.popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock,
                              "--roce-addr", ip])
        self.proc.expect("listening", timeout=20)

    def stop(self):
        return self.proc.stop()


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    """A <-veth-> B."""
    _require_root()
    d = tmp_path_factory.mktemp("mh")
    with netlab.Namespace() as na, netlab.Namespace() as nb:
        netlab.veth_pair(na, nb, f"{A_IP}/24", f"{B_IP}/24")
        yield Host(na, A_IP, str(d / "a.sock")), Host(nb, B_IP, str(d / "b.sock"))


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    """A <-veth-> R <-veth-> B, R relaying L2 frames (policy set per test)."""
    _require_root()
    d = tmp_path_factory.mktemp("mhr")
    with netlab.Namespace() as na, netlab.Namespace() as nr, netlab.Namespace() as nb:
        netlab.veth_pair(na, nr, f"{A_IP}/24", None, if_b="ra", tx_checksum=False)
        netlab.veth_pair(nb, nr, f"{B_IP}/24", None, if_b="rb", tx_checksum=False)
        yield Host(na, A_IP, str(d / "a.sock")), Host(nb, B_IP, str(d / "b.sock")), nr


def connect(ha, hb, mtu=5, **attrs):
    a, b = RcEndpoint(ha.sock, buf_size=BUF), RcEndpoint(hb.sock, buf_size=BUF)
    psn_a, psn_b = random.randrange(1 << 24), random.randrange(1 << 24)
    kw = dict(path_mtu=mtu, timeout=12, retry_cnt=7, rnr_retry=7, min_rnr_timer=1) | attrs
    a.connect(b.info(), sq_psn=psn_a, rq_psn=psn_b, **kw)
    b.connect(a.info(), sq_psn=psn_b, rq_psn=psn_a, **kw)
    a.sq_psn, b.sq_psn = psn_a, psn_b
    return a, b


def _wr(wr_id, op, ep, off, n, **kw):
    return SendWR(wr_id, op, 1, [SGE(ep.mr.buf + off, n, ep.mr.lkey)], **kw)


def exchange_all_verbs(a, b, size, rng, timeout=60.0):
    """SEND (into one posted receive), WRITE, READ back, both atomics."""
    data = rng.randbytes(size)
    a.mr.write(data, size, 0)
    b.qp.post_recv(RecvWR(11, 1, [SGE(b.mr.buf, size, b.mr.lkey)]))
    a.qp.post_send(_wr(1, WrOpcode.SEND, a, 0, size))
    wc = b.poll_one(timeout)
    assert (wc.wr_id, wc.byte_len, wc.opcode, wc.status) == (11, size, WcOpcode.RECV, 0)
    assert b.mr.read(size, 0) == data
    assert a.poll_one(timeout).wr_id == 1
    data2 = rng.randbytes(size)
    a.mr.write(data2, size, 0)
    a.qp.post_send(_wr(2, WrOpcode.RDMA_WRITE, a, 0, size, remote_addr=b.mr.buf, rkey=b.mr.rkey))
    assert a.poll_one(timeout).wr_id == 2
    assert b.mr.read(size, 0) == data2
    half = BUF // 2 if size > BUF // 2 else size
    a.qp.post_send(_wr(3, WrOpcode.RDMA_READ, a, BUF - half, half, remote_addr=b.mr.buf,
                       rkey=b.mr.rkey))
    wc = a.poll_one(timeout)
    assert (wc.wr_id, wc.byte_len) == (3, half)
    assert a.mr.read(half, BUF - half) == data2[:half]
    b.mr.write(struct.pack("<Q", 1000), 8, BUF - 8)
    a.qp.post_send(_wr(4, WrOpcode.ATOMIC_FETCH_AND_ADD, a, 8, 8, remote_addr=b.mr.buf + BUF - 8,
                       rkey=b.mr.rkey, compare_add=24))
    a.qp.post_send(_wr(5, WrOpcode.ATOMIC_CMP_AND_SWP, a, 16, 8, remote_addr=b.mr.buf + BUF - 8,
                       rkey=b.mr.rkey, compare_add=1024, swap=7))
    assert [w.wr_id for w in a.poll(2, timeout)] == [4, 5]
    assert struct.unpack("<QQ", a.mr.read(16, 8)) == (1000, 1024)
    assert struct.unpack("<Q", b.mr.read(8, BUF - 8)) == (7,)


def stream_of_sends(a, b, n, size, rng, timeout=60.0):
    """``n`` SENDs of distinct content into ``n`` receives: each lands once,
    in order, intact; nothing extra completes."""
    msgs = [rng.randbytes(size) for _ in range(n)]
    for i in range(n):
        b.qp.post_recv(RecvWR(100 + i, 1, [SGE(b.mr.buf + i * size, size, b.mr.lkey)]))
    for i, m in enumerate(msgs):
        a.mr.write(m, size, i * size)
    for i in range(n):
        a.qp.post_send(_wr(i, WrOpcode.SEND, a, i * size, size))
    got = b.poll(n, timeout)
    assert [(w.wr_id, w.status, w.byte_len) for w in got] == [(100 + i, 0, size) for i in range(n)]
    for i, m in enumerate(msgs):
        assert b.mr.read(size, i * size) == m, f"message {i} corrupted"
    assert [w.wr_id for w in a.poll(n, timeout)] == list(range(n))
    time.sleep(0.05)
    assert b.cq.poll(1)[1] == []  # exactly once


@pytest.mark.parametrize("mtu", [3, 5], ids=["mtu1024", "mtu4096"])
@pytest.mark.parametrize("size", [1, 4096, 1 << 20, 8 << 20], ids=["1B", "4KiB", "1MiB", "8MiB"])
def test_all_verbs_across_the_veth(direct, mtu, size):
    a, b = connect(*direct, mtu=mtu)
    try:
        exchange_all_verbs(a, b, size, random.Random(size + mtu))
    finally:
        a.close()
        b.close()


def test_loss_both_directions(direct):
    ha, hb = direct
    a, b = connect(ha, hb, mtu=3)
    try:
        with lossy_link(ha.ns, hb.ns, 0.03) as (la, lb):
            rng = random.Random(7)
            stream_of_sends(a, b, 40, 3000, rng)
            exchange_all_verbs(a, b, 1 << 20, rng)
            assert la.dropped() + lb.dropped() > 0  # the impairment really happened
    finally:
        a.close()
        b.close()


RELAY_POLICIES = [
    Policy(seed=1, reorder=0.2, reorder_depth=3, udp_port=4791),
    Policy(seed=2, duplicate=0.1, udp_port=4791),
    Policy(seed=3, reorder=0.1, duplicate=0.05, loss=0.02, udp_port=4791),
]
RELAY_IDS = ["reorder", "duplicate", "reorder+dup+loss"]


@pytest.mark.parametrize("policy", RELAY_POLICIES, ids=RELAY_IDS)
def test_reorder_duplicate_through_the_relay(relayed, policy):
    through_relay(relayed, policy)


def through_relay(relayed, policy):
    """SENDs and every verb through the L2 relay under ``policy``; the
    impairments must really have happened."""
    ha, hb, nr = relayed
    with RelayProcess(nr, "ra", "rb", policy) as relay:
        a, b = connect(ha, hb, mtu=3)
        try:
            rng = random.Random(policy.seed)
            stream_of_sends(a, b, 30, 2500, rng)
            exchange_all_verbs(a, b, 512 << 10, rng)
        finally:
            a.close()
            b.close()
        stats = relay.stats()
    c = [stats["a_to_b"], stats["b_to_a"]]
    if policy.reorder:
        assert sum(d["held"] for d in c) > 0, stats
    if policy.duplicate:
        assert sum(d["duplicated"] for d in c) > 0, stats
    if policy.loss:
        assert sum(d["dropped"] for d in c) > 0, stats


def test_vanished_peer_ends_in_retry_exceeded(tmp_path):
    _require_root()
    with netlab.Namespace() as na, netlab.Namespace() as nb:
        netlab.veth_pair(na, nb, f"{A_IP}/24", f"{B_IP}/24")
        ha = Host(na, A_IP, str(tmp_path / "a.sock"))
        hb = Host(nb, B_IP, str(tmp_path / "b.sock"))
        a, b = connect(ha, hb, mtu=3, timeout=10, retry_cnt=2)
        try:
            exchange_all_verbs(a, b, 100, random.Random(1))
            b.close()
            hb.stop()                     # the peer host's daemon is gone
            t0 = time.monotonic()
            a.qp.post_send(_wr(8, WrOpcode.RDMA_WRITE, a, 0, 64, remote_addr=0, rkey=0))
            a.qp.post_send(_wr(9, WrOpcode.SEND, a, 0, 64))
            got = a.poll(2, timeout=20)
            assert [(w.wr_id, w.status) for w in got] == [(8, WcStatus.RETRY_EXC_ERR),
                                                          (9, WcStatus.WR_FLUSH_ERR)]
            assert time.monotonic() - t0 < 10  # 3 x 4.2 ms timer, no hang
        finally:
            a.close()
