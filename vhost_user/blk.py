"""virtio-blk over vhost-user: the back-end's block device (virtio spec 1.2 §5.2).

This is the daemon's test device until virtio-rdma is served, and the device
QEMU 7.2 talks to through ``vhost-user-blk-pci`` (stock 7.2 has no generic
vhost-user device). It is a real block device: requests are read from the
guest's descriptor chains and data moves between guest memory and the disk
with memoryview copies (no per-byte Python work, no intermediate bytes).

Wire format, pure: the request header (le32 type, le32 reserved, le64
sector), the trailing status byte, and the 60-byte ``virtio_blk_config``.
"""
from __future__ import annotations

import enum
import mmap
import os
import struct

import construct as cs

from vhost_user.device import VhostUserDevice
from vhost_user.errors import DeviceError

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES


class BlkFeature(enum.IntEnum):
    """Feature bit numbers (§5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


_IN, _OUT, _FLUSH, _GET_ID = ReqType.IN.value, ReqType.OUT.value, ReqType.FLUSH.value, ReqType.GET_ID.value
_OK, _IOERR, _UNSUPP = (bytes((s,)) for s in (Status.OK, Status.IOERR, Status.UNSUPP))

ReqHeader = cs.Struct("type" / cs.Int32ul, "reserved" / cs.Int32ul, "sector" / cs.Int64ul)
REQ_HEADER_SIZE = 16

BlkConfig = cs.Struct(
    "capacity" / cs.Int64ul,
    "size_max" / cs.Int32ul,
    "seg_max" / cs.Int32ul,
    "cylinders" / cs.Int16ul,
    "heads" / cs.Int8ul,
    "sectors" / cs.Int8ul,
    "blk_size" / cs.Int32ul,
    "physical_block_exp" / cs.Int8ul,
    "alignment_offset" / cs.Int8ul,
    "min_io_size" / cs.Int16ul,
    "opt_io_size" / cs.Int32ul,
    "writeback" / cs.Int8ul,
    "unused0" / cs.Int8ul,
    "num_queues" / cs.Int16ul,
    "max_discard_sectors" / cs.Int32ul,
    "max_discard_seg" / cs.Int32ul,
    "discard_sector_alignment" / cs.Int32ul,
    "max_write_zeroes_sectors" / cs.Int32ul,
    "max_write_zeroes_seg" / cs.Int32ul,
    "write_zeroes_may_unmap" / cs.Int8ul,
    "unused1" / cs.Bytes(3),
)
CONFIG_SIZE = BlkConfig.sizeof()  # 60


# The per-request hot path uses this precompiled layout of ReqHeader
# (construct costs ~20 us a call; tests check the two agree).
_REQ = struct.Struct("<IIQ")


def encode_request_header(type_: int, sector: int) -> bytes:
    return _REQ.pack(type_, 0, sector)


def pack_request_header(buf, type_: int, sector: int) -> None:
    _REQ.pack_into(buf, 0, type_, 0, sector)


def decode_request_header(data) -> tuple[int, int]:
    type_, _reserved, sector = _REQ.unpack_from(data)
    return type_, sector


def encode_config(*, capacity_sectors: int, seg_max: int, num_queues: int,
                  blk_size: int = SECTOR_SIZE) -> bytes:
    return BlkConfig.build(dict(
        capacity=capacity_sectors, size_max=0, seg_max=seg_max, cylinders=0, heads=0, sectors=0,
        blk_size=blk_size, physical_block_exp=0, alignment_offset=0, min_io_size=1, opt_io_size=0,
        writeback=0, unused0=0, num_queues=num_queues, max_discard_sectors=0, max_discard_seg=0,
        discard_sector_alignment=0, max_write_zeroes_sectors=0, max_write_zeroes_seg=0,
        write_zeroes_may_unmap=0, unused1=b"\0\0\0",
    ))


def decode_config(data: bytes):
    return BlkConfig.parse(bytes(data).ljust(CONFIG_SIZE, b"\0"))


# ---------------------------------------------------------------------------
# storage


class Disk:
    """A byte-addressable disk: a writable memoryview plus flush."""

    def __init__(self, view: memoryview, *, read_only: bool = False, owner=None):
        if len(view) % SECTOR_SIZE:
            raise ValueError(f"disk size {len(view)} is not a multiple of {SECTOR_SIZE}")
        self.view = view
        self.read_only = read_only
        self._owner = owner

    @classmethod
    def ram(cls, size: int, init: bytes = b"") -> Disk:
        if size <= 0 or size % SECTOR_SIZE:
            raise ValueError(f"RAM disk size {size} must be a positive multiple of {SECTOR_SIZE}")
        if len(init) > size:
            raise ValueError(f"initial image of {len(init)} bytes does not fit a {size}-byte disk")
        buf = bytearray(size)
        buf[: len(init)] = init
        return cls(memoryview(buf), owner=buf)

    @classmethod
    def file(cls, path: str, *, read_only: bool = False) -> Disk:
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % SECTOR_SIZE:
                raise ValueError(f"{path}: size {size} is not a positive multiple of {SECTOR_SIZE}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED,
                           mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(memoryview(mm), read_only=read_only, owner=mm)

    @property
    def sectors(self) -> int:
        return len(self.view) // SECTOR_SIZE

    def flush(self) -> None:
        if isinstance(self._owner, mmap.mmap):
            self._owner.flush()

    def close(self) -> None:
        self.view.release()
        if isinstance(self._owner, mmap.mmap):
            self._owner.close()
        self._owner = None


class BlkDevice(VhostUserDevice):
    """vhost-user-blk back-end device over a :class:`Disk`."""

    virtio_id = VIRTIO_ID_BLOCK

    def __init__(self, disk: Disk, *, num_queues: int = 1, max_queue_size: int = 1024,
                 serial: str = "vrdma-blk", owns_disk: bool = False):
        if not 1 <= num_queues <= 64:
            raise ValueError(f"num_queues {num_queues} not in 1..64")
        self.disk = disk
        self.owns_disk = owns_disk
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.serial = serial.encode()[:ID_BYTES]
        feats = ((1 << BlkFeature.SEG_MAX) | (1 << BlkFeature.BLK_SIZE) | (1 << BlkFeature.FLUSH)
                 | (1 << BlkFeature.MQ))
        if disk.read_only:
            feats |= 1 << BlkFeature.RO
        self.device_features = feats
        self.counts = [0] * (max(ReqType) + 2)  # by type value; the last slot counts unknown types
        self._ident = self.serial.ljust(ID_BYTES, b"\0")
        self.bad_requests = 0
        self.io_errors = 0
        self._hdr = bytearray(REQ_HEADER_SIZE)

    def config(self) -> bytes:
        return encode_config(capacity_sectors=self.disk.sectors, seg_max=max(1, self.max_queue_size - 2),
                             num_queues=self.num_queues)

    def process_queue(self, vring, mem) -> None:
        q = vring.queue
        while (chain := q.pop(mem)) is not None:
            q.push(mem, chain, self._handle(chain))

    def _handle(self, chain) -> int:
        """Serve one request chain; returns the bytes written to the driver."""
        wlen = chain.writable_len
        if chain.readable_len < REQ_HEADER_SIZE or wlen < 1:
            self.bad_requests += 1
            return 0
        chain.read_into(self._hdr)
        type_, _r, sector = _REQ.unpack_from(self._hdr)
        data_in = wlen - 1  # bytes the driver can receive, status excluded
        written = 0
        status = _OK
        if type_ == _IN:
            span = self._span(sector, data_in)
            if span is None:
                status = _IOERR
            else:
                written = chain.write(self.disk.view[span[0] : span[1]])
        elif type_ == _OUT:
            span = self._span(sector, chain.readable_len - REQ_HEADER_SIZE)
            if span is None or self.disk.read_only:
                status = _IOERR
            else:
                chain.read_into(self.disk.view[span[0] : span[1]], REQ_HEADER_SIZE)
        elif type_ == _GET_ID:
            written = chain.write(self._ident[: min(ID_BYTES, data_in)])
        elif type_ == _FLUSH:
            self.disk.flush()
        else:
            status = _UNSUPP
        counts = self.counts
        counts[type_ if type_ < len(counts) else -1] += 1
        if status is _IOERR:
            self.io_errors += 1
        chain.write(status, data_in)
        return written + 1

    @property
    def requests(self) -> dict:
        """Requests served, by type name (unknown types under 'other')."""
        out = {t.name: self.counts[t.value] for t in ReqType}
        out["other"] = self.counts[-1]
        return out

    def _span(self, sector: int, length: int):
        if length % SECTOR_SIZE:
            return None
        start = sector * SECTOR_SIZE
        end = start + length
        if end > len(self.disk.view) or sector >= 1 << 55:
            return None
        return start, end

    def set_config(self, offset: int, data: bytes) -> None:
        raise DeviceError(f"virtio-blk config is read-only (write of {len(data)} bytes at {offset})")

    def close(self) -> None:
        if self.owns_disk:
            self.disk.close()


