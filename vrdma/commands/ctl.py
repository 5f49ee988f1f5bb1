"""``vrdma ctl``: ask a running daemon through its admin socket (vrdma.ops.admin)."""
from __future__ import annotations

import json
import sys
import time

NAME = "ctl"
HELP = "query or control a running daemon through its admin socket (docs/operations.md)"


def add_arguments(p) -> None:
    p.add_argument("--admin-socket", "-a", required=True, metavar="PATH",
                   help="the daemon's admin socket (backend --admin-socket; default SOCKET.admin)")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    sub = p.add_subparsers(dest="ctl", metavar="WHAT", required=True)
    for name, text in (("health", "the daemon's state, uptime, connections and drain state"),
                       ("guests", "connected guests (uid, pid, object counts)"),
                       ("qps", "every guest's QPs"), ("queues", "every guest's accelerator queues"),
                       ("jobs", "guests' accelerator jobs not yet completed"),
                       ("peers", "peer hosts: link, load-table row age, jobs"),
                       ("tenants", "tenants: class, weight, quotas, which are live overrides (LIVE)"),
                       ("undrain", "take remote work again")):
        sub.add_parser(name, help=text)
    c = sub.add_parser("cancel", help="cancel a queued job (its guest gets a CANCELLED CQE)")
    c.add_argument("job", metavar="JOB", help="a job id from 'vrdma ctl jobs' (CONN.AQN.WR_ID)")
    d = sub.add_parser("drain", help="stop taking remote work; with --wait, return once drained")
    d.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="poll until drained or this many seconds passed (exit 1 if not drained)")
    t = sub.add_parser("tenant", help="tenant settings")
    ts = t.add_subparsers(dest="tenant_cmd", metavar="set|reset", required=True)
    s = ts.add_parser("set", help="change a tenant live: class, weight and quotas (that tenant: "
                      "overrides of its file entry, kept across SIGHUP reloads and, with --state-dir, "
                      "restarts, until 'tenant reset'); TenantPolicy limits (--limit: every "
                      "connection, until the next reload)")
    s.add_argument("uid", metavar="UID|NAME",
                   help="a uid (its [[tenant]] entry, else tenant uid:N) or a tenant name")
    s.add_argument("--weight", type=float, help="weight within its class on the accelerators")
    s.add_argument("--class", dest="klass", choices=("high", "normal", "low"), help="priority class")
    s.add_argument("--quota", action="append", default=[], metavar="NAME=VALUE",
                   help="a quota (max_qp, max_cq, max_mr, max_pinned_bytes, max_accel_jobs, "
                        "accel_seconds_per_minute); VALUE 'none' removes it (repeatable)")
    s.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="a TenantPolicy limit, e.g. max_qp=64 (repeatable)")
    r = ts.add_parser("reset", help="drop a tenant's live overrides (its file entry applies again)")
    r.add_argument("uid", nargs="?", metavar="UID|NAME", help="a uid or a tenant name")
    r.add_argument("--all", action="store_true", help="every tenant's overrides")


def request(args) -> tuple[str, dict]:
    """The admin command and arguments ``args`` ask for."""
    if args.ctl == "cancel":
        return "cancel", {"job": args.job}
    if args.ctl == "tenant" and args.tenant_cmd == "reset":
        if args.all == (args.uid is not None):
            raise SystemExit("vrdma ctl tenant reset: give UID|NAME or --all")
        if args.all:
            return "tenant_reset", {"all": True}
        return "tenant_reset", {"uid": int(args.uid)} if args.uid.isdigit() else {"tenant": args.uid}
    if args.ctl == "tenant":
        fields: dict = {"uid": int(args.uid)} if args.uid.isdigit() else {"tenant": args.uid}
        fields.update({k: v for k, v in (("weight", args.weight), ("class", args.klass)) if v is not None})
        quotas: dict = {}
        for item in args.quota:
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"vrdma ctl: --quota {item!r}: expected NAME=VALUE")
            try:
                quotas[name.strip()] = None if value.strip() == "none" else float(value)
            except ValueError:
                raise SystemExit(f"vrdma ctl: --quota {item!r}: {value!r} is not a number") from None
            if quotas[name.strip()] is not None and name.strip() != "accel_seconds_per_minute":
                quotas[name.strip()] = int(quotas[name.strip()])
        if quotas:
            fields["quota"] = quotas
        for item in args.limit:
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"vrdma ctl: --limit {item!r}: expected NAME=VALUE")
            from vrdma.commands.backend import parse_size

            try:
                fields[name.strip()] = parse_size(value)
            except ValueError:
                raise SystemExit(f"vrdma ctl: --limit {item!r}: {value!r} is not a number") from None
        return "tenant_set", fields
    return args.ctl, {}


def run(args) -> int:
    from vrdma.ops.admin import AdminClient
    from vrdma.ops.wire import AdminError, RemoteError

    cmd, fields = request(args)
    try:
        with AdminClient(args.admin_socket) as c:
            result = c.call(cmd, **fields)
            if cmd == "drain" and args.wait > 0:
                end = time.monotonic() + args.wait
                while result["state"] != "drained" and time.monotonic() < end:
                    time.sleep(0.2)
                    result = c.call("health")["drain"]
    except RemoteError as e:
        print(f"vrdma ctl {cmd}: {e.kind}: {e}", file=sys.stderr)
        return 3 if e.kind == "not_supported" else 1
    except (AdminError, OSError) as e:
        print(f"vrdma ctl: {args.admin_socket}: {e}", file=sys.stderr)
        return 1
    if args.json or not isinstance(result, list):
        print(json.dumps(result, indent=1, default=str))
    else:
        print_table(result)
    if cmd == "drain" and args.wait > 0 and result["state"] != "drained":
        return 1
    return 0


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols))
