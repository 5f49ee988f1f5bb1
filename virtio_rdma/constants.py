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

# --------------------------------------------------------------------------
# Device configuration header (spec "Device configuration layout", "Carriers")
# --------------------------------------------------------------------------
#: le32 at config offset 0: the bytes b"RDMA". A driver identifies the device
#: by it (and the ABI version), never by the PCI device ID: a carrier
#: (vhost-user-blk-pci, ID 0x1042) or a borrowed virtio ID hides ours.
CONFIG_MAGIC = 0x414D4452
#: le16 at config offset 4: the version of this ABI (config layout, commands,
#: rings); a driver refuses a device whose version it does not know.
ABI_VERSION = 1
#: bytes of struct virtio_rdma_config (a front-end with a generic vhost-user
#: device sizes the config space with it)
CONFIG_SIZE = 64
#: every field a driver needs lies within the first CONFIG_CARRIER_SIZE bytes:
#: QEMU 7.2's vhost-user-blk carrier exposes 57 config bytes (virtio-blk's up to
#: write_zeroes_may_unmap), and 4-byte reads must stay inside them
CONFIG_CARRIER_SIZE = 56
#: le16 at this offset is left to the carrier: vhost-user-blk writes its
#: num_queues there (virtio_blk_config.num_queues); drivers ignore it
CONFIG_CARRIER_CLOBBERED = 34

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
    #: Accelerator queues: FFT and LTE Turbo jobs (spec "Accelerator queues").
    ACCEL = 3
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
    #: accelerator queues (VIRTIO_RDMA_F_ACCEL)
    QUERY_ACCEL = 15
    CREATE_AQ = 16
    DESTROY_AQ = 17
    CANCEL_AQ_JOB = 18
    #: the driver's device feature bits, for transports that cannot carry them
    #: (spec "Carriers"); answers the bits the device accepted
    ACK_FEATURES = 19


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
    #: value = new producer index of an accelerator queue (VIRTIO_RDMA_F_ACCEL)
    AQ = 4


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


# --------------------------------------------------------------------------
# Accelerator queues (spec "Accelerator queues", VIRTIO_RDMA_F_ACCEL)
# --------------------------------------------------------------------------
class AccelOp(_IntEnum):
    """The operation of an accelerator queue and of each of its jobs."""

    #: forward DFT, complex64 or complex128, [batch][n]
    FFT = 1
    #: inverse DFT (scaled by 1/n, as numpy.fft.ifft)
    IFFT = 2
    #: LTE Turbo encoder (3GPP TS 36.212 5.1.3.2): bits [batch][K] -> d(0..2) [batch][3][K+4]
    TURBO_ENCODE = 3
    #: max-log-MAP Turbo decoder: float32 LLRs [batch][3][K+4] -> bits [batch][K] + iterations [batch]
    TURBO_DECODE = 4


class AccelDtype(_IntEnum):
    """Element type of an FFT job (Turbo jobs: 0)."""

    COMPLEX64 = 0
    COMPLEX128 = 1


class AccelEarlyStop(_IntEnum):
    """Early stop of a Turbo decode job: the CRC a decoded block must pass."""

    NONE = 0
    CRC24A = 1
    CRC24B = 2


class AccelJobFlags(_IntFlag):
    """``flags`` of a job entry."""

    #: ``scaling`` holds an extrinsic scaling factor (float32); else plain max-log-MAP
    SCALING = 1


class AqFlags(_IntFlag):
    """Flags of CREATE_AQ."""

    #: run every job on ``target_host`` (a host id of QUERY_ACCEL's view; 0: this host)
    FORCE_TARGET = 1
    #: a job whose remote host fails is placed again (on another host that runs it, this
    #: one included; a FORCE_TARGET job on this host only), instead of completing REMOTE_FAILED
    LOCAL_FALLBACK = 2


class AccelStatus(_IntEnum):
    """Why an accelerator job completed as it did (the CQE's ``wc_flags`` byte)."""

    SUCCESS = 0
    #: a job parameter is outside what the operation supports (size, K, dtype, batch,
    #: iterations, scaling, early stop, SGE counts, a job op other than the queue's)
    INVALID_PARAMS = 1
    #: an input or output SGE is not the guest's to use (lkey, PD, bounds; output
    #: without LOCAL_WRITE)
    LOCAL_PROT = 2
    #: the input or output scatter list is shorter than the job needs
    LOCAL_LEN = 3
    #: no reachable host runs this operation
    NO_ACCELERATOR = 4
    #: the host running the job failed or went away
    REMOTE_FAILED = 5
    #: CANCEL_AQ_JOB took it before it started
    CANCELLED = 6
    #: the queue was destroyed (or the device reset) before it ran
    FLUSHED = 7
    #: the tenant's accelerator quota refused it (in-flight jobs or accelerator-seconds
    #: per minute; vhost_user.tenancy, docs/tenants.md); nothing ran, the queue works on
    QUOTA_EXCEEDED = 8


#: The CQE ``opcode`` of an accelerator completion: ACCEL_CQE_OPCODE_BASE | AccelOp
#: (a range libibverbs' ibv_wc_opcode does not use).
ACCEL_CQE_OPCODE_BASE = 0xC0
#: Bytes of one accelerator-queue slot: a 64-byte job header and up to
#: MAX_ACCEL_SGE 16-byte SGEs (inputs first, then outputs).
AQ_SLOT_SIZE = 256
MAX_ACCEL_SGE = 12
#: Most ops QUERY_ACCEL describes.
MAX_ACCEL_OPS = 8
