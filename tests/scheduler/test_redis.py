"""The Redis backend (scheduler.redis_table) against a real redis-server the
test starts on a unix socket: rows flow between exchanges (keys with a TTL of
3 periods, pub/sub, a late joiner reads every row at once), bad rows written
straight into Redis are ignored and counted, and a killed and restarted
redis-server is an outage the exchange reports (once) while keeping its table,
then reconnects and resumes."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from scheduler.exchange import LoadExchange
from scheduler.gossip import REASONS, DisseminationError
from scheduler.redis_table import RedisBackend, load_channel, load_key
from scheduler.table import DROP_AFTER_PERIODS, LoadRow, LoadTable
from scheduler.wire import encode_load
from tests.scheduler.test_gossip import ADDR, HOST, KEY, OTHER, PERIOD, row, run, wait_for
from tests.scheduler.test_wire import kind, signed

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="no redis-server on this machine")
CLUSTER = "t1"


class RedisServer:
    """One redis-server on a unix socket in ``workdir``, no persistence; restartable."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = str(workdir / "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        assert REDIS is not None and self.proc is None
        self.proc = subprocess.Popen(
            [REDIS, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while True:
            try:
                with redis.Redis(unix_socket_path=self.sock) as r:
                    r.ping()
                return
            except (redis.ConnectionError, FileNotFoundError):
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            p.kill()
            p.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.sock)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.kill()


class Host:
    def __init__(self, hid: int, url: str, accel: bool = True) -> None:
        self.hid, self.accel, self.queued = hid, accel, 0.0
        self.table = LoadTable(PERIOD)
        self.backend = RedisBackend(url, CLUSTER, backoff=(0.02, 0.2), timeout=1.0, poll=0.2)
        self.ex = LoadExchange(table=self.table, own_row=self.own_row, address=ADDR[hid], key=KEY,
                               resolve=HOST.get, backend=self.backend)

    def own_row(self) -> LoadRow | None:
        if not self.accel:
            return None
        self.queued += 1.0
        return dataclasses.replace(row(queued=self.queued), host=self.hid)

    def has(self, hid: int) -> bool:
        return self.table.get(hid, time.monotonic()) is not None

    @property
    def m(self) -> dict:
        return self.backend.metrics()


@contextlib.asynccontextmanager
async def hosts(url: str, accel: dict[int, bool]):
    hs = {h: Host(h, url, a) for h, a in accel.items()}
    try:
        for h in hs.values():
            await h.ex.start()
        yield hs
    finally:
        for h in hs.values():
            await h.ex.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_rows_flow_through_redis_with_a_ttl_and_a_late_joiner_reads_them_at_once(server, loop):
    async def main() -> None:
        async with hosts(server.url, {1: True, 2: True}) as hs:
            await wait_for(lambda: hs[1].has(2) and hs[2].has(1))
            with server.client() as r:
                keys = sorted(k.decode() for k in r.keys(f"vrdma:{CLUSTER}:load:*"))
                assert keys == [load_key(CLUSTER, ADDR[1]), load_key(CLUSTER, ADDR[2])]
                ttl = r.pttl(keys[0])
                assert 0 < ttl <= DROP_AFTER_PERIODS * PERIOD * 1000
            # a late joiner, slow to advertise, has both rows from its first read (SCAN + MGET)
            late = Host(3, server.url, accel=False)
            await late.ex.start()
            try:
                await wait_for(lambda: late.has(1) and late.has(2))
                assert late.m["rows_read"] >= 2 and late.m["redis_up"] is True
                assert late.ex.announcer.metrics.sent == 0
            finally:
                await late.ex.close()
            q = hs[1].table.rows[2].queued["fft"]
            await wait_for(lambda: hs[1].table.rows[2].queued["fft"] > q)   # newer rows replace older
            for h in hs.values():
                li = h.ex.listener.metrics
                assert li.accepted > 0 and h.m["published"] > 0 and h.m["messages"] > 0
                assert (h.m["outages"], h.m["publish_failed"]) == (0, 0)
                assert (li.forged, li.replayed, li.wrong_key, li.unknown_sender) == (0, 0, 0, 0)
            # its own row comes back on the channel: counted as own, never taken
            assert hs[1].ex.listener.metrics.own > 0 and 1 not in hs[1].table.rows
    run(main, loop)


def test_bad_rows_written_into_redis_are_ignored_and_counted(server):
    wall = time.time_ns()
    prefix = f"vrdma:{CLUSTER}:load:"
    good2 = encode_load(dataclasses.replace(row(queued=5.0), seq=wall), ADDR[2], PERIOD, KEY)
    bad_keys = {
        # a member's authentic row under another member's key
        prefix + ADDR[3]: (good2, "wrong_key"),
        prefix + "192.0.2.4": (encode_load(dataclasses.replace(row(), seq=wall), ADDR[2], PERIOD, OTHER),
                               "forged"),
        prefix + "192.0.2.5": (signed([kind(queued=float("inf"))]), "absurd"),
        prefix + "192.0.2.6": (signed([kind(op=17)]), "unknown_kind"),
        prefix + "192.0.2.7": (b"garbage", "truncated"),
        prefix + "198.51.100.1": (encode_load(dataclasses.replace(row(), seq=wall), "198.51.100.1",
                                              PERIOD, KEY), "unknown_sender"),
    }
    with server.client() as r:
        r.set(prefix + ADDR[2], good2)
        for k, (v, _) in bad_keys.items():
            r.set(k, v)
        r.set("vrdma:othercluster:load:192.0.2.2", b"not ours")   # another cluster's: not read at all

    async def main() -> None:
        async with hosts(server.url, {1: False}) as hs:
            h1 = hs[1]
            li = h1.ex.listener.metrics
            await wait_for(lambda: h1.m["rows_read"] == 1 + len(bad_keys))
            assert h1.table.rows[2].queued["fft"] == 5.0      # the good row, and only it, taken
            assert set(h1.table.rows) == {2}
            want = dict.fromkeys(REASONS, 0)
            for _, reason in bad_keys.values():
                want[reason] += 1
            assert {r: getattr(li, r) for r in REASONS} == want
            # an old row of host 2 (a replay) and junk, published on the channel while it listens
            old2 = encode_load(dataclasses.replace(row(queued=7.0), seq=wall - 1), ADDR[2], PERIOD, KEY)
            with server.client() as r:
                r.publish(load_channel(CLUSTER), old2)
                r.publish(load_channel(CLUSTER), good2)
                r.publish(load_channel(CLUSTER), b"\x00" * 300)
            await wait_for(lambda: h1.m["messages"] == 3)
            assert (li.replayed, li.duplicate, li.malformed) == (1, 1, 1)
            assert h1.table.rows[2].queued["fft"] == 5.0
            assert h1.m["redis_up"] is True and h1.m["outages"] == 0
    asyncio.run(main())


def test_a_restarted_redis_is_an_outage_reported_once_then_the_exchange_resumes(server, caplog):
    caplog.set_level(logging.WARNING, logger="scheduler.redis_table")

    async def main() -> None:
        async with hosts(server.url, {1: True, 2: True}) as hs:
            h1, h2 = hs[1], hs[2]
            await wait_for(lambda: h1.has(2) and h2.has(1))
            assert h1.m["redis_up"] is True
            server.kill()
            await wait_for(lambda: h1.m["redis_up"] is False and h2.m["redis_up"] is False)
            held = h1.table.rows[2]
            await wait_for(lambda: h1.m["connect_failures"] >= 3 and h1.m["publish_failed"] >= 2)
            # the table keeps what it had (rows expire by age, as always), nothing raised
            assert h1.table.rows[2] is held
            assert (h1.m["outages"], h1.m["reconnects"]) == (1, 0)
            warned = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warned) == 2              # one per exchange, not one per attempt
            server.start()                       # an empty Redis on the same socket
            await wait_for(lambda: h1.m["redis_up"] is True and h2.m["redis_up"] is True)
            await wait_for(lambda: h1.table.rows[2].seq > held.seq and h1.has(2) and h2.has(1))
            assert (h1.m["outages"], h1.m["reconnects"]) == (1, 1)
            assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 2
            assert len([r for r in caplog.records if "reachable again" in r.getMessage()]) == 2
            with server.client() as r:                 # the rows are back in the new Redis
                await wait_for(lambda: r.exists(load_key(CLUSTER, ADDR[1]), load_key(CLUSTER, ADDR[2])) == 2)
        for h in hs.values():
            assert h.backend.client is None and h.backend._task is None     # closed
            assert h.ex.metrics()["publish_errors"] == 0      # every failure was the backend's, counted
    asyncio.run(main())


def test_an_unreachable_redis_at_start_is_an_outage_and_close_still_works(tmp_path):
    async def main() -> None:
        h = Host(1, f"unix://{tmp_path}/nobody.sock")
        await h.ex.start()
        await wait_for(lambda: h.m["connect_failures"] >= 2 and h.m["publish_failed"] >= 1)
        assert (h.m["redis_up"], h.m["outages"]) == (False, 1)
        await h.ex.close()
        await h.ex.close()                  # idempotent
    asyncio.run(main())


def test_configuration_errors_are_typed():
    with pytest.raises(DisseminationError, match="cluster name"):
        RedisBackend("redis://localhost", "a*b")
    with pytest.raises(DisseminationError, match="backoff"):
        RedisBackend("redis://localhost", backoff=(1.0, 0.5))
    assert RedisBackend("redis://:secret@host:6379/0").metrics()["url"] == "redis://***@host:6379/0"
