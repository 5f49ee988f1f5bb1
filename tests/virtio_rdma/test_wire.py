"""Codec tests: Hypothesis round trips of every control command/response and
data-path structure, byte fixtures, and syntax validation (spec 5.x.6)."""
import dataclasses
import struct
import typing

import construct as cs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_rdma import wire
from verbs import AsyncEvent, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode, parse, QpState
from virtio_rdma.constants import (
    ABI_VERSION,
    CONFIG_CARRIER_CLOBBERED,
    CONFIG_CARRIER_SIZE,
    CONFIG_MAGIC,
    CONFIG_SIZE,
    Cmd,
    CqArm,
    DoorbellKind,
    EventKind,
    Status,
)
from virtio_rdma.errors import UnknownValueError, VirtioRdmaError, WireError


def _strategy_for(c: cs.Construct):
    """A Hypothesis strategy producing field dicts for a construct Struct."""
    if isinstance(c, cs.Struct):
        fields = {}
        for sc in c.subcons:
            if sc.name is None:
                continue
            inner = sc.subcon if isinstance(sc, cs.Renamed) else sc
            if isinstance(inner, cs.Const):
                fields[sc.name] = st.just(inner.value)
            elif isinstance(inner, cs.Rebuild):
                continue
            elif isinstance(inner, cs.Array) and isinstance(inner.count, int):  # fixed count
                fields[sc.name] = st.lists(_strategy_for(inner.subcon), min_size=inner.count,
                                           max_size=inner.count)
            elif isinstance(inner, cs.Array):
                fields[sc.name] = st.lists(_strategy_for(inner.subcon), max_size=5)
            else:
                fields[sc.name] = _strategy_for(inner)
        return st.fixed_dictionaries(fields)
    if isinstance(c, cs.Renamed):
        return _strategy_for(c.subcon)
    if isinstance(c, cs.FormatField):
        return st.integers(0, (1 << (8 * c.sizeof())) - 1)
    if isinstance(c, cs.Bytes):
        return st.binary(min_size=c.length, max_size=c.length)
    raise NotImplementedError(c)


def _norm(d):
    if isinstance(d, dict):
        return {k: _norm(v) for k, v in d.items() if k != "nchunks"}
    if isinstance(d, list):
        return [_norm(x) for x in d]
    return d


@pytest.mark.parametrize("cmd", list(Cmd))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_request_round_trip(cmd, data):
    fields = data.draw(_strategy_for(wire.COMMANDS[cmd][0]))
    raw = wire.encode_request(cmd, **fields)
    got_cmd, got = wire.decode_request(raw)
    assert got_cmd is cmd and type(got) is wire.BODIES[cmd][0]
    assert _norm(wire.body_fields(got)) == _norm(fields)
    hdr = wire.CtrlHeader.parse(raw)
    assert hdr.len == len(raw) - 8


@pytest.mark.parametrize("cmd", list(Cmd))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_response_round_trip(cmd, data):
    fields = data.draw(_strategy_for(wire.COMMANDS[cmd][1]))
    raw = wire.encode_response(cmd, Status.OK, **fields)
    assert len(raw) == wire.response_size(cmd)
    status, got = wire.decode_response(cmd, raw)
    assert status is Status.OK and _norm(got) == _norm(fields)


@pytest.mark.parametrize("cmd", list(Cmd))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_response_round_trip_from_dataclass(cmd, data):
    """A handler's response dataclass encodes to the same bytes as its fields."""
    fields = data.draw(_strategy_for(wire.COMMANDS[cmd][1]))
    body = _body(wire.BODIES[cmd][1], fields)
    assert wire.encode_response(cmd, Status.OK, body) == wire.encode_response(cmd, Status.OK, **fields)
    status, decoded = wire.decode_response(cmd, wire.encode_response(cmd, Status.OK, body))
    assert status == Status.OK and _norm(decoded) == _norm(fields)


def _body(cls, fields: dict):
    """The body dataclass of keyword ``fields`` (nested bodies and arrays of them too)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    kw = {}
    for name, value in fields.items():
        nested = wire._nested(hints[name])
        if nested is None:
            kw[name] = value
        elif nested[1]:
            kw[name] = tuple(_body(nested[0], v) for v in value)
        else:
            kw[name] = _body(nested[0], value)
    return cls(**kw)


def test_response_dataclass_must_be_the_commands():
    with pytest.raises(WireError, match="AllocPdResp"):
        wire.encode_response(Cmd.QUERY_PORT, Status.OK, wire.AllocPdResp(pdn=1))
    with pytest.raises(WireError):
        wire.encode_response(Cmd.ALLOC_PD, Status.OK, wire.AllocPdResp(pdn=1 << 32))
    assert wire.encode_response(Cmd.DESTROY_QP, Status.OK, None) == bytes(4)
    attr = wire.QpAttr(rnr_retry=5, dgid=b"d" * 16)
    copy = attr.copy()
    assert copy == attr and copy is not attr


@pytest.mark.parametrize("cmd", [c for c in Cmd if c is not Cmd.REG_MR and wire.COMMANDS[c][0].sizeof() > 0])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_request_decoder_agrees_with_layout(cmd, data):
    """The struct decoder of a fixed-size request and its construct layout
    (the normative one) agree on any body bytes: the same fields, or both
    refuse (a reserved field not zero)."""
    layout = wire.COMMANDS[cmd][0]
    body = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof()))
    if data.draw(st.booleans()) and cmd is Cmd.MODIFY_QP:
        body = body[:26] + bytes(2) + body[28:]  # QpAttr.reserved zero: mostly a valid attr
    raw = struct.pack("<HHI", cmd, 0, len(body)) + body
    try:
        ref = wire._plain(layout.parse(body))
    except cs.ConstructError:
        with pytest.raises(WireError):
            wire.decode_request(raw)
        return
    _, got = wire.decode_request(raw)
    assert wire.body_fields(got) == ref


def test_control_bodies_are_their_layouts():
    """Each body dataclass is its layout's one definition: the fields, in
    wire order, with the sizes of docs/virtio-rdma.md."""
    for cmd, (req, resp) in wire.BODIES.items():
        for cls in (req, resp):
            names = [sc.name for sc in wire.LAYOUTS[cls].subcons]
            assert names == [f.name for f in dataclasses.fields(cls)]
            assert wire.COMMANDS[cmd][cls is resp] is wire.LAYOUTS[cls]
    assert wire.QP_ATTR_SIZE == 80 and wire.QpAttrLayout.sizeof() == 80
    assert wire.COMMANDS[Cmd.MODIFY_QP][0].sizeof() == 88
    assert wire.COMMANDS[Cmd.CREATE_QP][0].sizeof() == 64 and wire.COMMANDS[Cmd.QUERY_QP][1].sizeof() == 104
    assert wire.qp_attr_defaults() == wire.QpAttr() and wire.QpAttr().dgid == bytes(16)
    assert wire.qp_attr_defaults(rnr_retry=7).rnr_retry == 7
    with pytest.raises(WireError, match="rnr_retries"):
        wire.qp_attr_defaults(rnr_retries=7)


def test_decoded_request_fixture():
    raw = bytes.fromhex("0e00 0000 04000000 56341200".replace(" ", ""))
    assert wire.decode_request(raw) == (Cmd.DESTROY_QP, wire.DestroyQpReq(qpn=0x123456))
    raw = wire.encode_request(Cmd.REG_MR, pdn=1, access=7, iova=0x1000, length=0x2000,
                              chunks=[wire.MrChunk(0x10000, 0x1000), wire.MrChunk(0x30000, 0x1000)])
    assert wire.decode_request(raw)[1] == wire.RegMrReq(
        1, 7, 0x1000, 0x2000, nchunks=2, chunks=(wire.MrChunk(0x10000, 0x1000), wire.MrChunk(0x30000, 0x1000)))
    cmd, req = wire.decode_request(wire.encode_request(
        Cmd.MODIFY_QP, wire.ModifyQpReq(7, 0x81, wire.QpAttr(qp_state=3, rnr_retry=6, dgid=b"g" * 16))))
    assert cmd is Cmd.MODIFY_QP and req.attr.rnr_retry == 6 and req.attr.dgid == b"g" * 16
    assert req.attr_mask == 0x81 and req.attr.qp_state == 3


@pytest.mark.parametrize("status", [s for s in Status if s != Status.OK])
def test_error_response_has_no_body(status):
    raw = wire.encode_response(Cmd.CREATE_QP, status)
    assert raw == struct.pack("<I", status)
    assert wire.decode_response(Cmd.CREATE_QP, raw) == (status, None)


def test_request_byte_fixture():
    raw = wire.encode_request(Cmd.DESTROY_QP, qpn=0x123456)
    assert raw == bytes.fromhex("0e00 0000 04000000 56341200".replace(" ", ""))
    raw = wire.encode_request(Cmd.REG_MR, pdn=1, access=7, iova=0x1000, length=0x2000, reserved=0,
                              chunks=[dict(gpa=0x10000, length=0x1000), dict(gpa=0x30000, length=0x1000)])
    assert len(raw) == 8 + 32 + 32 and raw[8 + 24:8 + 28] == b"\x02\0\0\0"


@pytest.mark.parametrize("bad,err", [
    (b"", WireError),
    (b"\x01\x00\x00\x00", WireError),                                  # short header
    (struct.pack("<HHI", 99, 0, 0), UnknownValueError),                # unknown command
    (struct.pack("<HHI", 1, 1, 0), WireError),                         # reserved flags
    (struct.pack("<HHI", 1, 0, 4) + b"\0" * 4, WireError),             # body for a bodyless cmd
    (struct.pack("<HHI", 5, 0, 8) + b"\0" * 4, WireError),             # len mismatch
    (struct.pack("<HHI", 14, 0, 3) + b"\0" * 3, WireError),            # short body
    (struct.pack("<HHI", 9, 0, 32) + struct.pack("<IIQQII", 1, 1, 0, 16, 1, 0), WireError),  # chunk missing
    (struct.pack("<HHI", 9, 0, 32) + struct.pack("<IIQQII", 1, 1, 0, 0, 0, 5), WireError),   # reserved
    (struct.pack("<HHI", 9, 0, 32) + struct.pack("<IIQQII", 1, 1, 0, 0, 1 << 30, 0), WireError),
])
def test_malformed_requests(bad, err):
    with pytest.raises(err) as ei:
        wire.decode_request(bad)
    assert isinstance(ei.value, (VirtioRdmaError, UnknownValueError))  # the device's or verbs' own


def test_modify_qp_reserved_must_be_zero():
    raw = bytearray(wire.encode_request(Cmd.MODIFY_QP, qpn=5, attr_mask=1, attr=wire.qp_attr_defaults()))
    raw[8 + 8 + 18] = 1  # QpAttr.reserved
    with pytest.raises(WireError):
        wire.decode_request(bytes(raw))


sge_st = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(wr_id=st.integers(0, 2**64 - 1), op=st.sampled_from(list(WrOpcode)),
       flags=st.integers(0, 31).map(lambda f: f & ~SendFlags.INLINE), sges=st.lists(sge_st, max_size=4),
       imm=st.integers(0, 2**32 - 1), raddr=st.integers(0, 2**64 - 1), rkey=st.integers(0, 2**32 - 1),
       ca=st.integers(0, 2**64 - 1), sw=st.integers(0, 2**64 - 1))
def test_send_wqe_round_trip(wr_id, op, flags, sges, imm, raddr, rkey, ca, sw):
    raw = wire.encode_send_wqe(wr_id, op, flags, sges=sges, imm_data=imm, remote_addr=raddr, rkey=rkey,
                               compare_add=ca, swap=sw, slot_size=128)
    assert len(raw) == 128
    # the construct definition (normative) and the struct twin agree
    c = wire.SendWqeHeader.parse(raw)
    assert (c.wr_id, c.opcode, c.send_flags, c.num_sge, c.rkey) == (wr_id, op, flags, len(sges), rkey)
    w = wire.decode_send_wqe(raw)
    assert (w.wr_id, w.opcode, int(w.send_flags), w.imm_data, w.remote_addr, w.rkey, w.compare_add,
            w.swap) == (wr_id, op, flags, imm, raddr, rkey, ca, sw)
    assert [(s.addr, s.length, s.lkey) for s in w.sges] == sges and w.inline is None


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64))
def test_inline_wqe_round_trip(data):
    raw = wire.encode_send_wqe(1, WrOpcode.SEND, SendFlags.SIGNALED, inline=data, slot_size=128)
    w = wire.decode_send_wqe(raw)
    assert bytes(w.inline) == data and w.sges == [] and w.length == len(data)
    assert isinstance(w.inline, memoryview)  # no copy out of the ring slot


@settings(max_examples=100, deadline=None)
@given(wr_id=st.integers(0, 2**64 - 1), sges=st.lists(sge_st, max_size=3))
def test_recv_wqe_round_trip(wr_id, sges):
    raw = wire.encode_recv_wqe(wr_id, sges, slot_size=64)
    assert wire.RecvWqeHeader.parse(raw).num_sge == len(sges)
    w = wire.decode_recv_wqe(raw)
    assert w.wr_id == wr_id and [(s.addr, s.length, s.lkey) for s in w.sges] == sges


def test_wqe_validation():
    slot = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, 0, sges=[(0, 1, 2)], slot_size=128))
    slot[10:12] = struct.pack("<H", 4000)  # absurd num_sge
    with pytest.raises(WireError, match="num_sge 4000"):
        wire.decode_send_wqe(slot)
    with pytest.raises(WireError, match="num_sge 1 exceeds 0"):
        wire.decode_send_wqe(wire.encode_send_wqe(1, WrOpcode.SEND, 0, sges=[(0, 1, 2)]), max_sge=0)
    slot = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, 0, slot_size=64))
    slot[8] = 77
    with pytest.raises(UnknownValueError, match="77"):
        wire.decode_send_wqe(slot)
    slot = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, 0, slot_size=64))
    slot[60] = 1
    with pytest.raises(WireError, match="reserved"):
        wire.decode_send_wqe(slot)
    slot = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, 0, inline=b"x" * 10, slot_size=128))
    slot[28:32] = struct.pack("<I", 1000)
    with pytest.raises(WireError, match="inline_len 1000"):
        wire.decode_send_wqe(slot)
    slot = bytearray(wire.encode_recv_wqe(1, [], slot_size=32))
    slot[12] = 1
    with pytest.raises(WireError, match="reserved"):
        wire.decode_recv_wqe(slot)
    with pytest.raises(WireError):
        wire.decode_send_wqe(b"\0" * 10)
    with pytest.raises(WireError, match="does not fit"):
        wire.encode_send_wqe(1, WrOpcode.SEND, 0, sges=[(0, 1, 2)] * 5, slot_size=128)


@settings(max_examples=200, deadline=None)
@given(wr_id=st.integers(0, 2**64 - 1), status=st.sampled_from(list(WcStatus)),
       op=st.sampled_from(list(WcOpcode)), flags=st.integers(0, 127), owner=st.integers(0, 1),
       nums=st.lists(st.integers(0, 2**32 - 1), min_size=5, max_size=5))
def test_cqe_round_trip(wr_id, status, op, flags, owner, nums):
    c = wire.Completion(wr_id, status, op, nums[0], nums[1], nums[2], flags, nums[3], nums[4])
    raw = wire.encode_cqe(c, owner)
    assert len(raw) == 32 and wire.Cqe.parse(raw).owner == owner
    buf = bytearray(32)
    wire.pack_cqe_into(memoryview(buf), c, owner)
    assert bytes(buf) == raw
    assert wire.decode_cqe(raw) == (c, owner)


def test_cqe_owner_reserved_bits():
    raw = bytearray(wire.encode_cqe(wire.Completion(1, WcStatus.SUCCESS, WcOpcode.SEND, 1), 1))
    raw[11] = 0x81
    with pytest.raises(WireError):
        wire.decode_cqe(raw)


@settings(max_examples=200, deadline=None)
@given(recs=st.lists(st.tuples(st.sampled_from(list(DoorbellKind)), st.integers(0, 2**24 - 1),
                               st.integers(0, 2**32 - 1)), max_size=16))
def test_doorbell_round_trip(recs):
    recs = [(k, n, (v & 1) if k is DoorbellKind.CQ_ARM else v) for k, n, v in recs]
    raw = b"".join(wire.encode_doorbell(k, n, v) for k, n, v in recs)
    assert [(d.kind, d.num, d.value) for d in wire.decode_doorbells(raw)] == recs
    for i, (k, n, v) in enumerate(recs):
        c = wire.DoorbellRecord.parse(raw[8 * i:8 * i + 8])
        assert c.num_kind == n | (k << 24) and c.value == v


def test_doorbell_validation():
    with pytest.raises(WireError):
        wire.decode_doorbells(b"\0" * 7)
    with pytest.raises(UnknownValueError):
        wire.decode_doorbells(struct.pack("<II", 5, 0))  # kind 0
    with pytest.raises(UnknownValueError):
        wire.decode_doorbells(struct.pack("<II", (3 << 24) | 5, 2))  # reserved arm bits
    with pytest.raises(WireError):
        wire.encode_doorbell(DoorbellKind.SQ, 1 << 24, 0)


@settings(max_examples=100, deadline=None)
@given(ev=st.one_of(
    st.builds(lambda n: wire.Event(EventKind.COMPLETION, 0, n), st.integers(0, 2**32 - 1)),
    st.builds(lambda t, n: wire.Event(EventKind.ASYNC, int(t), n), st.sampled_from(list(AsyncEvent)),
              st.integers(0, 2**32 - 1))))
def test_event_round_trip(ev):
    raw = ev.encode()
    assert len(raw) == wire.EVENT_SIZE and wire.EventRecord.parse(raw).number == ev.number
    assert wire.decode_event(raw) == ev


_CONFIG = dict(device_features=0xF, phys_port_cnt=1, max_qp=2, max_cq=3, max_mr=4, max_pd=5, max_qp_wr=6,
               max_cqe=7, max_sge=8, max_inline_data=9, node_guid=10)


def test_config_round_trip():
    f = _CONFIG
    raw = wire.encode_config(**f)
    want = dict(f, magic=CONFIG_MAGIC, abi_version=ABI_VERSION, config_size=CONFIG_SIZE,
                carrier_reserved=0, reserved=0)
    assert len(raw) == CONFIG_SIZE == 64 and raw[:4] == b"RDMA" and wire.decode_config(raw) == want


def test_config_through_a_blk_carrier():
    """What QEMU 7.2's vhost-user-blk shows a guest: 57 bytes, num_queues
    (offset 34) overwritten, 4-byte reads past 57 as all ones."""
    raw = bytearray(wire.encode_config(**dict(_CONFIG, device_features=5, max_qp=7, max_sge=16, node_guid=99)))
    raw[CONFIG_CARRIER_CLOBBERED:CONFIG_CARRIER_CLOBBERED + 2] = (3).to_bytes(2, "little")
    seen = bytes(raw[:CONFIG_CARRIER_SIZE]) + b"\xff" * 8
    cfg = wire.decode_config(seen)
    assert (cfg["max_qp"], cfg["max_sge"], cfg["node_guid"], cfg["device_features"]) == (7, 16, 99, 5)
    assert cfg["carrier_reserved"] == 3 and cfg["reserved"] == 0


@pytest.mark.parametrize("patch,msg", [((0, b"RDMB"), "magic 0x424d4452"), ((4, b"\x02\x00"), "ABI version 2"),
                                       ((0, b""), None)])
def test_config_refused(patch, msg):
    raw = bytearray(wire.encode_config(**_CONFIG))
    off, data = patch
    if not data:
        with pytest.raises(wire.WireError, match="55 bytes"):
            wire.decode_config(raw[:55])
        return
    raw[off:off + len(data)] = data
    with pytest.raises(wire.WireError, match=msg):
        wire.decode_config(raw)


@pytest.mark.parametrize("args,expect", [
    ((16, 16, 4, 2, 128), (16, 16, 8, 6)),
    ((0, 0, 0, 0, 0), (1, 1, 6, 5)),
    ((100, 3, 1, 1, 0), (128, 4, 7, 5)),
])
def test_wq_layout(args, expect):
    lay = wire.wq_layout(*args)
    assert (lay.sq_depth, lay.rq_depth, lay.sq_wqe_shift, lay.rq_wqe_shift) == expect
    assert lay.max_send_sge >= args[2] and lay.max_recv_sge >= args[3] and lay.max_inline_data >= args[4]


def test_enum_parse_unknown_values():
    for enum_cls, bad in ((Cmd, 0), (Status, 3), (WcStatus, 24), (WrOpcode, 10), (QpState, 7),
                          (WcOpcode, 8), (AsyncEvent, 19)):
        with pytest.raises(UnknownValueError, match=str(bad)):
            parse(enum_cls, bad)
    with pytest.raises(UnknownValueError):
        CqArm.parse(2)
    with pytest.raises(UnknownValueError):
        WcFlags.parse(128)
    # ibverbs numbering
    assert WcStatus.RNR_RETRY_EXC_ERR == 13 and WcStatus.REM_INV_REQ_ERR == 9
    assert QpState.ERR == 6 and WrOpcode.ATOMIC_FETCH_AND_ADD == 6 and WcOpcode.RECV_RDMA_WITH_IMM == 129


@pytest.mark.parametrize("cls", [WrOpcode, SendFlags, WcStatus])
def test_parse_accepts_exactly_the_valid_values_before_and_after_they_are_cached(cls):
    """parse looks the enum's member map up first; what it accepts and
    refuses must not depend on whether a value was seen before."""
    valid = sorted({int(m) for m in cls} | ({int(SendFlags.INLINE | SendFlags.SIGNALED)}
                                            if cls is SendFlags else set()))
    for _ in range(2):                     # the second round hits the cache
        for v in valid:
            assert cls.parse(v) == v and type(cls.parse(v)) is cls
        for bad in (max(valid) + 1 << 4, -1):
            with pytest.raises(UnknownValueError, match=cls.__name__):
                cls.parse(bad)
    with pytest.raises((UnknownValueError, TypeError)):
        cls.parse([1])                     # unhashable: refused, as by cls() itself
