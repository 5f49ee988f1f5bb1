"""virtio: guest memory and split virtqueues (virtio spec v1.2 §2.7), both roles.

* :mod:`virtio.memory` - guest memory regions / memory table (vhost-user style).
* :mod:`virtio.split`  - split virtqueues: :class:`DeviceQueue` (backend side)
  and :class:`DriverQueue` (frontend / test driver side).
* :mod:`virtio.constants` - feature bits, status bits, ring flags and layout.
* :mod:`virtio.errors` - :class:`VirtioError` and subclasses.
"""
from .errors import GuestMemoryError, VirtioError, VirtqueueError
from .memory import GuestMemory, MemoryRegion

__all__ = ["VirtioError", "GuestMemoryError", "VirtqueueError", "GuestMemory", "MemoryRegion"]

try:  # the queues need the compiled extension; memory alone must stay importable while building
    from .split import DescriptorChain, DeviceQueue, DriverQueue  # noqa: F401
    __all__ += ["DeviceQueue", "DriverQueue", "DescriptorChain"]
except ImportError:  # pragma: no cover
    pass
