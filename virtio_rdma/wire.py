"""Wire formats of the virtio-rdma device (docs/virtio-rdma.md, sections 5.x).

Pure codecs: encode/decode and *syntax* validation (lengths, reserved fields,
counts, enumeration values). Semantics (does the PD exist, are the limits
respected) belong to :mod:`virtio_rdma.control`.

Every structure is a ``construct`` definition (the normative layout, mirrored
as C structs in the spec). The per-work-request structures on the data path
(WQE header, SGE, CQE, doorbell and event records) additionally have a
``struct.Struct`` twin used by the hot path; the tests check that both agree
byte for byte.

Control-command bodies (5.3) are dataclasses, one per request and response
(:data:`BODIES`); a body's annotated fields (``port_num: U32``) are the one
definition of its layout: the construct struct (:data:`LAYOUTS`,
:data:`COMMANDS`) and a ``struct`` decoder and encoder are derived from
them. :func:`decode_request` returns the request's dataclass, decoded once
at the boundary; :func:`encode_response` takes the response's dataclass.
:class:`QpAttr` (struct virtio_rdma_qp_attr) is also a QP's live attributes.

All integers are little endian. Errors raise :class:`WireError`
(or :class:`UnknownValueError` for out-of-range enumeration values), both
subclasses of :class:`~virtio_rdma.errors.VirtioRdmaError`.
"""
from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from operator import attrgetter
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import construct as cs

from verbs import AsyncEvent, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.constants import (
    ABI_VERSION,
    ACCEL_CQE_OPCODE_BASE,
    AQ_SLOT_SIZE,
    CONFIG_CARRIER_CLOBBERED,
    CONFIG_CARRIER_SIZE,
    CONFIG_MAGIC,
    CONFIG_SIZE,
    MAX_ACCEL_OPS,
    MAX_ACCEL_SGE,
    OBJ_NUM_MASK,
    AccelDtype,
    AccelEarlyStop,
    AccelJobFlags,
    AccelOp,
    AccelStatus,
    Cmd,
    CqArm,
    DoorbellKind,
    EventKind,
    Status,
)
from virtio_rdma.errors import UnknownValueError, VirtioRdmaError, WireError

u8, u16, u32, u64 = cs.Int8ul, cs.Int16ul, cs.Int32ul, cs.Int64ul

# --------------------------------------------------------------------------
# 5.1 Device configuration layout
# --------------------------------------------------------------------------
Config = cs.Struct(
    "magic" / u32,             # CONFIG_MAGIC (b"RDMA"): how a driver finds the device behind any PCI ID
    "abi_version" / u16,       # ABI_VERSION
    "config_size" / u16,       # CONFIG_SIZE
    "device_features" / u32,   # the device feature bits 0..31 offered (ACK_FEATURES acks them)
    "phys_port_cnt" / u32,
    "max_qp" / u32,
    "max_cq" / u32,
    "max_mr" / u32,
    "max_pd" / u32,
    "max_sge" / u16,
    "carrier_reserved" / u16,  # CONFIG_CARRIER_CLOBBERED: a vhost-user-blk carrier writes here; ignored
    "max_qp_wr" / u32,
    "max_cqe" / u32,
    "max_inline_data" / u32,
    "node_guid" / u64,
    "reserved" / u64,          # CONFIG_CARRIER_SIZE..: 0; beyond a blk carrier's window, ignored
)
assert Config.sizeof() == CONFIG_SIZE
assert Config.subcons[10].name == "carrier_reserved" and sum(
    sc.sizeof() for sc in Config.subcons[:10]) == CONFIG_CARRIER_CLOBBERED
assert sum(sc.sizeof() for sc in Config.subcons[:-1]) == CONFIG_CARRIER_SIZE

# --------------------------------------------------------------------------
# 5.3 Control queue
# --------------------------------------------------------------------------
CtrlHeader = cs.Struct("cmd" / u16, "flags" / u16, "len" / u32)
CTRL_HEADER_SIZE = CtrlHeader.sizeof()
RespHeader = cs.Struct("status" / u32)
RESP_HEADER_SIZE = RespHeader.sizeof()

# The control bodies are dataclasses; each one's field list, in wire order,
# is its one definition: the construct layout is derived from the fields'
# annotations (``U32`` = an ``int`` laid out as le32, ...). A device handler
# gets the request decoded once into its dataclass and reads attributes.
U8 = Annotated[int, u8]
U16 = Annotated[int, u16]
U32 = Annotated[int, u32]
U64 = Annotated[int, u64]
Gid = Annotated[bytes, cs.Bytes(16)]
Reserved16 = Annotated[int, cs.Const(0, u16)]
Reserved32 = Annotated[int, cs.Const(0, u32)]


@dataclass(frozen=True, slots=True)
class Empty:
    """A command or response without a body."""


@dataclass(frozen=True, slots=True)
class QueryPortReq:
    port_num: U32


@dataclass(frozen=True, slots=True)
class QueryGidReq:
    port_num: U32
    index: U32


@dataclass(frozen=True, slots=True)
class DeallocPdReq:
    pdn: U32


@dataclass(frozen=True, slots=True)
class CreateCqReq:
    cqe: U32
    comp_vector: U32
    ring_gpa: U64
    dbrec_gpa: U64


@dataclass(frozen=True, slots=True)
class DestroyCqReq:
    cqn: U32


@dataclass(frozen=True, slots=True)
class ReqNotifyCqReq:
    cqn: U32
    flags: U32


@dataclass(frozen=True, slots=True)
class MrChunk:
    gpa: U64
    length: U64


@dataclass(frozen=True, slots=True)
class RegMrReq:
    pdn: U32
    access: U32
    iova: U64
    length: U64
    # derived and reserved: 0 unless decoded, never given by position
    nchunks: Annotated[int, cs.Rebuild(u32, cs.len_(cs.this.chunks))] = field(default=0, kw_only=True)
    reserved: Reserved32 = field(default=0, kw_only=True)
    chunks: Annotated[tuple[MrChunk, ...], cs.this.nchunks] = ()  # an array of nchunks


@dataclass(frozen=True, slots=True)
class DeregMrReq:
    lkey: U32


@dataclass(frozen=True, slots=True)
class CreateQpReq:
    pdn: U32
    qp_type: U32
    send_cqn: U32
    recv_cqn: U32
    max_send_wr: U32
    max_recv_wr: U32
    max_send_sge: U32
    max_recv_sge: U32
    max_inline_data: U32
    flags: U32
    sq_gpa: U64
    rq_gpa: U64
    dbrec_gpa: U64


@dataclass(slots=True)
class QpAttr:
    """struct virtio_rdma_qp_attr (mirrors ibv_qp_attr). Mutable: a QP's
    current attributes (``QueuePair.attr``) are one, updated by MODIFY_QP.
    Every field defaults to 0 (:func:`qp_attr_defaults`)."""

    qp_state: U8 = 0
    cur_qp_state: U8 = 0
    path_mtu: U8 = 0
    path_mig_state: U8 = 0
    timeout: U8 = 0
    retry_cnt: U8 = 0
    rnr_retry: U8 = 0
    min_rnr_timer: U8 = 0
    max_rd_atomic: U8 = 0
    max_dest_rd_atomic: U8 = 0
    port_num: U8 = 0
    sq_draining: U8 = 0
    en_sqd_async_notify: U8 = 0
    sgid_index: U8 = 0
    hop_limit: U8 = 0
    traffic_class: U8 = 0
    pkey_index: U16 = 0
    reserved: Reserved16 = 0
    qkey: U32 = 0
    rq_psn: U32 = 0
    sq_psn: U32 = 0
    dest_qp_num: U32 = 0
    qp_access_flags: U32 = 0
    flow_label: U32 = 0
    dgid: Gid = bytes(16)
    max_send_wr: U32 = 0
    max_recv_wr: U32 = 0
    max_send_sge: U32 = 0
    max_recv_sge: U32 = 0
    max_inline_data: U32 = 0

    def copy(self) -> QpAttr:
        return QpAttr(*_qp_attr_values(self))


_qp_attr_values = attrgetter(*QpAttr.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class ModifyQpReq:
    qpn: U32
    attr_mask: U32
    attr: QpAttr


@dataclass(frozen=True, slots=True)
class QueryQpReq:
    qpn: U32
    attr_mask: U32


@dataclass(frozen=True, slots=True)
class DestroyQpReq:
    qpn: U32


@dataclass(frozen=True, slots=True)
class QueryDeviceResp:
    fw_ver: U64
    node_guid: U64
    sys_image_guid: U64
    max_mr_size: U64
    page_size_cap: U64
    vendor_id: U32
    vendor_part_id: U32
    hw_ver: U32
    max_qp: U32
    max_qp_wr: U32
    device_cap_flags: U32
    max_sge: U32
    max_cq: U32
    max_cqe: U32
    max_mr: U32
    max_pd: U32
    max_qp_rd_atom: U32
    max_qp_init_rd_atom: U32
    max_inline_data: U32
    atomic_cap: U32
    max_mr_chunks: U32
    phys_port_cnt: U32
    max_msg_sz: U32


@dataclass(frozen=True, slots=True)
class QueryPortResp:
    state: U32
    max_mtu: U32
    active_mtu: U32
    gid_tbl_len: U32
    port_cap_flags: U32
    max_msg_sz: U32
    pkey_tbl_len: U32
    link_layer: U8
    active_speed: U8
    active_width: U8
    phys_state: U8


@dataclass(frozen=True, slots=True)
class QueryGidResp:
    gid: Gid


@dataclass(frozen=True, slots=True)
class AllocPdResp:
    pdn: U32


@dataclass(frozen=True, slots=True)
class AckFeatures:
    """ACK_FEATURES request (the driver's device feature bits) and response
    (the bits the device accepted: the request's AND what it offers)."""

    features: U64


@dataclass(frozen=True, slots=True)
class CreateCqResp:
    cqn: U32
    cqe: U32


@dataclass(frozen=True, slots=True)
class RegMrResp:
    lkey: U32
    rkey: U32


@dataclass(frozen=True, slots=True)
class CreateQpResp:
    qpn: U32
    max_send_wr: U32
    max_recv_wr: U32
    max_send_sge: U32
    max_recv_sge: U32
    max_inline_data: U32
    sq_wqe_shift: U32
    rq_wqe_shift: U32


@dataclass(frozen=True, slots=True)
class QueryQpResp:
    attr: QpAttr
    pdn: U32
    qp_type: U32
    send_cqn: U32
    recv_cqn: U32
    flags: U32
    qpn: U32


# Accelerator queues (VIRTIO_RDMA_F_ACCEL; spec "Accelerator queues")
@dataclass(frozen=True, slots=True)
class AccelOpInfo:
    """One operation the device's accelerators run (an entry of QUERY_ACCEL)."""

    op: U8                 # AccelOp; 0: unused entry
    local_units: U8        # accelerators of this host that run it
    reachable_hosts: U16   # hosts (this one included) the device can send it to
    min_size: U32          # FFT: points n; Turbo: block size K
    max_size: U32
    max_batch: U32
    est_fixed_ns: U32      # service-time estimate: fixed part ...
    est_unit_ps: U32       # ... plus this per unit of work (FFT: n * passes(n) per
                           # transform, passes(n) = ceil(a/3) + b + c for n = 2^a 3^b 5^c;
                           # Turbo: K per block (x iterations to decode))


@dataclass(frozen=True, slots=True)
class QueryAccelResp:
    num_ops: U32
    reserved: Reserved32
    ops: Annotated[tuple[AccelOpInfo, ...], MAX_ACCEL_OPS]


@dataclass(frozen=True, slots=True)
class CreateAqReq:
    pdn: U32
    cqn: U32
    op: U8                 # AccelOp: every job of the queue must be this op
    priority: U8           # 0 (lowest) .. 7
    flags: U8              # AqFlags
    reserved0: Annotated[int, cs.Const(0, u8)]
    depth: U32             # slots: a power of two, 1..max_qp_wr
    ring_gpa: U64          # depth * AQ_SLOT_SIZE bytes, contiguous
    dbrec_gpa: U64         # 8 bytes: le32 pi; le32 reserved
    target_host: U32       # with FORCE_TARGET
    reserved1: Reserved32


@dataclass(frozen=True, slots=True)
class CreateAqResp:
    aqn: U32
    depth: U32


@dataclass(frozen=True, slots=True)
class DestroyAqReq:
    aqn: U32


@dataclass(frozen=True, slots=True)
class CancelAqJobReq:
    aqn: U32
    reserved: Reserved32
    wr_id: U64


def _field_layout(name: str, hint) -> cs.Construct:
    """A field's construct: its annotation's, a nested body's layout, or an
    array of nested bodies whose count the annotation names."""
    nested = _nested(hint)
    if nested is not None and not nested[1]:
        return LAYOUTS[nested[0]]
    meta: tuple = getattr(hint, "__metadata__", ())
    if len(meta) != 1:
        raise TypeError(f"control body field {name}: {hint!r} has no wire layout")
    if nested is not None:
        return cs.Array(meta[0], LAYOUTS[nested[0]])
    if not isinstance(meta[0], cs.Construct):
        raise TypeError(f"control body field {name}: {meta[0]!r} is not a construct")
    return meta[0]


def _nested(hint):
    """The body dataclass a field holds (one, or a tuple of them), else None."""
    if is_dataclass(hint):
        return hint, False
    args = get_args(hint)
    if args and get_origin(args[0]) is tuple and is_dataclass(get_args(args[0])[0]):
        return get_args(args[0])[0], True
    return None


def _struct_chars(name: str, c: cs.Construct) -> tuple[str, object]:
    """The ``struct`` format of one fixed-size field, and its Const value (or None)."""
    if isinstance(c, cs.Const):
        return _struct_chars(name, c.subcon)[0], c.value
    if isinstance(c, cs.Rebuild):
        return _struct_chars(name, c.subcon)[0], None
    if isinstance(c, cs.FormatField):
        return c.fmtstr[1:], None
    if isinstance(c, cs.Bytes) and isinstance(c.length, int):
        return f"{c.length}s", None
    raise TypeError(f"control body field {name}: {c!r} is not fixed-size")


def _decoder(cls):
    """A decoder of ``cls``'s fixed-size layout with one ``struct`` unpack:
    (struct format, reserved-field checks as (value index, value, name),
    values -> ``cls``, number of values). The construct layout of
    :data:`LAYOUTS` stays the normative one (and encodes keyword fields, the
    driver's side); the codec tests check that both agree on any bytes."""
    chars: list[str] = []
    checks: list[tuple[int, object, str]] = []
    parts: list[tuple[int, int, Callable | None]] = []
    pos = 0
    for f, sc in zip(fields(cls), LAYOUTS[cls].subcons, strict=True):
        nested = _nested(_HINTS[cls][f.name])
        if nested is not None:
            sub_fmt, sub_checks, sub_make, n = DECODERS[nested[0]]
            count = _HINTS[cls][f.name].__metadata__[0] if nested[1] else 1
            for k in range(count):
                chars.append(sub_fmt)
                checks.extend((pos + k * n + i, v, f"{f.name}[{k}].{name}") for i, v, name in sub_checks)
            if nested[1]:  # a fixed-count array of bodies: a tuple of them
                parts.append((pos, pos + count * n, functools.partial(_make_array, sub_make, n, count)))
            else:
                parts.append((pos, pos + n, sub_make))
            pos += count * n
            continue
        ch, const = _struct_chars(f.name, sc.subcon)
        chars.append(ch)
        if const is not None:
            checks.append((pos, const, f.name))
        parts.append((pos, pos + 1, None))
        pos += 1
    if all(sub is None for _, _, sub in parts):
        make = lambda v: cls(*v)  # noqa: E731
    else:
        def make(v):
            return cls(*[v[a] if sub is None else sub(v[a:b]) for a, b, sub in parts])
    return "".join(chars), tuple(checks), make, pos


def _flatten_array(sub: Callable, items) -> list:
    out: list = []
    for item in items:
        out.extend(sub(item))
    return out


def _make_array(sub_make: Callable, n: int, count: int, values) -> tuple:
    return tuple(sub_make(values[k * n:(k + 1) * n]) for k in range(count))


def _flattener(cls):
    """``cls`` instance -> the tuple of its wire values in layout order (the
    encoder's counterpart of :func:`_decoder`)."""
    names = [f.name for f in fields(cls)]
    nested: dict[str, Callable] = {}
    for f in fields(cls):
        n = _nested(_HINTS[cls][f.name])
        if n is not None:
            sub = FLATTENERS[n[0]]
            nested[f.name] = functools.partial(_flatten_array, sub) if n[1] else sub
    if not names:
        return lambda obj: ()
    get = attrgetter(*names)
    if not nested:
        return (lambda obj: (get(obj),)) if len(names) == 1 else get
    subs = [nested.get(n) for n in names]

    def flatten(obj):
        out = []
        for v, sub in zip(get(obj), subs, strict=True):
            if sub is None:
                out.append(v)
            else:
                out.extend(sub(v))
        return out
    return flatten


#: body dataclass -> its construct layout; -> its fixed-size decoder (struct format,
#: reserved-field checks, values -> dataclass)
LAYOUTS: dict[type, cs.Struct] = {}
DECODERS: dict[type, tuple] = {}
FLATTENERS: dict[type, Callable] = {}
_HINTS: dict[type, dict] = {}


def _register(cls) -> cs.Struct:
    hints = _HINTS[cls] = get_type_hints(cls, include_extras=True)
    LAYOUTS[cls] = cs.Struct(*(f.name / _field_layout(f.name, hints[f.name]) for f in fields(cls)))
    if cls is not RegMrReq:  # variable length: decode_request decodes it
        DECODERS[cls] = _decoder(cls)
        FLATTENERS[cls] = _flattener(cls)
    return LAYOUTS[cls]


for _cls in (Empty, QueryPortReq, QueryGidReq, DeallocPdReq, CreateCqReq, DestroyCqReq,
             ReqNotifyCqReq, MrChunk, RegMrReq, DeregMrReq, CreateQpReq, QpAttr, ModifyQpReq,
             QueryQpReq, DestroyQpReq, QueryDeviceResp, QueryPortResp, QueryGidResp, AllocPdResp,
             CreateCqResp, RegMrResp, CreateQpResp, QueryQpResp, AccelOpInfo, QueryAccelResp,
             CreateAqReq, CreateAqResp, DestroyAqReq, CancelAqJobReq, AckFeatures):
    _register(_cls)

#: the construct layouts by name (the normative structs of docs/virtio-rdma.md)
QpAttrLayout = LAYOUTS[QpAttr]
MrChunkLayout = LAYOUTS[MrChunk]
QP_ATTR_SIZE = QpAttrLayout.sizeof()
REG_MR_FIXED = 32
assert sum(sc.sizeof() for sc in LAYOUTS[RegMrReq].subcons[:-1]) == REG_MR_FIXED

#: cmd -> (request dataclass, response dataclass)
BODIES: dict[Cmd, tuple[type, type]] = {
    Cmd.QUERY_DEVICE: (Empty, QueryDeviceResp),
    Cmd.QUERY_PORT: (QueryPortReq, QueryPortResp),
    Cmd.QUERY_GID: (QueryGidReq, QueryGidResp),
    Cmd.ALLOC_PD: (Empty, AllocPdResp),
    Cmd.DEALLOC_PD: (DeallocPdReq, Empty),
    Cmd.CREATE_CQ: (CreateCqReq, CreateCqResp),
    Cmd.DESTROY_CQ: (DestroyCqReq, Empty),
    Cmd.REQ_NOTIFY_CQ: (ReqNotifyCqReq, Empty),
    Cmd.REG_MR: (RegMrReq, RegMrResp),
    Cmd.DEREG_MR: (DeregMrReq, Empty),
    Cmd.CREATE_QP: (CreateQpReq, CreateQpResp),
    Cmd.MODIFY_QP: (ModifyQpReq, Empty),
    Cmd.QUERY_QP: (QueryQpReq, QueryQpResp),
    Cmd.DESTROY_QP: (DestroyQpReq, Empty),
    Cmd.QUERY_ACCEL: (Empty, QueryAccelResp),
    Cmd.CREATE_AQ: (CreateAqReq, CreateAqResp),
    Cmd.DESTROY_AQ: (DestroyAqReq, Empty),
    Cmd.CANCEL_AQ_JOB: (CancelAqJobReq, Empty),
    Cmd.ACK_FEATURES: (AckFeatures, AckFeatures),
}
#: cmd -> (request layout, response layout)
COMMANDS: dict[Cmd, tuple[cs.Construct, cs.Construct]] = {
    cmd: (LAYOUTS[req], LAYOUTS[resp]) for cmd, (req, resp) in BODIES.items()}
#: the same formats compiled (construct's code generation; ~5x faster than
#: interpreted): they encode requests and responses given as keyword fields
#: and decode responses (the driver's side). The device decodes requests
#: and encodes responses with the ``struct`` twins below (a control command
#: is parsed and answered in ~10 us), which is what a guest hammering the
#: controlq costs the other guests of the daemon
_COMPILED: dict[Cmd, tuple[cs.Construct, cs.Construct]] = {
    cmd: (req.compile(), resp.compile()) for cmd, (req, resp) in COMMANDS.items()}
_REQ_SIZE = {cmd: req.sizeof() for cmd, (req, _) in COMMANDS.items() if cmd is not Cmd.REG_MR}
#: cmd -> (struct of its fixed-size request, reserved checks, values -> dataclass)
_REQ_DECODER = {cmd: (struct.Struct("<" + DECODERS[req][0]), DECODERS[req][1], DECODERS[req][2])
                for cmd, (req, _) in BODIES.items() if req is not RegMrReq}
#: cmd -> (struct of {le32 status} + its response, response dataclass -> values)
_RESP_ENCODER = {cmd: (struct.Struct("<I" + DECODERS[resp][0]), FLATTENERS[resp])
                 for cmd, (_, resp) in BODIES.items()}
_REG_MR_HEAD = struct.Struct("<" + "".join(_struct_chars(sc.name, sc.subcon)[0]
                                           for sc in LAYOUTS[RegMrReq].subcons[:-1]))
_MR_CHUNK = struct.Struct("<" + DECODERS[MrChunk][0])
assert _REG_MR_HEAD.size == REG_MR_FIXED and _MR_CHUNK.size == MrChunkLayout.sizeof()
_CTRL_HDR = struct.Struct("<HHI")   # CtrlHeader, unpacked on every command
_RESP_HDR = struct.Struct("<I")     # RespHeader

#: Hard syntactic cap on REG_MR chunk counts (the device limit may be lower).
MAX_MR_CHUNKS_WIRE = 1 << 20


def _plain(container) -> dict:
    """construct Container -> plain dict (drops construct's private keys)."""
    out: dict[str, Any] = {}
    for k, v in container.items():
        if k.startswith("_"):
            continue
        if isinstance(v, cs.Container):
            out[k] = _plain(v)
        elif isinstance(v, cs.ListContainer):
            out[k] = [_plain(x) if isinstance(x, cs.Container) else x for x in v]
        else:
            out[k] = v
    return out


def body_fields(body) -> dict:
    """A body dataclass -> the field dict its layout builds from (nested
    bodies and arrays of them included)."""
    out = {}
    for f in fields(body):
        v = getattr(body, f.name)
        if is_dataclass(v):
            v = body_fields(v)
        elif type(v) is tuple or type(v) is list:
            v = [body_fields(x) if is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def _field_values(kw: dict) -> dict:
    """Keyword fields, where a value may be a body dataclass (``attr=QpAttr(...)``)
    or a list of them, -> plain values."""
    for k, v in kw.items():
        if is_dataclass(v):
            kw[k] = body_fields(v)
        elif type(v) is tuple or type(v) is list:
            kw[k] = [body_fields(x) if is_dataclass(x) else x for x in v]
    return kw


def _build(fmt: cs.Construct, fields: dict, what: str) -> bytes:
    try:
        return fmt.build(fields)
    except (cs.ConstructError, KeyError, TypeError, ValueError, OverflowError, struct.error) as e:
        raise WireError(f"cannot encode {what}: {e}") from None


def _parse(fmt: cs.Construct, data, what: str) -> dict:
    try:
        return _plain(fmt.parse(bytes(data)))
    except cs.ConstructError as e:
        raise WireError(f"malformed {what}: {e}") from None


def encode_request(cmd: Cmd | int, body=None, hdr_flags: int = 0, **fields) -> bytes:
    """Build a control request: header {le16 cmd; le16 flags; le32 len} +
    body, from a request dataclass (``body``) or its fields as keywords."""
    cmd = Cmd.parse(cmd)
    values = body_fields(body) if body is not None else _field_values(fields)
    raw = _build(_COMPILED[cmd][0], values, f"{cmd.name} request")
    return CtrlHeader.build(dict(cmd=cmd, flags=hdr_flags, len=len(raw))) + raw


_EMPTY = Empty()


def decode_request(buf: bytes | memoryview) -> tuple[Cmd, object]:
    """Parse and syntax-check a control request. Returns (cmd, request
    dataclass of ``BODIES[cmd][0]``)."""
    buf = memoryview(buf)
    if len(buf) < CTRL_HEADER_SIZE:
        raise WireError(f"control request of {len(buf)} bytes is shorter than its "
                        f"{CTRL_HEADER_SIZE}-byte header")
    hdr_cmd, hdr_flags, hdr_len = _CTRL_HDR.unpack_from(buf)
    cmd = Cmd.parse(hdr_cmd)
    if hdr_flags != 0:
        raise WireError(f"{cmd.name}: reserved flags {hdr_flags:#x} must be 0")
    body = buf[CTRL_HEADER_SIZE:]
    if hdr_len != len(body):
        raise WireError(f"{cmd.name}: header len {hdr_len} but {len(body)} body bytes")
    if cmd is Cmd.REG_MR:
        if len(body) < REG_MR_FIXED:
            raise WireError(f"REG_MR body of {len(body)} bytes is shorter than {REG_MR_FIXED}")
        n = int.from_bytes(body[24:28], "little")
        if n > MAX_MR_CHUNKS_WIRE:
            raise WireError(f"REG_MR nchunks {n} exceeds {MAX_MR_CHUNKS_WIRE}")
        want = REG_MR_FIXED + n * _MR_CHUNK.size
    else:
        want = _REQ_SIZE[cmd]
    if len(body) != want:
        raise WireError(f"{cmd.name}: body is {len(body)} bytes, expected {want}")
    if want == 0:
        return cmd, _EMPTY
    if cmd is Cmd.REG_MR:
        pdn, access, iova, length, n, rsvd = _REG_MR_HEAD.unpack_from(body)
        if rsvd:
            raise WireError(f"REG_MR: reserved field is {rsvd:#x}, must be 0")
        return cmd, RegMrReq(pdn, access, iova, length, nchunks=n, chunks=tuple(
            MrChunk(gpa, ln) for gpa, ln in _MR_CHUNK.iter_unpack(body[REG_MR_FIXED:])))
    fmt, checks, make = _REQ_DECODER[cmd]
    v = fmt.unpack(body)
    for i, value, name in checks:
        if v[i] != value:
            raise WireError(f"{cmd.name}: reserved field {name} is {v[i]:#x}, must be {value:#x}")
    return cmd, make(v)


def encode_response(cmd: Cmd | int, status: Status | int = Status.OK, body=None, **fields) -> bytes:
    """Build a response: {le32 status} + body (body only when status is OK),
    from a response dataclass (``body``: the device's handlers; ``None`` for
    a command without a response body) or its fields as keywords."""
    cmd = Cmd.parse(cmd)
    status = Status.parse(status)
    if status != Status.OK:
        return _RESP_HDR.pack(status)
    if fields:
        return _RESP_HDR.pack(status) + _build(_COMPILED[cmd][1], _field_values(fields),
                                               f"{cmd.name} response")
    fmt, flatten = _RESP_ENCODER[cmd]
    if body is None:
        body = _EMPTY
    elif type(body) is not BODIES[cmd][1]:
        raise WireError(f"{cmd.name} response body is a {type(body).__name__}, "
                        f"expected {BODIES[cmd][1].__name__}")
    try:
        return fmt.pack(status, *flatten(body))
    except struct.error as e:
        raise WireError(f"cannot encode {cmd.name} response: {e}") from None


def decode_response(cmd: Cmd | int, buf: bytes | memoryview) -> tuple[Status, dict | None]:
    """Parse a response to ``cmd`` (the driver's side). The body, a field
    dict, is None unless the status is OK."""
    cmd = Cmd.parse(cmd)
    buf = memoryview(buf)
    if len(buf) < RESP_HEADER_SIZE:
        raise WireError(f"{cmd.name} response of {len(buf)} bytes has no status")
    status = Status.parse(int.from_bytes(buf[:4], "little"))
    if status != Status.OK:
        return status, None
    fmt = COMMANDS[cmd][1]
    body = buf[RESP_HEADER_SIZE:]
    if len(body) < fmt.sizeof():
        raise WireError(f"{cmd.name} response body is {len(body)} bytes, expected {fmt.sizeof()}")
    return status, _parse(_COMPILED[cmd][1], body[: fmt.sizeof()], f"{cmd.name} response")


def response_size(cmd: Cmd | int) -> int:
    """Bytes the driver must provide in writable descriptors for ``cmd``."""
    return RESP_HEADER_SIZE + COMMANDS[Cmd.parse(cmd)][1].sizeof()


def encode_config(**fields) -> bytes:
    """struct virtio_rdma_config; ``magic``, ``abi_version``, ``config_size``,
    ``carrier_reserved`` and ``reserved`` default to this ABI's values."""
    fields = {"magic": CONFIG_MAGIC, "abi_version": ABI_VERSION, "config_size": CONFIG_SIZE,
              "carrier_reserved": 0, "reserved": 0, **fields}
    return _build(Config, fields, "config space")


def decode_config(buf) -> dict:
    """Parse the device config (the driver's side): at least the first
    CONFIG_CARRIER_SIZE bytes (what a blk carrier exposes; the rest reads as
    0). A wrong magic or an ABI version this library does not know is a
    WireError naming it."""
    buf = bytes(buf)
    if len(buf) < CONFIG_CARRIER_SIZE:
        raise WireError(f"config space is {len(buf)} bytes, expected at least {CONFIG_CARRIER_SIZE}")
    buf = (buf[:CONFIG_CARRIER_SIZE] + bytes(CONFIG_SIZE))[:CONFIG_SIZE]
    magic, abi = struct.unpack_from("<IH", buf)
    if magic != CONFIG_MAGIC:
        raise WireError(f"config magic {magic:#010x} is not virtio-rdma's {CONFIG_MAGIC:#010x}")
    if abi != ABI_VERSION:
        raise WireError(f"config ABI version {abi} is not {ABI_VERSION}, the one this library speaks")
    return _parse(Config, buf, "config space")


def qp_attr_defaults(**fields) -> QpAttr:
    """A :class:`QpAttr` with zeros for everything not given."""
    try:
        return QpAttr(**fields)
    except TypeError:
        unknown = set(fields) - set(QpAttr.__dataclass_fields__)
        raise WireError(f"unknown QpAttr fields {sorted(unknown)}") from None


# --------------------------------------------------------------------------
# 5.5 Work queues: WQEs in guest memory
# --------------------------------------------------------------------------
SendWqeHeader = cs.Struct(
    "wr_id" / u64,
    "opcode" / u8,
    "send_flags" / u8,
    "num_sge" / u16,
    "imm_data" / u32,
    "remote_addr" / u64,
    "rkey" / u32,
    "inline_len" / u32,
    "compare_add" / u64,
    "swap" / u64,
    "reserved" / cs.Const(bytes(16)),
)
RecvWqeHeader = cs.Struct(
    "wr_id" / u64,
    "num_sge" / u16,
    "reserved0" / cs.Const(0, u16),
    "reserved1" / cs.Const(0, u32),
)
Sge = cs.Struct("addr" / u64, "length" / u32, "lkey" / u32)

SEND_WQE_HEADER_SIZE = SendWqeHeader.sizeof()  # 64
RECV_WQE_HEADER_SIZE = RecvWqeHeader.sizeof()  # 16
SGE_SIZE = Sge.sizeof()  # 16

_SEND_HDR = struct.Struct("<QBBHIQIIQQ16s")
_RECV_HDR = struct.Struct("<QHHI")
_SGE = struct.Struct("<QII")
assert _SEND_HDR.size == SEND_WQE_HEADER_SIZE and _RECV_HDR.size == RECV_WQE_HEADER_SIZE
assert _SGE.size == SGE_SIZE
_INLINE = int(SendFlags.INLINE)
_ZERO16 = bytes(16)


def _pow2_ceil(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True, slots=True)
class WqLayout:
    """Geometry of a QP's two rings, computed identically by driver and device."""

    sq_depth: int
    rq_depth: int
    sq_wqe_shift: int
    rq_wqe_shift: int
    max_send_sge: int
    max_recv_sge: int
    max_inline_data: int

    @property
    def sq_bytes(self) -> int:
        return self.sq_depth << self.sq_wqe_shift

    @property
    def rq_bytes(self) -> int:
        return self.rq_depth << self.rq_wqe_shift


def wq_layout(max_send_wr: int, max_recv_wr: int, max_send_sge: int, max_recv_sge: int,
              max_inline_data: int) -> WqLayout:
    """Spec 5.5.1: ring depths and slot sizes for the requested capabilities.

    depth = next power of two >= max(1, max_wr);
    SQ slot = next power of two >= 64 + max(16 * max_send_sge, round_up(max_inline, 16));
    RQ slot = next power of two >= 16 + 16 * max(1, max_recv_sge).
    The usable max_send_sge / max_inline_data grow to fill the slot.
    """
    for name, v in (("max_send_wr", max_send_wr), ("max_recv_wr", max_recv_wr),
                    ("max_send_sge", max_send_sge), ("max_recv_sge", max_recv_sge),
                    ("max_inline_data", max_inline_data)):
        if not 0 <= v < (1 << 31):
            raise WireError(f"{name} {v} out of range")
    sq_payload = max(SGE_SIZE * max_send_sge, (max_inline_data + 15) & ~15)
    sq_slot = max(64, _pow2_ceil(SEND_WQE_HEADER_SIZE + sq_payload))
    rq_slot = max(32, _pow2_ceil(RECV_WQE_HEADER_SIZE + SGE_SIZE * max(1, max_recv_sge)))
    return WqLayout(
        sq_depth=_pow2_ceil(max(1, max_send_wr)),
        rq_depth=_pow2_ceil(max(1, max_recv_wr)),
        sq_wqe_shift=sq_slot.bit_length() - 1,
        rq_wqe_shift=rq_slot.bit_length() - 1,
        max_send_sge=(sq_slot - SEND_WQE_HEADER_SIZE) // SGE_SIZE,
        max_recv_sge=(rq_slot - RECV_WQE_HEADER_SIZE) // SGE_SIZE,
        max_inline_data=sq_slot - SEND_WQE_HEADER_SIZE,
    )


@dataclass(slots=True)
class SgeEntry:
    addr: int
    length: int
    lkey: int


@dataclass(slots=True)
class SendWqe:
    """A decoded send work request. ``inline`` is a view into the WQE slot (no copy)."""

    wr_id: int
    opcode: WrOpcode
    send_flags: SendFlags
    imm_data: int = 0
    remote_addr: int = 0
    rkey: int = 0
    compare_add: int = 0
    swap: int = 0
    sges: list[SgeEntry] = field(default_factory=list)  # decode_send_wqe passes its own
    inline: memoryview | bytes | None = None

    @property
    def length(self) -> int:
        if self.inline is not None:
            return len(self.inline)
        return sum(s.length for s in self.sges)


@dataclass(slots=True)
class RecvWqe:
    wr_id: int
    sges: list


def pack_send_wqe_header(buf, off: int, wr_id: int, opcode: int, send_flags: int, num_sge: int,
                         imm_data: int = 0, remote_addr: int = 0, rkey: int = 0, inline_len: int = 0,
                         compare_add: int = 0, swap: int = 0) -> None:
    """Write a send WQE header into ``buf`` at ``off`` (the driver's hot path:
    WQEs are built in place in the SQ ring). Raises struct.error on bad values."""
    _SEND_HDR.pack_into(buf, off, wr_id, opcode, send_flags, num_sge, imm_data, remote_addr, rkey,
                        inline_len, compare_add, swap, _ZERO16)


def pack_recv_wqe_header(buf, off: int, wr_id: int, num_sge: int) -> None:
    _RECV_HDR.pack_into(buf, off, wr_id, num_sge, 0, 0)


def pack_sges(buf, off: int, sges) -> int:
    """Write (addr, length, lkey) triples from ``off``; returns the end offset."""
    for addr, length, lkey in sges:
        _SGE.pack_into(buf, off, addr, length, lkey)
        off += SGE_SIZE
    return off


def _slot(length: int, slot_size: int | None, what: str) -> bytearray:
    if slot_size is None:
        return bytearray(length)
    if length > slot_size:
        raise WireError(f"{what} of {length} bytes does not fit a {slot_size}-byte slot")
    return bytearray(slot_size)


def encode_send_wqe(wr_id: int, opcode: WrOpcode | int, send_flags: int = 0, *, sges=(),
                    inline: bytes | None = None, imm_data: int = 0, remote_addr: int = 0,
                    rkey: int = 0, compare_add: int = 0, swap: int = 0,
                    slot_size: int | None = None) -> bytes:
    """Encode a send WQE (header + SGEs or inline data), zero-padded to ``slot_size``."""
    opcode = WrOpcode.parse(opcode)
    send_flags = SendFlags.parse(send_flags)
    if inline is not None:
        send_flags |= SendFlags.INLINE
        payload = bytes(inline)
        num_sge, inline_len, length = 0, len(payload), len(payload)
    else:
        if send_flags & SendFlags.INLINE:
            raise WireError("INLINE flag set but no inline data given")
        sges = [(int(a), int(n), int(k)) for a, n, k in sges]
        num_sge, inline_len, length = len(sges), 0, SGE_SIZE * len(sges)
    out = _slot(SEND_WQE_HEADER_SIZE + length, slot_size, "send WQE")
    if inline is None:
        try:
            pack_sges(out, SEND_WQE_HEADER_SIZE, sges)
        except struct.error as e:
            raise WireError(f"bad SGE in {sges!r}: {e}") from None
    else:
        out[SEND_WQE_HEADER_SIZE:SEND_WQE_HEADER_SIZE + inline_len] = payload
    try:
        pack_send_wqe_header(out, 0, wr_id, opcode, send_flags, num_sge, imm_data, remote_addr, rkey,
                             inline_len, compare_add, swap)
    except struct.error as e:
        raise WireError(f"cannot encode send WQE: {e}") from None
    return bytes(out)


def decode_send_wqe(slot: memoryview | bytes, max_sge: int | None = None) -> SendWqe:
    """Decode the send WQE in ``slot`` (the whole slot). Inline data stays a view."""
    slot = memoryview(slot)
    if len(slot) < SEND_WQE_HEADER_SIZE:
        raise WireError(f"send WQE slot of {len(slot)} bytes is shorter than its header")
    (wr_id, opcode, flags, num_sge, imm, raddr, rkey, inline_len, cmp_add, swap,
     rsvd) = _SEND_HDR.unpack_from(slot)
    if rsvd != _ZERO16:
        raise WireError(f"send WQE wr_id={wr_id:#x}: reserved bytes are not zero")
    opcode = WrOpcode.parse(opcode)
    inline = flags & _INLINE          # on the raw int: flag arithmetic is slow on enums
    flags = SendFlags.parse(flags)
    room = len(slot) - SEND_WQE_HEADER_SIZE
    wqe = SendWqe(wr_id, opcode, flags, imm, raddr, rkey, cmp_add, swap, [], None)
    if inline:
        if num_sge != 0:
            raise WireError(f"send WQE wr_id={wr_id:#x}: INLINE with num_sge {num_sge}")
        if inline_len > room:
            raise WireError(f"send WQE wr_id={wr_id:#x}: inline_len {inline_len} exceeds slot room {room}")
        wqe.inline = slot[SEND_WQE_HEADER_SIZE:SEND_WQE_HEADER_SIZE + inline_len]
        return wqe
    if inline_len != 0:
        raise WireError(f"send WQE wr_id={wr_id:#x}: inline_len {inline_len} without INLINE flag")
    limit = room // SGE_SIZE if max_sge is None else min(max_sge, room // SGE_SIZE)
    if num_sge > limit:
        raise WireError(f"send WQE wr_id={wr_id:#x}: num_sge {num_sge} exceeds {limit}")
    off = SEND_WQE_HEADER_SIZE
    for _ in range(num_sge):
        wqe.sges.append(SgeEntry(*_SGE.unpack_from(slot, off)))
        off += SGE_SIZE
    return wqe


def encode_recv_wqe(wr_id: int, sges=(), *, slot_size: int | None = None) -> bytes:
    sges = [(int(a), int(n), int(k)) for a, n, k in sges]
    out = _slot(RECV_WQE_HEADER_SIZE + SGE_SIZE * len(sges), slot_size, "recv WQE")
    try:
        pack_recv_wqe_header(out, 0, wr_id, len(sges))
        pack_sges(out, RECV_WQE_HEADER_SIZE, sges)
    except struct.error as e:
        raise WireError(f"cannot encode recv WQE: {e}") from None
    return bytes(out)


def decode_recv_wqe(slot: memoryview | bytes, max_sge: int | None = None) -> RecvWqe:
    slot = memoryview(slot)
    if len(slot) < RECV_WQE_HEADER_SIZE:
        raise WireError(f"recv WQE slot of {len(slot)} bytes is shorter than its header")
    wr_id, num_sge, r0, r1 = _RECV_HDR.unpack_from(slot)
    if r0 or r1:
        raise WireError(f"recv WQE wr_id={wr_id:#x}: reserved fields are not zero")
    room = (len(slot) - RECV_WQE_HEADER_SIZE) // SGE_SIZE
    limit = room if max_sge is None else min(room, max_sge)
    if num_sge > limit:
        raise WireError(f"recv WQE wr_id={wr_id:#x}: num_sge {num_sge} exceeds {limit}")
    sges = [SgeEntry(*_SGE.unpack_from(slot, RECV_WQE_HEADER_SIZE + i * SGE_SIZE))
            for i in range(num_sge)]
    return RecvWqe(wr_id, sges)


# --------------------------------------------------------------------------
# Accelerator job entries (spec "Accelerator queues")
# --------------------------------------------------------------------------
AccelJobHeader = cs.Struct(
    "wr_id" / u64,
    "op" / u8,
    "dtype" / u8,
    "num_in" / u8,
    "num_out" / u8,
    "size" / u32,
    "batch" / u32,
    "iterations" / u16,
    "early_stop" / u8,
    "flags" / u8,
    "scaling" / cs.Float32l,
    "reserved" / cs.Const(bytes(36)),
)
ACCEL_JOB_HEADER_SIZE = AccelJobHeader.sizeof()  # 64
_AJOB = struct.Struct("<QBBBBIIHBBf36s")
assert _AJOB.size == ACCEL_JOB_HEADER_SIZE == 64
assert ACCEL_JOB_HEADER_SIZE + MAX_ACCEL_SGE * SGE_SIZE == AQ_SLOT_SIZE
_NO_RESERVED = bytes(36)


@dataclass(frozen=True, slots=True)
class AccelJob:
    """A decoded accelerator job entry. Syntax only: whether the size, K,
    batch and iterations are ones the operation supports, and whether the
    SGEs are the guest's, is for the device to check."""

    wr_id: int
    op: AccelOp
    dtype: AccelDtype
    size: int
    batch: int
    iterations: int
    early_stop: AccelEarlyStop
    scaling: float | None
    inputs: list[SgeEntry]
    outputs: list[SgeEntry]

    @property
    def in_length(self) -> int:
        return sum(s.length for s in self.inputs)

    @property
    def out_length(self) -> int:
        return sum(s.length for s in self.outputs)


def encode_accel_job(wr_id: int, op: AccelOp | int, *, size: int, batch: int = 1,
                     dtype: AccelDtype | int = AccelDtype.COMPLEX64, iterations: int = 0,
                     early_stop: AccelEarlyStop | int = AccelEarlyStop.NONE,
                     scaling: float | None = None, inputs=(), outputs=()) -> bytes:
    """One AQ_SLOT_SIZE-byte job entry; ``inputs``/``outputs`` are (addr, length, lkey)."""
    ins = [(int(a), int(n), int(k)) for a, n, k in inputs]
    outs = [(int(a), int(n), int(k)) for a, n, k in outputs]
    if len(ins) + len(outs) > MAX_ACCEL_SGE:
        raise WireError(f"accel job wr_id={wr_id:#x}: {len(ins)} + {len(outs)} SGEs exceed {MAX_ACCEL_SGE}")
    out = bytearray(AQ_SLOT_SIZE)
    flags = AccelJobFlags.SCALING if scaling is not None else 0
    try:
        _AJOB.pack_into(out, 0, wr_id, AccelOp.parse(op), AccelDtype.parse(dtype), len(ins), len(outs),
                        size, batch, iterations, AccelEarlyStop.parse(early_stop), flags,
                        0.0 if scaling is None else scaling, _NO_RESERVED)
        for i, sge in enumerate(ins + outs):
            _SGE.pack_into(out, ACCEL_JOB_HEADER_SIZE + i * SGE_SIZE, *sge)
    except struct.error as e:
        raise WireError(f"cannot encode accel job wr_id={wr_id:#x}: {e}") from None
    return bytes(out)


def decode_accel_job(slot: memoryview | bytes) -> AccelJob:
    """Decode one job entry (syntax: reserved bytes, enumeration values, SGE
    counts; raises WireError or UnknownValueError)."""
    slot = memoryview(slot)
    if len(slot) < AQ_SLOT_SIZE:
        raise WireError(f"accel job slot of {len(slot)} bytes is shorter than {AQ_SLOT_SIZE}")
    (wr_id, op, dtype, n_in, n_out, size, batch, iterations, early_stop, flags, scaling,
     reserved) = _AJOB.unpack_from(slot)
    if reserved != _NO_RESERVED:
        raise WireError(f"accel job wr_id={wr_id:#x}: reserved bytes are not zero")
    if not n_in or not n_out or n_in + n_out > MAX_ACCEL_SGE:
        raise WireError(f"accel job wr_id={wr_id:#x}: {n_in} input and {n_out} output SGEs "
                        f"(each at least 1, together at most {MAX_ACCEL_SGE})")
    jflags = AccelJobFlags.parse(flags)
    sges = [SgeEntry(*_SGE.unpack_from(slot, ACCEL_JOB_HEADER_SIZE + i * SGE_SIZE))
            for i in range(n_in + n_out)]
    return AccelJob(wr_id, AccelOp.parse(op), AccelDtype.parse(dtype), size, batch, iterations,
                    AccelEarlyStop.parse(early_stop),
                    scaling if jflags & AccelJobFlags.SCALING else None, sges[:n_in], sges[n_in:])


# --------------------------------------------------------------------------
# 5.6 Completion queue entries
# --------------------------------------------------------------------------
Cqe = cs.Struct(
    "wr_id" / u64,
    "status" / u8,
    "opcode" / u8,
    "wc_flags" / u8,
    "owner" / u8,
    "byte_len" / u32,
    "imm_data" / u32,
    "qp_num" / u32,
    "src_qp" / u32,
    "vendor_err" / u32,
)
CQE_SIZE = Cqe.sizeof()  # 32
CQE_OWNER_OFFSET = 11
_CQE = struct.Struct("<QBBBBIIIII")
# The CQE without its owner byte, in two pieces: struct.pack_into zeroes the
# bytes it packs before writing them, so packing over a live owner byte would
# flip it for a moment under a polling driver.
_CQE_HEAD = struct.Struct("<QBBB")        # bytes 0..10
_CQE_TAIL = struct.Struct("<IIIII")       # bytes 12..31
assert _CQE.size == CQE_SIZE


@dataclass(slots=True)
class Completion:
    """One work completion (ibv_wc); an accelerator completion has
    ``opcode`` ACCEL_CQE_OPCODE_BASE | AccelOp (:class:`AccelCompletion`)."""

    wr_id: int
    status: WcStatus
    opcode: WcOpcode | int
    qp_num: int
    byte_len: int = 0
    imm_data: int = 0
    wc_flags: int = 0
    src_qp: int = 0
    vendor_err: int = 0


def encode_cqe(c: Completion, owner: int) -> bytes:
    return _CQE.pack(c.wr_id, c.status, c.opcode, c.wc_flags, owner & 1, c.byte_len,
                     c.imm_data, c.qp_num, c.src_qp, c.vendor_err)


def pack_cqe_into(buf, c: Completion, owner: int) -> None:
    """Write a CQE into ``buf`` (32 bytes), the owner byte last (spec 5.6).

    The body is written around the old owner byte, which is never touched
    before the last store, so a driver polling concurrently never sees a new
    owner bit with a stale body.
    """
    _CQE_HEAD.pack_into(buf, 0, c.wr_id, c.status, c.opcode, c.wc_flags)
    _CQE_TAIL.pack_into(buf, CQE_OWNER_OFFSET + 1, c.byte_len, c.imm_data, c.qp_num, c.src_qp,
                        c.vendor_err)
    buf[CQE_OWNER_OFFSET] = owner & 1


def decode_cqe(buf) -> tuple[Completion, int]:
    """Decode a CQE; returns (completion, owner bit)."""
    if len(buf) < CQE_SIZE:
        raise WireError(f"CQE of {len(buf)} bytes, expected {CQE_SIZE}")
    wr_id, st, op, fl, owner, blen, imm, qpn, src, verr = _CQE.unpack_from(buf)
    if owner & ~1:
        raise WireError(f"CQE owner byte {owner:#x} has reserved bits set")
    if op & 0xF0 == ACCEL_CQE_OPCODE_BASE:  # an accelerator completion (decode_accel_cqe)
        AccelOp.parse(op & 0x0F)
        return Completion(wr_id, WcStatus.parse(st), op, qpn, blen, imm, AccelStatus.parse(fl), src,
                          verr), owner
    return Completion(wr_id, WcStatus.parse(st), WcOpcode.parse(op), qpn, blen, imm,
                      int(WcFlags.parse(fl)), src, verr), owner


#: the CQE's status (enum ibv_wc_status) of each accelerator status
ACCEL_WC_STATUS = {
    AccelStatus.SUCCESS: WcStatus.SUCCESS,
    AccelStatus.INVALID_PARAMS: WcStatus.LOC_QP_OP_ERR,
    AccelStatus.LOCAL_PROT: WcStatus.LOC_PROT_ERR,
    AccelStatus.LOCAL_LEN: WcStatus.LOC_LEN_ERR,
    AccelStatus.NO_ACCELERATOR: WcStatus.LOC_QP_OP_ERR,
    AccelStatus.REMOTE_FAILED: WcStatus.REM_OP_ERR,
    AccelStatus.CANCELLED: WcStatus.WR_FLUSH_ERR,
    AccelStatus.FLUSHED: WcStatus.WR_FLUSH_ERR,
    AccelStatus.QUOTA_EXCEEDED: WcStatus.LOC_QP_OP_ERR,
}
#: saturation of the microsecond fields of an accelerator CQE
ACCEL_US_MAX = (1 << 32) - 1
ACCEL_SERVICE_US_MAX = (1 << 24) - 1


@dataclass(frozen=True, slots=True)
class AccelCompletion:
    """An accelerator completion, as its CQE carries it:

    ``opcode`` ACCEL_CQE_OPCODE_BASE | op; ``wc_flags`` the AccelStatus;
    ``byte_len`` the bytes written to the output; ``qp_num`` the AQN;
    ``imm_data`` the host that ran the job (0: this one); ``src_qp`` the
    queue wait in us; ``vendor_err`` the service time in us (bits 0..23)
    and, for TURBO_DECODE, the most iterations any block used (bits 24..31).
    """

    wr_id: int
    op: AccelOp
    status: AccelStatus
    aqn: int
    byte_len: int = 0
    host: int = 0
    wait_us: int = 0
    service_us: int = 0
    iterations: int = 0

    def to_cqe(self) -> Completion:
        service = min(max(0, int(self.service_us)), ACCEL_SERVICE_US_MAX)
        return Completion(self.wr_id, ACCEL_WC_STATUS[self.status], ACCEL_CQE_OPCODE_BASE | self.op,
                          self.aqn, self.byte_len, self.host & 0xFFFFFFFF, int(self.status),
                          min(max(0, int(self.wait_us)), ACCEL_US_MAX),
                          service | (min(self.iterations, 255) << 24))


def is_accel_cqe(c: Completion) -> bool:
    return int(c.opcode) & 0xF0 == ACCEL_CQE_OPCODE_BASE


def decode_accel_cqe(c: Completion) -> AccelCompletion:
    """The accelerator completion a CQE carries (UnknownValueError if it is not one)."""
    if not is_accel_cqe(c):
        raise UnknownValueError(f"CQE opcode {int(c.opcode):#x} is not an accelerator completion")
    return AccelCompletion(c.wr_id, AccelOp.parse(int(c.opcode) & 0x0F), AccelStatus.parse(c.wc_flags),
                           c.qp_num, c.byte_len, c.imm_data, c.src_qp, c.vendor_err & ACCEL_SERVICE_US_MAX,
                           c.vendor_err >> 24)


# --------------------------------------------------------------------------
# 5.4 Doorbells, doorbell records in guest memory, 5.7 events
# --------------------------------------------------------------------------
DoorbellRecord = cs.Struct("num_kind" / u32, "value" / u32)
DOORBELL_SIZE = DoorbellRecord.sizeof()  # 8
_DB = struct.Struct("<II")

QpDbrec = cs.Struct("sq_pi" / u32, "rq_pi" / u32)
CqDbrec = cs.Struct("ci" / u32, "reserved" / u32)
DBREC_SIZE = 8
_DBREC = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class Doorbell:
    kind: DoorbellKind
    num: int
    value: int


def encode_doorbell(kind: DoorbellKind | int, num: int, value: int) -> bytes:
    kind = DoorbellKind.parse(kind)
    if not 0 <= num <= OBJ_NUM_MASK:
        raise WireError(f"doorbell object number {num} does not fit 24 bits")
    if kind is DoorbellKind.CQ_ARM:
        CqArm.parse(value)
    try:
        return _DB.pack(num | (kind << 24), value)
    except struct.error as e:
        raise WireError(f"cannot encode doorbell: {e}") from None


def decode_doorbells(buf) -> list[Doorbell]:
    """Decode a doorbell buffer: an array of 8-byte records."""
    buf = memoryview(buf)
    if len(buf) % DOORBELL_SIZE:
        raise WireError(f"doorbell buffer of {len(buf)} bytes is not a multiple of {DOORBELL_SIZE}")
    out = []
    for word, value in _DB.iter_unpack(buf):
        kind = DoorbellKind.parse(word >> 24)
        if kind is DoorbellKind.CQ_ARM:
            CqArm.parse(value)
        out.append(Doorbell(kind, word & OBJ_NUM_MASK, value))
    return out


EventRecord = cs.Struct("kind" / u8, "reserved" / cs.Const(0, u8), "type" / u16, "number" / u32)
#: The event record as ``struct`` packs it (kind, reserved, type, number): the
#: one packed layout the device (:func:`encode_events`) and guests
#: (:func:`iter_event_records`) use.
_EV = struct.Struct("<BBHI")
EVENT_SIZE = _EV.size  # 8
assert EventRecord.sizeof() == EVENT_SIZE


@dataclass(frozen=True, slots=True)
class Event:
    """An eventq record: a completion event (type 0, number = CQN) or an async event."""

    kind: EventKind
    type: int
    number: int

    def encode(self) -> bytes:
        return _EV.pack(self.kind, 0, self.type, self.number)


def encode_events(events) -> bytes:
    """Event records of ``events`` (objects with ``kind``, ``type``, ``number``), back to back."""
    pack = _EV.pack
    return b"".join([pack(e.kind, 0, e.type, e.number) for e in events])


def iter_event_records(buf):
    """``(kind, reserved, type, number)`` of each whole record in ``buf``, unchecked
    (a trailing partial record is ignored); :func:`decode_event` checks one."""
    return _EV.iter_unpack(buf[: len(buf) - len(buf) % EVENT_SIZE])


def decode_event(buf) -> Event:
    if len(buf) < EVENT_SIZE:
        raise WireError(f"event record of {len(buf)} bytes, expected {EVENT_SIZE}")
    kind, rsvd, typ, num = _EV.unpack_from(buf)
    if rsvd:
        raise WireError("event record reserved byte is not zero")
    kind = EventKind.parse(kind)
    if kind is EventKind.ASYNC:
        AsyncEvent.parse(typ)
    elif typ != 0:
        raise WireError(f"completion event with type {typ}")
    return Event(kind, typ, num)


__all__ = [n for n in dir() if not n.startswith("_")] + ["VirtioRdmaError", "UnknownValueError"]
