"""The fabric: how an RC QP reaches its peer QP (spec 5.x.6.9).

Roles: a *requester* QP sends :class:`Request` messages; the *responder* QP
that owns ``(dst_gid, dst_qpn)`` answers each with a :class:`Response` (ACK,
NAK, READ response, atomic ACK). Messages are shaped like IBTA RC packets
(24-bit PSNs, packet counts, NAK syndromes), so the RoCEv2 fabric of the
``roce`` package can carry the same messages over UDP; the requester never
assumes that a response comes back synchronously.

Zero copy: ``Request.payload`` and ``Response.data`` are lists of memoryviews
into the *sending* guest's memory; the receiving side copies them straight
into its own guest memory (:func:`virtio_rdma.mr.sg_copy`). They are only
valid during the delivery call; a network fabric serialises them at once.

The first implementation, :class:`fabric.local.LocalFabric`, connects the QPs
of one host.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from verbs import PSN_MASK, NakCode, WrOpcode
from virtio_rdma.errors import FabricError


class RespKind(enum.IntEnum):
    ACK = 0
    NAK = 1
    READ_RESP = 2
    ATOMIC_ACK = 3


@dataclass(slots=True)
class Request:
    src_gid: bytes
    src_qpn: int
    dst_gid: bytes
    dst_qpn: int
    psn: int
    npkts: int
    opcode: WrOpcode
    length: int = 0
    payload: list = field(default_factory=list)  # memoryviews (SEND / WRITE)
    imm_data: int | None = None
    remote_addr: int = 0
    rkey: int = 0
    compare_add: int = 0
    swap: int = 0
    solicited: bool = False

    @property
    def last_psn(self) -> int:
        return (self.psn + self.npkts - 1) & PSN_MASK


@dataclass(slots=True)
class Response:
    src_gid: bytes
    src_qpn: int
    dst_gid: bytes
    dst_qpn: int
    psn: int  # PSN being acknowledged (last PSN of the request) or NAK'd
    kind: RespKind
    nak: NakCode | None = None
    rnr_timer: int = 0  # responder's min_rnr_timer for RNR NAKs
    data: list = field(default_factory=list)  # memoryviews (READ response)
    atomic_orig: int = 0


class Endpoint(Protocol):
    """What a QP registers with a fabric."""

    def on_request(self, req: Request, now: float) -> Response | None: ...

    def on_response(self, resp: Response, now: float) -> None: ...


class WireQp(Protocol):
    """The engine that runs one guest QP whose peer a network or a host RDMA
    device reaches (:class:`fabric.roce_qp.NetworkQp`,
    :class:`fabric.hca.VerbsQp`), as the device core drives it. It consumes
    the QP's guest rings through :mod:`virtio_rdma.rings` (the
    ``SendEngine``/``RecvEngine`` there), so it writes CQEs, retires ring
    slots and moves the QP to ERR exactly as the local message path does.
    QPs without one run the message path of :mod:`virtio_rdma.datapath`
    over :meth:`Fabric.send`."""

    def modified(self, prev, target, now: float) -> None:
        """The guest's MODIFY_QP moved the QP from ``prev`` to ``target``
        (QpState; RESET and ERR come as :meth:`close` and :meth:`on_error`).
        May raise CommandError: the core keeps ``prev`` and fails the command."""

    def progress(self, now: float) -> None:
        """The guest rang the SQ doorbell: start what it posted."""

    def rq_rung(self, now: float) -> None:
        """The guest posted receives (the engine may take them now or later)."""

    def deadline(self) -> float | None:
        """When :meth:`on_timer` must run next (None: no timer)."""

    def on_timer(self, now: float) -> None:
        """Run due retransmission/RNR timers."""

    def on_error(self) -> None:
        """The QP enters ERR (the core flushes its rings): stop and forget
        what the engine holds."""

    def close(self) -> None:
        """The QP went to RESET or is destroyed: release the engine (idempotent)."""


class Fabric(ABC):
    """Where QPs live and how their messages travel."""

    @property
    @abstractmethod
    def gid(self) -> bytes:
        """The GID of this host's port."""

    @abstractmethod
    def alloc_qpn(self) -> int:
        """Allocate a host-unique QPN (24 bit, never 0, 1 or the multicast QPN 0xFFFFFF)."""

    @abstractmethod
    def free_qpn(self, qpn: int) -> None: ...

    @abstractmethod
    def attach(self, qpn: int, endpoint: Endpoint) -> None:
        """Make ``(self.gid, qpn)`` reachable."""

    @abstractmethod
    def detach(self, qpn: int) -> None: ...

    @abstractmethod
    def send(self, req: Request, now: float) -> Response | None:
        """Send a request. Returns the response if it is available at once;
        otherwise (or if the request is lost) returns None and the response,
        if any, arrives later via the source endpoint's ``on_response``."""

    def bind(self, dev):
        """Called once per device core. A fabric backed by a host RDMA device
        returns the object that owns that guest's objects on the device
        (:class:`fabric.hca.VerbsBinding`: PDs, MRs, QPs) and
        may lower ``dev.limits`` to what the device supports; None: the
        device core makes its own keys and QPNs."""
        return None

    def open_wire_qp(self, dev, qp, now: float) -> WireQp | None:
        """Called when ``qp`` (of device core ``dev``) moves INIT -> RTR. A
        network fabric returns the wire engine that will run the QP when its
        ``dgid`` is on another host (see :mod:`fabric.roce_qp`); None keeps
        the QP on the message path of :meth:`send`."""
        return None

    def describe(self) -> str:
        """What this fabric is, for the daemon's log (e.g. "RoCEv2 on 192.0.2.1:4791")."""
        return f"{type(self).__name__} (GID {self.gid.hex()})"

    def respond(self, resp: Response, now: float) -> None:  # pragma: no cover - network fabrics
        """Send a response produced asynchronously (network fabrics)."""
        raise FabricError(f"{type(self).__name__} delivers responses synchronously")


#: QPNs a fabric hands out at most: half the 24-bit space, so a random draw
#: finds a free one quickly and a guess hits a live QP rarely
MAX_QPNS = 1 << 23
