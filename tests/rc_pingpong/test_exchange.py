"""The 52-byte address message: golden bytes, round trips, strict decoding."""
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verbs import PSN_MASK, QPN_MASK
from vrdma.rc_pingpong import exchange
from vrdma.rc_pingpong.errors import MessageFormatError
from vrdma.rc_pingpong.exchange import Dest

MAPPED = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
RXE_LINK_LOCAL = bytes.fromhex("fe800000000000000250b6fffe1c2d3e")

dests = st.builds(Dest, st.integers(0, 0xFFFF), st.integers(0, QPN_MASK), st.integers(0, PSN_MASK),
                  st.binary(min_size=16, max_size=16))


def c_gid_to_wire_gid(gid: bytes) -> str:
    """rdma-core's gid_to_wire_gid, step by step: four native-endian u32
    words, each printed as %08x after htobe32."""
    words = struct.unpack("=4I", gid)
    return "".join("%08x" % struct.unpack("=I", struct.pack(">I", w))[0] for w in words)


def test_message_is_sizeof_the_c_buffer():
    assert exchange.MSG_SIZE == len(b"0000:000000:000000:00000000000000000000000000000000\0") == 52
    assert exchange.DONE == b"done\0"


@pytest.mark.parametrize("dest, wire", [
    (Dest(0, 0x123, 0xABCDEF, MAPPED), b"0000:000123:abcdef:00000000000000000000ffffc0000201\0"),
    (Dest(0x1A, 0x11, 0x5F6A2B, RXE_LINK_LOCAL), b"001a:000011:5f6a2b:fe800000000000000250b6fffe1c2d3e\0"),
    (Dest(0, 0x100, 0, bytes(16)), b"0000:000100:000000:00000000000000000000000000000000\0"),
])
def test_golden_bytes(dest, wire):
    assert exchange.encode(dest) == wire
    assert exchange.decode(wire) == dest


@given(dests)
def test_round_trip(dest):
    msg = exchange.encode(dest)
    assert len(msg) == exchange.MSG_SIZE
    assert exchange.decode(msg) == dest


@given(st.binary(min_size=16, max_size=16))
def test_gid_digits_are_what_gid_to_wire_gid_prints(gid):
    assert exchange.encode(Dest(0, 0, 0, gid))[19:51].decode() == c_gid_to_wire_gid(gid)


def test_upper_case_hex_is_accepted_as_sscanf_does():
    assert exchange.decode(b"00AB:0000FF:ABCDEF:FE800000000000000250B6FFFE1C2D3E\0") == \
        Dest(0xAB, 0xFF, 0xABCDEF, RXE_LINK_LOCAL)


GOOD = b"0000:000123:abcdef:00000000000000000000ffffc0000201\0"


@pytest.mark.parametrize("msg, field", [
    (GOOD[:-1], "length"),
    (GOOD + b"\0", "length"),
    (b"", "length"),
    (GOOD[:-1] + b"x", "terminator"),
    (GOOD[:4] + b"-" + GOOD[5:], "separator at byte 4"),
    (GOOD[:18] + b" " + GOOD[19:], "separator at byte 18"),
    (b"0x12" + GOOD[4:], "lid"),
    (GOOD[:5] + b"00012g" + GOOD[11:], "qpn"),
    (GOOD[:12] + b"+bcdef" + GOOD[18:], "psn"),
    (GOOD[:19] + b"z" * 32 + b"\0", "gid"),
    (GOOD[:19] + "é".encode("latin-1") * 32 + b"\0", "gid"),
])
def test_malformed_messages_name_the_field(msg, field):
    with pytest.raises(MessageFormatError) as ei:
        exchange.decode(msg)
    assert ei.value.field == field
    assert field in str(ei.value)


@pytest.mark.parametrize("dest, field", [
    (Dest(0x10000, 1, 1, MAPPED), "lid"),
    (Dest(0, 1 << 24, 1, MAPPED), "qpn"),
    (Dest(0, 1, -1, MAPPED), "psn"),
    (Dest(0, 1, 1, MAPPED[:15]), "gid"),
])
def test_unencodable_destinations_name_the_field(dest, field):
    with pytest.raises(MessageFormatError) as ei:
        exchange.encode(dest)
    assert ei.value.field == field


def test_global_means_an_interface_id_as_in_pp_connect_ctx():
    assert Dest(0, 2, 0, MAPPED).is_global
    assert Dest(0, 2, 0, RXE_LINK_LOCAL).is_global
    assert not Dest(0, 2, 0, bytes(16)).is_global
    assert not Dest(0, 2, 0, bytes.fromhex("fe80") + bytes(14)).is_global


def test_gid_text_is_inet_ntop():
    assert Dest(0, 2, 0, MAPPED).gid_text == "::ffff:192.0.2.1"
    assert Dest(0, 2, 0, RXE_LINK_LOCAL).gid_text == "fe80::250:b6ff:fe1c:2d3e"
    assert Dest(0, 2, 0, bytes(16)).gid_text == "::"
    assert Dest(0, 2, 0, MAPPED).gid_text == socket.inet_ntop(socket.AF_INET6, MAPPED)
