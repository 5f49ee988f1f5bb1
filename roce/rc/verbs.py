"""Verbs-level objects the RC transport consumes and produces: send and
receive work requests, work completions, access flags (values as in
libibverbs ``enum ibv_wr_opcode``, ``ibv_wc_status``, ``ibv_wc_opcode``,
``ibv_access_flags`` so the backend can pass them through unchanged).

Scatter/gather entries are writable memoryviews into guest memory: the
transport reads and writes them in place.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WrOpcode(enum.IntEnum):
    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4
    ATOMIC_CMP_AND_SWP = 5
    ATOMIC_FETCH_AND_ADD = 6
    SEND_WITH_INV = 9


class WcStatus(enum.IntEnum):
    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    FATAL_ERR = 19
    GENERAL_ERR = 21


class WcOpcode(enum.IntEnum):
    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    COMP_SWAP = 3
    FETCH_ADD = 4
    RECV = 128
    RECV_RDMA_WITH_IMM = 129


class WcFlags(enum.IntFlag):
    NONE = 0
    GRH = 1
    WITH_IMM = 2
    WITH_INV = 8


class Access(enum.IntFlag):
    NONE = 0
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8


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
        f = WcFlags.NONE
        if self.imm_data is not None:
            f |= WcFlags.WITH_IMM
        if self.invalidated_rkey is not None:
            f |= WcFlags.WITH_INV
        return f
