"""Extract the uncompressed ELF ``vmlinux`` from an x86 ``bzImage`` (as scripts/extract-vmlinux).

A bzImage is real-mode setup code plus a compressed payload (gzip, xz, zstd, lzma...)
holding vmlinux.  Like the kernel's own script we look for each compressor's magic, try to
decompress from every candidate offset, and accept the first result that is an ELF file.
Booting the ELF directly (``qemu -kernel vmlinux``) uses its PVH entry note
(CONFIG_PVH=y in Debian), which skips the BIOS/real-mode path: about 5 s under TCG.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import zlib

from .errors import BuildError

ELF_MAGIC = b"\x7fELF"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b\x08"


def _offsets(blob: bytes, magic: bytes):
    start = 0
    while (i := blob.find(magic, start)) != -1:
        yield i
        start = i + 1


def _try_xz(payload: bytes) -> bytes | None:
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError:
        return None


def _try_gzip(payload: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    except zlib.error:
        return None


def _try_zstd(payload: bytes) -> bytes | None:
    tool = shutil.which("zstd")
    if tool is None:
        return None
    out = subprocess.run([tool, "-dc", "-q"], input=payload, capture_output=True, check=False)
    # zstd reports trailing garbage as an error but has written the frame: accept if ELF.
    return out.stdout or None


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF vmlinux inside ``bzimage``; BuildError if none is found."""
    if bzimage[:4] == ELF_MAGIC:
        return bzimage
    for magic, fn in ((XZ_MAGIC, _try_xz), (ZSTD_MAGIC, _try_zstd), (GZIP_MAGIC, _try_gzip)):
        for off in _offsets(bzimage, magic):
            out = fn(bzimage[off:])
            if out and out[:4] == ELF_MAGIC:
                return out
    raise BuildError("no gzip/xz/zstd payload decompressing to an ELF vmlinux found "
                          f"in the {len(bzimage)}-byte kernel image")


__all__ = ["extract_vmlinux"]
