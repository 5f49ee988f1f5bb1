"""The guest transport seam: what guest_lib needs from a virtio transport.

A virtio device is reached through a *transport* (virtio spec v1.2 §4): the
transport negotiates features, exposes the device configuration space, lays
out the virtqueues in memory both sides can reach and carries notifications
in both directions. guest_lib's verbs objects (:mod:`guest_lib.context` and
the CQs, QPs and MRs under it) drive the virtio-rdma device
(docs/virtio-rdma.md) through :class:`VirtioTransport` alone and never name
an implementation. Implementations:

* :class:`guest_lib.transports.vhost_user.VhostUserTransport`: a process
  guest that is its own vhost-user front-end (the virtio-user pattern): memfd
  memory shared with the back-end daemon, eventfd kicks and calls.
* :class:`guest_lib.transports.virtio_pci.VirtioPciTransport`: a userspace
  virtio-pci driver inside a QEMU guest: the function bound to
  uio_pci_generic, its BARs mapped from ``/sys/bus/pci/devices/.../resource*``,
  memory from pinned huge pages with a virt -> phys translation
  (/proc/self/pagemap), notifications by a write to the notify BAR, used
  buffers polled or signalled by INTx through /dev/uioN.

Addresses: a transport deals in two kinds. A *device address* ("gpa") is
what the device dereferences: guest-physical for vhost-user and for a
virtio-pci device without an IOMMU, an IOVA behind one. A *driver address*
("uva") is this process's virtual address of the same byte: guest_lib uses
it as the iova of MRs and the address of SGEs, as ibv_reg_mr does.

Optional members (looked up with getattr, so not in the protocol):
``alloc_mr(size, align) -> (uva, view, chunks)`` / ``free_mr(uva)``: an
MR buffer contiguous only in the driver's address space, with its page
list ``chunks`` [(device address, length)] (one per physically contiguous
piece) for REG_MR; ``view_of_uva(uva, length)``: a view of a driver range
that may cross such pieces. Without them an MR is one :meth:`alloc` (one
chunk), as for vhost-user, whose memfd is contiguous.

Errors: a transport raises :class:`TransportError` (errno says why),
:class:`DeviceGone` (``ENOTCONN``) once the device is known to be gone and
:class:`WaitTimeout` (``ETIMEDOUT``) when a wait runs out. guest_lib maps all
of them to :class:`~guest_lib.errors.RDMAError` with that errno, and to
``ENOTCONN`` whenever :attr:`VirtioTransport.dead` is set (docs
guest-transport.md). Bad addresses raise the memory layer's error
(:class:`virtio.errors.GuestMemoryError`); exhausted memory
:class:`MemoryError`; a bad size or alignment :class:`ValueError`.
"""
from __future__ import annotations

import errno as _errno
import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from guest_lib.errors import VerbsError
from virtio_rdma.constants import NUM_QUEUES, Feature

#: virtio-rdma device features guest_lib drives (docs/virtio-rdma.md 5.x.3):
#: a transport offers these, on top of its own transport features, when it
#: negotiates, and keeps those the device also offers.
DRIVER_FEATURES = ((1 << Feature.INLINE_DATA) | (1 << Feature.ATOMIC) | (1 << Feature.DBREC_POLL)
                   | (1 << Feature.ACCEL))

__all__ = ["DRIVER_FEATURES", "NUM_QUEUES", "DeviceGone", "TransportError", "VirtQueue", "VirtioTransport",
           "WaitTimeout", "missing_members"]


class TransportError(VerbsError):
    """A transport operation failed; ``errno`` says how."""

    def __init__(self, message: str, errno: int = _errno.EIO):
        super().__init__(message)
        self.errno = errno


class DeviceGone(TransportError):
    """The device is gone (the daemon died or dropped us; the PCI device was
    removed or needs a reset). Every later call fails the same way."""

    def __init__(self, message: str):
        super().__init__(message, _errno.ENOTCONN)


class WaitTimeout(TransportError):
    """No used buffer within the wait's timeout (the device is still there)."""

    def __init__(self, message: str):
        super().__init__(message, _errno.ETIMEDOUT)


@runtime_checkable
class VirtQueue(Protocol):
    """The driver side of one split virtqueue (virtio spec v1.2 §2.7), laid
    out in memory the device can reach. :class:`virtio.split.DriverQueue`
    implements it over any :class:`virtio.memory.GuestMemory`, so a PCI
    driver uses it too, over its hugepage memory: it then only has to write
    the rings' device addresses (``desc_gpa``, ``avail_gpa``, ``used_gpa``)
    to the common configuration's queue_desc/queue_driver/queue_device
    and set queue_enable (§4.1.4.3)."""

    def add(self, out_bufs: list[tuple[int, int]], in_bufs: list[tuple[int, int]], token: Any) -> int:
        """Make a buffer chain available: device-readable ``out_bufs`` then
        device-writable ``in_bufs``, each (device address, length);
        ``token`` comes back from :meth:`get_used`. Does not notify."""
        ...

    def get_used(self) -> tuple[Any, int] | None:
        """The next used buffer, (token, bytes written), or None; never blocks."""
        ...

    def enable_cb(self) -> bool:
        """Ask the device to signal used buffers (clear
        VRING_AVAIL_F_NO_INTERRUPT, or set used_event)."""
        ...

    def disable_cb(self) -> None:
        """Ask the device not to signal used buffers (they are polled)."""
        ...

    def kick_suppressed(self) -> bool:
        """Does the device ask for no notifications right now
        (VRING_USED_F_NO_NOTIFY, or avail_event behind)? A device polling its
        queue says so; guest_lib then skips the doorbell (DBREC_POLL)."""
        ...


@runtime_checkable
class VirtioTransport(Protocol):
    """One virtio device, opened and ready (status DRIVER_OK) with its
    queues enabled, owned by whoever opened it until handed to
    :class:`guest_lib.Context` (which then closes it).

    Opening is the implementation's business (a socket path, a PCI address):
    it runs the initialization of virtio spec §3.1.1 (reset, ACKNOWLEDGE,
    DRIVER, feature negotiation offering :data:`DRIVER_FEATURES`,
    FEATURES_OK, queue setup, DRIVER_OK) for :data:`NUM_QUEUES` queues.
    """

    #: a label for messages: the socket path, the PCI address
    name: str
    #: the negotiated feature bits (device and transport bits, as written to
    #: driver_feature; PCI: after reading FEATURES_OK back)
    features: int

    @property
    def queues(self) -> Sequence[VirtQueue]:
        """The driver side of each virtqueue, by index."""
        ...

    @property
    def dead(self) -> str | None:
        """Why the device is known to be gone, or None. Reading it does no
        I/O: it is set by the member that found out (:meth:`check_alive`,
        :meth:`wait_used`, :meth:`get_config`) and by :meth:`close`.
        PCI: device_status read as 0xff (surprise removal) or with
        DEVICE_NEEDS_RESET set."""
        ...

    # --- configuration --------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device configuration space at ``offset``.
        vhost-user: VHOST_USER_GET_CONFIG. PCI: reads of the device-specific
        configuration structure (VIRTIO_PCI_CAP_DEVICE_CFG) in its BAR,
        repeated while config_generation changes (§4.1.4.3.1)."""
        ...

    # --- memory the device can reach -------------------------------------
    def alloc(self, size: int, align: int) -> int:
        """Allocate ``size`` bytes at an ``align``-aligned device address the
        device may read and write; returns the device address. PCI: carve
        from pinned hugepages (contiguous in physical memory within a page;
        an allocation must not cross into a non-adjacent one)."""
        ...

    def free(self, addr: int) -> None:
        """Give back an allocation made by :meth:`alloc`."""
        ...

    def translate(self, addr: int, length: int) -> memoryview:
        """A writable view of [addr, addr + length) (device addresses) in
        the driver's own mapping of that memory. PCI: the hugepage mapping,
        at addr's offset from its page's physical address (from
        /proc/self/pagemap, or the IOVA the driver mapped it at)."""
        ...

    def uva_of(self, addr: int) -> int:
        """The driver (process virtual) address of device address ``addr``."""
        ...

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """The device address of driver range [uva, uva + length), which must
        lie in one allocation's memory (else GuestMemoryError)."""
        ...

    # --- notifications ------------------------------------------------------
    def notify(self, index: int) -> None:
        """Notify the device that queue ``index`` has new available buffers.
        vhost-user: a write to the queue's kick eventfd. PCI: a 16-bit write
        of the queue index at notify_off_multiplier * queue_notify_off into
        the notify capability's BAR region (§4.1.4.4)."""
        ...

    def notify_if_needed(self, index: int) -> bool:
        """:meth:`notify` unless the device suppressed notifications for
        queue ``index`` (event index or VRING_USED_F_NO_NOTIFY, through the
        queue's ``kick_needed``); returns whether it notified."""
        ...

    def wait_used(self, index: int, timeout: float | None) -> tuple[Any, int]:
        """The next used buffer of queue ``index`` as (token, bytes written),
        sleeping up to ``timeout`` seconds (None: no limit) for the device to
        return one. The caller has enabled the queue's callbacks.
        Raises :class:`WaitTimeout` when time runs out and
        :class:`DeviceGone` within milliseconds of the device going away,
        never a hang. vhost-user: poll(2) on the call eventfd and the socket.
        PCI: poll the used ring (with a look at device_status now and then),
        or sleep on INTx through /dev/uioN (uio_pci_generic), then take the
        used ring."""
        ...

    # --- liveness and teardown ---------------------------------------------
    def check_alive(self) -> None:
        """Raise :class:`DeviceGone` if the device is gone; cheap enough for
        a busy-poll loop to call every few milliseconds (one poll(2); PCI:
        one read of device_status), and free once :attr:`dead` is set."""
        ...

    def close(self) -> None:
        """Stop the device using our memory, then release every fd, mapping
        and buffer; idempotent, never fails because the device is gone.
        PCI: write 0 to device_status and wait for it to read back 0 (§4.1.4.3.2),
        then free the rings and memory, unmap the BARs, close the uio fd."""
        ...


def missing_members(obj: object, proto: type = VirtioTransport) -> list[str]:
    """The members of ``proto`` that ``obj`` lacks (empty: it implements the
    interface as far as a runtime check can tell)."""
    names = list(inspect.get_annotations(proto))
    names += [n for n, v in vars(proto).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    return sorted({n for n in names if not hasattr(obj, n)})
