"""netlab.capture: RoCEv2 packets built with the roce codecs and sent from a
namespace through roce.udp sockets are captured by dumpcap and decoded by
tshark with the opcodes, QPNs, PSNs and headers we sent; the ICRC checked
against the captured IP envelope is right (and a corrupted one is caught)."""
import shutil
import struct
from dataclasses import replace

import pytest

from netlab.capture import Capture, count_packets, decode
from netlab.errors import NetlabError, ProcessFailed
from netlab.ns import two_hosts
from roce.errors import IcrcMismatch
from roce.headers import Aeth, Bth, Reth
from roce.icrc import IpContext
from roce.opcodes import Opcode
from roce.packet import RocePacket
from roce.packet import decode as roce_decode
from roce.udp import make_socket


def test_count_packets_reads_classic_pcap(tmp_path):
    p = tmp_path / "x.pcap"
    assert count_packets(str(p)) == 0                       # not written yet
    hdr = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    rec = struct.pack("<IIII", 0, 0, 3, 3) + b"abc"
    p.write_bytes(hdr + rec + rec + rec[:10])               # the third is half written
    assert count_packets(str(p)) == 2
    p.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))          # pcapng is not what dumpcap -P writes
    with pytest.raises(NetlabError, match="not a classic pcap"):
        count_packets(str(p))
    with pytest.raises(NetlabError, match="no capture file"):
        decode(str(tmp_path / "missing.pcap"))


@pytest.fixture
def tools():
    for tool in ("dumpcap", "tshark"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.mark.netns
def test_capture_decodes_as_roce(netns, tools, tmp_path):
    pcap = str(tmp_path / "roce.pcap")
    with two_hosts() as h:
        h.resolve()
        with h.a.entered():
            sa = make_socket(h.ip_a)
        with h.b.entered():
            sb = make_socket(h.ip_b)
        a_to_b = IpContext(h.ip_a, h.ip_b, sport=4791)
        b_to_a = IpContext(h.ip_b, h.ip_a, sport=4791)
        sent = [  # (packet, envelope); "hello world" looks like RPC-over-RDMA to a heuristic
            (RocePacket(Bth(Opcode.RC_SEND_ONLY, dest_qp=0x12345, psn=100, ackreq=True, se=True),
                        payload=b"hello world"), a_to_b),
            (RocePacket(Bth(Opcode.RC_RDMA_WRITE_FIRST, dest_qp=0x12345, psn=0xFFFFFF),
                        reth=Reth(va=0x7F0000001000, rkey=0xABCDEF01, dma_len=3 * 4096),
                        payload=bytes(range(256)) * 16), a_to_b),
            (RocePacket(Bth(Opcode.RC_RDMA_READ_REQUEST, dest_qp=0x000007, psn=5, ackreq=True,
                            pkey=0x8001),
                        reth=Reth(va=0x2000, rkey=0x42, dma_len=65536)), a_to_b),
            (RocePacket(Bth(Opcode.RC_ACKNOWLEDGE, dest_qp=0xFFFFFE, psn=100),
                        aeth=Aeth(syndrome=0x1F, msn=0x654321)), b_to_a),
        ]
        with Capture(h.b, "veth0", pcap) as cap:
            wire = []
            for pkt, ctx in sent:
                data = pkt.encode(ctx)
                wire.append(data)
                if ctx is a_to_b:
                    sa.sendto(data, (h.ip_b, 4791))
                else:
                    sb.sendto(data, (h.ip_a, 4791))
            bad = bytearray(wire[0])
            bad[-1] ^= 0x01                                  # a broken ICRC
            sa.sendto(bad, (h.ip_b, 4791))
            assert cap.stop(expect=5) == 5
        assert cap.kernel_dropped == 0
        sa.close()
        sb.close()
    recs = decode(pcap)
    assert len(recs) == 5
    for rec, (pkt, ctx), data in zip(recs, sent, wire):
        bth = pkt.bth
        assert rec.protocols.endswith("udp:infiniband:data") or rec.protocols.endswith("udp:infiniband")
        assert (rec.src, rec.dst, rec.sport, rec.dport) == (str(ctx.src), str(ctx.dst), 4791, 4791)
        assert (rec.opcode, rec.dest_qp, rec.psn) == (bth.opcode, bth.dest_qp, bth.psn)
        assert (rec.ackreq, rec.se, rec.pkey) == (bth.ackreq, bth.se, bth.pkey)
        assert rec.pad_count == -len(pkt.payload) % 4
        assert rec.payload == data and rec.icrc == pkt.icrc
        assert rec.df and rec.ip_id == 0                     # what roce.udp sockets send
        checked = roce_decode(rec.payload, rec.ip_context())  # ICRC over the captured envelope
        assert checked.bth == replace(bth, pad_count=rec.pad_count)
        assert bytes(checked.payload) == bytes(pkt.payload)
    write, read, ack = recs[1], recs[2], recs[3]
    assert (write.reth_va, write.reth_rkey, write.reth_len) == (0x7F0000001000, 0xABCDEF01, 3 * 4096)
    assert (read.reth_va, read.reth_rkey, read.reth_len) == (0x2000, 0x42, 65536)
    assert (ack.aeth_syndrome, ack.aeth_msn) == (0x1F, 0x654321) and ack.reth_va is None
    assert (recs[4].opcode, recs[4].psn) == (Opcode.RC_SEND_ONLY, 100)
    with pytest.raises(IcrcMismatch):
        roce_decode(recs[4].payload, recs[4].ip_context())


@pytest.mark.netns
def test_capture_on_missing_interface_fails(netns, tools, tmp_path):
    with two_hosts() as h, pytest.raises(ProcessFailed, match="exited"):
        Capture(h.a, "nosuchif0", str(tmp_path / "x.pcap"))
