"""The virtio-mmio driver's pure parts (guest_lib.transports.virtio_mmio).

Tier 1, no guest: the register offsets against the spec's table (v1.2
§4.2.2), the ``virtio_mmio.device=`` and /proc/iomem parsers, the header
decoder, each fed forged or absurd input that must be refused with
MmioError naming the bad value, and the device search over a file standing
where /dev/mem would be (register blocks written as byte strings).
"""
from __future__ import annotations

import errno
import os

import pytest

from guest_lib.transports.virtio_mmio import (
    CONFIG_OFFSET,
    MAX_REGION,
    MMIO_MAGIC,
    MmioError,
    MmioHeader,
    MmioReg,
    MmioRegion,
    decode_header,
    find_device,
    parse_cmdline,
    parse_device_arg,
    parse_iomem,
    parse_size,
)
from virtio_rdma.constants import ABI_VERSION, CONFIG_MAGIC

# QEMU 11.1 microvm with acpi=off appends this (docs/qemu-guests.md "microvm")
MICROVM_CMDLINE = ("console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init hugepages=64 -- active mmio:auto "
                   "1:2:3:4:5 virtio_mmio.device=512@0xfeb00e00:12")


def _header(magic=MMIO_MAGIC, version=2, device_id=21, vendor=0x554D4551) -> bytes:
    return b"".join(v.to_bytes(4, "little") for v in (magic, version, device_id, vendor))


def test_register_offsets_are_the_specs():
    spec = {"MAGIC_VALUE": 0x0, "VERSION": 0x4, "DEVICE_ID": 0x8, "VENDOR_ID": 0xC, "DEVICE_FEATURES": 0x10,
            "DEVICE_FEATURES_SEL": 0x14, "DRIVER_FEATURES": 0x20, "DRIVER_FEATURES_SEL": 0x24,
            "QUEUE_SEL": 0x30, "QUEUE_NUM_MAX": 0x34, "QUEUE_NUM": 0x38, "QUEUE_READY": 0x44,
            "QUEUE_NOTIFY": 0x50, "INTERRUPT_STATUS": 0x60, "INTERRUPT_ACK": 0x64, "STATUS": 0x70,
            "QUEUE_DESC_LOW": 0x80, "QUEUE_DESC_HIGH": 0x84, "QUEUE_DRIVER_LOW": 0x90,
            "QUEUE_DRIVER_HIGH": 0x94, "QUEUE_DEVICE_LOW": 0xA0, "QUEUE_DEVICE_HIGH": 0xA4,
            "SHM_SEL": 0xAC, "CONFIG_GENERATION": 0xFC}
    assert {r.name: int(r) for r in MmioReg} == spec
    assert all(r % 4 == 0 for r in MmioReg) and CONFIG_OFFSET == 0x100
    assert MMIO_MAGIC.to_bytes(4, "little") == b"virt"


def test_microvm_command_line():
    assert parse_cmdline(MICROVM_CMDLINE) == [MmioRegion(0xFEB00E00, 512, 12)]
    assert parse_cmdline("quiet") == []
    two = parse_cmdline("virtio_mmio.device=4K@0x1000:5:3 virtio_mmio.device=0x200@4096000:6")
    assert two == [MmioRegion(0x1000, 4096, 5), MmioRegion(4096000, 512, 6)]
    assert parse_size("1M") == 1 << 20 and parse_size("0x200") == 512 and parse_size("2k") == 2048
    assert MmioRegion(0xFEB00E00, 512).name == "mmio:0xfeb00e00"


@pytest.mark.parametrize("arg, word", [
    ("512", "'@'"), ("512@0xfeb00e00", "':IRQ'"), ("x@0x1000:5", "'x'"), ("512@zz:5", "not a number"),
    ("512@0x1000:q", "not a number"), ("1G@0x1000:5", "0x40000000 bytes"), ("16@0x1000:5", "0x10 bytes"),
    ("512@0x1001:5", "0x1001"), ("512@0xffffffffffffff00:5", "0xffffffffffffff00"),
])
def test_forged_device_parameters_are_refused(arg, word):
    with pytest.raises(MmioError) as e:
        parse_device_arg(arg)
    assert word in str(e.value) and e.value.errno == errno.EINVAL


def test_iomem_regions():
    text = ("00000000-00000fff : Reserved\n"
            "feb00000-feb001ff : LNRO0005:00\n"
            "  feb00000-feb001ff : LNRO0005:00\n"
            "feb00200-feb003ff : a000200.virtio_mmio\n"
            "fec00000-fec003ff : IOAPIC 0\n")
    got = parse_iomem(text)
    assert got == [MmioRegion(0xFEB00000, 512), MmioRegion(0xFEB00000, 512), MmioRegion(0xFEB00200, 512)]
    with pytest.raises(MmioError, match="start-end"):
        parse_iomem("feb00000-zz : LNRO0005:00")
    with pytest.raises(MmioError, match=hex(MAX_REGION)):
        parse_iomem("0-ffffffff : LNRO0005:00")


def test_header_decoding():
    assert decode_header(_header()) == MmioHeader(MMIO_MAGIC, 2, 21, 0x554D4551)
    for raw, word in ((_header(magic=0x12345678), "0x12345678"), (_header(version=1), "force-legacy=false"),
                      (_header(version=7), "version 7"), (_header(device_id=0), "device ID 0"),
                      (_header()[:12], "12 bytes")):
        with pytest.raises(MmioError, match=word):
            decode_header(raw)


def _block(config: bytes, device_id: int = 21) -> bytes:
    blk = bytearray(0x200)
    blk[:16] = _header(device_id=device_id)
    blk[CONFIG_OFFSET:CONFIG_OFFSET + len(config)] = config
    return bytes(blk)


RDMA_CONFIG = CONFIG_MAGIC.to_bytes(4, "little") + ABI_VERSION.to_bytes(2, "little") + b"\0\0"


@pytest.fixture
def fake_mem(tmp_path):
    """A file in /dev/mem's place: a block device (virtio-blk config) at
    0x1000, the virtio-rdma block at 0x1e00 (not page-aligned, as microvm's),
    and the command line naming both and one past the file's end."""
    mem = bytearray(0x3000)
    mem[0x1000:0x1200] = _block(b"\0" * 8, device_id=2)
    mem[0x1E00:0x2000] = _block(RDMA_CONFIG)
    (tmp_path / "mem").write_bytes(bytes(mem))
    (tmp_path / "cmdline").write_text("virtio_mmio.device=512@0x1000:5 virtio_mmio.device=512@0x1e00:6 "
                                      "virtio_mmio.device=512@0x8000:7\n")
    (tmp_path / "sys").mkdir()
    return tmp_path


def _find(d, address="auto"):
    return find_device(address, mem_path=str(d / "mem"), lock_dir=str(d), sysfs=str(d / "sys"),
                       cmdline_path=str(d / "cmdline"), iomem_path=str(d / "iomem"))


def test_the_device_is_found_by_its_config_magic_and_locked(fake_mem):
    blk = _find(fake_mem)
    try:
        assert blk.region == MmioRegion(0x1E00, 512, 6) and blk.header.device_id == 21
        assert blk.config_head(8) == RDMA_CONFIG
        # one driver per block: a second is refused while the first holds it
        with pytest.raises(MmioError) as e:
            _find(fake_mem, "0x1e00")
        assert e.value.errno == errno.EBUSY
    finally:
        blk.close()
    assert blk.regs is None and blk.lock_fd == -1
    blk2 = _find(fake_mem, "0x1e00")  # released: free again
    blk2.close()


def test_no_rdma_block_says_what_it_saw(fake_mem):
    with pytest.raises(MmioError) as e:
        _find(fake_mem, "0x1000")
    assert "device 2, not virtio-rdma" in str(e.value) and e.value.errno == errno.ENODEV
    os.truncate(fake_mem / "mem", 0x1000)  # the rdma block and the virtio-blk one now lie past the end
    with pytest.raises(MmioError) as e:
        _find(fake_mem)
    assert "0x1e00" in str(e.value)
    with pytest.raises(MmioError, match="'nope' is not a number"):
        _find(fake_mem, "nope")


def test_context_selects_the_mmio_driver_and_reports_a_bad_address():
    from guest_lib import Context
    from guest_lib.errors import RDMAError

    with pytest.raises(RDMAError) as e:
        Context("mmio:nope")
    assert e.value.errno == errno.EINVAL and "'nope' is not a number" in str(e.value)
