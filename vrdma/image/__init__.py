"""Single-application guest images and the VMs that run them.

``vrdma image build`` (:mod:`vrdma.image.builder`) makes a bootable image from Debian's
own packages (the distribution kernel booted directly through PVH, busybox, CPython 3.11
with numpy, the repository's guest-side packages the application imports, one
application started by /init as its only job); ``vrdma vm run`` (:mod:`vrdma.image.vm`)
boots it under QEMU 7.2 (Debian 12) or 11.1 (trixie-backports, from a trixie root made
with mmdebstrap) with the virtio-rdma device on a back-end daemon's vhost-user socket,
and returns the application's exit status.  The guest-side device check the tests run is
:mod:`vrdma.image.probe`.  docs/qemu-guests.md describes both.
"""
from __future__ import annotations

from .builder import CACHE_ROOT, Image, build, load
from .errors import BuildError, ImageError, LaunchError, ToolMissing

__all__ = ["CACHE_ROOT", "BuildError", "Image", "ImageError", "LaunchError", "ToolMissing", "build", "load"]
