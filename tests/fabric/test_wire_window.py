"""A stream of RDMA WRITEs between two daemons across a veth, posted ahead
as ib_write_bw posts them (more WQEs than the window of 128 PSNs takes), with
the IB default ACK timeout (about 67 ms): no ACK timeout and no resend may
happen on a clean link. This guards the wire path's timekeeping: WQEs kept
in the guest's ring for want of window (``NetworkQp.held``) start when an
ACK makes room, from a pump whose ``now`` is read after packets the native
fast path took (an old ``now`` armed the retransmission timer already
expired: spurious go-back-N resends of the whole window).

The daemons run in threads of this process (each created inside its
namespace), so the test reads the sender's engine counters.
"""
from __future__ import annotations

import os
import random

import pytest

from fabric.roce import RoceFabric, RoceFabricService
from guest_lib import SGE, SendWR
from guest_lib.endpoint import RcEndpoint
from vhost_user.testing import BackendThread
from verbs import SendFlags, WcStatus, WrOpcode
from virtio_rdma.device import RdmaDevice

netlab = pytest.importorskip("netlab.ns")

pytestmark = pytest.mark.netns

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
MSG = 64 << 10
SLOTS = 8                   # the receiver's MR holds 8 messages
BUF = MSG * SLOTS


class Daemon:
    def __init__(self, ns, ip: str, path: str):
        self.fabric = RoceFabric(ip)
        self.svc = RoceFabricService(self.fabric)
        fabric = self.fabric
        with ns.entered():          # the loop thread (and its socket) live in ns
            self.bt = BackendThread(path, lambda info: RdmaDevice(fabric),
                                    services=[self.svc]).start()
        self.path = path

    def engine(self, qpn: int) -> tuple[dict, int]:
        def get():
            n = self.fabric.wire[qpn]
            return n.rc.metrics.as_dict(), n.window_holds
        return self.bt.call(get)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    d = tmp_path_factory.mktemp("win")
    with netlab.Namespace() as na, netlab.Namespace() as nb:
        netlab.veth_pair(na, nb, f"{A_IP}/24", f"{B_IP}/24")
        a, b = Daemon(na, A_IP, str(d / "a.sock")), Daemon(nb, B_IP, str(d / "b.sock"))
        try:
            yield a, b
        finally:
            a.bt.stop()
            b.bt.stop()


def test_writes_posted_ahead_fill_the_window_without_timeouts(hosts):
    ha, hb = hosts
    a, b = RcEndpoint(ha.path, buf_size=BUF), RcEndpoint(hb.path, buf_size=BUF)
    try:
        pa, pb = random.randrange(1 << 24), random.randrange(1 << 24)
        kw = dict(path_mtu=5, timeout=14, retry_cnt=7, rnr_retry=7, min_rnr_timer=1)
        a.connect(b.info(), sq_psn=pa, rq_psn=pb, **kw)
        b.connect(a.info(), sq_psn=pb, rq_psn=pa, **kw)
        rng = random.Random(17)
        data = rng.randbytes(BUF)
        a.mr.write(data, BUF, 0)
        total, batch, done = 240, 16, 0
        while done < total:
            for i in range(batch):       # 16 WRITEs of 16 packets: twice the window
                k = done + i
                off = (k % SLOTS) * MSG
                a.qp.post_send(SendWR(k, WrOpcode.RDMA_WRITE, 1,
                                      [SGE(a.mr.buf + off, MSG, a.mr.lkey)],
                                      send_flags=SendFlags.SIGNALED if i == batch - 1 else 0,
                                      remote_addr=b.mr.buf + off, rkey=b.mr.rkey))
            wc = a.poll_one(30.0)
            assert (wc.wr_id, wc.status) == (done + batch - 1, WcStatus.SUCCESS)
            done += batch
        assert b.mr.read(BUF, 0) == data
        m, holds = ha.engine(a.qp.qp_num)
        assert holds > 0                                # WQEs waited in the ring for ACKs
        assert m["timeouts"] == 0 and m["retransmitted_packets"] == 0, m
        assert m["tx_packets"] == total * (MSG // 4096)
    finally:
        a.close()
        b.close()
