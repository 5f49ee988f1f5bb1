"""What a device served over vhost-user supplies, and safe defaults.

A device declares its virtio ID, queue count and maximum queue size, its
virtio feature bits and config space, and handles its queues. Everything
else (negotiation, memory, ring setup, notifications) is the back-end's
job (:mod:`vhost_user.backend`). One device instance serves one connection,
so one front-end's state never reaches another's.
"""
from __future__ import annotations

from vhost_user.errors import DeviceError
from vhost_user.messages import ProtocolFeature as PF
from virtio.constants import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)

#: Transport features every device here supports (bit numbers -> mask).
TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_INDIRECT_DESC)
                      | (1 << VIRTIO_F_RING_EVENT_IDX))

#: Protocol features the back-end implements for every device.
DEFAULT_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
)


class VhostUserDevice:
    """Base class: override the attributes and :meth:`process_queue`."""

    #: virtio device ID (virtio spec 5: 2 = block, 42 = RDMA).
    virtio_id: int = 0
    #: number of virtqueues the device has (reported by GET_QUEUE_NUM).
    num_queues: int = 1
    #: the largest queue size a front-end may set (SET_VRING_NUM).
    max_queue_size: int = 1024
    #: device-specific feature bits; TRANSPORT_FEATURES are added by the back-end.
    device_features: int = 0
    protocol_features: PF = DEFAULT_PROTOCOL_FEATURES

    def attach(self, conn) -> None:
        """Called once by the connection that serves this device. ``conn``
        gives the device its guest memory (``conn.mem``), its rings
        (``conn.vrings``) and event-loop services (``conn.watcher``:
        ``call_soon(fn)``, ``call_later(delay, fn) -> handle``)."""
        self.conn = conn

    def features(self) -> int:
        return self.device_features | TRANSPORT_FEATURES

    def config(self) -> bytes:
        """The whole device config space (read by GET_CONFIG)."""
        return b""

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self.config()
        if offset + size > len(cfg):
            raise DeviceError(
                f"config read at offset {offset} size {size} is outside the {len(cfg)}-byte config space"
            )
        return cfg[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        raise DeviceError(f"config space is read-only (write of {len(data)} bytes at offset {offset})")

    def set_features(self, features: int) -> None:
        """Called with the features the driver acked."""

    def set_status(self, status: int) -> None:
        """Called on SET_STATUS with the driver's device status byte."""

    def queue_started(self, vring) -> None:
        """A ring started (it has memory, addresses and a kick source)."""

    def queue_stopped(self, vring) -> None:
        """A ring stopped (GET_VRING_BASE, reset or disconnect)."""

    def process_queue(self, vring, mem) -> None:
        """Handle available buffers of ``vring``: pop chains, push used entries.

        ``mem`` is the connection's GuestMemory. Raise a VirtioError (or a
        VhostUserError) if the guest broke the rules: the connection is then
        closed; nothing a guest sends may crash the daemon.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER: back to the initial state."""

    def close(self) -> None:
        """The connection ended; release everything the device holds."""
