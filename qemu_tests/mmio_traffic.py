"""The guest side of the microvm test: every verb over ``Context("mmio:auto")``.

An application for a guest image (``vrdma image build --app
qemu_tests/mmio_traffic.py``), run by ``vrdma vm run --machine microvm`` in a
QEMU 11.1 microvm whose virtio-rdma device sits on virtio-mmio. The guest has
no network, so QP information travels out of band: the peer's (a process
guest on the host, the test) comes in on the kernel command line
(``QPN:PSN:GID:ADDR:RKEY``, hex GID), ours goes out on the serial console as
``VRDMA-MMIO-INFO ...``. Then:

1. wait for the peer's "go" SEND (its QP is connected by then);
2. SEND with immediate (the peer answers with the payload upper-cased);
3. RDMA WRITE of 256 KiB (the peer checks its memory), RDMA READ (checked
   here), FETCH_AND_ADD and CMP_AND_SWAP (old values checked here, the
   final value by the peer);
4. a second driver on the same device must get EBUSY (mmio: only);
5. ITERS 64-byte SEND ping-pongs, the peer echoing, timed;
6. print ``VRDMA-MMIO-RESULT {json}`` (the transport's name, device ID,
   the median half round trip, counters before and after close) and exit
   0; any failure exits non-zero.

The same program runs as a process guest on the host (DEVICE a socket
path): the test's baseline.
"""
from __future__ import annotations

import json
import os
import statistics
import struct
import sys
import time

from guest_lib import SGE, Context, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint
from guest_lib.errors import RDMAError
from verbs import WcOpcode, WrOpcode

MSG = b"hello over virtio-mmio " * 30
READ_DATA = b"the host's data for RDMA READ " * 100
WRITE_DATA = bytes(range(256)) * 1024
IMM = 0x5EED
GO = b"go"
#: offsets in each side's 1 MiB MR
RECV_AT, REPLY_AT, ATOMIC_AT, READ_AT, WRITE_AT, LOCAL_READ_AT, OLD_AT = (
    4096, 8192, 65536, 131072, 262144, 600000, 700000)
ATOMIC_START = 1000


def encode_info(info: dict) -> str:
    return f"{info['qpn']:x}:{info['psn']:x}:{info['gid'].hex()}:{info['addr']:x}:{info['rkey']:x}"


def decode_info(text: str) -> dict:
    qpn, psn, gid, addr, rkey = text.split(":")
    return {"qpn": int(qpn, 16), "psn": int(psn, 16), "gid": bytes.fromhex(gid), "addr": int(addr, 16),
            "rkey": int(rkey, 16)}


def active(device: str, peer_text: str, iters: int) -> dict:
    peer = decode_info(peer_text)
    g = RcEndpoint(device, 1 << 20)
    mr, qp = g.mr, g.qp
    g.connect(peer)  # RTS: we send nothing before the peer's "go"
    qp.post_recv([RecvWR(wr_id=1, sg=[SGE(mr.buf + RECV_AT, 4096, mr.lkey)]),
                  RecvWR(wr_id=2, sg=[SGE(mr.buf + REPLY_AT, 4096, mr.lkey)])])
    print(f"VRDMA-MMIO-INFO {encode_info(g.info())}", flush=True)
    wc = g.poll_one(120)
    assert wc.opcode == WcOpcode.RECV and mr.read(wc.byte_len, RECV_AT) == GO, wc
    mr.write(MSG)
    qp.post_send(SendWR(wr_id=10, opcode=WrOpcode.SEND_WITH_IMM, sg=[SGE(mr.buf, len(MSG), mr.lkey)],
                        imm_data=IMM))
    wcs = [g.poll_one(60), g.poll_one(60)]
    reply = next(w for w in wcs if w.opcode == WcOpcode.RECV)
    assert mr.read(reply.byte_len, REPLY_AT) == MSG.upper(), "the peer's reply differs"
    mr.write(WRITE_DATA, offset=WRITE_AT)
    qp.post_send(SendWR(wr_id=11, opcode=WrOpcode.RDMA_WRITE,
                        sg=[SGE(mr.buf + WRITE_AT, len(WRITE_DATA), mr.lkey)],
                        remote_addr=peer["addr"] + WRITE_AT, rkey=peer["rkey"]))
    g.poll_one(60)
    qp.post_send(SendWR(wr_id=12, opcode=WrOpcode.RDMA_READ, sg=[SGE(mr.buf + LOCAL_READ_AT, 2300, mr.lkey)],
                        remote_addr=peer["addr"] + READ_AT, rkey=peer["rkey"]))
    g.poll_one(60)
    assert mr.read(2300, LOCAL_READ_AT) == READ_DATA[:2300], "RDMA READ data differs"
    qp.post_send(SendWR(wr_id=13, opcode=WrOpcode.ATOMIC_FETCH_AND_ADD, sg=[SGE(mr.buf + OLD_AT, 8, mr.lkey)],
                        remote_addr=peer["addr"] + ATOMIC_AT, rkey=peer["rkey"], compare_add=5))
    g.poll_one(60)
    qp.post_send(SendWR(wr_id=14, opcode=WrOpcode.ATOMIC_CMP_AND_SWP,
                        sg=[SGE(mr.buf + OLD_AT + 8, 8, mr.lkey)],
                        remote_addr=peer["addr"] + ATOMIC_AT, rkey=peer["rkey"],
                        compare_add=ATOMIC_START + 5, swap=7))
    g.poll_one(60)
    olds = struct.unpack("<QQ", mr.read(16, OLD_AT))
    assert olds == (ATOMIC_START, ATOMIC_START + 5), f"atomics saw {olds}"
    t = g.ctx.transport
    second = None
    if device.startswith("mmio:"):
        try:
            Context(t.name, mem_size=4 << 20).close()
            second = "opened"
        except RDMAError as e:
            second = f"errno {e.errno}"
    rtts = []
    for i in range(iters):
        qp.post_recv(RecvWR(wr_id=100 + i, sg=[SGE(mr.buf + REPLY_AT, 64, mr.lkey)]))
        t0 = time.perf_counter()
        qp.post_send(SendWR(wr_id=200 + i, opcode=WrOpcode.SEND, sg=[SGE(mr.buf, 64, mr.lkey)]))
        got = {g.poll_one(60).opcode, g.poll_one(60).opcode}
        rtts.append(time.perf_counter() - t0)
        assert WcOpcode.RECV in got, got
    result = {"verified": ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"],
              "transport": type(t).__name__, "name": t.name, "device_id": getattr(t, "device_id", None),
              "second_driver": second, "iters": iters,
              # no kernel driver holds the block: the virtio_mmio platform driver is not even loaded
              "kernel_virtio_mmio": os.path.isdir("/sys/bus/platform/drivers/virtio-mmio"),
              "send64_half_rtt_us": statistics.median(rtts) / 2 * 1e6 if rtts else None,
              "features": g.ctx.features, "counters": dict(getattr(t, "counters", {}))}
    g.close()
    result["closed"] = dict(getattr(t, "counters", {}))
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "active":
        print("usage: mmio_traffic.py active DEVICE PEER-INFO ITERS", file=sys.stderr)
        return 2
    print("VRDMA-MMIO-RESULT " + json.dumps(active(argv[1], argv[2], int(argv[3]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
