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

Quota refusals: the daemon samples ``TenantLedger.quota_hits()`` the same
way (:meth:`Accounting.sample_quota_hits`); each tenant's refusals by a quota
(``max_qp``, ``max_cq``, ``max_mr``, ``max_pinned_bytes``: ENOSPC;
``max_accel_jobs``, ``accel_seconds_per_minute``: QUOTA_EXCEEDED) are rows of
op ``quota`` whose ``where`` names the quota and ``quota_hits`` counts them.

Schema (one table, one row per (interval, host, tenant, op, where))::

    usage(t_start REAL, t_end REAL, host TEXT, tenant TEXT, op TEXT, "where" TEXT,
          jobs INTEGER, failed INTEGER, accel_seconds REAL, wait_seconds REAL,
          bytes_sent INTEGER, bytes_received INTEGER, quota_hits INTEGER)

``t_start``/``t_end`` are UNIX times; ``where`` is ``local`` (run on this
host's accelerators) or ``remote`` (shipped to a peer host, its service time
as the peer reported it), or for op ``quota`` the quota's name.

Versions (``PRAGMA user_version``): 0, the first schema (no ``quota_hits``);
1, ``quota_hits`` added. :func:`connect` migrates an older database in place
(``ALTER TABLE ... ADD COLUMN``, then the version) and :func:`query` reads
either version, so an accounting.db written before keeps working.
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
    bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0,
    quota_hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_t ON usage (t_end);
"""
#: the schema's version (PRAGMA user_version); see the module doc
SCHEMA_VERSION = 1
#: what each version adds to the one before it
MIGRATIONS = {1: "ALTER TABLE usage ADD COLUMN quota_hits INTEGER NOT NULL DEFAULT 0"}
COLUMNS = ("t_start", "t_end", "host", "tenant", "op", "where", "jobs", "failed", "accel_seconds",
           "wait_seconds", "bytes_sent", "bytes_received", "quota_hits")
_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)
INSERT = f"INSERT INTO usage ({_QUOTED}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608  # constants
DEFAULT_FLUSH_SECONDS = 10.0
#: op of the quota-refusal rows
QUOTA_OP = "quota"


#: the columns of a query's summary rows
KEYS = ("host", "tenant", "op", "where", "jobs", "failed", "accel_seconds", "wait_seconds", "bytes_sent",
        "bytes_received", "quota_hits", "first", "last")
_ZERO = [0, 0, 0.0, 0.0, 0, 0, 0]  # jobs, failed, accel_seconds, wait_seconds, sent, received, quota_hits


class AccountingError(Exception):
    """A bad accounting query or database."""


def connect(path: str) -> sqlite3.Connection:
    """The database at ``path``, created or migrated to :data:`SCHEMA_VERSION`."""
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION` (idempotent: a step interrupted is redone
    or skipped next time); returns the version it had.
    A database of a newer version is refused (AccountingError naming it)."""
    with db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AccountingError(f"accounting database schema version {version} is newer than "
                                  f"this vrdma's ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            have = {r[1] for r in db.execute("PRAGMA table_info(usage)")}
            if have:  # an existing table of an older version: add what it lacks
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    if v == 1 and "quota_hits" in have:
                        continue
                    db.execute(MIGRATIONS[v])
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return version


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
        self._last_hits: dict[tuple[str, str], int] = {}
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
                v = self._pending[key] = list(_ZERO)
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
                v = self._pending[key] = list(_ZERO)
            v[4] += max(0, sent)
            v[5] += max(0, received)

    def record_quota_hits(self, tenant: str, quota: str, hits: int) -> None:
        """``hits`` more requests of ``tenant`` refused by ``quota`` (op ``quota``)."""
        if hits <= 0:
            return
        key = (tenant, QUOTA_OP, quota)
        with self._lock:
            v = self._pending.get(key)
            if v is None:
                v = self._pending[key] = list(_ZERO)
            v[6] += hits

    def sample_quota_hits(self, totals: dict[str, dict[str, int]]) -> None:
        """Record the growth of cumulative refusals per tenant and quota
        (TenantLedger.quota_hits) since the previous sample."""
        last = self._last_hits
        for tenant, quotas in totals.items():
            for quota, n in quotas.items():
                self.record_quota_hits(tenant, quota, n - last.get((tenant, quota), 0))
                last[(tenant, quota)] = n

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
        rows = [(t0, t1, self.host, tenant, op, where, *v) for (tenant, op, where), v in pending.items()]
        try:
            with self._db:
                self._db.executemany(INSERT, rows)
        except sqlite3.Error:  # keep the counts (and the interval's start) for the next flush
            with self._lock:
                self._t_start = t0
                for key, v in pending.items():
                    now = self._pending.setdefault(key, list(_ZERO))
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
           'SUM(wait_seconds), SUM(bytes_sent), SUM(bytes_received), {hits}, MIN(t_start), MAX(t_end) '
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
        try:  # read-only: a version 0 database (no quota_hits) is read as it is
            have = {r[1] for r in db.execute("PRAGMA table_info(usage)")}
            sql = sql.format(hits="SUM(quota_hits)" if "quota_hits" in have else "0")
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
        cols = keys[:11]
        table = [cols] + [tuple(cell(k, r[k]) for k in cols) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
        return "\n".join(lines) + "\n"
    raise AccountingError(f"format {fmt!r}: not csv, json or table")
