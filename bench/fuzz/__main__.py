"""``python -m bench.fuzz TARGET --count N --seed S [--json]``

Targets: ``vhost-user`` (a real daemon process over its unix socket),
``control`` and ``rings`` (device cores in this process on a LocalFabric),
``roce`` (two RoceFabrics with their real UDP endpoints on loopback, in this
process). Exit status 0 when the run found nothing, 1 otherwise; a finding
prints the seed and input index to replay.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.machine import header as machine_header, machine

from . import TARGETS, run_target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--count", type=int, default=10000, help="inputs to send (default 10000)")
    p.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--progress", action="store_true", help="print a line at every liveness check")
    p.add_argument("--no-hijack", action="store_true",
                   help="rings: no attacker QP connected to the victim's QP (co-tenant isolation aside)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) & 0xFFFFFFFF

    def progress(rep, elapsed):
        print(f"[{args.target}] {rep.count} inputs, {rep.count / elapsed:,.0f}/s, crashes {rep.crashes}, "
              f"hangs {rep.hangs}, canary {rep.canary_violations}, findings {len(rep.failures)}",
              file=sys.stderr, flush=True)

    kw = {"hijack": False} if args.no_hijack and args.target == "rings" else {}
    rep = run_target(args.target, args.count, seed, progress=progress if args.progress else None, **kw)
    if args.json:
        d = rep.as_dict()
        d["machine"] = machine()
        print(json.dumps(d, sort_keys=True))
    else:
        print(rep.summary())
        print(f"  {machine_header()[2:]}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
