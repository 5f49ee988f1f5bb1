"""``vrdma perftest``: perftest's RC tests for a guest of the vrdma back-end.

``vrdma perftest {send_lat,write_lat,read_lat,send_bw,write_bw,read_bw}``
speaks perftest's own TCP exchange (port 18515) and runs its loops, so the
other side may be an unmodified ``ib_send_lat`` / ``ib_write_bw`` ... (Debian
12's perftest 4.5-0.17) on any RoCE device, or another ``vrdma perftest``.
Without a host it is the server, with one the client. ``-d`` names the
back-end's vhost-user socket (default ``$VRDMA_BACKEND``): our "device".
perftest's options that apply: ``-s -n -a -x -m -l -t -r -Q -I -o -i -p -F
--report_gbits``; ours: ``--plot FILE.png`` (latency and bandwidth against
size, for ``-a``), ``--check basic|pattern`` (verify what crossed the wire,
one ``# check`` line each; exit 1 if one fails) and ``--timeout``.

The work is in :mod:`vrdma.perftest_compat`; this module parses and prints.
"""
from __future__ import annotations

import argparse
import os
import sys

NAME = "perftest"
HELP = "perftest-compatible RC latency/bandwidth tests (server without HOST, client with it)"
TESTS = ("send_lat", "write_lat", "read_lat", "send_bw", "write_bw", "read_bw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="test", metavar="TEST", required=True)
    for test in TESTS:
        _add_options(sub.add_parser(test, help=f"ib_{test}", description=f"ib_{test} for a vrdma guest"))


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", nargs="?", default=None, help="the server to connect to (client mode)")
    p.add_argument("-d", "--ib-dev", dest="backend", default=os.environ.get("VRDMA_BACKEND"),
                   help="the vrdma back-end's vhost-user socket (default $VRDMA_BACKEND)")
    p.add_argument("-p", "--port", type=int, default=18515, help="listen on/connect to port (default 18515)")
    p.add_argument("-i", "--ib-port", type=int, default=1, help="device port (default 1)")
    p.add_argument("-s", "--size", type=int, default=0,
                   help="message size (default 2 for latency, 65536 for bandwidth)")
    p.add_argument("-n", "--iters", type=int, default=0,
                   help="iterations (default 1000 for latency, 5000 for bandwidth)")
    p.add_argument("-a", "--all", action="store_true", help="run sizes from 2 till 2^23")
    p.add_argument("-x", "--gid-index", type=int, default=0, help="local port GID index (default 0)")
    p.add_argument("-m", "--mtu", type=int, default=0, help="path MTU (default: the port's active one)")
    p.add_argument("-l", "--post_list", type=int, default=1, help="post lists of this many WRs (bw tests)")
    p.add_argument("-t", "--tx-depth", type=int, default=0, help="send queue depth (default 128 bw, 1 lat)")
    p.add_argument("-r", "--rx-depth", type=int, default=0, help="receives posted (default 512)")
    p.add_argument("-Q", "--cq-mod", type=int, default=0, help="one completion per this many sends (100)")
    p.add_argument("-I", "--inline_size", type=int, default=-1, help="max size of inline messages")
    p.add_argument("-o", "--outs", type=int, default=0, help="outstanding reads (default: the device's)")
    p.add_argument("-F", "--CPU-freq", action="store_true",
                   help="accepted for perftest compatibility (times are from the monotonic clock)")
    p.add_argument("--report_gbits", action="store_true", help="report bandwidth in Gb/s")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot latency and bandwidth against message size")
    p.add_argument("--check", choices=("basic", "pattern"), default=None,
                   help="verify what crossed the wire (pattern: both sides are vrdma perftest)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after SECONDS waiting for the peer or a completion (default: never)")


def run(args: argparse.Namespace) -> int:
    from vrdma.perftest_compat import exchange as X, oob, report
    from vrdma.perftest_compat.engine import Params, Resources, Session
    from vrdma.perftest_compat.errors import PerftestError

    try:
        if not args.backend:
            raise PerftestError("no vrdma back-end: give -d SOCKET or set VRDMA_BACKEND")
        params = Params(test=X.Test(args.test), backend=args.backend, server=args.host, port=args.port,
                        size=args.size, iters=args.iters, run_all=args.all, gid_index=args.gid_index,
                        mtu=args.mtu, post_list=args.post_list, tx_depth=args.tx_depth,
                        rx_depth=args.rx_depth, cq_mod=args.cq_mod, inline_size=args.inline_size,
                        out_reads=args.outs, ib_port=args.ib_port, report_gbits=args.report_gbits,
                        timeout=args.timeout, check=args.check)
        res = Resources(params)  # the device first, as perftest: a wrong -d fails before any connection
        try:
            if params.client:
                chan = oob.connect(args.host, args.port, timeout=args.timeout, io_timeout=args.timeout)
            else:
                print(report.WAITING, end="", flush=True)
                chan = oob.accept(args.port, timeout=args.timeout, io_timeout=args.timeout)
        except BaseException:
            res.close()
            raise
        session = Session(params, chan, res)
        session.run()
    except PerftestError as e:
        sys.stdout.flush()
        print(f" {e}", file=sys.stderr)
        return 1
    failed = False
    for c in session.checks:
        print(c.line())
        failed |= not c.ok
    if args.check:
        print(f"# counters: side-channel messages sent {chan.sent}, received {chan.received}; "
              f"receives completed {session.received}; send-queue WRs completed {session.completed}")
    if args.plot and session.results:
        try:
            report.plot(args.plot, params.test, session.results, params.report_gbits)
        except ImportError as e:
            print(f" --plot needs matplotlib: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f" cannot write the plot {args.plot!r}: {e}", file=sys.stderr)
            return 1
    return 1 if failed else 0
