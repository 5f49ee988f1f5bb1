"""Codec tests: headers against their construct definitions, opcode table,
packet encode/decode, ICRC against scapy's independent implementation, and
IPv4 ID recovery."""
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import IP, UDP, raw
from scapy.layers.inet6 import IPv6
from scapy.contrib.roce import BTH as ScapyBTH, AETH as ScapyAETH

from roce import errors
from roce.headers import Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth
from roce.icrc import IpContext, compute_icrc, icrc_to_bytes, solve_ipv4_id
from roce.opcodes import OPCODE_TABLE, Ext, Kind, Opcode, Position, opinfo
from roce.packet import RocePacket, decode
from verbs import AethType, NakCode

u = lambda bits: st.integers(0, (1 << bits) - 1)  # noqa: E731

bths = st.builds(Bth, opcode=u(8), dest_qp=u(24), psn=u(24), se=st.booleans(), m=st.booleans(),
                 pad_count=u(2), tver=u(4), pkey=u(16), fecn=st.booleans(), becn=st.booleans(),
                 resv6=u(6), ackreq=st.booleans(), resv7=u(7))
EXT_STRATS = {
    Reth: st.builds(Reth, u(64), u(32), u(32)),
    Aeth: st.builds(Aeth, u(8), u(24)),
    ImmDt: st.builds(ImmDt, u(32)),
    AtomicEth: st.builds(AtomicEth, u(64), u(32), u(64), u(64)),
    AtomicAckEth: st.builds(AtomicAckEth, u(64)),
    Deth: st.builds(Deth, u(32), u(24)),
    Ieth: st.builds(Ieth, u(32)),
}


@given(bths)
def test_bth_fast_path_matches_construct(b):
    wire = b.pack()
    assert len(wire) == 12
    assert wire == Bth.CODEC.build(b.to_construct())
    assert Bth.unpack_from(wire) == b
    assert Bth.from_construct(Bth.CODEC.parse(wire)) == b


def test_bth_layout_fixture():
    b = Bth(opcode=0x04, dest_qp=0x123456, psn=0xABCDEF, se=True, m=False, pad_count=3,
            pkey=0xFFFF, ackreq=True)
    assert b.pack().hex() == "04b0ffff0012345680abcdef"


@pytest.mark.parametrize("cls", list(EXT_STRATS))
@settings(max_examples=50)
@given(data=st.data())
def test_ext_header_round_trip(cls, data):
    h = data.draw(EXT_STRATS[cls])
    wire = h.pack()
    assert len(wire) == cls.SIZE
    assert wire == cls.CODEC.build(h.to_construct())
    assert cls.unpack_from(wire) == h
    assert cls.from_construct(cls.CODEC.parse(wire)) == h
    # with an offset inside a larger buffer
    buf = bytearray(3 + cls.SIZE)
    h.pack_into(buf, 3)
    assert cls.unpack_from(buf, 3) == h


def test_deth_ignores_reserved_byte_on_receive():
    wire = bytes.fromhex("11223344" "ff" "000042")
    assert Deth.unpack_from(wire) == Deth(0x11223344, 0x42)
    assert Deth(0x11223344, 0x42).pack() == bytes.fromhex("1122334400000042")


@pytest.mark.parametrize("h,field", [
    (Bth(opcode=0, dest_qp=1 << 24, psn=0), "dest_qp"),
    (Bth(opcode=0, dest_qp=0, psn=-1), "psn"),
    (Bth(opcode=256, dest_qp=0, psn=0), "opcode"),
    (Reth(1 << 64, 0, 0), "va"),
    (Aeth(0, 1 << 24), "msn"),
    (Deth(0, 1 << 24), "src_qp"),
    (ImmDt("x"), "imm"),
])
def test_pack_range_errors_name_the_field(h, field):
    with pytest.raises(errors.FieldRange) as ei:
        h.pack()
    assert ei.value.field.endswith(field)


@pytest.mark.parametrize("cls", [Bth, *EXT_STRATS])
def test_truncated_header(cls):
    with pytest.raises(errors.TruncatedPacket):
        cls.unpack_from(bytes(cls.SIZE - 1))


def test_aeth_helpers():
    a = Aeth.ack(msn=0x10203, credits=5)
    assert a.type is AethType.ACK and a.credits == 5 and a.msn == 0x10203
    assert a.pack() == bytes([0x05, 0x01, 0x02, 0x03])
    r = Aeth.rnr_nak(msn=1, timer=14)
    assert r.type is AethType.RNR_NAK and r.rnr_timer == 14 and r.syndrome == 0x20 | 14
    n = Aeth.nak(msn=2, code=NakCode.REM_ACCESS)
    assert n.type is AethType.NAK and n.nak_code == 2 and n.syndrome == 0x62
    assert Aeth.nak(0, NakCode.PSN_SEQ_ERR).syndrome == 0x60
    with pytest.raises(errors.FieldRange):
        Aeth.rnr_nak(0, 32)


# ---------------------------------------------------------------- opcodes
def test_opcode_table_facts():
    assert set(OPCODE_TABLE) == {int(o) for o in Opcode}
    assert opinfo(0x0C).kind is Kind.READ_REQUEST and not opinfo(0x0C).has_payload
    assert opinfo(0x0B).exts == (Ext.RETH, Ext.IMMDT) and opinfo(0x0B).length == 32
    assert opinfo(0x12).exts == (Ext.AETH, Ext.ATOMIC_ACK_ETH) and opinfo(0x12).length == 24
    assert opinfo(0x13).length == 40 and opinfo(0x14).offsets[Ext.ATOMIC_ETH] == 12
    assert opinfo(0x65).exts == (Ext.DETH, Ext.IMMDT) and opinfo(0x65).length == 24
    assert opinfo(0x17).has_inv and opinfo(0x17).position is Position.ONLY
    assert opinfo(0x0E).exts == () and opinfo(0x0E).is_response
    assert opinfo(0x01).position is Position.MIDDLE and not opinfo(0x01).completes
    assert opinfo(0x09).completes and not opinfo(0x08).completes
    for info in OPCODE_TABLE.values():
        assert info.length == 12 + sum(e.size for e in info.exts)


@pytest.mark.parametrize("code", [c for c in range(256) if c not in OPCODE_TABLE] + [-1, 1000])
def test_unknown_opcode_is_typed(code):
    with pytest.raises(errors.UnknownOpcode) as ei:
        opinfo(code)
    assert ei.value.value == code


# ---------------------------------------------------------------- packets
CTX4 = IpContext("192.0.2.1", "192.0.2.2", sport=49152)
CTX6 = IpContext("2001:db8::1", "2001:db8::2", sport=50000, tos=0x28, flow_label=0x12345)


def make_packet(opcode, payload, *, psn=0x123456, qp=0x42):
    info = opinfo(opcode)
    kw = {}
    for e in info.exts:
        kw[e.value] = {Ext.RETH: Reth(0x1122334455667788, 0xAABBCCDD, 0x1000),
                       Ext.AETH: Aeth.ack(7),
                       Ext.IMMDT: ImmDt(0xCAFEBABE),
                       Ext.ATOMIC_ETH: AtomicEth(0x1000, 0x55, 3, 9),
                       Ext.ATOMIC_ACK_ETH: AtomicAckEth(0xFEEDFACE00000001),
                       Ext.DETH: Deth(0x80010000, 0x77),
                       Ext.IETH: Ieth(0x99)}[e]
    return RocePacket(Bth(opcode=opcode, dest_qp=qp, psn=psn, ackreq=info.ends), **kw,
                      payload=payload if info.has_payload else b"")


@pytest.mark.parametrize("opcode", sorted(OPCODE_TABLE))
@settings(max_examples=25)
@given(payload=st.binary(max_size=64))
def test_packet_round_trip_every_opcode(opcode, payload):
    for ctx in (CTX4, CTX6):
        p = make_packet(opcode, payload)
        wire = p.encode(ctx)
        assert len(wire) % 4 == 0
        q = decode(wire, ctx)
        assert q.bth.pad_count == (-len(p.payload)) % 4
        assert bytes(q.payload) == bytes(p.payload)
        for e in opinfo(opcode).exts:
            assert getattr(q, e.value) == getattr(p, e.value)
        assert q.icrc == p.icrc


def _scapy_bytes(ctx, wire):
    """Build the same packet with scapy: BTH fields from our BTH, everything
    after the BTH (extension headers, payload, pad) as raw payload, and let
    scapy's BTH.post_build compute the ICRC."""
    b = Bth.unpack_from(wire)
    sb = ScapyBTH(opcode=b.opcode, solicited=b.se, migreq=b.m, padcount=b.pad_count,
                  version=b.tver, pkey=b.pkey, dqpn=b.dest_qp, ackreq=b.ackreq, psn=b.psn)
    if ctx.version == 4:
        ip = IP(src=str(ctx.src), dst=str(ctx.dst), id=ctx.ip_id, flags="DF" if ctx.df else 0,
                ttl=ctx.ttl, tos=ctx.tos)
        hlen = 20
    else:
        ip = IPv6(src=str(ctx.src), dst=str(ctx.dst), tc=ctx.tos, fl=ctx.flow_label,
                  hlim=ctx.ttl)
        hlen = 40
    whole = raw(ip / UDP(sport=ctx.sport, dport=ctx.dport) / sb / wire[12:-4])
    return whole[:hlen], whole[hlen + 8:]


@pytest.mark.parametrize("opcode", sorted(OPCODE_TABLE))
@pytest.mark.parametrize("plen", [0, 1, 2, 3, 4, 257])
def test_bytes_and_icrc_match_scapy(opcode, plen):
    for ctx in (CTX4, CTX6, IpContext("10.1.2.3", "10.3.2.1", 1234, ip_id=0xBEEF, df=False)):
        wire = make_packet(opcode, bytes((i * 7) & 0xFF for i in range(plen))).encode(ctx)
        ip_hdr, theirs = _scapy_bytes(ctx, wire)
        assert theirs == wire
        assert ctx.headers(len(wire))[0][:10] == ip_hdr[:10]  # same IP header up to the checksum


def test_scapy_aeth_layer_agrees():
    wire = make_packet(Opcode.RC_ACKNOWLEDGE, b"").encode(CTX4)
    s = ScapyBTH(wire[:-4] + wire[-4:])
    assert s[ScapyAETH].syndrome == Aeth.ack(7).syndrome and s[ScapyAETH].msn == 7


def test_icrc_seed_is_rxe_seed():
    # rxe starts crc32_le (no pre/post inversion) from 0xdebb20e3 = CRC state
    # after all-ones init and 8 bytes of 0xff (the masked LRH).
    assert zlib.crc32(b"\xff" * 8) ^ 0xFFFFFFFF == 0xDEBB20E3


def test_icrc_ignores_masked_fields_only():
    wire = make_packet(Opcode.RC_SEND_ONLY, b"hello").encode(CTX4)
    ip, udp = CTX4.headers(len(wire))
    ib = wire[:-4]
    base = compute_icrc(ip, udp, ib)
    ip2 = bytearray(ip)
    ip2[1] ^= 0xFF       # TOS
    ip2[8] ^= 0x0F       # TTL
    ip2[10] ^= 0x55      # checksum
    udp2 = bytearray(udp)
    udp2[6:8] = b"\x12\x34"
    ib2 = bytearray(ib)
    ib2[4] ^= 0xC0 | 0x3F  # FECN/BECN/resv6
    assert compute_icrc(ip2, udp2, ib2) == base
    ip3 = bytearray(ip)
    ip3[5] ^= 1          # IPv4 ID is covered
    assert compute_icrc(ip3, udp, ib) != base
    ib3 = bytearray(ib)
    ib3[7] ^= 1          # dest QP is covered
    assert compute_icrc(ip, udp, ib3) != base


def test_icrc_rejects_bad_ip_header():
    with pytest.raises(errors.BadIpHeader):
        compute_icrc(bytes(24), bytes(8), bytes(12))
    with pytest.raises(errors.BadIpHeader):
        compute_icrc(bytes([0x45]) + bytes(19), bytes(7), bytes(12))
    with pytest.raises(errors.BadIpHeader):
        IpContext("192.0.2.1", "::1", 1)
    with pytest.raises(errors.FieldRange):
        IpContext("192.0.2.1", "192.0.2.2", 70000)


# ----------------------------------------------------------- decode errors
def test_decode_errors_are_typed():
    good = make_packet(Opcode.RC_RDMA_WRITE_FIRST, b"abcdef").encode(CTX4)
    with pytest.raises(errors.TruncatedPacket):
        decode(good[:15], CTX4)
    with pytest.raises(errors.TruncatedPacket) as ei:
        decode(good[:28], None)     # BTH+RETH but no ICRC room
    assert ei.value.value == 28
    bad = bytearray(good)
    bad[0] = 0x15
    with pytest.raises(errors.UnknownOpcode):
        decode(bad, None)
    bad = bytearray(good)
    bad[1] |= 0x01
    with pytest.raises(errors.BadTransportVersion):
        decode(bad, None)
    bad = bytearray(good)
    bad[-1] ^= 0x80
    with pytest.raises(errors.IcrcMismatch) as ei:
        decode(bad, CTX4)
    assert ei.value.received == int.from_bytes(bad[-4:], "little")
    ack = make_packet(Opcode.RC_ACKNOWLEDGE, b"").encode(CTX4)
    with pytest.raises(errors.UnexpectedPayload):
        decode(ack[:-4] + b"\0\0\0\0" + ack[-4:], None)
    # pad count larger than payload+pad
    p = make_packet(Opcode.RC_SEND_ONLY, b"").encode(CTX4)
    bad = bytearray(p)
    bad[1] |= 0x30
    with pytest.raises(errors.BadPadCount):
        decode(bad, None)
    # every prefix of a valid packet fails with a MalformedPacket, never anything else
    for n in range(len(good)):
        with pytest.raises(errors.MalformedPacket):
            decode(good[:n], CTX4)


def test_encode_rejects_inconsistent_headers():
    with pytest.raises(errors.MalformedPacket):
        RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=1, psn=0)).encode(CTX4)
    with pytest.raises(errors.MalformedPacket):
        RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=1, psn=0), reth=Reth(0, 0, 0)).encode(CTX4)
    with pytest.raises(errors.UnexpectedPayload):
        RocePacket(Bth(opcode=Opcode.RC_ACKNOWLEDGE, dest_qp=1, psn=0), aeth=Aeth.ack(0),
                   payload=b"x").encode(CTX4)


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_decode_never_crashes_on_garbage(data):
    try:
        decode(data, CTX4)
    except errors.MalformedPacket:
        pass


# ------------------------------------------------------------- ID solving
@settings(max_examples=100)
@given(ident=u(16), plen=st.integers(0, 2000), opcode=st.sampled_from(sorted(OPCODE_TABLE)))
def test_ipv4_id_recovery_round_trip(ident, plen, opcode):
    ctx = IpContext("198.51.100.7", "198.51.100.9", 40000, ip_id=ident)
    wire = make_packet(opcode, bytes(plen)).encode(ctx)
    ip, udp = ctx.with_id(0).headers(len(wire))
    received = int.from_bytes(wire[-4:], "little")
    assert solve_ipv4_id(ip, udp, wire[:-4], received) == ident
    q = decode(wire, ctx.with_id(0), recover_ipv4_id=True)
    assert q.ip_id == ident


@pytest.mark.parametrize("flip", range(32))
def test_ipv4_id_recovery_rejects_corruption(flip):
    ctx = IpContext("198.51.100.7", "198.51.100.9", 40000, ip_id=0x3A5C)
    wire = make_packet(Opcode.RC_SEND_ONLY, b"payload!").encode(ctx)
    ip, udp = ctx.headers(len(wire))
    bad = int.from_bytes(wire[-4:], "little") ^ (1 << flip)
    got = solve_ipv4_id(ip, udp, wire[:-4], bad)
    # For this packet length no single flipped ICRC bit is explained by a
    # 16-bit ID change (checked for all 32 bits).
    assert got is None
    with pytest.raises(errors.IcrcMismatch) as ei:
        decode(wire[:-4] + icrc_to_bytes(bad), ctx.with_id(0), recover_ipv4_id=True)
    assert ei.value.expected is None
