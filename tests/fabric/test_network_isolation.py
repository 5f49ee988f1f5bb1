"""Tenant isolation from the network (issue #12, items 1 and 3): forged
RoCEv2 packets from an attacker on the same L2 segment, against real daemons
in network namespaces.

Lab: namespaces A, B and X, each with one veth into a switch namespace (a
Linux bridge). A back-end daemon runs in each of A and B, and two in X:

* A (192.0.2.1) and B (192.0.2.2) share cluster key K; A names D as a
  plaintext peer;
* C (192.0.2.3, in X) holds another key K2;
* D (192.0.2.4, in X) has no key at all: plain RoCEv2, source ports checked.

The daemons run in threads of this process (each thread created inside its
namespace), so the tests read their counters and the victim QP's live PSN.
The attacker is a raw IP socket in X that writes any source address and
port: it sends packets with the victim's peer's address, the live QP's
expected PSN, the real rkey and a correct ICRC. Guests are process guests
over the daemons' unix sockets; every MR sits between two guard MRs, and
canary bytes are checked inside and around it.
"""
from __future__ import annotations

import dataclasses
import os
import random
import socket
import struct
import time

import pytest

from guest_lib import MR, RecvWR, SGE, SendWR
from guest_lib.endpoint import RcEndpoint
from roce.auth import TRAILER_LEN, derive_mac_key, seal
from roce.headers import Bth, Reth
from roce.icrc import IpContext
from roce.opcodes import Opcode
from roce.packet import RocePacket
from vhost_user.testing import BackendThread
from verbs import PSN_MASK, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.device import RdmaDevice
from fabric.roce import RoceFabric, RoceFabricService

netlab = pytest.importorskip("netlab.ns")

pytestmark = pytest.mark.netns

A_IP, B_IP, C_IP, D_IP, X_IP = "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"
K = derive_mac_key(bytes(range(32)))
K2 = derive_mac_key(bytes(range(1, 33)))
BUF = 64 << 10
CANARY = bytes(range(256)) * (BUF // 256)
GUARD = b"\xa5" * 4096


class Daemon:
    def __init__(self, ns, ip, path, **fabric_kw):
        self.ip = ip
        self.fabric = RoceFabric(ip, **fabric_kw)
        self.svc = RoceFabricService(self.fabric)
        fabric = self.fabric
        with ns.entered():          # the loop thread (and its socket) live in ns
            self.bt = BackendThread(path, lambda info: RdmaDevice(fabric), services=[self.svc]).start()
        self.path = path

    def udp(self) -> dict:
        return self.bt.call(lambda: dataclasses.asdict(self.svc.endpoint.metrics))

    def fab(self) -> dict:
        return self.bt.call(self.fabric.metrics.as_dict)

    def responder(self, qpn) -> tuple:
        def get():
            rc = self.fabric.wire[qpn].rc
            return rc.responder.psn, rc.state.name
        return self.bt.call(get)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    d = tmp_path_factory.mktemp("iso")
    with netlab.Namespace() as na, netlab.Namespace() as nb, netlab.Namespace() as nx, \
            netlab.Namespace() as sw:
        sw.ip("link", "add", "br0", "type", "bridge")
        for ns, addr, port in ((na, A_IP, "pa"), (nb, B_IP, "pb"), (nx, C_IP, "px")):
            netlab.veth_pair(ns, sw, f"{addr}/24", None, if_b=port)
            sw.ip("link", "set", port, "master", "br0")
        sw.ip("link", "set", "br0", "up")
        for ip in (D_IP, X_IP):
            nx.ip("addr", "add", f"{ip}/24", "dev", "veth0")
        hosts = dict(
            a=Daemon(na, A_IP, str(d / "a.sock"), mac_key=K, plaintext_peers=[D_IP]),
            b=Daemon(nb, B_IP, str(d / "b.sock"), mac_key=K),
            c=Daemon(nx, C_IP, str(d / "c.sock"), mac_key=K2),
            d=Daemon(nx, D_IP, str(d / "d.sock")),
        )
        with nx.entered():
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for ns, peers in ((na, (B_IP, C_IP, D_IP)), (nb, (A_IP, C_IP)), (nx, (A_IP, B_IP))):
            for ip in peers:
                netlab.resolve_neighbour(ns, ip)
        try:
            yield dict(hosts, raw=raw, na=na, nb=nb, nx=nx)
        finally:
            raw.close()
            for h in hosts.values():
                h.bt.stop()


class Guest:
    """An RC endpoint with its MR full of canary bytes between two guard MRs."""

    def __init__(self, daemon):
        self.ep = RcEndpoint(daemon.path, buf_size=BUF, cq_size=64)
        self.lo = MR(self.ep.pd, 4096, 0)
        self.hi = MR(self.ep.pd, 4096, 0)
        for g in (self.lo, self.hi):
            g.write(GUARD, 4096, 0)
        self.ep.mr.write(CANARY, BUF, 0)
        self.daemon = daemon
        self.qpn = self.ep.qp.qp_num
        self.mr = self.ep.mr

    def intact(self) -> bool:
        return (self.mr.read(BUF, 0) == CANARY
                and all(g.read(4096, 0) == GUARD for g in (self.lo, self.hi)))

    def close(self):
        self.ep.close()


def pair(h1, h2, **attrs):
    g1, g2 = Guest(h1), Guest(h2)
    p1, p2 = random.randrange(1 << 24), random.randrange(1 << 24)
    # the IB defaults rc_pingpong uses (~70 ms per try, 7 tries): a busy CI vCPU must not
    # turn a late ACK into RETRY_EXC_ERR; tests that want a quick failure pass their own
    kw = dict(path_mtu=3, timeout=14, retry_cnt=7, rnr_retry=7, min_rnr_timer=1) | attrs
    g1.ep.connect(g2.ep.info(), sq_psn=p1, rq_psn=p2, **kw)
    g2.ep.connect(g1.ep.info(), sq_psn=p2, rq_psn=p1, **kw)
    return g1, g2


def traffic(src: Guest, dst: Guest, tag: bytes):
    """A SEND into a posted receive and an RDMA WRITE, src -> dst, both
    completing; dst's canaries are restored after."""
    n = len(tag)
    src.mr.write(tag, n, 0)
    dst.ep.qp.post_recv(RecvWR(7, 1, [SGE(dst.mr.buf + 1024, n, dst.mr.lkey)]))
    src.ep.qp.post_send(SendWR(1, WrOpcode.SEND, 1, [SGE(src.mr.buf, n, src.mr.lkey)]))
    wc = dst.ep.poll_one(10)
    assert (wc.wr_id, wc.status, wc.opcode, wc.byte_len) == (7, 0, WcOpcode.RECV, n)
    assert dst.mr.read(n, 1024) == tag
    src.ep.qp.post_send(SendWR(2, WrOpcode.RDMA_WRITE, 1, [SGE(src.mr.buf, n, src.mr.lkey)],
                               remote_addr=dst.mr.buf + 2048, rkey=dst.mr.rkey))
    assert [(w.wr_id, w.status) for w in src.ep.poll(2, 10)] == [(1, 0), (2, 0)]
    assert dst.mr.read(n, 2048) == tag
    src.mr.write(CANARY[:n], n, 0)
    dst.mr.write(CANARY, BUF, 0)
    assert dst.intact()


def send_into_posted_receive(src: Guest, dst: Guest, tag: bytes) -> None:
    """A SEND from ``src`` takes the receive (wr_id 9) ``dst`` posted before
    the attack, which forged SENDs must not have consumed; dst's memory is
    restored after."""
    src.mr.write(tag, len(tag), 0)
    src.ep.qp.post_send(SendWR(1, WrOpcode.SEND, 1, [SGE(src.mr.buf, len(tag), src.mr.lkey)]))
    wc = dst.ep.poll_one(10)
    assert (wc.wr_id, wc.status, wc.byte_len) == (9, 0, len(tag))
    assert src.ep.poll_one(10).status == 0
    dst.mr.write(CANARY, BUF, 0)


# --------------------------------------------------------------- the attacker
def spoof(raw, src, sport, dst, dport, payload: bytes) -> None:
    """One IPv4/UDP datagram with any source address and port (DF, ID 0,
    no UDP checksum), from the attacker's namespace."""
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    raw.sendto(ip + udp + payload, (dst, 0))


def forged_write(victim: Guest, psn, off, data, src, sport, rkey=None) -> bytes:
    pkt = RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=victim.qpn, psn=psn,
                         ackreq=True),
                     reth=Reth(victim.mr.buf + off, victim.mr.rkey if rkey is None else rkey,
                               len(data)), payload=data)
    return pkt.encode(IpContext(src, victim.daemon.ip, sport=sport, dport=4791))


def forged_send(victim: Guest, psn, data, src, sport) -> bytes:
    pkt = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=victim.qpn, psn=psn, ackreq=True),
                     payload=data)
    return pkt.encode(IpContext(src, victim.daemon.ip, sport=sport, dport=4791))


def settle(daemon, key, want, timeout=5.0):
    """Wait until ``daemon``'s counter ``key`` (udp or fabric) reaches ``want``."""
    end = time.monotonic() + timeout
    while True:
        m = daemon.udp() if key.startswith("rx_auth") or key == "rx_replayed" else daemon.fab()
        if m[key] >= want or time.monotonic() > end:
            return m
        time.sleep(0.02)


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# --------------------------------------------------------------------- tests
def test_plain_daemon_checks_the_source_port(lab):
    """No key (daemon D; its peer A is one of ours, so 'auto': port 4791 or
    rxe's): forged WRITE ONLY and SEND ONLY (the fast path's opcode) with the
    peer's address but a wrong source port are dropped and counted, the
    victim QP keeps working; with the right port a forged WRITE gets through:
    the residual risk docs/fabric.md states."""
    a, d, raw = lab["a"], lab["d"], lab["raw"]
    ga, gd = pair(a, d)
    try:
        traffic(ga, gd, b"before the attack")
        psn, state = d.responder(gd.qpn)
        gd.ep.qp.post_recv(RecvWR(9, 1, [SGE(gd.mr.buf, 64, gd.mr.lkey)]))
        m0 = d.fab()
        for sport in (40000, 4790, 0xC000):
            spoof(raw, A_IP, sport, D_IP, 4791, forged_write(gd, psn, 100, b"EVIL" * 8, A_IP, sport))
            spoof(raw, A_IP, sport, D_IP, 4791, forged_send(gd, psn, b"EVIL" * 4, A_IP, sport))
        m1 = settle(d, "rx_port_mismatch", m0["rx_port_mismatch"] + 6)
        assert delta(m1, m0) == {"rx_port_mismatch": 6, "rx_packets": 6}
        assert gd.intact() and d.responder(gd.qpn) == (psn, state)
        assert gd.ep.cq.poll(1)[1] == []                    # the forged SEND completed nothing
        send_into_posted_receive(ga, gd, b"after the attack")
        # the right port: a forged WRITE lands (no key: only the address and port are checked)
        psn, _ = d.responder(gd.qpn)
        spoof(raw, A_IP, 4791, D_IP, 4791, forged_write(gd, psn, 100, b"LANDED", A_IP, 4791))
        end = time.monotonic() + 5
        while gd.mr.read(6, 100) != b"LANDED" and time.monotonic() < end:
            time.sleep(0.02)
        assert gd.mr.read(6, 100) == b"LANDED"
    finally:
        ga.close()
        gd.close()


def test_authenticated_daemon_rejects_every_forgery(lab):
    """Key K (A <-> B): forged packets with A's address and port 4791, B's
    live PSN and the real rkey, a correct ICRC, with or without a made-up
    trailer, and one with a wrong rkey (which would move the QP to ERR), all
    fail authentication, are counted, never reach the fabric; 0 bytes of the
    guest change, the QP's PSN and state do not move, and it keeps working."""
    a, b, raw = lab["a"], lab["b"], lab["raw"]
    ga, gb = pair(a, b)
    try:
        traffic(ga, gb, b"sealed traffic")
        u = b.udp()
        assert u["rx_authenticated"] > 0 and u["tx_sealed"] > 0
        psn, state = b.responder(gb.qpn)
        gb.ep.qp.post_recv(RecvWR(9, 1, [SGE(gb.mr.buf, 64, gb.mr.lkey)]))
        u0, f0 = b.udp(), b.fab()
        rng = random.Random(5)
        forged = []
        for sport in (4791, 40000):
            w = forged_write(gb, psn, 100, b"EVIL" * 8, A_IP, sport)
            s = forged_send(gb, psn, b"EVIL" * 4, A_IP, sport)
            forged += [w, s, w + rng.randbytes(TRAILER_LEN), s + rng.randbytes(TRAILER_LEN),
                       forged_write(gb, psn, 0, b"x", A_IP, sport, rkey=gb.mr.rkey ^ 0x100)]
        # a trailer whose counter is far ahead: it must not move the window either
        forged.append(forged_write(gb, psn, 0, b"y", A_IP, 4791) + (1 << 63).to_bytes(8, "big")
                      + bytes(16))
        # sealed properly, but with another cluster's key; and a sweep of PSNs around the live one
        forged += [seal(K2, forged_write(gb, psn, 0, b"z" * 64, A_IP, 4791), time.time_ns() + i,
                        A_IP, B_IP, 4791, 4791) for i in range(4)]
        forged += [forged_write(gb, (psn + k) & PSN_MASK, 8 * k % BUF, b"s" * 8, A_IP, 4791)
                   for k in range(-64, 65, 4)]
        for f in forged:
            spoof(raw, A_IP, 4791, B_IP, 4791, f)
        settle(b, "rx_auth_failed", u0["rx_auth_failed"] + len(forged))
        assert delta(b.udp(), u0) == {"rx_packets": len(forged), "rx_auth_failed": len(forged)}
        assert b.fab() == f0                                 # nothing reached the fabric
        assert gb.intact() and b.responder(gb.qpn) == (psn, state)
        assert gb.ep.cq.poll(1)[1] == []
        send_into_posted_receive(ga, gb, b"still works")
        traffic(ga, gb, b"and again")
        traffic(gb, ga, b"both ways")
    finally:
        ga.close()
        gb.close()


def test_captured_authenticated_packet_replayed_is_rejected(lab):
    """A sealed WRITE from A to B, captured on B's link, replayed by the
    attacker with A's address and port: dropped as a replay, counted, and B's
    memory keeps what the guest wrote since."""
    a, b, raw = lab["a"], lab["b"], lab["raw"]
    ga, gb = pair(a, b)
    with lab["nb"].entered():
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        cap.bind(("veth0", 0))
        cap.settimeout(0.2)
        traffic(ga, gb, b"warm up")
        while True:                                          # drop what came before
            try:
                cap.recv(65536)
            except TimeoutError:
                break
        data = b"CAPTURED WRITE"
        ga.mr.write(data, len(data), 0)
        ga.ep.qp.post_send(SendWR(2, WrOpcode.RDMA_WRITE, 1, [SGE(ga.mr.buf, len(data),
                                                                  ga.mr.lkey)],
                                  remote_addr=gb.mr.buf + 300, rkey=gb.mr.rkey))
        assert ga.ep.poll_one(10).status == 0
        assert gb.mr.read(len(data), 300) == data
        captured = []
        end = time.monotonic() + 2
        while time.monotonic() < end and not captured:
            try:
                frame = cap.recv(65536)
            except TimeoutError:
                continue
            ip = frame[14:]
            ihl = (ip[0] & 15) * 4
            if ip[9] != 17 or ip[12:16] != socket.inet_aton(A_IP):
                continue
            sport, dport = struct.unpack(">HH", ip[ihl:ihl + 4])
            udp = ip[ihl + 8:struct.unpack(">H", ip[2:4])[0]]
            if dport == 4791 and udp[0] == Opcode.RC_RDMA_WRITE_ONLY and data in udp:
                captured.append((sport, udp))
        assert captured, "the sealed WRITE was not seen on B's link"
        sport, datagram = captured[0]
        assert sport == 4791
        gb.mr.write(b"G" * len(data), len(data), 300)         # the guest writes since
        u0, f0 = b.udp(), b.fab()
        for _ in range(3):
            spoof(raw, A_IP, 4791, B_IP, 4791, datagram)
        settle(b, "rx_replayed", u0["rx_replayed"] + 3)
        assert delta(b.udp(), u0) == {"rx_packets": 3, "rx_replayed": 3}
        assert b.fab() == f0
        assert gb.mr.read(len(data), 300) == b"G" * len(data)
        traffic(ga, gb, b"after the replay")
    finally:
        cap.close()
        ga.close()
        gb.close()


def test_daemon_with_another_key_cannot_talk(lab):
    """C holds K2: its packets to B fail authentication there (counted), its
    guest's SEND ends in retry-exceeded, B's guest gets nothing."""
    b, c = lab["b"], lab["c"]
    gc, gb = pair(c, b, timeout=8, retry_cnt=2)
    try:
        gb.ep.qp.post_recv(RecvWR(9, 1, [SGE(gb.mr.buf, 64, gb.mr.lkey)]))
        m0 = b.udp()
        gc.mr.write(b"hello", 5, 0)
        gc.ep.qp.post_send(SendWR(1, WrOpcode.SEND, 1, [SGE(gc.mr.buf, 5, gc.mr.lkey)]))
        (wc,) = gc.ep.poll(1, 15)
        assert (wc.wr_id, wc.status) == (1, WcStatus.RETRY_EXC_ERR)
        m1 = b.udp()
        assert m1["rx_auth_failed"] - m0["rx_auth_failed"] >= 3       # first try + 2 retries
        assert m1["rx_authenticated"] == m0["rx_authenticated"]
        assert gb.ep.cq.poll(1)[1] == [] and gb.intact()
    finally:
        gc.close()
        gb.close()


def test_plaintext_peer_talks_plain_with_the_port_check(lab):
    """A names D plaintext: A <-> D works in plain RoCEv2 (A counts plaintext
    datagrams, seals none to D); a forged packet with D's address and a wrong
    port is still dropped by A's port check."""
    a, d, raw = lab["a"], lab["d"], lab["raw"]
    ga, gd = pair(a, d)
    try:
        u0 = a.udp()
        traffic(ga, gd, b"plain to D")
        traffic(gd, ga, b"plain from D")
        u1 = a.udp()
        assert u1["rx_plaintext"] > u0["rx_plaintext"]
        assert u1["tx_sealed"] == u0["tx_sealed"] and u1["rx_auth_failed"] == u0["rx_auth_failed"]
        assert d.udp()["rx_auth_failed"] == 0 and d.udp()["tx_sealed"] == 0
        psn, state = a.responder(ga.qpn)
        m0 = a.fab()
        spoof(raw, D_IP, 40000, A_IP, 4791, forged_write(ga, psn, 0, b"EVIL", D_IP, 40000))
        m1 = settle(a, "rx_port_mismatch", m0["rx_port_mismatch"] + 1)
        assert m1["rx_port_mismatch"] == m0["rx_port_mismatch"] + 1
        assert ga.intact() and a.responder(ga.qpn) == (psn, state)
    finally:
        ga.close()
        gd.close()
