"""Memory a PCI device can reach from a Linux guest without an IOMMU: pinned
2 MiB huge pages whose physical addresses come from /proc/self/pagemap.

The device (virtio-pci, no IOMMU: device address = guest-physical) needs the
physical address of every ring and buffer; a userspace driver gets memory
whose physical address never changes from hugetlbfs: a ``memfd_create``
with MFD_HUGETLB, mapped shared, populated and ``mlock``ed (huge pages are
never swapped; a huge page the kernel migrates would change its address, so
the pages are locked and only used while the mapping lives). Each 2 MiB
page's physical address is read from ``/proc/self/pagemap`` (root only:
CAP_SYS_ADMIN reveals the PFN, Documentation/admin-guide/mm/pagemap.rst).

Huge pages reserved at boot (``hugepages=N`` on the kernel command line)
are usually physically adjacent; pages adjacent both in the mapping and in
physical memory form a *run* (:func:`contiguous_runs`), one
:class:`~virtio.memory.MemoryRegion` at its physical address. One first-fit
allocator hands out the mapping's virtual addresses. :meth:`HugeMemory.alloc`
(rings, CQs, doorbells, command buffers) keeps an allocation inside one run,
so it is contiguous in device addresses: the largest is the longest run
(:attr:`HugeMemory.largest_run`), a larger one fails with a MemoryError that
says so. :meth:`HugeMemory.alloc_mr` (MR buffers) needs only virtual
contiguity: it prefers one run and otherwise takes a range spanning several,
whose page list (:func:`page_list`: one (device address, length) chunk per
physically contiguous piece) REG_MR carries.

The parsers (:func:`pagemap_pfns`, :func:`contiguous_runs`,
:func:`page_list`) are pure.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import mmap
import os
import struct

from guest_lib.transport import TransportError
from virtio.errors import GuestMemoryError
from virtio.memory import GuestMemory, MemoryRegion

HUGEPAGE = 2 << 20
PAGE = 4096
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1


class HugeMemoryError(TransportError):
    def __init__(self, message: str, errno: int = _errno.ENOMEM):
        super().__init__(message, errno)


def pagemap_pfns(data: bytes) -> list[int | None]:
    """PFN of each 8-byte pagemap entry in ``data`` (None: not present, or
    swapped, or the PFN hidden from an unprivileged reader)."""
    if len(data) % 8:
        raise HugeMemoryError(f"pagemap data of {len(data)} bytes is not a whole number of entries",
                              _errno.EINVAL)
    out: list[int | None] = []
    for (e,) in struct.iter_unpack("<Q", data):
        pfn = e & PM_PFN_MASK
        out.append(pfn if e & PM_PRESENT and not e & PM_SWAPPED and pfn else None)
    return out


def contiguous_runs(phys: list[int], page: int = HUGEPAGE) -> list[tuple[int, int, int]]:
    """Group pages (physical address of each, in mapping order) into runs
    adjacent in both: [(first page index, page count, physical address)]."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(phys):
        if p % page:
            raise HugeMemoryError(f"page {i} at physical {p:#x} is not {page:#x}-aligned", _errno.EINVAL)
        if runs and runs[-1][2] + runs[-1][1] * page == p:
            first, n, start = runs[-1]
            runs[-1] = (first, n + 1, start)
        else:
            runs.append((i, 1, p))
    return runs


def page_list(runs: list[tuple[int, int, int]], base: int, addr: int, length: int,
              page: int = HUGEPAGE) -> list[tuple[int, int]]:
    """The device-address chunks [(address, length)] of the mapped range
    [addr, addr + length), the pages mapped from ``base`` on in ``runs``
    order (:func:`contiguous_runs`): one chunk per run the range touches."""
    if length <= 0:
        raise HugeMemoryError(f"range length {length} must be positive", _errno.EINVAL)
    end = addr + length
    mapped = sum(n for _, n, _ in runs) * page
    if addr < base or end > base + mapped:
        raise HugeMemoryError(f"range {addr:#x}+{length:#x} is outside the mapping "
                              f"{base:#x}+{mapped:#x}", _errno.EFAULT)
    out: list[tuple[int, int]] = []
    for first, n, phys in runs:
        lo, hi = max(addr, base + first * page), min(end, base + (first + n) * page)
        if lo < hi:
            out.append((phys + lo - base - first * page, hi - lo))
    return out


class RunAllocator:
    """First-fit allocation inside [start, end), optionally only inside given
    windows (the runs) (vhost_user's GpaAllocator does the same for a process
    guest; guest_lib's PCI path does not import vhost_user)."""

    def __init__(self, start: int, end: int):
        self._free: list[list[int]] = [[start, end]]  # sorted, coalesced [start, end)
        self._used: dict[int, int] = {}

    def alloc(self, size: int, align: int, within: list[tuple[int, int]] | None = None) -> int:
        """The first ``align``-aligned ``size`` bytes free (and inside one of
        the ``within`` windows [start, end), when given)."""
        if size <= 0:
            raise ValueError(f"allocation size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        for i, (s, e) in enumerate(self._free):
            for ws, we in within if within is not None else [(s, e)]:
                a = (max(s, ws) + align - 1) & ~(align - 1)
                if a + size <= min(e, we):
                    self._free[i:i + 1] = [x for x in ([s, a], [a + size, e]) if x[0] < x[1]]
                    self._used[a] = size
                    return a
        raise MemoryError(f"no {size}-byte block (align {align})")

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)

    def free(self, addr: int) -> None:
        size = self._used.pop(addr)
        self._free.append([addr, addr + size])
        self._free.sort()
        merged: list[list[int]] = []
        for s, e in self._free:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        self._free = merged


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    a = _libc.mmap(addr, length, prot, flags, fd, offset)
    if a in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise HugeMemoryError(f"mmap of {length:#x} bytes failed: {os.strerror(e)}", e)
    return int(a)


class HugeMemory:
    """``size`` bytes (rounded up to 2 MiB pages) of pinned huge pages, as a
    :class:`GuestMemory` addressed by physical address. Owns the memfd and the
    mapping until :meth:`close`.

    The pool hands out huge pages in no particular physical order (LIFO:
    usually descending), so after learning each page's physical address the
    pages are mapped again, page by page (MAP_FIXED at their file offsets),
    in ascending physical order: then pages adjacent in physical memory are
    adjacent in the mapping too, and form one run."""

    def __init__(self, size: int, pagemap: str = "/proc/self/pagemap"):
        if size <= 0:
            raise HugeMemoryError(f"memory size {size} must be positive", _errno.EINVAL)
        self.size = -(-size // HUGEPAGE) * HUGEPAGE
        self.mem = GuestMemory()
        self._alloc: RunAllocator | None = None
        self._windows: list[tuple[int, int]] = []  # each run's virtual range
        self.runs: list[tuple[int, int, int]] = []
        self._owner: dict[int, int] = {}  # device address -> virtual address, of alloc()
        self._mrs: set[int] = set()  # virtual addresses, of alloc_mr()
        self._locked = False
        self._fd = -1
        #: the address range the pages are placed in: a Python mmap owns it, so
        #: closing it with views of it still held fails (BufferError) instead
        #: of leaving them pointing at unmapped memory
        self._area: mmap.mmap | None = None
        self._view: memoryview | None = None
        self.uva = 0
        #: the mapping was kept at close because views of it were still held
        self.kept_mapped = False
        try:
            flags = os.MFD_CLOEXEC | os.MFD_HUGETLB | getattr(os, "MFD_HUGE_2MB", 21 << 26)
            npages = self.size // HUGEPAGE
            try:
                self._fd = os.memfd_create("vrdma-pci", flags)
                os.ftruncate(self._fd, self.size)
                # every page faulted in once through a first mapping, to learn its address
                first = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
            except OSError as e:
                raise HugeMemoryError(f"cannot get {self.size >> 20} MiB of 2 MiB huge pages "
                                      f"(hugepages=N on the kernel command line?): {e}") from e
            try:
                for i in range(npages):
                    first[i * HUGEPAGE] = 0
                base = ctypes.addressof(ctypes.c_char.from_buffer(first))
                by_offset = self._physical(pagemap, base, npages)
            except OSError as e:
                raise HugeMemoryError(f"cannot fault in {self.size >> 20} MiB of huge pages: {e}") from e
            finally:
                first.close()
            # the final mapping: an aligned reserved range, each page placed in physical order
            self._area = mmap.mmap(-1, self.size + HUGEPAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
            self.uva = -(-area // HUGEPAGE) * HUGEPAGE
            self._view = memoryview(self._area)[self.uva - area:self.uva - area + self.size]
            order = sorted(range(npages), key=by_offset.__getitem__)
            for slot, page in enumerate(order):
                _mmap(self.uva + slot * HUGEPAGE, HUGEPAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_SHARED | _MAP_FIXED, self._fd, page * HUGEPAGE)
            if _libc.mlock(ctypes.c_void_p(self.uva), ctypes.c_size_t(self.size)) != 0:
                raise HugeMemoryError(f"mlock of {self.size >> 20} MiB failed: "
                                      f"{os.strerror(ctypes.get_errno())}", ctypes.get_errno())
            self._locked = True
            phys = self._physical(pagemap, self.uva, npages)  # as mapped now (and still where they were)
            if sorted(phys) != phys or sorted(phys) != sorted(by_offset):
                raise HugeMemoryError("huge pages moved while they were mapped again", _errno.EAGAIN)
            self.runs = contiguous_runs(phys)
            for first_page, n, start in self.runs:
                off = first_page * HUGEPAGE
                self.mem.add(MemoryRegion.from_buffer(self._view[off:off + n * HUGEPAGE], gpa=start,
                                                      uva=self.uva + off))
                self._windows.append((self.uva + off, self.uva + off + n * HUGEPAGE))
            self._alloc = RunAllocator(self.uva, self.uva + self.size)
        except BaseException:
            self.close()
            raise

    def _physical(self, pagemap: str, uva: int, npages: int) -> list[int]:
        entries = bytearray()
        with open(pagemap, "rb", buffering=0) as f:
            for i in range(npages):
                f.seek((uva + i * HUGEPAGE) // PAGE * 8)
                entries += f.read(8)
        phys = []
        for i, pfn in enumerate(pagemap_pfns(bytes(entries))):
            if pfn is None:
                raise HugeMemoryError(f"huge page {i} has no physical address in {pagemap} "
                                      "(not root? CAP_SYS_ADMIN shows PFNs)", _errno.EPERM)
            phys.append(pfn * PAGE)
        return phys

    @property
    def largest_run(self) -> int:
        return max((n for _, n, _ in self.runs), default=0) * HUGEPAGE

    def _allocator(self) -> RunAllocator:
        if self._alloc is None:
            raise HugeMemoryError("the huge-page memory is closed", _errno.EBADF)
        return self._alloc

    def alloc(self, size: int, align: int) -> int:
        """``size`` bytes contiguous in physical memory (inside one run): the
        device address."""
        try:
            uva = self._allocator().alloc(size, align, self._windows)
        except MemoryError:
            raise MemoryError(f"no {size}-byte block (align {align}) contiguous in physical memory: the "
                              f"longest run of adjacent huge pages is {self.largest_run >> 20} MiB "
                              f"({len(self.runs)} runs in {self.size >> 20} MiB)") from None
        gpa = self.mem.uva_to_gpa(uva, size)
        self._owner[gpa] = uva
        return gpa

    def free(self, gpa: int) -> None:
        uva = self._owner.pop(gpa, None)
        if uva is None:
            raise ValueError(f"device address {gpa:#x} was not allocated")
        self._allocator().free(uva)

    def alloc_mr(self, size: int, align: int = PAGE) -> tuple[int, memoryview, list[tuple[int, int]]]:
        """An MR buffer: ``size`` bytes contiguous in this process's address
        space, inside one run if one has room, else across several:
        (virtual address, a view of it, its page list)."""
        a = self._allocator()
        try:
            uva = a.alloc(size, align, self._windows)
        except MemoryError:
            try:
                uva = a.alloc(size, align)
            except MemoryError:
                raise MemoryError(f"no {size}-byte range of free huge pages for the MR: {a.free_bytes} of "
                                  f"{self.size} bytes free ({len(self.runs)} runs)") from None
        self._mrs.add(uva)
        return uva, self.view_of_uva(uva, size), self.gpa_chunks(uva, size)

    def free_mr(self, uva: int) -> None:
        if uva not in self._mrs:
            raise ValueError(f"virtual address {uva:#x} is not an MR buffer")
        self._mrs.discard(uva)
        self._allocator().free(uva)

    def gpa_chunks(self, uva: int, length: int) -> list[tuple[int, int]]:
        """The page list of [uva, uva + length): (device address, length) per
        physically contiguous piece."""
        return page_list(self.runs, self.uva, uva, length)

    def view_of_uva(self, uva: int, length: int) -> memoryview:
        """A view of [uva, uva + length), anywhere in the mapping (it may
        cross runs)."""
        if self._view is None:
            raise HugeMemoryError("the huge-page memory is closed", _errno.EBADF)
        if length < 0 or uva < self.uva or uva + length > self.uva + self.size:
            raise GuestMemoryError(f"range {uva:#x}+{length:#x} is outside the huge-page mapping "
                                   f"{self.uva:#x}+{self.size:#x}")
        return self._view[uva - self.uva:uva - self.uva + length]

    def uva_of(self, gpa: int) -> int:
        r = self.mem.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    @property
    def closed(self) -> bool:
        return self._fd < 0 and self._area is None

    def close(self) -> None:
        """Unmap and free the pages (the device must have stopped using them)."""
        self.mem.close()
        self._alloc = None
        self._windows.clear()
        self._owner.clear()
        self._mrs.clear()
        if self._locked:
            _libc.munlock(ctypes.c_void_p(self.uva), ctypes.c_size_t(self.size))
            self._locked = False
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                pass  # exported elsewhere: the mmap's close below finds out
            self._view = None
        if self._area is not None:
            try:
                self._area.close()  # unmaps the whole range, the placed pages with it
            except BufferError:
                self.kept_mapped = True  # a view is still held: leave it valid memory
            self._area = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
