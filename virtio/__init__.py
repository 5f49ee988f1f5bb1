"""virtio: guest memory and split virtqueues (virtio spec v1.2 §2.7), both roles.

* :mod:`virtio.memory` - guest memory regions / memory table (vhost-user style).
* :mod:`virtio.split`  - split virtqueues: :class:`DeviceQueue` (backend side)
  and :class:`DriverQueue` (frontend / test driver side).
* :mod:`virtio.constants` - feature bits, status bits, ring flags and layout.
* :mod:`virtio.errors` - :class:`VirtioError` and subclasses.
"""
from .errors import GuestMemoryError, QueueFullError, VirtioError, VirtqueueError
from .memory import GuestMemory, MemoryRegion
from .split import DescriptorChain, DeviceQueue, DriverQueue

__all__ = ["VirtioError", "GuestMemoryError", "VirtqueueError", "QueueFullError",
           "GuestMemory", "MemoryRegion", "DeviceQueue", "DriverQueue", "DescriptorChain"]
