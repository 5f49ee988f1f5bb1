"""vrdma.accounting without a daemon: rows per flush interval, sums per
(host, tenant, op, where), quota refusals per tenant and quota, time windows,
a failed flush keeps its counts, a database of the first schema is migrated
(and read as it is, read-only), and a file that is not a database is an error
naming it."""
from __future__ import annotations

import sqlite3

import pytest

from vrdma.accounting import SCHEMA_VERSION, Accounting, AccountingError, connect, parse_time, query, render


def test_flushes_sum_per_tenant_op_and_where(tmp_path):
    db = str(tmp_path / "a.db")
    t = [100.0]
    acc = Accounting(db, "h1", clock=lambda: t[0])
    acc.record_job("a", "fft", "local", True, 0.5, 0.1)
    acc.record_job("a", "fft", "local", False, 0.25, 0.0)
    acc.record_job("b", "turbo_decode", "remote", True, 2.0, 0.5)
    acc.sample_bytes({"a": (10, 20)})
    acc.sample_bytes({"a": (15, 20)})
    t[0] = 110.0
    assert acc.flush() == 3
    acc.record_job("a", "fft", "local", True, 1.0, 0.0)
    t[0] = 120.0
    acc.close()
    rows = {(r["tenant"], r["op"], r["where"]): r for r in query(db)}
    a = rows[("a", "fft", "local")]
    assert (a["jobs"], a["failed"], a["accel_seconds"], a["first"], a["last"]) == (3, 1, 1.75, 100.0, 120.0)
    assert rows[("a", "rdma", "local")]["bytes_sent"] == 15 and rows[("a", "rdma", "local")]["bytes_received"] == 20
    assert rows[("b", "turbo_decode", "remote")]["wait_seconds"] == 0.5
    assert [r["jobs"] for r in query(db, since=115.0, tenant="a")] == [1]  # only the second flush's row
    assert query(db, until=105.0) == []
    assert "h1,a,fft,local,3,1,1.75" in render(query(db), "csv")


def test_a_failed_flush_keeps_its_counts(tmp_path):
    acc = Accounting(str(tmp_path / "a.db"), "h")
    acc.record_job("a", "fft", "local", True, 1.0, 0.0)
    acc._db.execute("DROP TABLE usage")
    with pytest.raises(sqlite3.Error):
        acc.flush()
    acc._db.executescript("CREATE TABLE usage (t_start, t_end, host, tenant, op, 'where', jobs, failed, "
                          "accel_seconds, wait_seconds, bytes_sent, bytes_received, quota_hits)")
    acc.record_job("a", "fft", "local", True, 1.0, 0.0)
    assert acc.flush() == 1
    acc.close()
    assert query(str(tmp_path / "a.db"))[0]["jobs"] == 2


def test_bad_database_times_and_formats_are_errors_naming_them(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(AccountingError, match="bad.db"):
        query(str(bad))
    with pytest.raises(AccountingError, match="'soon'"):
        parse_time("soon")
    with pytest.raises(AccountingError, match="'xml'"):
        render([], "xml")
    assert parse_time("2h", now=10000.0) == 2800.0
    assert parse_time("1970-01-01T00:01:00") == 60.0
    assert parse_time("12.5") == 12.5


def test_quota_refusals_are_rows_per_tenant_and_quota(tmp_path):
    import json

    db = str(tmp_path / "a.db")
    t = [100.0]
    acc = Accounting(db, "h1", clock=lambda: t[0])
    acc.sample_quota_hits({"a": {"max_cq": 2, "accel_seconds_per_minute": 1}})
    t[0] = 110.0
    acc.flush()
    acc.sample_quota_hits({"a": {"max_cq": 5, "accel_seconds_per_minute": 1}, "b": {"max_accel_jobs": 4}})
    t[0] = 120.0
    acc.close()
    rows = {(r["tenant"], r["op"], r["where"]): r["quota_hits"] for r in query(db)}
    assert rows == {("a", "quota", "accel_seconds_per_minute"): 1, ("a", "quota", "max_cq"): 5,
                    ("b", "quota", "max_accel_jobs"): 4}
    assert "h1,a,quota,max_cq,0,0,0.0,0.0,0,0,5," in render(query(db), "csv")
    got = json.loads(render(query(db, tenant="b"), "json"))
    assert [(r["where"], r["quota_hits"]) for r in got] == [("max_accel_jobs", 4)]


OLD_SCHEMA = """CREATE TABLE usage (
    t_start REAL NOT NULL, t_end REAL NOT NULL, host TEXT NOT NULL, tenant TEXT NOT NULL,
    op TEXT NOT NULL, "where" TEXT NOT NULL, jobs INTEGER NOT NULL, failed INTEGER NOT NULL,
    accel_seconds REAL NOT NULL, wait_seconds REAL NOT NULL,
    bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0);
CREATE INDEX usage_t ON usage (t_end);
INSERT INTO usage VALUES (1.0, 2.0, 'h0', 'old', 'fft', 'local', 3, 0, 0.5, 0.1, 0, 0);
"""


def test_a_first_schema_database_is_read_then_migrated(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.close()
    # read-only, as it is: no quota_hits column, read as 0
    (r,) = query(path)
    assert (r["tenant"], r["jobs"], r["quota_hits"]) == ("old", 3, 0)
    # a daemon opens it: migrated in place, old rows kept, new rows with quota_hits
    acc = Accounting(path, "h1")
    acc.record_job("new", "fft", "local", True, 1.0, 0.0)
    acc.sample_quota_hits({"new": {"max_qp": 2}})
    acc.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    rows = {(r["tenant"], r["op"]): r for r in query(path)}
    assert rows[("old", "fft")]["jobs"] == 3 and rows[("new", "fft")]["jobs"] == 1
    assert rows[("new", "quota")]["quota_hits"] == 2 and rows[("old", "fft")]["quota_hits"] == 0
    connect(path).close()  # again: nothing left to migrate
    # a database from a newer vrdma is refused, naming its version
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(AccountingError, match=f"version {SCHEMA_VERSION + 1}"):
        connect(path)
