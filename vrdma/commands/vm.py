"""``vrdma vm run``: boot a guest image under QEMU with the device on a back-end's socket.

``vrdma vm run --backend SOCK [--image DIR] [--qemu 7.2|11.1] [--machine q35|microvm]
[-- app args]`` prints the QEMU command on stderr, runs it (TCG, memfd-backed shared
guest RAM, the virtio-rdma device on the back-end's vhost-user socket, the serial
console on stdout) and exits with the application's exit status (255 if the guest
ended without reporting one, or the image or QEMU is missing; 2 for a bad option
value).  Without ``--image`` the default image is built or taken
from the cache (``vrdma image build``).  Launcher: vrdma.image.vm; docs/qemu-guests.md.
"""
from __future__ import annotations

import argparse
import signal
import sys

NAME = "vm"
HELP = "run a guest image under QEMU (vrdma vm run --backend SOCK [--image DIR] [-- app args])"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vm_command", metavar="ACTION")
    r = sub.add_parser("run", help="boot an image and run its application", description=__doc__)
    r.add_argument("--backend", metavar="SOCK", required=True, help="vhost-user socket of vrdma backend")
    r.add_argument("--image", metavar="DIR", default=None, help="image directory (default: build/cached)")
    r.add_argument("--qemu", choices=("7.2", "11.1"), default="7.2",
                   help="7.2: Debian 12 (vhost-user-blk carrier); 11.1: trixie-backports root "
                        "(vhost-user-test-device)")
    r.add_argument("--machine", choices=("q35", "microvm"), default="q35")
    r.add_argument("--memory", type=int, default=512, metavar="MIB", help="guest RAM (default 512)")
    r.add_argument("--hugepages", type=int, default=None, metavar="N", help="2 MiB huge pages (default 64)")
    r.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="kill QEMU after this")
    r.add_argument("--dry-run", action="store_true", help="print the QEMU command and exit")
    r.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments of the application (after --)")


def run(args: argparse.Namespace) -> int:
    from vrdma.image import ImageError, builder, vm

    if args.vm_command != "run":
        print("usage: vrdma vm run --backend SOCK [--image DIR] [-- app args]", file=sys.stderr)
        return 2
    app_args = list(args.app_args)
    if app_args[:1] == ["--"]:
        app_args = app_args[1:]
    try:
        image = builder.load(args.image) if args.image else builder.build(
            log=lambda msg: print(f"vrdma image: {msg}", file=sys.stderr, flush=True))
        extra = {} if args.hugepages is None else {"hugepages": args.hugepages}
        spec = vm.VmSpec(backend=args.backend, image=image, qemu=args.qemu, machine=args.machine,
                         app_args=tuple(app_args), memory_mib=args.memory, **extra)
        argv, env = vm.qemu_command(spec)
        print(f"vrdma vm run: {vm.format_command(argv, env)}", file=sys.stderr, flush=True)
        if args.dry_run:
            return 0
        # SIGTERM unwinds like Ctrl-C, so vm.run's cleanup kills the QEMU it started
        # (QEMU runs in its own session: the terminal's signals do not reach it)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        result = vm.run(spec, console=sys.stdout.buffer, timeout=args.timeout)
    except ValueError as exc:  # a bad option value: usage error
        print(f"vrdma vm run: {exc}", file=sys.stderr)
        return 2
    except ImageError as exc:
        print(f"vrdma vm run: {exc}", file=sys.stderr)
        return 255
    if result.timings:
        print("vrdma vm run: seconds from QEMU start: "
              + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()), file=sys.stderr)
    return vm.main_status(result)
