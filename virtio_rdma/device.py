"""The virtio-rdma device served over vhost-user (docs/virtio-rdma.md).

Glue between the transport and the sans-I/O :class:`RdmaDeviceCore`: the
controlq's requests go to ``handle_control`` and its responses back into the
same chain; doorbellq buffers go to ``doorbell``; the events the core
produces are written into the buffers the driver keeps posted on the eventq
(kept in order while none is posted), and the core's next deadline (RNR and
retransmission timers) becomes an event-loop timer. Payloads never pass
through here: the core moves them between guests' memory directly.

A blocking daemon's kicks of the doorbellq (DBREC_POLL) are served by
:meth:`RdmaDevice.fast_kick` in native code (``_datapath.kick_doorbellq``):
from the kick to ``run_sq`` without Python per record or buffer.

Per-tenant limits: :meth:`RdmaDevice.factory` makes the daemon's device
factory from a :class:`~vhost_user.tenancy.TenantPolicy`: each connection's
device reports the policy's object caps (QUERY_DEVICE) and charges its
objects to an account of the connection's peer uid in one shared ledger.

Accelerator queues: with the daemon's :class:`~virtio_rdma.accel.AccelRouter`
the device offers VIRTIO_RDMA_F_ACCEL; jobs finish in the accelerators' worker
threads and come back on the daemon's event loop (the router's thread-safe
wakeup), where their CQEs are written and events delivered as for a peer's
request (``_on_core_notify``).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from time import monotonic

from fabric.base import Fabric
from vhost_user.device import VhostUserDevice
from vhost_user.tenancy import ConnectionInfo, TenantAccount, TenantLedger, TenantPolicy
from virtio_rdma import doorbells
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import CONTROLQ, DOORBELLQ, EVENTQ, VIRTIO_ID_RDMA, Feature
from virtio_rdma.core import DeviceLimits, RdmaDeviceCore
from virtio_rdma.wire import EVENT_SIZE, encode_events

try:  # the native doorbellq kick (virtio_rdma/_datapath.pyx)
    from virtio_rdma import _datapath
except ImportError:  # pragma: no cover - extension not built
    _datapath = None  # type: ignore[assignment]  # only where the extension is not built

log = logging.getLogger(__name__)

#: bytes of config space a front-end may read (the rest of the struct is zeros)
CONFIG_WINDOW = 256

#: buffers served per pass over the controlq / doorbellq: a guest that queues
#: hundreds at once is served in slices, other guests' work in between
#: (the back-end re-kicks the ring from the event loop, see ``budgeted``)
CONTROL_BUDGET = 2
DOORBELL_BUDGET = 64


class RdmaDevice(VhostUserDevice):
    virtio_id = VIRTIO_ID_RDMA
    num_queues = 3
    max_queue_size = 1024
    device_features = (1 << Feature.INLINE_DATA) | (1 << Feature.ATOMIC) | (1 << Feature.DBREC_POLL)
    #: rings the daemon's busy-poll loop watches (the eventq holds buffers on purpose)
    poll_queues = (CONTROLQ, DOORBELLQ)
    #: process_queue may leave buffers in a ring (its per-pass budget)
    budgeted = True

    def __init__(self, fabric: Fabric, *, limits: DeviceLimits | None = None,
                 account: TenantAccount | None = None, info: ConnectionInfo | None = None,
                 accel: AccelRouter | None = None):
        self.fabric = fabric
        #: the daemon's accelerator router (shared by its devices; not owned):
        #: with one, the device offers VIRTIO_RDMA_F_ACCEL
        self.accel = accel
        if accel is not None:
            self.device_features = type(self).device_features | (1 << Feature.ACCEL)
        self.limits = limits or DeviceLimits()
        #: the connection's tenant account (owned: closed with the device)
        self.account = account
        #: who connected (None when built outside a server)
        self.info = info
        self.core: RdmaDeviceCore | None = None
        self._events: collections.deque = collections.deque()
        self._timer = None
        self._timer_at: float | None = None
        self._deliver_scheduled = False
        self._dbrec_poll = False
        self._rings_ran = False
        self.bad_event_buffers = 0
        #: device resets: the rings stopped (SET_STATUS 0 and/or GET_VRING_BASE on every
        #: ring) and started again elsewhere than they stopped (a guest driver's reset
        #: through its front-end)
        self.resets = 0
        #: the rings stopped and started again where they stopped (a VM paused and
        #: continued): the guest's objects kept
        self.resumes = 0
        #: while the rings are stopped after running: ring index -> the index it stopped
        #: at (GET_VRING_BASE's answer); None while they run
        self._stopped_at: dict[int, int] | None = None
        #: the counters of this device's earlier cores (one per reset), so the device's
        #: totals (these plus ``core.metrics``) never go back when a driver resets it
        self.retired_metrics: dict[str, int] = {}

    def attach(self, conn) -> None:
        super().attach(conn)
        if self.accel is not None:
            try:  # finished jobs come back on the daemon's loop (attach runs on it)
                self.accel.attach_loop(asyncio.get_running_loop())
            except RuntimeError:  # no loop (a device driven by hand): the owner delivers
                pass
        self.core = self._new_core()

    def _new_core(self) -> RdmaDeviceCore:
        core = RdmaDeviceCore(self.conn.mem, self.fabric, limits=self.limits, account=self.account,
                              accel_router=self.accel)
        core.notify = self._on_core_notify
        core.offered_features = self.device_features
        return core

    @staticmethod
    def limits_for(policy: TenantPolicy) -> DeviceLimits:
        """The object caps a connection's device reports (QUERY_DEVICE) under ``policy``."""
        return DeviceLimits(max_qp=policy.max_qp, max_cq=policy.max_cq, max_mr=policy.max_mr,
                            max_pd=policy.max_pd)

    @classmethod
    def factory(cls, fabric: Fabric, ledger: TenantLedger, accel: AccelRouter | None = None):
        """A ``device_factory(info)`` for :class:`~vhost_user.server.BackendServer`: every
        connection gets the policy's caps and an account of its peer uid in ``ledger``,
        and shares the accelerators of ``accel``."""
        limits = cls.limits_for(ledger.policy)

        def make(info: ConnectionInfo | None) -> RdmaDevice:
            return cls(fabric, limits=limits, account=ledger.account(info), info=info, accel=accel)

        return make

    def config(self) -> bytes:
        return self.core.config_bytes()  # type: ignore[union-attr]  # attached

    def get_config(self, offset: int, size: int) -> bytes:
        """Reads past struct virtio_rdma_config, up to CONFIG_WINDOW bytes,
        read as zeros: a carrier sizes the config space as its own device's
        (QEMU 7.2's vhost-user-blk reads 57 bytes, spec "Carriers")."""
        if offset >= 0 and offset + size <= CONFIG_WINDOW:
            return (self.config() + bytes(CONFIG_WINDOW))[offset:offset + size]
        return super().get_config(offset, size)

    def set_features(self, features: int) -> None:
        # DBREC_POLL acked: the driver may skip doorbells while we poll (spec 5.x.6.3)
        self._dbrec_poll = bool(features & (1 << Feature.DBREC_POLL))
        if self.core is not None:
            if self.core.acked_by_command is not None:
                # a carrier's front-end (re)sends its transport bits: the driver's
                # ACK_FEATURES stands (spec "Carriers")
                return
            self.core.poll_doorbell_records = self._dbrec_poll

    def set_status(self, status: int) -> None:
        """SET_STATUS: 0 after DRIVER_OK is QEMU's vhost stop, which a guest
        driver's reset (device_status = 0) and a VM stop both send, followed by
        GET_VRING_BASE on every ring: which of the two it was shows when the
        rings start again (:meth:`queue_started`)."""

    def poll(self) -> bool:
        """One look at the doorbell records, for the daemon's busy-poll loop
        (``vhost_user.server``); True if it found work."""
        core = self.core
        if core is None or not core.poll_doorbell_records:
            return False
        now = monotonic()
        if not core.poll(now):
            return False
        if core.pending_events or core.has_timers:
            self._run_core(now)
        return True

    def fast_kick(self, vring) -> bool:
        """A kick of ``vring`` served whole, for the back-end's reader
        callback (``vhost_user.server``; it has read the kick eventfd and
        checked the ring is started and enabled): the doorbellq with
        DBREC_POLL goes to the native ``_datapath.kick_doorbellq`` (no Python
        between the kick and ``run_sq``). False: not this case, the generic
        ``BackendConnection.kick`` serves it."""
        core = self.core
        if (vring.index != DOORBELLQ or core is None or not core.poll_doorbell_records
                or _datapath is None or not _datapath.kick_enabled):
            return False
        now = monotonic()
        more = _datapath.kick_doorbellq(core, vring.queue, self.conn.mem, vring, now, DOORBELL_BUDGET,
                                        doorbells.apply_changed)
        if core.pending_events or core.has_timers:
            self._run_core(now)
        if more:  # the budget is spent: other connections first, then the rest (notifications off)
            conn = self.conn
            conn.watcher.call_soon(lambda: conn.kick(DOORBELLQ))
        return True

    # --- queues -----------------------------------------------------------
    def process_queue(self, vring, mem) -> None:
        now = monotonic()
        q = vring.queue
        core: RdmaDeviceCore = self.core  # type: ignore[assignment]  # attached: the rings run
        if vring.index == CONTROLQ:
            for _ in range(CONTROL_BUDGET):
                if (chain := q.pop(mem)) is None:
                    break
                resp = core.handle_control(chain.read(), now)
                n = min(len(resp), chain.writable_len)
                chain.write(memoryview(resp)[:n])
                q.push(mem, chain, n)
        elif vring.index == DOORBELLQ:
            first = True
            for _ in range(DOORBELL_BUDGET):
                if (chain := q.pop(mem)) is None:
                    break
                if first and core.poll_doorbell_records:
                    # The driver writes a QP's doorbell record before its
                    # doorbell: apply the records first, on the native path
                    # (doorbells.poll); the SQ/RQ doorbells that follow are
                    # then stale and cost no engine run (doorbells.ring).
                    core.poll(now)
                first = False
                core.doorbell(chain.read(), now)
                q.push(mem, chain, 0)
            # the records were read; events and timers are what is left
            # (the back-end's kick ends with the device's poll hook anyway)
            if core.pending_events or core.has_timers:
                self._run_core(now)
            return
        self._run_core(now)

    def _on_core_notify(self) -> None:
        # A peer's request queued events here; deliver after the current callback.
        if not self._deliver_scheduled and getattr(self, "conn", None) is not None:
            self._deliver_scheduled = True
            self.conn.watcher.call_soon(self._deferred)

    def _deferred(self) -> None:
        self._deliver_scheduled = False
        self._run_core(monotonic())

    def _run_core(self, now: float) -> None:
        result = self.core.process(now)  # type: ignore[union-attr]  # attached
        self._events.extend(result.events)
        self._deliver()
        self._arm_timer(result.next_deadline)

    def _arm_timer(self, deadline: float | None) -> None:
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.conn.watcher.call_later(deadline - monotonic(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._run_core(monotonic())

    def _deliver(self) -> None:
        if not self._events:
            return
        vring = self.conn.vrings[EVENTQ]
        if not vring.started or not vring.enabled:
            return
        mem = self.conn.mem
        q = vring.queue
        pushed = False
        while self._events:
            chain = q.pop(mem)
            if chain is None:
                break
            room = chain.writable_len // EVENT_SIZE
            if room == 0:
                self.bad_event_buffers += 1
                q.push(mem, chain, 0)
                pushed = True
                continue
            batch = [self._events.popleft() for _ in range(min(room, len(self._events)))]
            data = encode_events(batch)
            chain.write(data)
            q.push(mem, chain, len(data))
            pushed = True
        if pushed:
            vring.notify(mem)

    def queue_started(self, vring) -> None:
        """A ring starts. After every ring stopped (:meth:`queue_stopped`), the
        index it starts at tells a VM that was paused from a driver that was
        reset: QEMU continues a VM with each ring where GET_VRING_BASE left it,
        while a new driver starts its rings from 0. So: a ring started elsewhere
        than it stopped resets the device first (the old driver's objects go,
        the new one starts clean), counted in ``resets``; every ring back where
        it stopped is a resume (objects kept, ``resumes``)."""
        stopped = self._stopped_at
        if stopped is not None:
            if stopped.get(vring.index, vring.base) != vring.base:
                self._stopped_at = None
                self.resets += 1
                self.reset()
            else:
                stopped.pop(vring.index, None)
                if not stopped:
                    self._stopped_at = None
                    self.resumes += 1
        self._rings_ran = True
        if vring.index == EVENTQ and self._events:
            self.conn.watcher.call_soon(self._deliver)

    def queue_stopped(self, vring) -> None:
        """The front-end stopped every ring (GET_VRING_BASE) after they ran: QEMU's
        vhost stop, on a guest driver's reset (7.2 sends SET_STATUS 0 first;
        11.1's vhost-user-base only stops the rings) or on a VM stop (the same
        messages). Nothing is dropped yet: the objects wait, untouched, for the
        rings to start again, where :meth:`queue_started` tells the two apart."""
        if self._rings_ran and not any(v.started for v in self.conn.vrings):
            self._rings_ran = False
            self._stopped_at = {v.index: v.base for v in self.conn.vrings}

    def reset(self) -> None:
        if self.core is not None:
            for k, v in self.core.metrics.as_dict().items():
                self.retired_metrics[k] = self.retired_metrics.get(k, 0) + v
        self._close_core()
        self.core = self._new_core()
        self._dbrec_poll = False
        self._stopped_at = None

    def _close_core(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if self.core is not None:
            self.core.close()
        self._events.clear()

    def close(self) -> None:
        try:
            self._close_core()
        finally:
            if self.account is not None:
                self.account.close()
