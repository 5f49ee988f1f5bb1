"""The virtio-mmio transport: guest_lib's userspace driver in a microvm guest.

The third :class:`~guest_lib.transport.VirtioTransport` (docs
guest-transport.md): a process in a QEMU ``microvm`` guest drives the
virtio-rdma device through its virtio-mmio register block itself (virtio
spec v1.2 §4.2.2, register layout version 2; QEMU needs
``-global virtio-mmio.force-legacy=false``), no kernel virtio driver
involved. Everything but the registers is the PCI driver's
(:class:`~guest_lib.transports.userspace.UserspaceDriver`: huge-page memory,
split rings, features, ACK_FEATURES, waits, close).

* **Finding the device** (:func:`find_device`): the register blocks are the
  ``virtio_mmio.device=SIZE@BASE:IRQ`` entries of the kernel command line
  (microvm with ``acpi=off`` appends one per transport) and, with ACPI or a
  device tree, the ``LNRO0005`` / ``virtio_mmio`` regions of /proc/iomem.
  Each is mapped from /dev/mem (O_SYNC; Debian's STRICT_DEVMEM allows MMIO
  no driver claims); a block with magic "virt", version 2 and a non-zero
  device ID whose configuration (at 0x100) begins with ``CONFIG_MAGIC`` and
  ``ABI_VERSION`` is the device, whatever its virtio device ID. A block the
  kernel's ``virtio-mmio`` platform driver holds with no virtio driver on top
  is unbound first (:func:`release_from_kernel`); one a kernel virtio driver
  uses is left alone. One driver per block: an exclusive flock of
  ``/run/vrdma-mmio-BASE.lock`` for as long as the transport is open.
* **Registers** (:class:`MmioReg`): 32-bit accesses only (§4.2.2.2), the
  device configuration with accesses of its fields' widths; 64-bit ring
  addresses as low/high pairs; QueueReady must read 0 before a queue is set
  up.
* **Notifications**: a 32-bit store of the queue index to QueueNotify.
* **Used buffers**: polled from the used ring (spin, then 0.5 ms naps, the
  status read at least every ``LIVENESS_INTERVAL``); InterruptStatus is
  acknowledged as it is seen (config changes counted). Sleeping on the
  interrupt is not done: ``uio_pdrv_genirq`` binds only a platform device
  with platform data or a device-tree node (``of_id=``), and microvm with
  ``acpi=off`` has neither: its devices come from the command line
  (docs/qemu-guests.md "microvm").
* **close**: Status = 0 and wait for it to read 0, free the pages, unmap the
  block, drop the lock; each release counted in ``counters``.

The pure parts (:func:`parse_cmdline`, :func:`parse_iomem`,
:func:`decode_header`) take strings and bytes and raise :class:`MmioError`
naming the bad value. Needs root (/dev/mem, pagemap PFNs, mlock) and huge
pages (``hugepages=N``).
"""
from __future__ import annotations

import errno as _errno
import fcntl
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from guest_lib.transport import DRIVER_FEATURES, NUM_QUEUES, DeviceGone, TransportError, VirtioTransport
from guest_lib.transports.pci import Bar
from guest_lib.transports.userspace import UserspaceDriver, config_error, is_rdma_config
from virtio.split import DriverQueue

#: MagicValue: "virt" little-endian
MMIO_MAGIC = 0x74726976
#: the register layout this driver speaks (1 is legacy, virtio 0.9)
MMIO_VERSION = 2
#: the device configuration starts here (§4.2.2)
CONFIG_OFFSET = 0x100
#: the smallest block that holds the registers and a config (QEMU's: 0x200)
MIN_REGION = 0x200
#: the largest block believed (a forged command line cannot map all of memory)
MAX_REGION = 1 << 20
#: InterruptStatus bits (§4.2.2)
INT_VRING, INT_CONFIG = 1, 2
DEFAULT_LOCK_DIR = "/run"


class MmioReg(IntEnum):
    """The virtio-mmio version 2 registers (§4.2.2, Table 4.1), offsets."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    CONFIG_GENERATION = 0x0FC


class MmioError(TransportError):
    """A virtio-mmio block is absent, unusable or says something impossible."""

    def __init__(self, message: str, errno: int = _errno.ENODEV):
        super().__init__(message, errno)


@dataclass(frozen=True)
class MmioRegion:
    """One virtio-mmio register block: ``size`` bytes at physical ``base``,
    interrupt ``irq`` (-1: unknown)."""

    base: int
    size: int
    irq: int = -1

    @property
    def name(self) -> str:
        return f"mmio:{self.base:#x}"


@dataclass(frozen=True)
class MmioHeader:
    """The identification registers of a block."""

    magic: int
    version: int
    device_id: int
    vendor_id: int


def parse_size(text: str) -> int:
    """A kernel memparse size: decimal or 0x hex, optional K/M/G suffix."""
    units = {"k": 10, "m": 20, "g": 30}
    shift = units.get(text[-1:].lower(), 0)
    digits = text[:-1] if shift else text
    try:
        return int(digits, 0) << shift
    except ValueError:
        raise MmioError(f"size {text!r} is not a number", _errno.EINVAL) from None


def parse_device_arg(value: str) -> MmioRegion:
    """``SIZE@BASE:IRQ[:ID]`` (the virtio_mmio.device= parameter) as a region."""
    size_s, at, rest = value.partition("@")
    if not at:
        raise MmioError(f"virtio_mmio.device={value!r} has no '@'", _errno.EINVAL)
    base_s, colon, irq_s = rest.partition(":")
    if not colon:
        raise MmioError(f"virtio_mmio.device={value!r} has no ':IRQ'", _errno.EINVAL)
    size = parse_size(size_s)
    try:
        base = int(base_s, 0)
        irq = int(irq_s.split(":", 1)[0], 0)
    except ValueError:
        raise MmioError(f"virtio_mmio.device={value!r}: base or IRQ is not a number", _errno.EINVAL) from None
    return checked_region(base, size, irq)


def checked_region(base: int, size: int, irq: int = -1) -> MmioRegion:
    """A region, or MmioError naming the absurd value."""
    if not MIN_REGION <= size <= MAX_REGION:
        raise MmioError(f"virtio-mmio region of {size:#x} bytes at {base:#x} is outside "
                        f"{MIN_REGION:#x}..{MAX_REGION:#x}", _errno.EINVAL)
    if base < 0 or base % 4 or base + size > 1 << 52:
        raise MmioError(f"virtio-mmio base {base:#x} is misaligned or beyond physical memory", _errno.EINVAL)
    return MmioRegion(base, size, irq)


def parse_cmdline(cmdline: str) -> list[MmioRegion]:
    """The ``virtio_mmio.device=`` regions of a kernel command line, in order."""
    return [parse_device_arg(arg.partition("=")[2]) for arg in cmdline.split()
            if arg.startswith("virtio_mmio.device=")]


def parse_iomem(text: str) -> list[MmioRegion]:
    """The virtio-mmio regions /proc/iomem names (ACPI ``LNRO0005``, a device
    tree's ``virtio_mmio``/``virtio-mmio``), top-level or nested."""
    out = []
    for line in text.splitlines():
        span, sep, name = line.strip().partition(" : ")
        if not sep or not (name.startswith("LNRO0005") or "virtio_mmio" in name or "virtio-mmio" in name):
            continue
        lo, dash, hi = span.partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            raise MmioError(f"/proc/iomem line {line!r} has no start-end span", _errno.EINVAL) from None
        if not dash or end < start:
            raise MmioError(f"/proc/iomem line {line!r} has no start-end span", _errno.EINVAL)
        out.append(checked_region(start, end - start + 1))
    return out


def decode_header(raw: bytes) -> MmioHeader:
    """The first 16 bytes of a block; MmioError unless it is a virtio-mmio
    version 2 block with a device behind it."""
    if len(raw) < 16:
        raise MmioError(f"virtio-mmio header of {len(raw)} bytes is shorter than 16", _errno.EINVAL)
    h = MmioHeader(*(int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)))
    if h.magic != MMIO_MAGIC:
        raise MmioError(f"magic {h.magic:#010x} is not 'virt' ({MMIO_MAGIC:#010x})")
    if h.version != MMIO_VERSION:
        raise MmioError(f"virtio-mmio version {h.version} is not {MMIO_VERSION}"
                        + (" (legacy: run QEMU with -global virtio-mmio.force-legacy=false)"
                           if h.version == 1 else ""))
    if h.device_id == 0:
        raise MmioError("device ID 0: no device behind this virtio-mmio block")
    return h


def regions(cmdline_path: str = "/proc/cmdline", iomem_path: str = "/proc/iomem") -> list[MmioRegion]:
    """Every virtio-mmio region this guest knows of, by base, deduplicated."""
    found: dict[int, MmioRegion] = {}
    for path, parse in ((cmdline_path, parse_cmdline), (iomem_path, parse_iomem)):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for r in parse(text):
            found.setdefault(r.base, r)
    return [found[b] for b in sorted(found)]


def release_from_kernel(sysfs: str = "/sys") -> list[str]:
    """Unbind from the kernel's ``virtio-mmio`` platform driver every device
    that carries no kernel virtio driver (its registers would otherwise be
    the kernel's too); the names unbound. Devices a virtio driver uses stay."""
    drv = os.path.join(sysfs, "bus/platform/drivers/virtio-mmio")
    if not os.path.isdir(drv):
        return []
    unbound = []
    for name in sorted(os.listdir(drv)):
        dev = os.path.join(drv, name)
        if not os.path.islink(dev):
            continue
        used = any(child.startswith("virtio") and os.path.islink(os.path.join(dev, child, "driver"))
                   for child in os.listdir(dev))
        if not used:
            with open(os.path.join(drv, "unbind"), "w") as f:
                f.write(name)
            unbound.append(name)
    return unbound


class _Block:
    """A candidate register block mapped from /dev/mem and locked; owns the
    mapping and the lock fd."""

    def __init__(self, region: MmioRegion, mem_path: str, lock_dir: str):
        self.region = region
        self.regs: Bar | None = None
        self.lock_fd = -1
        try:
            lock = os.path.join(lock_dir, f"vrdma-mmio-{region.base:x}.lock")
            self.lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MmioError(f"{region.name} is driven by another process", _errno.EBUSY) from None
            try:
                self.regs = Bar(mem_path, region.size, region.base)
            except ValueError as e:  # mmap: past the end of what the file maps
                raise MmioError(f"cannot map {region.name} from {mem_path}: {e}", _errno.EINVAL) from None
            head = b"".join(self.regs.r32(i).to_bytes(4, "little") for i in range(0, 16, 4))
            self.header = decode_header(head)
        except BaseException:
            self.close()
            raise

    def config_head(self, n: int) -> bytes:
        assert self.regs is not None
        return b"".join(self.regs.r32(CONFIG_OFFSET + i).to_bytes(4, "little") for i in range(0, n & ~3, 4))

    def close(self) -> None:
        if self.regs is not None:
            self.regs.close()
            self.regs = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def find_device(address: str = "auto", *, mem_path: str = "/dev/mem", lock_dir: str = DEFAULT_LOCK_DIR,
                sysfs: str = "/sys", cmdline_path: str = "/proc/cmdline",
                iomem_path: str = "/proc/iomem") -> _Block:
    """The virtio-rdma block at ``address`` ("auto": the first found; or a
    physical base such as "0xfeb00e00"), mapped and locked; MmioError
    (ENODEV) if there is none."""
    base = -1
    if address != "auto":
        try:
            base = int(address, 0)
        except ValueError:
            raise MmioError(f"virtio-mmio address {address!r} is not a number", _errno.EINVAL) from None
    release_from_kernel(sysfs)
    known = regions(cmdline_path, iomem_path)
    if address != "auto":
        known = [r for r in known if r.base == base] or [checked_region(base, MIN_REGION)]
    seen = []
    for r in known:
        try:
            blk = _Block(r, mem_path, lock_dir)
        except (MmioError, OSError) as e:
            seen.append(f"{r.base:#x} ({e})")
            if isinstance(e, MmioError) and e.errno == _errno.EBUSY and address != "auto":
                raise
            continue
        if is_rdma_config(blk.config_head(8)):
            return blk
        seen.append(f"{r.base:#x} (device {blk.header.device_id}, not virtio-rdma)")
        blk.close()
    why = "; ".join(seen) if seen else "no virtio-mmio region on the command line or in /proc/iomem"
    raise MmioError(f"no virtio-rdma virtio-mmio device at {address}: {why}")


class VirtioMmioTransport(UserspaceDriver):
    """The virtio-rdma device at virtio-mmio ``address`` ("auto" or a base
    such as "0xfeb00e00"), opened: ``num_queues`` queues of up to
    ``queue_size`` entries, ``mem_size`` bytes of pinned huge pages, device
    features ``device_features`` offered (by ACK_FEATURES). Waits poll."""

    error = MmioError

    def __init__(self, address: str = "auto", *, mem_size: int = 32 << 20, queue_size: int = 256,
                 num_queues: int = NUM_QUEUES, device_features: int = DRIVER_FEATURES,
                 timeout: float | None = 10.0, mem_path: str = "/dev/mem", lock_dir: str = DEFAULT_LOCK_DIR,
                 sysfs: str = "/sys"):
        super().__init__(timeout)
        self.blk: _Block | None = None
        try:
            self.blk = find_device(address, mem_path=mem_path, lock_dir=lock_dir, sysfs=sysfs)
        except OSError as e:
            raise MmioError(f"cannot open the virtio-mmio device {address}: {e}",
                            e.errno or _errno.ENODEV) from e
        assert self.blk.regs is not None
        self.regs: Bar = self.blk.regs
        self.region = self.blk.region
        self.name = self.region.name
        self.device_id = self.blk.header.device_id
        self.counters["regions_mapped"] = 1
        self.counters["fds_opened"] = 1  # the lock
        try:
            self._open(mem_size, num_queues, queue_size, device_features)
        except BaseException:
            self.close()
            raise

    # --- registers (§4.2.2) ------------------------------------------------
    def _status(self) -> int:
        v = self.regs.r32(MmioReg.STATUS)
        return 0xFF if v == 0xFFFF_FFFF else v & 0xFF  # all ones: nothing answers there any more

    def _set_status(self, v: int) -> None:
        self.regs.w32(MmioReg.STATUS, v)

    def _read_features(self) -> int:
        offered = 0
        for sel in (0, 1):
            self.regs.w32(MmioReg.DEVICE_FEATURES_SEL, sel)
            offered |= self.regs.r32(MmioReg.DEVICE_FEATURES) << (32 * sel)
        return offered

    def _write_features(self, acked: int) -> None:
        for sel in (0, 1):
            self.regs.w32(MmioReg.DRIVER_FEATURES_SEL, sel)
            self.regs.w32(MmioReg.DRIVER_FEATURES, (acked >> (32 * sel)) & 0xFFFF_FFFF)

    def _num_queues(self) -> int:
        """virtio-mmio has no queue count: the queues with a non-zero
        QueueNumMax, counted up to the first without."""
        n = 0
        while n < 64:
            self.regs.w32(MmioReg.QUEUE_SEL, n)
            if self.regs.r32(MmioReg.QUEUE_NUM_MAX) == 0:
                break
            n += 1
        return n

    def _queue_max(self, index: int) -> int:
        self.regs.w32(MmioReg.QUEUE_SEL, index)
        if self.regs.r32(MmioReg.QUEUE_READY):
            raise MmioError(f"{self.name}: queue {index} is ready before it was set up (after a reset)",
                            _errno.EIO)
        return self.regs.r32(MmioReg.QUEUE_NUM_MAX)

    def _setup_queue(self, q: DriverQueue) -> None:
        r = self.regs
        r.w32(MmioReg.QUEUE_SEL, q.index)
        r.w32(MmioReg.QUEUE_NUM, q.size)
        for low, gpa in ((MmioReg.QUEUE_DESC_LOW, q.desc_gpa), (MmioReg.QUEUE_DRIVER_LOW, q.avail_gpa),
                         (MmioReg.QUEUE_DEVICE_LOW, q.used_gpa)):
            r.w64(low, gpa)
        r.w32(MmioReg.QUEUE_READY, 1)

    def _sleep(self, q: DriverQueue, left: float) -> Any:
        st = self.regs.r32(MmioReg.INTERRUPT_STATUS) & (INT_VRING | INT_CONFIG)
        if st:
            self.regs.w32(MmioReg.INTERRUPT_ACK, st)
            if st & INT_CONFIG:
                self.counters["config_changes"] += 1
        return super()._sleep(q, left)

    # --- the interface ---------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        if self._dead is not None:
            raise DeviceGone(self._dead)
        length = self.region.size - CONFIG_OFFSET
        if offset < 0 or size < 0 or offset + size > length:
            raise config_error(self.name, offset, size, length)
        r = self.regs
        gen = r.r32(MmioReg.CONFIG_GENERATION)
        for _ in range(100):
            lo, hi = offset & ~3, (offset + size + 3) & ~3
            raw = b"".join(r.r32(CONFIG_OFFSET + i).to_bytes(4, "little") for i in range(lo, hi, 4))
            again = r.r32(MmioReg.CONFIG_GENERATION)
            if again == gen:
                return raw[offset - lo:offset - lo + size]
            gen = again
        raise TransportError(f"{self.name}: ConfigGeneration keeps changing", _errno.EAGAIN)

    def notify(self, index: int) -> None:
        self.regs.w32(MmioReg.QUEUE_NOTIFY, index)
        self.counters["notifies"] += 1

    def _mapped(self) -> bool:
        return self.blk is not None and self.blk.regs is not None

    def _release(self) -> None:
        """Unmap the block, drop the lock."""
        if self.blk is not None:
            self.counters["regions_unmapped"] = int(self.blk.regs is not None)
            self.counters["fds_closed"] = int(self.blk.lock_fd >= 0)
            self.blk.close()


if TYPE_CHECKING:  # the type checker proves the driver implements the interface
    def _implements(t: VirtioMmioTransport) -> VirtioTransport:
        return t
