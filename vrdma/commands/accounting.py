"""``vrdma accounting``: per-tenant usage from a daemon's accounting database
(vrdma.accounting; ``vrdma backend --state-dir DIR`` writes DIR/accounting.db)."""
from __future__ import annotations

import sys

NAME = "accounting"
HELP = "per-tenant accelerator usage recorded by backend --state-dir (SQLite)"


def add_arguments(p) -> None:
    p.add_argument("--db", required=True, metavar="FILE",
                   help="the accounting database (STATE_DIR/accounting.db)")
    p.add_argument("--since", metavar="TIME",
                   help="rows that ended at or after TIME: UNIX seconds, ISO 8601 (UTC unless "
                        "given), or a duration ago (90s, 15m, 2h, 7d); default: all")
    p.add_argument("--until", metavar="TIME", help="rows that ended before TIME (same forms)")
    p.add_argument("--tenant", metavar="NAME", help="only this tenant")
    p.add_argument("--format", choices=["csv", "json", "table"], default="table")


def run(args) -> int:
    from vrdma.accounting import AccountingError, parse_time, query, render

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        rows = query(args.db, since=since, until=until, tenant=args.tenant)
        sys.stdout.write(render(rows, args.format))
    except AccountingError as e:
        print(f"vrdma accounting: {e}", file=sys.stderr)
        return 1
    return 0
