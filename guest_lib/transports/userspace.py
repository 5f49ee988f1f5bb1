"""What every userspace virtio driver of guest_lib shares, whatever the bus.

The virtio-pci (:mod:`~guest_lib.transports.virtio_pci`) and virtio-mmio
(:mod:`~guest_lib.transports.virtio_mmio`) drivers differ only in how they
reach the device's registers (virtio spec v1.2 §4.1 and §4.2); the rest of a
userspace driver is the same and lives here, in :class:`UserspaceDriver`:

* the memory: pinned huge pages (:mod:`~guest_lib.transports.hugemem`), the
  device address of a byte being its physical address (no IOMMU);
* feature negotiation (§3.1.1 steps 3..6): the transport features this driver
  acks (``TRANSPORT_FEATURES``, never a bit below 24: a carrier owns those),
  FEATURES_OK read back;
* the split rings (:class:`virtio.split.DriverQueue`) in that memory;
* the device feature bits by the ACK_FEATURES control command, offered as the
  config's ``device_features`` says (docs/virtio-rdma.md "Carriers");
* waits: poll the used ring, spin ``SPIN`` then sleep (on the bus's interrupt
  if it has one, :meth:`UserspaceDriver._sleep`), looking at the device status
  at least every ``LIVENESS_INTERVAL``;
* liveness from the status byte (0xff: gone; DEVICE_NEEDS_RESET; reset);
* close: reset and wait for status 0, then free the pages (kept, and counted,
  if the device may still write them).

A bus driver supplies the register accessors (``_status``, ``_set_status``,
``_read_features``, ``_write_features``, ``_setup_queue``, ``notify``,
``get_config``) and its own release of mappings and fds (``_release``).
"""
from __future__ import annotations

import collections
import errno
from collections.abc import Callable
from time import monotonic, perf_counter, sleep
from typing import Any

from guest_lib.transport import DeviceGone, TransportError, WaitTimeout
from guest_lib.transports.hugemem import HugeMemory
from virtio.constants import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtio.split import DriverQueue, split_ring_layout
from virtio_rdma import wire
from virtio_rdma.constants import ABI_VERSION, CONFIG_CARRIER_SIZE, CONFIG_MAGIC, CONTROLQ, Cmd, Status

# device status bits (§2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
#: transport features this driver acks (never a bit below 24: a carrier owns those)
TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX)
                      | (1 << VIRTIO_F_RING_INDIRECT_DESC))
#: seconds between looks at the device status while waiting
LIVENESS_INTERVAL = 0.02
#: seconds a wait spins on the used ring before it sleeps
SPIN = 50e-6
HUGE_PAGE = 2 << 20


def is_rdma_config(config_head: bytes) -> bool:
    """Whether a device configuration begins with virtio-rdma's magic and ABI
    version (how a driver recognises the device, whatever its virtio ID)."""
    return (len(config_head) >= 6 and int.from_bytes(config_head[:4], "little") == CONFIG_MAGIC
            and int.from_bytes(config_head[4:6], "little") == ABI_VERSION)


class UserspaceDriver:
    """The bus-independent half of a userspace virtio-rdma driver. A subclass
    finds and maps its device, sets ``name``, then calls :meth:`_open`."""

    name: str
    queues: list[DriverQueue]
    #: the memory's (HugeMemory), bound at open
    alloc: Callable[[int, int], int]
    free: Callable[[int], None]
    uva_of: Callable[[int], int]
    translate: Callable[[int, int], memoryview]
    uva_to_gpa: Callable[[int, int], int]
    #: the error type of the bus (a TransportError with errno)
    error: type[TransportError] = TransportError

    def __init__(self, timeout: float | None):
        self.counters: collections.Counter = collections.Counter()
        self._dead: str | None = None
        self._closed = False
        self.queues = []
        self.mem: HugeMemory | None = None
        self.features = 0
        self.timeout = timeout

    # --- what a bus supplies -----------------------------------------------
    def _status(self) -> int:
        raise NotImplementedError

    def _set_status(self, v: int) -> None:
        raise NotImplementedError

    def _read_features(self) -> int:
        raise NotImplementedError

    def _write_features(self, acked: int) -> None:
        raise NotImplementedError

    def _num_queues(self) -> int:
        raise NotImplementedError

    def _queue_max(self, index: int) -> int:
        raise NotImplementedError

    def _setup_queue(self, q: DriverQueue) -> None:
        """Give the device queue ``q`` (its size and ring addresses) and enable it."""
        raise NotImplementedError

    def _before_driver_ok(self) -> None:
        """Anything the bus does after the queues and before DRIVER_OK."""

    def _sleep(self, q: DriverQueue, left: float) -> Any:
        """Sleep up to ``left`` seconds for a used buffer of ``q`` (poll-only: a short nap)."""
        sleep(min(max(0.0, left), 0.0005))
        self.counters["polls"] += 1
        return None

    def _release(self) -> None:
        """Unmap the registers and close the bus's fds."""

    def notify(self, index: int) -> None:
        raise NotImplementedError

    def get_config(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    # --- initialisation (§3.1.1) -------------------------------------------
    def _open(self, mem_size: int, num_queues: int, queue_size: int, device_features: int) -> None:
        self.mem = HugeMemory(mem_size)
        self.counters["hugepages"] = self.mem.size // HUGE_PAGE
        mem = self.mem
        self.alloc, self.free, self.uva_of = mem.alloc, mem.free, mem.uva_of
        # the seam's optional members: MR buffers as page lists across runs
        self.alloc_mr, self.free_mr, self.view_of_uva = mem.alloc_mr, mem.free_mr, mem.view_of_uva
        self.translate, self.uva_to_gpa = mem.mem.translate, mem.mem.uva_to_gpa
        if not self._reset():
            raise self.error(f"{self.name}: the device status did not read 0 after reset")
        self._set_status(ACKNOWLEDGE)
        self._set_status(ACKNOWLEDGE | DRIVER)
        offered = self._read_features()
        if not offered & (1 << VIRTIO_F_VERSION_1):
            raise self.error(f"{self.name}: the device does not offer VIRTIO_F_VERSION_1 ({offered:#x})")
        acked = offered & TRANSPORT_FEATURES
        self._write_features(acked)
        self._set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not self._status() & FEATURES_OK:
            raise self.error(f"{self.name}: the device refused features {acked:#x} (FEATURES_OK not kept)")
        have = self._num_queues()
        if have < num_queues:
            raise self.error(f"{self.name}: the device has {have} queues, {num_queues} needed")
        ev = bool(acked & (1 << VIRTIO_F_RING_EVENT_IDX))
        ind = bool(acked & (1 << VIRTIO_F_RING_INDIRECT_DESC))
        for i in range(num_queues):
            most = self._queue_max(i)
            if most == 0:
                raise self.error(f"{self.name}: queue {i} is not available (size 0)")
            size = min(queue_size, most)
            size = 1 << (size.bit_length() - 1)  # split rings: a power of 2
            ring_bytes = split_ring_layout(size, 0)[3]
            base = self.alloc(ring_bytes, 4096)
            self.translate(base, ring_bytes)[:] = bytes(ring_bytes)
            q = DriverQueue(mem.mem, i, size, base, event_idx=ev, indirect=ind)
            self.queues.append(q)
            self._setup_queue(q)
        self._before_driver_ok()
        self._set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        cfg = wire.decode_config(self.get_config(0, CONFIG_CARRIER_SIZE))
        self.device_config = cfg
        self.features = acked | self._ack_device_features(device_features & cfg["device_features"])

    def _reset(self, timeout: float = 2.0) -> bool:
        self._set_status(0)
        end = monotonic() + timeout
        while self._status() != 0:
            if monotonic() > end:
                return False
            sleep(0.001)
        return True

    def _ack_device_features(self, wanted: int) -> int:
        """ACK_FEATURES on the controlq (before guest_lib takes the queue):
        the device bits the device accepted."""
        req = wire.encode_request(Cmd.ACK_FEATURES, features=wanted)
        rsz = wire.response_size(Cmd.ACK_FEATURES)
        a = self.alloc(len(req), 64)
        b = self.alloc(rsz, 64)
        try:
            self.translate(a, len(req))[:] = req
            self.queues[CONTROLQ].add([(a, len(req))], [(b, rsz)], "ack")
            self.notify(CONTROLQ)
            self.queues[CONTROLQ].enable_cb()
            _, n = self.wait_used(CONTROLQ, self.timeout)
            status, body = wire.decode_response(Cmd.ACK_FEATURES, bytes(self.translate(b, n)))
        finally:
            self.free(a)
            self.free(b)
        if status != Status.OK or body is None:
            raise TransportError(f"{self.name}: ACK_FEATURES failed ({status.name})", int(status))
        return int(body["features"])

    # --- the interface ---------------------------------------------------
    @property
    def dead(self) -> str | None:
        return self._dead

    def __repr__(self):
        return f"{type(self).__name__}({getattr(self, 'name', '?')!r}{', dead' if self._dead else ''})"

    def notify_if_needed(self, index: int) -> bool:
        if self.queues[index].kick_needed():
            self.notify(index)
            return True
        return False

    def check_alive(self) -> None:
        if self._dead is not None:
            raise DeviceGone(self._dead)
        st = self._status()
        if st == 0xFF:
            self._dead = f"{self.name}: the device status reads 0xff (the device is gone)"
        elif st & NEEDS_RESET:
            self._dead = f"{self.name}: the device needs a reset (status {st:#x})"
        elif not st & DRIVER_OK:
            self._dead = f"{self.name}: the device was reset (status {st:#x})"
        if self._dead is not None:
            raise DeviceGone(self._dead)

    def wait_used(self, index: int, timeout: float | None) -> tuple[Any, int]:
        q = self.queues[index]
        item = q.get_used()
        if item is not None:
            return item
        end = perf_counter() + SPIN
        while perf_counter() < end:
            item = q.get_used()
            if item is not None:
                return item
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            self.check_alive()
            left = LIVENESS_INTERVAL if deadline is None else min(LIVENESS_INTERVAL, deadline - monotonic())
            item = self._sleep(q, left)
            if item is not None:
                return item
            item = q.get_used()
            if item is not None:
                return item
            if deadline is not None and monotonic() >= deadline:
                self.check_alive()
                raise WaitTimeout(f"{self.name}: queue {index}: no used buffer within {timeout} s")

    def close(self) -> None:
        """Reset the device (it stops using our memory), free the memory,
        then the bus's mappings and fds. Idempotent; never fails because the
        device is gone."""
        if self._closed:
            return
        self._closed = True
        stopped = True
        if self._mapped() and self._dead is None:
            try:
                stopped = self._reset()
            except (OSError, TransportError):
                stopped = False
        if self._dead is None:
            self._dead = f"{getattr(self, 'name', '?')}: the device is closed"
        self.queues = []
        if self.mem is not None:
            pages = self.mem.size // HUGE_PAGE
            if stopped:
                self.mem.close()
                if self.mem.kept_mapped:  # a view of it is still held somewhere: left mapped
                    self.counters["hugepages_kept"] = pages
                else:
                    self.counters["hugepages_freed"] = pages
            else:  # a device that may still write: leak the pages rather than hand them back
                self.counters["hugepages_kept"] = pages
        self._release()

    def _mapped(self) -> bool:
        """Whether the registers are mapped (a reset can be written)."""
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def config_error(name: str, offset: int, size: int, length: int) -> TransportError:
    return TransportError(f"{name}: config read at {offset} size {size} is outside the "
                          f"{length}-byte device configuration", errno.EINVAL)
