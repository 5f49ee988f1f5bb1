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

import errno
import fcntl
import os
import select
from typing import TYPE_CHECKING, Any

from guest_lib.transport import (
    DRIVER_FEATURES,
    NUM_QUEUES,
    DeviceGone,
    TransportError,
    VirtioTransport,
)
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
from guest_lib.transports.userspace import (  # noqa: F401  (re-exported: the numbers are the base's)
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    LIVENESS_INTERVAL,
    NEEDS_RESET,
    SPIN,
    TRANSPORT_FEATURES,
    UserspaceDriver,
    config_error,
    is_rdma_config as _is_rdma,
)
from virtio.split import DriverQueue

# common configuration (§4.1.4.3), offsets
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0, 4, 8, 12
MSIX_CONFIG, NUM_QUEUES_OFF, DEVICE_STATUS, CONFIG_GENERATION = 16, 18, 20, 21
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 22, 24, 26, 28, 30
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 32, 40, 48
NO_VECTOR = 0xFFFF


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


class VirtioPciTransport(UserspaceDriver):
    """The virtio-rdma device at PCI ``address`` ("auto" or "0000:00:04.0"),
    opened: ``num_queues`` queues of up to ``queue_size`` entries, ``mem_size``
    bytes of pinned huge pages, device features ``device_features`` offered
    (by ACK_FEATURES). ``interrupts``: True (sleeping waits on INTx through
    uio), False (poll only). The function is locked (flock of its uio
    device) for as long as the transport is open: a second driver gets
    EBUSY. The bus-independent half is :class:`UserspaceDriver`'s."""

    error = PciError

    def __init__(self, address: str = "auto", *, mem_size: int = 32 << 20, queue_size: int = 256,
                 num_queues: int = NUM_QUEUES, device_features: int = DRIVER_FEATURES,
                 interrupts: bool = True, timeout: float | None = 10.0, sysfs: str = "/sys"):
        super().__init__(timeout)
        try:
            self.dev = find_device(address, sysfs)
        except OSError as e:
            raise PciError(f"cannot open the PCI device {address}: {e}", e.errno or errno.ENODEV) from e
        self.name = self.dev.fn.address
        self.counters["bars_mapped"] = len(self.dev.bars)
        self.counters["fds_opened"] = 1  # the uio device (lock and interrupts)
        #: INTx through uio for sleeping waits (-1: poll only)
        self.uio_fd = self.dev.uio_fd if interrupts else -1
        self._notify_at: list[int] = []
        try:
            self._common, self._coff, _ = self.dev.struct(CAP_COMMON)
            self._isr, self._isr_off, _ = self.dev.struct(CAP_ISR)
            self._notify_bar, self._notify_off, self._notify_len = self.dev.struct(CAP_NOTIFY)
            self._mult = self.dev.caps[CAP_NOTIFY].multiplier
            self._open(mem_size, num_queues, queue_size, device_features)
        except BaseException:
            self.close()
            raise

    # --- the common configuration (§4.1.4.3) -----------------------------
    def _status(self) -> int:
        return self._common.r8(self._coff + DEVICE_STATUS)

    def _set_status(self, v: int) -> None:
        self._common.w8(self._coff + DEVICE_STATUS, v)

    def _read_features(self) -> int:
        c, o = self._common, self._coff
        offered = 0
        for sel in (0, 1):
            c.w32(o + DEVICE_FEATURE_SELECT, sel)
            offered |= c.r32(o + DEVICE_FEATURE) << (32 * sel)
        return offered

    def _write_features(self, acked: int) -> None:
        c, o = self._common, self._coff
        for sel in (0, 1):
            c.w32(o + DRIVER_FEATURE_SELECT, sel)
            c.w32(o + DRIVER_FEATURE, (acked >> (32 * sel)) & 0xFFFF_FFFF)

    def _num_queues(self) -> int:
        self.dev.fn.set_command(set_bits=PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)
        return self._common.r16(self._coff + NUM_QUEUES_OFF)

    def _queue_max(self, index: int) -> int:
        self._common.w16(self._coff + QUEUE_SELECT, index)
        return self._common.r16(self._coff + QUEUE_SIZE)

    def _setup_queue(self, q: DriverQueue) -> None:
        c, o = self._common, self._coff
        c.w16(o + QUEUE_SELECT, q.index)
        c.w16(o + QUEUE_SIZE, q.size)
        c.w16(o + QUEUE_MSIX_VECTOR, NO_VECTOR)
        c.w64(o + QUEUE_DESC, q.desc_gpa)
        c.w64(o + QUEUE_DRIVER, q.avail_gpa)
        c.w64(o + QUEUE_DEVICE, q.used_gpa)
        at = self._notify_off + c.r16(o + QUEUE_NOTIFY_OFF) * self._mult
        if at + 2 > self._notify_off + self._notify_len:
            raise PciError(f"{self.name}: queue {q.index} notify offset {at:#x} is outside "
                           "the notify capability")
        self._notify_at.append(at)
        c.w16(o + QUEUE_ENABLE, 1)

    def _before_driver_ok(self) -> None:
        self._common.w16(self._coff + MSIX_CONFIG, NO_VECTOR)

    def _sleep(self, q: DriverQueue, left: float) -> Any:
        if self.uio_fd < 0:
            return super()._sleep(q, left)
        self._isr.r8(self._isr_off)  # read-to-clear: deasserts INTx
        item = q.get_used()
        if item is not None:
            return item
        self.dev.fn.set_command(clear_bits=PCI_COMMAND_INTX_DISABLE)
        r, _, _ = select.select([self.uio_fd], [], [], max(0.0, left))
        if r:
            os.read(self.uio_fd, 4)
            self.counters["interrupts"] += 1
        return None

    # --- the interface ---------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        if self._dead is not None:
            raise DeviceGone(self._dead)
        bar, off, length = self.dev.struct(CAP_DEVICE)
        if offset < 0 or size < 0 or offset + size > length:
            raise config_error(self.name, offset, size, length)
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

    def _mapped(self) -> bool:
        dev = getattr(self, "dev", None)
        return dev is not None and bool(dev.bars)

    def _release(self) -> None:
        """Unmap the BARs, close the uio fd."""
        self.uio_fd = -1
        dev = getattr(self, "dev", None)
        if dev is not None:
            self.counters["bars_unmapped"] = len(dev.bars)
            self.counters["fds_closed"] = int(dev.uio_fd >= 0)
            dev.close()


if TYPE_CHECKING:  # the type checker proves the driver implements the interface
    def _implements(t: VirtioPciTransport) -> VirtioTransport:
        return t
