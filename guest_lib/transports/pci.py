"""A PCI function from Linux userspace: sysfs config space, BARs, uio.

What the userspace virtio-pci driver (:mod:`guest_lib.transports.virtio_pci`)
needs from the kernel, and nothing else:

* config space through ``/sys/bus/pci/devices/<addr>/config`` (pread/pwrite;
  the command register's MEMORY, BUS_MASTER and INTX_DISABLE bits);
* the BARs through ``resourceN`` (mmap, MAP_SHARED), accessed with naturally
  sized loads and stores (a 16-bit register is one 16-bit access, as
  virtio-pci requires, §4.1.3.1);
* binding to ``uio_pci_generic`` (``driver_override`` + ``bind``), whose
  ``/dev/uioN`` counts INTx interrupts; the kernel masks INTx in the
  command register on each one, the driver unmasks it before it sleeps.

Modules the guest image loads: ``uio`` and ``uio_pci_generic`` (and, if any
other virtio device is used by the kernel, ``virtio_pci``: the driver takes
over only functions no kernel virtio driver uses).

The capability walker (:func:`virtio_caps`) is pure: it takes the config
space bytes and returns the modern virtio-pci capabilities (spec v1.2
§4.1.4), or raises :class:`PciError` naming the bad value.
"""
from __future__ import annotations

import errno as _errno
import mmap
import os
import struct
from dataclasses import dataclass

from guest_lib.transport import TransportError

PCI_VENDOR_VIRTIO = 0x1AF4
#: virtio PCI device IDs (transitional 0x1000..0x103f, modern 0x1040 + virtio ID)
VIRTIO_DEVICE_IDS = range(0x1000, 0x1080)

PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_CAPABILITY_LIST = 0x34
PCI_STATUS_CAP_LIST = 0x10
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
IORESOURCE_MEM = 0x200

#: virtio_pci_cap.cfg_type (§4.1.4)
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
CAP_NAMES = {CAP_COMMON: "common", CAP_NOTIFY: "notify", CAP_ISR: "isr", CAP_DEVICE: "device"}
#: the most capabilities a walk follows (a loop in a forged list ends here)
MAX_CAPS = 48


class PciError(TransportError):
    """A PCI function is absent, unusable or says something impossible."""

    def __init__(self, message: str, errno: int = _errno.ENODEV):
        super().__init__(message, errno)


@dataclass(frozen=True)
class VirtioCap:
    """One virtio vendor capability: the structure lives in BAR ``bar`` at
    ``offset`` for ``length`` bytes (``multiplier``: notify_off_multiplier)."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    multiplier: int = 0


def virtio_caps(config: bytes) -> dict[int, VirtioCap]:
    """The first capability of each virtio cfg_type (common, notify, ISR,
    device) in config space ``config`` (at least 64 bytes; 256 to reach the
    capability list). Raises PciError if there is no capability list, the
    list points outside ``config``, loops past MAX_CAPS, or a needed
    structure is missing or malformed."""
    if len(config) < 64:
        raise PciError(f"config space of {len(config)} bytes is shorter than the 64-byte header")
    status = int.from_bytes(config[PCI_STATUS:PCI_STATUS + 2], "little")
    if not status & PCI_STATUS_CAP_LIST:
        raise PciError(f"no capability list (status {status:#06x})")
    found: dict[int, VirtioCap] = {}
    ptr = config[PCI_CAPABILITY_LIST] & 0xFC
    for _ in range(MAX_CAPS):
        if ptr == 0:
            break
        if ptr < 0x40 or ptr + 2 > len(config):
            raise PciError(f"capability pointer {ptr:#x} is outside config space ({len(config)} bytes)")
        cap_id, nxt = config[ptr], config[ptr + 1]
        if cap_id == PCI_CAP_ID_VNDR:
            if ptr + 16 > len(config):
                raise PciError(f"virtio capability at {ptr:#x} runs past config space")
            cap_len, cfg_type, bar = config[ptr + 2], config[ptr + 3], config[ptr + 4]
            offset, length = struct.unpack_from("<II", config, ptr + 8)
            if cap_len < 16:
                raise PciError(f"virtio capability at {ptr:#x} has cap_len {cap_len} < 16")
            mult = 0
            if cfg_type == CAP_NOTIFY:
                if cap_len < 20 or ptr + 20 > len(config):
                    raise PciError(f"notify capability at {ptr:#x} has cap_len {cap_len} < 20")
                mult = struct.unpack_from("<I", config, ptr + 16)[0]
            # §4.1.4: use the first of each type with a BAR we know (0..5)
            if cfg_type in CAP_NAMES and cfg_type not in found and bar <= 5:
                found[cfg_type] = VirtioCap(cfg_type, bar, offset, length, mult)
        ptr = nxt & 0xFC
    else:
        raise PciError(f"capability list longer than {MAX_CAPS} entries (a loop?)")
    missing = [name for t, name in CAP_NAMES.items() if t not in found]
    if missing:
        raise PciError(f"not a modern virtio-pci function: no {', '.join(missing)} capability")
    if found[CAP_COMMON].length < 56:
        raise PciError(f"common configuration of {found[CAP_COMMON].length} bytes is shorter than 56")
    return found


def parse_resources(text: str) -> list[tuple[int, int, int]]:
    """sysfs ``resource``: one ``start end flags`` line per BAR (and ROM):
    [(start, size, flags)], size 0 for an unused BAR."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            raise PciError(f"resource line {line!r} is not 'start end flags'")
        start, end, flags = (int(p, 16) for p in parts)
        out.append((start, end - start + 1 if end >= start and end else 0, flags))
    return out


class Bar:
    """One memory BAR mapped from sysfs ``resourceN``; owns the mapping.
    Accessors take offsets inside the BAR and use one access of their width.
    ``offset``: where the region starts in ``path`` (the virtio-mmio driver
    maps a register block from /dev/mem; it need not be page-aligned)."""

    def __init__(self, path: str, size: int, offset: int = 0):
        self.path, self.size = path, size
        base = offset - offset % mmap.PAGESIZE
        span = -(-(offset - base + size) // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        finally:
            os.close(fd)
        mv = memoryview(self._map)[offset - base:offset - base + size]
        self._b, self._h, self._w = mv, mv.cast("H"), mv.cast("I")

    def _check(self, off: int, width: int) -> None:
        if off < 0 or off + width > self.size or off % width:
            raise PciError(f"{width}-byte access at {off:#x} is outside or misaligned in {self.path} "
                           f"({self.size:#x} bytes)", _errno.EFAULT)

    def r8(self, off: int) -> int:
        self._check(off, 1)
        return self._b[off]

    def w8(self, off: int, v: int) -> None:
        self._check(off, 1)
        self._b[off] = v

    def r16(self, off: int) -> int:
        self._check(off, 2)
        return self._h[off >> 1]

    def w16(self, off: int, v: int) -> None:
        self._check(off, 2)
        self._h[off >> 1] = v

    def r32(self, off: int) -> int:
        self._check(off, 4)
        return self._w[off >> 2]

    def w32(self, off: int, v: int) -> None:
        self._check(off, 4)
        self._w[off >> 2] = v

    def w64(self, off: int, v: int) -> None:
        """Two 32-bit stores, low word first (§4.1.3.1 allows it for 64-bit fields)."""
        self.w32(off, v & 0xFFFF_FFFF)
        self.w32(off + 4, v >> 32)

    def close(self) -> None:
        if self._map is None:
            return
        for v in (self._w, self._h, self._b):
            v.release()
        self._map.close()
        self._map = None  # type: ignore[assignment]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class PciFunction:
    """One PCI function under ``sysfs`` (``/sys/bus/pci/devices/<address>``)."""

    def __init__(self, address: str, sysfs: str = "/sys"):
        self.address = address
        self.dir = os.path.join(sysfs, "bus/pci/devices", address)
        self.drivers = os.path.join(sysfs, "bus/pci/drivers")
        if not os.path.isdir(self.dir):
            raise PciError(f"no PCI function {address} ({self.dir} missing)")

    @property
    def ids(self) -> tuple[int, int]:
        return (int(_read(os.path.join(self.dir, "vendor")), 16),
                int(_read(os.path.join(self.dir, "device")), 16))

    @property
    def driver(self) -> str | None:
        link = os.path.join(self.dir, "driver")
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else None

    def virtio_in_use(self) -> bool:
        """Does a kernel virtio driver (virtio_blk, virtio_net, 9p...) use the
        function through virtio_pci? Such a function is never taken over."""
        for name in os.listdir(self.dir):
            if name.startswith("virtio") and os.path.islink(os.path.join(self.dir, name, "driver")):
                return True
        return False

    def config(self, size: int = 256) -> bytes:
        with open(os.path.join(self.dir, "config"), "rb", buffering=0) as f:
            return f.read(size)

    def config_write16(self, off: int, value: int) -> None:
        fd = os.open(os.path.join(self.dir, "config"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, value.to_bytes(2, "little"), off)
        finally:
            os.close(fd)

    def resources(self) -> list[tuple[int, int, int]]:
        return parse_resources(_read(os.path.join(self.dir, "resource")))

    def map_bar(self, index: int) -> Bar:
        res = self.resources()
        if not 0 <= index < min(6, len(res)):
            raise PciError(f"{self.address}: BAR {index} does not exist")
        _start, size, flags = res[index]
        if not size or not flags & IORESOURCE_MEM:
            raise PciError(f"{self.address}: BAR {index} is not a memory BAR "
                           f"(size {size:#x}, flags {flags:#x})")
        return Bar(os.path.join(self.dir, f"resource{index}"), size)

    def bind_uio(self) -> None:
        """Unbind the function from its driver and bind it to uio_pci_generic
        (which must be loaded: ``modprobe uio_pci_generic``)."""
        if self.driver == "uio_pci_generic":
            return
        if not os.path.isdir(os.path.join(self.drivers, "uio_pci_generic")):
            raise PciError("uio_pci_generic is not loaded (modprobe uio_pci_generic)")
        if self.driver is not None:
            _write(os.path.join(self.dir, "driver/unbind"), self.address)
        _write(os.path.join(self.dir, "driver_override"), "uio_pci_generic")
        try:
            _write(os.path.join(self.drivers, "uio_pci_generic/bind"), self.address)
        except OSError as e:
            raise PciError(f"{self.address}: binding to uio_pci_generic failed: {e}",
                           e.errno or _errno.EIO) from e

    def release_uio(self) -> None:
        """Unbind from uio_pci_generic and let the kernel's drivers probe it again."""
        if self.driver == "uio_pci_generic":
            _write(os.path.join(self.dir, "driver/unbind"), self.address)
        _write(os.path.join(self.dir, "driver_override"), "\n")
        try:
            _write(os.path.join(os.path.dirname(self.drivers), "drivers_probe"), self.address)
        except OSError:
            pass  # no driver wants it: it stays unbound

    def uio_device(self) -> str:
        """/dev/uioN of the function (bound to uio_pci_generic)."""
        names = os.listdir(os.path.join(self.dir, "uio"))
        if not names:
            raise PciError(f"{self.address}: no uio device")
        return "/dev/" + names[0]

    def set_command(self, set_bits: int = 0, clear_bits: int = 0) -> int:
        cmd = int.from_bytes(self.config(PCI_COMMAND + 2)[PCI_COMMAND:], "little")
        new = (cmd | set_bits) & ~clear_bits
        if new != cmd:
            self.config_write16(PCI_COMMAND, new)
        return new


def list_functions(sysfs: str = "/sys") -> list[str]:
    root = os.path.join(sysfs, "bus/pci/devices")
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []
