"""Guest memory: the memory of one guest, mapped into this process.

This is the "memory table" of vhost-user (``VHOST_USER_SET_MEM_TABLE``, QEMU
docs/interop/vhost-user.rst "Memory regions description") and the address
space that virtio ring addresses refer to (virtio v1.2 §2.7: descriptor
addresses are guest-physical addresses, GPAs).

Roles:

* :class:`MemoryRegion` owns exactly one shared mapping. The frontend (driver
  side) creates regions with :meth:`MemoryRegion.memfd` and sends ``fd`` to the
  backend; the backend maps the received fd with :meth:`MemoryRegion.from_fd`.
  Tests may wrap a plain writable buffer with :meth:`MemoryRegion.from_buffer`.
* :class:`GuestMemory` is a set of non-overlapping regions.
  :meth:`GuestMemory.translate` turns ``(gpa, length)`` into a writable
  memoryview that lies inside one region, or raises :class:`GuestMemoryError`.
  Its C-level region table (``virtio._memory.RegionTable``) is what the split
  virtqueue hot path uses; it is rebuilt on every change and
  :attr:`GuestMemory.generation` is bumped.

Lifetime rules: views handed out keep their mapping alive. ``close()`` of a
region unmaps immediately when no view is held; if a caller still holds views,
the region is detached and unusable at once but the unmap is *deferred* until
the last view is released (a ``ResourceWarning`` says so, and
:func:`deferred_unmaps` counts such regions). Memory is never unmapped under a
live view. :func:`live_mappings` counts mappings still mapped, and
:func:`proc_maps_count` cross-checks with ``/proc/self/maps``.
"""
from __future__ import annotations

import os
import stat
import sys
import threading
import warnings
import weakref

from ._memory import NORESERVE, Mapping, RegionTable, buffer_address, deferred_unmaps, live_mappings
from .errors import GuestMemoryError

__all__ = [
    "MemoryRegion", "GuestMemory", "GuestMemoryError", "live_mappings", "deferred_unmaps", "le32_words",
    "proc_maps_count", "free_hugepages", "HUGEPAGE_SIZE",
]

U64 = 1 << 64
HUGEPAGE_SIZE = 2 << 20
_HUGEPAGES_FREE = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"


def _u64(name: str, value, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GuestMemoryError(f"{name} must be an int, got {value!r}")
    if value < 0 or value >= U64 or (positive and value == 0):
        raise GuestMemoryError(f"{name}={value!r} is not a {'positive ' if positive else ''}64-bit value")
    return value


def free_hugepages() -> int:
    """Free 2 MiB huge pages of the system pool (0 if unknown)."""
    try:
        with open(_HUGEPAGES_FREE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def le32_words(view) -> memoryview:
    """``view`` (shared with another process) as little-endian 32-bit words
    that are read and written whole: a memoryview item of format ``I`` is one
    4-byte load or store, so the peer never sees a torn value. ``struct``
    is no substitute: ``pack_into`` zeroes the target bytes before it writes
    them, and a device reading a consumer index in between saw 0 and
    declared the CQ overflowed. Little-endian hosts only (the device's words
    are le32); ``view`` must be 4-byte aligned, as doorbell records are."""
    if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 hosts are little-endian
        raise GuestMemoryError("shared le32 words need a little-endian host")
    return memoryview(view).cast("B").cast("I")


def proc_maps_count(needle: str) -> int:
    """Lines of /proc/self/maps whose pathname contains *needle*
    (memfd mappings appear as ``/memfd:<name> (deleted)``)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if needle in line)


class MemoryRegion:
    """One region of guest memory: ``size`` bytes at guest-physical ``gpa``,
    known to the frontend at user-virtual ``uva``. Owns exactly one mapping
    (and, for :meth:`memfd` regions, the fd)."""

    __slots__ = ("gpa", "size", "uva", "mmap_offset", "fd", "hugetlb", "address",
                 "_mapping", "_base_view", "_view", "_owner", "_closed", "__weakref__")

    def __init__(self, *, gpa: int, size: int, uva: int, mmap_offset: int, mapping, base_view,
                 fd: int | None = None, hugetlb: bool = False):
        # Private: use from_fd / memfd / from_buffer.
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.mmap_offset = mmap_offset
        self.fd = fd
        self.hugetlb = hugetlb
        self._mapping = mapping
        self._base_view = base_view
        self._view = base_view[mmap_offset:mmap_offset + size]
        self.address = buffer_address(self._view)
        self._owner: weakref.ref[GuestMemory] | None = None
        self._closed = False

    # -- constructors -----------------------------------------------------------------------
    @staticmethod
    def _check_geometry(gpa, size, uva, mmap_offset):
        _u64("size", size, positive=True)
        _u64("gpa", gpa)
        _u64("uva", uva)
        _u64("mmap_offset", mmap_offset)
        if gpa + size > U64:
            raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} overflows the 64-bit GPA space")
        if uva + size > U64:
            raise GuestMemoryError(f"region uva={uva:#x} size={size:#x} overflows the 64-bit VA space")
        if mmap_offset + size >= U64:
            raise GuestMemoryError(f"region mmap_offset={mmap_offset:#x} size={size:#x} overflows")

    @classmethod
    def from_fd(cls, fd: int, *, gpa: int, size: int, uva: int = 0, mmap_offset: int = 0) -> MemoryRegion:
        """Map ``[mmap_offset, mmap_offset+size)`` of *fd* shared read-write.

        The fd is not owned: the caller closes it (the mapping stays valid)."""
        cls._check_geometry(gpa, size, uva, mmap_offset)
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise GuestMemoryError(f"invalid fd {fd!r} for region gpa={gpa:#x}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"invalid fd {fd} for region gpa={gpa:#x}: {e}") from e
        # Mapping past the end of a file "succeeds" but the first access raises
        # SIGBUS: refuse a region the file (memfd, hugetlbfs, shm) cannot back.
        if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
            raise GuestMemoryError(
                f"fd {fd} holds {st.st_size:#x} bytes, region gpa={gpa:#x} needs mmap_offset+size="
                f"{mmap_offset + size:#x}")
        try:
            # Like libvhost-user: map from offset 0 (hugetlbfs needs huge-page aligned
            # offsets), MAP_NORESERVE so a large mmap_offset costs address space only.
            mapping = Mapping(fd, mmap_offset + size, NORESERVE)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(
                f"cannot mmap fd {fd} (offset {mmap_offset:#x}, size {size:#x}) for region gpa={gpa:#x}: {e}"
            ) from e
        try:
            return cls(gpa=gpa, size=size, uva=uva, mmap_offset=mmap_offset, mapping=mapping,
                       base_view=memoryview(mapping))
        except BaseException:
            mapping.close()
            raise

    @classmethod
    def memfd(cls, size: int, *, gpa: int, name: str = "vrdma-guest", hugetlb="auto") -> MemoryRegion:
        """Create a memfd of *size* bytes (frontend side) and map it shared.

        ``hugetlb=True`` requires 2 MiB huge pages (size a multiple of 2 MiB)
        and fails otherwise; ``"auto"`` uses them when the pool has enough free
        pages and falls back to normal pages on any failure; ``False`` never
        does. The region keeps ``fd`` (to send with SCM_RIGHTS) and closes it
        in :meth:`close`; ``uva`` is the address of this process's mapping."""
        cls._check_geometry(gpa, size, 0, 0)
        if hugetlb not in (True, False, "auto"):
            raise GuestMemoryError(f"hugetlb must be True, False or 'auto', got {hugetlb!r}")
        if hugetlb is True and size % HUGEPAGE_SIZE:
            raise GuestMemoryError(f"hugetlb region size {size:#x} is not a multiple of 2 MiB")
        attempts = []
        if hugetlb is True or (hugetlb == "auto" and size % HUGEPAGE_SIZE == 0
                               and free_hugepages() * HUGEPAGE_SIZE >= size):
            attempts.append(True)
        if hugetlb is not True:
            attempts.append(False)
        err: Exception | None = None
        for huge in attempts:
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            if huge:
                flags |= os.MFD_HUGETLB | getattr(os, "MFD_HUGE_2MB", 21 << 26)
            fd = -1
            try:
                fd = os.memfd_create(name, flags)
                os.ftruncate(fd, size)
                mapping = Mapping(fd, size)
            except OSError as e:
                if fd >= 0:
                    os.close(fd)
                err = e
                continue
            try:
                region = cls(gpa=gpa, size=size, uva=0, mmap_offset=0, mapping=mapping,
                             base_view=memoryview(mapping), fd=fd, hugetlb=huge)
            except BaseException:
                mapping.close()
                os.close(fd)
                raise
            region.uva = region.address
            return region
        raise GuestMemoryError(
            f"cannot create memfd region gpa={gpa:#x} size={size:#x} (hugetlb={hugetlb!r}): {err}")

    @classmethod
    def from_buffer(cls, buf, *, gpa: int, uva: int = 0) -> MemoryRegion:
        """Wrap a writable C-contiguous buffer (bytearray, numpy array, mmap).
        Nothing is mapped; the buffer lives as long as any view of it."""
        try:
            mv = memoryview(buf)
            if mv.readonly:
                raise GuestMemoryError(f"buffer {type(buf).__name__} is read-only")
            mv = mv.cast("B")
        except (TypeError, ValueError) as e:
            raise GuestMemoryError(
                f"buffer {type(buf).__name__} is not a writable contiguous buffer: {e}") from e
        cls._check_geometry(gpa, max(mv.nbytes, 1), uva, 0)
        if mv.nbytes == 0:
            raise GuestMemoryError(f"buffer for region gpa={gpa:#x} is empty")
        return cls(gpa=gpa, size=mv.nbytes, uva=uva, mmap_offset=0, mapping=None, base_view=mv)

    # -- accessors --------------------------------------------------------------------------
    @property
    def view(self) -> memoryview:
        """The whole region, writable."""
        if self._closed:
            raise GuestMemoryError(f"region gpa={self.gpa:#x} size={self.size:#x} is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def close(self) -> None:
        """Detach from its GuestMemory, unmap, close an owned fd. Idempotent.

        If views of the region are still held elsewhere, the mapping is
        released when the last of them is (see module docstring)."""
        if self._closed:
            return
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner._detach(self)
        self._closed = True
        for v in (self._view, self._base_view):
            try:
                v.release()
            except BufferError:
                pass    # someone holds a buffer export of it (e.g. np.frombuffer): deferred below
        if self._mapping is not None and not self._mapping.close():
            warnings.warn(
                f"region gpa={self.gpa:#x} size={self.size:#x} closed while {self._mapping.exported} "
                "view(s) of it are still held; unmapping deferred until they are released",
                ResourceWarning, stacklevel=2)
        self._mapping = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"host={self.address:#x}"
        return (f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, uva={self.uva:#x}, "
                f"mmap_offset={self.mmap_offset:#x}, {state})")


class GuestMemory:
    """The guest's memory table: up to :attr:`MAX_REGIONS` non-overlapping regions.

    Regions added are owned by this object from then on (``close()`` closes
    them); :meth:`remove` hands ownership back to the caller."""

    MAX_REGIONS = 509   # VHOST_USER_MAX_RAM_SLOTS

    def __init__(self, regions=()):
        self._lock = threading.Lock()
        self._regions: list[MemoryRegion] = []
        self.generation = 0
        self._table = RegionTable(0, [])
        self._closed = False
        for r in regions:
            self.add(r)

    # -- table maintenance ------------------------------------------------------------------
    def _rebuild(self) -> None:
        self.generation += 1
        old = self._table
        self._table = RegionTable(self.generation, [
            (r.gpa, r.size, r.address, r._view, r) for r in self._regions])
        old.invalidate()

    @property
    def table(self) -> RegionTable:
        """The current C-level region table (for Cython callers)."""
        return self._table

    def add(self, region: MemoryRegion) -> None:
        """Add *region*; overlap (GPA, or UVA when nonzero), a closed or
        already-owned region, or too many regions -> GuestMemoryError and the
        region is left untouched (still the caller's)."""
        if not isinstance(region, MemoryRegion):
            raise GuestMemoryError(f"not a MemoryRegion: {region!r}")
        with self._lock:
            if self._closed:
                raise GuestMemoryError("guest memory is closed")
            if region.closed:
                raise GuestMemoryError(f"{region!r} is closed")
            if region._owner is not None and region._owner() is not None:
                raise GuestMemoryError(f"{region!r} already belongs to a GuestMemory")
            if len(self._regions) >= self.MAX_REGIONS:
                raise GuestMemoryError(
                    f"cannot add {region!r}: already {len(self._regions)} regions (max {self.MAX_REGIONS})")
            for r in self._regions:
                if region.gpa < r.gpa + r.size and r.gpa < region.gpa + region.size:
                    raise GuestMemoryError(f"{region!r} overlaps {r!r} in guest-physical space")
                if (region.uva and r.uva and region.uva < r.uva + r.size
                        and r.uva < region.uva + region.size):
                    raise GuestMemoryError(f"{region!r} overlaps {r!r} in user-virtual space")
            self._regions.append(region)
            self._regions.sort(key=lambda r: r.gpa)
            region._owner = weakref.ref(self)
            self._rebuild()

    def remove(self, gpa: int, size: int, uva: int | None = None) -> MemoryRegion:
        """Detach and return the region exactly matching (gpa, size[, uva]);
        the caller closes it."""
        with self._lock:
            for r in self._regions:
                if r.gpa == gpa and r.size == size and (uva is None or r.uva == uva):
                    self._remove_locked(r)
                    return r
        uva_s = "" if uva is None else f" uva={uva:#x}"
        raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x}{uva_s} to remove")

    def _remove_locked(self, region: MemoryRegion) -> None:
        self._regions.remove(region)
        region._owner = None
        self._rebuild()

    def _detach(self, region: MemoryRegion) -> None:
        with self._lock:
            if region in self._regions:
                self._remove_locked(region)

    # -- translation ------------------------------------------------------------------------
    def translate(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest range [gpa, gpa+length), which must lie
        inside one region (a zero length needs gpa inside a region)."""
        _u64("gpa", gpa)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0 or length >= U64:
            raise GuestMemoryError(f"invalid length {length!r} at gpa={gpa:#x}")
        return self._table.view(gpa, length)

    def host_address(self, gpa: int, length: int) -> int:
        """Host virtual address of guest range [gpa, gpa+length) (checked).
        Valid only while the memory table is unchanged."""
        _u64("gpa", gpa)
        _u64("length", length)
        return self._table.host_address(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.translate(gpa, length))

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        self.translate(gpa, data.nbytes)[:] = data

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """GPA of frontend user-virtual range [uva, uva+length) (vring
        addresses in VHOST_USER_SET_VRING_ADDR). Regions with uva 0 are not
        translatable. The range must lie inside one region."""
        _u64("uva", uva)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0 or length >= U64:
            raise GuestMemoryError(f"invalid length {length!r} at uva={uva:#x}")
        for r in self._regions:
            if r.uva and r.uva <= uva < r.uva + r.size and uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"user-virtual range uva={uva:#x} length={length:#x} is not inside one region")

    def region_of(self, gpa: int) -> MemoryRegion:
        for r in self._regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        raise GuestMemoryError(f"gpa={gpa:#x} is not inside any region")

    def regions(self) -> list[MemoryRegion]:
        return list(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every region (idempotent). The memory can't be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions, self._regions = self._regions, []
            for r in regions:
                r._owner = None
            self._rebuild()
            self._table.invalidate()        # users of a closed memory get "closed", not "not inside"
        for r in regions:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GuestMemory({len(self._regions)} regions, generation={self.generation})"
