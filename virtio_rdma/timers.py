"""The timers of a virtio-rdma device: RC retransmission and RNR retry
deadlines (IBTA Vol. 1 9.7.6.1 ACK timeout, 9.7.5.2.8 RNR NAK).

The core keeps the QPNs that may have a deadline in ``timer_qps`` (a QP is
added when it has work in flight, an RNR wait or a wire engine, and leaves
when it has none). :func:`process` runs the due ones through
:func:`virtio_rdma.datapath.on_timer` and returns the eventq records
waiting plus the next time it must run; the vhost-user device turns that
into an event-loop timer. Time is ``now``, passed in: nothing here reads a
clock.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtio_rdma import datapath
from virtio_rdma.doorbells import poll_records
from virtio_rdma.events import take_events
from virtio_rdma.wire import Event

if TYPE_CHECKING:
    from virtio_rdma.core import RdmaDeviceCore

log = logging.getLogger(__name__)


@dataclass
class ProcessResult:
    events: list[Event] = field(default_factory=list)
    next_deadline: float | None = None


def process(core: RdmaDeviceCore, now: float) -> ProcessResult:
    """Run due timers (retransmission, RNR retry) and return the events to
    deliver on the eventq plus the next time :func:`process` must run."""
    core.in_call += 1
    try:
        if core.poll_doorbell_records:
            poll_records(core, now)
        nd = next_deadline(core, now)
    except Exception:
        core.metrics.internal_errors += 1
        log.exception("virtio-rdma: internal error in process")
        nd = None
    finally:
        core.in_call -= 1
    return ProcessResult(take_events(core), nd)


def next_deadline(core: RdmaDeviceCore, now: float) -> float | None:
    """Fire the QPs whose deadline has passed; forget those with none left;
    return the earliest deadline still set."""
    nd = None
    timers = core.timer_qps
    for qpn in list(timers):
        qp = core.qps.get(qpn)
        if qp is None:
            timers.discard(qpn)
            continue
        d = datapath.deadline(qp)
        if d is not None and now >= d:
            datapath.on_timer(core, qp, now)
            d = datapath.deadline(qp)
        if d is None:
            if not qp.inflight:
                timers.discard(qpn)
            continue
        nd = d if nd is None else min(nd, d)
    return nd
