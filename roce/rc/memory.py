"""How the responder reaches registered memory (IBTA 10.6 memory regions,
R_Key checks of 9.7.4.1.6 / C9-88).

:class:`RemoteMemory` is the interface the backend implements over guest
memory; :class:`MemoryTable` is a complete in-process implementation
(regions over any writable buffer) used by tests and tools.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from verbs import Access

from ..errors import RemoteAccessError


class RemoteMemory(Protocol):
    def resolve(self, rkey: int, va: int, length: int, access: Access) -> memoryview:
        """A writable byte view of ``length`` bytes at ``va`` in the region of
        ``rkey``; raises :class:`RemoteAccessError` if the key is unknown or
        invalidated, the range falls outside the region, or ``access`` is not
        granted."""

    def invalidate(self, rkey: int) -> None:
        """SEND with Invalidate: make ``rkey`` unusable; raises
        :class:`RemoteAccessError` if it cannot be invalidated."""


@dataclass(slots=True)
class _Region:
    view: memoryview
    va: int
    access: Access
    valid: bool = True


class MemoryTable:
    """R_Key -> region table over Python buffers."""

    def __init__(self, first_key: int = 0x1000) -> None:
        self._regions: dict[int, _Region] = {}
        self._keys = itertools.count(first_key)

    def register(self, buf, access: Access, va: int | None = None) -> tuple[int, int]:
        """Register ``buf``; returns ``(rkey, va)``. ``va`` defaults to a
        made-up address unique per region."""
        mv = memoryview(buf).cast("B")
        if mv.readonly and access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC):
            raise RemoteAccessError("read-only buffer registered for remote write/atomic")
        key = next(self._keys) & 0xFFFFFFFF
        if va is None:
            va = key << 32
        self._regions[key] = _Region(mv, va, Access(access))
        return key, va

    def deregister(self, rkey: int) -> None:
        self._regions.pop(rkey, None)

    def resolve(self, rkey: int, va: int, length: int, access: Access) -> memoryview:
        r = self._regions.get(rkey)
        if r is None or not r.valid:
            raise RemoteAccessError(f"R_Key 0x{rkey:08x} unknown or invalidated",
                                    rkey=rkey, va=va, length=length)
        if (r.access & access) != access:
            raise RemoteAccessError(f"R_Key 0x{rkey:08x} lacks {Access(access & ~r.access)!r}",
                                    rkey=rkey, va=va, length=length)
        off = va - r.va
        if length < 0 or off < 0 or off + length > len(r.view):
            raise RemoteAccessError(
                f"[0x{va:x}, +{length}) outside region of R_Key 0x{rkey:08x} "
                f"[0x{r.va:x}, +{len(r.view)})", rkey=rkey, va=va, length=length)
        return r.view[off:off + length]

    def invalidate(self, rkey: int) -> None:
        r = self._regions.get(rkey)
        if r is None or not r.valid:
            raise RemoteAccessError(f"cannot invalidate R_Key 0x{rkey:08x}", rkey=rkey)
        r.valid = False
