"""The default application of a guest image: ``vrdma rc-pingpong -d pci:auto ARGS``.

An ibv_rc_pingpong-compatible verbs program (:mod:`vrdma.commands.rc_pingpong`) on the
guest's virtio-rdma PCI function (``Context("pci:auto")``, the userspace virtio-pci
driver).  The arguments are the image's (the kernel command line after ``--``); a ``-d``
among them replaces ``pci:auto``.  Only the rc-pingpong command is imported, not the
whole CLI (the image carries what this file imports, nothing else).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from vrdma.commands import rc_pingpong

    parser = argparse.ArgumentParser(prog=rc_pingpong.PROG)
    rc_pingpong.add_arguments(parser)
    return int(rc_pingpong.run(parser.parse_args(["-d", "pci:auto", *argv])) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
