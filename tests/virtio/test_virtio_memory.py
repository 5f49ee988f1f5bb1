"""Guest memory: regions over real memfd mappings, the region table, lifetimes."""
import gc
import os
import warnings

import numpy as np
import pytest

from virtio.memory import (
    HUGEPAGE_SIZE, GuestMemory, GuestMemoryError, MemoryRegion, deferred_unmaps, free_hugepages,
    live_mappings, proc_maps_count,
)

MB = 1 << 20
NAME = "vrdma-test-mem"


@pytest.fixture
def baseline():
    gc.collect()
    base = (live_mappings(), proc_maps_count(f"memfd:{NAME}"), deferred_unmaps())
    yield base
    gc.collect()
    assert (live_mappings(), proc_maps_count(f"memfd:{NAME}"), deferred_unmaps()) == base


def test_memfd_shared_between_two_mappings(baseline):
    with MemoryRegion.memfd(MB, gpa=0x10000, name=NAME, hugetlb=False) as a:
        assert a.fd is not None and a.uva == a.address and not a.hugetlb
        # the backend side: map the same fd again, at another GPA view of the same pages
        with MemoryRegion.from_fd(a.fd, gpa=0x10000, size=MB, uva=a.uva) as b:
            assert b.fd is None and b.address != a.address
            assert proc_maps_count(f"memfd:{NAME}") == baseline[1] + 2
            a.view[100:105] = b"hello"
            assert bytes(b.view[100:105]) == b"hello"
            b.view[MB - 1] = 0x5A
            assert a.view[MB - 1] == 0x5A
    assert a.fd is None and a.closed and b.closed


def test_from_fd_mmap_offset_and_fd_not_owned(baseline):
    with MemoryRegion.memfd(3 * 4096, gpa=0, name=NAME, hugetlb=False) as a:
        a.view[4096 + 7] = 42
        fd = os.dup(a.fd)
        try:
            r = MemoryRegion.from_fd(fd, gpa=0x1000_0000, size=4096, mmap_offset=4096 + 7)
            assert r.view[0] == 42 and r.size == 4096 and r.mmap_offset == 4096 + 7
            r.close()
            os.fstat(fd)            # still open: from_fd does not own it
        finally:
            os.close(fd)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(gpa=0, size=0), "size=0"),
    (dict(gpa=(1 << 64) - 4096, size=8192), "overflows the 64-bit GPA"),
    (dict(gpa=0, size=8192, uva=(1 << 64) - 4096), "overflows the 64-bit VA"),
    (dict(gpa=-1, size=4096), "gpa=-1"),
    (dict(gpa=0, size=4096, mmap_offset=-5), "mmap_offset=-5"),
    (dict(gpa=0, size=1 << 20), "needs mmap_offset+size=0x100000"),      # file is only 64 KiB
    (dict(gpa=0, size=4096, mmap_offset=64 * 1024), "needs mmap_offset+size=0x11000"),
])
def test_from_fd_rejects_bad_geometry(baseline, kwargs, needle):
    with MemoryRegion.memfd(64 * 1024, gpa=0, name=NAME, hugetlb=False) as a:
        with pytest.raises(GuestMemoryError, match=needle.replace("+", r"\+")):
            MemoryRegion.from_fd(a.fd, **kwargs)


def test_from_fd_bad_fd():
    with pytest.raises(GuestMemoryError, match="invalid fd -1"):
        MemoryRegion.from_fd(-1, gpa=0, size=4096)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(GuestMemoryError, match=f"invalid fd {r}"):
        MemoryRegion.from_fd(r, gpa=0, size=4096)
    r, w = os.pipe()          # a pipe cannot be mmap()ed: typed error, not OSError
    try:
        with pytest.raises(GuestMemoryError, match=f"cannot mmap fd {r}"):
            MemoryRegion.from_fd(r, gpa=0, size=4096)
    finally:
        os.close(r)
        os.close(w)


def test_hugetlb_auto_falls_back_and_true_is_strict(baseline):
    with MemoryRegion.memfd(HUGEPAGE_SIZE, gpa=0, name=NAME) as r:        # "auto"
        assert r.hugetlb == (free_hugepages() > 0)
        r.view[0] = 1
    with pytest.raises(GuestMemoryError, match="not a multiple of 2 MiB"):
        MemoryRegion.memfd(4096, gpa=0, name=NAME, hugetlb=True)
    with pytest.raises(GuestMemoryError, match="hugetlb must be"):
        MemoryRegion.memfd(4096, gpa=0, name=NAME, hugetlb="yes")
    if free_hugepages() == 0:
        with pytest.raises(GuestMemoryError, match="hugetlb=True"):
            MemoryRegion.memfd(HUGEPAGE_SIZE, gpa=0, name=NAME, hugetlb=True)
    else:
        with MemoryRegion.memfd(HUGEPAGE_SIZE, gpa=0, name=NAME, hugetlb=True) as r:
            assert r.hugetlb


def test_from_buffer_variants():
    arr = np.zeros(4096, dtype=np.uint32)
    r = MemoryRegion.from_buffer(arr, gpa=0x1000)
    assert r.size == 16384 and r.address == arr.ctypes.data
    r.view[0] = 7
    assert arr[0] == 7
    with pytest.raises(GuestMemoryError, match="read-only"):
        MemoryRegion.from_buffer(b"abc", gpa=0)
    with pytest.raises(GuestMemoryError, match="not a writable contiguous"):
        MemoryRegion.from_buffer(arr[::2], gpa=0)
    with pytest.raises(GuestMemoryError, match="empty"):
        MemoryRegion.from_buffer(bytearray(), gpa=0)
    with pytest.raises(GuestMemoryError, match="not a writable contiguous"):
        MemoryRegion.from_buffer(12, gpa=0)


def test_overlap_and_limits():
    mem = GuestMemory([MemoryRegion.from_buffer(bytearray(0x1000), gpa=0x1000, uva=0x7000_0000)])
    gen = mem.generation
    for gpa, uva, what in [(0x1800, 0, "guest-physical"), (0x0800, 0, "guest-physical"),
                           (0x4000, 0x7000_0800, "user-virtual"), (0x4000, 0x6FFF_F800, "user-virtual")]:
        bad = MemoryRegion.from_buffer(bytearray(0x1000), gpa=gpa, uva=uva)
        with pytest.raises(GuestMemoryError, match=f"overlaps .* in {what} space"):
            mem.add(bad)
        assert not bad.closed and bad.view[0] == 0      # untouched, still the caller's
        assert mem.generation == gen
    # adjacency is fine, and uva 0 means "unknown" (not checked)
    mem.add(MemoryRegion.from_buffer(bytearray(0x1000), gpa=0x2000, uva=0))
    mem.add(MemoryRegion.from_buffer(bytearray(0x1000), gpa=0x0, uva=0))
    assert [r.gpa for r in mem.regions()] == [0, 0x1000, 0x2000]
    assert mem.generation == gen + 2
    other = GuestMemory()
    with pytest.raises(GuestMemoryError, match="already belongs"):
        other.add(mem.regions()[0])
    mem.close()
    mem.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.add(MemoryRegion.from_buffer(bytearray(16), gpa=0))


def test_max_regions():
    mem = GuestMemory()
    backing = bytearray(GuestMemory.MAX_REGIONS * 16 + 16)
    for i in range(GuestMemory.MAX_REGIONS):
        mem.add(MemoryRegion.from_buffer(memoryview(backing)[16 * i:16 * i + 16], gpa=16 * i))
    extra = MemoryRegion.from_buffer(bytearray(16), gpa=1 << 40)
    with pytest.raises(GuestMemoryError, match="max 509"):
        mem.add(extra)
    assert not extra.closed
    # the C table finds every one of them (binary search over 509 entries)
    for i in (0, 1, 254, 508):
        mem.translate(16 * i + 3, 13)[0] = i & 0xFF
        assert backing[16 * i + 3] == i & 0xFF
    with pytest.raises(GuestMemoryError):
        mem.translate(16 * 5 + 8, 9)        # straddles two adjacent regions
    mem.close()


def test_translate_bounds():
    a, b = bytearray(0x1000), bytearray(0x1000)
    mem = GuestMemory([MemoryRegion.from_buffer(a, gpa=0x10000), MemoryRegion.from_buffer(b, gpa=0x11000)])
    v = mem.translate(0x10ff0, 16)
    v[:] = b"x" * 16
    assert a[-16:] == b"x" * 16 and len(v) == 16
    assert len(mem.translate(0x10000, 0x1000)) == 0x1000
    assert len(mem.translate(0x11fff, 0)) == 0            # zero length inside a region
    for gpa, n in [(0x10ff0, 17), (0xffff, 1), (0x12000, 0), (0x12000, 1), (0, 0), ((1 << 64) - 1, 1),
                   (0x10000, 0x2000)]:
        with pytest.raises(GuestMemoryError, match=f"gpa={gpa:#x} length={n:#x}"):
            mem.translate(gpa, n)
    for gpa, n in [(-1, 1), (1 << 64, 0), ("0", 1), (0x10000, -1), (0x10000, 1 << 64), (0x10000, 1.0)]:
        with pytest.raises(GuestMemoryError):
            mem.translate(gpa, n)
    mem.write(0x11000, b"abc")
    assert mem.read(0x11000, 3) == b"abc" == bytes(b[:3])
    assert mem.host_address(0x11001, 2) == mem.regions()[1].address + 1
    assert mem.region_of(0x11005) is mem.regions()[1]
    with pytest.raises(GuestMemoryError, match="gpa=0x9"):
        mem.region_of(9)


def test_uva_to_gpa():
    mem = GuestMemory([MemoryRegion.from_buffer(bytearray(0x1000), gpa=0x10000, uva=0x7f00_0000_0000),
                       MemoryRegion.from_buffer(bytearray(0x1000), gpa=0x20000, uva=0)])
    assert mem.uva_to_gpa(0x7f00_0000_0010, 0x100) == 0x10010
    assert mem.uva_to_gpa(0x7f00_0000_0fff, 1) == 0x10fff
    for uva, n in [(0x7f00_0000_0fff, 2), (0x7eff_ffff_ffff, 1), (0x10, 1)]:
        with pytest.raises(GuestMemoryError, match=f"uva={uva:#x}"):
            mem.uva_to_gpa(uva, n)


def test_remove_and_generation(baseline):
    mem = GuestMemory()
    r = MemoryRegion.memfd(MB, gpa=0, name=NAME, hugetlb=False)
    mem.add(r)
    g = mem.generation
    table = mem.table
    with pytest.raises(GuestMemoryError, match="no region gpa=0x0 size=0x1000"):
        mem.remove(0, 0x1000)
    with pytest.raises(GuestMemoryError, match="uva=0x1"):
        mem.remove(0, MB, uva=1)
    assert mem.remove(0, MB, uva=r.uva) is r
    assert mem.generation == g + 1 and not table.valid and mem.table is not table
    with pytest.raises(GuestMemoryError):
        mem.translate(0, 1)
    assert not r.closed
    mem.add(r)                                  # back in: ownership moved again
    r.close()                                   # closing a member detaches it first
    assert len(mem) == 0
    with pytest.raises(GuestMemoryError):
        mem.translate(0, 1)
    with pytest.raises(GuestMemoryError, match="is closed"):
        mem.add(r)
    mem.close()


def test_every_mapping_released(baseline):
    base_live, base_maps, _ = baseline
    regions = [MemoryRegion.memfd(64 * 1024, gpa=i << 20, name=NAME, hugetlb=False) for i in range(5)]
    mem = GuestMemory(regions)
    peers = [MemoryRegion.from_fd(r.fd, gpa=r.gpa, size=r.size) for r in regions]
    assert live_mappings() == base_live + 10
    assert proc_maps_count(f"memfd:{NAME}") == base_maps + 10
    views = [mem.translate(r.gpa, 16) for r in regions]
    del views
    mem.close()
    for p in peers:
        p.close()
    assert live_mappings() == base_live
    assert proc_maps_count(f"memfd:{NAME}") == base_maps
    assert all(r.fd is None for r in regions)


def test_close_with_view_held_defers_unmap(baseline):
    base_live, base_maps, base_deferred = baseline
    mem = GuestMemory([MemoryRegion.memfd(MB, gpa=0, name=NAME, hugetlb=False)])
    held = mem.translate(0x100, 8)
    arr = np.frombuffer(mem.translate(0x200, 8), dtype=np.uint8)    # an export of a view
    with pytest.warns(ResourceWarning, match="unmapping deferred"):
        mem.close()
    assert deferred_unmaps() == base_deferred + 1
    assert live_mappings() == base_live + 1               # still mapped: views point into it
    held[:] = b"stillok!"                                  # no use-after-unmap
    arr[0] = 1
    assert bytes(held) == b"stillok!"
    del held
    assert live_mappings() == base_live + 1
    del arr
    gc.collect()
    assert live_mappings() == base_live and deferred_unmaps() == base_deferred
    assert proc_maps_count(f"memfd:{NAME}") == base_maps


def test_region_view_after_close_raises():
    r = MemoryRegion.from_buffer(bytearray(64), gpa=0)
    r.close()
    r.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        r.view
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with MemoryRegion.from_buffer(bytearray(64), gpa=0) as r2:
            pass
    assert r2.closed
