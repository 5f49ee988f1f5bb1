"""Numbers of the virtio-rdma device ABI (docs/virtio-rdma.md).

Every enumeration carries the spec's ids. Verbs-level enumerations (WR/WC
opcodes, WC statuses, access flags, QP states, QP attribute mask bits, async
event types) use exactly the numbers of libibverbs ``<infiniband/verbs.h>``
so guest_lib can hand them to pyverbs-shaped code unchanged.

Use :func:`parse` (or ``Enum.parse(value)``) to convert an untrusted number:
an unknown value raises :class:`~virtio_rdma.errors.UnknownValueError`, never
``KeyError``/``ValueError`` from the enum machinery.
"""
from __future__ import annotations

import enum

from virtio_rdma.errors import UnknownValueError

VIRTIO_ID_RDMA = 42

#: Virtqueue indexes (spec "Virtqueues").
CONTROLQ = 0
DOORBELLQ = 1
EVENTQ = 2
NUM_QUEUES = 3


class _Parse:
    @classmethod
    def parse(cls, value):
        # The enum's own value -> member map first: the lookup ``cls(value)``
        # starts with, without its call overhead (WQE, CQE and doorbell
        # decoding parse on every operation).
        try:
            member = cls._value2member_map_.get(value)
        except TypeError:  # unhashable: cls() says what is wrong with it
            member = None
        if member is not None:
            return member
        try:
            return cls(value)
        except ValueError:
            raise UnknownValueError(f"{value!r} is not a valid {cls.__name__}") from None


class _IntEnum(_Parse, enum.IntEnum):
    pass


class _IntFlag(_Parse, enum.IntFlag, boundary=enum.STRICT):
    @classmethod
    def parse(cls, value):
        try:  # valid values only (STRICT never caches others)
            member = cls._value2member_map_.get(value)
        except TypeError:  # unhashable: int() says what is wrong with it
            member = None
        if member is not None:
            return member
        value = int(value)
        allowed = cls.all_bits()
        if value & ~allowed:
            raise UnknownValueError(
                f"{cls.__name__} value {value:#x} has unknown bits {value & ~allowed:#x}"
            )
        return cls(value)

    @classmethod
    def all_bits(cls) -> int:
        v = cls.__dict__.get("_all_bits_cache")
        if v is None:
            v = 0
            for m in cls:
                v |= m.value
            type.__setattr__(cls, "_all_bits_cache", v)
        return v


def parse(enum_cls, value):
    """Convert an untrusted number to ``enum_cls`` or raise UnknownValueError."""
    return enum_cls.parse(value)


class Feature(enum.IntEnum):
    """Device feature bits (spec "Feature bits")."""

    #: The device polls the per-QP/CQ doorbell records in guest memory.
    DBREC_POLL = 0
    #: SQ WQEs may carry inline data (IBV_SEND_INLINE).
    INLINE_DATA = 1
    #: ATOMIC_CMP_AND_SWP / ATOMIC_FETCH_AND_ADD are supported.
    ATOMIC = 2
    VERSION_1 = 32


class Cmd(_IntEnum):
    """Control-queue command codes (spec "Control commands")."""

    QUERY_DEVICE = 1
    QUERY_PORT = 2
    QUERY_GID = 3
    ALLOC_PD = 4
    DEALLOC_PD = 5
    CREATE_CQ = 6
    DESTROY_CQ = 7
    REQ_NOTIFY_CQ = 8
    REG_MR = 9
    DEREG_MR = 10
    CREATE_QP = 11
    MODIFY_QP = 12
    QUERY_QP = 13
    DESTROY_QP = 14


class Status(_IntEnum):
    """Control command status: 0 or a Linux errno number (spec "Status codes")."""

    OK = 0
    EPERM = 1
    ENOENT = 2
    EIO = 5
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28
    ERANGE = 34
    ENOSYS = 38
    EOPNOTSUPP = 95


class QpType(_IntEnum):
    """enum ibv_qp_type (only RC is implemented by this device)."""

    RC = 2
    UC = 3
    UD = 4


class QpState(_IntEnum):
    """enum ibv_qp_state."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class QpAttrMask(_IntFlag):
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


class Access(_IntFlag):
    """enum ibv_access_flags (the subset this device accepts)."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8
    MW_BIND = 16
    ZERO_BASED = 32
    ON_DEMAND = 64
    RELAXED_ORDERING = 1 << 20


class WrOpcode(_IntEnum):
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


class SendFlags(_IntFlag):
    """enum ibv_send_flags."""

    FENCE = 1
    SIGNALED = 2
    SOLICITED = 4
    INLINE = 8
    IP_CSUM = 16


class WcOpcode(_IntEnum):
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


class WcStatus(_IntEnum):
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


class WcFlags(_IntFlag):
    """enum ibv_wc_flags (+ bit 7: the completion answers a solicited request)."""

    GRH = 1
    WITH_IMM = 2
    IP_CSUM_OK = 4
    WITH_INV = 8
    TM_SYNC_REQ = 16
    TM_MATCH = 32
    TM_DATA_VALID = 64


class EventKind(_IntEnum):
    """Event record kinds on the eventq (spec "Events")."""

    COMPLETION = 1
    ASYNC = 2


class AsyncEvent(_IntEnum):
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


class DoorbellKind(_IntEnum):
    """Kind field (bits 24..31) of a doorbell record (spec "Doorbells")."""

    SQ = 1
    RQ = 2
    CQ_ARM = 3


class CqArm(_IntFlag):
    """Value of a CQ_ARM doorbell / flags of REQ_NOTIFY_CQ."""

    #: Notify only on the next solicited (or error) completion
    #: (ibv_req_notify_cq(cq, 1)); without it: on the next completion.
    SOLICITED_ONLY = 1


class CreateQpFlags(_IntFlag):
    """Flags of CREATE_QP."""

    #: ibv_qp_init_attr.sq_sig_all: every send WR completes signaled.
    SQ_SIG_ALL = 1


class Mtu(_IntEnum):
    """enum ibv_mtu."""

    MTU_256 = 1
    MTU_512 = 2
    MTU_1024 = 3
    MTU_2048 = 4
    MTU_4096 = 5

    @property
    def bytes(self) -> int:
        return 128 << self.value


class PortState(_IntEnum):
    """enum ibv_port_state."""

    NOP = 0
    DOWN = 1
    INIT = 2
    ARMED = 3
    ACTIVE = 4
    ACTIVE_DEFER = 5


class LinkLayer(_IntEnum):
    """IBV_LINK_LAYER_*."""

    UNSPECIFIED = 0
    INFINIBAND = 1
    ETHERNET = 2


class AtomicCap(_IntEnum):
    """enum ibv_atomic_cap."""

    NONE = 0
    HCA = 1
    GLOB = 2


#: IBTA table 45: encoded min_rnr_timer (5 bits) -> delay in seconds.
RNR_TIMER_SECONDS = (
    655.36e-3, 0.01e-3, 0.02e-3, 0.03e-3, 0.04e-3, 0.06e-3, 0.08e-3, 0.12e-3,
    0.16e-3, 0.24e-3, 0.32e-3, 0.48e-3, 0.64e-3, 0.96e-3, 1.28e-3, 1.92e-3,
    2.56e-3, 3.84e-3, 5.12e-3, 7.68e-3, 10.24e-3, 15.36e-3, 20.48e-3, 30.72e-3,
    40.96e-3, 61.44e-3, 81.92e-3, 122.88e-3, 163.84e-3, 245.76e-3, 327.68e-3, 491.52e-3,
)


def rnr_timer_seconds(code: int) -> float:
    """Delay for an encoded min_rnr_timer value (0..31)."""
    if not 0 <= code <= 31:
        raise UnknownValueError(f"min_rnr_timer {code} is not in 0..31")
    return RNR_TIMER_SECONDS[code]


def ack_timeout_seconds(code: int) -> float | None:
    """Local ACK timeout 4.096 us * 2**code; code 0 means infinite (None)."""
    if not 0 <= code <= 31:
        raise UnknownValueError(f"timeout {code} is not in 0..31")
    if code == 0:
        return None
    return 4.096e-6 * (1 << code)


#: rnr_retry value meaning "retry forever".
RNR_RETRY_INFINITE = 7

#: PSNs are 24-bit.
PSN_MASK = (1 << 24) - 1
#: QPNs and CQNs are 24-bit (the doorbell record packs the kind in bits 24..31).
OBJ_NUM_MASK = (1 << 24) - 1
