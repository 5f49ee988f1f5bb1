"""vrdma.accounting without a daemon: rows per flush interval, sums per
(host, tenant, op, where), time windows, a failed flush keeps its counts,
and a file that is not a database is an error naming it."""
from __future__ import annotations

import sqlite3

import pytest

from vrdma.accounting import Accounting, AccountingError, parse_time, query, render


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
                          "accel_seconds, wait_seconds, bytes_sent, bytes_received)")
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
