"""The doorbells of a virtio-rdma device: doorbellq records and doorbell
records in guest memory (spec 5.4, docs/virtio-rdma.md "Doorbells").

A doorbell carries a new SQ or RQ producer index of a QP, or arms a CQ.
:func:`doorbell` consumes one doorbellq buffer; with DBREC_POLL,
:func:`poll` (the daemon's busy-poll loop) and every
:func:`virtio_rdma.timers.process` apply the QP doorbell records that
changed instead, found by the native scanner
(``virtio_rdma._datapath.DbrecScanner``) and applied natively where they
are the plain case (``_datapath.apply_records``: the new index stored and
the QP's engine run, the native ``run_sq`` first), and the accelerator queues'
records (:func:`virtio_rdma.accel.poll_records`, with a scanner of their
own; spec 5.x.6.10). An index that moves backwards or
past the ring depth is a guest bug: the doorbell is counted
(``bad_doorbells``) and the QP goes to ERR with QP_FATAL; a doorbell for
an unknown object is counted and ignored.

The functions take the core; :class:`~virtio_rdma.core.RdmaDeviceCore` has
:func:`doorbell` and :func:`poll` as its methods.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from verbs import AsyncEvent, QpState
from virtio.errors import GuestMemoryError
from virtio.memory import le32_words
from virtio_rdma import accel, datapath, rings
from virtio_rdma.constants import OBJ_NUM_MASK, DoorbellKind
from virtio_rdma.errors import UnknownValueError, VirtioRdmaError
from virtio_rdma.events import core_call, flush_notify
from virtio_rdma.wire import DBREC_SIZE, DOORBELL_SIZE, Doorbell, decode_doorbells

if TYPE_CHECKING:
    from virtio_rdma.core import RdmaDeviceCore
    from virtio_rdma.qp import QueuePair

try:  # the native path from a changed record to the engines (virtio_rdma/_datapath.pyx)
    from virtio_rdma._datapath import apply_records as _apply_records
except ImportError:  # pragma: no cover - extension not built
    _apply_records = None  # type: ignore[assignment]  # only where the extension is not built

log = logging.getLogger(__name__)
U32 = 1 << 32
_ONE = struct.Struct("<II")  # one doorbell record (wire.DoorbellRecord): kind << 24 | number, value
assert _ONE.size == DOORBELL_SIZE
_CQ_ARM = DoorbellKind.CQ_ARM
_SQ = DoorbellKind.SQ
_AQ = DoorbellKind.AQ
_RQ = DoorbellKind.RQ
_RESET = QpState.RESET
_ERR = QpState.ERR


def doorbell(core: RdmaDeviceCore, records, now: float) -> None:
    """Consume one doorbellq buffer (bytes) or a list of :class:`wire.Doorbell`."""
    core.in_call += 1
    try:
        if not isinstance(records, list):
            if len(records) == DOORBELL_SIZE and core.poll_doorbell_records:
                # one record, the common buffer: a stale SQ/RQ doorbell is
                # counted and dropped before any decoding
                word, value = _ONE.unpack(records)
                qp = core.qps.get(word & OBJ_NUM_MASK)
                if qp is not None and qp.state is not _RESET and _stale(qp, word >> 24, value):
                    core.metrics.doorbells += 1
                    core.metrics.doorbells_stale += 1
                    return
            try:
                records = decode_doorbells(records)
            except (VirtioRdmaError, UnknownValueError) as e:
                core.metrics.malformed_doorbell_buffers += 1
                log.debug("doorbell buffer dropped: %s", e)
                return
        for db in records:
            core.metrics.doorbells += 1
            ring(core, db, now)
    except Exception:
        core.metrics.internal_errors += 1
        log.exception("virtio-rdma: internal error in doorbell")
    finally:
        core.in_call -= 1
    flush_notify(core)


def ring(core: RdmaDeviceCore, db: Doorbell, now: float) -> None:
    """Apply one doorbell."""
    if db.kind is _CQ_ARM:
        cq = core.cqs.get(db.num)
        if cq is None:
            core.metrics.bad_doorbells += 1
            return
        cq.request_notify(db.value)
        return
    if db.kind is _AQ:
        accel.ring_aq(core, db.num, db.value, now)
        return
    qp = core.qps.get(db.num)
    if qp is None or qp.state is _RESET:
        core.metrics.bad_doorbells += 1
        return
    if _stale(qp, db.kind, db.value):
        core.metrics.doorbells_stale += 1
        return
    if db.kind is _SQ:
        if not _advance(core, qp, "sq", db.value, qp.sq_ci, qp.sq_pi, qp.layout.sq_depth):
            return
        qp.sq_pi = db.value
        if qp.state is _ERR:
            rings.flush(core, qp)
        else:
            datapath.progress_sq(core, qp, now)
            if qp.inflight or qp.rnr_until is not None or qp.net is not None:
                core.timer_qps.add(qp.qpn)
    else:
        if not _advance(core, qp, "rq", db.value, qp.rq_ci, qp.rq_pi, qp.layout.rq_depth):
            return
        qp.rq_pi = db.value
        if qp.state is _ERR:
            rings.flush(core, qp)
        elif qp.net is not None:  # a wire engine may hand receives to its transport now
            qp.net.rq_rung(now)


def _stale(qp: QueuePair, kind: int, value: int) -> bool:
    """Is this SQ or RQ doorbell an index the device already has (DBREC_POLL:
    the record carried it first) with nothing for the engine to start? Then
    :func:`ring` would store the same index and find no work."""
    if qp.net is not None or qp.state is _ERR:
        return False
    if kind == _SQ:
        return value == qp.sq_pi == qp.sq_next and not qp.inflight and qp.rnr_until is None
    return kind == _RQ and value == qp.rq_pi


def _advance(core: RdmaDeviceCore, qp: QueuePair, which: str, pi: int, ci: int, old_pi: int,
             depth: int) -> bool:
    if core.poll_doorbell_records and pi != old_pi and (old_pi - pi) % U32 < U32 // 2:
        # DBREC_POLL: the record may already have carried us past this
        # doorbell (the driver writes the record first, and the WQEs may
        # even have completed): a value behind the current pi is stale,
        # no error, just no news.
        return False
    if (pi - ci) % U32 > depth or (pi - old_pi) % U32 > depth:
        core.metrics.bad_doorbells += 1
        log.debug("QP %#x %s producer index %d (ci %d, depth %d) is absurd", qp.qpn, which,
                  pi, ci, depth)
        rings.qp_error(core, qp, AsyncEvent.QP_FATAL)
        return False
    return True


def poll_records(core: RdmaDeviceCore, now: float) -> int:
    """Apply every QP and AQ doorbell record that changed (DBREC_POLL);
    returns how many records were applied. A native scanner finds the QPs';
    each is then read again and applied like a doorbell."""
    scanner = core.dbrec_scanner
    if scanner is None:
        qps = list(core.qps.values())
    else:
        key = (len(core.qps), core.qp_epoch)
        if scanner.key != key:
            scanner.rebuild(core.qps.values(), key)
        qps = scanner.scan(core.mem)
    n = _apply_qps(core, qps, now) if qps else 0
    if core.aqs:
        n += accel.poll_records(core, now)
    return n


def _apply_qps(core: RdmaDeviceCore, qps: list, now: float) -> int:
    n = 0
    if _apply_records is not None:  # the plain changes natively, the rest below
        qps, n = _apply_records(core, qps, now, datapath.progress_sq)
    for qp in qps:
        if qp.state is _RESET or qp.destroyed:
            continue
        try:
            sq_pi, rq_pi = le32_words(core.mem.translate(qp.dbrec_gpa, DBREC_SIZE))  # each word whole
        except GuestMemoryError:
            continue
        if rq_pi != qp.rq_pi:
            n += 1
            ring(core, Doorbell(_RQ, qp.qpn, rq_pi), now)
        if sq_pi != qp.sq_pi and qp.qpn in core.qps:
            n += 1
            ring(core, Doorbell(_SQ, qp.qpn, sq_pi), now)
    return n


def apply_changed(core: RdmaDeviceCore, qps: list, now: float) -> int:
    """:func:`poll` after the scan, for QPs the caller's scan found changed
    (the native doorbellq kick, ``_datapath.kick_doorbellq``): the same
    accounting, error containment and notification."""
    return core_call(core, "applying doorbell records", _apply_qps, core, qps, now, default=0)


def poll(core: RdmaDeviceCore, now: float) -> int:
    """Busy-poll entry (the daemon's spin loop): apply changed doorbell
    records if DBREC_POLL is on; returns how many were applied."""
    if not core.poll_doorbell_records:
        return 0
    scanner = core.dbrec_scanner
    if scanner is not None and not core.aqs and scanner.key == (len(core.qps), core.qp_epoch):
        # poll_records' common case without its frames: the scan alone (an idle
        # pass of the daemon's loop finds nothing), core_call only for a change
        qps = scanner.scan(core.mem)
        if not qps:
            flush_notify(core)              # as core_call ends
            return 0
        return apply_changed(core, qps, now)
    return core_call(core, "polling doorbell records", poll_records, core, now, default=0)
