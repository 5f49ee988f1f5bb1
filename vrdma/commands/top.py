"""``vrdma top``: a live terminal view of a daemon (guests, queues, peers,
accelerators), refreshed from its admin socket (vrdma.ops.admin)."""
from __future__ import annotations

import sys
import time

NAME = "top"
HELP = "live view of a running daemon's guests, queues, accelerators and peers"


def add_arguments(p) -> None:
    p.add_argument("--admin-socket", "-a", required=True, metavar="PATH",
                   help="the daemon's admin socket")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (no live screen)")


def render(status: dict):
    """The frame of one ``status`` answer (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table

    h = status["health"]
    d = h["drain"]
    head = Table.grid(padding=(0, 2))
    left = f" ({d['remote_jobs_left']} left)" if d["state"] == "draining" else ""
    head.add_row(f"pid {h['pid']}", f"up {h['uptime_seconds']:.0f} s", f"{h['connections']} connections",
                 f"drain: {d['state']}{left}")
    parts = [head]
    for title, rows, cols in (
            ("guests", status["guests"], ("name", "uid", "pid", "qps", "cqs", "mrs", "aqs", "completions")),
            ("accelerators", status["accelerators"],
             ("name", "workers", "queue_depth", "running", "utilization")),
            ("accelerator queues", status["queues"], ("guest", "aqn", "op", "depth", "in_flight",
                                                      "jobs_posted", "jobs_completed")),
            ("peers", status["peers"], ("addr", "host", "link", "in_table", "row_age_seconds", "in_flight",
                                        "serving", "jobs_refused"))):
        t = Table(title=f"{title} ({len(rows)})", title_justify="left", expand=False)
        for c in cols:
            t.add_column(c)
        for r in rows[:50]:
            t.add_row(*(_fmt(r.get(c)) for c in cols))
        parts.append(t)
    return Group(*parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def run(args) -> int:
    from rich.console import Console
    from rich.live import Live

    from vrdma.ops.admin import AdminClient
    from vrdma.ops.wire import AdminError

    try:
        with AdminClient(args.admin_socket) as c:
            if args.once:
                Console().print(render(c.call("status")))
                return 0
            with Live(render(c.call("status")), auto_refresh=False) as live:
                while True:
                    time.sleep(max(0.1, args.interval))
                    live.update(render(c.call("status")), refresh=True)
    except KeyboardInterrupt:
        return 0
    except (AdminError, OSError) as e:
        print(f"vrdma top: {args.admin_socket}: {e}", file=sys.stderr)
        return 1
