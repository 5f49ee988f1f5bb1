"""The libibverbs enumerations, with the numbers of rdma-core's
``<infiniband/verbs.h>`` (``enum ibv_qp_type``, ``ibv_qp_state``,
``ibv_qp_attr_mask``, ``ibv_access_flags``, ``ibv_wr_opcode``,
``ibv_send_flags``, ``ibv_wc_opcode``, ``ibv_wc_status``, ``ibv_wc_flags``,
``ibv_event_type``, ``ibv_mtu``, ``ibv_port_state``, ``IBV_LINK_LAYER_*``,
``ibv_atomic_cap``); the member names are the C names without their
``IBV_<ENUM>_`` prefix. guest_lib hands them to pyverbs-shaped code
unchanged, the device writes them into CQEs, the RoCE transport produces
them: this module is their one definition (tests/verbs checks it against
``pyverbs.enums``; ``verbs/_verbs.pxd`` repeats what Cython needs, checked
against this module).

Convert an untrusted number with ``Enum.parse(value)``: an unknown value
raises :class:`~verbs.errors.UnknownValueError`.
"""
from __future__ import annotations

import enum

from verbs.parse import ParseIntEnum, ParseIntFlag

__all__ = [
    "QpType", "QpState", "QpAttrMask", "Access", "WrOpcode", "SendFlags", "WcOpcode", "WcStatus",
    "WcFlags", "AsyncEvent", "Mtu", "PortState", "LinkLayer", "AtomicCap", "C_PREFIX", "c_name",
    "wc_status_str",
]


class QpType(ParseIntEnum):
    """enum ibv_qp_type (the device implements RC only)."""

    RC = 2
    UC = 3
    UD = 4


class QpState(ParseIntEnum):
    """enum ibv_qp_state."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class QpAttrMask(ParseIntFlag):
    """enum ibv_qp_attr_mask."""

    STATE = 1 << 0
    CUR_STATE = 1 << 1
    EN_SQD_ASYNC_NOTIFY = 1 << 2
    ACCESS_FLAGS = 1 << 3
    PKEY_INDEX = 1 << 4
    PORT = 1 << 5
    QKEY = 1 << 6
    AV = 1 << 7
    PATH_MTU = 1 << 8
    TIMEOUT = 1 << 9
    RETRY_CNT = 1 << 10
    RNR_RETRY = 1 << 11
    RQ_PSN = 1 << 12
    MAX_QP_RD_ATOMIC = 1 << 13
    ALT_PATH = 1 << 14
    MIN_RNR_TIMER = 1 << 15
    SQ_PSN = 1 << 16
    MAX_DEST_RD_ATOMIC = 1 << 17
    PATH_MIG_STATE = 1 << 18
    CAP = 1 << 19
    DEST_QPN = 1 << 20


class Access(ParseIntFlag):
    """enum ibv_access_flags (the subset this device accepts)."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8
    MW_BIND = 16
    ZERO_BASED = 32
    ON_DEMAND = 64
    RELAXED_ORDERING = 1 << 20


class WrOpcode(ParseIntEnum):
    """enum ibv_wr_opcode."""

    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4
    ATOMIC_CMP_AND_SWP = 5
    ATOMIC_FETCH_AND_ADD = 6
    LOCAL_INV = 7
    BIND_MW = 8
    SEND_WITH_INV = 9


class SendFlags(ParseIntFlag):
    """enum ibv_send_flags."""

    FENCE = 1
    SIGNALED = 2
    SOLICITED = 4
    INLINE = 8
    IP_CSUM = 16


class WcOpcode(ParseIntEnum):
    """enum ibv_wc_opcode."""

    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    COMP_SWAP = 3
    FETCH_ADD = 4
    BIND_MW = 5
    LOCAL_INV = 6
    TSO = 7
    RECV = 128
    RECV_RDMA_WITH_IMM = 129


class WcStatus(ParseIntEnum):
    """enum ibv_wc_status."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21
    TM_ERR = 22
    TM_RNDV_INCOMPLETE = 23


class WcFlags(ParseIntFlag):
    """enum ibv_wc_flags (+ bit 7: the completion answers a solicited request)."""

    GRH = 1
    WITH_IMM = 2
    IP_CSUM_OK = 4
    WITH_INV = 8
    TM_SYNC_REQ = 16
    TM_MATCH = 32
    TM_DATA_VALID = 64


class AsyncEvent(ParseIntEnum):
    """enum ibv_event_type."""

    CQ_ERR = 0
    QP_FATAL = 1
    QP_REQ_ERR = 2
    QP_ACCESS_ERR = 3
    COMM_EST = 4
    SQ_DRAINED = 5
    PATH_MIG = 6
    PATH_MIG_ERR = 7
    DEVICE_FATAL = 8
    PORT_ACTIVE = 9
    PORT_ERR = 10
    LID_CHANGE = 11
    PKEY_CHANGE = 12
    SM_CHANGE = 13
    SRQ_ERR = 14
    SRQ_LIMIT_REACHED = 15
    QP_LAST_WQE_REACHED = 16
    CLIENT_REREGISTER = 17
    GID_CHANGE = 18


class Mtu(ParseIntEnum):
    """enum ibv_mtu."""

    MTU_256 = 1
    MTU_512 = 2
    MTU_1024 = 3
    MTU_2048 = 4
    MTU_4096 = 5

    @property
    def bytes(self) -> int:
        """The MTU in bytes: 256 << (value - 1)."""
        return 128 << self.value


class PortState(ParseIntEnum):
    """enum ibv_port_state."""

    NOP = 0
    DOWN = 1
    INIT = 2
    ARMED = 3
    ACTIVE = 4
    ACTIVE_DEFER = 5


class LinkLayer(ParseIntEnum):
    """IBV_LINK_LAYER_*."""

    UNSPECIFIED = 0
    INFINIBAND = 1
    ETHERNET = 2


class AtomicCap(ParseIntEnum):
    """enum ibv_atomic_cap."""

    NONE = 0
    HCA = 1
    GLOB = 2


#: The libibverbs C name of a member is ``C_PREFIX[type(m)] + m.name``
#: (``IBV_WR_`` + ``SEND``); pyverbs.enums, guest_lib.enums and
#: verbs/_verbs.pxd use these names.
C_PREFIX: dict[type[enum.IntEnum] | type[enum.IntFlag], str] = {
    QpType: "IBV_QPT_", QpState: "IBV_QPS_", QpAttrMask: "IBV_QP_", Access: "IBV_ACCESS_",
    WrOpcode: "IBV_WR_", SendFlags: "IBV_SEND_", WcOpcode: "IBV_WC_", WcStatus: "IBV_WC_",
    WcFlags: "IBV_WC_", AsyncEvent: "IBV_EVENT_", Mtu: "IBV_", PortState: "IBV_PORT_",
    LinkLayer: "IBV_LINK_LAYER_", AtomicCap: "IBV_ATOMIC_",
}


def c_name(member) -> str:
    """libibverbs' C name of an enum member: ``c_name(WrOpcode.SEND) == "IBV_WR_SEND"``."""
    return C_PREFIX[type(member)] + member.name


#: libibverbs' ``ibv_wc_status_str()`` strings (rdma-core libibverbs/enum_strs.c)
_WC_STATUS_STR: dict[int, str] = {
    WcStatus.SUCCESS: "success", WcStatus.LOC_LEN_ERR: "local length error",
    WcStatus.LOC_QP_OP_ERR: "local QP operation error",
    WcStatus.LOC_EEC_OP_ERR: "local EE context operation error",
    WcStatus.LOC_PROT_ERR: "local protection error", WcStatus.WR_FLUSH_ERR: "Work Request Flushed Error",
    WcStatus.MW_BIND_ERR: "memory management operation error", WcStatus.BAD_RESP_ERR: "bad response error",
    WcStatus.LOC_ACCESS_ERR: "local access error", WcStatus.REM_INV_REQ_ERR: "remote invalid request error",
    WcStatus.REM_ACCESS_ERR: "remote access error", WcStatus.REM_OP_ERR: "remote operation error",
    WcStatus.RETRY_EXC_ERR: "transport retry counter exceeded",
    WcStatus.RNR_RETRY_EXC_ERR: "RNR retry counter exceeded",
    WcStatus.LOC_RDD_VIOL_ERR: "local RDD violation error",
    WcStatus.REM_INV_RD_REQ_ERR: "remote invalid RD request", WcStatus.REM_ABORT_ERR: "aborted error",
    WcStatus.INV_EECN_ERR: "invalid EE context number",
    WcStatus.INV_EEC_STATE_ERR: "invalid EE context state",
    WcStatus.FATAL_ERR: "fatal error", WcStatus.RESP_TIMEOUT_ERR: "response timeout error",
    WcStatus.GENERAL_ERR: "general error", WcStatus.TM_ERR: "TM error",
    WcStatus.TM_RNDV_INCOMPLETE: "TM software rendezvous",
}


def wc_status_str(status: int) -> str:
    """``ibv_wc_status_str(status)``: "unknown" for a value that is not a WcStatus."""
    return _WC_STATUS_STR.get(status, "unknown")
