"""Tier 1 of the virtio-pci driver (guest_lib.transports): its pure parts on
byte strings (the virtio capability walker, sysfs resource lines, pagemap
entries, runs of adjacent huge pages, the run allocator), and its huge-page
memory on this host when it has huge pages. The driver itself needs a PCI
function: qemu_tests/test_pci_guest.py runs it in a QEMU guest."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_lib.transports.hugemem import (
    HUGEPAGE,
    PM_PRESENT,
    PM_SWAPPED,
    HugeMemory,
    HugeMemoryError,
    RunAllocator,
    contiguous_runs,
    page_list,
    pagemap_pfns,
)
from guest_lib.transports.pci import (
    CAP_COMMON,
    CAP_DEVICE,
    CAP_ISR,
    CAP_NOTIFY,
    PciError,
    VirtioCap,
    parse_resources,
    virtio_caps,
)
from guest_lib.transports.virtio_pci import _is_rdma
from virtio.memory import free_hugepages
from virtio_rdma import wire

_CFG = dict(device_features=0xF, phys_port_cnt=1, max_qp=2, max_cq=3, max_mr=4, max_pd=5, max_qp_wr=6,
            max_cqe=7, max_sge=8, max_inline_data=9, node_guid=10)


def _vcap(cfg_type, bar, offset, length, nxt, mult=None):
    body = struct.pack("<BBBBBBxxII", 0x09, nxt, 20 if mult is not None else 16, cfg_type, bar, 0, offset, length)
    return body + (struct.pack("<I", mult) if mult is not None else b"")


def config_space(caps: list[bytes], at: int = 0x40, status: int = 0x10) -> bytearray:
    """A 256-byte config space with ``caps`` chained from ``at``, 0x20 apart."""
    cfg = bytearray(256)
    cfg[0:4] = struct.pack("<HH", 0x1AF4, 0x1042)
    cfg[6:8] = struct.pack("<H", status)
    cfg[0x34] = at if caps else 0
    for i, c in enumerate(caps):
        off = at + 0x20 * i
        c = bytearray(c)
        c[1] = off + 0x20 if i + 1 < len(caps) else 0
        cfg[off:off + len(c)] = c
    return cfg


# QEMU's modern virtio-pci layout: MSI-X cap first, then the four in BAR 4
QEMU_CAPS = [bytes([0x11, 0, 0x0B, 0x80]) + bytes(8),
             _vcap(CAP_COMMON, 4, 0x0000, 0x38, 0), _vcap(CAP_ISR, 4, 0x1000, 0x1, 0),
             _vcap(CAP_DEVICE, 4, 0x2000, 0x39, 0), _vcap(CAP_NOTIFY, 4, 0x3000, 0x1000, 0, mult=4)]


def test_walker_finds_the_four_structures():
    caps = virtio_caps(bytes(config_space(QEMU_CAPS)))
    assert caps == {CAP_COMMON: VirtioCap(1, 4, 0, 0x38), CAP_ISR: VirtioCap(3, 4, 0x1000, 1),
                    CAP_DEVICE: VirtioCap(4, 4, 0x2000, 0x39), CAP_NOTIFY: VirtioCap(2, 4, 0x3000, 0x1000, 4)}


def test_walker_keeps_the_first_of_a_type_and_skips_unknown_bars():
    extra = [_vcap(CAP_COMMON, 9, 0x5000, 0x38, 0), _vcap(CAP_COMMON, 2, 0x100, 0x38, 0)]
    caps = virtio_caps(bytes(config_space(extra + QEMU_CAPS[1:])))
    assert caps[CAP_COMMON] == VirtioCap(1, 2, 0x100, 0x38)


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.__setitem__(6, 0), "no capability list"),
    (lambda c: c.__setitem__(0x34, 0x20), "pointer 0x20 is outside"),
    (lambda c: c.__setitem__(0x41, 0x40), "longer than 48"),          # a loop
    (lambda c: c.__setitem__(0x62, 8), "cap_len 8 < 16"),
    (lambda c: c.__setitem__(0xC2, 16), "cap_len 16 < 20"),           # notify without its multiplier
    (lambda c: c.__setitem__(0xA3, 7), "no device capability"),
    (lambda c: c[0x6C:0x70].__len__() and c.__setitem__(slice(0x6C, 0x70), struct.pack("<I", 8)),
     "common configuration of 8 bytes"),
])
def test_walker_refuses_forged_lists(mutate, msg):
    cfg = config_space(QEMU_CAPS)
    mutate(cfg)
    with pytest.raises(PciError, match=msg):
        virtio_caps(bytes(cfg))


def test_walker_on_short_config():
    with pytest.raises(PciError, match="shorter than the 64-byte header"):
        virtio_caps(bytes(63))
    cfg = config_space(QEMU_CAPS)
    with pytest.raises(PciError, match="outside config space"):
        virtio_caps(bytes(cfg[:0x50]))  # the list runs off a 0x50-byte read


@given(st.binary(min_size=64, max_size=256))
def test_walker_never_crashes(data):
    try:
        caps = virtio_caps(data)
    except PciError:
        return
    assert set(caps) == {CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE}


def test_resources():
    text = ("0x00000000fe000000 0x00000000fe003fff 0x0000000000040200\n"
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
            "0x000000000000c000 0x000000000000c03f 0x0000000000040101\n")
    assert parse_resources(text) == [(0xFE000000, 0x4000, 0x40200), (0, 0, 0), (0xC000, 0x40, 0x40101)]
    with pytest.raises(PciError, match="not 'start end flags'"):
        parse_resources("0x0 0x1\n")


def test_pagemap_entries():
    entries = [PM_PRESENT | 0x12345, 0, PM_PRESENT | PM_SWAPPED | 7, PM_PRESENT]  # hidden PFN reads 0
    assert pagemap_pfns(struct.pack("<4Q", *entries)) == [0x12345, None, None, None]
    with pytest.raises(HugeMemoryError, match="not a whole number"):
        pagemap_pfns(b"1234")


def test_contiguous_runs():
    H = HUGEPAGE
    assert contiguous_runs([10 * H, 11 * H, 12 * H, 4 * H, 5 * H, 20 * H]) == [
        (0, 3, 10 * H), (3, 2, 4 * H), (5, 1, 20 * H)]
    assert contiguous_runs([3 * H, 2 * H]) == [(0, 1, 3 * H), (1, 1, 2 * H)]  # descending: two runs
    with pytest.raises(HugeMemoryError, match="not 0x200000-aligned"):
        contiguous_runs([H + 4096])


def test_page_list_of_fake_page_tables():
    """Chunks of a virtually contiguous range over runs of physical pages: one
    per run touched, cut at the range's ends."""
    H = HUGEPAGE
    base = 0x7F00_0000_0000
    runs = contiguous_runs([10 * H, 11 * H, 4 * H, 20 * H, 21 * H])  # 3 runs: 2, 1, 2 pages
    assert page_list(runs, base, base, 5 * H) == [(10 * H, 2 * H), (4 * H, H), (20 * H, 2 * H)]
    assert page_list(runs, base, base + 4096, 8192) == [(10 * H + 4096, 8192)]  # inside one run
    # across the first boundary: the tail of run 0, the head of run 1
    assert page_list(runs, base, base + 2 * H - 100, 300) == [(11 * H + H - 100, 100), (4 * H, 200)]
    assert page_list(runs, base, base + 3 * H - 1, H + 2) == [(5 * H - 1, 1), (20 * H, H + 1)]
    for bad in ((base - 1, 10), (base + 5 * H - 4, 8)):
        with pytest.raises(HugeMemoryError, match="outside the mapping"):
            page_list(runs, base, *bad)
    with pytest.raises(HugeMemoryError, match="must be positive"):
        page_list(runs, base, base, 0)


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(0, 80 * 4096), st.integers(1, 80 * 4096))
def test_page_list_covers_the_range_exactly(adjacent, start, length):
    """For any page table, the chunks add up to the range, in order, each
    inside one run, and byte i of the range is at the device address that
    the page table gives."""
    P = 4096
    phys, p = [], 100 * P
    for adj in adjacent:
        p = p + P if adj else p + 7 * P
        phys.append(p)
    runs = contiguous_runs(phys, P)
    mapped = len(phys) * P
    if start + length > mapped:
        with pytest.raises(HugeMemoryError):
            page_list(runs, 0, start, length, P)
        return
    chunks = page_list(runs, 0, start, length, P)
    assert sum(n for _, n in chunks) == length and len(chunks) <= len(runs)
    off = start
    for g, n in chunks:
        for i in (0, n - 1):  # first and last byte of each chunk
            assert g + i == phys[(off + i) // P] + (off + i) % P
        off += n


def test_run_allocator_inside_windows():
    """alloc(within=...) keeps a block inside one window (a run); without
    it a block may span them (an MR's buffer)."""
    a = RunAllocator(0, 0x6000)
    runs = [(0, 0x2000), (0x2000, 0x4000), (0x4000, 0x6000)]
    x = a.alloc(0x1000, 0x1000, runs)
    with pytest.raises(MemoryError):
        a.alloc(0x3000, 0x1000, runs)  # longer than any window
    y = a.alloc(0x3000, 0x1000)  # spans windows
    assert (x, y) == (0, 0x1000)
    assert a.alloc(0x1800, 0x800, runs) == 0x4000  # 0x1000..0x4000 used: the next window with room
    assert a.free_bytes == 0x6000 - 0x1000 - 0x3000 - 0x1800
    for b in (x, y, 0x4000):
        a.free(b)
    assert a.free_bytes == 0x6000


def test_run_allocator():
    a = RunAllocator(0x1000, 0x5000)
    x = a.alloc(0x1000, 0x1000)
    y = a.alloc(0x800, 64)
    assert (x, y) == (0x1000, 0x2000)
    with pytest.raises(MemoryError):
        a.alloc(0x3000, 0x1000)
    a.free(x)
    a.free(y)
    assert a.alloc(0x4000, 0x1000) == 0x1000  # coalesced again
    with pytest.raises(ValueError):
        a.alloc(0, 8)


def test_device_identified_by_config_magic_not_pci_id():
    raw = wire.encode_config(**_CFG)
    assert _is_rdma(raw[:8])
    blk = struct.pack("<QII", 2048, 0, 126)  # a virtio-blk config: capacity first
    assert not _is_rdma(blk[:8])
    assert not _is_rdma(raw[:4] + b"\x02\x00" + raw[6:8])  # another ABI version


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows PFNs to root only")
def test_huge_memory_on_this_host():
    if free_hugepages() < 2:
        pytest.skip("this host has fewer than 2 free 2 MiB huge pages")
    with open("/proc/self/maps") as f:
        maps_before = f.read().count("vrdma-pci")
    m = HugeMemory(3 << 20)  # rounded up to 2 pages
    try:
        assert m.size == 4 << 20 and sum(n for _, n, _ in m.runs) == 2
        gpa = m.alloc(8192, 4096)
        uva = m.uva_of(gpa)
        m.mem.translate(gpa, 5)[:] = b"hello"
        assert m.mem.uva_to_gpa(uva, 5) == gpa and bytes(m.mem.translate(gpa, 5)) == b"hello"
        with pytest.raises(MemoryError, match="longest run of adjacent huge pages"):
            m.alloc(m.largest_run + 4096, 4096)
        # an MR buffer: contiguous virtually, a page list of the runs it spans
        buf, view, chunks = m.alloc_mr(m.size - 8192)
        assert buf == uva + 8192 and len(view) == m.size - 8192
        assert chunks == page_list(m.runs, m.uva, buf, m.size - 8192)
        assert sum(n for _, n in chunks) == len(view)
        view[-5:] = b"world"
        last_gpa, last_n = chunks[-1]
        assert bytes(m.mem.translate(last_gpa + last_n - 5, 5)) == b"world"  # by device address
        with pytest.raises(MemoryError, match="no 8192-byte range of free huge pages for the MR"):
            m.alloc_mr(8192)
        view.release()
        m.free_mr(buf)
        with pytest.raises(ValueError, match="not an MR buffer"):
            m.free_mr(buf)
        m.free(gpa)
    finally:
        m.close()
    m.close()  # idempotent
    with open("/proc/self/maps") as f:
        assert f.read().count("vrdma-pci") == maps_before


def test_no_device_is_enodev(tmp_path):
    """Where there is no such function, the transport and Context say ENODEV
    (an address no machine has; an empty sysfs tree) and hold nothing."""
    import errno

    from guest_lib import Context, RDMAError
    from guest_lib.transports.virtio_pci import VirtioPciTransport

    with pytest.raises(RDMAError) as e:
        Context("pci:0000:ff:1f.7")
    assert e.value.errno == errno.ENODEV and "0000:ff:1f.7" in str(e.value)
    with pytest.raises(PciError, match="no free virtio function") as e2:
        VirtioPciTransport("auto", sysfs=str(tmp_path))
    assert e2.value.errno == errno.ENODEV
