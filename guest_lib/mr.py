"""Memory region (ibv_mr), allocated in the guest memory shared with the device.

``MR(pd, length, access)`` allocates ``length`` bytes (page aligned) and
registers them; the MR's address (``buf``) is this process's virtual address
of the buffer, which is also the iova that work requests and peers use, as
with ibv_reg_mr. The buffer is contiguous in that address space; the device
gets it as a page list (REG_MR ``chunks``: one (device address, length) per
physically contiguous piece, ``chunks``); more pieces than the device's
``max_mr_chunks`` is a :class:`UserError` naming both numbers. ``gpa`` is
the first chunk's device address.
"""
from __future__ import annotations

from guest_lib.base import VerbsObject
from guest_lib.errors import UserError
from guest_lib.pd import PD
from verbs import Access
from virtio_rdma.constants import Cmd

PAGE = 4096


class MR(VerbsObject):
    _close_rank = 1

    def __init__(self, pd: PD, length: int, access: int = Access.LOCAL_WRITE):
        if length <= 0:
            raise UserError(f"MR length {length} must be positive")
        super().__init__(pd)
        self.pd = pd
        self.ctx = pd.ctx
        self.length = length
        self.access = int(access)
        self.buf, self.view, self.chunks = self.ctx.alloc_mr(length, PAGE)
        self.gpa = self.chunks[0][0]
        try:
            if len(self.chunks) > 1:
                most = self.ctx.query_device().max_mr_chunks
                if len(self.chunks) > most:
                    raise UserError(f"a {length}-byte MR needs {len(self.chunks)} page-list chunks, more "
                                    f"than the device's max_mr_chunks {most}")
            r = self.ctx.command(Cmd.REG_MR, pdn=pd.pdn, access=self.access, iova=self.buf, length=length,
                                 nchunks=len(self.chunks), reserved=0,
                                 chunks=[dict(gpa=g, length=n) for g, n in self.chunks])
        except BaseException:
            self.view.release()
            self.ctx.free_mr(self.buf, self.gpa)
            self._abandon()
            raise
        self.lkey, self.rkey = r["lkey"], r["rkey"]

    def write(self, data, length: int | None = None, offset: int = 0) -> None:
        self._check_open()
        data = memoryview(data).cast("B")
        n = len(data) if length is None else length
        if offset < 0 or n > len(data) or offset + n > self.length:
            raise UserError(f"write of {n} bytes at offset {offset} is outside the {self.length}-byte MR")
        self.view[offset : offset + n] = data[:n]

    def read(self, length: int, offset: int = 0) -> bytes:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.length:
            raise UserError(f"read of {length} bytes at offset {offset} is outside the {self.length}-byte MR")
        return bytes(self.view[offset : offset + length])

    def _release(self) -> None:
        try:
            self.ctx._destroy(Cmd.DEREG_MR, lkey=self.lkey)
        finally:
            self.view.release()
            if not self.ctx.closed:
                self.ctx.free_mr(self.buf, self.gpa)
