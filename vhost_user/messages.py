"""vhost-user wire format: message header, request ids and payload codecs.

Implements the "Message Specification" section of QEMU's
docs/interop/vhost-user.rst. A message is a 12-byte header (request u32,
flags u32, size u32) followed by ``size`` bytes of payload; numbers are in
the machine's native byte order (little-endian on every host we run on).
File descriptors travel beside the message as SCM_RIGHTS ancillary data;
this module never touches them: it is a pure codec with syntax validation.

Every request id is an :class:`FrontendReq` (front-end to back-end) or
:class:`BackendReq` (the back-end's own channel) carrying the spec's number.
Decoding an unknown id or a malformed payload raises :class:`MessageError`
naming the bad value, never ``KeyError`` or a construct exception.
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field

import construct as cs

from vhost_user.errors import MessageError

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("vhost_user assumes a little-endian host (the protocol is native-endian)")

HEADER_SIZE = 12
#: Largest payload we accept. The spec sets no limit; the largest message we
#: handle (GET_CONFIG with 256 bytes of config) is 268 bytes. rust-vmm uses 4 KiB.
MAX_PAYLOAD = 4096
#: Regions carried by SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MEMORY_BASELINE_NREGIONS = 8
#: Largest config space GET_CONFIG/SET_CONFIG may carry (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Most fds one message may carry (SET_MEM_TABLE's 8).
MAX_FDS = MEMORY_BASELINE_NREGIONS

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Virtio feature bit 30, reused by vhost-user to gate protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: VHOST_F_LOG_ALL (bit 26): dirty logging for live migration.
VHOST_F_LOG_ALL = 1 << 26

#: In the u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 are the ring index, bit 8
#: says that no file descriptor is passed (polling mode for KICK).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class FrontendReq(enum.IntEnum):
    """Front-end message types (spec: "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Back-end message types (sent on the back-end's request channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* bits (spec: "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


def request_name(request: int, *, backend_channel: bool = False) -> str:
    enum_cls = BackendReq if backend_channel else FrontendReq
    try:
        return enum_cls(request).name
    except ValueError:
        return f"unknown request {request}"


def parse_request(value: int) -> FrontendReq:
    try:
        return FrontendReq(value)
    except ValueError:
        raise MessageError(f"unknown vhost-user request {value}") from None


# --------------------------------------------------------------------------
# construct layouts (native = little-endian here)

Header = cs.Struct("request" / cs.Int32un, "flags" / cs.Int32un, "size" / cs.Int32un)
U64 = cs.Struct("value" / cs.Int64un)
VringStateStruct = cs.Struct("index" / cs.Int32un, "num" / cs.Int32un)
VringAddrStruct = cs.Struct(
    "index" / cs.Int32un,
    "flags" / cs.Int32un,
    "desc" / cs.Int64un,
    "used" / cs.Int64un,
    "avail" / cs.Int64un,
    "log" / cs.Int64un,
)
MemRegionStruct = cs.Struct(
    "gpa" / cs.Int64un, "size" / cs.Int64un, "uva" / cs.Int64un, "mmap_offset" / cs.Int64un
)
MemTableStruct = cs.Struct(
    "nregions" / cs.Int32un,
    "padding" / cs.Int32un,
    "regions" / cs.Array(cs.this.nregions, MemRegionStruct),
)
SingleMemRegionStruct = cs.Struct("padding" / cs.Int64un, "region" / MemRegionStruct)
ConfigStruct = cs.Struct(
    "offset" / cs.Int32un,
    "size" / cs.Int32un,
    "flags" / cs.Int32un,
    "payload" / cs.Bytes(cs.this.size),
)

VRING_ADDR_SIZE = VringAddrStruct.sizeof()
MEM_REGION_SIZE = MemRegionStruct.sizeof()
CONFIG_HEADER_SIZE = 12
VRING_F_LOG = 1


# --------------------------------------------------------------------------
# typed payloads


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def encode(self) -> bytes:
        return VringStateStruct.build(dict(index=self.index, num=self.num))

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        _expect_size("vring state", payload, 8)
        c = VringStateStruct.parse(payload)
        return cls(c.index, c.num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def encode(self) -> bytes:
        return VringAddrStruct.build(
            dict(index=self.index, flags=self.flags, desc=self.desc, used=self.used, avail=self.avail,
                 log=self.log)
        )

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        _expect_size("vring address", payload, VRING_ADDR_SIZE)
        c = VringAddrStruct.parse(payload)
        if c.flags & ~VRING_F_LOG:
            raise MessageError(f"vring address: unknown flags {c.flags:#x}")
        return cls(c.index, c.flags, c.desc, c.used, c.avail, c.log)


@dataclass(frozen=True)
class MemRegionDesc:
    """One region of guest memory as the front-end describes it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    def validate(self) -> None:
        if self.size == 0:
            raise MessageError(f"memory region at gpa {self.gpa:#x} has size 0")
        for name, base in (("guest address", self.gpa), ("user address", self.uva),
                           ("mmap offset", self.mmap_offset)):
            if base + self.size > 1 << 64:
                raise MessageError(
                    f"memory region {name} {base:#x} + size {self.size:#x} overflows 64 bits"
                )

    def as_dict(self) -> dict:
        return dict(gpa=self.gpa, size=self.size, uva=self.uva, mmap_offset=self.mmap_offset)


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemRegionDesc, ...]

    def encode(self) -> bytes:
        if len(self.regions) > MEMORY_BASELINE_NREGIONS:
            raise MessageError(
                f"memory table has {len(self.regions)} regions, at most {MEMORY_BASELINE_NREGIONS}")
        body = MemTableStruct.build(
            dict(nregions=len(self.regions), padding=0, regions=[r.as_dict() for r in self.regions])
        )
        # QEMU always sends the full 8-region array; we send the used part
        # plus padding to the same fixed size, which both readings accept.
        return body.ljust(8 + MEMORY_BASELINE_NREGIONS * MEM_REGION_SIZE, b"\0")

    @classmethod
    def decode(cls, payload: bytes) -> MemTable:
        if len(payload) < 8:
            raise MessageError(
                f"memory table payload of {len(payload)} bytes is shorter than its 8-byte header")
        nregions = int.from_bytes(payload[:4], "little")
        if nregions == 0 or nregions > MEMORY_BASELINE_NREGIONS:
            raise MessageError(
                f"memory table region count {nregions} is not in 1..{MEMORY_BASELINE_NREGIONS}")
        need = 8 + nregions * MEM_REGION_SIZE
        if len(payload) < need or len(payload) > 8 + MEMORY_BASELINE_NREGIONS * MEM_REGION_SIZE:
            raise MessageError(
                f"memory table payload of {len(payload)} bytes does not fit {nregions} regions")
        c = MemTableStruct.parse(payload[:need])
        regions = tuple(MemRegionDesc(r.gpa, r.size, r.uva, r.mmap_offset) for r in c.regions)
        for r in regions:
            r.validate()
        return cls(regions)


@dataclass(frozen=True)
class SingleMemRegion:
    region: MemRegionDesc

    def encode(self) -> bytes:
        return SingleMemRegionStruct.build(dict(padding=0, region=self.region.as_dict()))

    @classmethod
    def decode(cls, payload: bytes) -> SingleMemRegion:
        _expect_size("single memory region", payload, 8 + MEM_REGION_SIZE)
        c = SingleMemRegionStruct.parse(payload).region
        region = MemRegionDesc(c.gpa, c.size, c.uva, c.mmap_offset)
        region.validate()
        return cls(region)


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        data = bytes(self.payload).ljust(self.size, b"\0")[: self.size]
        return ConfigStruct.build(dict(offset=self.offset, size=self.size, flags=self.flags, payload=data))

    @classmethod
    def decode(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < CONFIG_HEADER_SIZE:
            raise MessageError(f"config payload of {len(payload)} bytes is shorter than its 12-byte header")
        offset, size, flags = (int.from_bytes(payload[i : i + 4], "little") for i in (0, 4, 8))
        if size > MAX_CONFIG_SIZE:
            raise MessageError(f"config access size {size} exceeds {MAX_CONFIG_SIZE}")
        if offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
            raise MessageError(f"config access offset {offset} + size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(payload) != CONFIG_HEADER_SIZE + size:
            raise MessageError(f"config payload of {len(payload)} bytes does not match size field {size}")
        if flags > 1:
            raise MessageError(f"config flags {flags:#x} unknown")
        return cls(offset, size, flags, bytes(payload[CONFIG_HEADER_SIZE:]))


def encode_u64(value: int) -> bytes:
    return U64.build(dict(value=value))


def decode_u64(payload: bytes, what: str = "u64") -> int:
    _expect_size(what, payload, 8)
    return int.from_bytes(payload, "little")


def _expect_size(what: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise MessageError(f"{what} payload is {len(payload)} bytes, expected {size}")


# --------------------------------------------------------------------------
# whole messages


@dataclass
class Message:
    """One vhost-user message: request id, flags, payload bytes and the fds
    that came with it. Whoever holds a received Message owns its fds."""

    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def encode_header(self) -> bytes:
        return Header.build(dict(request=int(self.request), flags=self.flags, size=len(self.payload)))

    def encode(self) -> bytes:
        return self.encode_header() + bytes(self.payload)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """Parse and syntax-check a 12-byte header; return (request, flags, size)."""
    if len(data) != HEADER_SIZE:
        raise MessageError(f"vhost-user header is {len(data)} bytes, expected {HEADER_SIZE}")
    h = Header.parse(data)
    if h.flags & FLAG_VERSION_MASK != VERSION:
        raise MessageError(
            f"vhost-user message version {h.flags & FLAG_VERSION_MASK} unsupported (flags {h.flags:#x})")
    if h.flags & ~FLAGS_KNOWN:
        raise MessageError(f"vhost-user message has unknown flags {h.flags:#x}")
    if h.size > MAX_PAYLOAD:
        raise MessageError(f"vhost-user payload size {h.size} exceeds the {MAX_PAYLOAD}-byte limit")
    return h.request, h.flags, h.size


def reply_to(request: int, payload: bytes = b"") -> Message:
    return Message(request=request, flags=VERSION | FLAG_REPLY, payload=payload)


# --------------------------------------------------------------------------
# Per-request rules: payload size and fd count, checked in one place by the
# dispatcher before any handler runs (the syntax; semantics live in handlers).


@dataclass(frozen=True)
class RequestRule:
    payload: str  # "none", "u64", "state", "addr", "memtable", "region", "config", "any"
    fds: tuple[int, int] = (0, 0)  # inclusive min/max fd count
    replies: bool = False  # the back-end always sends a reply (not counting REPLY_ACK)
    # protocol feature that must be negotiated (an IntFlag value is immutable: a safe default)
    needs: ProtocolFeature = ProtocolFeature(0)  # noqa: RUF009


PAYLOAD_SIZES = {"none": (0, 0), "u64": (8, 8), "state": (8, 8), "addr": (VRING_ADDR_SIZE, VRING_ADDR_SIZE),
                 "region": (8 + MEM_REGION_SIZE, 8 + MEM_REGION_SIZE),
                 "memtable": (8 + MEM_REGION_SIZE, 8 + MEMORY_BASELINE_NREGIONS * MEM_REGION_SIZE),
                 "config": (CONFIG_HEADER_SIZE, CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE),
                 "any": (0, MAX_PAYLOAD)}

PF = ProtocolFeature
RULES: dict[FrontendReq, RequestRule] = {
    FrontendReq.GET_FEATURES: RequestRule("none", replies=True),
    FrontendReq.SET_FEATURES: RequestRule("u64"),
    FrontendReq.SET_OWNER: RequestRule("none"),
    FrontendReq.RESET_OWNER: RequestRule("none"),
    FrontendReq.SET_MEM_TABLE: RequestRule("memtable", fds=(1, MEMORY_BASELINE_NREGIONS)),
    FrontendReq.SET_VRING_NUM: RequestRule("state"),
    FrontendReq.SET_VRING_ADDR: RequestRule("addr"),
    FrontendReq.SET_VRING_BASE: RequestRule("state"),
    FrontendReq.GET_VRING_BASE: RequestRule("state", replies=True),
    FrontendReq.SET_VRING_KICK: RequestRule("u64", fds=(0, 1)),
    FrontendReq.SET_VRING_CALL: RequestRule("u64", fds=(0, 1)),
    FrontendReq.SET_VRING_ERR: RequestRule("u64", fds=(0, 1)),
    FrontendReq.GET_PROTOCOL_FEATURES: RequestRule("none", replies=True),
    FrontendReq.SET_PROTOCOL_FEATURES: RequestRule("u64"),
    FrontendReq.GET_QUEUE_NUM: RequestRule("none", replies=True, needs=PF.MQ),
    FrontendReq.SET_VRING_ENABLE: RequestRule("state"),
    FrontendReq.GET_CONFIG: RequestRule("config", replies=True, needs=PF.CONFIG),
    FrontendReq.SET_CONFIG: RequestRule("config", needs=PF.CONFIG),
    FrontendReq.RESET_DEVICE: RequestRule("none", needs=PF.RESET_DEVICE),
    FrontendReq.GET_MAX_MEM_SLOTS: RequestRule("none", replies=True, needs=PF.CONFIGURE_MEM_SLOTS),
    FrontendReq.ADD_MEM_REG: RequestRule("region", fds=(1, 1), needs=PF.CONFIGURE_MEM_SLOTS),
    # QEMU before 6.0 passed an fd with REM_MEM_REG; accept and close it.
    FrontendReq.REM_MEM_REG: RequestRule("region", fds=(0, 1), needs=PF.CONFIGURE_MEM_SLOTS),
    FrontendReq.SET_STATUS: RequestRule("u64", needs=PF.STATUS),
    FrontendReq.GET_STATUS: RequestRule("none", replies=True, needs=PF.STATUS),
}


def check_syntax(request: FrontendReq, payload_len: int, nfds: int) -> RequestRule:
    """Size and fd-count checks for a request we implement; raises MessageError."""
    rule = RULES.get(request)
    if rule is None:
        raise MessageError(
            f"vhost-user request {request.name} ({int(request)}) is not supported by this back-end")
    lo, hi = PAYLOAD_SIZES[rule.payload]
    if not lo <= payload_len <= hi:
        want = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise MessageError(f"{request.name}: payload of {payload_len} bytes, expected {want}")
    if not rule.fds[0] <= nfds <= rule.fds[1]:
        want = f"{rule.fds[0]}" if rule.fds[0] == rule.fds[1] else f"{rule.fds[0]}..{rule.fds[1]}"
        raise MessageError(f"{request.name}: {nfds} file descriptors, expected {want}")
    return rule
