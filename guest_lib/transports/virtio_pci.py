"""The virtio-pci transport: guest_lib's userspace driver inside a Linux guest.

The second :class:`~guest_lib.transport.VirtioTransport` (docs
guest-transport.md): a process in a QEMU guest drives the virtio-rdma
device's PCI function itself, no kernel virtio driver involved (virtio spec
v1.2 §4.1, modern virtio-pci):

* **Finding the device** (:func:`find_device`): every function of vendor
  0x1af4 with a virtio device ID that no kernel virtio driver uses is bound
  to ``uio_pci_generic`` (:mod:`guest_lib.transports.pci`) and its device
  configuration read: the device is the one whose config begins with
  ``CONFIG_MAGIC`` and ``ABI_VERSION`` (docs/virtio-rdma.md "Carriers"),
  whatever its PCI device ID (0x1042 behind QEMU 7.2's vhost-user-blk
  carrier, 0x1040 + N behind a borrowed virtio ID N). Functions that are
  not it are given back to the kernel.
* **Initialisation** (§3.1.1 through the common configuration): reset,
  ACKNOWLEDGE, DRIVER, transport features (VERSION_1, EVENT_IDX,
  INDIRECT_DESC: bits 0..23 are never acked here, a carrier would read them
  as its own), FEATURES_OK read back, bus mastering on, the three queues
  (rings in pinned huge pages, :mod:`guest_lib.transports.hugemem`),
  DRIVER_OK; then the device feature bits by the ACK_FEATURES control
  command, offered as the config's ``device_features`` says.
* **Notifications**: a 16-bit store of the queue index at
  ``cap.offset + queue_notify_off * notify_off_multiplier`` of the notify BAR.
* **Used buffers**: polled from the used ring; a wait longer than a short
  spin sleeps on INTx through ``/dev/uioN`` (read ISR, which deasserts the
  line; look at the ring; unmask INTx in the command register; poll(2) the
  uio fd), looking at device_status at least every ``LIVENESS_INTERVAL``.
* **Liveness**: device_status reads 0xff (the function is gone) or has
  DEVICE_NEEDS_RESET.
* **close**: device_status = 0 and wait for it to read 0 (the device stops
  using our memory), then free the memory, unmap the BARs, close the uio fd;
  each release is counted in :attr:`VirtioPciTransport.counters`.

Memory and MRs: an allocation is contiguous in device (physical) memory,
inside one run of physically adjacent huge pages; guest_lib registers an MR
as one chunk, so an MR is at most the longest run (usually all the huge
pages reserved at boot); a larger one fails with MemoryError saying how long
the longest run is (no page lists).

Needs root in the guest (sysfs binds, pagemap PFNs, mlock), huge pages
(``hugepages=N``), and the modules ``uio`` and ``uio_pci_generic``.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
from collections.abc import Callable
from time import monotonic, perf_counter, sleep
from typing import TYPE_CHECKING, Any

from guest_lib.transport import (
    DRIVER_FEATURES,
    NUM_QUEUES,
    DeviceGone,
    TransportError,
    VirtioTransport,
    WaitTimeout,
)
from guest_lib.transports.hugemem import HugeMemory
from guest_lib.transports.pci import (
    CAP_COMMON,
    CAP_DEVICE,
    CAP_ISR,
    CAP_NOTIFY,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_VENDOR_VIRTIO,
    VIRTIO_DEVICE_IDS,
    Bar,
    PciError,
    PciFunction,
    VirtioCap,
    list_functions,
    virtio_caps,
)
from virtio.constants import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from virtio.split import DriverQueue, split_ring_layout
from virtio_rdma import wire
from virtio_rdma.constants import ABI_VERSION, CONFIG_CARRIER_SIZE, CONFIG_MAGIC, CONTROLQ, Cmd, Status

# common configuration (§4.1.4.3), offsets
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0, 4, 8, 12
MSIX_CONFIG, NUM_QUEUES_OFF, DEVICE_STATUS, CONFIG_GENERATION = 16, 18, 20, 21
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 22, 24, 26, 28, 30
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 32, 40, 48
NO_VECTOR = 0xFFFF
# device status bits (§2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
#: transport features this driver acks (never a bit below 24: a carrier owns those)
TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX)
                      | (1 << VIRTIO_F_RING_INDIRECT_DESC))
#: seconds between looks at device_status while waiting
LIVENESS_INTERVAL = 0.02
#: seconds a wait spins on the used ring before it sleeps on the interrupt
SPIN = 50e-6


def _is_rdma(config_head: bytes) -> bool:
    return (len(config_head) >= 6 and int.from_bytes(config_head[:4], "little") == CONFIG_MAGIC
            and int.from_bytes(config_head[4:6], "little") == ABI_VERSION)


class _Function:
    """A candidate function bound to uio_pci_generic with its virtio
    structures mapped; owns the BAR mappings."""

    def __init__(self, fn: PciFunction):
        self.fn = fn
        self.bars: dict[int, Bar] = {}
        self.uio_fd = -1
        try:
            fn.bind_uio()
            # one driver per function: an exclusive lock on its uio device
            self.uio_fd = os.open(fn.uio_device(), os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(self.uio_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PciError(f"{fn.address} is driven by another process", errno.EBUSY) from None
            fn.set_command(set_bits=PCI_COMMAND_MEMORY)
            self.caps: dict[int, VirtioCap] = virtio_caps(fn.config(256))
            for cap in self.caps.values():
                if cap.bar not in self.bars:
                    self.bars[cap.bar] = fn.map_bar(cap.bar)
                bar = self.bars[cap.bar]
                if cap.offset + cap.length > bar.size:
                    raise PciError(f"{fn.address}: capability type {cap.cfg_type} at {cap.offset:#x}+"
                                   f"{cap.length:#x} runs past BAR {cap.bar} ({bar.size:#x} bytes)")
        except BaseException:
            self.close()
            raise

    def struct(self, cfg_type: int) -> tuple[Bar, int, int]:
        cap = self.caps[cfg_type]
        return self.bars[cap.bar], cap.offset, cap.length

    def config_head(self, n: int) -> bytes:
        bar, off, length = self.struct(CAP_DEVICE)
        n = min(n, length) & ~3
        return b"".join(bar.r32(off + i).to_bytes(4, "little") for i in range(0, n, 4))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        if self.uio_fd >= 0:
            os.close(self.uio_fd)
            self.uio_fd = -1


def find_device(address: str = "auto", sysfs: str = "/sys") -> _Function:
    """The virtio-rdma function at ``address`` ("auto": the first found),
    bound to uio_pci_generic and mapped; PciError (ENODEV) if there is none."""
    candidates = list_functions(sysfs) if address == "auto" else [address]
    seen = []
    for addr in candidates:
        fn = PciFunction(addr, sysfs)
        vendor, device = fn.ids
        if vendor != PCI_VENDOR_VIRTIO or device not in VIRTIO_DEVICE_IDS:
            if address != "auto":
                raise PciError(f"{addr} is not a virtio function "
                               f"(vendor {vendor:#06x}, device {device:#06x})")
            continue
        if fn.driver not in (None, "uio_pci_generic", "virtio-pci") or fn.virtio_in_use():
            seen.append(f"{addr} (in use by {fn.driver})")
            continue
        was = fn.driver
        try:
            f = _Function(fn)
        except PciError as e:
            seen.append(f"{addr} ({e})")
            if e.errno == errno.EBUSY and address != "auto":
                raise
            continue
        if _is_rdma(f.config_head(8)):
            return f
        f.close()
        seen.append(f"{addr} (device {device:#06x}, not virtio-rdma)")
        if was != "uio_pci_generic":
            fn.release_uio()
    raise PciError(f"no virtio-rdma PCI function at {address}: "
                   + ("; ".join(seen) if seen else "no free virtio function"))


class VirtioPciTransport:
    """The virtio-rdma device at PCI ``address`` ("auto" or "0000:00:04.0"),
    opened: ``num_queues`` queues of up to ``queue_size`` entries, ``mem_size``
    bytes of pinned huge pages, device features ``device_features`` offered
    (by ACK_FEATURES). ``interrupts``: True (sleeping waits on INTx through
    uio), False (poll only). The function is locked (flock of its uio
    device) for as long as the transport is open: a second driver gets
    EBUSY."""

    queues: list[DriverQueue]
    alloc: Callable[[int, int], int]
    free: Callable[[int], None]
    translate: Callable[[int, int], memoryview]
    uva_of: Callable[[int], int]
    uva_to_gpa: Callable[[int, int], int]

    def __init__(self, address: str = "auto", *, mem_size: int = 32 << 20, queue_size: int = 256,
                 num_queues: int = NUM_QUEUES, device_features: int = DRIVER_FEATURES,
                 interrupts: bool = True, timeout: float | None = 10.0, sysfs: str = "/sys"):
        self.counters: collections.Counter = collections.Counter()
        self._dead: str | None = None
        self._closed = False
        self.queues = []
        self.mem: HugeMemory | None = None
        self.features = 0
        self.timeout = timeout
        try:
            self.dev = find_device(address, sysfs)
        except OSError as e:
            raise PciError(f"cannot open the PCI device {address}: {e}", e.errno or errno.ENODEV) from e
        self.name = self.dev.fn.address
        self.counters["bars_mapped"] = len(self.dev.bars)
        self.counters["fds_opened"] = 1  # the uio device (lock and interrupts)
        #: INTx through uio for sleeping waits (-1: poll only)
        self.uio_fd = self.dev.uio_fd if interrupts else -1
        try:
            self._common, self._coff, _ = self.dev.struct(CAP_COMMON)
            self._isr, self._isr_off, _ = self.dev.struct(CAP_ISR)
            self._notify_bar, self._notify_off, self._notify_len = self.dev.struct(CAP_NOTIFY)
            self._mult = self.dev.caps[CAP_NOTIFY].multiplier
            self.mem = HugeMemory(mem_size)
            self.counters["hugepages"] = self.mem.size // (2 << 20)
            mem = self.mem
            self.alloc, self.free, self.uva_of = mem.alloc, mem.free, mem.uva_of
            self.translate, self.uva_to_gpa = mem.mem.translate, mem.mem.uva_to_gpa
            self._init(num_queues, queue_size, device_features)
        except BaseException:
            self.close()
            raise

    # --- common configuration --------------------------------------------
    def _status(self) -> int:
        return self._common.r8(self._coff + DEVICE_STATUS)

    def _set_status(self, v: int) -> None:
        self._common.w8(self._coff + DEVICE_STATUS, v)

    def _reset(self, timeout: float = 2.0) -> bool:
        self._set_status(0)
        end = monotonic() + timeout
        while self._status() != 0:
            if monotonic() > end:
                return False
            sleep(0.001)
        return True

    def _init(self, num_queues: int, queue_size: int, device_features: int) -> None:
        c, o = self._common, self._coff
        if not self._reset():
            raise PciError(f"{self.name}: device_status did not read 0 after reset")
        self._set_status(ACKNOWLEDGE)
        self._set_status(ACKNOWLEDGE | DRIVER)
        offered = 0
        for sel in (0, 1):
            c.w32(o + DEVICE_FEATURE_SELECT, sel)
            offered |= c.r32(o + DEVICE_FEATURE) << (32 * sel)
        if not offered & (1 << VIRTIO_F_VERSION_1):
            raise PciError(f"{self.name}: the device does not offer VIRTIO_F_VERSION_1 ({offered:#x})")
        acked = offered & TRANSPORT_FEATURES
        for sel in (0, 1):
            c.w32(o + DRIVER_FEATURE_SELECT, sel)
            c.w32(o + DRIVER_FEATURE, (acked >> (32 * sel)) & 0xFFFF_FFFF)
        self._set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not self._status() & FEATURES_OK:
            raise PciError(f"{self.name}: the device refused features {acked:#x} (FEATURES_OK not kept)")
        self.dev.fn.set_command(set_bits=PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)
        have = c.r16(o + NUM_QUEUES_OFF)
        if have < num_queues:
            raise PciError(f"{self.name}: the device has {have} queues, {num_queues} needed")
        ev = bool(acked & (1 << VIRTIO_F_RING_EVENT_IDX))
        ind = bool(acked & (1 << VIRTIO_F_RING_INDIRECT_DESC))
        self._notify_at: list[int] = []
        for i in range(num_queues):
            c.w16(o + QUEUE_SELECT, i)
            most = c.r16(o + QUEUE_SIZE)
            if most == 0:
                raise PciError(f"{self.name}: queue {i} is not available (size 0)")
            size = min(queue_size, most)
            size = 1 << (size.bit_length() - 1)  # split rings: a power of 2
            ring_bytes = split_ring_layout(size, 0)[3]
            base = self.alloc(ring_bytes, 4096)
            self.translate(base, ring_bytes)[:] = bytes(ring_bytes)
            q = DriverQueue(self.mem.mem, i, size, base, event_idx=ev, indirect=ind)  # type: ignore[union-attr]
            self.queues.append(q)
            c.w16(o + QUEUE_SIZE, size)
            c.w16(o + QUEUE_MSIX_VECTOR, NO_VECTOR)
            c.w64(o + QUEUE_DESC, q.desc_gpa)
            c.w64(o + QUEUE_DRIVER, q.avail_gpa)
            c.w64(o + QUEUE_DEVICE, q.used_gpa)
            at = self._notify_off + c.r16(o + QUEUE_NOTIFY_OFF) * self._mult
            if at + 2 > self._notify_off + self._notify_len:
                raise PciError(f"{self.name}: queue {i} notify offset {at:#x} is outside "
                               "the notify capability")
            self._notify_at.append(at)
            c.w16(o + QUEUE_ENABLE, 1)
        c.w16(o + MSIX_CONFIG, NO_VECTOR)
        self._set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        cfg = wire.decode_config(self.get_config(0, CONFIG_CARRIER_SIZE))
        self.device_config = cfg
        self.features = acked | self._ack_device_features(device_features & cfg["device_features"])

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

    def get_config(self, offset: int, size: int) -> bytes:
        if self._dead is not None:
            raise DeviceGone(self._dead)
        bar, off, length = self.dev.struct(CAP_DEVICE)
        if offset < 0 or size < 0 or offset + size > length:
            raise TransportError(f"config read at {offset} size {size} is outside the "
                                 f"{length}-byte device configuration", errno.EINVAL)
        gen = self._common.r8(self._coff + CONFIG_GENERATION)
        for _ in range(100):
            lo, hi = offset & ~3, (offset + size + 3) & ~3
            raw = b"".join(bar.r32(off + i).to_bytes(4, "little") if i + 4 <= length
                           else bytes(bar.r8(off + j) for j in range(i, min(i + 4, length)))
                           for i in range(lo, hi, 4))
            again = self._common.r8(self._coff + CONFIG_GENERATION)
            if again == gen:
                return raw[offset - lo:offset - lo + size]
            gen = again
        raise TransportError(f"{self.name}: config_generation keeps changing", errno.EAGAIN)

    def notify(self, index: int) -> None:
        self._notify_bar.w16(self._notify_at[index], index)
        self.counters["notifies"] += 1

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
            self._dead = f"{self.name}: device_status reads 0xff (the function is gone)"
        elif st & NEEDS_RESET:
            self._dead = f"{self.name}: the device needs a reset (device_status {st:#x})"
        elif not st & DRIVER_OK:
            self._dead = f"{self.name}: the device was reset (device_status {st:#x})"
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
        fn = self.dev.fn
        while True:
            self.check_alive()
            left = LIVENESS_INTERVAL if deadline is None else min(LIVENESS_INTERVAL, deadline - monotonic())
            if self.uio_fd >= 0:
                self._isr.r8(self._isr_off)  # read-to-clear: deasserts INTx
                item = q.get_used()
                if item is not None:
                    return item
                fn.set_command(clear_bits=PCI_COMMAND_INTX_DISABLE)
                r, _, _ = select.select([self.uio_fd], [], [], max(0.0, left))
                if r:
                    os.read(self.uio_fd, 4)
                    self.counters["interrupts"] += 1
            else:
                sleep(min(max(0.0, left), 0.0005))
                self.counters["polls"] += 1
            item = q.get_used()
            if item is not None:
                return item
            if deadline is not None and monotonic() >= deadline:
                self.check_alive()
                raise WaitTimeout(f"{self.name}: queue {index}: no used buffer within {timeout} s")

    def close(self) -> None:
        """Reset the device (it stops using our memory), free the memory,
        unmap the BARs, close the uio fd. Idempotent; never fails because the
        device is gone."""
        if self._closed:
            return
        self._closed = True
        dev = getattr(self, "dev", None)
        stopped = True
        if dev is not None and dev.bars and self._dead is None:
            try:
                stopped = self._reset()
            except (OSError, TransportError):
                stopped = False
        if self._dead is None:
            self._dead = f"{getattr(self, 'name', '?')}: the device is closed"
        self.queues = []
        if self.mem is not None:
            if stopped:
                self.mem.close()
                if self.mem.kept_mapped:  # a view of it is still held somewhere: left mapped
                    self.counters["hugepages_kept"] = self.mem.size // (2 << 20)
                else:
                    self.counters["hugepages_freed"] = self.mem.size // (2 << 20)
            else:  # a device that may still write: leak the pages rather than hand them back
                self.counters["hugepages_kept"] = self.mem.size // (2 << 20)
        self.uio_fd = -1
        if dev is not None:
            self.counters["bars_unmapped"] = len(dev.bars)
            self.counters["fds_closed"] = int(dev.uio_fd >= 0)
            dev.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"VirtioPciTransport({getattr(self, 'name', '?')!r}{', dead' if self._dead else ''})"


if TYPE_CHECKING:  # the type checker proves the driver implements the interface
    def _implements(t: VirtioPciTransport) -> VirtioTransport:
        return t
