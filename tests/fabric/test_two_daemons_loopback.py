"""Two real back-end daemons, each its own RoCEv2 host on a loopback address
(127.0.0.1 and 127.0.0.2), a guest on each: every verb crosses real UDP
sockets on port 4791 with ICRC, between two processes."""
from __future__ import annotations

import random
import struct

import pytest

from guest_lib import SGE, SendWR, RecvWR
from guest_lib.endpoint import RcEndpoint
from vhost_user.testing import DaemonProcess
from virtio_rdma.constants import WcOpcode, WcStatus, WrOpcode
from virtio_rdma.roce_fabric import gid_of_address


@pytest.fixture(scope="module")
def hosts():
    with DaemonProcess("--roce-addr", "127.0.0.1") as da, DaemonProcess("--roce-addr", "127.0.0.2") as db:
        yield da, db


@pytest.fixture
def pair(hosts):
    da, db = hosts
    a = RcEndpoint(da.path, buf_size=4 << 20)
    b = RcEndpoint(db.path, buf_size=4 << 20)
    try:
        assert a.gid.raw == gid_of_address("127.0.0.1") and b.gid.raw == gid_of_address("127.0.0.2")
        a.connect(b.info(), sq_psn=0xFFFF00, rq_psn=77, path_mtu=5)
        b.connect(a.info(), sq_psn=77, rq_psn=0xFFFF00, path_mtu=5)
        yield a, b
    finally:
        a.close()
        b.close()


def test_send_write_read_atomics_between_two_daemons(pair):
    a, b = pair
    rng = random.Random(3)
    msg = rng.randbytes(10_000)  # three 4096-byte packets, PSNs wrapping
    a.mr.write(msg, len(msg), 0)
    b.qp.post_recv(RecvWR(1, 1, [SGE(b.mr.buf, 16384, b.mr.lkey)]))
    a.qp.post_send(SendWR(2, WrOpcode.SEND, 1, [SGE(a.mr.buf, len(msg), a.mr.lkey)]))
    wc = b.poll_one()
    assert (wc.wr_id, wc.byte_len, wc.opcode) == (1, len(msg), WcOpcode.RECV)
    assert b.mr.read(len(msg), 0) == msg
    assert a.poll_one().wr_id == 2

    big = rng.randbytes(3 << 20)
    a.mr.write(big, len(big), 0)
    a.qp.post_send(SendWR(3, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, len(big), a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey))
    assert a.poll_one(timeout=60).wr_id == 3
    assert b.mr.read(len(big), 0) == big

    b.mr.write(b"readme!!" * 512, 4096, 1 << 20)
    a.qp.post_send(SendWR(4, WrOpcode.RDMA_READ, 1, [SGE(a.mr.buf + 8192, 4096, a.mr.lkey)],
                          remote_addr=b.mr.buf + (1 << 20), rkey=b.mr.rkey))
    assert a.poll_one().byte_len == 4096
    assert a.mr.read(4096, 8192) == b"readme!!" * 512

    b.mr.write(struct.pack("<Q", 41), 8, 64)
    a.qp.post_send(SendWR(5, WrOpcode.ATOMIC_FETCH_AND_ADD, 1, [SGE(a.mr.buf, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf + 64, rkey=b.mr.rkey, compare_add=1))
    assert a.poll_one().opcode == WcOpcode.FETCH_ADD
    assert struct.unpack("<Q", a.mr.read(8, 0)) == (41,)
    assert struct.unpack("<Q", b.mr.read(8, 64)) == (42,)


def test_remote_access_error_across_hosts(pair):
    a, b = pair
    a.qp.post_send(SendWR(9, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 16, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey ^ 0x5A00))
    (wc,) = a.poll()
    assert wc.status == WcStatus.REM_ACCESS_ERR
