"""Load-table dissemination through Redis, for clusters past one broadcast
domain (issue 15, "Dissemination"; docs/scheduler.md).

Every host SETs its row, the same authenticated load datagram as on UDP
(:func:`scheduler.wire.encode_load`), under ``vrdma:<cluster>:load:<address>``
with a TTL of :data:`~scheduler.table.DROP_AFTER_PERIODS` periods (PX), and
PUBLISHes it on ``vrdma:<cluster>:load``. Every host subscribes to that
channel and, on each (re)connect, after subscribing, reads every row once
(SCAN + MGET) so it does not wait a period for its table. A row read from
Redis is handed to the exchange's :class:`~scheduler.gossip.Listener` exactly
as a datagram is, plus one check: the address in the key must be the one in
the (authenticated) row (``wrong_key``). Redis is a mailbox, not a trusted
party: whoever can write to it can delete rows, never forge one.

Failure: when Redis is unreachable (refused, reset, restarted, timed out) the
backend logs one warning per outage, sets ``redis_up`` false and counts the
outage, then reconnects with a bounded exponential backoff (re-subscribes,
re-reads every row) and counts the reconnect. Meanwhile the table keeps what
it has (rows expire by age as always) and this host's rows are not published
(counted as ``publish_failed``). Nothing here raises into the daemon.

redis-py's asyncio client (``redis.asyncio``) with its own retries off: the
loop here is the one reconnect policy.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import re
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from scheduler.gossip import Deliver, DisseminationError, stop_task
from scheduler.table import DROP_AFTER_PERIODS

log = logging.getLogger(__name__)

#: a cluster name as it may appear in a key (no glob characters, no separators)
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: keys read per MGET, and at most per (re)connect (a flooded Redis is not read forever)
MGET_BATCH = 256
MAX_ROWS = 4096
#: close() asks the connection task to stop this many times, ``timeout`` apart
CLOSE_ATTEMPTS = 3
_NETWORK_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def load_key(cluster: str, address: str) -> str:
    """The Redis key of ``address``'s row (``address`` as :func:`scheduler.wire.address_text` spells it)."""
    return f"vrdma:{cluster}:load:{address}"


def load_channel(cluster: str) -> str:
    return f"vrdma:{cluster}:load"


def _abandon(t: asyncio.Future) -> None:
    """Cancel a redis-py call left behind and retrieve its end, whatever it is."""
    t.cancel()
    t.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _within(aw, limit: float) -> asyncio.Future | None:
    """Run ``aw`` for at most ``limit`` seconds: its finished future, or None when it
    overran (then it is abandoned). Cancelling the caller abandons it too."""
    t = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({t}, timeout=limit)
    except asyncio.CancelledError:
        _abandon(t)
        raise
    if not done:
        _abandon(t)
        return None
    return t


@dataclass(slots=True)
class RedisMetrics:
    #: connected and subscribed now
    redis_up: bool = False
    #: times Redis became unreachable (or was at start)
    outages: int = 0
    #: times it came back after an outage
    reconnects: int = 0
    #: failed connection attempts
    connect_failures: int = 0
    #: connection teardowns that overran ``timeout`` (left to finish on their own)
    slow_closes: int = 0
    #: rows read by SCAN + MGET on (re)connect, and pub/sub messages
    rows_read: int = 0
    messages: int = 0
    #: keys beyond MAX_ROWS not read
    rows_skipped: int = 0
    published: int = 0
    publish_failed: int = 0


class RedisBackend:
    """The Redis dissemination backend (module docstring); ``url`` as redis-py takes it
    (``redis://host:port/0``, ``unix:///path/redis.sock``)."""

    def __init__(self, url: str, cluster: str = "default", *, backoff: tuple[float, float] = (0.05, 2.0),
                 timeout: float = 2.0, poll: float = 1.0) -> None:
        if not _CLUSTER_NAME.fullmatch(cluster):
            raise DisseminationError(f"cluster name {cluster!r}: 1-64 of A-Z a-z 0-9 _ . -")
        lo, hi = backoff
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise DisseminationError(f"backoff {backoff!r}: want 0 < min <= max")
        self.url = url
        #: the url without a password, for logs and metrics
        self.where = re.sub(r"//[^@/]*@", "//***@", url)
        self.cluster = cluster
        self.prefix = load_key(cluster, "")
        self.channel = load_channel(cluster)
        self.backoff = (lo, hi)
        self.timeout = timeout
        self.poll = poll
        self.ttl_ms = 0
        self.client: Redis | None = None
        self.deliver: Deliver | None = None
        self.metrics_ = RedisMetrics()
        self._down = False          # in an outage (warned once)
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()
        self._rng = random.Random()   # noqa: S311 (backoff jitter, not a secret)
        self._closing = False

    async def start(self, deliver: Deliver, period: float) -> None:
        """Start the connection task; returns after its first attempt (connected and every
        row read, or the outage reported: at most about ``timeout``)."""
        if self._task is not None:
            raise DisseminationError("redis backend already started")
        self.deliver = deliver
        self.ttl_ms = max(1, math.ceil(DROP_AFTER_PERIODS * period * 1000))
        self._tried = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-redis")
        await self._tried.wait()    # the first attempt done (up, or an outage reported)

    def _connect(self) -> Redis:
        return Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), socket_timeout=self.timeout,
                              socket_connect_timeout=self.timeout)

    async def _run(self) -> None:
        try:
            await self._connected()
        except Exception:
            log.exception("redis load-table backend stopped")
            raise
        finally:
            self._tried.set()

    async def _connected(self) -> None:
        """Connect, subscribe, read every row, hand on messages; on a network error,
        report the outage and try again after the backoff; forever."""
        delay = self.backoff[0]
        while not self._closing:
            client = self._connect()
            pubsub: PubSub | None = None
            try:
                await self._step(client.ping(), self.timeout)
                pubsub = client.pubsub()
                await self._step(pubsub.subscribe(self.channel), self.timeout)
                self.client = client
                self._now_up()
                delay = self.backoff[0]
                await self._step(self._read_all(client), 4 * self.timeout)
                self._tried.set()
                while not self._closing:
                    msg = await self._step(
                        pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll),
                        self.poll + self.timeout)
                    if msg is not None and msg.get("type") == "message":
                        self.metrics_.messages += 1
                        self._hand(msg.get("data"), None)
            except _NETWORK_ERRORS as e:
                if self.client is None:
                    self.metrics_.connect_failures += 1
                self._now_down(e)
                self._tried.set()
            finally:
                self.client = None
                if pubsub is not None:
                    await self._bounded(pubsub.aclose())
                await self._bounded(client.aclose())
            if self._closing:
                return
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
            delay = min(2 * delay, self.backoff[1])

    def _now_up(self) -> None:
        m = self.metrics_
        if self._down:
            m.reconnects += 1
            log.warning("redis %s reachable again: load rows flow again", self.where)
        self._down = False
        m.redis_up = True

    def _now_down(self, err: BaseException) -> None:
        m = self.metrics_
        m.redis_up = False
        if not self._down:
            self._down = True
            m.outages += 1
            log.warning("redis %s unreachable (%s): routing on the load table as it is, "
                        "reconnecting", self.where, str(err) or type(err).__name__)

    def _hand(self, value: object, key_address: str | None) -> None:
        if self.deliver is None:
            return
        # anything that is not bytes is handed on as empty: refused and counted as truncated
        self.deliver(value if isinstance(value, bytes) else b"", key_address)

    async def _read_all(self, client: Redis) -> None:
        keys: list[bytes] = []
        async for key in client.scan_iter(match=self.prefix + "*", count=MGET_BATCH):
            if len(keys) >= MAX_ROWS:
                self.metrics_.rows_skipped += 1
                continue
            keys.append(key)
        for i in range(0, len(keys), MGET_BATCH):
            batch = keys[i:i + MGET_BATCH]
            for key, value in zip(batch, await client.mget(batch), strict=True):
                if value is None:      # expired between SCAN and MGET
                    continue
                self.metrics_.rows_read += 1
                name = key.decode("utf-8", "replace")
                self._hand(value, name[len(self.prefix):])

    async def publish(self, data: bytes, address: str) -> None:
        """SET the row (with its TTL) and PUBLISH it, in one pipeline, within ``timeout``
        (an overrunning call is abandoned and counted as a failed publish: the
        announcer, and a close() that cancels it, never wait on the server for ever)."""
        client = self.client
        if client is None:
            self.metrics_.publish_failed += 1
            return
        try:
            await self._step(self._publish(client, data, address), self.timeout)
            self.metrics_.published += 1
        except _NETWORK_ERRORS as e:
            self.metrics_.publish_failed += 1
            log.debug("redis publish failed: %s", e)

    async def _publish(self, client: Redis, data: bytes, address: str) -> None:
        async with client.pipeline(transaction=False) as p:
            p.set(load_key(self.cluster, address), data, px=self.ttl_ms)
            p.publish(self.channel, data)
            await p.execute()

    async def _step(self, aw, limit: float):
        """``await aw``, but for at most ``limit`` seconds (TimeoutError: the
        connection is treated as failed; an overrunning call is abandoned, so a call
        that ignores its cancellation cannot hold the loop)."""
        t = await _within(aw, limit)
        if t is None:
            raise TimeoutError(f"redis call took over {limit:g} s")
        return t.result()

    async def _bounded(self, aw) -> None:
        """Await a connection's teardown for at most ``timeout`` seconds: closing a
        connection to a server that went away must not hold the reconnect loop (or
        close()) for ever; one that overruns is abandoned and counted."""
        t = await _within(aw, self.timeout)
        if t is None:
            self.metrics_.slow_closes += 1
            return
        with contextlib.suppress(Exception, asyncio.CancelledError):
            t.result()

    async def close(self) -> None:
        """Stop the connection task: bounded, even if a cancellation is swallowed
        inside the client library (it is asked again, and the task also sees
        ``_closing`` at its next turn)."""
        self._closing = True
        t, self._task = self._task, None
        self.deliver = None
        if t is None:
            return
        if await stop_task(t, self.timeout, CLOSE_ATTEMPTS):
            return
        log.warning("redis load-table backend %s: its task did not stop in %.1f s", self.where,
                    CLOSE_ATTEMPTS * self.timeout)

    def metrics(self) -> dict[str, object]:
        return dict(dataclasses.asdict(self.metrics_), backend="redis", url=self.where,
                    cluster=self.cluster)
