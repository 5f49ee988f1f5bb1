"""Split virtqueues (virtio spec v1.2 §2.7), device and driver side.

A split virtqueue is three areas in guest memory: the descriptor table
(§2.7.5: 16-byte ``{addr u64, len u32, flags u16, next u16}``), the available
ring written by the driver (§2.7.6: ``flags, idx, ring[N], used_event``) and
the used ring written by the device (§2.7.8: ``flags, idx, ring[N]{id, len},
avail_event``), all little-endian with free-running 16-bit indices.

* :class:`DeviceQueue` is what a device / vhost-user backend uses: ``pop``
  validated :class:`DescriptorChain` objects (zero-copy views into guest
  memory), ``push`` used entries, decide on notifications (§2.7.7, §2.7.10
  event suppression with VIRTIO_F_EVENT_IDX). It never stores guest memory:
  the :class:`~virtio.memory.GuestMemory` is passed to every call.
* :class:`DriverQueue` is the driver role (our process-guest frontend, and
  the test driver for devices): lays out the rings, ``add`` buffers,
  ``get_used``, ``kick_needed``.

Everything per descriptor runs in Cython (``virtio/_split.pyx``) on raw
pointers from the C region table, cached per memory table generation.
A malformed ring raises :class:`~virtio.errors.VirtqueueError` naming the
queue, descriptor and value; it never crashes, hangs or touches memory
outside the guest's regions. The device should then set
DEVICE_NEEDS_RESET and stop the queue.
"""
from ._split import DescriptorChain, DeviceQueue, DriverQueue
from .constants import split_ring_layout, vring_need_event
from .errors import QueueFullError, VirtqueueError

__all__ = ["DeviceQueue", "DriverQueue", "DescriptorChain", "VirtqueueError", "QueueFullError",
           "split_ring_layout", "vring_need_event", "device_queue_for"]


def device_queue_for(driver: DriverQueue, **kwargs) -> DeviceQueue:
    """A DeviceQueue over the same rings as *driver* (tests, in-process devices)."""
    kwargs.setdefault("event_idx", driver.event_idx)
    kwargs.setdefault("indirect", driver.indirect)
    return DeviceQueue(driver.index, driver.size, driver.desc_gpa, driver.avail_gpa, driver.used_gpa,
                       **kwargs)
