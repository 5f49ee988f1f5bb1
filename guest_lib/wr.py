"""Work requests and scatter/gather entries (ibv_sge, ibv_send_wr, ibv_recv_wr)."""
from __future__ import annotations

from dataclasses import dataclass, field

from verbs import SendFlags, WrOpcode


@dataclass
class SGE:
    addr: int
    length: int
    lkey: int


@dataclass
class SendWR:
    wr_id: int = 0
    opcode: int = WrOpcode.SEND
    num_sge: int | None = None
    sg: list = field(default_factory=list)
    send_flags: int = SendFlags.SIGNALED
    imm_data: int = 0
    remote_addr: int = 0
    rkey: int = 0
    compare_add: int = 0
    swap: int = 0

    def set_wr_rdma(self, rkey: int, addr: int) -> None:
        self.rkey, self.remote_addr = rkey, addr

    def set_wr_atomic(self, rkey: int, addr: int, compare_add: int, swap: int = 0) -> None:
        self.rkey, self.remote_addr, self.compare_add, self.swap = rkey, addr, compare_add, swap


@dataclass
class RecvWR:
    wr_id: int = 0
    num_sge: int | None = None
    sg: list = field(default_factory=list)
