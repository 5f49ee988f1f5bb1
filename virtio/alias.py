"""One contiguous virtual range showing pieces of shared mappings, in a chosen order.

An RDMA device registers one virtual range per MR, but a guest's MR may list
guest-physical chunks that are scattered in the daemon's mapping of guest
memory (or out of order). :class:`AliasWindow` reserves a fresh range and
maps each piece into it, in order, with ``mremap(old, 0, size,
MREMAP_MAYMOVE | MREMAP_FIXED, new)``: with an old size of 0, Linux makes a
second mapping of the same pages of a shared mapping. Nothing is copied:
the window and the original mapping are the same memory (the memfd pages).

Pieces must tile pages: every piece but the first starts on a page boundary
and every piece but the last ends on one (a guest's chunk list of pages).
The window owns its mapping; ``close()`` unmaps it (the original mappings
are untouched).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

from virtio.errors import GuestMemoryError

PAGE = mmap.PAGESIZE
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_PROT_NONE = 0
_MAP_NORESERVE = 0x4000  # Linux
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _errno_text() -> str:
    e = ctypes.get_errno()
    return f"{os.strerror(e)} (errno {e})"


class AliasWindow:
    """``pieces``: ``(host address, length)`` of each piece, in window order."""

    __slots__ = ("base", "size", "address", "length")

    def __init__(self, pieces: list[tuple[int, int]]):
        if not pieces:
            raise GuestMemoryError("an alias window needs at least one piece")
        last = len(pieces) - 1
        spans = []
        for i, (addr, n) in enumerate(pieces):
            if n <= 0:
                raise GuestMemoryError(f"piece {i} at {addr:#x} has length {n}")
            if i > 0 and addr % PAGE:
                raise GuestMemoryError(f"piece {i} at {addr:#x} does not start on a page")
            if i < last and (addr + n) % PAGE:
                raise GuestMemoryError(f"piece {i} at {addr:#x} (+{n}) does not end on a page")
            lo = addr - addr % PAGE
            hi = -(-(addr + n) // PAGE) * PAGE
            spans.append((lo, hi - lo))
        self.size = sum(n for _, n in spans)
        base = _libc.mmap(None, self.size, _PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if base in (None, _MAP_FAILED):
            raise GuestMemoryError(f"cannot reserve {self.size} bytes for an alias window: "
                                   f"{_errno_text()}")
        self.base = base
        off = 0
        for i, (lo, n) in enumerate(spans):
            got = _libc.mremap(lo, 0, n, _MREMAP_MAYMOVE | _MREMAP_FIXED, base + off)
            if got != base + off:
                err = _errno_text()
                self.close()
                raise GuestMemoryError(f"cannot alias piece {i} ({n} bytes at {lo:#x}): {err} "
                                       "(it must lie in a shared mapping)")
            off += n
        self.address = base + pieces[0][0] % PAGE
        self.length = sum(n for _, n in pieces)

    def close(self) -> None:
        if self.base is not None:
            base, self.base = self.base, None
            if _libc.munmap(base, self.size) != 0:  # pragma: no cover - a range we mapped
                raise GuestMemoryError(f"munmap of the alias window failed: {_errno_text()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.base is None else f"{self.address:#x}+{self.length}"
        return f"AliasWindow({state})"
