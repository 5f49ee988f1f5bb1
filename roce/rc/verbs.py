"""Verbs-level objects the RC transport consumes and produces: send and
receive work requests and work completions (``ibv_send_wr``, ``ibv_recv_wr``,
``ibv_wc``). Their opcodes, statuses, flags and access bits are the
libibverbs enumerations of :mod:`verbs`, so the backend passes them through
unchanged.

Scatter/gather entries are writable memoryviews into guest memory: the
transport reads and writes them in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from verbs import WcFlags, WcOpcode, WcStatus, WrOpcode

_NO_FLAGS = WcFlags(0)

_WC_OF_WR = {
    WrOpcode.RDMA_WRITE: WcOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM: WcOpcode.RDMA_WRITE,
    WrOpcode.SEND: WcOpcode.SEND, WrOpcode.SEND_WITH_IMM: WcOpcode.SEND,
    WrOpcode.SEND_WITH_INV: WcOpcode.SEND, WrOpcode.RDMA_READ: WcOpcode.RDMA_READ,
    WrOpcode.ATOMIC_CMP_AND_SWP: WcOpcode.COMP_SWAP,
    WrOpcode.ATOMIC_FETCH_AND_ADD: WcOpcode.FETCH_ADD,
}


def wc_opcode_of(op: WrOpcode) -> WcOpcode:
    return _WC_OF_WR[op]


@dataclass(slots=True)
class SendWR:
    """ibv_send_wr for RC. ``sges`` are memoryviews of local memory (read for
    SEND/WRITE, written for READ; one 8-byte view for atomics, receiving the
    original remote value in little-endian order, like rxe on x86)."""

    wr_id: int
    opcode: WrOpcode
    sges: list = field(default_factory=list)
    remote_addr: int = 0
    rkey: int = 0
    imm_data: int = 0           # 32-bit, network order word as in the BTH ImmDt
    invalidate_rkey: int = 0
    compare_add: int = 0        # CMP_SWP: compare; FETCH_ADD: add
    swap: int = 0
    signaled: bool = True
    solicited: bool = False
    fence: bool = False         # IBV_SEND_FENCE: wait for earlier READs/atomics to complete


@dataclass(slots=True)
class RecvWR:
    wr_id: int
    sges: list = field(default_factory=list)


@dataclass(slots=True)
class Completion:
    """ibv_wc."""

    wr_id: int
    status: WcStatus
    opcode: WcOpcode
    qp_num: int
    byte_len: int = 0
    imm_data: int | None = None
    invalidated_rkey: int | None = None
    src_qp: int = 0
    vendor_err: int = 0

    @property
    def wc_flags(self) -> WcFlags:
        f = _NO_FLAGS
        if self.imm_data is not None:
            f |= WcFlags.WITH_IMM
        if self.invalidated_rkey is not None:
            f |= WcFlags.WITH_INV
        return f
