"""The load table's wire formats (scheduler.wire): load datagrams and the
counters region round-trip; every bad input (forged, another key, truncated
at every length, absurd values, unknown kinds, torn reads) raises the typed
error naming it."""
from __future__ import annotations

import hashlib
import hmac
import math

import pytest
from hypothesis import given, settings, strategies as st

from roce.auth import derive_mac_key
from scheduler.errors import BadRow, SchedulerError
from scheduler.table import LoadRow
from scheduler.wire import (
    COUNTERS_SIZE,
    KIND_SIZE,
    LOAD_HEADER_SIZE,
    LOAD_MAGIC,
    MAX_KINDS,
    MAX_QUEUED,
    MAX_UNITS,
    MIN_LOAD_SIZE,
    VERSION,
    Absurd,
    Forged,
    KindLayout,
    LoadHeader,
    TornRead,
    Truncated,
    UnknownKind,
    WireError,
    address_bytes,
    address_text,
    decode_counters,
    decode_load,
    derive_load_key,
    encode_counters,
    encode_load,
    kind_id,
    kind_name,
    load_size,
    store_counters,
)
from virtio_rdma.constants import AccelOp

KEY = derive_load_key(bytes(range(32)))
OTHER = derive_load_key(bytes(range(1, 33)))
KINDS = [op.name.lower() for op in AccelOp]


def normal(row: LoadRow) -> tuple:
    """What the wire keeps of a row (absent queued/busy are zeros)."""
    return (row.seq, dict(row.units), dict(row.service_time),
            {k: row.queued.get(k, 0.0) for k in row.units}, {k: row.busy.get(k, 0) for k in row.units})


@st.composite
def rows(draw) -> LoadRow:
    kinds = draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=MAX_KINDS))
    units = {k: draw(st.integers(1, MAX_UNITS)) for k in kinds}
    service = {k: draw(st.floats(1e-9, 3600.0)) for k in kinds}
    queued = {k: draw(st.floats(0.0, MAX_QUEUED)) for k in kinds}
    busy = {k: draw(st.integers(0, units[k])) for k in kinds}
    return LoadRow(draw(st.integers(0, 1000)), units, service, queued, busy,
                   seq=draw(st.integers(0, 2**64 - 1)), updated=0.0)


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@settings(max_examples=200, deadline=None)
@given(rows(), addresses, st.floats(0.0078125, 2048.0, width=32))
def test_a_load_datagram_round_trips(row, address, period):
    data = encode_load(row, address, period, KEY)
    assert len(data) == load_size(len(row.units))
    ad = decode_load(data, KEY)
    assert ad.address == address_text(address_bytes(address))
    assert ad.period == period
    got = ad.row(host=7, now=12.5)
    assert (got.host, got.updated) == (7, 12.5)
    assert normal(got) == normal(row)


@settings(max_examples=200, deadline=None)
@given(rows())
def test_a_counters_region_round_trips(row):
    data = encode_counters(row)
    assert len(data) == COUNTERS_SIZE
    region = bytearray(COUNTERS_SIZE + 8)
    store_counters(region, row)
    assert bytes(region[:COUNTERS_SIZE]) == data
    got = decode_counters(data, host=3, now=1.0)
    assert (got.host, got.updated) == (3, 1.0)
    assert normal(got) == normal(row)


def test_layout_sizes_and_a_byte_fixture():
    assert (LOAD_HEADER_SIZE, KIND_SIZE, COUNTERS_SIZE, MIN_LOAD_SIZE) == (40, 24, 120, 72)
    row = LoadRow(0, {"ifft": 2}, {"ifft": 0.5}, {"ifft": 1.0}, {"ifft": 1}, seq=0x0102030405060708)
    data = encode_load(row, "192.0.2.1", 1.0, KEY)
    assert data[:40] == bytes.fromhex("56524c54 01 01 0000 0807060504030201"
                                      " 00000000000000000000ffffc0000201 0000803f 00000000")
    assert data[40:64] == bytes.fromhex("02 00 0200 0100 0000 000000000000e03f 000000000000f03f")
    assert data[64:] == hmac.new(KEY, data[:64], hashlib.sha256).digest()


def test_kind_names_are_the_accel_op_names_and_unknown_ones_are_named():
    assert [kind_name(op) for op in (1, 2, 3, 4)] == ["fft", "ifft", "turbo_encode", "turbo_decode"]
    assert all(kind_id(kind_name(op)) == op for op in AccelOp)
    for bad in (0, 5, 255):
        with pytest.raises(UnknownKind, match=f"unknown accelerator kind {bad}") as e:
            kind_name(bad)
        assert e.value.value == bad
    with pytest.raises(UnknownKind, match="'dct'"):
        kind_id("dct")
    with pytest.raises(UnknownKind):
        encode_counters(LoadRow(0, {"dct": 1}, {"dct": 1.0}, {}, {}))


def test_the_load_key_is_not_the_fabric_key():
    cluster = bytes(range(32))
    assert derive_load_key(cluster) != derive_mac_key(cluster)
    assert derive_load_key(cluster) == hmac.new(cluster, b"vrdma load table v1", hashlib.sha256).digest()
    with pytest.raises(WireError, match="3 bytes"):
        derive_load_key(b"abc")


def _row(seq: int = 5) -> LoadRow:
    return LoadRow(0, {"fft": 2, "turbo_decode": 1}, {"fft": 0.01, "turbo_decode": 0.1},
                   {"fft": 0.03}, {"fft": 1}, seq=seq)


def test_forged_and_other_key_datagrams_raise_forged():
    data = encode_load(_row(), "192.0.2.1", 1.0, KEY)
    with pytest.raises(Forged):
        decode_load(data, OTHER)
    for i in range(len(data)):   # any byte changed: refused (tag or header), never accepted
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(WireError):
            decode_load(bytes(bad), KEY)
    # a change in the authenticated part past the header's structure is a forgery
    bad = bytearray(data)
    bad[LOAD_HEADER_SIZE + 8] ^= 1
    with pytest.raises(Forged, match="does not verify"):
        decode_load(bytes(bad), KEY)


def test_truncated_at_every_length_or_padded_is_refused():
    data = encode_load(_row(), "192.0.2.1", 1.0, KEY)
    for n in range(len(data)):
        with pytest.raises(Truncated):
            decode_load(data[:n], KEY)
    with pytest.raises(WireError, match="need"):
        decode_load(data + b"\0", KEY)
    region = encode_counters(_row())
    for n in range(COUNTERS_SIZE):
        with pytest.raises(Truncated):
            decode_counters(region[:n], 0, 0.0)


def signed(kinds: list[dict], *, seq: int = 9, period: float = 1.0, nkinds: int | None = None,
           magic: int = LOAD_MAGIC, version: int = VERSION, key: bytes = KEY) -> bytes:
    """A correctly tagged datagram with whatever values (as a cluster member could send)."""
    body = LoadHeader.build(dict(magic=magic, version=version,
                                 kinds=len(kinds) if nkinds is None else nkinds, reserved0=0,
                                 seq=seq, address=address_bytes("192.0.2.9"), period=period,
                                 reserved1=0))
    body += b"".join(KindLayout.build(k) for k in kinds)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def kind(**kw) -> dict:
    base = dict(op=1, reserved0=0, units=1, busy=0, reserved1=0, service_time=0.01, queued=0.0)
    return base | kw


@pytest.mark.parametrize("fields, error, named", [
    (dict(service_time=-1.0), Absurd, "service_time = -1.0"),
    (dict(service_time=0.0), Absurd, "service_time = 0.0"),
    (dict(service_time=math.nan), Absurd, "service_time = nan"),
    (dict(service_time=math.inf), Absurd, "service_time = inf"),
    (dict(service_time=1e9), Absurd, "service_time = 1000000000.0"),
    (dict(queued=-0.5), Absurd, "queued = -0.5"),
    (dict(queued=math.inf), Absurd, "queued = inf"),
    (dict(queued=-math.inf), Absurd, "queued = -inf"),
    (dict(queued=math.nan), Absurd, "queued = nan"),
    (dict(queued=1e300), Absurd, "queued = 1e+300"),
    (dict(units=0), Absurd, "units = 0"),
    (dict(units=65535), Absurd, "units = 65535"),
    (dict(units=2, busy=3), Absurd, "busy = 3"),
    (dict(op=0), UnknownKind, "kind 0"),
    (dict(op=5), UnknownKind, "kind 5"),
    (dict(op=255), UnknownKind, "kind 255"),
    (dict(reserved1=1), WireError, "reserved"),
])
def test_absurd_values_and_unknown_kinds_are_refused_naming_the_value(fields, error, named):
    data = signed([kind(**fields)])
    with pytest.raises(error, match=named.replace("+", r"\+")):
        decode_load(data, KEY)


def test_absurd_structure_is_refused():
    with pytest.raises(Absurd, match="twice"):
        decode_load(signed([kind(), kind()]), KEY)
    with pytest.raises(WireError, match="200 kinds"):
        decode_load(signed([kind()] * 4, nkinds=200), KEY)
    for period in (0.0, -1.0, math.nan, math.inf, 1e6):
        with pytest.raises(Absurd, match="period"):
            decode_load(signed([kind()], period=period), KEY)
    with pytest.raises(WireError, match="magic"):
        decode_load(signed([kind()], magic=0x12345678), KEY)
    with pytest.raises(WireError, match="version 2"):
        decode_load(signed([kind()], version=2), KEY)
    assert decode_load(signed([kind()]), KEY).units == {"fft": 1}    # the helper makes good ones


def test_the_errors_are_the_packages():
    for cls in (WireError, Truncated, Forged, UnknownKind, Absurd, TornRead):
        assert issubclass(cls, SchedulerError)
    assert issubclass(Absurd, BadRow)
    assert len({c.reason for c in (WireError, Truncated, Forged, UnknownKind, Absurd, TornRead)}) == 6


def test_a_counters_read_that_raced_an_update_is_torn():
    old, new = _row(seq=100), LoadRow(0, {"ifft": 4}, {"ifft": 0.2}, {"ifft": 9.0}, {"ifft": 4}, seq=101)
    region = bytearray(COUNTERS_SIZE)
    store_counters(region, old)
    before = bytes(region)
    store_counters(region, new)
    after = bytes(region)
    # a reader reading in ascending order: bytes [0, p) before the update, [p, end) after
    for p in range(COUNTERS_SIZE + 1):
        seen = before[:p] + after[p:]
        if p == 0:
            assert normal(decode_counters(seen, 0, 0.0)) == normal(new)
        elif p <= COUNTERS_SIZE - 8:   # head (partly) old, tail new
            with pytest.raises(TornRead, match="head seq 100 != tail seq 101") as e:
                decode_counters(seen, 0, 0.0)
            assert (e.value.head, e.value.tail) == (100, 101)
        else:
            assert normal(decode_counters(seen, 0, 0.0)) == normal(old)


def test_a_counters_region_with_garbage_is_refused():
    good = encode_counters(_row())
    with pytest.raises(WireError, match="magic"):
        decode_counters(good[:8] + b"\0\0\0\0" + good[12:], 0, 0.0)
    junk = bytearray(good)
    junk[-16] = 1        # inside an unused slot, beyond the row's kinds
    with pytest.raises(WireError, match="slot 3"):
        decode_counters(bytes(junk), 0, 0.0)
    zero = bytes(COUNTERS_SIZE)
    with pytest.raises(WireError, match="magic"):
        decode_counters(zero, 0, 0.0)   # a region never written: head == tail == 0, no magic


def _flat(c) -> list:
    """A parsed construct container's values in layout order (nested arrays flattened)."""
    out: list = []
    for k, v in c.items():
        if k == "_io":
            continue
        if isinstance(v, list):
            for slot in v:
                out += _flat(slot)
        else:
            out.append(v)
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=COUNTERS_SIZE, max_size=COUNTERS_SIZE))
def test_the_struct_twins_agree_with_the_construct_layouts_on_any_bytes(data):
    import struct

    from scheduler.wire import CountersLayout, _struct_chars

    def same(a, b) -> bool:
        return all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                   for x, y in zip(a, b, strict=True))

    twin = struct.Struct("<" + _struct_chars(CountersLayout))
    assert twin.size == COUNTERS_SIZE
    assert same(_flat(CountersLayout.parse(data)), twin.unpack(data))
    head = struct.Struct("<" + _struct_chars(LoadHeader))
    assert same(_flat(LoadHeader.parse(data)), head.unpack_from(data))
    k = struct.Struct("<" + _struct_chars(KindLayout))
    assert same(_flat(KindLayout.parse(data)), k.unpack_from(data))


@settings(max_examples=100, deadline=None)
@given(rows())
def test_what_the_codecs_write_the_construct_layouts_read(row):
    from scheduler.wire import CountersLayout

    c = CountersLayout.parse(encode_counters(row))
    assert (c.head, c.tail, c.kinds) == (row.seq, row.seq, len(row.units))
    assert {kind_name(s.op): (s.units, s.service_time) for s in c.slots[: c.kinds]} == {
        k: (row.units[k], row.service_time[k]) for k in row.units}
    h = LoadHeader.parse(encode_load(row, "192.0.2.1", 1.0, KEY))
    assert (h.magic, h.seq, h.kinds, address_text(h.address)) == (
        LOAD_MAGIC, row.seq, len(row.units), "192.0.2.1")
