"""``vrdma rc-pingpong``: ibv_rc_pingpong for a guest of the vrdma back-end.

Same options (short and long names, defaults, C ``strtol`` number parsing),
same TCP exchange, same output lines and exit codes as rdma-core's
``ibv_rc_pingpong``, so either side can be the real program. Without a
``servername`` it is the server; with one, the client. ``--backend`` (or
``VRDMA_BACKEND``) names the vhost-user socket of the back-end whose device
this guest uses; ``-d`` is accepted but only informational (the back-end
serves one device), except ``-d pci:auto`` / ``-d pci:<address>`` without
``--backend``: the device's PCI function inside a QEMU guest
(guest_lib's virtio-pci driver); the device has only port 1. ``--timeout`` bounds
every wait, which rc_pingpong does not do (default: wait for a client and
for completions forever, give the address exchange 30 s).

The work is in :mod:`vrdma.rc_pingpong`; this module parses, prints and
maps every failure to exit status 1.
"""
from __future__ import annotations

import argparse
import os
import string
import sys

NAME = "rc-pingpong"
HELP = "ibv_rc_pingpong-compatible RC ping-pong (server without SERVERNAME, client with it)"
PROG = "vrdma rc-pingpong"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Numbers stay strings here: run() parses them as rc_pingpong's strtol does.
    p.add_argument("-p", "--port", default="18515", help="listen on/connect to port <port> (default 18515)")
    p.add_argument("-d", "--ib-dev", default=None,
                   help="use IB device <dev> (informational: the back-end's device)")
    p.add_argument("-i", "--ib-port", default="1", help="use port <port> of IB device (default 1)")
    p.add_argument("-s", "--size", default="4096", help="size of message to exchange (default 4096)")
    p.add_argument("-m", "--mtu", default="1024", help="path MTU (default 1024)")
    p.add_argument("-r", "--rx-depth", default="500",
                   help="number of receives to post at a time (default 500)")
    p.add_argument("-n", "--iters", default="1000", help="number of exchanges (default 1000)")
    p.add_argument("-l", "--sl", default="0", help="service level value")
    p.add_argument("-e", "--events", action="count", default=0, help="sleep on CQ events (default poll)")
    p.add_argument("-g", "--gid-idx", default="-1", help="local port gid index")
    p.add_argument("-o", "--odp", action="store_true", help="use on demand paging (not supported)")
    p.add_argument("-O", "--iodp", action="store_true", help="use implicit on demand paging (not supported)")
    p.add_argument("-P", "--prefetch", action="store_true", help="prefetch an ODP MR")
    p.add_argument("-t", "--ts", action="store_true", help="get CQE with timestamp (not supported)")
    p.add_argument("-c", "--chk", action="store_true", help="validate received buffer")
    p.add_argument("-j", "--dm", action="store_true", help="use device memory (not supported)")
    p.add_argument("-N", "--new_send", action="store_true",
                   help="use new post send WR API (same posting here)")
    p.add_argument("-U", "--allow-cc-unprotected", action="store_true",
                   help="allow allocation of unprotected/shared memory on CoCo guests (not supported)")
    p.add_argument("--backend", metavar="SOCKET", default=os.environ.get("VRDMA_BACKEND"),
                   help="vhost-user socket of the vrdma back-end (default: $VRDMA_BACKEND)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after SECONDS waiting for a client, the peer's address or a completion")
    p.add_argument("servername", nargs="*", help="connect to the server at this host (client mode)")


def usage(argv0: str = PROG) -> str:
    return "\n".join([
        "Usage:",
        f"  {argv0}            start a server and wait for connection",
        f"  {argv0} <host>     connect to server at <host>",
        "",
        "Options:",
        "  -p, --port=<port>      listen on/connect to port <port> (default 18515)",
        "  -d, --ib-dev=<dev>     use IB device <dev> (default first device found)",
        "  -i, --ib-port=<port>   use port <port> of IB device (default 1)",
        "  -s, --size=<size>      size of message to exchange (default 4096)",
        "  -m, --mtu=<size>       path MTU (default 1024)",
        "  -r, --rx-depth=<dep>   number of receives to post at a time (default 500)",
        "  -n, --iters=<iters>    number of exchanges (default 1000)",
        "  -l, --sl=<sl>          service level value",
        "  -e, --events           sleep on CQ events (default poll)",
        "  -g, --gid-idx=<gid index> local port gid index",
        "  -o, --odp\t\t    use on demand paging",
        "  -O, --iodp\t\t    use implicit on demand paging",
        "  -P, --prefetch\t    prefetch an ODP MR",
        "  -t, --ts\t            get CQE with timestamp",
        "  -c, --chk\t            validate received buffer",
        "  -j, --dm\t            use device memory",
        "  -N, --new_send            use new post send WR API",
        "  -U, --allow-cc-unprotected  allow allocation of unprotected/shared",
        "                            memory on CoCo guests",
        "  --backend=<socket>     vhost-user socket of the vrdma back-end (default $VRDMA_BACKEND)",
        "  --timeout=<seconds>    give up waiting after <seconds> (default: never, 30 s for the exchange)",
    ])


def c_strtol(text: str) -> int:
    """strtol(text, NULL, 0): optional sign, 0x hex / 0 octal / decimal, the
    longest valid prefix; 0 when there is none."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s[:1] in ("+", "-"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s[:2] in ("0x", "0X") and s[2:3] and s[2] in string.hexdigits:
        base, s = 16, s[2:]
    elif s[:1] == "0":
        base = 8
    else:
        base = 10
    valid = string.hexdigits if base == 16 else string.digits[:base]
    n = 0
    while n < len(s) and s[n] in valid:
        n += 1
    return sign * int(s[:n], base) if n else 0


def c_uint(v: int) -> int:
    """The value as C's unsigned int keeps it."""
    return v & 0xFFFFFFFF


def c_int(v: int) -> int:
    """The value as C's int keeps it."""
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


class _Usage(Exception):
    pass


def parse_config(args):
    """(Config, servername or None, TCP port) from the parsed arguments, with
    rc_pingpong's range checks; raises _Usage where it prints its usage."""
    from vrdma.rc_pingpong.pingpong import Config, mtu_to_enum

    port = c_uint(c_strtol(args.port))
    ib_port = c_int(c_strtol(args.ib_port))
    mtu = mtu_to_enum(c_int(c_strtol(args.mtu)))
    if port > 65535 or ib_port < 1 or mtu == 0 or len(args.servername) > 1:
        raise _Usage
    backend = args.backend
    if not backend and args.ib_dev and args.ib_dev.startswith("pci:"):  # the device inside a QEMU guest
        backend = args.ib_dev
    cfg = Config(backend=backend, ib_devname=args.ib_dev, ib_port=ib_port,
                 size=c_uint(c_strtol(args.size)),
                 mtu=mtu, rx_depth=c_uint(c_strtol(args.rx_depth)), iters=c_uint(c_strtol(args.iters)),
                 sl=c_int(c_strtol(args.sl)), use_event=args.events > 0, gidx=c_int(c_strtol(args.gid_idx)),
                 validate_buf=args.chk, use_odp=args.odp or args.iodp, implicit_odp=args.iodp, use_ts=args.ts,
                 use_dm=args.dm, allow_cc_unprotected=args.allow_cc_unprotected, timeout=args.timeout)
    return cfg, (args.servername[0] if args.servername else None), port, args.prefetch


def _check_combinations(cfg, prefetch: bool):
    from vrdma.rc_pingpong.errors import PingpongError

    if cfg.use_odp and cfg.use_dm:
        raise PingpongError("DM memory region can't be on demand")
    if cfg.allow_cc_unprotected and cfg.use_odp:
        raise PingpongError("CoCo unprotected memory cannot be used with ODP")
    if cfg.allow_cc_unprotected and cfg.use_dm:
        raise PingpongError("CoCo unprotected memory cannot be used with device memory")
    if not cfg.use_odp and prefetch:
        raise PingpongError("prefetch is valid only with on-demand memory region")
    if not cfg.backend:
        raise PingpongError("No IB devices found",
                            "no vrdma back-end: give --backend SOCKET or set VRDMA_BACKEND")


def result_lines(size: int, iters: int, usec: float) -> list[str]:
    """The two summary lines, with C's arithmetic (bytes as long long, the
    rest in double, division by zero giving inf or nan)."""

    def div(a: float, b: float) -> float:
        if b:
            return a / b
        return float("nan") if not a else float("inf") if a > 0 else float("-inf")

    nbytes = size * iters * 2
    return [f"{nbytes} bytes in {usec / 1000000.:.2f} seconds = {div(nbytes * 8., usec):.2f} Mbit/sec",
            f"{c_int(iters)} iters in {usec / 1000000.:.2f} seconds = {div(usec, iters):.2f} usec/iter"]


def _address_line(label: str, dest) -> str:
    return f"  {label} LID 0x{dest.lid:04x}, QPN 0x{dest.qpn:06x}, PSN 0x{dest.psn:06x}, GID {dest.gid_text}"


def _pingpong(cfg, servername: str | None, port: int, prefetch: bool) -> int:
    from guest_lib.endpoint import new_psn
    from vrdma.rc_pingpong import oob
    from vrdma.rc_pingpong.errors import SetupError
    from vrdma.rc_pingpong.pingpong import PingpongContext

    _check_combinations(cfg, prefetch)
    io_timeout = oob.IO_TIMEOUT if cfg.timeout is None else cfg.timeout
    with PingpongContext(cfg) as pp:
        routs = pp.post_recv(cfg.rx_depth)
        if routs < cfg.rx_depth:
            raise SetupError(f"Couldn't post receive ({routs})")
        if cfg.use_event:
            pp.req_notify()
        # rc_pingpong: lrand48() & 0xffffff, seeded with getpid() * time(NULL);
        # ours comes from a cryptographic source, which no local process can replay
        my_dest = pp.local_dest(cfg.gidx, new_psn())
        print(_address_line("local address: ", my_dest), flush=True)

        def connect(rem):
            pp.connect(rem, my_dest.psn, cfg.mtu, cfg.sl, cfg.gidx)

        if servername:
            rem_dest = oob.client_exchange(servername, port, my_dest, timeout=io_timeout)
        else:
            rem_dest = oob.server_exchange(port, my_dest, connect, accept_timeout=cfg.timeout,
                                           timeout=io_timeout)
        print(_address_line("remote address:", rem_dest), flush=True)
        if servername:
            connect(rem_dest)
        result = pp.pingpong(routs, client=bool(servername))
        lines = result_lines(cfg.size, cfg.iters, result.usec)
        if servername and cfg.validate_buf:  # rc_pingpong validates on the client only
            lines += [f"invalid data in page {page}" for page in pp.invalid_pages()]
        print("\n".join(lines), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from vrdma.rc_pingpong.errors import PingpongError

    try:
        cfg, servername, port, prefetch = parse_config(args)
    except _Usage:
        print(usage(), flush=True)
        return 1
    try:
        return _pingpong(cfg, servername, port, prefetch)
    except PingpongError as e:
        sys.stdout.flush()
        for line in e.lines():
            print(line, file=sys.stderr)
        return 1
