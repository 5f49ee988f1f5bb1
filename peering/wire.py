"""Wire formats of the daemon-to-daemon link (docs/peering.md).

Pure codecs, no I/O. Two families:

* **Connection management** (:class:`ConnectMsg`): the payload of an
  unreliable-datagram SEND to the peer's GSI QP (QPN 1), as RDMA CM's REQ/REP
  travel; it carries the sender's incarnation, link QPN and first PSN, the
  jobs it accepts in flight (credits), its accelerators, its landing
  window and its counters window (its live load, for one-sided READs).
* **Link messages** (:class:`JobMsg`, :class:`GrantMsg`, :class:`GoMsg`,
  :class:`ResultMsg`): RC SENDs on the link QP. A job names its output by a
  (virtual address, R_Key, length) window the origin opened on the guest's
  buffer; the server grants a window on its staging memory for the input,
  which the origin WRITEs and follows with GO; the server runs the job, WRITEs
  the output into the guest's buffer and SENDs the result. Each message
  follows the data it announces on the same QP, so RC ordering puts the data
  in place before the message arrives.

All integers little endian, each layout a ``construct`` definition. Decoding
checks syntax (magic, version, type, reserved bytes, enumeration values) and
raises :class:`PeerWireError` naming the bad field; semantics (is the size
supported, does the tag exist) are for :mod:`peering.remote`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import construct as cs

from virtio_rdma.constants import AccelDtype, AccelEarlyStop, AccelOp, AccelStatus
from virtio_rdma.errors import UnknownValueError

u8, u16, u32, u64 = cs.Int8ul, cs.Int16ul, cs.Int32ul, cs.Int64ul

#: "VRPL": vrdma peer link
MAGIC = 0x4C505256
#: 2: the connect message names the sender's counters window (one-sided load reads);
#: 3: and the board's windows, when the sender holds the cluster's load board;
#: 4: a job carries its tenant's name and priority class (issue #18)
VERSION = 4
#: accelerator operations a ConnectMsg can describe
MAX_OPS = 4
#: JobMsg.slot of a job whose input waits for a GRANT
NO_SLOT = 0xFFFFFFFF
#: JobMsg.tenant: bytes of the tenant name field (NUL padded; "" = no tenant)
TENANT_BYTES = 32
#: JobMsg.klass: the tenant's priority class, 0 (low) .. MAX_CLASS (high), as vhost_user.tenancy.Class
MAX_CLASS = 2
_TENANT_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-@")


class PeerWireError(ValueError):
    """A peer's message is malformed; ``field`` names what is wrong."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class ConnectType:
    REQ = 1   # the active side (lower address) asks: here is my QP
    REP = 2   # the passive side answers: here is mine, already in RTS


class LinkType:
    JOB = 1      # origin -> server: run this (parameters, sizes, the output window)
    RESULT = 2   # server -> origin: done (the output is in the window), or refused
    GRANT = 3    # server -> origin: accepted; WRITE the input into this window
    GO = 4       # origin -> server: the input is written (RC order: it is in place)


# --------------------------------------------------------------------------
# Connection management (UD payload to QPN 1)
# --------------------------------------------------------------------------
OpInfoLayout = cs.Struct(
    "op" / u8,               # AccelOp
    "units" / u8,            # accelerators that run it
    "reserved" / cs.Const(0, u16),
    "est_fixed_ns" / u32,    # service-time estimate, as QUERY_ACCEL's fields
    "est_unit_ps" / u32,
)
ConnectLayout = cs.Struct(
    "magic" / cs.Const(MAGIC, u32),
    "version" / u8,
    "type" / u8,
    "num_ops" / u8,
    "reserved0" / cs.Const(0, u8),
    "incarnation" / u64,     # the sender daemon's, random at its start
    "echo" / u64,            # REP: the REQ's incarnation; REQ: 0
    "attempt" / u32,         # REQ: the active side's attempt (counts up); REP: the REQ's, echoed
    "qpn" / u32,             # the sender's link QP
    "psn" / u32,             # the first PSN it sends
    "credits" / u16,         # jobs it accepts in flight from the receiver
    "mtu" / u16,             # path MTU bytes it proposes (REP: the one chosen)
    "landing_rkey" / u32,    # its landing window for the receiver's job inputs (0: none)
    "landing_slots" / u16,   # ... of this many slots
    "landing_slot_kib" / u16,  # ... of this many KiB each (slot i at va i * slot bytes)
    "ops" / cs.Array(MAX_OPS, OpInfoLayout),
    "counters_rkey" / u32,   # its live load counters, for the receiver to RDMA READ (0: none)
    "counters_len" / u16,    # ... of this many bytes (at va 0)
    "board_hosts" / u16,     # the sender holds the load board of this many hosts (0: it does not)
    "board_rkey" / u32,      # ... the whole board, REMOTE_READ
    "board_slot_rkey" / u32,  # ... the receiver's own counters slot, REMOTE_WRITE
    "board_inbound_rkey" / u32,  # ... the announced-work array, REMOTE_ATOMIC
)
CONNECT_SIZE = ConnectLayout.sizeof()


@dataclass(frozen=True, slots=True)
class OpInfo:
    op: AccelOp
    units: int
    est_fixed_ns: int = 0
    est_unit_ps: int = 0


@dataclass(frozen=True, slots=True)
class ConnectMsg:
    type: int
    incarnation: int
    echo: int
    attempt: int
    qpn: int
    psn: int
    credits: int
    mtu: int
    ops: tuple[OpInfo, ...] = ()
    landing_rkey: int = 0
    landing_slots: int = 0
    landing_slot_kib: int = 0
    counters_rkey: int = 0
    counters_len: int = 0
    #: (hosts, read rkey, slot rkey, inbound rkey) of the board the sender holds, or None
    board: tuple[int, int, int, int] | None = None

    def encode(self) -> bytes:
        if len(self.ops) > MAX_OPS:
            raise PeerWireError(f"{len(self.ops)} ops (at most {MAX_OPS})", "num_ops")
        pad = [dict(op=0, units=0, est_fixed_ns=0, est_unit_ps=0)] * (MAX_OPS - len(self.ops))
        try:
            return ConnectLayout.build(dict(
                version=VERSION, type=self.type, num_ops=len(self.ops), incarnation=self.incarnation,
                echo=self.echo, attempt=self.attempt, qpn=self.qpn, psn=self.psn, credits=self.credits,
                mtu=self.mtu,
                landing_rkey=self.landing_rkey, landing_slots=self.landing_slots,
                landing_slot_kib=self.landing_slot_kib,
                counters_rkey=self.counters_rkey, counters_len=self.counters_len,
                board_hosts=self.board[0] if self.board else 0,
                board_rkey=self.board[1] if self.board else 0,
                board_slot_rkey=self.board[2] if self.board else 0,
                board_inbound_rkey=self.board[3] if self.board else 0,
                ops=[dict(op=int(o.op), units=o.units, est_fixed_ns=o.est_fixed_ns,
                          est_unit_ps=o.est_unit_ps) for o in self.ops] + pad))
        except cs.ConstructError as e:
            raise PeerWireError(f"connect message not encodable: {e}") from None

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ConnectMsg:
        if len(data) < CONNECT_SIZE:
            raise PeerWireError(f"connect message of {len(data)} bytes (need {CONNECT_SIZE})", "length")
        try:
            c = ConnectLayout.parse(bytes(data[:CONNECT_SIZE]))
        except cs.ConstructError as e:
            raise PeerWireError(f"connect message: {e}", "magic/reserved") from None
        if c.version != VERSION:
            raise PeerWireError(f"connect message version {c.version} (this daemon: {VERSION})", "version")
        if c.type not in (ConnectType.REQ, ConnectType.REP):
            raise PeerWireError(f"connect message type {c.type}", "type")
        if c.num_ops > MAX_OPS:
            raise PeerWireError(f"num_ops {c.num_ops} (at most {MAX_OPS})", "num_ops")
        if c.qpn < 2 or c.qpn > 0xFFFFFE or c.psn > 0xFFFFFF:
            raise PeerWireError(f"qpn {c.qpn:#x} / psn {c.psn:#x} out of range", "qpn")
        ops = []
        for o in c.ops[:c.num_ops]:
            try:
                ops.append(OpInfo(AccelOp.parse(o.op), o.units, o.est_fixed_ns, o.est_unit_ps))
            except UnknownValueError as e:
                raise PeerWireError(f"connect message op: {e}", "ops") from None
        if c.landing_rkey and not (c.landing_slots and c.landing_slot_kib):
            raise PeerWireError("a landing window of no slots", "landing_slots")
        if not c.credits and c.num_ops:
            raise PeerWireError("accelerators offered with no credits", "credits")
        if bool(c.counters_rkey) != bool(c.counters_len):
            raise PeerWireError(f"counters window R_Key {c.counters_rkey:#x} of {c.counters_len} bytes",
                                "counters_len")
        board = None
        if c.board_hosts:
            if not (c.board_rkey and c.board_slot_rkey and c.board_inbound_rkey):
                raise PeerWireError(f"a board of {c.board_hosts} hosts without its three windows", "board")
            board = (c.board_hosts, c.board_rkey, c.board_slot_rkey, c.board_inbound_rkey)
        elif c.board_rkey or c.board_slot_rkey or c.board_inbound_rkey:
            raise PeerWireError("board windows of a board of no hosts", "board_hosts")
        return cls(c.type, c.incarnation, c.echo, c.attempt, c.qpn, c.psn, c.credits, c.mtu, tuple(ops),
                   c.landing_rkey, c.landing_slots, c.landing_slot_kib, c.counters_rkey, c.counters_len,
                   board)


# --------------------------------------------------------------------------
# Link messages (RC SENDs)
# --------------------------------------------------------------------------
_NO_SCALING = 0x1
_ANNOUNCED = 0x2   # the origin announced the job's work on the load board (its target takes it off)
JobLayout = cs.Struct(
    "type" / cs.Const(LinkType.JOB, u8),
    "op" / u8,               # AccelOp
    "dtype" / u8,            # AccelDtype
    "early_stop" / u8,       # AccelEarlyStop
    "iterations" / u8,
    "priority" / u8,
    "flags" / u8,            # bit 0: no scaling (scaling field unused); bit 1: announced on the board
    "reserved0" / cs.Const(0, u8),
    "tag" / u64,             # the sender's name for the job, echoed by the result
    "size" / u32,
    "batch" / u32,
    "scaling" / cs.Float32l,
    "slot" / u32,            # the landing slot the input was written into; NO_SLOT: ask for a GRANT
    "in_len" / u32,          # bytes of input the origin will WRITE once granted
    "out_rkey" / u32,        # the origin's window on the guest's output buffer (REMOTE_WRITE)
    "out_va" / u64,
    "out_len" / u32,
    "reserved2" / cs.Const(0, u32),
    "klass" / u8,            # the tenant's class at the origin, 0..MAX_CLASS (v4)
    "reserved3" / cs.Const(0, u8), "reserved4" / cs.Const(0, u16),
    "tenant" / cs.Bytes(TENANT_BYTES),  # the tenant's name at the origin, NUL padded (v4)
)
JOB_SIZE = JobLayout.sizeof()
ResultLayout = cs.Struct(
    "type" / cs.Const(LinkType.RESULT, u8),
    "status" / u8,           # AccelStatus
    "iterations" / u8,       # Turbo decode: most iterations a block used
    "reserved0" / cs.Const(0, u8),
    "byte_len" / u32,        # bytes written into the output window
    "tag" / u64,
    "wait_us" / u32,
    "service_us" / u32,
)
RESULT_SIZE = ResultLayout.sizeof()
GrantLayout = cs.Struct(
    "type" / cs.Const(LinkType.GRANT, u8),
    "reserved0" / cs.Const(0, u8), "reserved1" / cs.Const(0, u16),
    "rkey" / u32,            # the server's window for the job's input (REMOTE_WRITE, va 0)
    "tag" / u64,
)
GRANT_SIZE = GrantLayout.sizeof()
GoLayout = cs.Struct(
    "type" / cs.Const(LinkType.GO, u8),
    "reserved0" / cs.Const(0, u8), "reserved1" / cs.Const(0, u16), "reserved2" / cs.Const(0, u32),
    "tag" / u64,
)
GO_SIZE = GoLayout.sizeof()
#: the largest link message (receive buffers are this big)
MAX_MESSAGE = max(JOB_SIZE, RESULT_SIZE, GRANT_SIZE, GO_SIZE)


@dataclass(frozen=True, slots=True)
class JobMsg:
    tag: int
    op: AccelOp
    dtype: AccelDtype
    size: int
    batch: int
    iterations: int
    early_stop: AccelEarlyStop
    scaling: float | None
    priority: int
    in_len: int
    out_va: int
    out_rkey: int
    out_len: int
    slot: int = NO_SLOT
    #: the origin added this job's work to the target's announced work on the load board
    announced: bool = False
    #: the tenant the job runs for, and its class, at the origin (the receiving host
    #: maps them through its own policy for this peer)
    tenant: str = ""
    klass: int = 1

    def encode(self) -> bytes:
        name = self.tenant.encode("ascii")
        if len(name) > TENANT_BYTES:
            raise PeerWireError(f"tenant name {self.tenant!r} longer than {TENANT_BYTES} bytes", "tenant")
        return JobLayout.build(dict(
            op=int(self.op), dtype=int(self.dtype), early_stop=int(self.early_stop),
            iterations=self.iterations, priority=self.priority, klass=self.klass,
            tenant=name.ljust(TENANT_BYTES, b"\0"),
            flags=(_NO_SCALING if self.scaling is None else 0) | (_ANNOUNCED if self.announced else 0),
            tag=self.tag, size=self.size,
            batch=self.batch, scaling=0.0 if self.scaling is None else self.scaling,
            in_len=self.in_len, out_va=self.out_va, out_rkey=self.out_rkey, out_len=self.out_len,
            slot=self.slot))


@dataclass(frozen=True, slots=True)
class GrantMsg:
    tag: int
    rkey: int

    def encode(self) -> bytes:
        return GrantLayout.build(dict(rkey=self.rkey, tag=self.tag))


@dataclass(frozen=True, slots=True)
class GoMsg:
    tag: int

    def encode(self) -> bytes:
        return GoLayout.build(dict(tag=self.tag))


@dataclass(frozen=True, slots=True)
class ResultMsg:
    tag: int
    status: AccelStatus
    byte_len: int = 0
    wait_us: int = 0
    service_us: int = 0
    iterations: int = 0

    def encode(self) -> bytes:
        return ResultLayout.build(dict(
            status=int(self.status), iterations=min(self.iterations, 255), byte_len=self.byte_len,
            tag=self.tag, wait_us=min(self.wait_us, 0xFFFFFFFF),
            service_us=min(self.service_us, 0xFFFFFFFF)))


def decode_link(data: bytes | memoryview) -> JobMsg | GrantMsg | GoMsg | ResultMsg:
    """A link message (syntax only); raises PeerWireError."""
    if not len(data):
        raise PeerWireError("empty link message", "length")
    kind = data[0]
    if kind in (LinkType.GRANT, LinkType.GO):
        layout, size = (GrantLayout, GRANT_SIZE) if kind == LinkType.GRANT else (GoLayout, GO_SIZE)
        if len(data) != size:
            raise PeerWireError(f"link message type {kind} of {len(data)} bytes (need {size})", "length")
        try:
            m = layout.parse(bytes(data))
        except cs.ConstructError as e:
            raise PeerWireError(f"link message type {kind}: {e}", "reserved") from None
        return GrantMsg(m.tag, m.rkey) if kind == LinkType.GRANT else GoMsg(m.tag)
    if kind == LinkType.JOB:
        if len(data) != JOB_SIZE:
            raise PeerWireError(f"job message of {len(data)} bytes (need {JOB_SIZE})", "length")
        try:
            j = JobLayout.parse(bytes(data))
        except cs.ConstructError as e:
            raise PeerWireError(f"job message: {e}", "reserved") from None
        if j.flags & ~(_NO_SCALING | _ANNOUNCED):
            raise PeerWireError(f"job message flags {j.flags:#x}", "flags")
        if not j.flags & _NO_SCALING and not math.isfinite(j.scaling):
            raise PeerWireError(f"job message scaling {j.scaling}", "scaling")
        if j.klass > MAX_CLASS:
            raise PeerWireError(f"job message class {j.klass} (0..{MAX_CLASS})", "klass")
        name = bytes(j.tenant).rstrip(b"\0")
        if not set(name) <= _TENANT_CHARS:
            raise PeerWireError(f"job message tenant {bytes(j.tenant)!r}", "tenant")
        try:
            return JobMsg(j.tag, AccelOp.parse(j.op), AccelDtype.parse(j.dtype), j.size, j.batch,
                          j.iterations, AccelEarlyStop.parse(j.early_stop),
                          None if j.flags & _NO_SCALING else j.scaling, j.priority,
                          j.in_len, j.out_va, j.out_rkey, j.out_len, j.slot, bool(j.flags & _ANNOUNCED),
                          name.decode("ascii"), j.klass)
        except UnknownValueError as e:
            raise PeerWireError(f"job message: {e}", "op/dtype/early_stop") from None
    if kind == LinkType.RESULT:
        if len(data) != RESULT_SIZE:
            raise PeerWireError(f"result message of {len(data)} bytes (need {RESULT_SIZE})", "length")
        try:
            r = ResultLayout.parse(bytes(data))
            status = AccelStatus.parse(r.status)
        except cs.ConstructError as e:
            raise PeerWireError(f"result message: {e}", "reserved") from None
        except UnknownValueError as e:
            raise PeerWireError(f"result message: {e}", "status") from None
        return ResultMsg(r.tag, status, r.byte_len, r.wait_us, r.service_us, r.iterations)
    raise PeerWireError(f"link message type {kind}", "type")
