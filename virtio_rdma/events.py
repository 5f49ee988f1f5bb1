"""The eventq side of a virtio-rdma device: completion events, async events
and the notification that events are waiting (spec 5.7, docs/virtio-rdma.md
"Events").

Writing CQEs into a CQ ring is :mod:`virtio_rdma.cq`'s; here a push's result
becomes counters and, when the CQ was armed, a completion event; a CQ that
overflows or faults becomes a CQ_ERR async event and its QPs go to ERR.
Events wait in the core's ``event_queue`` (bounded by
``DeviceLimits.max_pending_events``; past it they are dropped and counted)
until :func:`virtio_rdma.timers.process` hands them to the vhost-user device.
``core.notify`` is called when events arrive outside a call into the core
(a peer's request delivered here): the device then schedules a delivery.

The functions take the core; :class:`~virtio_rdma.core.RdmaDeviceCore` also
has them as its methods (``core.complete(...)``), which is how the data path
calls them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from verbs import AsyncEvent
from virtio_rdma import rings
from virtio_rdma.constants import EventKind
from virtio_rdma.cq import CompletionQueue, PushResult
from virtio_rdma.wire import Completion, Event

if TYPE_CHECKING:
    from virtio_rdma.core import RdmaDeviceCore

log = logging.getLogger(__name__)

_WRITTEN = PushResult.WRITTEN
_WRITTEN_NOTIFY = PushResult.WRITTEN_NOTIFY
_DROPPED = PushResult.DROPPED
_OVERFLOW = PushResult.OVERFLOW


def complete(core: RdmaDeviceCore, cq: CompletionQueue, c: Completion, solicited: bool = False) -> None:
    """Write one completion into ``cq``; on a CQ error, CQ_ERR and its QPs to ERR."""
    r = cq.push(core.mem, c, solicited)
    if r is _WRITTEN or r is _WRITTEN_NOTIFY:
        core.metrics.completions += 1
        if r is _WRITTEN_NOTIFY:
            core.metrics.completion_events += 1
            queue_event(core, Event(EventKind.COMPLETION, 0, cq.cqn))
        return
    if r is _DROPPED:
        core.metrics.completions_dropped += 1
        return
    if r is _OVERFLOW:
        core.metrics.cq_overflows += 1
    else:
        core.metrics.cq_faults += 1
    core.metrics.completions_dropped += 1
    async_event(core, AsyncEvent.CQ_ERR, cq.cqn)
    for qpn in sorted(cq.qps):
        qp = core.qps.get(qpn)
        if qp is not None:
            rings.qp_error(core, qp, AsyncEvent.QP_FATAL)


def async_event(core: RdmaDeviceCore, event: AsyncEvent, number: int) -> None:
    core.metrics.async_events += 1
    queue_event(core, Event(EventKind.ASYNC, int(event), number))


def queue_event(core: RdmaDeviceCore, ev: Event) -> None:
    """Queue one eventq record (dropped and counted past the limit)."""
    if len(core.event_queue) >= core.limits.max_pending_events:
        core.metrics.events_dropped += 1
        return
    core.event_queue.append(ev)
    if not core.in_call and core.notify is not None:
        core.notify()


def flush_notify(core: RdmaDeviceCore) -> None:
    """At the end of a call into the core: tell the device if events wait."""
    if core.event_queue and core.notify is not None:
        core.notify()


def core_call(core: RdmaDeviceCore, what: str, fn: Callable[..., Any], *args: Any,
              default: Any = None) -> Any:
    """``fn(*args)`` as a call into the device core from outside it (a job coming
    back, doorbell records found changed): events it queues are signalled once, at
    the end; an internal error is counted and logged (``what`` says where), never
    raised into the daemon's loop, and ``default`` is returned instead."""
    core.in_call += 1
    try:
        return fn(*args)
    except Exception:
        core.metrics.internal_errors += 1
        log.exception("virtio-rdma: internal error %s", what)
        return default
    finally:
        core.in_call -= 1
        flush_notify(core)


def take_events(core: RdmaDeviceCore) -> list[Event]:
    """The queued events, in order; the queue is left empty."""
    events = list(core.event_queue)
    core.event_queue.clear()
    return events
