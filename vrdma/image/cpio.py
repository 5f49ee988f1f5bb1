"""Pure writer for the cpio "newc" (SVR4, magic 070701) format used by Linux initramfs
(the same format as qemu_tests.cpio, which the harness keeps for its own guests).

Spec: Documentation/driver-api/early-userspace/buffer-format.rst.  Each entry is a
110-byte ASCII header (magic + 13 eight-digit hex fields: ino, mode, uid, gid, nlink,
mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the
NUL-terminated name padded to a 4-byte boundary, then the data padded to 4 bytes.  The
archive ends with the entry "TRAILER!!!".  The kernel accepts several archives (each
optionally gzip-compressed) concatenated, which is how a per-run overlay is added to the
cached base image.  No I/O here: callers pass bytes and get bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from .errors import BuildError

MAGIC = b"070701"


@dataclass(frozen=True)
class CpioEntry:
    name: str            # path without leading "/", e.g. "bin/busybox"
    mode: int            # full st_mode (type bits + permissions)
    data: bytes = b""    # file contents, or the link target for symlinks


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def _pad4(n: int) -> bytes:
    return b"\x00" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0)
    return MAGIC + b"".join(b"%08X" % v for v in fields)


def encode(entries: list[CpioEntry]) -> bytes:
    """Encode ``entries`` (parents before children) plus the trailer as one newc archive."""
    out = bytearray()
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        name = entry.name.lstrip("/")
        if not name or name in seen or "\x00" in name:
            raise BuildError(f"bad or duplicate cpio entry name {entry.name!r}")
        seen.add(name)
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
            raise BuildError(f"unsupported cpio entry type {kind:#o} for {name!r}")
        if kind == stat.S_IFDIR and entry.data:
            raise BuildError(f"directory {name!r} cannot carry data")
        raw_name = name.encode() + b"\x00"
        nlink = 2 if kind == stat.S_IFDIR else 1
        hdr = _header(ino, entry.mode, nlink, len(entry.data), len(raw_name))
        out += hdr + raw_name + _pad4(len(hdr) + len(raw_name))
        out += entry.data + _pad4(len(entry.data))
    trailer = b"TRAILER!!!\x00"
    hdr = _header(0, 0, 1, 0, len(trailer))
    out += hdr + trailer + _pad4(len(hdr) + len(trailer))
    return bytes(out)


def decode(data: bytes) -> list[CpioEntry]:
    """Decode one newc archive (up to the trailer); used by the tests as a round-trip check."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + 110 > len(data) or data[pos:pos + 6] != MAGIC:
            raise BuildError(f"bad cpio header at offset {pos}")
        try:
            fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise BuildError(f"bad cpio header field at offset {pos}") from exc
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        if namesize < 1 or name_start + namesize > len(data):
            raise BuildError(f"bad cpio name size {namesize} at offset {pos}")
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4_len(110 + namesize)
        if data_start + size > len(data):
            raise BuildError(f"cpio entry {name!r} truncated")
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, bytes(data[data_start:data_start + size])))
        pos = data_start + size + _pad4_len(size)


def _pad4_len(n: int) -> int:
    return -n % 4
