"""Accounting: what each tenant used on this host, persisted in SQLite (issue #18).

Per tenant and per host: jobs run (local / remote, succeeded / failed), the
accelerator-seconds they took by operation, and the queue wait they saw. The
daemon's event loop calls :meth:`Accounting.record_job` (a dict update under a
lock, nothing else); a flusher thread moves the accumulated counts into the
database every ``flush_seconds`` and at :meth:`close` (daemon exit), so no
disk write is ever on the loop's hot path. The database (``accounting.db``
under ``vrdma backend --state-dir``) is in WAL mode: ``vrdma accounting``
reads it while the daemon writes, and it survives daemon restarts (rows
accumulate; each row covers one flush interval).

RDMA bytes: the daemon samples its tenants' devices' counters on its loop
(:meth:`Accounting.sample_bytes` with ``TenantLedger.rdma_bytes()``) and
records their growth as rows of op ``rdma``.

Schema (one table, one row per (interval, host, tenant, op, where))::

    usage(t_start REAL, t_end REAL, host TEXT, tenant TEXT, op TEXT, "where" TEXT,
          jobs INTEGER, failed INTEGER, accel_seconds REAL, wait_seconds REAL,
          bytes_sent INTEGER, bytes_received INTEGER)

``t_start``/``t_end`` are UNIX times; ``where`` is ``local`` (run on this
host's accelerators) or ``remote`` (shipped to a peer host, its service time
as the peer reported it).
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

SCHEMA = """CREATE TABLE IF NOT EXISTS usage (
    t_start REAL NOT NULL, t_end REAL NOT NULL, host TEXT NOT NULL, tenant TEXT NOT NULL,
    op TEXT NOT NULL, "where" TEXT NOT NULL, jobs INTEGER NOT NULL, failed INTEGER NOT NULL,
    accel_seconds REAL NOT NULL, wait_seconds REAL NOT NULL,
    bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_t ON usage (t_end);
"""
COLUMNS = ("t_start", "t_end", "host", "tenant", "op", "where", "jobs", "failed", "accel_seconds",
           "wait_seconds", "bytes_sent", "bytes_received")
INSERT = "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # one ? per column of COLUMNS
DEFAULT_FLUSH_SECONDS = 10.0


#: the columns of a query's summary rows
KEYS = ("host", "tenant", "op", "where", "jobs", "failed", "accel_seconds", "wait_seconds", "bytes_sent",
        "bytes_received", "first", "last")


class AccountingError(Exception):
    """A bad accounting query or database."""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


class Accounting:
    """Per-tenant usage accumulated in memory, flushed to SQLite by a thread."""

    def __init__(self, path: str, host: str, *, flush_seconds: float = DEFAULT_FLUSH_SECONDS,
                 clock=time.time):
        self.path = path
        self.host = host
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._db = connect(path)
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], list] = {}
        self._t_start = clock()
        self._last_bytes: dict[str, tuple[int, int]] = {}
        self.flushes = 0
        self.rows_written = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Flush periodically in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vrdma-accounting", daemon=True)
            self._thread.start()

    def record_job(self, tenant: str, op: str, where: str, ok: bool, accel_seconds: float,
                   wait_seconds: float) -> None:
        """One job of ``tenant`` ended (any thread; cheap)."""
        key = (tenant, op, where)
        with self._lock:
            v = self._pending.get(key)
            if v is None:
                v = self._pending[key] = [0, 0, 0.0, 0.0, 0, 0]
            v[0] += 1
            v[1] += 0 if ok else 1
            v[2] += max(0.0, accel_seconds)
            v[3] += max(0.0, wait_seconds)

    def record_bytes(self, tenant: str, sent: int, received: int) -> None:
        """RDMA bytes ``tenant``'s devices moved since the last call (op ``rdma``)."""
        if sent <= 0 and received <= 0:
            return
        key = (tenant, "rdma", "local")
        with self._lock:
            v = self._pending.get(key)
            if v is None:
                v = self._pending[key] = [0, 0, 0.0, 0.0, 0, 0]
            v[4] += max(0, sent)
            v[5] += max(0, received)

    def sample_bytes(self, totals: dict[str, tuple[int, int]]) -> None:
        """Record the growth of cumulative per-tenant byte ``totals`` (TenantLedger.rdma_bytes)
        since the previous sample."""
        last = self._last_bytes
        for tenant, (s, r) in totals.items():
            s0, r0 = last.get(tenant, (0, 0))
            self.record_bytes(tenant, s - s0, r - r0)
            last[tenant] = (s, r)

    def flush(self) -> int:
        """Write what accumulated since the last flush (one transaction); rows written."""
        with self._lock:
            pending, self._pending = self._pending, {}
            t0, t1 = self._t_start, self._clock()
            self._t_start = t1
        if not pending:
            return 0
        rows = [(t0, t1, self.host, tenant, op, where, v[0], v[1], v[2], v[3], v[4], v[5])
                for (tenant, op, where), v in pending.items()]
        try:
            with self._db:
                self._db.executemany(INSERT, rows)
        except sqlite3.Error:  # keep the counts (and the interval's start) for the next flush
            with self._lock:
                self._t_start = t0
                for key, v in pending.items():
                    now = self._pending.setdefault(key, [0, 0, 0.0, 0.0, 0, 0])
                    for i, x in enumerate(v):
                        now[i] += x
            raise
        self.flushes += 1
        self.rows_written += len(rows)
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except sqlite3.Error as e:  # keep the counts: they go with the next flush
                log.warning("accounting flush to %s failed: %s", self.path, e)

    def close(self) -> None:
        """Stop the flusher, flush the rest, close the database (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._db is not None:
            try:
                self.flush()
            finally:
                self._db.close()
                self._db = None  # type: ignore[assignment]


def query(path: str, *, since: float | None = None, until: float | None = None,
          tenant: str | None = None) -> list[dict]:
    """Usage summed per (host, tenant, op, where) over rows that ended in [since, until)."""
    import os

    if not os.path.exists(path):
        raise AccountingError(f"accounting database {path}: no such file")
    sql = ('SELECT host, tenant, op, "where", SUM(jobs), SUM(failed), SUM(accel_seconds), '
           'SUM(wait_seconds), SUM(bytes_sent), SUM(bytes_received), MIN(t_start), MAX(t_end) '
           'FROM usage WHERE 1=1')
    args: list = []
    if since is not None:
        sql += " AND t_end >= ?"
        args.append(since)
    if until is not None:
        sql += " AND t_end < ?"
        args.append(until)
    if tenant is not None:
        sql += " AND tenant = ?"
        args.append(tenant)
    sql += ' GROUP BY host, tenant, op, "where" ORDER BY host, tenant, op, "where"'
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            out = db.execute(sql, args).fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise AccountingError(f"accounting database {path}: {e}") from None
    return [dict(zip(KEYS, r, strict=True)) for r in out]


def parse_time(text: str, now: float | None = None) -> float:
    """A UNIX time from ``text``: seconds since the epoch, an ISO 8601 date/time
    (UTC unless it says), or a duration ago: ``90s``, ``15m``, ``2h``, ``7d``."""
    from datetime import UTC, datetime

    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t and t[-1] in units:
        try:
            n = float(t[:-1])
        except ValueError:
            n = -1.0
        if n >= 0:
            return now - n * units[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(t)
    except ValueError:
        raise AccountingError(f"time {text!r}: not a UNIX time, an ISO 8601 time or a duration "
                              "like 15m / 2h / 7d") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def render(rows: Iterable[dict], fmt: str) -> str:
    """``csv``, ``json`` or ``table``."""
    import csv
    import io
    import json

    rows = list(rows)
    keys = KEYS
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    if fmt == "table":
        def cell(k, v):
            return f"{v:.6f}" if isinstance(v, float) and k in ("accel_seconds", "wait_seconds") else str(v)
        cols = keys[:10]
        table = [cols] + [tuple(cell(k, r[k]) for k in cols) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
        return "\n".join(lines) + "\n"
    raise AccountingError(f"format {fmt!r}: not csv, json or table")
