"""The authenticated fabric's codec (roce.auth, the reference; roce._auth and
the rings of roce._udpio, the native path) against each other, the key file
rules, the source port formulas, and an endpoint over real UDP sockets:
native-sealed datagrams open with the reference, reference-sealed ones
with the native receive path; forged, tampered, replayed and too-old
datagrams are dropped and counted, plaintext peers pass plain.
"""
from __future__ import annotations

import asyncio
import os
import random
import select
import stat

import pytest
from hypothesis import given, settings, strategies as st

from roce import auth
from roce._auth import MacKey, Window
from roce.headers import Bth, Reth
from roce.icrc import IpContext
from roce.opcodes import Opcode
from roce.packet import RocePacket, decode
from roce.sport import PortCheck, allowed_source_ports, flow_label_to_udp_sport, hash_32, \
    port_check, rxe_source_ports
from roce.udp import make_socket, open_endpoint

KEY = auth.derive_mac_key(bytes(range(32)))
OTHER_KEY = auth.derive_mac_key(bytes(32))


# ------------------------------------------------------------------ codec
def test_seal_open_round_trip_and_every_bit_matters():
    pkt = os.urandom(60)
    d = auth.seal(KEY, pkt, 7, "192.0.2.1", "192.0.2.2", 4791, 4791)
    assert len(d) == len(pkt) + auth.TRAILER_LEN and d[:60] == pkt
    assert auth.open_sealed(KEY, d, "192.0.2.1", "192.0.2.2", 4791, 4791) == (7, pkt)
    for i in range(len(d)):
        bad = bytearray(d)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(auth.AuthError):
            auth.open_sealed(KEY, bytes(bad), "192.0.2.1", "192.0.2.2", 4791, 4791)
    for args in (("192.0.2.9", "192.0.2.2", 4791, 4791), ("192.0.2.1", "192.0.2.9", 4791, 4791),
                 ("192.0.2.1", "192.0.2.2", 4792, 4791), ("192.0.2.1", "192.0.2.2", 4791, 1)):
        with pytest.raises(auth.AuthError):
            auth.open_sealed(KEY, d, *args)                 # the pseudo header is covered
    with pytest.raises(auth.AuthError):
        auth.open_sealed(OTHER_KEY, d, "192.0.2.1", "192.0.2.2", 4791, 4791)
    with pytest.raises(auth.AuthError) as e:
        auth.open_sealed(KEY, d[:30], "192.0.2.1", "192.0.2.2", 4791, 4791)
    assert e.value.reason == "short"


def test_ipv4_and_ipv6_pseudo_headers_differ():
    assert auth.pseudo_header("192.0.2.1", "192.0.2.2", 1, 2) != \
        auth.pseudo_header("c000:201::", "c000:202::", 1, 2)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=9000), st.integers(0, (1 << 64) - 1), st.booleans())
def test_native_tag_is_the_reference_tag(packet, counter, v6):
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("198.51.100.1", "198.51.100.2")
    ps = auth.pseudo_header(src, dst, 4791, 49152)
    assert MacKey(KEY).tag(ps, packet, counter) == auth.tag(KEY, ps, packet, counter)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 62), st.lists(st.tuples(st.integers(-600, 600), st.booleans()),
                                         max_size=200))
def test_native_window_is_the_reference_window(base, steps):
    ref, nat = auth.ReplayWindow(), Window()
    c = base
    for delta, jump in steps:
        c = max(0, c + (delta * 3 if jump else delta))
        assert nat.accept(c) == ref.accept(c), c


def test_window_semantics():
    w = auth.ReplayWindow()
    assert w.accept(1000) and not w.accept(1000)            # replay
    assert w.accept(990) and not w.accept(990)              # late but new
    assert w.accept(1000 + 300)                             # a jump
    assert not w.accept(1000)                               # now 300 behind: too old
    assert w.accept(1300 - auth.WINDOW + 1) and not w.accept(1300 - auth.WINDOW)


# -------------------------------------------------------------- key files
def test_keygen_key_file_rules(tmp_path):
    path = str(tmp_path / "cluster.key")
    old = os.umask(0)
    try:
        auth.write_key_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) == 32
    key = auth.load_key_file(path)
    assert len(key) == 32 and key == auth.derive_mac_key(open(path, "rb").read())
    with pytest.raises(FileExistsError):
        auth.write_key_file(path)                           # never overwrites a key
    os.chmod(path, 0o640)
    with pytest.raises(auth.KeyFileError, match="mode 0640"):
        auth.load_key_file(path)
    os.chmod(path, 0o604)
    with pytest.raises(auth.KeyFileError, match="group and others"):
        auth.load_key_file(path)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)
        with pytest.raises(auth.KeyFileError, match="owned by uid 65534"):
            auth.load_key_file(path)
        os.chown(path, 0, -1)
    link = str(tmp_path / "link.key")
    os.symlink(path, link)
    with pytest.raises(auth.KeyFileError, match="not a regular file"):
        auth.load_key_file(link)
    with pytest.raises(auth.KeyFileError, match="not a regular file"):
        auth.load_key_file(str(tmp_path))
    with pytest.raises(auth.KeyFileError, match="No such file"):
        auth.load_key_file(str(tmp_path / "missing"))
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(auth.KeyFileError, match="31 bytes"):
        auth.load_key_file(str(short))


# ----------------------------------------------------------- source ports
def test_rxe_source_port_formulas():
    # hash_32 as include/linux/hash.h: the top bits of val * GOLDEN_RATIO_32 (mod 2^32)
    assert hash_32(0, 14) == 0 and hash_32(1, 14) == 0x61C88647 >> 18
    assert hash_32(0x11, 14) == ((0x11 * 0x61C88647) % (1 << 32)) >> 18
    # rdma_flow_label_to_udp_sport folds the 20-bit label's top 6 bits into the low 14
    assert flow_label_to_udp_sport(0) == 0xC000
    assert flow_label_to_udp_sport(0xFFFFF) == 0xC000 | (0x3FFF ^ 0x3F)
    for q in (0x11, 0x12, 0xABCDE):
        ports = rxe_source_ports(q, 0x100)
        assert all(0xC000 <= p <= 0xFFFF for p in ports)
        assert 0xC000 + hash_32(q, 14) in ports
    # the flow label of rdma_calc_flow_label is symmetric in the two QPNs
    assert rxe_source_ports(0x11, 0x22) - {0xC000 + hash_32(0x11, 14)} == \
        rxe_source_ports(0x22, 0x11) - {0xC000 + hash_32(0x22, 14)}
    assert allowed_source_ports(PortCheck.ANY, 4791, 0x11, 0x22) is None
    assert allowed_source_ports(PortCheck.DAEMON, 4791, 0x11, 0x22) == {4791}
    assert allowed_source_ports(PortCheck.AUTO, 4791, 0x11, 0x22) == \
        rxe_source_ports(0x11, 0x22) | {4791}
    with pytest.raises(ValueError, match="'bogus' is not one of"):
        port_check("bogus")


# ------------------------------------------------------- over UDP sockets
A, B, S, P = "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"


def _pkt(psn, payload=b"x" * 40):
    return RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=0x55, psn=psn),
                      reth=Reth(0x1000, 0x101, len(payload)), payload=payload)


def _recv_all(sock, timeout=1.0):
    out = []
    while select.select([sock], [], [], timeout)[0]:
        out.append(sock.recvfrom(65536))
        timeout = 0.1
    return out


def test_native_sealed_opens_with_the_reference():
    """The TX ring seals; a plain socket gets the datagrams and the reference
    opens each, with consecutive counters, and the packet inside decodes with
    a valid ICRC."""
    async def main():
        s = make_socket(S, 0)
        sport = s.getsockname()[1]
        a = await open_endpoint(A, lambda p, ip: None, port=0)
        a.set_auth(KEY, counter=1000)
        try:
            a.transmit([_pkt(i, bytes([i]) * (1 + 97 * i)) for i in range(5)], S, sport)
            await asyncio.sleep(0.05)
            got = _recv_all(s)
        finally:
            await a.aclose()
            s.close()
        return got, a.local[1], sport, a.metrics
    got, aport, sport, m = asyncio.run(main())
    assert len(got) == 5 and m.tx_sealed == 5
    for i, (data, addr) in enumerate(got):
        assert addr == (A, aport)
        counter, inner = auth.open_sealed(KEY, data, A, S, aport, sport)
        assert counter == 1000 + i
        pkt = decode(inner, IpContext(A, S, sport=aport, dport=sport))
        assert pkt.bth.psn == i and bytes(pkt.payload) == bytes([i]) * (1 + 97 * i)


def test_reference_sealed_opens_natively_and_forgeries_are_counted():
    async def main():
        got = []
        b = await open_endpoint(B, lambda p, ip, port: got.append((p.bth.psn, ip, port)),
                                port=0, ports=True)
        b.set_auth(KEY, plaintext_peers=[P])
        bport = b.local[1]
        s, p = make_socket(S, 0), make_socket(P, 0)
        sport = s.getsockname()[1]

        def sealed(psn, counter, key=KEY, src=S, sp=None):
            data = _pkt(psn).encode(IpContext(src, B, sport=sp or sport, dport=bport))
            return auth.seal(key, data, counter, src, B, sp or sport, bport)

        async def send(sock, data):
            sock.sendto(data, (B, bport))
            await asyncio.sleep(0.02)
            b.poll()

        try:
            await send(s, sealed(1, 500))                      # good
            await send(s, sealed(2, 500))                      # replayed counter
            await send(s, sealed(3, 499))                      # late but new: accepted
            await send(s, sealed(4, 501, key=OTHER_KEY))       # another cluster's key
            plain = _pkt(5).encode(IpContext(S, B, sport=sport, dport=bport))
            await send(s, plain)                               # plain RoCE from a sealed peer
            await send(s, plain + os.urandom(24))              # a made-up trailer
            await send(s, sealed(6, 502)[:-1])                 # cut short by one byte
            await send(s, sealed(7, 503, src=P))               # sealed for another source
            await send(s, sealed(8, 10_000))                   # good, far ahead
            await send(s, sealed(9, 10_000 - auth.WINDOW))     # too old now
            await send(s, b"\x00" * 5)                         # too short to carry a trailer
            await send(p, _pkt(10).encode(IpContext(P, B, sport=p.getsockname()[1],
                                                   dport=bport)))  # plaintext peer
        finally:
            await b.aclose()
            s.close()
            p.close()
        return got, b.metrics, sport
    got, m, sport = asyncio.run(main())
    assert [g[0] for g in got] == [1, 3, 8, 10]
    assert got[0][1:] == (S, sport)
    assert (m.rx_authenticated, m.rx_replayed, m.rx_auth_failed, m.rx_plaintext) == (3, 2, 6, 1)
    assert m.rx_malformed == 0 and m.rx_icrc_errors == 0   # nothing failing auth got decoded


def test_two_sealed_endpoints_with_reordering_across_batches():
    """Both directions sealed natively; many packets in batches, received
    out of order across sendmmsg calls: none is taken for a replay."""
    async def main():
        got = []
        a = await open_endpoint(A, lambda p, ip: None, port=0)
        b = await open_endpoint(B, lambda p, ip: got.append(p.bth.psn), port=0)
        a.set_auth(KEY)
        b.set_auth(KEY)
        try:
            order = list(range(400))
            random.Random(3).shuffle(order)
            for k in range(0, 400, 50):
                a.transmit([_pkt(i) for i in order[k:k + 50]], B, b.local[1])
                await asyncio.sleep(0.01)
            for _ in range(50):
                if len(got) == 400:
                    break
                await asyncio.sleep(0.02)
        finally:
            await a.aclose()
            await b.aclose()
        return got, b.metrics
    got, m = asyncio.run(main())
    assert sorted(got) == list(range(400))
    assert m.rx_authenticated == 400 and m.rx_replayed == 0 and m.rx_auth_failed == 0


def test_ring_seal_matches_reference_bytes():
    """The ring's sealed bytes (flush_bytes) equal the reference seal of the
    reference encoding, counter for counter."""
    from roce._auth import TxAuth
    from roce._codec import Envelope
    from roce._udpio import TxRing

    tx = TxRing(8)
    tx.set_auth(TxAuth(KEY, 77))
    env = Envelope(A, B, 4791, 4791)
    pkts = [_pkt(i, os.urandom(i * 13)) for i in range(6)]
    for i, pk in enumerate(pkts):
        assert tx.add(pk, env, seal=i % 2 == 0)
    out = tx.flush_bytes()
    for i, (pk, (data, addr)) in enumerate(zip(pkts, out)):
        plain = pk.encode(IpContext(A, B, sport=4791, dport=4791))
        want = auth.seal(KEY, plain, 77 + i // 2, A, B, 4791, 4791) if i % 2 == 0 else plain
        assert data == want and addr == (B, 4791)
    with pytest.raises(ValueError, match="set_auth"):
        TxRing(2).add(pkts[0], env, seal=True)



def test_sealed_endpoints_over_ipv6():
    """IPv6: the pseudo header carries 16-byte addresses and version 6."""
    async def main():
        got = []
        a = await open_endpoint("::1", lambda p, ip: None, port=0)
        b = await open_endpoint("::1", lambda p, ip: got.append((p.bth.psn, ip)), port=0)
        a.set_auth(KEY)
        b.set_auth(KEY)
        try:
            a.transmit([_pkt(i) for i in range(10)], "::1", b.local[1])
            for _ in range(50):
                if len(got) == 10:
                    break
                await asyncio.sleep(0.02)
        finally:
            await a.aclose()
            await b.aclose()
        return got, b.metrics
    got, m = asyncio.run(main())
    assert got == [(i, "::1") for i in range(10)]
    assert m.rx_authenticated == 10 and m.rx_auth_failed == 0


def test_reference_receive_path_authenticates_too():
    """``datagram_received`` (the reference path, for tools) applies the same
    rules: sealed and new is delivered, a replay and a forgery are counted."""
    async def main():
        got = []
        b = await open_endpoint(B, lambda p, ip: got.append(p.bth.psn), port=0)
        b.set_auth(KEY)
        try:
            bport = b.local[1]
            data = _pkt(1).encode(IpContext(S, B, sport=4791, dport=bport))
            sealed = auth.seal(KEY, data, 9, S, B, 4791, bport)
            b.datagram_received(sealed, (S, 4791))
            b.datagram_received(sealed, (S, 4791))                   # replay
            b.datagram_received(sealed, (S, 4792))                   # another port: bad tag
            b.datagram_received(data, (S, 4791))                     # plain
        finally:
            await b.aclose()
        return got, b.metrics
    got, m = asyncio.run(main())
    assert got == [1] and m.rx_replayed == 1 and m.rx_auth_failed == 2
