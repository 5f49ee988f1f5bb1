"""The front-end's guest-address allocator (rings, buffers, guest_lib objects)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.frontend import GpaAllocator


def test_alignment_exhaustion_and_errors():
    a = GpaAllocator(0x1000, 0x5000)
    x = a.alloc(10, 64)
    y = a.alloc(0x1000, 0x1000)
    assert x == 0x1000 and y == 0x2000 and a.used_bytes == 10 + 0x1000
    with pytest.raises(MemoryError):
        a.alloc(0x3000)
    with pytest.raises(ValueError, match="positive"):
        a.alloc(0)
    with pytest.raises(ValueError, match="power of two"):
        a.alloc(8, 3)
    a.free(x)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(x)


@given(st.lists(st.tuples(st.integers(1, 5000), st.sampled_from([1, 16, 64, 4096])), max_size=40), st.randoms())
def test_blocks_never_overlap_and_free_coalesces(reqs, rnd):
    a = GpaAllocator(0, 1 << 20)
    live = {}
    for size, align in reqs:
        addr = a.alloc(size, align)
        assert addr % align == 0 and 0 <= addr and addr + size <= 1 << 20
        assert all(addr + size <= b or b + n <= addr for b, n in live.items())
        live[addr] = size
        if live and rnd.random() < 0.3:
            victim = rnd.choice(sorted(live))
            a.free(victim)
            del live[victim]
    for addr in list(live):
        a.free(addr)
    assert a.used_bytes == 0
    assert a.alloc(1 << 20, 1) == 0  # everything coalesced back into one block
