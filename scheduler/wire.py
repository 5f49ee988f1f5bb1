"""Wire formats of the load table (issue 15, "Dissemination"; docs/scheduler.md).

Pure codecs, no I/O. Two formats carry a :class:`~scheduler.table.LoadRow`:

* the **load datagram** (:func:`encode_load` / :func:`decode_load`): what a
  host advertises every period, as a UDP datagram on the fabric network or
  as a Redis value; authenticated with HMAC-SHA256 under the load key
  (:func:`derive_load_key`: ``HMAC-SHA256(cluster key, "vrdma load table
  v1")``, never the fabric's key)::

      header   magic "VRLT" u32 | version u8 | kinds u8 | reserved u16
               seq u64 | address 16 bytes | period f32 | reserved u32      40 bytes
      kinds    op u8 | reserved u8 | units u16 | busy u16 | reserved u16
               service_time f64 | queued f64                               24 bytes each
      tag      HMAC-SHA256(load key, header || kinds)                      32 bytes

* the **counters region** (:func:`encode_counters` / :func:`decode_counters`,
  :func:`store_counters`): :data:`COUNTERS_SIZE` bytes a host publishes in a
  registered memory region for its peers' one-sided RDMA READs (no tag: the
  RC link carries it). A seqlock: the same sequence number at the head and
  the tail; a READ that raced an update sees them differ and raises
  :class:`TornRead`::

      seq u64 | magic "VRLC" u32 | version u8 | kinds u8 | reserved u16
      4 kind slots of 24 bytes (as above; unused ones all zero) | seq u64

All integers little endian, each layout a ``construct`` definition (the
normative one); the codecs run on ``struct`` twins derived from those layouts
(a probe decodes a region per READ: 6 us instead of construct's 80; the
tests check that both agree on any bytes). A kind on
the wire is an :class:`~virtio_rdma.constants.AccelOp` id; in a row it is
the op's lower-case name (:func:`kind_name`, :func:`kind_id`: the one
mapping). The address is the sender's fabric address, an IPv4 address as
IPv4-mapped IPv6 (``::ffff:a.b.c.d``); decoders return it as text
(:func:`address_text`).

Sequence numbers: a host starts at its CLOCK_REALTIME in nanoseconds and
adds one per row, so a restarted host's rows are newer than its old ones and
an old row replayed is older than the receiver's newest (the replay rule is
the receiver's: :mod:`scheduler.gossip`).

Decoding checks length, magic, version and the tag first (nothing of an
unauthenticated datagram is believed), then every value: a kind that is no
AccelOp, a kind twice, units of 0 or above :data:`MAX_UNITS`, busy above
units, a service time or queued work that is negative, NaN, infinite or
beyond its bound, an absurd period. Each failure is a :class:`WireError`
subclass naming the bad value, with a ``reason`` (the name its receivers
count it under).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import construct as cs

from scheduler.errors import BadRow, SchedulerError
from scheduler.table import LoadRow
from virtio_rdma.constants import AccelOp

u8, u16, u32, u64 = cs.Int8ul, cs.Int16ul, cs.Int32ul, cs.Int64ul
f32, f64 = cs.Float32l, cs.Float64l

#: "VRLT": vrdma load table (datagram)
LOAD_MAGIC = 0x544C5256
#: "VRLC": vrdma load counters (one-sided region)
COUNTERS_MAGIC = 0x434C5256
VERSION = 1
#: what the load key is derived with from the cluster key
LOAD_KEY_LABEL = b"vrdma load table v1"
TAG_LEN = 32
#: kinds a row can carry: one per AccelOp
MAX_KINDS = len(AccelOp)
#: accelerator units of one kind on one host
MAX_UNITS = 1024
#: seconds of one job on one unit (bounds against an absurd but finite estimate)
MIN_SERVICE_TIME = 1e-9
MAX_SERVICE_TIME = 3600.0
#: seconds of work queued on one kind
MAX_QUEUED = 1e7
#: the advertisement period a sender may declare, seconds
MIN_PERIOD = 1e-3
MAX_PERIOD = 3600.0


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
class WireError(SchedulerError, ValueError):
    """A load datagram or counters region is unusable; ``reason`` is the counter
    its receivers count it under, the message names the bad value."""

    reason = "malformed"


class Truncated(WireError):
    """Shorter than its header says."""

    reason = "truncated"


class Forged(WireError):
    """The tag does not verify under the load key (forged, corrupted, or another cluster's)."""

    reason = "forged"


class UnknownKind(WireError):
    """A kind id that is no :class:`~virtio_rdma.constants.AccelOp` (``value``), or a
    kind name that is none (encoding)."""

    reason = "unknown_kind"

    def __init__(self, value: int | str) -> None:
        super().__init__(f"unknown accelerator kind {value!r} "
                         f"(known: {', '.join(f'{op.value}={kind_name(op)}' for op in AccelOp)})")
        self.value = value


class Absurd(WireError, BadRow):
    """An authentic value no host can mean: negative, NaN, infinite, out of bounds."""

    reason = "absurd"


class TornRead(WireError):
    """A counters region read while it was being updated (head and tail sequence differ)."""

    reason = "torn"

    def __init__(self, head: int, tail: int) -> None:
        super().__init__(f"torn counters read: head seq {head} != tail seq {tail}")
        self.head = head
        self.tail = tail


# --------------------------------------------------------------------------
# Kinds and addresses
# --------------------------------------------------------------------------
def kind_name(op: int) -> str:
    """The row's kind string of AccelOp id ``op`` ("fft", ...); :class:`UnknownKind` if none."""
    try:
        return AccelOp(op).name.lower()
    except ValueError:
        raise UnknownKind(op) from None


_KIND_IDS = {kind_name(op): int(op) for op in AccelOp}


def kind_id(kind: str) -> int:
    """The AccelOp id of a row's kind string; :class:`UnknownKind` if none."""
    try:
        return _KIND_IDS[kind]
    except KeyError:
        raise UnknownKind(kind) from None


def address_bytes(address: str) -> bytes:
    """16 bytes of an IPv4 (as IPv4-mapped IPv6) or IPv6 address; :class:`WireError` if none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise WireError(f"{address!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def address_text(raw: bytes) -> str:
    """The text of a 16-byte wire address (IPv4-mapped ones as dotted IPv4)."""
    ip = ipaddress.IPv6Address(bytes(raw))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def canonical_address(address: str) -> str:
    """``address`` as :func:`address_text` spells it (the key every table of addresses uses)."""
    return address_text(address_bytes(address))


def derive_load_key(cluster_key: bytes) -> bytes:
    """The load-table MAC key of a cluster key's bytes (never the fabric's key)."""
    if len(cluster_key) < 16:
        raise WireError(f"cluster key of {len(cluster_key)} bytes is too short (16 at least)")
    return hmac.new(bytes(cluster_key), LOAD_KEY_LABEL, hashlib.sha256).digest()


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------
KindLayout = cs.Struct(
    "op" / u8,
    "reserved0" / u8,
    "units" / u16,
    "busy" / u16,
    "reserved1" / u16,
    "service_time" / f64,
    "queued" / f64,
)
KIND_SIZE = KindLayout.sizeof()
LoadHeader = cs.Struct(
    "magic" / u32,
    "version" / u8,
    "kinds" / u8,
    "reserved0" / u16,
    "seq" / u64,
    "address" / cs.Bytes(16),
    "period" / f32,
    "reserved1" / u32,
)
LOAD_HEADER_SIZE = LoadHeader.sizeof()
#: the smallest and largest load datagrams
MIN_LOAD_SIZE = LOAD_HEADER_SIZE + TAG_LEN
MAX_LOAD_SIZE = LOAD_HEADER_SIZE + MAX_KINDS * KIND_SIZE + TAG_LEN

CountersLayout = cs.Struct(
    "head" / u64,
    "magic" / u32,
    "version" / u8,
    "kinds" / u8,
    "reserved0" / u16,
    "slots" / cs.Array(MAX_KINDS, KindLayout),
    "tail" / u64,
)
#: bytes of one host's counters region
COUNTERS_SIZE = CountersLayout.sizeof()
#: where the tail sequence number sits (written first by :func:`store_counters`)
COUNTERS_TAIL = COUNTERS_SIZE - 8


def _struct_chars(c: cs.Construct) -> str:
    """The ``struct`` format of a fixed-size construct layout (the twin's one source)."""
    if isinstance(c, cs.Struct):
        return "".join(_struct_chars(sc.subcon) for sc in c.subcons)
    if isinstance(c, cs.Array) and isinstance(c.count, int):
        return _struct_chars(c.subcon) * c.count
    if isinstance(c, cs.FormatField):
        return c.fmtstr[1:]
    if isinstance(c, cs.Bytes) and isinstance(c.length, int):
        return f"{c.length}s"
    raise TypeError(f"{c!r} is not fixed-size")


# The hot path's ``struct`` twins of the layouts above (derived from them; the codec
# tests check that both agree on any bytes): a probe decodes a counters region per READ.
_KIND = struct.Struct("<" + _struct_chars(KindLayout))
_LOAD_HEADER = struct.Struct("<" + _struct_chars(LoadHeader))
_COUNTERS = struct.Struct("<" + _struct_chars(CountersLayout))
assert (_KIND.size, _LOAD_HEADER.size, _COUNTERS.size) == (KIND_SIZE, LOAD_HEADER_SIZE, COUNTERS_SIZE)
_EMPTY_SLOT = (0, 0, 0, 0, 0, 0.0, 0.0)
_SLOT_FIELDS = len(_EMPTY_SLOT)


def load_size(kinds: int) -> int:
    """Bytes of a load datagram carrying ``kinds`` kinds."""
    return LOAD_HEADER_SIZE + kinds * KIND_SIZE + TAG_LEN


# --------------------------------------------------------------------------
# Kind entries <-> rows
# --------------------------------------------------------------------------
#: one kind entry as the struct twin packs it: op, reserved, units, busy, reserved, service time, queued
_Entry = tuple[int, int, int, int, int, float, float]


def _kind_entries(row: LoadRow) -> list[_Entry]:
    """The kind entries of ``row``, by op id; raises on what the wire cannot carry."""
    if len(row.units) > MAX_KINDS:
        raise Absurd(f"host {row.host}: {len(row.units)} kinds, at most {MAX_KINDS}")
    out = []
    for kind in sorted(row.units, key=kind_id):
        units, busy = row.units[kind], row.busy.get(kind, 0)
        st, q = row.service_time[kind], row.queued.get(kind, 0.0)
        _check_kind(kind, units, busy, st, q)
        out.append((kind_id(kind), 0, units, busy, 0, st, q))
    return out


def _check_kind(kind: str, units: int, busy: int, st: float, q: float) -> None:
    if not (isinstance(units, int) and 1 <= units <= MAX_UNITS):
        raise Absurd(f"{kind}: units = {units!r}, not 1..{MAX_UNITS}")
    if not (isinstance(busy, int) and 0 <= busy <= units):
        raise Absurd(f"{kind}: busy = {busy!r}, not 0..units ({units})")
    if not (math.isfinite(st) and MIN_SERVICE_TIME <= st <= MAX_SERVICE_TIME):
        raise Absurd(f"{kind}: service_time = {st!r} s, not {MIN_SERVICE_TIME}..{MAX_SERVICE_TIME}")
    if not (math.isfinite(q) and 0.0 <= q <= MAX_QUEUED):
        raise Absurd(f"{kind}: queued = {q!r} s, not 0..{MAX_QUEUED}")


_KIND_NAMES = {int(op): kind_name(op) for op in AccelOp}


def _row(entries: Iterable[_Entry], seq: int, host: int, now: float) -> LoadRow:
    """The row of decoded kind entries (checked: every failure a :class:`WireError`)."""
    units: dict[str, int] = {}
    busy: dict[str, int] = {}
    st: dict[str, float] = {}
    queued: dict[str, float] = {}
    for op, r0, u, b, r1, s, q in entries:
        kind = _KIND_NAMES.get(op)
        if kind is None:
            raise UnknownKind(op)
        if kind in units:
            raise Absurd(f"kind {kind} (op {op}) twice")
        if r0 or r1:
            raise WireError(f"kind {kind}: reserved bytes {r0:#x}, {r1:#x} not zero")
        _check_kind(kind, u, b, s, q)
        units[kind], busy[kind], st[kind], queued[kind] = u, b, s, q
    try:
        return LoadRow(host, units, st, queued, busy, seq=seq, updated=now)
    except BadRow as err:   # not reached with the checks above; kept so nothing else escapes
        raise Absurd(str(err)) from None


# --------------------------------------------------------------------------
# Load datagram
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadAd:
    """A decoded, authentic load datagram: the row without its host id (the receiver's)."""

    address: str
    seq: int
    period: float
    units: Mapping[str, int]
    service_time: Mapping[str, float]
    queued: Mapping[str, float]
    busy: Mapping[str, int]

    def row(self, host: int, now: float) -> LoadRow:
        """The row as the receiver's table holds it: ``host`` its id of the sender, ``updated`` ``now``."""
        return LoadRow(host, self.units, self.service_time, self.queued, self.busy,
                       seq=self.seq, updated=now)


def encode_load(row: LoadRow, address: str, period: float, key: bytes) -> bytes:
    """The load datagram of ``row`` (its ``seq``; not its host or ``updated``), sent by
    ``address`` running ``period``, tagged with the load ``key``."""
    if not (math.isfinite(period) and MIN_PERIOD <= period <= MAX_PERIOD):
        raise Absurd(f"period = {period!r} s, not {MIN_PERIOD}..{MAX_PERIOD}")
    if not 0 <= row.seq < 1 << 64:
        raise Absurd(f"seq = {row.seq!r}, not a u64")
    entries = _kind_entries(row)
    body = _LOAD_HEADER.pack(LOAD_MAGIC, VERSION, len(entries), 0, row.seq, address_bytes(address),
                             period, 0)
    body += b"".join(_KIND.pack(*e) for e in entries)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode_load(data: bytes | bytearray | memoryview, key: bytes) -> LoadAd:
    """The authentic load datagram ``data`` (checked as the module docstring says)."""
    data = bytes(data)
    n = len(data)
    if n < MIN_LOAD_SIZE:
        raise Truncated(f"load datagram of {n} bytes, at least {MIN_LOAD_SIZE}")
    magic, version, kinds, r0, seq, raw_addr, period, r1 = _LOAD_HEADER.unpack_from(data)
    if magic != LOAD_MAGIC:
        raise WireError(f"load datagram magic {magic:#010x}, not {LOAD_MAGIC:#010x}")
    if version != VERSION:
        raise WireError(f"load datagram version {version}, not {VERSION}")
    if kinds > MAX_KINDS:
        raise WireError(f"load datagram of {kinds} kinds, at most {MAX_KINDS}")
    want = load_size(kinds)
    if n < want:
        raise Truncated(f"load datagram of {n} bytes, {kinds} kinds need {want}")
    if n > want:
        raise WireError(f"load datagram of {n} bytes, {kinds} kinds need {want}")
    body, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        raise Forged(f"load datagram tag does not verify (seq {seq}, address {address_text(raw_addr)})")
    if r0 or r1:
        raise WireError(f"load datagram reserved fields {r0:#x}, {r1:#x} not zero")
    if not (math.isfinite(period) and MIN_PERIOD <= period <= MAX_PERIOD):
        raise Absurd(f"period = {period!r} s, not {MIN_PERIOD}..{MAX_PERIOD}")
    row = _row(_KIND.iter_unpack(body[LOAD_HEADER_SIZE:]), seq, -1, 0.0)
    return LoadAd(address_text(raw_addr), seq, period, row.units, row.service_time, row.queued, row.busy)


# --------------------------------------------------------------------------
# Counters region (one-sided READ)
# --------------------------------------------------------------------------
def encode_counters(row: LoadRow) -> bytes:
    """The :data:`COUNTERS_SIZE`-byte counters region of ``row`` (head = tail = ``row.seq``)."""
    if not 0 <= row.seq < 1 << 64:
        raise Absurd(f"seq = {row.seq!r}, not a u64")
    entries = _kind_entries(row)
    slots = [v for e in entries for v in e] + list(_EMPTY_SLOT) * (MAX_KINDS - len(entries))
    return _COUNTERS.pack(row.seq, COUNTERS_MAGIC, VERSION, len(entries), 0, *slots, row.seq)


def store_counters(region: memoryview | bytearray, row: LoadRow) -> None:
    """Write ``row``'s counters into ``region`` (at least :data:`COUNTERS_SIZE` bytes) in
    seqlock order: the tail sequence first, then the body, the head last. A reader that
    reads in ascending address order (as one RDMA READ does) and finds head == tail
    read one whole version."""
    data = encode_counters(row)
    mv = memoryview(region)
    if len(mv) < COUNTERS_SIZE:
        raise WireError(f"counters region of {len(mv)} bytes, needs {COUNTERS_SIZE}")
    mv[COUNTERS_TAIL:COUNTERS_SIZE] = data[COUNTERS_TAIL:]
    mv[8:COUNTERS_TAIL] = data[8:COUNTERS_TAIL]
    mv[0:8] = data[0:8]


def decode_counters(buf: bytes | bytearray | memoryview, host: int, now: float) -> LoadRow:
    """The row in a counters region read from ``host`` at ``now``; :class:`TornRead` if the
    read raced an update, another :class:`WireError` if the region is not a valid one."""
    if len(buf) < COUNTERS_SIZE:
        raise Truncated(f"counters region of {len(buf)} bytes, needs {COUNTERS_SIZE}")
    v = _COUNTERS.unpack_from(buf)
    head, magic, version, kinds, r0, tail = v[0], v[1], v[2], v[3], v[4], v[-1]
    if head != tail:
        raise TornRead(head, tail)
    if magic != COUNTERS_MAGIC:
        raise WireError(f"counters magic {magic:#010x}, not {COUNTERS_MAGIC:#010x}")
    if version != VERSION:
        raise WireError(f"counters version {version}, not {VERSION}")
    if kinds > MAX_KINDS:
        raise WireError(f"counters region of {kinds} kinds, at most {MAX_KINDS}")
    if r0:
        raise WireError(f"counters reserved field {r0:#x} not zero")
    slots = [v[5 + i * _SLOT_FIELDS: 5 + (i + 1) * _SLOT_FIELDS] for i in range(MAX_KINDS)]
    for i in range(kinds, MAX_KINDS):
        if any(slots[i]):
            raise WireError(f"counters slot {i} is beyond the {kinds} kinds but not empty")
    return _row(slots[:kinds], head, host, now)
