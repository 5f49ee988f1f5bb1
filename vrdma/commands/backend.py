"""``vrdma backend``: run the vhost-user back-end daemon."""
from __future__ import annotations

import logging

NAME = "backend"
HELP = "run the vhost-user back-end daemon (one device instance per connection)"

log = logging.getLogger("vrdma.backend")


def add_arguments(p) -> None:
    p.add_argument("--socket", "-s", action="append", required=True, metavar="PATH",
                   help="unix socket path to listen on (repeat for several)")
    p.add_argument("--device", choices=["rdma", "blk"], default="rdma",
                   help="device to serve (rdma: virtio-rdma, ID 42; blk: virtio-blk, the transport's test device)")
    p.add_argument("--image", metavar="FILE", help="blk: back every connection with this raw image file (shared)")
    p.add_argument("--size", default="64M", help="blk: per-connection RAM disk size (default 64M)")
    p.add_argument("--boot-marker", metavar="TEXT",
                   help="blk: put a boot sector that prints TEXT on COM1 in sector 0 of each RAM disk")
    p.add_argument("--num-queues", type=int, default=1, help="blk: number of virtqueues")
    p.add_argument("--read-only", action="store_true", help="blk: refuse writes")
    p.add_argument("--poll-us", type=float, default=0.0, metavar="US",
                   help="after serving a ring, busy-poll it this long before sleeping (0: never)")
    p.add_argument("--allow-unsealed-memory", action="store_true",
                   help="accept guest memory fds that are not memfds sealed against shrinking "
                        "(e.g. hugetlbfs files); a front-end could then crash the daemon")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    mult = units.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in units else t) * mult


def make_device_factory(args):
    if args.device == "rdma":
        from virtio_rdma.device import RdmaDevice
        from virtio_rdma.fabric import LocalFabric

        fabric = LocalFabric()  # one host: every guest of this daemon shares the QPN space
        return lambda: RdmaDevice(fabric)

    from vhost_user.blk import BlkDevice, Disk

    if args.image:
        disk = Disk.file(args.image, read_only=args.read_only)
        return lambda: BlkDevice(disk, num_queues=args.num_queues)
    size = parse_size(args.size)
    init = b""
    if args.boot_marker:
        from qemu_tests.bootsector import make_boot_sector

        init = make_boot_sector(args.boot_marker.encode())

    def factory():
        disk = Disk.ram(size, init)
        disk.read_only = args.read_only
        return BlkDevice(disk, num_queues=args.num_queues, owns_disk=True)

    return factory


def run(args) -> int:
    from vhost_user.server import run_backend

    factory = make_device_factory(args)

    def ready():
        for path in args.socket:
            print(f"vrdma backend: listening on {path}", flush=True)

    return run_backend(args.socket, factory, ready=ready, poll_us=args.poll_us,
                       require_sealed_memory=not args.allow_unsealed_memory)
