"""Implementations of :class:`guest_lib.transport.VirtioTransport`.

* :mod:`guest_lib.transports.vhost_user`: a process guest as its own
  vhost-user front-end (the transport ``Context(path)`` opens).
* :mod:`guest_lib.transports.virtio_pci`: a userspace virtio-pci driver in a
  Linux (QEMU) guest (``Context("pci:auto")``), over
  :mod:`~guest_lib.transports.pci` (sysfs, BARs, uio, the capability walker)
  and :mod:`~guest_lib.transports.hugemem` (pinned huge pages, pagemap).
* :mod:`guest_lib.transports.virtio_mmio`: a userspace virtio-mmio driver in
  a QEMU microvm guest (``Context("mmio:auto")``), registers from /dev/mem.
* :mod:`guest_lib.transports.userspace`: what the two userspace drivers share
  (memory, rings, features, ACK_FEATURES, waits, liveness, close).
"""
