"""A hostile driver: hand-crafted rings (struct.pack_into) must give VirtqueueError naming
the bad value, never a crash, a hang or an access outside guest memory."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.constants import split_ring_layout
from virtio.memory import GuestMemory, MemoryRegion
from virtio.split import DeviceQueue, DriverQueue, VirtqueueError

SIZE = 8
MEM = 0x10000                      # one 64 KiB region at GPA 0
DESC, AVAIL, USED, _ = split_ring_layout(SIZE, 0)
IND = 0x2000                       # indirect tables live here
BUF = 0x4000
NEXT, WRITE, INDIRECT = 1, 2, 4


class Ring:
    """Writes a split ring by hand into a bytearray-backed guest memory."""

    def __init__(self, extra_regions=()):
        self.buf = bytearray(MEM)
        self.mem = GuestMemory([MemoryRegion.from_buffer(self.buf, gpa=0), *extra_regions])
        self.avail_idx = 0

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC):
        struct.pack_into("<QIHH", self.buf, table + 16 * i, addr, length, flags, nxt)

    def publish(self, *heads):
        for h in heads:
            struct.pack_into("<H", self.buf, AVAIL + 4 + 2 * (self.avail_idx % SIZE), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, AVAIL + 2, self.avail_idx)

    def queue(self, **kw):
        kw.setdefault("indirect", True)
        return DeviceQueue(5, SIZE, DESC, AVAIL, USED, **kw)

    def expect(self, match, **kw):
        q = self.queue(**kw)
        with pytest.raises(VirtqueueError, match=match) as ei:
            q.pop(self.mem)
        assert q.last_avail_idx == 0            # the bad chain is not consumed
        assert (q.errors, q.popped) == (1, 0)    # counted
        assert str(ei.value).startswith("queue 5: ")
        return q


def test_avail_idx_too_far_ahead():
    r = Ring()
    struct.pack_into("<H", r.buf, AVAIL + 2, SIZE + 1)
    r.expect(r"avail idx 9 is 9 entries ahead of last_avail_idx 0")
    q = DeviceQueue(5, SIZE, DESC, AVAIL, USED, last_avail_idx=0xFFFE)
    struct.pack_into("<H", r.buf, AVAIL + 2, 7)      # 9 ahead across the wrap
    with pytest.raises(VirtqueueError, match="avail idx 7 is 9 entries ahead of last_avail_idx 65534"):
        q.pop(r.mem)
    struct.pack_into("<H", r.buf, AVAIL + 2, 6)      # exactly `size` ahead is fine
    r.desc(0, BUF, 4)
    assert q.pop(r.mem).head == 0


def test_head_out_of_range():
    r = Ring()
    r.publish(SIZE)
    r.expect(r"avail ring head index 8 >= queue size 8")


def test_next_out_of_range():
    r = Ring()
    r.desc(0, BUF, 4, NEXT, 9)
    r.publish(0)
    r.expect(r"chain head 0: descriptor 0 of the descriptor table has next index 9 >= 8")


def test_loop():
    r = Ring()
    r.desc(2, BUF, 4, NEXT, 3)
    r.desc(3, BUF, 4, NEXT, 2)
    r.publish(2)
    r.expect(r"chain head 2: descriptor loop \(more than 8 descriptors")


def test_self_loop_in_indirect_table():
    r = Ring()
    r.desc(0, IND, 16 * 4, INDIRECT)
    r.desc(0, BUF, 4, NEXT, 0, table=IND)      # entry 0 links to itself
    r.publish(0)
    r.expect(r"chain head 0: descriptor loop \(more than 4 descriptors visited in the indirect table")


def test_chain_longer_than_max_chain_len():
    r = Ring()
    for i in range(3):
        r.desc(i, BUF + 16 * i, 16, NEXT if i < 2 else 0, i + 1)
    r.publish(0)
    r.expect(r"chain head 0: chain longer than the maximum of 2 descriptors", max_chain_len=2)
    assert len(r.queue(max_chain_len=3).pop(r.mem)) == 3


def test_indirect_not_negotiated():
    r = Ring()
    r.desc(0, IND, 32, INDIRECT)
    r.publish(0)
    r.expect(r"descriptor 0 is INDIRECT but VIRTIO_F_RING_INDIRECT_DESC is not negotiated", indirect=False)


@pytest.mark.parametrize("length", [0, 24, 17])
def test_indirect_bad_len(length):
    r = Ring()
    r.desc(0, IND, length, INDIRECT)
    r.publish(0)
    r.expect(rf"indirect descriptor 0 has len {length}, not a nonzero multiple of 16")


def test_indirect_too_large():
    r = Ring()
    r.desc(0, IND, 16 * (SIZE + 1), INDIRECT)
    r.publish(0)
    r.expect(r"indirect descriptor 0 len 144 exceeds the maximum of 8 entries \(128 bytes\)")
    q = DeviceQueue(0, 1, DESC, AVAIL, 0x200, indirect=True, max_chain_len=32768)
    r.desc(0, IND, 16 * 32769 & 0xFFFFFFFF, INDIRECT)
    with pytest.raises(VirtqueueError, match="len 524304 exceeds the maximum of 32768 entries"):
        q.pop(r.mem)


def test_nested_indirect_and_next_with_indirect():
    r = Ring()
    r.desc(0, IND, 32, INDIRECT)
    r.desc(0, BUF, 4, NEXT, 1, table=IND)
    r.desc(1, IND + 0x100, 16, INDIRECT, table=IND)
    r.publish(0)
    r.expect(r"nested INDIRECT descriptor 1 inside an indirect table")
    r2 = Ring()
    r2.desc(0, IND, 32, INDIRECT | NEXT, 1)
    r2.publish(0)
    r2.expect(r"descriptor 0 has both INDIRECT and NEXT flags")


@pytest.mark.parametrize("addr", [MEM - 16, MEM, 1 << 40, (1 << 64) - 16])
def test_indirect_table_outside_memory(addr):
    r = Ring()
    r.desc(0, addr, 32, INDIRECT)
    r.publish(0)
    r.expect(rf"indirect table of descriptor 0 at addr {addr:#x} len 32 is not inside guest memory")


@pytest.mark.parametrize("addr, length", [(MEM - 4, 8), (MEM, 1), ((1 << 64) - 1, 2), (0, 0xFFFFFFFF)])
def test_buffer_outside_memory(addr, length):
    r = Ring()
    r.desc(0, BUF, 4, NEXT, 1)
    r.desc(1, addr, length)
    r.publish(0)
    r.expect(rf"descriptor 1 of the descriptor table buffer addr {addr:#x} len {length} is not inside")


def test_buffer_straddling_two_regions():
    r = Ring([MemoryRegion.from_buffer(bytearray(MEM), gpa=MEM)])      # adjacent region
    r.desc(0, MEM - 8, 16)
    r.publish(0)
    r.expect(rf"buffer addr {MEM - 8:#x} len 16 is not inside one guest memory region")
    r.desc(0, MEM - 8, 8)            # each side on its own is fine
    r.desc(1, MEM, 8, WRITE)
    r.desc(0, MEM - 8, 8, NEXT, 1)
    ch = r.queue().pop(r.mem)
    assert ch.readable_len == 8 and ch.writable_len == 8


def test_readable_after_writable():
    r = Ring()
    r.desc(0, BUF, 4, WRITE | NEXT, 1)
    r.desc(1, BUF, 4, 0)
    r.publish(0)
    r.expect(r"chain head 0: device-readable descriptor 1 of the descriptor table follows a writable one")
    r2 = Ring()
    r2.desc(0, IND, 32, INDIRECT)
    r2.desc(0, BUF, 4, WRITE | NEXT, 1, table=IND)
    r2.desc(1, BUF, 4, 0, table=IND)
    r2.publish(0)
    r2.expect(r"device-readable descriptor 1 of the indirect table follows a writable one")


def test_zero_length_descriptors_allowed_anywhere():
    r = Ring()
    r.desc(0, 1 << 50, 0, NEXT, 1)        # zero-length, outside memory: nothing to access
    r.desc(1, BUF, 0, NEXT | WRITE, 2)
    r.desc(2, BUF, 4, WRITE)
    r.publish(0)
    ch = r.queue().pop(r.mem)
    assert ch.readable_len == 0 and ch.writable_len == 4
    assert [bytes(v) for v in ch.readable] == [b""] and [len(v) for v in ch.writable] == [0, 4]
    assert ch.read() == b"" and ch.write(b"abcd") == 4 and bytes(r.buf[BUF:BUF + 4]) == b"abcd"


def test_indirect_mixed_with_direct_prefix():
    r = Ring()
    r.desc(0, BUF, 4, NEXT, 1)
    r.desc(1, IND, 32, INDIRECT)          # last descriptor of the chain refers to a table
    r.desc(0, BUF + 4, 4, NEXT, 1, table=IND)
    r.desc(1, BUF + 8, 4, WRITE, table=IND)
    r.publish(0)
    ch = r.queue().pop(r.mem)
    assert ch.descriptors == [(BUF, 4, NEXT), (BUF + 4, 4, NEXT), (BUF + 8, 4, WRITE)]


def test_errors_in_pop_many_keep_good_chains():
    r = Ring()
    r.desc(0, BUF, 4)
    r.desc(1, BUF, 4, NEXT, 99)
    r.publish(0, 1, 0)
    q = r.queue()
    assert [c.head for c in q.pop_many(r.mem, 8)] == [0]
    with pytest.raises(VirtqueueError, match="next index 99"):
        q.pop_many(r.mem, 8)
    assert q.last_avail_idx == 1


def test_driver_rejects_bogus_used_ring():
    buf = bytearray(MEM)
    mem = GuestMemory([MemoryRegion.from_buffer(buf, gpa=0)])
    drv = DriverQueue(mem, 1, SIZE, 0)
    drv.add([(BUF, 4)], [], "t")
    struct.pack_into("<IIH", buf, USED + 4, 5, 0, 0)        # head 5 was never made available
    struct.pack_into("<H", buf, USED + 2, 1)
    with pytest.raises(VirtqueueError, match="queue 1: device returned head 5 which is not in flight"):
        drv.get_used()
    struct.pack_into("<H", buf, USED + 2, 20)
    with pytest.raises(VirtqueueError, match="used idx 20 is 20 entries ahead of last_used_idx 0"):
        drv.get_used()
    struct.pack_into("<IIH", buf, USED + 4, 0, 7, 0)
    struct.pack_into("<H", buf, USED + 2, 1)
    assert drv.get_used() == ("t", 7)


# ---- property: random descriptor tables never crash nor escape guest memory ----------------

desc_st = st.tuples(
    st.one_of(st.integers(0, MEM + 64), st.sampled_from([IND, BUF, MEM - 16, (1 << 64) - 8])),
    st.one_of(st.integers(0, 96), st.sampled_from([0xFFFFFFFF, 16 * SIZE, 16 * (SIZE + 1)])),
    st.integers(0, 7),
    st.integers(0, SIZE + 2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(desc_st, min_size=SIZE, max_size=SIZE),
       ind=st.lists(desc_st, min_size=SIZE, max_size=SIZE),
       heads=st.lists(st.integers(0, SIZE + 1), min_size=1, max_size=SIZE),
       avail_idx=st.integers(0, 0xFFFF),
       indirect=st.booleans())
def test_random_rings_never_escape(descs, ind, heads, avail_idx, indirect):
    r = Ring([MemoryRegion.from_buffer(bytearray(0x1000), gpa=MEM)])   # an adjacent region
    for i, (a, n, f, nx) in enumerate(descs):
        r.desc(i, a, n, f, nx)
    for i, (a, n, f, nx) in enumerate(ind):
        r.desc(i, a, n, f, nx, table=IND)
    r.publish(*heads)
    if avail_idx % 3 == 0:
        struct.pack_into("<H", r.buf, AVAIL + 2, avail_idx)
    q = r.queue(indirect=indirect)
    for _ in range(SIZE + 2):
        try:
            chains = q.pop_many(r.mem, SIZE)
        except VirtqueueError:
            break
        if not chains:
            break
        for ch in chains:
            assert len(ch) <= SIZE
            for gpa, n, flags in ch.descriptors:
                if n:
                    r.mem.translate(gpa, n)          # inside one region, or this raises
            bits = [bool(f & WRITE) for _, _, f in ch.descriptors]
            assert bits == sorted(bits)              # readable ones first
            assert ch.read() == b"".join(bytes(v) for v in ch.readable)
            ch.write(b"\xEE" * ch.writable_len)
            q.push(r.mem, ch, ch.writable_len)
