"""Every RC verb between two connected guests, whatever carries them (our
RoCEv2 fabric, a verbs device): shared by the fabric tests."""
from __future__ import annotations

import random
import struct

from guest_lib import SGE, RecvWR, SendWR
from verbs import WcOpcode, WrOpcode


def send_write_read_atomics(a, b, rng: random.Random, *, write_timeout: float = 60.0) -> None:
    """From guest ``a`` to guest ``b`` (connected RcEndpoints, MRs of at least
    4 MiB): a 10,000-byte SEND (several packets at path MTU 4096 or less), a
    3 MiB RDMA WRITE, a 4 KiB RDMA READ, FETCH_ADD and CMP_SWP; checks the
    data on both sides, the completions and the QPNs they carry."""
    msg = rng.randbytes(10_000)
    a.mr.write(msg, len(msg), 0)
    b.qp.post_recv(RecvWR(1, 1, [SGE(b.mr.buf, 16384, b.mr.lkey)]))
    a.qp.post_send(SendWR(2, WrOpcode.SEND, 1, [SGE(a.mr.buf, len(msg), a.mr.lkey)]))
    wc = b.poll_one()
    assert (wc.wr_id, wc.byte_len, wc.opcode, wc.qp_num) == (1, len(msg), WcOpcode.RECV, b.qp.qp_num)
    assert b.mr.read(len(msg), 0) == msg
    assert a.poll_one().wr_id == 2

    big = rng.randbytes(3 << 20)
    a.mr.write(big, len(big), 0)
    a.qp.post_send(SendWR(3, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, len(big), a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey))
    assert a.poll_one(timeout=write_timeout).wr_id == 3
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
    a.qp.post_send(SendWR(6, WrOpcode.ATOMIC_CMP_AND_SWP, 1, [SGE(a.mr.buf + 8, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf + 64, rkey=b.mr.rkey, compare_add=42, swap=7))
    assert a.poll_one().opcode == WcOpcode.COMP_SWAP
    assert struct.unpack("<Q", a.mr.read(8, 8)) == (42,)
    assert struct.unpack("<Q", b.mr.read(8, 64)) == (7,)
