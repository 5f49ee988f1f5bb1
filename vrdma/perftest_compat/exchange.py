"""perftest's out-of-band exchange over TCP: the messages and their order.

Follows linux-rdma/perftest v4.5-0.17 (Debian 12's ``perftest`` package
4.5+0.17-1, whose programs call themselves version 6.06),
src/perftest_communication.c, without rdma_cm (``-R``/``-z``): the client
connects to the server's TCP port (18515), and every exchange after that is
symmetric and fixed in size: the client writes its message then reads the
server's, the server reads then writes (``ctx_xchg_data``,
``ctx_hand_shake``). perftest reads each message with one ``read()`` of
exactly its size, so a message must leave in one ``send``.

The messages, in the order every test sends them:

1. version (``exchange_versions``): 16 bytes, the version string NUL padded;
   a peer below 5.70 is refused (``check_version_compatibility``).
2. system data (``check_sys_data``, peers from 5.32): the cycle buffer (page
   size) then the cache line size, each a 4-byte big-endian int; each side
   keeps the larger of its own and the peer's.
3. MTU (``check_mtu``, peers from 5.31): 2 bytes, ``"%d"`` of the
   ``enum ibv_mtu`` (``"3\\0"`` for 1024); each side keeps the smaller.
4. hand shakes (``ethernet_write_keys``/``ethernet_read_keys``): the QP's
   address as text, ``KEY_PRINT_FMT_GID``
   ``"%04x:%04x:%06x:%06x:%08x:%016llx:" + 16 x "%02x:" + "%08x:"`` (LID,
   outstanding reads, QPN, PSN, rkey, vaddr, GID bytes, SRQN): 107
   characters and the NUL, 108 bytes; without a GID index
   (``KEY_PRINT_FMT``, 59 bytes), which a RoCE port never uses. The same
   message is sent at every hand shake; after the first they are barriers.
5. bandwidth reports (``xchg_bw_reports``, the write/read bw server learns
   the client's figures): size and iterations as 8-byte big-endian
   (iterations 4 bytes for peers below 5.33), then peak, average and message
   rate as big-endian doubles, each its own exchange.
6. ``"done\\0"`` (``ctx_close_connection``), written after the last hand
   shake and never read.

How many hand shakes, and where, differs per test (each main() of
src/*_lat.c, *_bw.c): :func:`flow` lists the steps of each test and role.

Pure codec: no sockets here (``oob.py`` does the I/O).
"""
from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from vrdma.perftest_compat.errors import ExchangeError

#: the version we claim: Debian 12's perftest (4.5-0.17) says 6.06
VERSION = "6.06"
VERSION_SIZE = 16  # MAX_VERSION
MIN_PEER_VERSION = 5.70  # check_version_compatibility
KEY_MSG_SIZE = 59  # without a GID
KEY_MSG_SIZE_GID = 108
MTU_MSG_SIZE = 2  # sizeof(char[2]) for peers from 5.31
INT_SIZE = 4
DONE = b"done\0"
DEFAULT_PORT = 18515

_HEX = r"([0-9a-fA-F]+)"
_GID_RE = re.compile(":".join([_HEX] * 6 + [_HEX] * 16 + [_HEX]) + ":")
_NOGID_RE = re.compile(":".join([_HEX] * 7))
#: field widths of KEY_PRINT_FMT(_GID): the text never exceeds them
_WIDTHS = (4, 4, 6, 6, 8, 16)
_LIMITS = (0xFFFF, 0xFFFF, 0xFFFFFF, 0xFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
_NAMES = ("lid", "out_reads", "qpn", "psn", "rkey", "vaddr")


@dataclass(frozen=True)
class Dest:
    """One QP's address as perftest's ``struct pingpong_dest`` carries it."""

    lid: int
    out_reads: int
    qpn: int
    psn: int
    rkey: int
    vaddr: int
    gid: bytes | None = None  # None: the message without a GID (no GID index)
    srqn: int = 0

    def __post_init__(self) -> None:
        for name, limit in zip(_NAMES, _LIMITS, strict=True):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= limit:
                raise ExchangeError(f"{name} {v!r} out of range 0..{limit:#x}")
        if not 0 <= self.srqn <= 0xFFFFFFFF:
            raise ExchangeError(f"srqn {self.srqn!r} out of range")
        if self.gid is not None and len(self.gid) != 16:
            raise ExchangeError(f"gid {self.gid!r} must be 16 bytes")

    @property
    def message_size(self) -> int:
        return KEY_MSG_SIZE if self.gid is None else KEY_MSG_SIZE_GID


def encode_dest(d: Dest) -> bytes:
    """The hand-shake message of ``d`` (with its NUL), as sprintf writes it."""
    head = f"{d.lid:04x}:{d.out_reads:04x}:{d.qpn:06x}:{d.psn:06x}:{d.rkey:08x}:{d.vaddr:016x}"
    if d.gid is None:
        text = f"{head}:{d.srqn:08x}"
    else:
        text = head + ":" + "".join(f"{b:02x}:" for b in d.gid) + f"{d.srqn:08x}:"
    out = text.encode() + b"\0"
    assert len(out) == d.message_size
    return out


def message_size(with_gid: bool) -> int:
    return KEY_MSG_SIZE_GID if with_gid else KEY_MSG_SIZE


def decode_dest(msg: bytes, with_gid: bool = True) -> Dest:
    """Parse a hand-shake message; ExchangeError names what is wrong."""
    want = message_size(with_gid)
    if len(msg) != want:
        raise ExchangeError(f"address message of {len(msg)} bytes, expected {want}")
    text_b = msg.split(b"\0", 1)[0]
    try:
        text = text_b.decode("ascii")
    except UnicodeDecodeError as e:
        raise ExchangeError(f"address message is not text: {msg!r}") from e
    m = (_GID_RE if with_gid else _NOGID_RE).fullmatch(text)
    if m is None:
        raise ExchangeError(f"cannot parse address message {text!r}")
    fields = m.groups()
    values = []
    for name, width, limit, f in zip(_NAMES, _WIDTHS, _LIMITS, fields[:6], strict=True):
        v = int(f, 16)
        if len(f) > width or v > limit:
            raise ExchangeError(f"{name} {f!r} wider than {width} hex digits")
        values.append(v)
    if with_gid:
        gid_f = fields[6:22]
        if any(len(f) > 2 for f in gid_f):
            raise ExchangeError(f"GID byte wider than 2 hex digits in {text!r}")
        gid: bytes | None = bytes(int(f, 16) for f in gid_f)
        srqn_f = fields[22]
    else:
        gid, srqn_f = None, fields[6]
    if len(srqn_f) > 8:
        raise ExchangeError(f"srqn {srqn_f!r} wider than 8 hex digits")
    lid, reads, qpn, psn, rkey, vaddr = values
    return Dest(lid, reads, qpn, psn, rkey, vaddr, gid=gid, srqn=int(srqn_f, 16))


def encode_version(version: str = VERSION) -> bytes:
    raw = version.encode("ascii")
    if len(raw) >= VERSION_SIZE:
        raise ExchangeError(f"version {version!r} longer than {VERSION_SIZE - 1} characters")
    return raw.ljust(VERSION_SIZE, b"\0")


def decode_version(msg: bytes) -> str:
    if len(msg) != VERSION_SIZE:
        raise ExchangeError(f"version message of {len(msg)} bytes, expected {VERSION_SIZE}")
    text = msg.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError as e:
        raise ExchangeError(f"version {text!r} is not text") from e


def version_number(version: str) -> float:
    """atof(version): the leading number, 0.0 without one."""
    m = re.match(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)", version)
    return float(m.group(0)) if m else 0.0


def check_peer_version(version: str) -> float:
    v = version_number(version)
    if v < MIN_PEER_VERSION:
        raise ExchangeError(f"peer perftest version {version!r} older than {MIN_PEER_VERSION:.2f}: "
                            "not compatible")
    return v


def encode_int(v: int) -> bytes:
    return struct.pack(">i", v)


def decode_int(msg: bytes) -> int:
    if len(msg) != INT_SIZE:
        raise ExchangeError(f"int message of {len(msg)} bytes, expected {INT_SIZE}")
    return struct.unpack(">i", msg)[0]


#: enum ibv_mtu <-> bytes (MTU_SIZE: 1 << (7 + enum))
MTU_ENUMS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


def mtu_bytes(enum_value: int) -> int:
    try:
        return MTU_ENUMS[enum_value]
    except KeyError:
        raise ExchangeError(f"MTU enum {enum_value!r} not one of {sorted(MTU_ENUMS)}") from None


def mtu_enum(nbytes: int) -> int:
    for k, v in MTU_ENUMS.items():
        if v == nbytes:
            return k
    raise ExchangeError(f"MTU {nbytes!r} not one of {sorted(MTU_ENUMS.values())}")


def encode_mtu(enum_value: int) -> bytes:
    """sprintf("%d") into a char buffer, of which 2 bytes go out."""
    mtu_bytes(enum_value)
    return (str(enum_value).encode() + b"\0")[:MTU_MSG_SIZE]


def decode_mtu(msg: bytes) -> int | None:
    """strtol of the peer's 2 bytes; None when it is no valid MTU enum (perftest
    then keeps its own)."""
    if len(msg) != MTU_MSG_SIZE:
        raise ExchangeError(f"MTU message of {len(msg)} bytes, expected {MTU_MSG_SIZE}")
    m = re.match(rb"\s*([+-]?\d+)", msg.split(b"\0", 1)[0])
    v = int(m.group(1)) if m else 0
    return v if v in MTU_ENUMS else None


@dataclass(frozen=True)
class BwReport:
    """``struct bw_report_data``'s exchanged fields (MB/s or Gb/s as the
    sender's report format says; the receiver prints them as they are)."""

    size: int
    iters: int
    bw_peak: float
    bw_avg: float
    msg_rate: float


def encode_bw_report(rep: BwReport, peer_version: float) -> list[bytes]:
    """The five messages of xchg_bw_reports, in order."""
    if peer_version >= 5.33:
        iters = struct.pack(">Q", rep.iters)
    else:
        iters = struct.pack(">I", rep.iters & 0xFFFFFFFF)
    return [struct.pack(">Q", rep.size), iters, struct.pack(">d", rep.bw_peak),
            struct.pack(">d", rep.bw_avg), struct.pack(">d", rep.msg_rate)]


def bw_report_sizes(peer_version: float) -> list[int]:
    return [8, 8 if peer_version >= 5.33 else 4, 8, 8, 8]


def decode_bw_report(parts: list[bytes], peer_version: float) -> BwReport:
    sizes = bw_report_sizes(peer_version)
    if [len(p) for p in parts] != sizes:
        raise ExchangeError(f"report messages of {[len(p) for p in parts]} bytes, expected {sizes}")
    iters = struct.unpack(">Q" if sizes[1] == 8 else ">I", parts[1])[0]
    return BwReport(struct.unpack(">Q", parts[0])[0], iters, *(struct.unpack(">d", p)[0] for p in parts[2:]))


# --------------------------------------------------------------------------
# the order of the exchanges, per test and role


class Test(enum.Enum):
    SEND_LAT = "send_lat"
    WRITE_LAT = "write_lat"
    READ_LAT = "read_lat"
    SEND_BW = "send_bw"
    WRITE_BW = "write_bw"
    READ_BW = "read_bw"

    @property
    def is_bw(self) -> bool:
        return self.value.endswith("_bw")

    @property
    def verb(self) -> str:
        return self.value.split("_")[0]


class Step(enum.Enum):
    """One step of a test's main(): an exchange or the local work between them."""

    VERSION = "version"      # exchange_versions + check_version_compatibility
    SYS_DATA = "sys_data"    # check_sys_data: cycle buffer, cache line size
    MTU = "mtu"              # check_mtu
    HAND_SHAKE = "hand_shake"
    CONNECT = "connect"      # ctx_connect: RTR and RTS towards the peer (local)
    POST_RECV = "post_recv"  # ctx_set_recv_wqes for the current size (local)
    RUN = "run"              # the measured loop for the current size (local)
    REPORTS = "reports"      # xchg_bw_reports
    DONE = "done"            # ctx_close_connection: a hand shake, then "done\0"


def flow(test: Test, client: bool, sizes: int, run_all: bool) -> list[tuple[Step, int]]:
    """The steps of ``test`` for one role, as (step, size index): ``sizes``
    is how many message sizes run (``-a``: all of them, ``run_all``)."""
    pre = [(Step.VERSION, 0), (Step.SYS_DATA, 0), (Step.MTU, 0)]
    H = (Step.HAND_SHAKE, 0)
    steps: list[tuple[Step, int]]
    if test in (Test.SEND_LAT, Test.SEND_BW):
        # keys, connect, a barrier, the remote's print, then per size
        steps = [*pre, H, (Step.CONNECT, 0), H, H]
        for i in range(sizes):
            if test is Test.SEND_LAT or not client:
                steps.append((Step.POST_RECV, i))
            steps += [(Step.HAND_SHAKE, i), (Step.RUN, i)]
            if test is Test.SEND_BW and run_all:
                steps.append((Step.HAND_SHAKE, i))
        steps.append((Step.DONE, 0))
    elif test in (Test.WRITE_LAT, Test.READ_LAT):
        steps = [*pre, H, H, (Step.CONNECT, 0), H, H]
        if test is Test.WRITE_LAT:
            steps += [(Step.RUN, i) for i in range(sizes)]  # and no closing exchange
        else:
            if client:
                steps += [(Step.RUN, i) for i in range(sizes)]
            steps.append((Step.DONE, 0))
    else:  # write_bw, read_bw: the server waits for the client's report
        steps = [*pre, H, (Step.CONNECT, 0), H, H]
        if client:
            steps += [(Step.RUN, i) for i in range(sizes)]
        steps += [H, (Step.REPORTS, 0), (Step.DONE, 0)]
    return steps
