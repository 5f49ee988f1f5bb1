"""AliasWindow: scattered, out-of-order pieces of a shared memfd mapping seen
as one contiguous range, the same memory both ways (no copy)."""
import ctypes

import pytest

from virtio.alias import PAGE, AliasWindow
from virtio.errors import GuestMemoryError
from virtio.memory import MemoryRegion


@pytest.fixture
def region():
    r = MemoryRegion.memfd(8 * PAGE, gpa=0, hugetlb=False)
    yield r
    r.close()


def _window_bytes(w: AliasWindow) -> bytes:
    return ctypes.string_at(w.address, w.length)


def test_pieces_in_a_chosen_order_are_the_same_memory(region):
    view = region._view
    for p in range(8):
        view[p * PAGE:(p + 1) * PAGE] = bytes([p]) * PAGE
    a = region.address
    # the tail of page 5, page 2, then the head of page 7: unaligned at both ends
    pieces = [(a + 5 * PAGE + 100, PAGE - 100), (a + 2 * PAGE, PAGE), (a + 7 * PAGE, 10)]
    with AliasWindow(pieces) as w:
        assert w.length == 2 * PAGE - 90 and w.address % PAGE == 100
        assert _window_bytes(w) == b"\x05" * (PAGE - 100) + b"\x02" * PAGE + b"\x07" * 10
        ctypes.memset(w.address + PAGE - 100, 0xEE, 16)  # writes land in page 2 of the memfd
        assert bytes(view[2 * PAGE:2 * PAGE + 16]) == b"\xEE" * 16
        view[7 * PAGE:7 * PAGE + 4] = b"abcd"  # and the memfd's writes show in the window
        assert ctypes.string_at(w.address + 2 * PAGE - 100, 4) == b"abcd"
    assert bytes(view[2 * PAGE:2 * PAGE + 16]) == b"\xEE" * 16  # closing unmaps only the window


@pytest.mark.parametrize("pieces,msg", [
    ([], "at least one piece"),
    ([(0, PAGE), (PAGE + 8, PAGE)], "does not start on a page"),
    ([(0, PAGE - 8), (PAGE, PAGE)], "does not end on a page"),
    ([(0, 0)], "has length 0"),
])
def test_pieces_that_do_not_tile_pages_are_refused(region, pieces, msg):
    with pytest.raises(GuestMemoryError, match=msg):
        AliasWindow([(region.address + a, n) for a, n in pieces])


def test_private_memory_cannot_be_aliased():
    buf = ctypes.create_string_buffer(3 * PAGE)
    start = -(-ctypes.addressof(buf) // PAGE) * PAGE
    with pytest.raises(GuestMemoryError, match="shared mapping"):
        AliasWindow([(start, PAGE)])
