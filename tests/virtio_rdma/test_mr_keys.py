"""MR keys made by the table or adopted from an RDMA device registration, and
the uverbs REG_MR/DEREG_MR command encoding the verbs fabric sends.

The adoption path is what the verbs fabric uses (its real tests need an
RDMA device: tests/fabric/test_hca.py); here the table's own
contract is checked: adopted keys index the MR, an lkey is not an rkey,
the table owns the registration and releases it exactly once, and a
refused registration leaves nothing behind."""
from __future__ import annotations

import ctypes
import struct

import pytest

from virtio.memory import GuestMemory, MemoryRegion as Region
from fabric import uverbs
from verbs import Access
from virtio_rdma.constants import Status
from virtio_rdma.errors import CommandError, FabricError, MemoryAccessError
from virtio_rdma.mr import MrTable

GPA = 0x4000_0000
RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ


class Registration:
    """What a device registration hands the table: keys and close()."""

    def __init__(self, lkey, rkey):
        self.lkey, self.rkey, self.closed = lkey, rkey, 0

    def close(self):
        self.closed += 1


@pytest.fixture
def mem():
    m = GuestMemory([Region.memfd(1 << 20, gpa=GPA)])
    yield m
    m.close()


def test_adopted_keys_index_the_mr_and_lkey_is_not_rkey(mem):
    t = MrTable(16, 4, 1 << 30)
    reg = Registration(0x1234, 0x5678)
    mr = t.register(mem, 1, RW, 0x7F00_0000_1000, 4096, [(GPA, 4096)], backing=lambda acc: reg)
    assert (mr.lkey, mr.rkey, mr.backing) == (0x1234, 0x5678, reg)
    assert t.lookup(0x1234) is mr and t.lookup(0x5678) is mr
    assert len(t.check(mem, 0x1234, 1, 0x7F00_0000_1000, 16, Access.LOCAL_WRITE)) == 1
    assert len(t.check(mem, 0x5678, 1, 0x7F00_0000_1000, 16, Access.REMOTE_WRITE)) == 1
    with pytest.raises(MemoryAccessError, match="invalid key 0x1234"):
        t.check(mem, 0x1234, 1, 0x7F00_0000_1000, 16, Access.REMOTE_WRITE)
    with pytest.raises(MemoryAccessError, match="invalid key 0x5678"):
        t.check(mem, 0x5678, 1, 0x7F00_0000_1000, 16, Access.LOCAL_WRITE)
    with pytest.raises(CommandError) as e:  # DEREG_MR names the lkey
        t.deregister(0x5678)
    assert e.value.status == Status.ENOENT and reg.closed == 0
    t.deregister(0x1234)
    assert reg.closed == 1 and t.lookup(0x5678) is None and t.count == 0 and t.by_pd[1] == 0


def test_local_only_mrs_of_a_device_without_rkeys_coexist(mem):
    """rxe gives an MR without remote rights rkey 0: such MRs have no rkey at
    all (the table files them under their lkey only), and remote use fails."""
    t = MrTable(16, 4, 1 << 30)
    m1 = t.register(mem, 1, Access.LOCAL_WRITE, 0x1000, 4096, [(GPA, 4096)],
                    backing=lambda acc: Registration(0x421, 0))
    m2 = t.register(mem, 1, Access.LOCAL_WRITE, 0x2000, 4096, [(GPA + 4096, 4096)],
                    backing=lambda acc: Registration(0x522, 0))
    assert (m1.rkey, m2.rkey) == (0x421, 0x522) and t.lookup(0) is None
    with pytest.raises(MemoryAccessError):
        t.check(mem, 0x421, 1, 0x1000, 8, Access.REMOTE_WRITE)
    t.deregister(0x421)
    assert t.lookup(0x522) is m2 and t.count == 1


def test_table_owns_registrations_until_cleared(mem):
    t = MrTable(16, 4, 1 << 30)
    regs = [Registration(0x100 + i, 0x100 + i) for i in range(3)]
    for i, r in enumerate(regs):
        t.register(mem, 1, RW, 0x1000 * (i + 1), 4096, [(GPA + 4096 * i, 4096)],
                   backing=lambda acc, r=r: r)
    own = t.register(mem, 1, RW, 0x9000, 4096, [(GPA, 4096)])  # table-made keys beside them
    assert own.backing is None and own.lkey not in {r.lkey for r in regs}
    t.clear()
    assert [r.closed for r in regs] == [1, 1, 1] and t.count == 0 and not list(t)
    t.clear()
    assert [r.closed for r in regs] == [1, 1, 1]


def test_checks_run_before_the_device_registers(mem):
    t = MrTable(16, 4, 1 << 30)
    calls = []

    def backing(acc):
        calls.append(acc)
        return Registration(1, 1)

    with pytest.raises(CommandError) as e:  # REMOTE_WRITE without LOCAL_WRITE
        t.register(mem, 1, Access.REMOTE_WRITE, 0, 4096, [(GPA, 4096)], backing=backing)
    assert e.value.status == Status.EINVAL
    with pytest.raises(CommandError) as e:  # not guest memory
        t.register(mem, 1, RW, 0, 4096, [(GPA + (2 << 20), 4096)], backing=backing)
    assert e.value.status == Status.EFAULT and calls == []


def test_a_refused_or_clashing_registration_leaves_nothing(mem):
    t = MrTable(16, 4, 1 << 30)

    def refuse(acc):
        raise CommandError("device says no", Status.ENOMEM)

    with pytest.raises(CommandError):
        t.register(mem, 1, RW, 0, 4096, [(GPA, 4096)], backing=refuse)
    assert t.count == 0 and not t.by_pd.get(1)
    first = Registration(0x77, 0x77)
    t.register(mem, 1, RW, 0, 4096, [(GPA, 4096)], backing=lambda acc: first)
    clash = Registration(0x88, 0x77)
    with pytest.raises(CommandError) as e:
        t.register(mem, 1, RW, 0, 4096, [(GPA, 4096)], backing=lambda acc: clash)
    assert e.value.status == Status.EIO and clash.closed == 1 and first.closed == 0
    assert t.count == 1 and t.lookup(0x88) is None


# ---------------------------------------------------------------------------
# uverbs command encoding (include/uapi/rdma/ib_user_verbs.h)
# ---------------------------------------------------------------------------
def test_reg_mr_command_layout_is_the_kernels():
    buf = uverbs.encode_reg_mr(0x1111_2222_3333_4444, 0x7F12_3456_7000, 0x20_0000, 0x5555_0000_1000,
                               7, 0xF)
    # struct ib_uverbs_cmd_hdr {u32 command; u16 in_words; u16 out_words}, then
    # struct ib_uverbs_reg_mr {u64 response, start, length, hca_va; u32 pd_handle, access_flags}
    assert len(buf) == 8 + 40
    assert struct.unpack("<IHH", buf[:8]) == (9, 12, 3)
    assert struct.unpack("<QQQQII", buf[8:]) == (0x1111_2222_3333_4444, 0x7F12_3456_7000, 0x20_0000,
                                                 0x5555_0000_1000, 7, 0xF)
    resp = struct.pack("<III", 3, 0xABCD01, 0xABCD02)
    r = uverbs.decode_reg_mr_resp(resp)
    assert (r.mr_handle, r.lkey, r.rkey) == (3, 0xABCD01, 0xABCD02)


def test_dereg_mr_command_layout_is_the_kernels():
    assert uverbs.encode_dereg_mr(42) == struct.pack("<IHHI", 13, 3, 0, 42)


@pytest.mark.parametrize("kw", [dict(length=0), dict(hca_va=(1 << 64) - 8, length=16),
                                dict(pd_handle=1 << 32), dict(start=-1)])
def test_reg_mr_refuses_bad_values(kw):
    args = dict(response=0, start=0x1000, length=4096, hca_va=0x1000, pd_handle=1, access=1) | kw
    with pytest.raises(FabricError):
        uverbs.encode_reg_mr(**args)


def test_reg_mr_on_a_file_that_is_not_uverbs_fails_cleanly(tmp_path):
    """The command goes to the fd it is given; anything but a uverbs device
    refuses it or swallows it, and KernelMr reports that, owning nothing."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(FabricError, match="REG_MR of 4096 bytes"):
            uverbs.KernelMr(w, 1, ctypes.addressof(ctypes.create_string_buffer(4096)), 4096,
                            0x1000, 1)
    finally:
        os.close(w)
