"""A first-fit allocator over the guest memory a Context shares with the
back-end. MR buffers, work queue rings, CQ rings and doorbell records all
come from here, so the device can reach them."""
from __future__ import annotations

import bisect

from guest_lib.errors import UserError


class GuestAllocator:
    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self._free: list[tuple[int, int]] = [(start, end)]  # sorted (start, end)
        self._used: dict[int, int] = {}

    def alloc(self, size: int, align: int = 64) -> int:
        if size <= 0:
            raise UserError(f"allocation size {size} must be positive")
        if align & (align - 1):
            raise UserError(f"alignment {align} is not a power of two")
        for i, (s, e) in enumerate(self._free):
            a = (s + align - 1) & ~(align - 1)
            if a + size <= e:
                del self._free[i]
                if a > s:
                    self._free.insert(i, (s, a))
                    i += 1
                if a + size < e:
                    self._free.insert(i, (a + size, e))
                self._used[a] = size
                return a
        raise MemoryError(f"guest memory exhausted: no {size}-byte block (align {align}) left; "
                          "open the Context with a larger mem_size")

    def free(self, addr: int) -> None:
        size = self._used.pop(addr, None)
        if size is None:
            raise UserError(f"address {addr:#x} was not allocated")
        s, e = addr, addr + size
        i = bisect.bisect_left(self._free, (s, e))
        if i > 0 and self._free[i - 1][1] == s:
            s = self._free[i - 1][0]
            i -= 1
            del self._free[i]
        if i < len(self._free) and self._free[i][0] == e:
            e = self._free[i][1]
            del self._free[i]
        self._free.insert(i, (s, e))

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())
