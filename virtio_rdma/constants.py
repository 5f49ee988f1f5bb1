"""Numbers of the virtio-rdma device ABI (docs/virtio-rdma.md): the device
id, virtqueues, feature bits, control commands and statuses, event kinds,
doorbell kinds and flags.

The verbs-level numbers the device carries (WR/WC opcodes, WC statuses,
access and send flags, QP types, states and attribute mask bits, async
events, MTU, PSNs) are libibverbs'/IBTA's and live in :mod:`verbs`, not
here.

Use ``Enum.parse(value)`` to convert an untrusted number: an unknown value
raises :class:`~verbs.errors.UnknownValueError` (also
``virtio_rdma.errors.UnknownValueError``), never ``KeyError``/``ValueError``
from the enum machinery.
"""
from __future__ import annotations

import enum

from verbs.ibta import QPN_MASK
from verbs.parse import ParseIntEnum as _IntEnum, ParseIntFlag as _IntFlag

VIRTIO_ID_RDMA = 42

#: Virtqueue indexes (spec "Virtqueues").
CONTROLQ = 0
DOORBELLQ = 1
EVENTQ = 2
NUM_QUEUES = 3


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


class EventKind(_IntEnum):
    """Event record kinds on the eventq (spec "Events")."""

    COMPLETION = 1
    ASYNC = 2


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


#: Object numbers (QPNs, and CQNs and PDNs like them) are 24-bit: the
#: doorbell record packs the kind in bits 24..31.
OBJ_NUM_MASK = QPN_MASK
