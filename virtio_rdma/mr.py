"""Memory regions: registration, keys, access and bounds checks, scatter views.

An MR (spec 5.x.6.1 REG_MR) maps the virtual range ``[iova, iova+length)``
onto an ordered list of guest-physical chunks. Its key (lkey == rkey, as on
rxe and most HCAs) is 32 bits from a cryptographic source, never 0 and never
the key of another live MR of the device, drawn anew at every registration:
a peer cannot guess it from its own keys, and a key that outlives its
registration matches a later MR only by a 2^-32 chance. (HCAs that use
``index << 8 | 8-bit key``, rxe included, leave 8 bits to guess: ReDMArk,
USENIX Security 2021.)

When the fabric is a real RDMA device (:mod:`fabric.hca`), the
guest's pages are registered with the HCA too and the HCA's keys are the
guest's keys (a peer's HCA checks them): ``register(..., backing=...)``
adopts them, and the MR owns the HCA registration (``backing.close()`` at
deregistration). Lookups go through one dict, whoever made the keys.

:meth:`MemoryRegion.views` resolves ``(va, length)`` to the list of writable
memoryviews into guest memory that back it (one per chunk touched): the data
path copies between such lists without intermediate bytes objects.
Translation happens on every access, so the MR never pins a mapping and a
changed guest memory table is honoured at once.
"""
from __future__ import annotations

import bisect
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from verbs import Access
from virtio.errors import GuestMemoryError
from virtio_rdma.constants import Status
from virtio_rdma.errors import CommandError, MemoryAccessError

log = logging.getLogger(__name__)

U64 = 1 << 64
KEY_BITS = 32
_REMOTE = int(Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC)


@dataclass(slots=True)
class MemoryRegion:
    lkey: int
    rkey: int
    pdn: int
    access: int                    # Access flags (an IntFlag; the data path tests them as ints)
    iova: int
    length: int
    chunks: list[tuple[int, int]]  # (gpa, length)
    backing: Any = None            # the HCA registration this MR owns (has close())
    offsets: list[int] = field(default_factory=list)  # start offset of each chunk

    def __post_init__(self):
        off, self.offsets = 0, []
        for _, n in self.chunks:
            self.offsets.append(off)
            off += n

    def views(self, mem, va: int, length: int) -> list[memoryview]:
        """Writable views of ``[va, va+length)``; raise MemoryAccessError if out of the MR
        or if guest memory no longer backs it."""
        if length < 0 or va < self.iova or va + length > self.iova + self.length:
            raise MemoryAccessError(
                f"range [{va:#x}, +{length}) outside MR key {self.lkey:#x} "
                f"[{self.iova:#x}, +{self.length})")
        out: list[memoryview] = []
        if length == 0:
            return out
        off = va - self.iova
        i = bisect.bisect_right(self.offsets, off) - 1
        remaining = length
        while remaining:
            gpa, n = self.chunks[i]
            inner = off - self.offsets[i]
            take = min(n - inner, remaining)
            try:
                out.append(mem.translate(gpa + inner, take))
            except GuestMemoryError as e:
                raise MemoryAccessError(f"MR key {self.lkey:#x}: backing chunk gone: {e}") from None
            remaining -= take
            off += take
            i += 1
        return out


class MrTable:
    """The MRs of one device, indexed by key (spec 5.x.6.1 "Keys")."""

    def __init__(self, max_mr: int, max_chunks: int, max_mr_size: int):
        self.max_mr = max_mr
        self.max_chunks = max_chunks
        self.max_mr_size = max_mr_size
        self._by_key: dict[int, MemoryRegion] = {}  # lkey and rkey -> MR (the native path reads it)
        self.count = 0
        self.by_pd: dict[int, int] = {}

    def register(self, mem, pdn: int, access: int, iova: int, length: int,
                 chunks: list[tuple[int, int]], *, backing=None) -> MemoryRegion:
        """Check and add an MR. ``backing(access)``, if given, registers the
        same pages elsewhere (an HCA) after every check here passed, and
        returns an object with ``lkey``, ``rkey`` and ``close()``: the MR
        takes those keys and owns it."""
        access = Access.parse(access)  # UnknownValueError -> EINVAL
        if access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC) and not access & Access.LOCAL_WRITE:
            raise CommandError(
                f"REG_MR access {int(access):#x}: REMOTE_WRITE/REMOTE_ATOMIC need LOCAL_WRITE",
                Status.EINVAL)
        if access & (Access.MW_BIND | Access.ZERO_BASED | Access.ON_DEMAND):
            raise CommandError(f"REG_MR access {int(access):#x}: unsupported flags", Status.EOPNOTSUPP)
        if len(chunks) > self.max_chunks:
            raise CommandError(f"REG_MR with {len(chunks)} chunks exceeds {self.max_chunks}", Status.E2BIG)
        if length > self.max_mr_size:
            raise CommandError(f"REG_MR length {length} exceeds max_mr_size {self.max_mr_size}",
                               Status.EINVAL)
        if iova + length > U64:
            raise CommandError(f"REG_MR iova {iova:#x} + length {length} overflows", Status.EINVAL)
        if sum(n for _, n in chunks) != length:
            raise CommandError(
                f"REG_MR chunk lengths sum to {sum(n for _, n in chunks)}, length is {length}", Status.EINVAL)
        for gpa, n in chunks:
            if n == 0:
                raise CommandError(f"REG_MR chunk at gpa {gpa:#x} has length 0", Status.EINVAL)
            try:
                mem.translate(gpa, n).release()
            except GuestMemoryError as e:
                raise CommandError(f"REG_MR chunk gpa {gpa:#x} len {n}: {e}", Status.EFAULT) from None
        if self.count >= self.max_mr:
            raise CommandError(f"max_mr {self.max_mr} reached", Status.ENOMEM)
        if backing is not None:
            hca = backing(access)
            lkey, rkey = hca.lkey, hca.rkey
            if not access & _REMOTE:
                rkey = lkey  # an HCA may give a local-only MR no rkey (rxe: 0); it has none
            if lkey in self._by_key or rkey in self._by_key:
                hca.close()
                raise CommandError(f"REG_MR: the HCA returned keys {lkey:#x}/{rkey:#x} "
                                   "that name a live MR", Status.EIO)
            mr = MemoryRegion(lkey, rkey, pdn, access, iova, length, list(chunks), backing=hca)
        else:
            key = self._new_key()
            mr = MemoryRegion(key, key, pdn, access, iova, length, list(chunks))
        self._by_key[mr.lkey] = mr
        self._by_key[mr.rkey] = mr
        self.count += 1
        self.by_pd[pdn] = self.by_pd.get(pdn, 0) + 1
        return mr

    def _new_key(self) -> int:
        """A fresh key: KEY_BITS random bits, not 0, naming no live MR (max_mr
        is far below 2^32, so this loop ends at once in practice)."""
        while True:
            key = secrets.randbits(KEY_BITS)
            if key and key not in self._by_key:
                return key

    def lookup(self, key: int) -> MemoryRegion | None:
        return self._by_key.get(key)

    def deregister(self, key: int) -> MemoryRegion:
        """Remove the MR whose lkey is ``key`` and release what it owns."""
        mr = self._by_key.get(key)
        if mr is None or mr.lkey != key:
            raise CommandError(f"DEREG_MR: no MR with lkey {key:#x}", Status.ENOENT)
        self._drop(mr)
        return mr

    def _drop(self, mr: MemoryRegion) -> None:
        del self._by_key[mr.lkey]
        self._by_key.pop(mr.rkey, None)
        self.count -= 1
        self.by_pd[mr.pdn] -= 1
        if mr.backing is not None:
            backing, mr.backing = mr.backing, None
            backing.close()

    def clear(self) -> None:
        """Deregister every MR (the device is going away); a registration that
        fails to release is logged and the rest are still released."""
        for mr in list(self):
            try:
                self._drop(mr)
            except Exception as e:
                log.warning("releasing MR %#x: %s", mr.lkey, e)

    def check(self, mem, key: int, pdn: int, va: int, length: int, need: int) -> list[memoryview]:
        """Resolve a (key, va, length) access for a QP of PD ``pdn`` needing
        rights ``need``: a remote access (``need`` has a REMOTE_* right) must
        use the MR's rkey, a local one its lkey."""
        mr = self._by_key.get(key)
        need = int(need)  # plain ints: flag arithmetic on enums costs ~0.5 us an operation
        if mr is None or key != (mr.rkey if need & _REMOTE else mr.lkey):
            raise MemoryAccessError(f"invalid key {key:#x}")
        if mr.pdn != pdn:
            raise MemoryAccessError(f"key {key:#x} belongs to PD {mr.pdn}, QP is in PD {pdn}")
        lacking = need & ~int(mr.access)
        if lacking:
            raise MemoryAccessError(f"key {key:#x} lacks access {Access(lacking)!r}")
        if va + length > U64:
            raise MemoryAccessError(f"range {va:#x}+{length} overflows")
        return mr.views(mem, va, length)

    def __iter__(self):
        return iter({id(m): m for m in self._by_key.values()}.values())


def sg_copy(dst: list[memoryview], src: list[memoryview]) -> int:
    """Copy the concatenation of ``src`` into ``dst`` (memoryview to memoryview,
    no intermediate bytes). Returns the bytes copied: min of both totals."""
    di = si = doff = soff = 0
    copied = 0
    while di < len(dst) and si < len(src):
        d, s = dst[di], src[si]
        n = min(len(d) - doff, len(s) - soff)
        if n:
            d[doff:doff + n] = s[soff:soff + n]
            copied += n
            doff += n
            soff += n
        if doff == len(d):
            di += 1
            doff = 0
        if soff == len(s):
            si += 1
            soff = 0
    return copied
