"""``vrdma keygen FILE``: create a cluster key file for the authenticated
RoCE fabric (``vrdma backend --cluster-key FILE``; roce.auth)."""
from __future__ import annotations

import sys

NAME = "keygen"
HELP = "create a cluster key file (32 random bytes, mode 0600) for backend --cluster-key"


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="the key file to create (must not exist)")


def run(args) -> int:
    from roce.auth import write_key_file

    try:
        write_key_file(args.file)
    except FileExistsError:
        print(f"vrdma keygen: {args.file} exists; not overwriting a key", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vrdma keygen: {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"vrdma keygen: wrote a cluster key to {args.file}; copy it (mode 0600, owned by the "
          f"daemon's user) to every host of the cluster")
    return 0
