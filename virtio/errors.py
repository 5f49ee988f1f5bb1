"""Error types of the ``virtio`` package.

One base, :class:`VirtioError`, so callers (the vhost-user backend, device
models) can catch everything a misbehaving guest can cause with one clause.
Every message names the offending value (address, length, queue index,
descriptor index, ring index) so a log line is enough to find the bug.
"""

__all__ = ["VirtioError", "GuestMemoryError", "VirtqueueError"]


class VirtioError(Exception):
    """Base of every error raised by the virtio package."""


class GuestMemoryError(VirtioError):
    """A guest-physical / user-virtual address range is invalid, overlaps,
    lies outside every region, or a region could not be mapped."""


class VirtqueueError(VirtioError):
    """The guest (driver) broke the virtqueue protocol, or a queue was
    configured with invalid parameters. The device should mark the device
    NEEDS_RESET (virtio v1.2 §2.1.2) and stop processing this queue; other
    queues and other guests are unaffected."""

    def __init__(self, msg: str, *, queue: int | None = None):
        if queue is not None:
            msg = f"queue {queue}: {msg}"
        super().__init__(msg)
        self.queue = queue


class QueueFullError(VirtqueueError):
    """The driver has not enough free descriptors for the buffers given
    (not a protocol error: retry after reaping used buffers)."""


__all__ += ["QueueFullError"]
