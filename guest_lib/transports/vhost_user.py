"""The vhost-user transport: guest_lib's first :class:`~guest_lib.transport.VirtioTransport`.

A process guest is its own vhost-user front-end (the virtio-user pattern):
:class:`vhost_user.frontend.VirtioUserDevice` connects to the back-end
daemon's socket, shares a memfd of guest memory, negotiates features, lays
out the split rings and creates the kick and call eventfds. This module only
adapts it to the interface guest_lib drives: it adds nothing to the
front-end and maps its errors (``vhost_user.errors``) to the transport's
(``BackendGone`` -> :class:`~guest_lib.transport.DeviceGone`, a timed-out
wait -> :class:`~guest_lib.transport.WaitTimeout`, any other ->
:class:`~guest_lib.transport.TransportError` with its errno).

The members guest_lib calls per operation (memory translation,
notifications, the queues) are the front-end's own bound methods and
objects, bound once here, so the seam costs the data path no call.

This is the only module of guest_lib that imports ``vhost_user``.
"""
from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guest_lib.transport import (
    DRIVER_FEATURES,
    NUM_QUEUES,
    DeviceGone,
    TransportError,
    VirtioTransport,
    WaitTimeout,
)
from vhost_user.errors import VhostUserError
from vhost_user.frontend import BackendGone, VirtioUserDevice
from virtio.split import DriverQueue


def _mapped(e: VhostUserError) -> TransportError:
    if isinstance(e, BackendGone):
        return DeviceGone(str(e))
    return TransportError(str(e), e.errno)


class VhostUserTransport:
    """The virtio device behind the vhost-user socket ``path``, opened for
    guest_lib: ``num_queues`` queues of ``queue_size`` entries, offering
    ``device_features``, over ``mem_size`` bytes of shared memory (hugetlb
    when ``hugetlb`` allows and the machine has free huge pages).

    Owns :attr:`device` (and through it the socket, the memfd and the
    eventfds) until :meth:`close`.
    """

    queues: list[DriverQueue]
    alloc: Callable[[int, int], int]
    free: Callable[[int], None]
    translate: Callable[[int, int], memoryview]
    uva_of: Callable[[int], int]
    uva_to_gpa: Callable[[int, int], int]
    notify: Callable[[int], None]
    notify_if_needed: Callable[[int], bool]

    def __init__(self, path: str, *, mem_size: int = 64 << 20, queue_size: int = 256,
                 num_queues: int = NUM_QUEUES, device_features: int = DRIVER_FEATURES,
                 hugetlb="auto", timeout: float | None = 10.0):
        self.name = path
        try:
            dev = VirtioUserDevice(path, mem_size=mem_size, num_queues=num_queues, queue_size=queue_size,
                                   device_features=device_features, hugetlb=hugetlb, timeout=timeout)
        except (VhostUserError, OSError) as e:
            raise TransportError(str(e), getattr(e, "errno", None) or errno.ENODEV) from e
        #: the vhost-user front-end itself (vhost-user specifics: the socket, the fds)
        self.device = dev
        self.features: int = dev.features
        self.queues = dev.queues
        # bound once: these go straight to the front-end's allocator, memory and eventfds
        self.alloc, self.free = dev.alloc, dev.free
        self.translate, self.uva_to_gpa = dev.mem.translate, dev.mem.uva_to_gpa
        self.uva_of = dev.uva_of
        self.notify, self.notify_if_needed = dev.kick, dev.kick_if_needed

    @property
    def dead(self) -> str | None:
        return self.device.dead

    def get_config(self, offset: int, size: int) -> bytes:
        try:
            return self.device.get_config(offset, size)
        except VhostUserError as e:
            raise _mapped(e) from e

    def wait_used(self, index: int, timeout: float | None) -> tuple[Any, int]:
        try:
            return self.device.wait_used(index, timeout)
        except BackendGone as e:
            raise DeviceGone(str(e)) from e
        except VhostUserError as e:
            if e.errno == errno.ETIMEDOUT:
                raise WaitTimeout(str(e)) from e
            raise _mapped(e) from e

    def check_alive(self) -> None:
        try:
            self.device.check_alive()
        except VhostUserError as e:
            raise _mapped(e) from e

    def close(self) -> None:
        self.device.close()
        self.queues = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"VhostUserTransport({self.name!r}{', dead' if self.device.dead else ''})"


if TYPE_CHECKING:  # the type checker proves the adapter implements the interface
    def _implements(t: VhostUserTransport) -> VirtioTransport:
        return t
