"""Virtio constants: feature bits, device status, split-ring flags and layout.

Follows the virtio spec v1.2: §2.1 (device status field), §6 (reserved
feature bits), §2.7 (split virtqueues: descriptor table §2.7.5, available
ring §2.7.6, used ring §2.7.8, alignment §2.7.2, event suppression
§2.7.7/§2.7.10).

Feature bits are given both as bit numbers (:class:`FeatureBit`) and as
masks (:class:`Feature`) because vhost-user and the virtio-pci transport
exchange 64-bit masks while the spec names bits by number.
"""
from __future__ import annotations

import enum

from .errors import VirtqueueError

__all__ = [
    "FeatureBit", "Feature", "DeviceStatus", "DescFlags", "AvailFlags", "UsedFlags",
    "DESC_SIZE", "USED_ELEM_SIZE", "DESC_ALIGN", "AVAIL_ALIGN", "USED_ALIGN",
    "MAX_QUEUE_SIZE", "MAX_INDIRECT_ENTRIES", "VIRTIO_ID_RDMA",
    "desc_table_size", "avail_ring_size", "used_ring_size", "split_ring_layout",
    "check_queue_size", "vring_need_event",
]

#: virtio device ID of virtio-rdma (used by this project; spec §5 reserves 42).
VIRTIO_ID_RDMA = 42


class FeatureBit(enum.IntEnum):
    """Reserved (device-independent) feature bit numbers, spec §6."""
    VIRTIO_F_NOTIFY_ON_EMPTY = 24
    VIRTIO_F_ANY_LAYOUT = 27
    VIRTIO_F_RING_INDIRECT_DESC = 28
    VIRTIO_F_RING_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_ACCESS_PLATFORM = 33
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_ORDER_PLATFORM = 36
    VIRTIO_F_SR_IOV = 37
    VIRTIO_F_NOTIFICATION_DATA = 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 39
    VIRTIO_F_RING_RESET = 40


class Feature(enum.IntFlag):
    """Masks of the reserved feature bits (``1 << FeatureBit``)."""
    NOTIFY_ON_EMPTY = 1 << FeatureBit.VIRTIO_F_NOTIFY_ON_EMPTY
    ANY_LAYOUT = 1 << FeatureBit.VIRTIO_F_ANY_LAYOUT
    RING_INDIRECT_DESC = 1 << FeatureBit.VIRTIO_F_RING_INDIRECT_DESC
    RING_EVENT_IDX = 1 << FeatureBit.VIRTIO_F_RING_EVENT_IDX
    VERSION_1 = 1 << FeatureBit.VIRTIO_F_VERSION_1
    ACCESS_PLATFORM = 1 << FeatureBit.VIRTIO_F_ACCESS_PLATFORM
    RING_PACKED = 1 << FeatureBit.VIRTIO_F_RING_PACKED
    IN_ORDER = 1 << FeatureBit.VIRTIO_F_IN_ORDER
    ORDER_PLATFORM = 1 << FeatureBit.VIRTIO_F_ORDER_PLATFORM
    SR_IOV = 1 << FeatureBit.VIRTIO_F_SR_IOV
    NOTIFICATION_DATA = 1 << FeatureBit.VIRTIO_F_NOTIFICATION_DATA
    NOTIF_CONFIG_DATA = 1 << FeatureBit.VIRTIO_F_NOTIF_CONFIG_DATA
    RING_RESET = 1 << FeatureBit.VIRTIO_F_RING_RESET


# Flat aliases with the spec's names (bit numbers), for code ported from C.
VIRTIO_F_NOTIFY_ON_EMPTY = FeatureBit.VIRTIO_F_NOTIFY_ON_EMPTY
VIRTIO_F_ANY_LAYOUT = FeatureBit.VIRTIO_F_ANY_LAYOUT
VIRTIO_F_RING_INDIRECT_DESC = FeatureBit.VIRTIO_F_RING_INDIRECT_DESC
VIRTIO_F_RING_EVENT_IDX = FeatureBit.VIRTIO_F_RING_EVENT_IDX
VIRTIO_F_VERSION_1 = FeatureBit.VIRTIO_F_VERSION_1
VIRTIO_F_ACCESS_PLATFORM = FeatureBit.VIRTIO_F_ACCESS_PLATFORM
VIRTIO_F_RING_PACKED = FeatureBit.VIRTIO_F_RING_PACKED
VIRTIO_F_IN_ORDER = FeatureBit.VIRTIO_F_IN_ORDER
__all__ += [n for n in list(globals()) if n.startswith("VIRTIO_F_")]


class DeviceStatus(enum.IntFlag):
    """Device status field bits, spec §2.1."""
    RESET = 0
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DescFlags(enum.IntFlag):
    """``struct virtq_desc.flags``, spec §2.7.5."""
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlags(enum.IntFlag):
    """``struct virtq_avail.flags``, spec §2.7.6 (driver -> device)."""
    NO_INTERRUPT = 1


class UsedFlags(enum.IntFlag):
    """``struct virtq_used.flags``, spec §2.7.8 (device -> driver)."""
    NO_NOTIFY = 1


DESC_SIZE = 16            #: sizeof(struct virtq_desc)
USED_ELEM_SIZE = 8        #: sizeof(struct virtq_used_elem)
DESC_ALIGN = 16           #: §2.7.2 alignment of the descriptor table
AVAIL_ALIGN = 2           #: §2.7.2 alignment of the available ring
USED_ALIGN = 4            #: §2.7.2 alignment of the used ring
MAX_QUEUE_SIZE = 32768    #: §2.7: queue size is a power of 2, max 32768
MAX_INDIRECT_ENTRIES = 32768  #: an indirect table can't exceed this many descriptors


def check_queue_size(size: int, *, queue: int | None = None) -> int:
    """Return *size* if it is a valid split queue size (power of 2 in 1..32768)."""
    if (not isinstance(size, int) or isinstance(size, bool) or size < 1
            or size > MAX_QUEUE_SIZE or size & (size - 1)):
        raise VirtqueueError(f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}",
                             queue=queue)
    return size


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of *size* entries."""
    return DESC_SIZE * check_queue_size(size)


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring: flags, idx, ring[size], used_event."""
    return 6 + 2 * check_queue_size(size)


def used_ring_size(size: int) -> int:
    """Bytes of the used ring: flags, idx, ring[size] elems, avail_event."""
    return 6 + USED_ELEM_SIZE * check_queue_size(size)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def split_ring_layout(size: int, base_gpa: int) -> tuple[int, int, int, int]:
    """Compact split-ring layout starting at *base_gpa* (which must be 16-aligned).

    Returns ``(desc_gpa, avail_gpa, used_gpa, total_bytes)``: the descriptor
    table at the base, the available ring right after it (2-aligned), then the
    used ring at the next 4-byte boundary (virtio 1.x allows separately placed
    areas, §2.7.2; legacy's page alignment of the used ring is not used).
    """
    check_queue_size(size)
    if not isinstance(base_gpa, int) or isinstance(base_gpa, bool) or base_gpa < 0:
        raise VirtqueueError(f"ring base address {base_gpa!r} is not a guest address")
    if base_gpa % DESC_ALIGN:
        raise VirtqueueError(f"ring base address {base_gpa:#x} is not a {DESC_ALIGN}-aligned address")
    desc = base_gpa
    avail = _align(desc + desc_table_size(size), AVAIL_ALIGN)
    used = _align(avail + avail_ring_size(size), USED_ALIGN)
    end = used + used_ring_size(size)
    if end > 1 << 64:
        raise VirtqueueError(f"ring at {base_gpa:#x} of size {size} overflows the 64-bit address space")
    return desc, avail, used, end - base_gpa


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Spec §2.7.10: notify iff *event_idx* lies in the half-open window
    ``[old_idx, new_idx)`` of 16-bit ring indices."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
