"""``vrdma image build``: a bootable single-application guest image (vrdma.image.builder).

Builds from Debian's own packages (kernel, busybox, CPython 3.11 with numpy) plus the
repository's modules the application imports, cached under /var/tmp/vrdma-image/<key>
and rebuilt only when an input changes; ``--out DIR`` gets a copy.  Without ``--app``
the application is ``vrdma rc-pingpong -d pci:auto`` (vrdma.image.default_app).  Prints
the image directory, its key, whether it came from the cache, and its sizes.
"""
from __future__ import annotations

import argparse
import sys

NAME = "image"
HELP = "build a single-application guest image (vrdma image build [--app FILE] [--out DIR])"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="image_command", metavar="ACTION")
    b = sub.add_parser("build", help="build (or find cached) an image", description=__doc__)
    b.add_argument("--app", metavar="FILE", default=None,
                   help="the application: a Python file (run with Debian's python3) or an executable "
                        "(default: vrdma rc-pingpong -d pci:auto)")
    b.add_argument("--out", metavar="DIR", default=None, help="copy the image into DIR")
    b.add_argument("--cache", metavar="DIR", default=None,
                   help="cache directory (default /var/tmp/vrdma-image)")


def run(args: argparse.Namespace) -> int:
    from vrdma.image import ImageError, builder

    if args.image_command != "build":
        print("usage: vrdma image build [--app FILE] [--out DIR]", file=sys.stderr)
        return 2
    try:
        image = builder.build(args.app, args.out, cache_root=args.cache or builder.CACHE_ROOT,
                              log=lambda msg: print(f"vrdma image: {msg}", file=sys.stderr, flush=True))
    except ImageError as exc:
        print(f"vrdma image build: {exc}", file=sys.stderr)
        return 1
    sizes = image.manifest["sizes"]
    print(f"image {image.directory}")
    print(f"key {image.key} ({'cache hit' if image.cached else 'built'})")
    print(f"vmlinux {sizes['vmlinux']} bytes, initramfs {sizes['initramfs_cpio']} bytes")
    return 0
