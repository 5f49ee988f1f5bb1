"""Tier 1: vhost-user codec round trips and syntax validation (no I/O)."""
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.errors import MessageError
from vhost_user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MAX_PAYLOAD,
    RULES,
    VERSION,
    ConfigSpace,
    FrontendReq,
    MemRegionDesc,
    MemTable,
    Message,
    SingleMemRegion,
    VringAddr,
    VringState,
    check_syntax,
    decode_header,
    decode_u64,
    encode_u64,
    parse_request,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def regions(draw):
    size = draw(st.integers(1, 2**40))
    gpa = draw(st.integers(0, 2**64 - 1 - size))
    uva = draw(st.integers(0, 2**64 - 1 - size))
    off = draw(st.integers(0, 2**64 - 1 - size))
    return MemRegionDesc(gpa, size, uva, off)


@given(u32, u32)
def test_vring_state_roundtrip(index, num):
    s = VringState(index, num)
    data = s.encode()
    assert data == struct.pack("<II", index, num)
    assert VringState.decode(data) == s


@given(u32, st.sampled_from([0, 1]), u64, u64, u64, u64)
def test_vring_addr_roundtrip(index, flags, desc, used, avail, log):
    a = VringAddr(index, flags, desc, used, avail, log)
    data = a.encode()
    # spec order: index, flags, descriptor, used, available, log
    assert data == struct.pack("<IIQQQQ", index, flags, desc, used, avail, log)
    assert VringAddr.decode(data) == a


def test_vring_addr_unknown_flags_rejected():
    with pytest.raises(MessageError, match="unknown flags 0x2"):
        VringAddr.decode(struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0))


@given(st.lists(regions(), min_size=1, max_size=8))
def test_mem_table_roundtrip(rs):
    t = MemTable(tuple(rs))
    data = t.encode()
    assert len(data) == 8 + 8 * 32  # QEMU's fixed-size layout
    assert struct.unpack_from("<I", data)[0] == len(rs)
    assert MemTable.decode(data) == t
    # the used part alone is accepted too
    assert MemTable.decode(data[: 8 + 32 * len(rs)]) == t


@given(regions())
def test_single_region_roundtrip(r):
    data = SingleMemRegion(r).encode()
    assert len(data) == 40 and data[:8] == b"\0" * 8
    assert SingleMemRegion.decode(data).region == r


@pytest.mark.parametrize("n", [0, 9, 2**32 - 1])
def test_mem_table_bad_count(n):
    data = struct.pack("<II", n, 0) + b"\0" * 256
    with pytest.raises(MessageError, match=f"region count {n}"):
        MemTable.decode(data)


def test_mem_table_short_payload():
    data = struct.pack("<II", 3, 0) + b"\0" * 64  # room for 2 regions only
    with pytest.raises(MessageError, match="does not fit 3 regions"):
        MemTable.decode(data)


@pytest.mark.parametrize("gpa,size,uva,off,what", [
    (2**64 - 4096, 8192, 0, 0, "guest address"),
    (0, 4096, 2**64 - 1, 0, "user address"),
    (0, 4096, 0, 2**64 - 100, "mmap offset"),
    (0x1000, 0, 0, 0, "size 0"),
])
def test_region_overflow_rejected(gpa, size, uva, off, what):
    data = struct.pack("<QQQQQ", 0, gpa, size, uva, off)
    with pytest.raises(MessageError, match=what):
        SingleMemRegion.decode(data)


@given(st.integers(0, 256), st.binary(max_size=256), st.sampled_from([0, 1]))
def test_config_roundtrip(offset, payload, flags):
    payload = payload[: 256 - offset]
    c = ConfigSpace(offset, len(payload), flags, payload)
    assert ConfigSpace.decode(c.encode()) == c


@pytest.mark.parametrize("offset,size,extra,match", [
    (0, 257, 257, "exceeds 256"),
    (200, 100, 100, "offset 200 \\+ size 100"),
    (0, 8, 4, "does not match size field 8"),
])
def test_config_invalid(offset, size, extra, match):
    data = struct.pack("<III", offset, size, 0) + b"\0" * extra
    with pytest.raises(MessageError, match=match):
        ConfigSpace.decode(data)


@given(u64)
def test_u64_roundtrip(v):
    assert decode_u64(encode_u64(v)) == v


@given(st.sampled_from(list(FrontendReq)), st.binary(max_size=300), st.sampled_from([0, FLAG_NEED_REPLY, FLAG_REPLY]))
def test_message_header_roundtrip(req, payload, extra):
    m = Message(req, VERSION | extra, payload)
    data = m.encode()
    assert decode_header(data[:12]) == (int(req), VERSION | extra, len(payload))
    assert data[12:] == payload


@pytest.mark.parametrize("flags,match", [(0, "version 0"), (0x2, "version 2"), (0x11, "unknown flags")])
def test_header_bad_flags(flags, match):
    with pytest.raises(MessageError, match=match):
        decode_header(struct.pack("<III", 1, flags, 0))


def test_header_oversized():
    with pytest.raises(MessageError, match="exceeds"):
        decode_header(struct.pack("<III", 1, 1, MAX_PAYLOAD + 1))


def test_header_truncated():
    with pytest.raises(MessageError, match="5 bytes"):
        decode_header(b"\x01\0\0\0\x01")


def test_unknown_request_is_typed_error():
    with pytest.raises(MessageError, match="unknown vhost-user request 9999"):
        parse_request(9999)


def test_unsupported_known_request():
    with pytest.raises(MessageError, match="SET_LOG_BASE .* not supported"):
        check_syntax(FrontendReq.SET_LOG_BASE, 16, 1)


@pytest.mark.parametrize("req", sorted(RULES, key=int))
def test_every_rule_rejects_wrong_sizes_and_fds(req):
    rule = RULES[req]
    from vhost_user.messages import PAYLOAD_SIZES

    lo, hi = PAYLOAD_SIZES[rule.payload]
    check_syntax(req, lo, rule.fds[0])
    check_syntax(req, hi, rule.fds[1])
    if hi < MAX_PAYLOAD:
        with pytest.raises(MessageError, match="payload of"):
            check_syntax(req, hi + 1, rule.fds[0])
    if lo > 0:
        with pytest.raises(MessageError, match="payload of"):
            check_syntax(req, lo - 1, rule.fds[0])
    with pytest.raises(MessageError, match="file descriptors"):
        check_syntax(req, lo, rule.fds[1] + 1)
