"""Protection domain (ibv_pd)."""
from __future__ import annotations

from guest_lib.base import VerbsObject
from guest_lib.context import Context
from virtio_rdma.constants import Cmd


class PD(VerbsObject):
    _close_rank = 2

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.ctx = ctx
        try:
            self.pdn = ctx.command(Cmd.ALLOC_PD)["pdn"]
        except BaseException:
            self._abandon()  # a failed PD must not stay among the Context's children
            raise

    @property
    def handle(self) -> int:
        return self.pdn

    def _release(self) -> None:
        self.ctx._destroy(Cmd.DEALLOC_PD, pdn=self.pdn)
