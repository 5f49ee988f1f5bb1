"""The sans-I/O core of one virtio-rdma device instance (one guest).

Spec: docs/virtio-rdma.md. The vhost-user device (``virtio_rdma.device``)
feeds it the bytes of controlq requests, doorbellq buffers and the current
time, and delivers what :meth:`RdmaDeviceCore.process` returns to the eventq.
The core reads WQEs from and writes CQEs to guest memory through
``mem.translate`` (a :class:`virtio.memory.GuestMemory`) and reaches peer QPs
through a :class:`~fabric.base.Fabric`. It does no I/O, keeps no
clock (``now`` is a monotonic time in seconds, passed in) and never lets an
exception escape: a misbehaving guest gets error statuses, error completions,
async events and counters (:class:`~virtio_rdma.metrics.Metrics`).

:class:`RdmaDeviceCore` owns the device's state (its PDs, CQs, MRs and QPs,
the event queue, the QPs with timers); what happens to it lives by concern:

* :mod:`virtio_rdma.control`: the control commands (one handler each) and
  resource charging to the tenant account;
* :mod:`virtio_rdma.doorbells`: doorbellq records and doorbell records;
* :mod:`virtio_rdma.events`: completion and async events, notification;
* :mod:`virtio_rdma.timers`: retransmission and RNR deadlines;
* :mod:`virtio_rdma.datapath`: the RC requester and responder.

Public API::

    core = RdmaDeviceCore(mem, fabric, limits=DeviceLimits())
    resp: bytes = core.handle_control(request_bytes, now)
    core.doorbell(doorbell_buffer_bytes, now)      # or a list of wire.Doorbell
    result = core.process(now)  # -> ProcessResult(events=[wire.Event...], next_deadline)
    core.config_bytes()         # struct virtio_rdma_config
    core.notify = callback      # called when a peer's request queued events here
    core.close()                # destroy every QP (detach from the fabric)

Accelerator queues (:mod:`virtio_rdma.accel`): ``RdmaDeviceCore(...,
accel_router=AccelRouter(service))`` offers them; the router is the daemon's,
shared by its devices.

Tenant limits: ``RdmaDeviceCore(..., account=TenantAccount)`` charges every
PD, CQ, MR (and its bytes) and QP (and its ring entries) to the connection's
account (:mod:`vhost_user.tenancy`), see :mod:`virtio_rdma.control`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fabric.base import Fabric
from verbs import Mtu
from vhost_user.tenancy import TenantAccount, TenantPolicy
from virtio_rdma import accel, control, doorbells, events, timers
from virtio_rdma.cq import CompletionQueue
from virtio_rdma.datapath import DbrecScanner
from virtio_rdma.metrics import Metrics
from virtio_rdma.mr import MrTable
from virtio_rdma.qp import QueuePair
from virtio_rdma.timers import ProcessResult
from virtio_rdma.wire import Event, encode_config

__all__ = ["DeviceLimits", "ProcessResult", "RdmaDeviceCore"]

_POLICY_DEFAULTS = TenantPolicy()  # the object caps are defined once, there


@dataclass(frozen=True)
class DeviceLimits:
    """What one device instance reports in QUERY_DEVICE and enforces. The
    object caps are the tenant policy's per-connection caps
    (``vhost_user.tenancy.TenantPolicy``, whose defaults they take): a connection filled
    to them costs the daemon about 5 MB (QP ~2.2 KiB, CQ ~0.5 KiB, MR ~0.6 KiB,
    PD ~0.3 KiB; measured, see bench/isolation_bench.py)."""

    max_qp: int = _POLICY_DEFAULTS.max_qp
    max_cq: int = _POLICY_DEFAULTS.max_cq
    max_mr: int = _POLICY_DEFAULTS.max_mr
    max_pd: int = _POLICY_DEFAULTS.max_pd
    max_qp_wr: int = 4096
    max_cqe: int = 65536
    max_sge: int = 16
    max_inline_data: int = 256
    max_mr_chunks: int = 65536
    max_mr_size: int = 1 << 40
    max_qp_rd_atom: int = 16
    max_msg_sz: int = 1 << 31
    active_mtu: Mtu = Mtu.MTU_4096
    max_pending_events: int = 1 << 16
    #: accelerator queues per device (VIRTIO_RDMA_F_ACCEL)
    max_aq: int = 64
    node_guid: int = 0x5652_444D_4100_0001


class RdmaDeviceCore:
    """One guest's device: its objects and the entry points of each concern
    (the methods below are those modules' functions, bound to the core)."""

    def __init__(self, mem, fabric: Fabric, *, limits: DeviceLimits | None = None,
                 poll_doorbell_records: bool = False, account: TenantAccount | None = None,
                 accel_router: accel.AccelRouter | None = None):
        self.mem = mem
        #: where accelerator jobs run (None: no accelerator queues, EOPNOTSUPP)
        self.accel = accel_router
        #: this device's guest id in the shared accelerators' fair queues
        self.accel_guest = accel_router.new_guest_id() if accel_router is not None else 0
        self.aqs: dict[int, accel.AccelQueue] = {}
        #: bytes of daemon memory this device's accelerator jobs hold as temporaries
        #: (scattered or misaligned guest buffers), bounded by accel.MAX_TEMP_BYTES
        self.accel_temp_bytes = 0
        #: AQNs that stopped fetching jobs until temporaries are released
        self.accel_stalled: set[int] = set()
        self.next_aqn = 1
        #: the connection's tenant account (None: no budgets beyond ``limits``)
        self.account = account
        self.fabric = fabric
        self.limits = limits or DeviceLimits()
        #: DBREC_POLL negotiated: doorbell records are read, doorbells may be stale
        self.poll_doorbell_records = poll_doorbell_records
        #: the device feature bits (0..31) this device offers: the config's
        #: device_features, what ACK_FEATURES may accept (set by the glue)
        self.offered_features = 0
        #: the bits ACK_FEATURES accepted (None: never sent; the transport's rule)
        self.acked_by_command: int | None = None
        self.metrics = Metrics()
        if account is not None:  # per-tenant accounting of RDMA bytes (vhost_user.tenancy)
            account.set_byte_counters(self.metrics)
        #: the guest's objects on a host RDMA device (verbs fabric; it may lower
        #: the limits to the device's), else None
        self.hw = fabric.bind(self)
        self.mrs = MrTable(self.limits.max_mr, self.limits.max_mr_chunks, self.limits.max_mr_size)
        self.pds: dict[int, int] = {}  # pdn -> QP reference count
        self.cqs: dict[int, CompletionQueue] = {}
        self.qps: dict[int, QueuePair] = {}
        self.next_pdn = 1
        self.next_cqn = 1
        #: eventq records not yet taken by process() (events.py)
        self.event_queue: deque[Event] = deque()
        #: QPNs with a possible deadline (timers.py)
        self.timer_qps: set[int] = set()
        #: bumped by every CREATE_QP: with len(qps), when to rebuild the scanner
        self.qp_epoch = 0
        self.dbrec_scanner = DbrecScanner() if DbrecScanner is not None else None
        #: called when events were queued outside a call into the core
        self.notify: Callable[[], None] | None = None
        #: calls into the core under way (notification waits for their end)
        self.in_call = 0

    handle_control = control.handle_control
    doorbell = doorbells.doorbell
    poll = doorbells.poll
    process = timers.process
    complete = events.complete
    async_event = events.async_event
    queue_event = events.queue_event

    @property
    def pending_events(self) -> int:
        return len(self.event_queue)

    @property
    def has_timers(self) -> bool:
        """Some QP may have a deadline (process() must run to learn when)."""
        return bool(self.timer_qps)

    def config_bytes(self) -> bytes:
        """struct virtio_rdma_config (spec 5.1)."""
        L = self.limits
        return encode_config(device_features=self.offered_features & 0xFFFF_FFFF, phys_port_cnt=1,
                             max_qp=L.max_qp, max_cq=L.max_cq, max_mr=L.max_mr, max_pd=L.max_pd,
                             max_qp_wr=L.max_qp_wr, max_cqe=L.max_cqe, max_sge=L.max_sge,
                             max_inline_data=L.max_inline_data, node_guid=L.node_guid)

    def close(self) -> None:
        """Destroy every QP (detaching them from the fabric) and forget all objects."""
        accel.drop_all(self)
        for qp in list(self.qps.values()):
            control.drop_qp(self, qp)
        if self.dbrec_scanner is not None:  # it holds the QPs: let them go with their refs
            self.dbrec_scanner.rebuild((), None)
        self.mrs.clear()
        self.cqs.clear()
        self.pds.clear()
        self.event_queue.clear()
        if self.account is not None:  # every object is gone: so is its charge
            self.account.release_all()
        if self.hw is not None:
            hw, self.hw = self.hw, None
            hw.close()
