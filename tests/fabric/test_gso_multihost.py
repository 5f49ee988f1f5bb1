"""UDP GSO between two daemons in two namespaces (roce._udpio, roce.udp).

The same stream of RDMA WRITEs of mixed sizes (1 B .. 300 KB, path MTU 4096
and 1024) and a SEND runs with fresh daemons each time: GSO on,
GSO off (``VRDMA_UDP_GSO=0``), and GSO on over a veth without checksum
offload (MTU 4096 only; Linux >= 6.11 checksums such GSO sends in software; older kernels
refuse them with EIO, and the ring falls back: that path is forced in
tests/roce/test_gso.py, as no device setting refuses GSO on this kernel and
it has no IPsec). Target memory and completions are identical in all rounds.
dumpcap captures host A's side (the veth's own UDP segmentation is
off, so the stack cuts the GSO sends before the capture point, as for a NIC
without USO): tshark decodes the same request packets each time, one RoCE
packet per datagram, each ICRC valid for the IP envelope on the wire; with
GSO the segments of a send carry IPv4 IDs 0, 1, ..., without it all are 0.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import random
import shutil
import socket
import struct
import sys

import pytest

from guest_lib import RecvWR, SGE, SendWR
from guest_lib.endpoint import RcEndpoint
from roce.opcodes import Opcode
from roce.packet import decode as roce_decode
from verbs import WrOpcode

netlab = pytest.importorskip("netlab.ns")
from netlab.capture import Capture, decode  # noqa: E402

pytestmark = pytest.mark.netns

A_IP, B_IP = "203.0.113.1", "203.0.113.2"
BUF = 2 << 20
WRITES = [1, 100, 4095, 4096, 4097, 12288, 65536, 65536 + 3, 300000]
SEND = 70000

_SIOCETHTOOL = 0x8946
_ETHTOOL_GSTRINGS, _ETHTOOL_GSSET_INFO, _ETHTOOL_SFEATURES = 0x1B, 0x37, 0x3B
_ETH_SS_FEATURES = 4
_ETH_GSTRING_LEN = 32


def _ethtool(s: socket.socket, ifname: str, buf) -> None:
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)


def set_feature(ns, ifname: str, feature: str, on: bool) -> None:
    """``ethtool -K IF FEATURE on|off`` through SIOCETHTOOL (no ethtool binary)."""
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        info = ctypes.create_string_buffer(struct.pack("=IIQI", _ETHTOOL_GSSET_INFO, 0,
                                                       1 << _ETH_SS_FEATURES, 0))
        _ethtool(s, ifname, info)
        count = struct.unpack_from("=I", info.raw, 16)[0]
        names = ctypes.create_string_buffer(struct.pack("=III", _ETHTOOL_GSTRINGS, _ETH_SS_FEATURES, count)
                                            + bytes(count * _ETH_GSTRING_LEN))
        _ethtool(s, ifname, names)
        table = [names.raw[12 + i * _ETH_GSTRING_LEN:12 + (i + 1) * _ETH_GSTRING_LEN].split(b"\0")[0].decode()
                 for i in range(count)]
        bit = table.index(feature)
        blocks = [[0, 0] for _ in range((count + 31) // 32)]
        blocks[bit // 32] = [1 << (bit % 32), (1 << (bit % 32)) if on else 0]
        req = ctypes.create_string_buffer(struct.pack("=II", _ETHTOOL_SFEATURES, len(blocks))
                                          + b"".join(struct.pack("=II", *b) for b in blocks))
        _ethtool(s, ifname, req)


class Host:
    def __init__(self, ns, ip, sock, gso: bool):
        env = dict(os.environ, VRDMA_UDP_GSO="1" if gso else "0")
        self.ns, self.ip, self.sock = ns, ip, sock
        self.proc = ns.popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock,
                              "--roce-addr", ip], env=env)
        self.proc.expect("listening", timeout=20)

    def stop(self):
        return self.proc.stop()


def _connect(ha, hb, mtu):
    a, b = RcEndpoint(ha.sock, buf_size=BUF), RcEndpoint(hb.sock, buf_size=BUF)
    kw = dict(path_mtu=mtu, timeout=12, retry_cnt=7, rnr_retry=7, min_rnr_timer=1)
    a.connect(b.info(), sq_psn=0x100, rq_psn=0x900000, **kw)
    b.connect(a.info(), sq_psn=0x900000, rq_psn=0x100, **kw)
    return a, b


def _requests(mtu_bytes):
    return sum(-(-n // mtu_bytes) for n in WRITES) + -(-SEND // mtu_bytes)


def _stream(a, b, rng):
    """The WRITEs (packed one after another in B's buffer) and one SEND;
    every completion of both sides."""
    data = rng.randbytes(sum(WRITES))
    a.mr.write(data, len(data), 0)
    b.qp.post_recv(RecvWR(77, 1, [SGE(b.mr.buf + len(data), SEND, b.mr.lkey)]))
    off = 0
    for i, n in enumerate(WRITES):
        a.qp.post_send(SendWR(i, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf + off, n, a.mr.lkey)],
                              remote_addr=b.mr.buf + off, rkey=b.mr.rkey))
        off += n
    a.qp.post_send(SendWR(99, WrOpcode.SEND, 1, [SGE(a.mr.buf, SEND, a.mr.lkey)]))
    wcs = [(w.wr_id, w.status, w.opcode, w.byte_len) for w in a.poll(len(WRITES) + 1, 60.0)]
    w = b.poll_one(60.0)
    wcs.append((w.wr_id, w.status, w.opcode, w.byte_len))
    return wcs, b.mr.read(len(data) + SEND, 0)


def _run(tmp_path, name, gso, tx_checksum, mtu):
    """One round with fresh namespaces and daemons: completions, B's memory,
    and the tshark records of the capture on A's veth."""
    with netlab.Namespace() as na, netlab.Namespace() as nb:
        netlab.veth_pair(na, nb, f"{A_IP}/24", f"{B_IP}/24", tx_checksum=tx_checksum)
        for ns in (na, nb):
            set_feature(ns, "veth0", "tx-udp-segmentation", False)
        ha = Host(na, A_IP, str(tmp_path / f"{name}a.sock"), gso)
        hb = Host(nb, B_IP, str(tmp_path / f"{name}b.sock"), gso)
        try:
            a, b = _connect(ha, hb, mtu)
            pcap = str(tmp_path / f"{name}.pcap")
            try:
                with Capture(na, "veth0", pcap) as cap:
                    out = _stream(a, b, random.Random(17))
                    cap.wait_for(_requests(128 << mtu))
            finally:
                a.close()
                b.close()
        finally:
            ha.stop()
            hb.stop()
    return out, decode(pcap)


def _check_wire(recs, gso):
    """Every datagram one RoCE packet with a valid ICRC for its envelope; the
    request packets as (opcode, PSN, payload)."""
    ids = []
    req = []
    for r in recs:
        assert "infiniband" in r.protocols and r.df
        pkt = roce_decode(r.payload, r.ip_context())     # raises on a bad ICRC
        assert pkt.icrc == r.icrc
        if r.src == A_IP:
            ids.append(r.ip_id)
            req.append((pkt.bth.opcode, pkt.bth.psn, bytes(pkt.payload)))
    if gso:
        assert max(ids) > 0 and all(i < 64 for i in ids)
    else:
        assert set(ids) == {0}
    return req


@pytest.mark.parametrize("mtu", [5, 3], ids=["mtu4096", "mtu1024"])
def test_gso_on_off_and_refused_give_the_same_memory_completions_and_wire(tmp_path, mtu):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("dumpcap") is None or shutil.which("tshark") is None:
        pytest.skip("dumpcap/tshark not installed")
    modes = (("on", True, True), ("off", False, True)) + ((("no_csum", True, False),) if mtu == 5 else ())
    rounds = {name: _run(tmp_path, name, gso, csum, mtu) for name, gso, csum in modes}
    (wcs, mem), recs = rounds["off"]
    assert [w[:2] for w in wcs] == [(i, 0) for i in range(len(WRITES))] + [(99, 0), (77, 0)]
    want = _check_wire(recs, gso=False)
    assert len(want) >= _requests(128 << mtu)
    assert want[0][0] == Opcode.RC_RDMA_WRITE_ONLY and want[0][1] == 0x100
    for name in rounds.keys() - {"off"}:
        (w2, m2), r2 = rounds[name]
        assert w2 == wcs and m2 == mem, name
        assert _check_wire(r2, gso=True) == want, name
