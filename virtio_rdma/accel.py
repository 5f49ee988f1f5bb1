"""Accelerator queues of a virtio-rdma device: FFT and LTE Turbo jobs
(spec docs/virtio-rdma.md 5.x.6.10, VIRTIO_RDMA_F_ACCEL).

The model is DPDK bbdev's: a queue (:class:`AccelQueue`) is created with one
operation and a priority; the driver writes 256-byte job entries into its
ring, publishes the producer index and rings a kind 4 doorbell; the device
fetches each job, checks it (syntax: :func:`virtio_rdma.wire.decode_accel_job`;
semantics here: the queue's op, a size / K / batch / dtype / iterations /
scaling the operation supports -- accel_core's own checks --, and every SGE
against the MR table as any local access of the guest), and hands it to a
target. Completions are CQEs on the queue's CQ, written in the order the jobs
were posted (a finished job waits behind an earlier one still running).

Roles:

* :class:`AccelRouter` -- one per daemon, shared by all devices: owns the
  targets a job may run on. This slice has one, :class:`LocalTarget` (the
  host's :class:`accel_core.AcceleratorService`, fair across guests); remote
  targets (another host's accelerators over the fabric) plug in beside it.
  Kernels run in the service's worker threads; a finished job lands in an
  accelerator's ready queue, whose notifier wakes the daemon's event loop
  (``loop.call_soon_threadsafe``, once per batch: jobs finishing while a
  wake-up is pending ride along), where :meth:`AccelRouter.deliver` hands
  each job back to its queue. Nothing of a device's state is touched outside
  the event loop's thread.
* Small jobs (the service's model estimates them at most
  :data:`INLINE_MAX_SECONDS`) run in the loop's thread when their
  accelerator has a free unit and nothing queued, as DPDK's software bbdev
  devices do the work inside enqueue: the plain case of an FFT / IFFT on a
  queue without flags entirely natively (``virtio_rdma._accel.NativeJobs``,
  from the hook at the top of :func:`fetch`: slot, checks, kernel and CQE
  without Python per job), any other through :func:`start` and the
  service's inline mode. A native call that emptied a queue holding one job
  watches its doorbell record for :data:`NATIVE_SPIN_SECONDS` (a driver
  that acked DBREC_POLL): a guest submitting one job at a time gets its next
  one run without a doorbell and a wake-up of the loop.
* Kernels in worker threads take the GIL back from a busy loop within the
  daemon's switch interval, which the router lowers to
  :data:`SWITCH_INTERVAL_SECONDS` (CPython's 5 ms was a queue wait of
  milliseconds behind a 150 us job).
* The control handlers (:func:`query_accel`, :func:`create_aq`,
  :func:`destroy_aq`, :func:`cancel_aq_job`) and the doorbell
  (:func:`ring_aq`) take the device core, like the other concerns'.

Guest memory: a job's input and output are the memoryviews the MR checks
returned (views keep the mapping alive: the memory is never unmapped under
them). A single contiguous, aligned output view is used in place (numpy over
guest memory, zero copy); otherwise the output is a temporary scattered back
on completion. The input is used in place likewise, unless it is scattered,
misaligned or overlaps the output (then it is gathered into a temporary). A
failed job writes nothing. DESTROY_AQ cancels every job not yet started
(FLUSHED); a running one finishes first, and the queue's CQEs follow in
order; the queue is released when the last one is written. A device reset
or close drops every queue: running jobs finish into their own buffers but
nothing more is written.

Priority: a job carries its queue's priority into the service's fair
receive queue (:class:`accel_core.queues.FairQueue`), which picks the guest
(device) by fairness first and then that guest's highest-priority waiting job:
a device's priority-7 queue overtakes its own priority-0 queues, never
another guest's share.

Tenants (:meth:`AccelRouter.set_tenancy`, docs/tenants.md): with the daemon's
TenantLedger the fair queue serves the device's *tenant class* first and
shares time by its *weight* (the router's classifier, read live). Native
slices, which the fair queue never sees, follow the same order while guests
contend (:meth:`AccelRouter.native_turn`): a doorbell whose guest is not first
(a waiting guest of a higher class, or of its class with fewer weighted turns
taken) leaves its jobs in the ring for the guest's turn, and the turns go by
class (aging: one class higher per ``aging_seconds`` waited), then start-time
fair queueing in turns (a turn costs 1 / weight), so tenants of weights 3 and
1 that both keep jobs queued get 3 turns to 1. Each
job takes its tenant's accelerator quota before it is placed (refused:
QUOTA_EXCEEDED, nothing run); every admitted job that ends gives the quota
back and, with accounting, adds to its tenant's row. A job sent to a peer
carries its tenant and class (peering.wire.JobMsg).

Doorbell records: the driver writes ``pi`` to the queue's record before it
rings. Under DBREC_POLL the daemon's busy-poll loop (and every timer pass)
reads the records too (:func:`poll_records`): a changed one is applied like
a kind 4 doorbell; a doorbell or record behind the producer index already
applied is stale (ignored); an absurd one is counted once per value written.

Remote hosts: :class:`RemoteTarget` s (:mod:`peering.remote`, one per peer
daemon) sit beside :class:`LocalTarget`; :meth:`AccelRouter.place` chooses
(FORCE_TARGET's host; else this host if it runs the operation; else the
first peer that does). A remote job runs on the guest's buffers there too:
the peer reads the input and writes the output straight into guest memory
over RDMA, and the target calls :func:`settle`. A job a peer gives back
unrun (it failed, went away or refused) runs here if its queue asked for
LOCAL_FALLBACK and this host can, else completes REMOTE_FAILED: it is never
forwarded to a second host.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from accel_core import dft, qpp, turbo
from accel_core.errors import AccelError, InvalidInput, ParameterError
from accel_core.jobs import MAX_PRIORITY, Job, JobState, Op
from accel_core.service import Accelerator, AcceleratorService
from verbs import Access
from vhost_user.tenancy import LimitExceeded, Resource
from virtio.errors import GuestMemoryError
from virtio.memory import le32_words
from virtio_rdma.constants import (
    AQ_SLOT_SIZE,
    MAX_ACCEL_OPS,
    OBJ_NUM_MASK,
    AccelDtype,
    AccelEarlyStop,
    AccelOp,
    AccelStatus,
    AqFlags,
    Status,
)
from virtio_rdma.datapath import DbrecScanner
from virtio_rdma.errors import CommandError, MemoryAccessError, UnknownValueError, VirtioRdmaError
from virtio_rdma.events import complete, core_call
from virtio_rdma.mr import sg_copy
from virtio_rdma.wire import (
    DBREC_SIZE,
    AccelCompletion,
    AccelJob,
    AccelOpInfo,
    CancelAqJobReq,
    CreateAqReq,
    CreateAqResp,
    DestroyAqReq,
    Empty,
    QueryAccelResp,
    decode_accel_job,
)

try:  # the native path for small FFT / IFFT jobs run in the loop (virtio_rdma/_accel.pyx)
    from virtio_rdma._accel import NativeJobs
except ImportError:  # extension not built: every job takes the Python path
    NativeJobs = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from virtio_rdma.core import RdmaDeviceCore
    from virtio_rdma.cq import CompletionQueue

log = logging.getLogger(__name__)
U32 = 1 << 32
#: accel_core's operation of each wire operation
CORE_OP = {AccelOp.FFT: Op.FFT, AccelOp.IFFT: Op.IFFT, AccelOp.TURBO_ENCODE: Op.TURBO_ENCODE,
           AccelOp.TURBO_DECODE: Op.TURBO_DECODE}
NP_DTYPE: dict[AccelDtype, np.dtype] = {AccelDtype.COMPLEX64: np.dtype(np.complex64),
                                      AccelDtype.COMPLEX128: np.dtype(np.complex128)}
_EARLY_STOP = {AccelEarlyStop.NONE: None, AccelEarlyStop.CRC24A: "crc24a", AccelEarlyStop.CRC24B: "crc24b"}
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
#: most transforms / code blocks of one job (QUERY_ACCEL's max_batch)
MAX_BATCH = 65536
#: most bytes of a job's input or output (INVALID_PARAMS beyond): bounds the
#: daemon's temporaries for a scattered or misaligned job
MAX_JOB_BYTES = 64 << 20
#: Temporaries one device's jobs may hold at once. Past it, its queues stop
#: fetching jobs (they stay in the rings) until finished jobs release theirs:
#: a guest cannot make the daemon hold more than this plus one job's
#: temporaries, however many queues and slots it has.
MAX_TEMP_BYTES = 256 << 20
#: A job the service's model estimates at most this long runs in the daemon's
#: loop thread when its accelerator is idle (DPDK's software bbdev devices do the
#: work inside enqueue): a worker hand-off and a cross-thread wake-up cost more
#: than a small FFT. Bounds how long one job can hold the loop.
INLINE_MAX_SECONDS = 30e-6
#: The native path (plain FFT / IFFT jobs, virtio_rdma._accel) runs a job in the
#: loop's thread when the service's model estimates it at most this long or it
#: has at most NATIVE_MAX_POINTS points, and gives a shape up once it measured
#: its kernel's CPU time over 4 x this on average here (a slow host): a 16 x 2048
#: batch (50-300 us on a shared 2-vCPU EPYC) is in, a 64 x 8192 one is out.
NATIVE_MAX_SECONDS = 200e-6
NATIVE_MAX_POINTS = 32768
#: Loop time one queue's native jobs take before the loop serves anything else
#: (the rest stay in the ring; the router comes back for them, round robin with
#: every other event of the loop). Bounds what a queue kept full adds to another
#: guest's doorbell or verbs latency per queue.
NATIVE_SLICE_SECONDS = 100e-6
#: After a native call completed a job and emptied its queue, it watches the
#: queue's doorbell record this long for the next job (devices whose driver
#: acked DBREC_POLL, on a loop; virtio_rdma._accel, Spin), inside the slice's
#: budget: a guest submitting one job at a time posts the next a few
#: microseconds after its CQE, and it runs without a doorbell and a wake-up of
#: the loop. Measured by bench/accel_device_bench.py a (device-path overhead of
#: one 2048-point FFT at a time, 2-vCPU EPYC): a kicked job took 20-30 us from
#: post to CQE, one taken from the record while the loop still ran ~10 us.
NATIVE_SPIN_SECONDS = 30e-6
#: The daemon's interpreter switch interval (``sys.setswitchinterval``; CPython's
#: default is 5 ms), set when the router is given its loop: a worker thread whose
#: kernel finished waits for the GIL while the loop runs Python (a flooding
#: guest's jobs fetched and checked, completions delivered) at most this long
#: before the loop is made to hand it over. With 5 ms, a job waited milliseconds
#: behind an emulated 150 us one (bench/accel_device_bench.py c: idle p99 wait
#: 6-8 ms, flooded 8 ms; with 200 us: 0.1-0.2 ms and 1-2.4 ms).
SWITCH_INTERVAL_SECONDS = 200e-6


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------
@dataclass
class AqMetrics:
    """Counters of one accelerator queue (tests assert them)."""

    jobs_posted: int = 0       # jobs fetched from the ring
    jobs_completed: int = 0    # CQEs written (any status)
    bad_doorbells: int = 0     # producer index behind or more than depth ahead
    dbrec_applied: int = 0     # producer indices taken from the doorbell record (DBREC_POLL)
    temp_stalls: int = 0       # times it stopped fetching at MAX_TEMP_BYTES
    fallbacks: int = 0         # jobs a remote host gave back that were placed again (LOCAL_FALLBACK)
    errors: dict[str, int] = field(default_factory=dict)  # AccelStatus name -> completions

    def as_dict(self) -> dict:
        return asdict(self)


class Entry:
    """One job of a queue, from fetch to CQE."""

    __slots__ = ("aq", "wr_id", "op", "status", "job", "out_views", "out_tmp", "out_len",
                 "iterations", "done", "byte_len", "wait_us", "service_us", "started", "temp",
                 "spec", "in_views", "target", "host", "remote", "tried", "tenant", "acct")

    def __init__(self, aq: AccelQueue, wr_id: int, op: AccelOp):
        self.aq = aq
        self.wr_id = wr_id
        self.op = op
        self.status = AccelStatus.SUCCESS
        self.job: Job | None = None
        self.out_views: list[memoryview] = []
        self.out_tmp: np.ndarray | None = None  # the output when it is not in guest memory
        self.out_len = 0                         # bytes the output takes
        self.iterations = 0
        self.done = False
        self.byte_len = 0
        self.wait_us = 0
        self.service_us = 0
        self.started = False
        self.temp = 0  # bytes of temporaries charged to the device (core.accel_temp_bytes)
        #: a job handed to a remote target: its checked parameters and input views
        #: (kept for a LOCAL_FALLBACK re-run), the target, and the target's handle
        self.spec: AccelJob | None = None
        self.in_views: list[memoryview] = []
        self.target: RemoteTarget | None = None
        self.remote: Any = None
        self.host = 0  # the host that ran it (the CQE's imm_data)
        #: remote hosts that gave it back (it is never placed on them again)
        self.tried: tuple[int, ...] = ()
        #: the tenant whose accelerator quota admitted it, and the router to tell when it ends
        self.tenant: str | None = None
        self.acct: AccelRouter | None = None

    def release_temp(self) -> None:
        if self.temp:
            core = self.aq.core
            if core is not None:
                core.accel_temp_bytes -= self.temp
            self.temp = 0

    def fail(self, status: AccelStatus) -> None:
        """Completes with error ``status``: nothing is written to the output."""
        self.end(status)

    def end(self, status: AccelStatus) -> None:
        """Done with ``status``: the guest's buffers, the job and the temporaries let go."""
        self.status = status
        self.done = True
        r = self.acct
        if r is not None:
            self.acct = None
            r.job_ended(self, status)
        self.job = None
        self.out_views = []
        self.in_views = []
        self.spec = None
        self.target = None
        self.remote = None
        self.out_tmp = None
        self.release_temp()


class _NativeShare:
    """A guest's native turns while guests contend (AccelRouter.native_turn): its finish
    tag in turns / weight, when it was served last (round robin on equal tags), since when
    it waits (aging), and its tenant's class and weight."""

    __slots__ = ("vt", "seq", "since", "klass", "weight", "gen")

    def __init__(self) -> None:
        self.vt = 0.0
        self.seq = 0
        self.since = 0.0
        self.klass = 1
        self.weight = 1.0
        self.gen = -1  # the router's _class_gen when klass and weight were read


class AccelQueue:
    """An accelerator queue: ring and doorbell record in guest memory, the
    jobs fetched and not yet completed, in posted order."""

    __slots__ = ("aqn", "pdn", "cq", "op", "priority", "flags", "depth", "ring_gpa", "dbrec_gpa",
                 "pi", "fetched", "ci", "entries", "metrics", "destroyed", "target_host", "core",
                 "dbrec_seen")

    def __init__(self, aqn: int, pdn: int, cq: CompletionQueue, op: AccelOp, priority: int, flags: int,
                 depth: int, ring_gpa: int, dbrec_gpa: int, target_host: int = 0):
        self.aqn = aqn
        self.pdn = pdn
        self.cq = cq
        self.op = op
        self.priority = priority
        self.flags = flags
        self.depth = depth
        self.ring_gpa = ring_gpa
        self.dbrec_gpa = dbrec_gpa
        self.target_host = target_host
        self.pi = 0        # producer index the driver rang last (or its record showed)
        #: the doorbell record's value when last polled (DBREC_POLL): a value is applied once
        self.dbrec_seen = 0
        self.fetched = 0   # jobs fetched (mod 2^32)
        self.ci = 0        # jobs completed: their slots are free (mod 2^32)
        self.entries: deque[Entry] = deque()
        self.metrics = AqMetrics()
        #: DESTROY_AQ'd (draining its running jobs) or dropped with the device
        self.destroyed = False
        #: the device core while the queue lives (how a finished job finds its way
        #: back); None once the queue is released or dropped with the device
        self.core: RdmaDeviceCore | None = None


# --------------------------------------------------------------------------
# Targets and the router
# --------------------------------------------------------------------------
class LocalTarget:
    """This host's accelerators (an :class:`AcceleratorService`)."""

    host = 0

    def __init__(self, service: AcceleratorService):
        self.service = service

    def units(self, op: AccelOp) -> int:
        return sum(a.workers for a in self.service.serving(CORE_OP[op]))

    def submit(self, job: Job) -> None:
        self.service.submit_job(job)

    def cancel(self, job: Job) -> bool:
        acc = job.accelerator
        if acc is None:
            return False
        return self.service.accelerator(acc).cancel(job)

    def accelerators(self) -> tuple[Accelerator, ...]:
        return self.service.accelerators


class RemoteTarget(Protocol):
    """Another host's accelerators, reached over the fabric (implemented by
    :class:`peering.remote.PeerTarget`). Every method runs in the event
    loop's thread. A target completes a job it took with :func:`settle`, or
    gives it back unrun with :func:`give_back`; either exactly once."""

    #: the host id guests see (QUERY_ACCEL's view; FORCE_TARGET's target_host; the CQE's host)
    host: int

    def units(self, op: AccelOp) -> int:
        """Accelerators of the host that run ``op`` (0 while it is unreachable)."""
        ...

    def submit(self, entry: Entry) -> AccelStatus | None:
        """Take a checked job (``entry.spec``, ``entry.in_views``,
        ``entry.out_views``); None if taken, else the status it was refused with."""
        ...

    def cancel(self, entry: Entry) -> bool:
        """Take back a job not yet sent to the host (True), or False."""
        ...

    def abandon(self, entry: Entry) -> None:
        """The job's queue or device is gone: never touch its buffers again,
        never complete it."""
        ...

    def describe(self) -> dict:
        """Counters, the remote queue's depth and the link's state (metrics)."""
        ...


class Dispatcher(Protocol):
    """The cluster scheduler (implemented by :class:`peering.dispatch.Dispatcher`):
    where a job no FORCE_TARGET pins runs, when the router has peers."""

    def place(self, aq: AccelQueue, job: AccelJob, exclude: tuple[int, ...]
              ) -> LocalTarget | RemoteTarget | None:
        """The router's local target, a remote target, or a target that holds
        the job while the decision waits for its reads and then hands it on
        with :func:`route`; None if nobody can run it. Never a host in ``exclude``."""
        ...

    def describe(self) -> dict:
        ...


class AccelRouter:
    """Where a device's accelerator jobs run: one per daemon, shared by all
    its devices. ``service`` None: the device offers accelerator queues but
    this host runs nothing (jobs complete NO_ACCELERATOR).

    Completion path: the service's ready notifier (a worker thread) calls
    ``wakeup`` (set by :meth:`attach_loop` to a thread-safe call of
    :meth:`deliver` on the daemon's loop; one pending call serves every job
    finishing before it runs); in-process users call :meth:`wait` and
    :meth:`deliver` themselves.

    Native path (``native``, :class:`virtio_rdma._accel.NativeJobs`): small
    plain FFT / IFFT jobs complete inside :func:`fetch`, on a unit the service
    lends (``try_claim``); ``inline_max_seconds`` is the service's inline
    bound for the other small jobs, ``native_max_seconds`` the native path's
    (0 turns either off). On a loop, a queue's native jobs run in slices
    (:data:`NATIVE_SLICE_SECONDS`); while guests contend, their turns go as the
    fair queue's dispatches do (:meth:`native_turn`): tenant class first
    (aging lifts a waiting one), then weighted turns, round robin on ties."""

    def __init__(self, service: AcceleratorService | None, *, owns_service: bool = True,
                 inline_max_seconds: float = INLINE_MAX_SECONDS,
                 native_max_seconds: float = NATIVE_MAX_SECONDS):
        self.local: LocalTarget | None = LocalTarget(service) if service is not None else None
        #: other hosts' accelerators, by host id (1, 2, ...)
        self.remotes: dict[int, RemoteTarget] = {}
        #: the cluster scheduler (peering.dispatch.Dispatcher): where an unpinned job runs
        #: when there are peers (None: here if it can, else the first peer that can)
        self.dispatcher: Dispatcher | None = None
        #: called when this host's load moved (a job submitted here or finished): the
        #: dispatcher refreshes the counters its peers READ
        self.on_load: Callable[[], None] | None = None
        self._owns = owns_service
        #: submitted to the local service, not yet delivered (loop thread only): a
        #: guest's job (its Entry) or a job a peer host sent (an object with job_done(job))
        self._jobs: dict[Job, Any] = {}
        self._ready = threading.Event()
        self.wakeup: Callable[[], None] | None = None
        self._loop: Any = None
        self._loop_thread: int | None = None
        #: a deliver() is scheduled and has not started: finishing jobs need not wake the loop again
        self._deliver_pending = False
        #: deliver() passes scheduled on the loop: one per batch of finished jobs, not one per job
        self.wakeups = 0
        self._next_guest = 1
        #: tenancy (set_tenancy): the ledger, the accounting sink, each guest id's tenant
        self.ledger: Any = None
        self.accounting: Any = None
        self._tenant_of: dict[int, str] = {}
        #: guest ids running peers' tenants: (peer name, tenant, class it was sent with)
        self._remote_of: dict[int, tuple[str, str, int]] = {}
        self.quota_refusals = 0  # jobs completed QUOTA_EXCEEDED
        self.jobs_dropped = 0  # finished after their queue or device went
        #: False while the daemon drains (vrdma ctl drain): peers' new jobs are refused
        #: (REMOTE_FAILED) and the load row advertises no units; guests' own jobs still run
        self.accept_remote = True
        #: DBREC_POLL: each device's AQ doorbell-record scanner, by its guest id (loop thread only)
        self.scanners: dict[int, Any] = {}
        #: small FFT / IFFT jobs of AQs without flags, done and completed in the loop thread
        #: (None: every job takes start()); tests switch it off to compare both paths
        self.native: Any = None
        if service is not None and NativeJobs is not None and native_max_seconds > 0:
            self.native = NativeJobs(service, native_max_seconds, NATIVE_MAX_POINTS)
        #: AQs whose native jobs continue in a later slice of the loop, by guest id, then
        #: id(aq) -> (core, aq) in the order they stopped (or were deferred)
        self._pending: dict[int, dict[int, tuple[RdmaDeviceCore, AccelQueue]]] = {}
        self._slice_due = False  # a _next_slice is scheduled on the loop
        #: native turns while guests contend (_NativeShare by guest id; pruned when they do not)
        self._shares: dict[int, _NativeShare] = {}
        self._vnow = 0.0  # the start tag of the last contended native turn (SFQ's V)
        self._turn_seq = 0  # turns given: equal tags go round robin, least recently served first
        self._granted = -1  # the guest whose turn _next_slice is giving (fetch runs it)
        self._class_gen = 0  # bumped when the ledger changes: shares read their class again
        #: native slices that stopped at NATIVE_SLICE_SECONDS with jobs left (tests assert it)
        self.native_slices = 0
        #: native runs a doorbell did not start because a guest ahead of it waited (class, turn)
        self.native_deferred = 0
        #: native turns given ahead of a waiting guest of a lower class (tests assert it)
        self.native_class_overtakes = 0
        #: native turns given to a guest because aging lifted its class
        self.native_aged = 0
        self._aging = 0.0  # the tenants' aging period (the ledger's [fairness] aging_seconds)
        if service is not None:
            for acc in service.accelerators:
                acc.set_ready_notifier(self._on_ready)
                # a small job runs in the thread that submits it (the daemon's loop) when its
                # accelerator is idle: no worker hand-off, no cross-thread wake-up. Not on an
                # emulated slow accelerator: its delay would stall the loop.
                if acc.slowdown == 1.0 and inline_max_seconds > acc.inline_max_seconds:
                    acc.set_inline(inline_max_seconds)

    # -- wiring
    def _on_ready(self, acc: Accelerator) -> None:  # a worker thread, or the loop's for an inline job
        if not self._ready.is_set():
            self._ready.set()
        if self._deliver_pending:  # deliver() has not started yet: it will collect this job too
            return
        loop = self._loop
        if loop is None:
            w = self.wakeup
            if w is not None:
                w()
            return
        self._deliver_pending = True
        self.wakeups += 1
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self.deliver)  # an inline job: no self-pipe write
        else:
            loop.call_soon_threadsafe(self.deliver)

    def attach_loop(self, loop) -> None:
        """Deliver finished jobs on ``loop`` (asyncio), the daemon's one loop; called in its thread.
        With local accelerators, the process's switch interval goes down to
        :data:`SWITCH_INTERVAL_SECONDS` (their workers take the GIL back promptly)."""
        if self._loop is not loop:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._deliver_pending = False
            self.wakeup = lambda: loop.call_soon_threadsafe(self.deliver)
            if self.local is not None and sys.getswitchinterval() > SWITCH_INTERVAL_SECONDS:
                sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)

    def native_budget(self) -> float:
        """Seconds of loop time a native call may take: NATIVE_SLICE_SECONDS on a loop;
        0 (no bound) for in-process users driving the router by hand."""
        return NATIVE_SLICE_SECONDS if self._loop is not None else 0.0

    def native_spin(self, core: RdmaDeviceCore) -> float:
        """Seconds a native call watches a queue's doorbell record once dry: NATIVE_SPIN_SECONDS
        on a loop, for a device whose driver acked DBREC_POLL, while no native slice of
        another queue waits its turn; else 0."""
        if self._loop is None or not core.poll_doorbell_records or self._pending:
            return 0.0
        return NATIVE_SPIN_SECONDS

    def resuming(self, core: RdmaDeviceCore, aq: AccelQueue) -> bool:
        """Is a native slice of ``aq`` due (its jobs wait in the ring for their turn)?"""
        d = self._pending.get(core.accel_guest)
        return d is not None and id(aq) in d

    def resume_later(self, core: RdmaDeviceCore, aq: AccelQueue) -> None:
        """Come back for ``aq``'s jobs left in the ring by a native slice, in a later
        turn (:meth:`_next_slice`), one per loop callback so that the loop serves what
        else is ready in between."""
        self.native_slices += 1
        self._wait_turn(core, aq)

    def _wait_turn(self, core: RdmaDeviceCore, aq: AccelQueue) -> None:
        gid = core.accel_guest
        d = self._pending.get(gid)
        if d is None:
            d = self._pending[gid] = {}
            self._share(core).since = time.monotonic()  # backlogged from now (aging)
        d.setdefault(id(aq), (core, aq))
        if not self._slice_due:
            self._slice_due = True
            self._loop.call_soon(self._next_slice)

    def drop_slice(self, core: RdmaDeviceCore, aq: AccelQueue) -> None:
        """Forget ``aq``'s due slice (its jobs are taken another way)."""
        d = self._pending.get(core.accel_guest)
        if d is not None:
            d.pop(id(aq), None)

    # -- native turns: tenant class first, then weighted turns (SFQ in turns), aging
    def _share(self, core: RdmaDeviceCore) -> _NativeShare:
        """The guest's native share, with its tenant's class and weight (read again after
        the ledger changed: a reload or a live change)."""
        gid = core.accel_guest
        sh = self._shares.get(gid)
        if sh is None:
            if len(self._shares) > 2 * len(self._pending) + 64:  # guests that came and went
                v = self._vnow
                self._shares = {g: x for g, x in self._shares.items() if g in self._pending or x.vt > v}
            sh = self._shares[gid] = _NativeShare()
        if sh.gen != self._class_gen:
            sh.gen = self._class_gen
            acct = core.account
            if self.ledger is not None and acct is not None:
                self._tenant_of[gid] = acct.tenant
                sh.klass, sh.weight = self.ledger.classify(acct.tenant)
        return sh

    def _best_waiting(self, exclude: int, extra: _NativeShare | None = None
                      ) -> tuple[int, tuple[int, float, int], int]:
        """(guest, key, lowest class) of the guest waiting for a native turn that goes
        first (not ``exclude``; guest -1 if none): the highest class (lifted by aging, one
        class per ``aging_seconds`` waited, up to the highest waiting, ``extra``'s too),
        then the smallest start tag (weighted turns), then the least recently served."""
        v, aging = self._vnow, self._aging
        # each waiting guest's share (its class and weight read again if the ledger changed)
        waiting = [(g, self._share(next(iter(d.values()))[0])) for g, d in self._pending.items()
                   if d and g != exclude]
        if not waiting:
            return -1, (0, 0.0, 0), 0
        low = min(sh.klass for _, sh in waiting)
        top = max(sh.klass for _, sh in waiting)
        if extra is not None:
            top = max(top, extra.klass)
        now = time.monotonic() if aging > 0 and low < top else 0.0
        best_g, best = -1, (0, 0.0, 0)
        for g, sh in waiting:
            k = sh.klass
            if now and k < top:
                k = min(top, k + int((now - sh.since) / aging))
            key = (-k, max(v, sh.vt), sh.seq)
            if best_g < 0 or key < best:
                best_g, best = g, key
        return best_g, best, low

    def _charge_turn(self, sh: _NativeShare, start: float) -> None:
        """A native turn given: start tag ``start`` (V), finish tag one turn / weight later."""
        self._vnow = start
        sh.vt = start + 1.0 / sh.weight
        self._turn_seq += 1
        sh.seq = self._turn_seq
        if self._aging > 0:
            sh.since = time.monotonic()

    def native_turn(self, core: RdmaDeviceCore) -> bool:
        """May ``core``'s guest run native jobs now (its doorbell, or its turn from
        :meth:`_next_slice`)? While other guests wait for a turn, only if none of them goes
        first (:meth:`_best_waiting`; a turn :meth:`_next_slice` gave is not questioned);
        then the turn is charged to it: its start tag becomes ``max(its finish tag, V)``,
        its finish tag one turn / its weight later. Without contention nothing is charged."""
        gid = core.accel_guest
        granted = self._granted == gid
        self._granted = -1
        pending = self._pending
        if not pending or (len(pending) == 1 and gid in pending):
            return True
        sh = self._share(core)
        if granted:  # _next_slice chose it (and counted what it overtook)
            self._charge_turn(sh, max(self._vnow, sh.vt))
            return True
        best_g, best, low = self._best_waiting(gid, sh)
        if best_g < 0:
            return True
        if gid not in pending:
            sh.since = time.monotonic()  # backlogged from now (aging)
        k = sh.klass
        if self._aging > 0 and k < -best[0]:
            k = min(-best[0], k + int((time.monotonic() - sh.since) / self._aging))
        mine = (-k, max(self._vnow, sh.vt), sh.seq)
        if best < mine:
            return False
        if k > sh.klass:
            self.native_aged += 1
        if low < sh.klass:
            self.native_class_overtakes += 1
        self._charge_turn(sh, mine[1])
        return True

    def defer(self, core: RdmaDeviceCore, aq: AccelQueue) -> None:
        """``aq``'s jobs wait in the ring for the guest's turn (another goes first)."""
        self.native_deferred += 1
        self._wait_turn(core, aq)

    def _next_slice(self) -> None:
        """One native turn: the waiting guest that goes first (:meth:`_best_waiting`), its
        highest-priority waiting queue (the first of them: the spec's order of waiting
        jobs, in loop time)."""
        self._slice_due = False
        pending = self._pending
        for g in [g for g, d in pending.items() if not d]:
            del pending[g]
        if pending:
            gid = next(iter(pending))
            if len(pending) > 1:
                gid, first, low = self._best_waiting(-1)
                sh = self._shares[gid]
                if -first[0] > sh.klass:
                    self.native_aged += 1
                if low < sh.klass:
                    self.native_class_overtakes += 1
            d = pending[gid]
            key = max(d, key=lambda k: d[k][1].priority)  # the first of the highest priority
            core, aq = d.pop(key)
            if not d:
                del pending[gid]
            if aq.core is core and not aq.destroyed:  # else gone meanwhile: its jobs went with it
                self._granted = gid  # its turn: fetch's native_turn charges it, never defers it
                core_call(core, "fetching accelerator jobs", fetch, core, aq)
                self._granted = -1
        if not pending and self._shares:
            self._shares.clear()  # nobody waits: the next contention starts from equal tags
            self._vnow = 0.0
        if pending and not self._slice_due:
            self._slice_due = True
            self._loop.call_soon(self._next_slice)

    # -- tenants (vhost_user.tenancy) and accounting (vrdma.accounting)
    def set_tenancy(self, ledger: Any, accounting: Any = None) -> None:
        """Classes, weights and accelerator quotas from ``ledger`` (a TenantLedger,
        read live: a reload or ``set_tenant`` applies to the next job), and per-tenant
        accounting of every job that ends (``accounting.record_job``). Either turns the
        native path off for the jobs it must see (quota'd tenants; all with accounting)."""
        self.ledger = ledger
        self.accounting = accounting
        self._apply_fairness()
        ledger.on_change.append(self._apply_fairness)

    def _apply_fairness(self) -> None:
        svc = self.local.service if self.local is not None else None
        self._class_gen += 1  # native shares read their class and weight again
        if self.ledger is not None:
            self._aging = self.ledger.config.aging_seconds
            if svc is not None:
                svc.set_classifier(self._classify, self._aging)

    def _classify(self, guest_id: int) -> tuple[int, float]:
        if self.ledger is None:
            return 1, 1.0  # Class.NORMAL
        r = self._remote_of.get(guest_id)
        if r is not None:  # a peer's tenant: its class capped by this host's entry for the peer
            peer, _tenant, klass = r
            cap, weight = self.ledger.classify(peer)
            return min(klass, cap), weight
        name = self._tenant_of.get(guest_id)
        if name is None:
            return 1, 1.0
        return self.ledger.classify(name)

    def tenant_class(self, tenant: str | None) -> int:
        """The class a job of ``tenant`` carries to a peer (NORMAL without tenancy)."""
        if self.ledger is None or tenant is None:
            return 1
        return self.ledger.classify(tenant)[0]

    def remote_tenant(self, guest_id: int, peer: str, tenant: str, klass: int) -> None:
        """Guest id ``guest_id`` runs peer ``peer``'s jobs of ``tenant`` (class ``klass`` there)."""
        self._remote_of[guest_id] = (peer, tenant, klass)

    def tenants(self) -> dict[str, dict]:
        """Each guest id's tenant and the (class, weight) its jobs get here (metrics)."""
        out: dict[str, dict] = {}
        for gid, name in self._tenant_of.items():
            out[str(gid)] = {"tenant": name, "class_weight": self._classify(gid)}
        for gid, (peer, tenant, klass) in self._remote_of.items():
            out[str(gid)] = {"tenant": f"{tenant}@{peer}", "sent_class": klass,
                             "class_weight": self._classify(gid)}
        return out

    def native_allowed(self, core: RdmaDeviceCore) -> bool:
        """The native path bypasses admission and accounting: only for tenants neither needs."""
        if self.ledger is None or core.account is None:
            return True
        if self.accounting is not None:
            return False
        spec = self.ledger.spec(core.account.tenant)
        return spec.max_accel_jobs is None and spec.accel_seconds_per_minute is None

    def admit(self, core: RdmaDeviceCore, e: Entry) -> bool:
        """Take the tenant's accelerator quota for ``e`` (False: refused, counted)."""
        if self.ledger is None or core.account is None:
            return True
        tenant = core.account.tenant
        self._tenant_of[core.accel_guest] = tenant
        if self.ledger.accel_admit(tenant, time.monotonic()) is not None:
            self.quota_refusals += 1
            return False
        e.tenant, e.acct = tenant, self
        return True

    def job_ended(self, e: Entry, status: AccelStatus) -> None:
        """An admitted job completed (any status, any path): quota back, accounting row."""
        seconds = e.service_us / 1e6
        assert e.tenant is not None
        if self.ledger is not None:
            self.ledger.accel_done(e.tenant, seconds, time.monotonic())
        if self.accounting is not None:
            self.accounting.record_job(e.tenant, e.op.name.lower(), "remote" if e.host else "local",
                                       status is AccelStatus.SUCCESS, seconds, e.wait_us / 1e6)

    def new_guest_id(self) -> int:
        gid = self._next_guest
        self._next_guest += 1
        return gid

    def wait(self, timeout: float) -> bool:
        """Block until some job finished (or ``timeout``); for in-process users."""
        return self._ready.wait(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    # -- placement
    def add_remote(self, target: RemoteTarget) -> None:
        if target.host in self.remotes or target.host <= 0:
            raise ValueError(f"remote host id {target.host} is taken or not positive")
        self.remotes[target.host] = target

    def place(self, aq: AccelQueue, job: AccelJob, exclude: tuple[int, ...] = ()
              ) -> LocalTarget | RemoteTarget | None:
        """Where a job of ``aq`` runs: FORCE_TARGET's host (given back by it:
        this host if it can); else the dispatcher's choice when there are
        peers; else this host if it runs the op, else the first peer that
        does. Never a host in ``exclude`` (those that gave the job back);
        None if nobody can run it."""
        op = job.op
        local = self.local if self.local is not None and self.local.units(op) else None
        if aq.flags & AqFlags.FORCE_TARGET:
            if aq.target_host == 0 or exclude:
                return local
            return self.remotes.get(aq.target_host)
        if self.dispatcher is not None and self.remotes:
            return self.dispatcher.place(aq, job, exclude)
        if local is not None:
            return local
        for host in sorted(self.remotes):
            r = self.remotes[host]
            if host not in exclude and r.units(op):
                return r
        return None

    def load_changed(self) -> None:
        if self.on_load is not None:
            self.on_load()

    # -- QUERY_ACCEL
    def ops_info(self) -> list[AccelOpInfo]:
        out = []
        model = self.local.service.model if self.local is not None else None
        for op in AccelOp:
            units = self.local.units(op) if self.local is not None else 0
            hosts = (1 if units else 0) + sum(1 for r in self.remotes.values() if r.units(op))
            lo, hi = (1, dft.MAX_SIZE) if op in (AccelOp.FFT, AccelOp.IFFT) else \
                (qpp.BLOCK_SIZES[0], qpp.BLOCK_SIZES[-1])
            fixed, unit = model.query_fields(CORE_OP[op]) if model is not None and units else (0, 0)
            out.append(AccelOpInfo(op=int(op), local_units=min(units, 255),
                                   reachable_hosts=min(hosts, 0xFFFF), min_size=lo, max_size=hi,
                                   max_batch=MAX_BATCH, est_fixed_ns=fixed, est_unit_ps=unit))
        return out

    # -- completion
    def track(self, job: Job, owner: Any) -> None:
        """``job`` is submitted to the local service for ``owner``: a guest's
        :class:`Entry`, or an object whose ``job_done(job)`` takes it back."""
        self._jobs[job] = owner

    def forget(self, job: Job) -> None:
        self._jobs.pop(job, None)

    def deliver(self) -> int:
        """Hand every finished job to its queue (the event loop's thread); returns how many."""
        self._deliver_pending = False  # first: a job finishing from here on schedules another pass
        self._ready.clear()
        if self.local is None:
            return 0
        n = 0
        for acc in self.local.accelerators():
            for job in acc.collect():
                n += 1
                entry = self._jobs.pop(job, None)
                if entry is None:  # cancelled or flushed by us: already completed
                    continue
                if type(entry) is not Entry:  # a peer host's job
                    try:
                        entry.job_done(job)
                    except Exception:
                        log.exception("virtio-rdma: internal error completing a peer host's job")
                    continue
                core = entry.aq.core
                if core is None:
                    self.jobs_dropped += 1
                    entry.fail(AccelStatus.FLUSHED)
                    continue
                core_call(core, "completing an accelerator job", _finish_local, core, entry, job)
        if n:
            self.load_changed()
        return n

    def metrics(self) -> dict:
        svc = self.local.service.metrics() if self.local is not None else {}
        nat = self.native
        native = {} if nat is None else {
            "jobs": nat.jobs, "calls": nat.calls, "slices": self.native_slices, "declined": nat.declines(),
            "slow_shapes": nat.slow_shapes, "spun": nat.spun,
            "spins": nat.spins, "deferred": self.native_deferred,
            "class_overtakes": self.native_class_overtakes, "aged": self.native_aged}
        return {"in_flight": len(self._jobs), "jobs_dropped": self.jobs_dropped, "wakeups": self.wakeups,
                "native": native, "service": svc,
                "scheduler": self.dispatcher.describe() if self.dispatcher is not None else None,
                "remotes": {h: t.describe() for h, t in sorted(self.remotes.items())},
                "tenants": self.tenants(), "quota_refusals": self.quota_refusals}

    def close(self) -> None:
        if self.local is not None and self._owns:
            self.local.service.close()
        self._jobs.clear()
        self._pending.clear()  # slices still due: their queues go with their devices
        self._shares.clear()


# --------------------------------------------------------------------------
# Control commands
# --------------------------------------------------------------------------
def _router(core: RdmaDeviceCore) -> AccelRouter:
    if core.accel is None:
        raise CommandError("this device has no accelerator queues (VIRTIO_RDMA_F_ACCEL)", Status.EOPNOTSUPP)
    return core.accel


def query_accel(core: RdmaDeviceCore, req: Empty, now: float) -> QueryAccelResp:
    infos = _router(core).ops_info()
    pad = AccelOpInfo(0, 0, 0, 0, 0, 0, 0, 0)
    return QueryAccelResp(num_ops=len(infos), reserved=0,
                          ops=tuple(infos + [pad] * (MAX_ACCEL_OPS - len(infos))))


def create_aq(core: RdmaDeviceCore, req: CreateAqReq, now: float) -> CreateAqResp:
    router = _router(core)
    L = core.limits
    pdn = req.pdn
    if pdn not in core.pds:
        raise CommandError(f"no PD {pdn}", Status.ENOENT)
    cq = core.cqs.get(req.cqn)
    if cq is None:
        raise CommandError(f"no CQ {req.cqn}", Status.ENOENT)
    try:
        op = AccelOp.parse(req.op)
        flags = AqFlags.parse(req.flags)
    except UnknownValueError as e:
        raise CommandError(f"CREATE_AQ: {e}", Status.EINVAL) from None
    if req.priority > MAX_PRIORITY:
        raise CommandError(f"priority {req.priority} is outside 0..{MAX_PRIORITY}", Status.EINVAL)
    if flags & AqFlags.FORCE_TARGET and req.target_host != 0 and req.target_host not in router.remotes:
        raise CommandError(f"target_host {req.target_host}: this device reaches hosts "
                           f"{[0, *sorted(router.remotes)]}", Status.EINVAL)
    n = req.depth
    if n < 1 or n > L.max_qp_wr or n & (n - 1):
        raise CommandError(f"depth {n} is not a power of two in 1..{L.max_qp_wr}", Status.EINVAL)
    if len(core.aqs) >= L.max_aq:
        raise CommandError(f"max_aq {L.max_aq} reached", Status.ENOMEM)
    _charge(core, n, check_only=True)
    for what, gpa, length in (("AQ ring", req.ring_gpa, n * AQ_SLOT_SIZE),
                              ("AQ doorbell record", req.dbrec_gpa, DBREC_SIZE)):
        try:
            core.mem.translate(gpa, length).release()
        except GuestMemoryError as ex:
            raise CommandError(f"{what} at gpa {gpa:#x} (+{length}) is not guest memory: {ex}",
                               Status.EFAULT) from None
    while core.next_aqn in core.aqs or core.next_aqn == 0:
        core.next_aqn = (core.next_aqn + 1) & OBJ_NUM_MASK
    aqn = core.next_aqn
    core.next_aqn = (aqn + 1) & OBJ_NUM_MASK
    aq = AccelQueue(aqn, pdn, cq, op, req.priority, int(flags), n, req.ring_gpa, req.dbrec_gpa,
                    req.target_host)
    core.aqs[aqn] = aq
    aq.core = core
    _charge(core, n)  # fits: checked above
    core.pds[pdn] += 1
    cq.aqs.add(aqn)
    return CreateAqResp(aqn=aqn, depth=n)


def _charge(core: RdmaDeviceCore, slots: int, *, check_only: bool = False) -> None:
    """A queue's slots are in-flight work like a QP's ring entries: charged to
    the tenant account as WQES (max_wqes, uid_max_wqes)."""
    if core.account is not None:
        try:
            core.account.charge_all(((Resource.WQES, slots),), check_only=check_only)
        except LimitExceeded as e:
            raise CommandError(str(e), Status(e.errno)) from None


def _aq(core: RdmaDeviceCore, aqn: int, *, start: bool = True) -> AccelQueue:
    aq = core.aqs.get(aqn)
    if aq is None or aq.destroyed:
        raise CommandError(f"no AQ {aqn}", Status.ENOENT)
    _catch_up(core, aq, start=start)
    return aq


def _catch_up(core: RdmaDeviceCore, aq: AccelQueue, *, start: bool = True) -> None:
    """Before a command acts on a queue's jobs: take the jobs its doorbell record
    already shows. The driver writes the record before it rings, and the doorbell
    (doorbellq, or none while the device polls) and the command (controlq) are not
    ordered: a CANCEL_AQ_JOB or DESTROY_AQ right after a post must find its jobs.
    Only a plausible advance is taken (an absurd record is the doorbell path's to
    count). Jobs waiting in the ring for a native slice are started too, unless
    ``start`` is False (DESTROY_AQ: they stay in the ring, and the destroyed
    queue's drain completes them FLUSHED without starting them)."""
    try:
        (pi, _) = le32_words(core.mem.translate(aq.dbrec_gpa, DBREC_SIZE))
    except GuestMemoryError:
        pi = aq.pi
    ahead = (pi - aq.pi) % U32
    if 0 < ahead <= aq.depth and (pi - aq.ci) % U32 <= aq.depth:
        aq.pi = pi
        if start:
            fetch(core, aq)
    router = core.accel
    if router is not None and router._pending and router.resuming(core, aq):
        # jobs waiting in the ring for a native slice have not started: the command
        # must find them queued (so they take the Python path now), or none of them runs
        router.drop_slice(core, aq)
        if start:
            fetch(core, aq, native=False)


def destroy_aq(core: RdmaDeviceCore, req: DestroyAqReq, now: float) -> None:
    router = _router(core)
    aq = _aq(core, req.aqn, start=False)
    aq.destroyed = True
    for e in aq.entries:
        if not e.done and _take_back(router, e):
            e.fail(AccelStatus.FLUSHED)
    drain(core, aq)
    resume(core)


def _take_back(router: AccelRouter, e: Entry) -> bool:
    """Take a job back from its target before it starts; False if it runs (or ran)."""
    if e.target is not None:
        return e.target.cancel(e)
    if e.job is not None and router.local is not None and router.local.cancel(e.job):
        router.forget(e.job)
        return True
    return False


def cancel_aq_job(core: RdmaDeviceCore, req: CancelAqJobReq, now: float) -> None:
    router = _router(core)
    aq = _aq(core, req.aqn)
    for e in aq.entries:
        if e.wr_id != req.wr_id or e.done:
            continue
        if not _take_back(router, e):
            raise CommandError(f"AQ {aq.aqn} job wr_id {req.wr_id:#x} is running"
                               + (f" on host {e.target.host}" if e.target is not None else ""),
                               Status.EBUSY)
        e.fail(AccelStatus.CANCELLED)
        drain(core, aq)
        resume(core)
        return
    raise CommandError(f"AQ {aq.aqn} has no queued job wr_id {req.wr_id:#x}", Status.ENOENT)


def _release(core: RdmaDeviceCore, aq: AccelQueue) -> None:
    """Forget a destroyed queue whose last CQE is written."""
    if core.aqs.get(aq.aqn) is aq:
        del core.aqs[aq.aqn]
    aq.core = None
    if core.account is not None:
        core.account.release(Resource.WQES, aq.depth)
    aq.cq.aqs.discard(aq.aqn)
    if aq.pdn in core.pds:
        core.pds[aq.pdn] -= 1


def drop_all(core: RdmaDeviceCore) -> None:
    """Device reset or close: every queue goes at once, no more CQEs; running
    jobs finish into their own buffers and are then dropped."""
    router = core.accel
    sc = router.scanners.pop(core.accel_guest, None) if router is not None else None
    if sc is not None:  # it holds the queues: let them go
        sc.rebuild((), None)
    aqs = list(core.aqs.values())
    for aq in aqs:  # first: whatever happens below (a link failing) completes nothing here
        aq.destroyed = True
        aq.core = None
    for aq in aqs:
        for e in aq.entries:
            if e.done:
                continue
            if e.target is not None:  # a remote host never touches its buffers again
                t, e.target = e.target, None
                t.abandon(e)
            # a running job finishes into its own buffers; deliver() drops it then
            elif (e.job is not None and router is not None and router.local is not None
                    and router.local.cancel(e.job)):
                router.forget(e.job)
        aq.entries.clear()
        aq.core = None
    core.aqs.clear()


# --------------------------------------------------------------------------
# Doorbell, fetch and checks
# --------------------------------------------------------------------------
def ring_aq(core: RdmaDeviceCore, aqn: int, pi: int, now: float) -> None:
    """A kind 4 doorbell: ``pi`` is the queue's new producer index."""
    aq = core.aqs.get(aqn)
    if aq is None or aq.destroyed:
        core.metrics.bad_doorbells += 1
        return
    if core.poll_doorbell_records and pi != aq.pi and (aq.pi - pi) % U32 < U32 // 2:
        # DBREC_POLL: the record may already have carried us past this doorbell
        # (the driver writes it first): a value behind pi is no news, no error
        return
    if (pi - aq.ci) % U32 > aq.depth or (pi - aq.pi) % U32 > aq.depth:
        core.metrics.bad_doorbells += 1
        aq.metrics.bad_doorbells += 1
        log.debug("AQ %d producer index %d (completed %d, depth %d) is absurd", aqn, pi, aq.ci, aq.depth)
        return
    aq.pi = pi
    fetch(core, aq)


def _changed_records(core: RdmaDeviceCore) -> list[AccelQueue]:
    """The AQs whose doorbell record may have changed since the last look:
    found by the native scanner the QPs' records use (one per device, kept by
    the router), or every AQ where the extension is not built."""
    router = core.accel
    if DbrecScanner is None or router is None:
        return list(core.aqs.values())
    sc = router.scanners.get(core.accel_guest)
    if sc is None:
        sc = router.scanners[core.accel_guest] = DbrecScanner()
    key = (len(core.aqs), core.next_aqn)  # every CREATE_AQ moves next_aqn; every release len
    if sc.key != key:
        # the scanner compares the 8 bytes at each object's dbrec_gpa: an AQ's serve as a QP's
        sc.rebuild(list(core.aqs.values()), key)  # type: ignore[arg-type]
    return sc.scan(core.mem)  # type: ignore[return-value]


def poll_records(core: RdmaDeviceCore, now: float) -> int:
    """DBREC_POLL: apply every AQ doorbell record written since it was last
    read, like a kind 4 doorbell with its value; returns how many. Each value
    is applied once, so an absurd record is counted once, not on every poll."""
    n = 0
    for aq in _changed_records(core):
        if aq.destroyed:
            continue
        try:
            (pi, _) = le32_words(core.mem.translate(aq.dbrec_gpa, DBREC_SIZE))  # each word whole
        except GuestMemoryError:
            continue
        if pi == aq.dbrec_seen:
            continue
        aq.dbrec_seen = pi
        if pi != aq.pi:
            n += 1
            ring_aq(core, aq.aqn, pi, now)
            if aq.pi == pi:
                aq.metrics.dbrec_applied += 1
    return n


def fetch(core: RdmaDeviceCore, aq: AccelQueue, *, native: bool = True) -> None:
    """Start the jobs posted up to ``aq.pi``, unless this device's temporaries
    are at :data:`MAX_TEMP_BYTES` (then the queue waits, its jobs in the ring).
    ``native`` False: every job through :func:`start` (a command must find them)."""
    router = core.accel
    if native and router is not None and router._pending and router.resuming(core, aq):
        return  # a native slice of this queue is due: it takes them, in turn with other queues
    if (native and router is not None and router.native is not None and not aq.flags and not aq.entries
            and aq.fetched != aq.pi and router.native_allowed(core)):
        # the local placement rule: the native path takes the plain small jobs at the head,
        # in order, only with a unit of a local accelerator serving the op (its claim), and
        # leaves the first other one (and all after it) to start() below
        if router._pending and not router.native_turn(core):
            router.defer(core, aq)  # another guest's turn first (a higher class, fewer turns)
            return
        router.native.run(core, aq, router.native_budget(), router.native_spin(core))
        if router.native.yielded:  # its slice is over: the rest wait in the ring for the next
            router.resume_later(core, aq)
            return
    while aq.fetched != aq.pi:
        if core.accel_temp_bytes >= MAX_TEMP_BYTES:
            core.accel_stalled.add(aq.aqn)
            aq.metrics.temp_stalls += 1
            break
        slot = aq.fetched & (aq.depth - 1)
        aq.fetched = (aq.fetched + 1) % U32
        aq.metrics.jobs_posted += 1
        core.metrics.aq_jobs += 1
        try:
            raw = bytes(core.mem.translate(aq.ring_gpa + slot * AQ_SLOT_SIZE, AQ_SLOT_SIZE))
        except GuestMemoryError:
            e = Entry(aq, 0, aq.op)
            e.fail(AccelStatus.INVALID_PARAMS)
            aq.entries.append(e)
            continue
        aq.entries.append(start(core, aq, raw, router))
    drain(core, aq)


def need_bytes(job: AccelJob) -> tuple[int, int, int]:
    """(input bytes, kernel output bytes, output bytes) of a checked job."""
    b = job.batch
    if job.op in (AccelOp.FFT, AccelOp.IFFT):
        n = b * job.size * NP_DTYPE[job.dtype].itemsize
        return n, n, n
    if job.op is AccelOp.TURBO_ENCODE:
        n = b * 3 * (job.size + turbo.TAIL_BITS)
        return b * job.size, n, n
    return b * 3 * (job.size + turbo.TAIL_BITS) * _F32.itemsize, b * job.size, b * job.size + b


def check_params(job: AccelJob) -> None:
    """The job's parameters against what the operation supports (accel_core's
    own checks); raises InvalidInput."""
    if not 1 <= job.batch <= MAX_BATCH:
        raise ParameterError(f"batch {job.batch} is outside 1..{MAX_BATCH}", argument="batch")
    if job.op in (AccelOp.FFT, AccelOp.IFFT):
        dft.check_size(job.size)
        if job.iterations or job.early_stop or job.scaling is not None:
            raise ParameterError("an FFT job has no iterations, early stop or scaling")
    else:
        qpp.check_block_size(job.size)
        if job.dtype != AccelDtype.COMPLEX64:
            raise ParameterError(f"dtype {int(job.dtype)} (Turbo jobs: 0)", argument="dtype")
        if job.op is AccelOp.TURBO_DECODE:
            turbo.check_iterations(job.iterations)
            turbo.check_scaling(job.scaling)
        elif job.iterations or job.early_stop or job.scaling is not None:
            raise ParameterError("an encode job has no iterations, early stop or scaling")
    if max(need_bytes(job)) > MAX_JOB_BYTES:
        raise ParameterError(f"job of {max(need_bytes(job))} bytes exceeds {MAX_JOB_BYTES}")


def _views(core: RdmaDeviceCore, aq: AccelQueue, sges, need: int, want: int) -> list[memoryview]:
    """The checked views of a scatter list, cut to ``want`` bytes (LOCAL_LEN if shorter)."""
    views: list[memoryview] = []
    for s in sges:
        views.extend(core.mrs.check(core.mem, s.lkey, aq.pdn, s.addr, s.length, need))
    out, left = [], want
    for v in views:
        if not left:
            break
        take = min(len(v), left)
        if take:
            out.append(v[:take])
        left -= take
    if left:
        raise _Short(f"scatter list of {want - left} bytes, the job needs {want}")
    return out


class _Short(Exception):
    pass


def _array(view: memoryview, dtype: np.dtype, nbytes: int) -> np.ndarray | None:
    """A zero-copy array over a view if it is aligned for ``dtype``."""
    a = np.frombuffer(view, dtype=_U8, count=nbytes)
    if a.ctypes.data % dtype.alignment:
        return None
    return a.view(dtype)


def start(core: RdmaDeviceCore, aq: AccelQueue, raw: bytes, router: AccelRouter | None) -> Entry:
    """Check one job entry and hand it to a target; returns its entry (done if it failed)."""
    wr_id = int.from_bytes(raw[:8], "little")
    try:
        job = decode_accel_job(raw)
    except (VirtioRdmaError, UnknownValueError) as ex:
        log.debug("AQ %d slot: %s", aq.aqn, ex)
        e = Entry(aq, wr_id, aq.op)
        e.fail(AccelStatus.INVALID_PARAMS)
        return e
    e = Entry(aq, wr_id, aq.op)
    try:
        if job.op is not aq.op:
            raise InvalidInput(f"job op {job.op.name} on a {aq.op.name} queue", argument="op")
        check_params(job)
    except InvalidInput as ex:
        log.debug("AQ %d wr_id %#x: %s", aq.aqn, wr_id, ex)
        e.fail(AccelStatus.INVALID_PARAMS)
        return e
    in_need, _, out_need = need_bytes(job)
    try:
        in_views = _views(core, aq, job.inputs, 0, in_need)
        out_views = _views(core, aq, job.outputs, int(Access.LOCAL_WRITE), out_need)
    except MemoryAccessError as ex:
        log.debug("AQ %d wr_id %#x: %s", aq.aqn, wr_id, ex)
        core.metrics.local_prot_errors += 1
        e.fail(AccelStatus.LOCAL_PROT)
        return e
    except _Short as ex:
        log.debug("AQ %d wr_id %#x: %s", aq.aqn, wr_id, ex)
        core.metrics.local_len_errors += 1
        e.fail(AccelStatus.LOCAL_LEN)
        return e
    if router is not None and not router.admit(core, e):
        e.fail(AccelStatus.QUOTA_EXCEEDED)
        return e
    target = router.place(aq, job) if router is not None else None
    if router is None or target is None:
        e.fail(AccelStatus.NO_ACCELERATOR)
        return e
    e.out_len = out_need
    if isinstance(target, LocalTarget):
        _run_local(core, aq, e, job, in_views, out_views, router)
        return e
    e.spec, e.in_views, e.out_views = job, in_views, out_views
    _hand_over(core, e, target, router)
    return e


def _run_local(core: RdmaDeviceCore, aq: AccelQueue, e: Entry, job: AccelJob,
               in_views: list[memoryview], out_views: list[memoryview], router: AccelRouter) -> None:
    """Run a checked job on this host's accelerators (``e`` fails if they refuse it)."""
    assert router.local is not None
    in_need, k_out, _ = need_bytes(job)
    # the arrays: in place where the guest's buffers allow, else temporaries
    cop = CORE_OP[job.op]
    fft = job.op in (AccelOp.FFT, AccelOp.IFFT)
    in_dt: np.dtype = NP_DTYPE[job.dtype] if fft else _U8 if job.op is AccelOp.TURBO_ENCODE else _F32
    out_dt: np.dtype = NP_DTYPE[job.dtype] if fft else _U8
    y = _array(out_views[0], out_dt, k_out) if len(out_views[0]) >= k_out else None
    if y is None:
        e.out_tmp = y = np.empty(k_out // out_dt.itemsize, dtype=out_dt)
    x = _array(in_views[0], in_dt, in_need) if len(in_views) == 1 else None
    if x is not None and np.may_share_memory(x, y):
        same = (fft and x.ctypes.data == y.ctypes.data and x.nbytes == y.nbytes)
        x = y if same else None
    if x is None:
        x = np.empty(in_need // in_dt.itemsize, dtype=in_dt)
        sg_copy([_bytes_of(x)], in_views)
        e.temp += x.nbytes
    if e.out_tmp is not None:
        e.temp += e.out_tmp.nbytes
    core.accel_temp_bytes += e.temp
    try:
        cj = make_job(cop, job, x, y, guest_id=core.accel_guest, priority=aq.priority)
    except InvalidInput as ex:
        log.debug("AQ %d wr_id %#x: %s", aq.aqn, e.wr_id, ex)
        e.fail(AccelStatus.INVALID_PARAMS)
        return
    e.out_views = out_views
    e.job = cj
    router.track(cj, e)
    try:
        router.local.submit(cj)
    except AccelError as ex:
        log.debug("AQ %d wr_id %#x: %s", aq.aqn, e.wr_id, ex)
        router.forget(cj)
        e.fail(AccelStatus.NO_ACCELERATOR)
        return
    router.load_changed()


def make_job(cop: Op, job: AccelJob, x: np.ndarray, y: np.ndarray, *, guest_id: int,
             priority: int) -> Job:
    """The accel_core job of a checked wire job over input ``x`` and kernel output
    ``y`` (flat arrays of the job's dtypes); raises InvalidInput."""
    b, size = job.batch, job.size
    if job.op in (AccelOp.FFT, AccelOp.IFFT):
        shape = (b, size)
        return Job.create(cop, x.reshape(shape), y.reshape(shape), guest_id=guest_id,
                          collect=True, priority=priority)
    if job.op is AccelOp.TURBO_ENCODE:
        return Job.create(cop, x.reshape(b, size), y.reshape(b, 3, size + turbo.TAIL_BITS),
                          guest_id=guest_id, collect=True, priority=priority)
    return Job.create(cop, x.reshape(b, 3, size + turbo.TAIL_BITS), y.reshape(b, size),
                      guest_id=guest_id, collect=True, priority=priority,
                      iterations=job.iterations, scaling=job.scaling,
                      early_stop=_EARLY_STOP[job.early_stop])


def _given_back(core: RdmaDeviceCore, e: Entry, status: AccelStatus, router: AccelRouter) -> None:
    """A remote target gave a job back unrun (its host failed, went away or
    refused it): placed again if the queue asked for that (LOCAL_FALLBACK),
    on any host that runs it but those that gave it back (this host included;
    a pinned job: this host only); else it completes with ``status``."""
    aq, job = e.aq, e.spec
    if e.target is not None and e.target.host:
        e.tried += (e.target.host,)
    e.target = e.remote = None
    if job is None or not aq.flags & AqFlags.LOCAL_FALLBACK:
        e.fail(status)
        return
    target = router.place(aq, job, e.tried)
    if target is None:
        e.fail(status)
        return
    aq.metrics.fallbacks += 1
    _hand_over(core, e, target, router)


def _hand_over(core: RdmaDeviceCore, e: Entry, target: LocalTarget | RemoteTarget,
               router: AccelRouter) -> None:
    """A placed job (``e.spec``, ``e.in_views``, ``e.out_views``) goes to ``target``."""
    if isinstance(target, LocalTarget):
        job, in_views, out_views = e.spec, e.in_views, e.out_views
        assert job is not None
        e.spec, e.in_views = None, []
        _run_local(core, e.aq, e, job, in_views, out_views, router)
        return
    e.target = target
    refused = target.submit(e)
    if refused is not None:
        _given_back(core, e, refused, router)


def route(e: Entry, target: LocalTarget | RemoteTarget | None) -> None:
    """A job whose placement waited (the dispatcher read peers' counters)
    goes to ``target`` (None: nobody runs it, NO_ACCELERATOR). The event
    loop's thread; its CQEs are written in posted order."""
    core = e.aq.core
    if e.done:
        return
    if core is None or core.accel is None:  # the queue or device went: nothing more is written
        e.fail(AccelStatus.FLUSHED)
        return
    core_call(core, "placing an accelerator job", _route, core, e, target, core.accel)


def _route(core: RdmaDeviceCore, e: Entry, target: LocalTarget | RemoteTarget | None,
           router: AccelRouter) -> None:
    e.target = None
    if target is None:
        e.fail(AccelStatus.NO_ACCELERATOR)
    else:
        _hand_over(core, e, target, router)
    drain(core, e.aq)
    resume(core)


def settle(e: Entry, status: AccelStatus, *, byte_len: int = 0, wait_us: int = 0,
           service_us: int = 0, iterations: int = 0, host: int = 0) -> None:
    """A remote target finished ``e`` (the event loop's thread): with SUCCESS
    its host has written the output into the guest's buffers; REMOTE_FAILED
    and NO_ACCELERATOR give it back (:func:`_given_back`); other statuses
    complete it as they are. Its CQEs are written in posted order."""
    core = e.aq.core
    if e.done:
        return
    if core is None:  # the queue or device went: nothing more is written
        e.fail(AccelStatus.FLUSHED)
        return
    core_call(core, "completing a remote accelerator job", _settle, core, e, status, byte_len, wait_us,
               service_us, iterations, host)


def _settle(core: RdmaDeviceCore, e: Entry, status: AccelStatus, byte_len: int, wait_us: int,
            service_us: int, iterations: int, host: int) -> None:
    if status is AccelStatus.SUCCESS:
        e.byte_len = byte_len
        e.wait_us, e.service_us, e.iterations, e.host = wait_us, service_us, iterations, host
        e.end(status)
    elif status in (AccelStatus.REMOTE_FAILED, AccelStatus.NO_ACCELERATOR) and core.accel is not None:
        _given_back(core, e, status, core.accel)
    else:
        e.fail(status)
    drain(core, e.aq)
    resume(core)


def _finish_local(core: RdmaDeviceCore, e: Entry, job: Job) -> None:
    finish(core, e, job)
    drain(core, e.aq)
    resume(core)


# --------------------------------------------------------------------------
# Completion
# --------------------------------------------------------------------------
def _bytes_of(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous 1-D array, as a memoryview (no copy)."""
    return arr.view(np.uint8).data


def _scatter(views: list[memoryview], offset: int, data: memoryview) -> None:
    """Write ``data`` at byte ``offset`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        out.append(v[offset:])
        offset = 0
    sg_copy(out, [data])


def job_times_us(job: Job) -> tuple[int, int]:
    """(queue wait, service time) of a finished job in microseconds, as the CQE
    reports them: the service time is the accelerator's (what QUERY_ACCEL's
    estimates predict)."""
    wait = service = 0
    if job.t_started is not None and job.t_submitted is not None:
        wait = round((job.t_started - job.t_submitted) * 1e6)
    s = job.accel_seconds if job.accel_seconds is not None else job.service_time
    if s is not None:
        service = round(s * 1e6)
    return wait, service


def finish(core: RdmaDeviceCore, e: Entry, job: Job) -> None:
    """A job came back from its target: its output to the guest, its status."""
    e.wait_us, e.service_us = job_times_us(job)
    if job.state is not JobState.DONE:
        if job.state is JobState.FAILED and isinstance(job.error, InvalidInput):
            e.fail(AccelStatus.INVALID_PARAMS)  # element values: bits not 0/1, LLRs not finite
        else:
            e.fail(AccelStatus.FLUSHED if job.state is JobState.CANCELLED else AccelStatus.NO_ACCELERATOR)
        return
    out = e.out_views
    k_out = job.output.nbytes
    if e.out_tmp is not None:
        _scatter(out, 0, _bytes_of(e.out_tmp))
    if job.op is Op.TURBO_DECODE:
        used = np.atleast_1d(np.asarray(job.result, dtype=np.int64))
        its = np.minimum(used, 255).astype(np.uint8)
        _scatter(out, k_out, _bytes_of(its))
        e.iterations = int(used.max()) if used.size else 0
    e.byte_len = e.out_len
    e.end(AccelStatus.SUCCESS)


def resume(core: RdmaDeviceCore) -> None:
    """Queues that stopped at :data:`MAX_TEMP_BYTES` fetch again once temporaries are released."""
    while core.accel_stalled and core.accel_temp_bytes < MAX_TEMP_BYTES:
        aq = core.aqs.get(core.accel_stalled.pop())
        if aq is not None and not aq.destroyed:
            fetch(core, aq)


def _flush_unfetched(core: RdmaDeviceCore, aq: AccelQueue) -> None:
    """A destroyed queue's jobs still in its ring (posted, never fetched: left for a later
    native slice, or stalled at MAX_TEMP_BYTES) never start: each completes FLUSHED, in order."""
    while aq.fetched != aq.pi:
        slot = aq.fetched & (aq.depth - 1)
        aq.fetched = (aq.fetched + 1) % U32
        aq.metrics.jobs_posted += 1
        core.metrics.aq_jobs += 1
        try:
            wr_id = int.from_bytes(core.mem.translate(aq.ring_gpa + slot * AQ_SLOT_SIZE, 8), "little")
        except GuestMemoryError:
            wr_id = 0
        e = Entry(aq, wr_id, aq.op)
        e.fail(AccelStatus.FLUSHED)
        aq.entries.append(e)


def drain(core: RdmaDeviceCore, aq: AccelQueue) -> None:
    """Write the CQEs of the finished jobs at the head of the queue, in order."""
    if aq.destroyed and aq.fetched != aq.pi:
        _flush_unfetched(core, aq)
    while aq.entries and aq.entries[0].done:
        e = aq.entries.popleft()
        c = AccelCompletion(e.wr_id, e.op, e.status, aq.aqn, e.byte_len, e.host, e.wait_us,
                            e.service_us, e.iterations)
        aq.ci = (aq.ci + 1) % U32
        aq.metrics.jobs_completed += 1
        if e.status is not AccelStatus.SUCCESS:
            name = e.status.name
            aq.metrics.errors[name] = aq.metrics.errors.get(name, 0) + 1
            core.metrics.aq_errors += 1
        core.metrics.aq_completions += 1
        complete(core, aq.cq, c.to_cqe())
    if aq.destroyed and not aq.entries:
        _release(core, aq)


def snapshot(core: RdmaDeviceCore) -> dict[int, dict[str, Any]]:
    """Per-queue counters of a device, by AQN."""
    return {aqn: {"op": aq.op.name, "depth": aq.depth, "in_flight": len(aq.entries),
                  **aq.metrics.as_dict()} for aqn, aq in core.aqs.items()}
