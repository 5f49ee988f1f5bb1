"""An independent decoder reads our wire: dumpcap captures the traffic of
two daemons in two namespaces, tshark decodes it as RRoCE (InfiniBand over
UDP 4791), and the opcodes, destination QPNs, PSNs, RETH and AETH it reports
are the ones the guests' verbs imply; every captured ICRC verifies for the
IP envelope tshark shows (non-zero IPv4 IDs included)."""
from __future__ import annotations

import os
import shutil
import struct

import pytest

from guest_lib import RecvWR, SGE, SendWR
from roce.opcodes import Opcode
from roce.packet import decode as roce_decode
from verbs import WrOpcode

from .test_gso_multihost import set_feature
from .test_multihost import A_IP, B_IP, Host, connect

netlab = pytest.importorskip("netlab.ns")
from netlab.capture import Capture, decode  # noqa: E402

pytestmark = pytest.mark.netns

# IBTA opcodes (RC), from their one definition
SEND_FIRST, SEND_MIDDLE, SEND_LAST = Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST
WRITE_ONLY, READ_REQ, FETCH_ADD = Opcode.RC_RDMA_WRITE_ONLY, Opcode.RC_RDMA_READ_REQUEST, Opcode.RC_FETCH_ADD
ACK, READ_RESP_ONLY, ATOMIC_ACK = Opcode.RC_ACKNOWLEDGE, Opcode.RC_RDMA_READ_RESPONSE_ONLY, Opcode.RC_ATOMIC_ACKNOWLEDGE


def test_tshark_decodes_our_traffic_as_rroce(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("dumpcap", "tshark"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    with netlab.Namespace() as na, netlab.Namespace() as nb:
        netlab.veth_pair(na, nb, f"{A_IP}/24", f"{B_IP}/24")
        # the stack cuts UDP GSO sends before the capture point, as for a NIC
        # without USO (a veth would carry them whole, and dumpcap see them so)
        set_feature(na, "veth0", "tx-udp-segmentation", False)
        ha, hb = Host(na, A_IP, str(tmp_path / "a.sock")), Host(nb, B_IP, str(tmp_path / "b.sock"))
        # path MTU 1024; a 4 s ACK timeout (2^20 x 4.096 us): a loaded daemon stalling past the
        # default 17 ms would retransmit, and the capture below lists every packet exactly
        a, b = connect(ha, hb, mtu=3, timeout=20)
        try:
            qa, qb = a.qp.qp_num, b.qp.qp_num
            psn0 = a.sq_psn
            pcap = str(tmp_path / "a.pcap")
            with Capture(na, "veth0", pcap) as cap:
                b.qp.post_recv(RecvWR(1, 1, [SGE(b.mr.buf, 4096, b.mr.lkey)]))
                a.mr.write(bytes(range(256)) * 12, 3000, 0)
                a.qp.post_send(SendWR(1, WrOpcode.SEND, 1, [SGE(a.mr.buf, 3000, a.mr.lkey)]))
                b.poll_one()
                a.poll_one()
                a.qp.post_send(SendWR(2, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 100, a.mr.lkey)],
                                      remote_addr=b.mr.buf + 8192, rkey=b.mr.rkey))
                a.poll_one()
                a.qp.post_send(SendWR(3, WrOpcode.RDMA_READ, 1, [SGE(a.mr.buf + 4096, 200, a.mr.lkey)],
                                      remote_addr=b.mr.buf + 8192, rkey=b.mr.rkey))
                a.poll_one()
                b.mr.write(struct.pack("<Q", 5), 8, 16384)
                a.qp.post_send(SendWR(4, WrOpcode.ATOMIC_FETCH_AND_ADD, 1, [SGE(a.mr.buf, 8, a.mr.lkey)],
                                      remote_addr=b.mr.buf + 16384, rkey=b.mr.rkey, compare_add=1))
                a.poll_one()
                cap.stop(expect=9)
        finally:
            a.close()
            b.close()
        recs = decode(pcap)
    assert all("infiniband" in r.protocols for r in recs), [r.protocols for r in recs]
    req = [r for r in recs if r.src == A_IP]
    rsp = [r for r in recs if r.src == B_IP]
    assert [r.opcode for r in req] == [SEND_FIRST, SEND_MIDDLE, SEND_LAST, WRITE_ONLY, READ_REQ, FETCH_ADD]
    assert {r.dest_qp for r in req} == {qb} and {r.dest_qp for r in rsp} == {qa}
    first = req[0].psn
    assert first == psn0  # the PSN the guest chose is the one on the wire
    assert [r.psn for r in req] == [(first + i) % (1 << 24) for i in range(6)]
    assert [r.ackreq for r in req[:3]] == [False, False, True]  # AckReq ends the message
    assert req[3].reth_rkey is not None and req[3].reth_len == 100 and req[4].reth_len == 200
    assert [r.opcode for r in rsp] == [ACK, ACK, READ_RESP_ONLY, ATOMIC_ACK]
    assert [r.psn for r in rsp] == [(first + i) % (1 << 24) for i in (2, 3, 4, 5)]
    assert all(r.aeth_syndrome is not None and r.aeth_syndrome >> 5 == 0 for r in rsp)  # ACKs
    for r in recs:  # tshark shows the ICRC; roce.packet checks it for that IP envelope
        pkt = roce_decode(r.payload, r.ip_context())
        assert pkt.icrc == r.icrc and pkt.bth.psn == r.psn
        # IP_PMTUDISC_DO on an unconnected socket gives ID 0; UDP GSO gives
        # segment k of a send ID k (the 3 SEND packets leave as one)
        assert r.df and r.ip_id == (req.index(r) if r in req[:3] else 0)
