"""A virtio-blk driver for process guests, over :class:`VirtioUserDevice`.

The driver side of virtio spec 1.2 §5.2.6: each request is a chain of a
device-readable header (and data, for writes) followed by device-writable
data (for reads) and the status byte. Buffers live in the guest memory the
front-end shares with the back-end, so data is never copied on the way.
Works against our back-end and against qemu-storage-daemon's export.
"""
from __future__ import annotations

import errno

from vhost_user.blk import (
    CONFIG_SIZE,
    ID_BYTES,
    REQ_HEADER_SIZE,
    SECTOR_SIZE,
    BlkFeature,
    ReqType,
    Status,
    decode_config,
    pack_request_header,
)
from vhost_user.errors import VhostUserError
from vhost_user.frontend import VirtioUserDevice


class BlkIOError(VhostUserError):
    def __init__(self, what: str, status: int):
        super().__init__(f"virtio-blk {what} failed with status {status}")
        self.errno = errno.EIO
        self.status = status


class BlkDriver:
    """Synchronous virtio-blk requests on one queue of a VirtioUserDevice."""

    FEATURES = (1 << BlkFeature.SEG_MAX) | (1 << BlkFeature.BLK_SIZE) | (1 << BlkFeature.FLUSH) | (
        1 << BlkFeature.MQ) | (1 << BlkFeature.RO)

    def __init__(self, dev: VirtioUserDevice, queue: int = 0, *, max_io: int = 1 << 20):
        self.dev = dev
        self.queue = queue
        self.q = dev.queues[queue]
        cfg = decode_config(dev.get_config(0, CONFIG_SIZE))
        self.capacity = cfg.capacity  # sectors
        self.read_only = bool(dev.features & (1 << BlkFeature.RO))
        # One request slot: header, data, status, all in guest memory.
        self.hdr_gpa = dev.alloc(REQ_HEADER_SIZE, 16)
        self.status_gpa = dev.alloc(1, 1)
        self.data_gpa = dev.alloc(max_io, 4096)
        self.max_io = max_io
        self.hdr = dev.translate(self.hdr_gpa, REQ_HEADER_SIZE)
        self.status = dev.translate(self.status_gpa, 1)
        self.data = dev.translate(self.data_gpa, max_io)

    @classmethod
    def connect(cls, path: str, **kw) -> BlkDriver:
        queue_size = kw.pop("queue_size", 128)
        mem_size = kw.pop("mem_size", 8 << 20)
        dev = VirtioUserDevice(path, mem_size=mem_size, queue_size=queue_size,
                               device_features=cls.FEATURES, **kw)
        try:
            return cls(dev)
        except BaseException:
            dev.close()
            raise

    def _submit(self, type_: int, sector: int, out_len: int = 0, in_len: int = 0) -> int:
        pack_request_header(self.hdr, type_, sector)
        self.status[0] = 0xFF
        out = [(self.hdr_gpa, REQ_HEADER_SIZE)]
        inb = []
        if out_len:
            out.append((self.data_gpa, out_len))
        if in_len:
            inb.append((self.data_gpa, in_len))
        inb.append((self.status_gpa, 1))
        self.q.add(out, inb, type_)
        self.dev.kick_if_needed(self.queue)
        _, written = self.dev.wait_used(self.queue)
        return written

    def _check(self, what: str) -> None:
        if self.status[0] != Status.OK:
            raise BlkIOError(what, self.status[0])

    def read(self, sector: int, count: int = 1) -> memoryview:
        """Read ``count`` sectors; returns a view of the data in guest memory
        (valid until the next request)."""
        n = count * SECTOR_SIZE
        if n > self.max_io:
            raise ValueError(f"read of {n} bytes exceeds the {self.max_io}-byte request buffer")
        self._submit(ReqType.IN, sector, in_len=n)
        self._check(f"read of sector {sector}")
        return self.data[:n]

    def write(self, sector: int, data) -> None:
        n = len(data)
        if n % SECTOR_SIZE or n > self.max_io:
            raise ValueError(f"write of {n} bytes: not a multiple of {SECTOR_SIZE} or over {self.max_io}")
        self.data[:n] = data
        self._submit(ReqType.OUT, sector, out_len=n)
        self._check(f"write of sector {sector}")

    def flush(self) -> None:
        self._submit(ReqType.FLUSH, 0)
        self._check("flush")

    def get_id(self) -> bytes:
        self._submit(ReqType.GET_ID, 0, in_len=ID_BYTES)
        self._check("get-id")
        return bytes(self.data[:ID_BYTES]).rstrip(b"\0")

    def close(self) -> None:
        for v in (self.hdr, self.status, self.data):
            v.release()
        self.dev.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
