"""Guest-side device check: find the virtio-rdma function and read its device config.

An application for a guest image (``vrdma image build --app vrdma/image/probe.py``):
it runs as the image's only job, reads everything through sysfs and /dev/mem, and
drives nothing.

* PCI (q35): every function with vendor 0x1af4 and modern device id 0x1040 + ID
  (virtio 1.x, 4.1.2.1) is listed; the vendor-specific capabilities of its PCI config
  space (sysfs ``config``; 4.1.4: cfg_type, bar, offset, length) locate the device
  configuration (``VIRTIO_PCI_CAP_DEVICE_CFG`` = 4), which is read through the BAR's
  sysfs ``resourceN`` mapping after ``enable``.
* virtio-mmio (microvm): the ``virtio_mmio.device=SIZE@ADDR:IRQ`` entries of the
  kernel command line (QEMU adds them; microvm runs without ACPI here) and the
  ``LNRO0005`` regions of /proc/iomem (with ACPI) are mapped from /dev/mem; the register
  block (4.2.2) starts with the magic "virt", the version (2) and the device id; the
  device configuration starts at 0x100.

Prints one ``VRDMA-PROBE`` line per virtio device (transport, address, device id, the
first ``--config-bytes`` of its config in hex), whether uio_pci_generic is loaded and
the huge pages, and exits with ``--exit`` (default 0) if a device with ``--expect-id``
was found, else 3.  ``--sleep`` waits first (for tests that kill the VM while its
application runs); ``--import`` imports modules first (the image's portable extensions
must load on the CPU TCG emulates).
"""
from __future__ import annotations

import argparse
import importlib
import mmap
import os
import struct
import sys
import time

VIRTIO_VENDOR = 0x1AF4
MODERN_BASE = 0x1040
CAP_VENDOR = 0x09
CFG_DEVICE = 4
MMIO_MAGIC = 0x74726976  # "virt"
MMIO_CONFIG = 0x100
PCI_ROOT = "/sys/bus/pci/devices"


def _read_mapped(path: str, offset: int, length: int) -> bytes:
    page = mmap.PAGESIZE
    base = offset - offset % page
    size = (offset - base + length + page - 1) // page * page
    fd = os.open(path, os.O_RDONLY | os.O_SYNC)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=base) as m:
            start = offset - base
            # 32-bit reads: device memory (a config space) wants naturally sized accesses
            words = [struct.unpack_from("<I", m, start + i)[0] for i in range(0, length - length % 4, 4)]
            tail = bytes(m[start + length - length % 4:start + length])
    finally:
        os.close(fd)
    return b"".join(struct.pack("<I", w) for w in words) + tail


def pci_devices(config_bytes: int = 64) -> list[dict]:
    found: list[dict] = []
    if not os.path.isdir(PCI_ROOT):
        return found
    for bdf in sorted(os.listdir(PCI_ROOT)):
        base = os.path.join(PCI_ROOT, bdf)
        with open(os.path.join(base, "vendor")) as f:
            vendor = int(f.read(), 16)
        with open(os.path.join(base, "device")) as f:
            device = int(f.read(), 16)
        if vendor != VIRTIO_VENDOR or not MODERN_BASE <= device < MODERN_BASE + 0x40:
            continue
        with open(os.path.join(base, "config"), "rb") as f:
            cfg = f.read(256)
        entry: dict = {"transport": "pci", "address": bdf, "id": device - MODERN_BASE, "config": None}
        driver = os.path.join(base, "driver")
        entry["driver"] = os.path.basename(os.readlink(driver)) if os.path.islink(driver) else None
        ptr = cfg[0x34] if len(cfg) > 0x34 and cfg[0x06] & 0x10 else 0
        seen = set()
        while 0x40 <= ptr < len(cfg) - 16 and ptr not in seen:
            seen.add(ptr)
            cap_id, nxt, cfg_type, bar = cfg[ptr], cfg[ptr + 1], cfg[ptr + 3], cfg[ptr + 4]
            offset, length = struct.unpack_from("<II", cfg, ptr + 8)
            if cap_id == CAP_VENDOR and cfg_type == CFG_DEVICE and bar < 6 and 0 < length <= 4096:
                with open(os.path.join(base, "enable"), "w") as f:
                    f.write("1")
                entry["config"] = _read_mapped(os.path.join(base, f"resource{bar}"), offset,
                                               min(length, config_bytes))
            ptr = nxt
        found.append(entry)
    return found


def _mmio_bases() -> list[int]:
    bases = []
    with open("/proc/cmdline") as f:
        for arg in f.read().split():
            if arg.startswith("virtio_mmio.device="):
                # SIZE@ADDR:IRQ[:ID], SIZE with an optional K/M suffix
                addr = arg.split("@", 1)[1].split(":", 1)[0]
                bases.append(int(addr, 0))
    try:
        with open("/proc/iomem") as f:
            for line in f:
                span, _, name = line.strip().partition(" : ")
                if name.startswith("LNRO0005"):
                    bases.append(int(span.split("-")[0], 16))
    except OSError:
        pass
    return sorted(set(bases))


def mmio_devices(config_bytes: int = 64) -> list[dict]:
    found: list[dict] = []
    for start in _mmio_bases():
        try:
            regs = _read_mapped("/dev/mem", start, MMIO_CONFIG + config_bytes)
        except OSError as exc:
            found.append({"transport": "mmio", "address": f"{start:#x}", "id": None, "error": str(exc)})
            continue
        magic, version, dev_id = struct.unpack_from("<III", regs, 0)
        if magic != MMIO_MAGIC or dev_id == 0:
            continue
        found.append({"transport": "mmio", "address": f"{start:#x}", "id": dev_id, "version": version,
                      "config": regs[MMIO_CONFIG:]})
    return found


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="probe")
    p.add_argument("--expect-id", type=int, default=None, help="virtio device id that must be present")
    p.add_argument("--exit", type=int, default=0, help="exit status when the device is found")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait first")
    p.add_argument("--import", dest="imports", default="", metavar="MOD[,MOD...]",
                   help="import these modules first (e.g. the portable extensions, numpy) and say so")
    p.add_argument("--config-bytes", type=int, default=64,
                   help="bytes of device configuration to read (each 4-byte read may be a round "
                        "trip to the back-end)")
    args = p.parse_args(argv)
    for name in filter(None, args.imports.split(",")):
        t0 = time.monotonic()
        module = importlib.import_module(name)
        print(f"VRDMA-PROBE-IMPORT {name} {os.path.basename(module.__file__ or '-')} "
              f"{time.monotonic() - t0:.2f}s", flush=True)
    if args.sleep:
        print("VRDMA-PROBE-SLEEP", flush=True)
        time.sleep(args.sleep)
    devices = pci_devices(args.config_bytes) + mmio_devices(args.config_bytes)
    for d in devices:
        cfg = d.get("config")
        extra = " ".join(f"{k}={d[k]}" for k in ("driver", "version", "error") if d.get(k) is not None)
        print(f"VRDMA-PROBE transport={d['transport']} address={d['address']} virtio-id={d['id']} "
              f"config={cfg.hex() if cfg else '-'} {extra}".rstrip(), flush=True)
    uio = os.path.isdir("/sys/bus/pci/drivers/uio_pci_generic")
    huge = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Total:"):
                huge = int(line.split()[1])
    print(f"VRDMA-PROBE-ENV uio_pci_generic={'yes' if uio else 'no'} hugepages={huge}", flush=True)
    if args.expect_id is not None and not any(d["id"] == args.expect_id for d in devices):
        print(f"VRDMA-PROBE: no virtio device with id {args.expect_id}", flush=True)
        return 3
    return args.exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
