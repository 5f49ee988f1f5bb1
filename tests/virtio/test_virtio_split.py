"""Split virtqueues: a real DriverQueue against a real DeviceQueue over shared guest memory."""
import pytest

from virtio.constants import (
    AvailFlags, DescFlags, Feature, FeatureBit, UsedFlags, split_ring_layout, vring_need_event,
)
from virtio.memory import GuestMemory, MemoryRegion
from virtio.split import (
    DescriptorChain, DeviceQueue, DriverQueue, QueueFullError, VirtqueueError, device_queue_for,
)

RING = 0x1000
DATA = 0x40000
RESP = 0x80000


@pytest.fixture
def mem():
    m = GuestMemory([MemoryRegion.memfd(1 << 20, gpa=0, name="vrdma-test-split", hugetlb=False)])
    yield m
    m.close()


def test_constants_and_layout():
    assert FeatureBit.VIRTIO_F_RING_INDIRECT_DESC == 28 and FeatureBit.VIRTIO_F_RING_EVENT_IDX == 29
    assert Feature.VERSION_1 == 1 << 32 and Feature.IN_ORDER == 1 << 35 and Feature.NOTIFY_ON_EMPTY == 1 << 24
    assert DescFlags.INDIRECT == 4 and AvailFlags.NO_INTERRUPT == 1 and UsedFlags.NO_NOTIFY == 1
    d, a, u, total = split_ring_layout(256, 0x10000)
    assert (d, a, u) == (0x10000, 0x11000, 0x11208) and total == 0x11208 + 6 + 8 * 256 - 0x10000
    assert u % 4 == 0 and a % 2 == 0
    d, a, u, total = split_ring_layout(1, 0)
    assert (a, u) == (16, 24)
    for bad in (0, 3, 65536, -1, 1.0, True):
        with pytest.raises(VirtqueueError, match="power of two"):
            split_ring_layout(bad, 0)
    with pytest.raises(VirtqueueError, match="0x8 is not a 16-aligned"):
        split_ring_layout(8, 8)
    assert vring_need_event(5, 6, 5) and not vring_need_event(5, 5, 4)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)          # window wraps


@pytest.mark.parametrize("n_out, n_in", [(1, 0), (0, 1), (1, 1), (2, 1), (3, 5), (8, 8), (16, 0)])
def test_chains_roundtrip(mem, n_out, n_in):
    drv = DriverQueue(mem, 0, 16, RING)
    dev = device_queue_for(drv)
    outs = [(DATA + 64 * i, 10 + i) for i in range(n_out)]
    ins = [(RESP + 64 * i, 20 + i) for i in range(n_in)]
    payload = b"".join(bytes([i]) * (10 + i) for i in range(n_out))
    mem.write(DATA, b"".join(bytes([i]) * (10 + i) + bytes(54 - i) for i in range(n_out)))
    head = drv.add(outs, ins, ("req", n_out, n_in))
    assert drv.num_free == 16 - n_out - n_in
    chain = dev.pop(mem)
    assert isinstance(chain, DescriptorChain) and chain.head == head and len(chain) == n_out + n_in
    assert chain.readable_len == sum(n for _, n in outs) and chain.writable_len == sum(n for _, n in ins)
    assert [(g, n) for g, n, _ in chain.descriptors] == outs + ins
    assert [f & 2 for _, _, f in chain.descriptors] == [0] * n_out + [2] * n_in
    assert chain.read() == payload and b"".join(bytes(v) for v in chain.readable) == payload
    assert chain.read(5) == payload[:5]
    buf = bytearray(7)
    assert chain.read_into(buf, 3) == min(7, max(0, len(payload) - 3))
    reply = bytes(range(256))[:chain.writable_len]
    assert chain.write(reply) == len(reply)
    assert [len(v) for v in chain.writable] == [n for _, n in ins]
    dev.push(mem, chain, len(reply))
    assert dev.pop(mem) is None
    token, written = drv.get_used()
    assert token == ("req", n_out, n_in) and written == len(reply)
    got = b"".join(mem.read(g, n) for g, n in ins)
    assert got == reply
    assert drv.num_free == 16 and drv.get_used() is None


def test_chain_write_bounds_and_staleness(mem):
    drv = DriverQueue(mem, 3, 4, RING)
    dev = device_queue_for(drv)
    drv.add([(DATA, 4)], [(RESP, 8), (RESP + 100, 8)], 1)
    ch = dev.pop(mem)
    assert ch.write(b"abcdefgh", 4) == 8
    assert mem.read(RESP + 4, 4) == b"abcd" and mem.read(RESP + 100, 4) == b"efgh"
    with pytest.raises(VirtqueueError, match=r"queue 3: chain head 0: writing 9 bytes at offset 8"):
        ch.write(b"x" * 9, 8)
    with pytest.raises(VirtqueueError, match="written length 17 exceeds its 16"):
        dev.push(mem, ch, 17)
    dev.push(mem, ch, 16)
    with pytest.raises(VirtqueueError, match="already pushed"):
        ch.read()
    with pytest.raises(VirtqueueError, match="pushed twice"):
        dev.push(mem, ch, 0)
    for bad in (4, -1, "0"):
        with pytest.raises(VirtqueueError, match="used head"):
            dev.push(mem, bad, 0)
    # memory table change makes outstanding chains stale
    drv.add([(DATA, 4)], [], 2)
    ch2 = dev.pop(mem)
    extra = MemoryRegion.from_buffer(bytearray(4096), gpa=1 << 30)
    mem.add(extra)
    with pytest.raises(VirtqueueError, match="stale"):
        ch2.read()
    dev.push(mem, ch2.head, 0)          # the queue re-maps its rings on the new table
    assert drv.get_used() == (1, 16) and drv.get_used() == (2, 0)


def test_indirect(mem):
    drv = DriverQueue(mem, 0, 8, RING, indirect=True)
    drv.add_indirect_area(0x20000, 8 * 64 * 16)          # 64 entries per head
    dev = device_queue_for(drv)
    assert dev.indirect
    outs = [(DATA + 16 * i, 16) for i in range(20)]
    ins = [(RESP + 16 * i, 16) for i in range(20)]
    mem.write(DATA, bytes(range(256)) + bytes(range(64)))
    drv.add(outs, ins, "big")
    assert drv.num_free == 7                              # one descriptor for 40 buffers
    dev_small = DeviceQueue(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, indirect=True)
    with pytest.raises(VirtqueueError, match="chain head 0: indirect descriptor 0 len 640 exceeds the maximum of 8"):
        dev_small.pop(mem)
    dev = DeviceQueue(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, indirect=True, max_chain_len=64)
    ch = dev.pop(mem)
    assert len(ch) == 40 and ch.read() == bytes(range(256)) + bytes(range(64))
    assert ch.descriptors[:2] == [(DATA, 16, 1), (DATA + 16, 16, 1)] and ch.descriptors[-1] == (RESP + 304, 16, 2)
    ch.write(b"z" * 320)
    dev.push(mem, ch, 320)
    assert drv.get_used() == ("big", 320) and drv.num_free == 8
    assert mem.read(RESP, 320) == b"z" * 320
    # single buffers and chains longer than a slot go direct
    drv.add([(DATA, 1)], [], "one")
    assert drv.num_free == 7
    with pytest.raises(VirtqueueError, match="not negotiated"):
        DriverQueue(mem, 1, 8, 0x30000).add_indirect_area(0x20000, 4096)


def test_ring_full_and_free_list(mem):
    drv = DriverQueue(mem, 0, 8, RING)
    dev = device_queue_for(drv)
    heads = [drv.add([(DATA, 1), (DATA, 1)], [], i) for i in range(4)]
    assert drv.num_free == 0 and len(set(heads)) == 4
    with pytest.raises(QueueFullError, match="need 1 descriptors, 0 free"):
        drv.add([(DATA, 1)], [], "x")
    chains = dev.pop_many(mem, 10)
    assert [c.head for c in chains] == heads
    dev.push_many(mem, [(chains[2], 0), (chains[0], 0)])     # out of order completion
    assert drv.get_used() == (2, 0) and drv.get_used() == (0, 0) and drv.get_used() is None
    assert drv.num_free == 4
    with pytest.raises(QueueFullError, match="need 5 descriptors, 4 free"):
        drv.add([(DATA, 1)] * 5, [], "x")
    with pytest.raises(VirtqueueError, match="at least one buffer"):
        drv.add([], [], "x")
    with pytest.raises(VirtqueueError, match="not a 32-bit"):
        drv.add([(DATA, 1 << 32)], [], "x")
    with pytest.raises(VirtqueueError, match="not a .gpa, len. pair"):
        drv.add([DATA], [], "x")
    assert drv.num_free == 4                  # failed adds consumed nothing
    drv.add([(DATA, 1)] * 4, [], "four")
    assert drv.num_free == 0


def test_batching_pop_many_push_many(mem):
    drv = DriverQueue(mem, 0, 128, RING)
    dev = device_queue_for(drv)
    for i in range(50):
        mem.write(DATA + 8 * i, i.to_bytes(8, "little"))
        drv.add([(DATA + 8 * i, 8)], [(RESP + 8 * i, 8)], i)
    chains = dev.pop_many(mem, 32) + dev.pop_many(mem, 32)
    assert len(chains) == 50 and dev.pop_many(mem, 32) == []
    for ch in chains:
        ch.write((int.from_bytes(ch.read(), "little") * 3).to_bytes(8, "little"))
    mark = dev.used_idx
    with pytest.raises(VirtqueueError):
        dev.push_many(mem, [(chains[0], 8), (chains[1], 999)])
    assert dev.used_idx == mark and drv.get_used() is None    # nothing published on failure
    dev.push_many(mem, [(ch, 8) for ch in chains])
    assert dev.used_idx == 50
    assert (dev.popped, dev.pushed, dev.errors) == (50, 50, 0)
    got = [drv.get_used() for _ in range(50)]
    assert [t for t, _ in got] == list(range(50))
    assert all(int.from_bytes(mem.read(RESP + 8 * i, 8), "little") == 3 * i for i in range(50))


def test_flag_notification_suppression(mem):
    drv = DriverQueue(mem, 0, 8, RING)
    dev = device_queue_for(drv)
    drv.add([(DATA, 1)], [], 0)
    assert drv.kick_needed()
    dev.disable_notification(mem)
    drv.add([(DATA, 1)], [], 1)
    assert not drv.kick_needed()
    assert dev.enable_notification(mem) is True          # work arrived while disabled
    dev.pop_many(mem, 8)
    assert dev.enable_notification(mem) is False
    drv.add([(DATA, 1)], [], 2)
    assert drv.kick_needed()
    dev.pop(mem)
    dev.push(mem, 0, 0)
    assert dev.should_notify(mem)
    drv.disable_cb()
    dev.push(mem, 1, 0)
    assert not dev.should_notify(mem)
    assert drv.enable_cb() is True                       # used buffers already pending
    assert dev.should_notify(mem)


def test_event_idx_suppression(mem):
    drv = DriverQueue(mem, 0, 8, RING, event_idx=True)
    dev = device_queue_for(drv)
    assert dev.event_idx
    drv.add([(DATA, 1)], [], 0)
    assert drv.kick_needed()                  # avail_event 0 is in [0, 1)
    drv.add([(DATA, 1)], [], 1)
    assert not drv.kick_needed()              # device has not moved avail_event: already kicked
    c0 = dev.pop(mem)                         # notifications enabled: avail_event := 1
    drv.add([(DATA, 1)], [], 2)               # avail 2 -> 3: event 1 not in [2, 3): the device
    assert not drv.kick_needed()              # is still busy with chain 1, no kick
    c1, c2 = dev.pop(mem), dev.pop(mem)       # avail_event := 3, ring drained
    drv.add([(DATA, 1)], [], 3)
    assert drv.kick_needed()                  # event 3 in [3, 4)
    dev.disable_notification(mem)
    c3 = dev.pop(mem)                         # avail_event stays at 3
    drv.add([(DATA, 1)], [], 4)
    assert not drv.kick_needed()
    assert dev.enable_notification(mem) is True       # chain 4 is pending
    dev.pop(mem)
    assert dev.enable_notification(mem) is False
    drv.add([(DATA, 1)], [], 5)
    assert drv.kick_needed()
    # used side: the driver's used_event follows last_used_idx while callbacks are enabled
    dev.push(mem, c0, 0)
    assert dev.should_notify(mem)             # first decision after start always notifies
    dev.push(mem, c1, 0)
    assert not dev.should_notify(mem)         # used_event 0 already passed: no new interrupt
    assert drv.get_used() == (0, 0) and drv.get_used() == (1, 0)   # used_event := 2
    dev.push(mem, c2, 0)
    assert dev.should_notify(mem)             # used_event 2 in [2, 3)
    drv.disable_cb()
    dev.push(mem, c3, 0)
    assert not dev.should_notify(mem)
    assert drv.enable_cb() is True
    assert drv.get_used() == (2, 0) and drv.get_used() == (3, 0) and drv.enable_cb() is False


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [65530, 65535, 0xFFF0])
def test_wraparound_16bit(mem, event_idx, start):
    drv = DriverQueue(mem, 0, 8, RING, event_idx=event_idx, start_idx=start)
    dev = DeviceQueue(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=event_idx,
                      last_avail_idx=start, used_idx=None)
    assert dev.used_idx is None
    seen = 0
    for rnd in range(40):
        for j in range(3):
            mem.write(DATA + 8 * j, (rnd * 3 + j).to_bytes(8, "little"))
            drv.add([(DATA + 8 * j, 8)], [(RESP + 8 * j, 8)], rnd * 3 + j)
        kick = drv.kick_needed()
        assert kick or event_idx                      # without EVENT_IDX every batch kicks here
        chains = dev.pop_many(mem, 4)
        assert len(chains) == 3 and dev.pop(mem) is None
        dev.push_many(mem, [(c, 0) for c in chains])
        notify = dev.should_notify(mem)
        assert notify                                 # the driver left callbacks enabled
        for j in range(3):
            assert drv.get_used() == (rnd * 3 + j, 0)
            seen += 1
        assert dev.enable_notification(mem) is False
    assert dev.last_avail_idx == (start + 120) & 0xFFFF == drv.avail_idx
    assert dev.used_idx == (start + 120) & 0xFFFF == drv.last_used_idx
    assert seen == 120


def test_event_idx_kick_exact_at_wrap(mem):
    drv = DriverQueue(mem, 0, 8, RING, event_idx=True, start_idx=0xFFFE)
    dev = DeviceQueue(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=True, last_avail_idx=0xFFFE)
    drv.add([(DATA, 1)], [], 0)
    assert drv.kick_needed()                  # avail_event 0xFFFE in [0xFFFE, 0xFFFF)
    dev.pop(mem)                              # avail_event := 0xFFFF
    drv.add([(DATA, 1)], [], 1)               # 0xFFFF -> 0x0000
    assert drv.kick_needed()
    dev.pop(mem)                              # avail_event := 0
    drv.add([(DATA, 1)], [], 2)
    assert drv.kick_needed()
    assert dev.pop(mem).head == 2


def test_device_queue_parameters(mem):
    for size in (0, 3, 65536, -2):
        with pytest.raises(VirtqueueError, match=f"queue size {size} "):
            DeviceQueue(0, size, 0, 0x100, 0x200)
    with pytest.raises(VirtqueueError, match="queue 1: descriptor table address 0x8 is not 16-byte"):
        DeviceQueue(1, 8, 8, 0x100, 0x200)
    with pytest.raises(VirtqueueError, match="avail ring address 0x101 is not 2-byte"):
        DeviceQueue(1, 8, 0, 0x101, 0x200)
    with pytest.raises(VirtqueueError, match="used ring address 0x202 is not 4-byte"):
        DeviceQueue(1, 8, 0, 0x100, 0x202)
    with pytest.raises(VirtqueueError, match="last_avail_idx 65536"):
        DeviceQueue(1, 8, 0, 0x100, 0x200, last_avail_idx=65536)
    with pytest.raises(VirtqueueError, match="max_chain_len 0"):
        DeviceQueue(1, 8, 0, 0x100, 0x200, max_chain_len=0)
    with pytest.raises(VirtqueueError, match="64-bit address"):
        DeviceQueue(1, 8, -16, 0x100, 0x200)
    q = DeviceQueue(2, 8, (1 << 20) - 64, 0x100, 0x200)        # desc table runs off memory
    with pytest.raises(VirtqueueError, match="queue 2: descriptor table at 0xfffc0 .128 bytes."):
        q.pop(mem)
    q = DeviceQueue(2, 8, 0, (1 << 20) - 8, 0x200)
    with pytest.raises(VirtqueueError, match="avail ring at 0xffff8"):
        q.pop(mem)
    q = DeviceQueue(2, 8, 0, 0x100, 1 << 20)
    with pytest.raises(VirtqueueError, match="used ring at 0x100000"):
        q.push(mem, 0, 0)
    closed = GuestMemory([MemoryRegion.from_buffer(bytearray(4096), gpa=0)])
    closed.close()
    with pytest.raises(VirtqueueError, match="closed"):
        DeviceQueue(0, 8, 0, 0x100, 0x200).pop(closed)


def test_objects_misused_from_python(mem):
    drv = DriverQueue(mem, 0, 8, RING)
    dev = device_queue_for(drv)
    other = DeviceQueue(1, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa)
    with pytest.raises(VirtqueueError, match="come from DeviceQueue.pop"):
        DescriptorChain().read()
    with pytest.raises(VirtqueueError, match="not popped from this queue"):
        dev.push(mem, DescriptorChain(), 0)
    drv.add([(DATA, 4)], [], "t")
    ch = dev.pop(mem)
    with pytest.raises(VirtqueueError, match="queue 1: chain head 0 was not popped from this queue"):
        other.push(mem, ch, 0)
    with pytest.raises(VirtqueueError, match="__init__ was not called"):
        DeviceQueue.__new__(DeviceQueue).pop(mem)
    with pytest.raises(VirtqueueError, match="__init__ was not called"):
        DriverQueue.__new__(DriverQueue).get_used()
    with pytest.raises(VirtqueueError, match="expected a GuestMemory, got bytearray"):
        dev.pop(bytearray(16))
    dev.__init__(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, last_avail_idx=1)   # re-init is safe
    dev.push(mem, 0, 0)
    assert drv.get_used() == ("t", 0)
