"""Scatter/gather lists over writable memoryviews: gather a byte range for
an outgoing packet (zero copy when it lies in one entry) and scatter an
incoming payload in place."""
from __future__ import annotations

from bisect import bisect_right

from ..errors import InvalidWorkRequest


class SgLengthError(InvalidWorkRequest):
    """A scatter past the end of the list (receive buffer too small)."""

    def __init__(self, offset: int, length: int, total: int) -> None:
        super().__init__(f"{length} bytes at offset {offset} overflow an SG list of {total} bytes")
        self.offset = offset
        self.length = length
        self.total = total


class SgList:
    __slots__ = ("views", "starts", "total")

    def __init__(self, sges) -> None:
        views, starts, total = [], [], 0
        for i, s in enumerate(sges):
            try:
                mv = memoryview(s).cast("B") if not isinstance(s, memoryview) or s.format != "B" \
                    or s.ndim != 1 else s
            except TypeError as e:
                raise InvalidWorkRequest(f"sge[{i}] is not a contiguous buffer: {e}") from None
            if not mv.c_contiguous:
                raise InvalidWorkRequest(f"sge[{i}] is not contiguous")
            if len(mv) == 0:
                continue
            views.append(mv)
            starts.append(total)
            total += len(mv)
        self.views = views
        self.starts = starts
        self.total = total

    def gather(self, off: int, n: int):
        """``n`` bytes from ``off``: a memoryview when they lie in one entry,
        else the concatenated bytes."""
        if n == 0:
            return b""
        if off < 0 or off + n > self.total:
            raise SgLengthError(off, n, self.total)
        i = bisect_right(self.starts, off) - 1
        rel = off - self.starts[i]
        v = self.views[i]
        if rel + n <= len(v):
            return v[rel:rel + n]
        parts = []
        while n:
            v = self.views[i]
            take = min(n, len(v) - rel)
            parts.append(v[rel:rel + take])
            n -= take
            rel = 0
            i += 1
        return b"".join(parts)

    def scatter(self, off: int, data) -> None:
        n = len(data)
        if n == 0:
            return
        if off < 0 or off + n > self.total:
            raise SgLengthError(off, n, self.total)
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        i = bisect_right(self.starts, off) - 1
        rel = off - self.starts[i]
        pos = 0
        while pos < n:
            v = self.views[i]
            take = min(n - pos, len(v) - rel)
            v[rel:rel + take] = src[pos:pos + take]
            pos += take
            rel = 0
            i += 1
