"""A guest program for the VM pause test (qemu_tests/test_pci_pause.py).

``python qemu_tests/pci_pause.py [DEVICE [SECONDS]]``: opens the device
(default ``pci:auto``; a socket path: a process guest),
makes a PD, an MR, a CQ and two RC QPs connected to each other, and moves
data between them (SEND with immediate and RDMA WRITE, checked); prints
``VRDMA-PAUSE-NOW`` and sleeps SECONDS (default 8), during which the test
stops and continues the VM (QMP ``stop``/``cont``); then moves data again on
the *same* objects and prints ``RESULT {json}``. If the pause had reset the
device, the second round fails (its objects are gone).
"""
from __future__ import annotations

import json
import sys
import time

from guest_lib import CQ, MR, PD, QP, SGE, Context, RecvWR, SendWR
from guest_lib.endpoint import ALL_ACCESS, connect_qp, new_psn, poll_cq
from guest_lib.qp import QPInitAttr
from verbs import WcOpcode, WcStatus, WrOpcode

MARK = "VRDMA-PAUSE-NOW"


def _round(tag: int, qa: QP, qb: QP, cq: CQ, mr: MR) -> dict:
    """SEND with immediate qa -> qb, then RDMA WRITE qa -> qb's half of the MR."""
    half = mr.length // 2
    msg = bytes([tag]) * 512
    mr.write(msg)
    qb.post_recv(RecvWR(wr_id=100 + tag, sg=[SGE(mr.buf + half, 512, mr.lkey)]))
    qa.post_send(SendWR(wr_id=tag, opcode=WrOpcode.SEND_WITH_IMM, imm_data=tag,
                        sg=[SGE(mr.buf, 512, mr.lkey)]))
    wcs = {w.wr_id: w for w in poll_cq(cq, 2, 30)}
    assert all(w.status == WcStatus.SUCCESS for w in wcs.values()), wcs
    assert wcs[100 + tag].opcode == WcOpcode.RECV and wcs[100 + tag].imm_data == tag, wcs
    assert mr.read(512, half) == msg
    data = bytes((tag + i) & 0xFF for i in range(4096))
    mr.write(data, offset=4096)
    qa.post_send(SendWR(wr_id=200 + tag, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(mr.buf + 4096, 4096, mr.lkey)],
                        remote_addr=mr.buf + half + 4096, rkey=mr.rkey))
    (w,) = poll_cq(cq, 1, 30)
    assert w.status == WcStatus.SUCCESS, w
    assert mr.read(4096, half + 4096) == data
    return {"send": 512, "write": 4096}


def main(argv: list[str]) -> int:
    device = argv[0] if argv else "pci:auto"
    seconds = float(argv[1]) if len(argv) > 1 else 8.0
    with Context(device, mem_size=16 << 20) as ctx:
        pd, cq = PD(ctx), CQ(ctx, 64)
        mr = MR(pd, 1 << 16, ALL_ACCESS)
        qa, qb = (QP(pd, QPInitAttr(scq=cq, rcq=cq)) for _ in range(2))
        gid = ctx.query_gid()
        pa, pb = new_psn(), new_psn()
        connect_qp(qa, qb.qp_num, gid.raw, rq_psn=pb, sq_psn=pa)
        connect_qp(qb, qa.qp_num, gid.raw, rq_psn=pa, sq_psn=pb)
        before = _round(1, qa, qb, cq, mr)
        print(MARK, flush=True)
        time.sleep(seconds)
        after = _round(2, qa, qb, cq, mr)
        print("RESULT " + json.dumps({"before": before, "after": after, "qpns": [qa.qp_num, qb.qp_num]}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
