"""Queue pairs: attributes, ring geometry and the per-QP transport state.

A QP (spec 5.x.6.1 CREATE_QP / MODIFY_QP) owns an SQ and an RQ ring in guest
memory and an 8-byte doorbell record. This module holds the state; the RC
protocol engine that drives it is :mod:`virtio_rdma.datapath`, the state
machine table :mod:`virtio_rdma.qp_state`. A QP is a fabric endpoint: it
delegates ``on_request``/``on_response`` to its engine (the datapath module,
given at creation), so this module does not import the engine that imports
it.

Ring indices are free-running u32 counters (``pi`` = producer, written by the
driver through doorbells; ``next``/``ci`` = device progress):
``sq_ci <= sq_next <= sq_pi`` (mod 2^32): WQEs in ``[sq_ci, sq_next)`` are in
flight, ``[sq_next, sq_pi)`` not started yet.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verbs import PSN_MASK, Access, QpState, WrOpcode
from virtio_rdma.wire import SendWqe, WqLayout, qp_attr_defaults

if TYPE_CHECKING:
    from fabric.base import WireQp
    from virtio_rdma.datapath import LocalSender


@dataclass(slots=True)
class Inflight:
    """A send WQE that has been started (request sent, response pending)."""

    index: int        # SQ producer count of the WQE
    wqe: SendWqe
    psn: int
    npkts: int
    sent_at: float
    signaled: bool

    @property
    def last_psn(self) -> int:
        return (self.psn + self.npkts - 1) & PSN_MASK

    @property
    def is_read_or_atomic(self) -> bool:
        return self.wqe.opcode in (WrOpcode.RDMA_READ, WrOpcode.ATOMIC_CMP_AND_SWP,
                                   WrOpcode.ATOMIC_FETCH_AND_ADD)


class QueuePair:
    __slots__ = (
        "dev", "qpn", "pdn", "send_cq", "recv_cq", "sq_sig_all", "layout", "sq_gpa", "rq_gpa",
        "dbrec_gpa", "state", "attr", "access",
        "sq_pi", "sq_next", "sq_ci", "rq_pi", "rq_ci",
        "inflight", "sq_psn", "retry_left", "rnr_left", "rnr_until",
        "epsn", "atomic_cache", "nak_seq_sent", "destroyed", "net", "local", "hw",
        "engine",
    )

    def __init__(self, dev, qpn: int, pdn: int, send_cq, recv_cq, layout: WqLayout,
                 sq_gpa: int, rq_gpa: int, dbrec_gpa: int, sq_sig_all: bool, *, engine):
        self.dev = dev
        self.qpn = qpn
        self.pdn = pdn
        self.send_cq = send_cq
        self.recv_cq = recv_cq
        self.layout = layout
        self.sq_gpa = sq_gpa
        self.rq_gpa = rq_gpa
        self.dbrec_gpa = dbrec_gpa
        self.sq_sig_all = sq_sig_all
        #: the current attributes (MODIFY_QP sets them, QUERY_QP reports them)
        self.attr = qp_attr_defaults()
        self.destroyed = False
        #: the wire transport (``fabric.roce_qp.NetworkQp``) when the peer is
        #: on another host; None: the message path of ``datapath`` over the fabric
        self.net: WireQp | None = None
        #: the message path's requester (``datapath.LocalSender``), made on first use
        self.local: LocalSender | None = None
        #: the host RDMA device's QP behind this one (a verbs fabric); owned here
        self.hw = None
        #: the RC engine driving this QP (``virtio_rdma.datapath``): its
        #: ``on_request(dev, qp, req, now)`` and ``on_response(dev, qp, resp, now, sync=)``
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        """Enter RESET: empty queues, indices 0, attributes kept only for query."""
        self.state = QpState.RESET
        self.access = Access(0)
        self.sq_pi = self.sq_next = self.sq_ci = 0
        self.rq_pi = self.rq_ci = 0
        self.inflight: deque[Inflight] = deque()
        self.sq_psn = 0
        self.retry_left = 0
        self.rnr_left = 0
        self.rnr_until: float | None = None
        self.epsn = 0
        self.nak_seq_sent = False  # a PSN sequence NAK is outstanding (send it once)
        self.atomic_cache: dict[int, int] = {}

    # ---- fabric endpoint -------------------------------------------------
    def on_request(self, req, now):
        return self.engine.on_request(self.dev, self, req, now)

    def on_response(self, resp, now) -> None:
        self.engine.on_response(self.dev, self, resp, now, sync=False)

    # ---- helpers ---------------------------------------------------------
    @property
    def sq_outstanding(self) -> int:
        return (self.sq_pi - self.sq_ci) & 0xFFFFFFFF

    @property
    def rq_outstanding(self) -> int:
        return (self.rq_pi - self.rq_ci) & 0xFFFFFFFF

    def sq_slot_gpa(self, index: int) -> int:
        return self.sq_gpa + ((index & (self.layout.sq_depth - 1)) << self.layout.sq_wqe_shift)

    def rq_slot_gpa(self, index: int) -> int:
        return self.rq_gpa + ((index & (self.layout.rq_depth - 1)) << self.layout.rq_wqe_shift)

    def __repr__(self) -> str:
        return f"<QueuePair qpn={self.qpn:#x} {self.state.name}>"
