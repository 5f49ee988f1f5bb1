"""A 512-byte x86 MBR boot sector that prints a marker on COM1 and halts.

What ``vrdma backend --device blk --boot-marker TEXT`` serves as sector 0 of its
RAM disk (and what the QEMU end-to-end tests boot from).
Purpose: end-to-end proof that a virtio-blk request went through *our* virtqueue.  SeaBIOS
reads sector 0 of the boot disk (one VIRTIO_BLK_T_IN request, 512 bytes to 0000:7C00),
checks the 0x55AA signature at offset 510 and jumps to 0000:7C00 in 16-bit real mode with
DL = drive number.  If the bytes came from our vhost-user backend and the marker appears on
the serial port, data moved through the virtqueue correctly.

The code is hand-assembled (no assembler needed at build or test time); ``LISTING`` holds
the assembly listing, produced from the same table that produces the bytes::

    0000  FA              cli
    0001  31 C0           xor ax, ax
    0003  8E D8           mov ds, ax
    0005  8E D0           mov ss, ax
    0007  BC 00 7C        mov sp, 0x7c00
    000A  FC              cld
    000B  BA F9 03        mov dx, 0x3f9          ; 16550 IER
    000E  30 C0           xor al, al
    0010  EE              out dx, al             ; no UART interrupts
    0011  B2 FB           mov dl, 0xfb           ; LCR
    0013  B0 80           mov al, 0x80
    0015  EE              out dx, al             ; DLAB = 1
    0016  B2 F8           mov dl, 0xf8           ; DLL
    0018  B0 01           mov al, 0x01
    001A  EE              out dx, al             ; divisor 1 = 115200 baud
    001B  B2 F9           mov dl, 0xf9           ; DLM
    001D  30 C0           xor al, al
    001F  EE              out dx, al
    0020  B2 FB           mov dl, 0xfb           ; LCR
    0022  B0 03           mov al, 0x03
    0024  EE              out dx, al             ; 8N1, DLAB = 0
    0025  BE 41 7C        mov si, 0x7c41         ; marker (NUL-terminated) at offset 0x41
    0028  AC              next: lodsb
    0029  84 C0           test al, al
    002B  74 10           jz halt
    002D  88 C4           mov ah, al
    002F  B2 FD           wait: mov dl, 0xfd     ; LSR
    0031  EC              in al, dx
    0032  A8 20           test al, 0x20          ; THR empty?
    0034  74 F9           jz wait
    0036  B2 F8           mov dl, 0xf8           ; THR
    0038  88 E0           mov al, ah
    003A  EE              out dx, al
    003B  EB EB           jmp next
    003D  FA              halt: cli
    003E  F4              hlt
    003F  EB FC           jmp halt               ; hlt forever (NMI/SMI safe)
    0041  <marker> 00
    ...   00 padding
    01FE  55 AA           MBR signature

DH stays 0x03 throughout, so ``mov dl, imm8`` selects the UART register.  No BIOS call is
used, so the sector also works when the BIOS console is not on the serial port.
"""

from __future__ import annotations

import errno as _errno

from vhost_user.blk import SECTOR_SIZE  # the MBR is the disk's first virtio-blk sector
from vhost_user.errors import VhostUserError

LOAD_ADDRESS = 0x7C00
COM1 = 0x3F8
SIGNATURE = b"\x55\xaa"


class BootSectorError(VhostUserError, ValueError):
    """The boot-sector marker cannot be encoded (bad type, NUL byte, too long), or a
    boot disk's size is not a positive multiple of the sector size."""

    errno = _errno.EINVAL


# (label or None, machine code or a rel8 jump (opcode, target label), listing text)
_Insn = tuple[str | None, bytes | tuple[int, str], str]

_CODE: tuple[_Insn, ...] = (
    (None, b"\xfa", "cli"),
    (None, b"\x31\xc0", "xor ax, ax"),
    (None, b"\x8e\xd8", "mov ds, ax"),
    (None, b"\x8e\xd0", "mov ss, ax"),
    (None, b"\xbc\x00\x7c", "mov sp, 0x7c00"),
    (None, b"\xfc", "cld"),
    (None, b"\xba\xf9\x03", "mov dx, 0x3f9          ; 16550 IER"),
    (None, b"\x30\xc0", "xor al, al"),
    (None, b"\xee", "out dx, al             ; no UART interrupts"),
    (None, b"\xb2\xfb", "mov dl, 0xfb           ; LCR"),
    (None, b"\xb0\x80", "mov al, 0x80"),
    (None, b"\xee", "out dx, al             ; DLAB = 1"),
    (None, b"\xb2\xf8", "mov dl, 0xf8           ; DLL"),
    (None, b"\xb0\x01", "mov al, 0x01"),
    (None, b"\xee", "out dx, al             ; divisor 1 = 115200 baud"),
    (None, b"\xb2\xf9", "mov dl, 0xf9           ; DLM"),
    (None, b"\x30\xc0", "xor al, al"),
    (None, b"\xee", "out dx, al"),
    (None, b"\xb2\xfb", "mov dl, 0xfb           ; LCR"),
    (None, b"\xb0\x03", "mov al, 0x03"),
    (None, b"\xee", "out dx, al             ; 8N1, DLAB = 0"),
    (None, b"\xbe@@", "mov si, <marker>"),  # patched with the marker address below
    ("next", b"\xac", "lodsb"),
    (None, b"\x84\xc0", "test al, al"),
    (None, (0x74, "halt"), "jz halt"),
    (None, b"\x88\xc4", "mov ah, al"),
    ("wait", b"\xb2\xfd", "mov dl, 0xfd           ; LSR"),
    (None, b"\xec", "in al, dx"),
    (None, b"\xa8\x20", "test al, 0x20          ; THR empty?"),
    (None, (0x74, "wait"), "jz wait"),
    (None, b"\xb2\xf8", "mov dl, 0xf8           ; THR"),
    (None, b"\x88\xe0", "mov al, ah"),
    (None, b"\xee", "out dx, al"),
    (None, (0xEB, "next"), "jmp next"),
    ("halt", b"\xfa", "cli"),
    (None, b"\xf4", "hlt"),
    (None, (0xEB, "halt"), "jmp halt"),
)


def _assemble() -> tuple[bytes, int, str]:
    """Two-pass assembly of ``_CODE``: returns (code, marker offset, listing)."""
    offsets: dict[str, int] = {}
    pos = 0
    for label, code, _ in _CODE:
        if label is not None:
            offsets[label] = pos
        pos += 2 if isinstance(code, tuple) else len(code)
    marker_off = pos
    out = bytearray()
    lines = []
    for label, code, note in _CODE:
        here = len(out)
        text = note
        if isinstance(code, tuple):
            opcode, target = code
            rel = offsets[target] - (here + 2)
            if not -128 <= rel <= 127:  # pragma: no cover - static table
                raise AssertionError(f"rel8 out of range for {text}")
            enc = bytes((opcode, rel & 0xFF))
        elif code == b"\xbe@@":
            enc = b"\xbe" + (LOAD_ADDRESS + marker_off).to_bytes(2, "little")
            text = f"mov si, {LOAD_ADDRESS + marker_off:#06x}"
        else:
            enc = code
        out += enc
        prefix = f"{label}: " if label else ""
        lines.append(f"{here:04X}  {enc.hex(' ').upper():<15} {prefix}{text}")
    lines.append(f"{marker_off:04X}  <marker> 00")
    lines.append(f"{SECTOR_SIZE - 2:04X}  55 AA           MBR signature")
    return bytes(out), marker_off, "\n".join(lines)


CODE, MARKER_OFFSET, LISTING = _assemble()
MAX_MARKER_LEN = SECTOR_SIZE - 2 - MARKER_OFFSET - 1  # room for the NUL terminator


def make_boot_sector(marker: bytes) -> bytes:
    """Return a 512-byte MBR that writes ``marker`` to COM1 (0x3F8) and halts forever.

    ``marker`` must be non-empty bytes without NUL, at most ``MAX_MARKER_LEN`` long.
    """
    if not isinstance(marker, (bytes, bytearray, memoryview)):
        raise BootSectorError(f"marker must be bytes, got {type(marker).__name__}")
    marker = bytes(marker)
    if not marker:
        raise BootSectorError("marker must not be empty")
    if b"\x00" in marker:
        raise BootSectorError(f"marker contains a NUL byte at index {marker.index(0)}")
    if len(marker) > MAX_MARKER_LEN:
        raise BootSectorError(f"marker length {len(marker)} exceeds {MAX_MARKER_LEN} bytes")
    sector = bytearray(SECTOR_SIZE)
    sector[: len(CODE)] = CODE
    sector[MARKER_OFFSET : MARKER_OFFSET + len(marker)] = marker
    sector[SECTOR_SIZE - 2 :] = SIGNATURE
    return bytes(sector)


def write_boot_disk(path: str, marker: bytes, *, size: int = 1024 * 1024) -> None:
    """Write a raw disk image of ``size`` bytes whose sector 0 is ``make_boot_sector(marker)``."""
    if size < SECTOR_SIZE or size % SECTOR_SIZE:
        raise BootSectorError(f"disk size {size} must be a positive multiple of {SECTOR_SIZE}")
    sector = make_boot_sector(marker)
    with open(path, "wb") as f:
        f.write(sector)
        f.truncate(size)
