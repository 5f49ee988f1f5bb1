"""The address message of ibv_rc_pingpong (rdma-core libibverbs/examples).

Each side sends ``sprintf("%04x:%06x:%06x:%s", lid, qpn, psn, wire_gid)``
and writes the whole ``char msg[sizeof "0000:000000:000000:" + 32 digits]``,
i.e. 51 characters and the terminating NUL: 52 bytes. The client then writes
``"done"`` with its NUL (5 bytes).

The GID is 32 hex digits made by ``gid_to_wire_gid``: it reads the 16 GID
bytes as four native 32-bit words and prints ``htobe32`` of each with
``%08x``. On either byte order that is the GID's bytes in memory (network)
order, so the wire GID is simply ``gid.hex()``.

The peer tells the RTR transition whether to address it with a GRH: as
rc_pingpong does, only when the GID's interface id (its last 8 bytes) is not
zero (``is_global``).

Pure codec: no sockets here (see :mod:`.oob`).
"""
from __future__ import annotations

import socket
import string
from dataclasses import dataclass

from verbs import PSN_MASK, QPN_MASK
from vrdma.rc_pingpong.errors import MessageFormatError

MSG_SIZE = len("0000:000000:000000:" + "0" * 32) + 1  # 52: sizeof msg, NUL included
DONE = b"done\0"  # write(sockfd, "done", sizeof "done")
_FIELDS = (("lid", 0, 4), ("qpn", 5, 11), ("psn", 12, 18), ("gid", 19, 51))
_HEX = frozenset(string.hexdigits)


@dataclass(frozen=True)
class Dest:
    """struct pingpong_dest: one side's LID, QPN, starting PSN and GID."""

    lid: int
    qpn: int
    psn: int
    gid: bytes = bytes(16)

    @property
    def is_global(self) -> bool:
        """rc_pingpong addresses the peer with a GRH iff its interface id is set."""
        return any(self.gid[8:])

    @property
    def gid_text(self) -> str:
        """The GID as rc_pingpong prints it: inet_ntop(AF_INET6, gid)."""
        return socket.inet_ntop(socket.AF_INET6, self.gid)


def encode(dest: Dest) -> bytes:
    """The 52-byte message for ``dest``."""
    for name, value, limit in (("lid", dest.lid, 0xFFFF), ("qpn", dest.qpn, QPN_MASK),
                               ("psn", dest.psn, PSN_MASK)):
        if not isinstance(value, int) or not 0 <= value <= limit:
            raise MessageFormatError(name, value)
    if not isinstance(dest.gid, (bytes, bytearray)) or len(dest.gid) != 16:
        raise MessageFormatError("gid", dest.gid)
    text = f"{dest.lid:04x}:{dest.qpn:06x}:{dest.psn:06x}:{bytes(dest.gid).hex()}"
    return text.encode("ascii") + b"\0"


def decode(msg: bytes) -> Dest:
    """Parse a peer's message. Stricter than rc_pingpong's sscanf: every field
    must be exactly as sprintf wrote it (either case of hex digits)."""
    msg = bytes(msg)
    if len(msg) != MSG_SIZE:
        raise MessageFormatError("length", len(msg))
    if msg[-1] != 0:
        raise MessageFormatError("terminator", msg[-1:])
    for pos in (4, 11, 18):
        if msg[pos : pos + 1] != b":":
            raise MessageFormatError(f"separator at byte {pos}", msg[pos : pos + 1])
    values = {}
    for name, start, end in _FIELDS:
        raw = msg[start:end]
        text = raw.decode("ascii", "replace")
        if not _HEX.issuperset(text):
            raise MessageFormatError(name, raw)
        values[name] = int(text, 16)
    return Dest(values["lid"], values["qpn"], values["psn"], bytes.fromhex(msg[19:51].decode("ascii")))
