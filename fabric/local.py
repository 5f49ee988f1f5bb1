"""Local fabric: the transport between QPs of the same host.

:class:`LocalFabric` connects the QPs of all devices served by one daemon
(one host): QPNs are allocated host-wide at random, every device shares the host GID,
and :meth:`LocalFabric.send` delivers a request synchronously and returns the
response. A request to an unknown (gid, qpn) is dropped, as a network would,
and the requester's retry timer handles it.
"""
from __future__ import annotations

import secrets

from fabric.base import MAX_QPNS, Endpoint, Fabric, Request, Response
from verbs import QPN_MASK
from virtio_rdma.errors import FabricError


class LocalFabric(Fabric):
    """All QPs of one host (one daemon): synchronous, lossless, in-order delivery.
    QPNs are random (:meth:`alloc_qpn`), like keys (:mod:`virtio_rdma.mr`)."""

    def __init__(self, gid: bytes = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])):
        if len(gid) != 16:
            raise FabricError(f"GID must be 16 bytes, got {len(gid)}")
        self._gid = bytes(gid)
        self._endpoints: dict[int, Endpoint] = {}
        self._allocated: set[int] = set()
        self.delivered = 0
        self.dropped = 0
        #: :meth:`send` is this class's own (synchronous delivery to the
        #: attached endpoint), so a native path may deliver in its place
        self.direct = type(self).send is LocalFabric.send

    @property
    def gid(self) -> bytes:
        return self._gid

    def alloc_qpn(self) -> int:
        """A QPN drawn at random (a cryptographic source) from the free ones:
        a guest cannot tell other guests' QPNs from its own."""
        if len(self._allocated) >= MAX_QPNS:
            raise FabricError(f"QPN space exhausted ({len(self._allocated)} allocated)")
        while True:  # the table is at most half full: two draws on average at worst
            qpn = 2 + secrets.randbelow(QPN_MASK - 2)  # 2 .. 0xFFFFFE (0xFFFFFF: multicast)
            if qpn not in self._allocated:
                self._allocated.add(qpn)
                return qpn

    def adopt_qpn(self, qpn: int) -> None:
        """Reserve ``qpn``, chosen by someone else (a host RDMA device numbers
        its own QPs, and the guest's QP takes that number)."""
        if qpn in self._allocated:
            raise FabricError(f"the device returned QPN {qpn:#x}, which is in use")
        self._allocated.add(qpn)

    def free_qpn(self, qpn: int) -> None:
        self._allocated.discard(qpn)
        self._endpoints.pop(qpn, None)

    def attach(self, qpn: int, endpoint: Endpoint) -> None:
        if qpn not in self._allocated:
            raise FabricError(f"QPN {qpn:#x} was not allocated on this fabric")
        if qpn in self._endpoints:
            raise FabricError(f"QPN {qpn:#x} already attached")
        self._endpoints[qpn] = endpoint

    def detach(self, qpn: int) -> None:
        self._endpoints.pop(qpn, None)

    def endpoint(self, qpn: int) -> Endpoint | None:
        """The endpoint attached at ``(self.gid, qpn)``, if any."""
        return self._endpoints.get(qpn)

    def send(self, req: Request, now: float) -> Response | None:
        ep = self._endpoints.get(req.dst_qpn) if req.dst_gid == self._gid else None
        if ep is None:
            self.dropped += 1
            return None
        self.delivered += 1
        return ep.on_request(req, now)
