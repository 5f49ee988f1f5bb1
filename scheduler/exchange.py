"""The load exchange: one object the daemon builds to advertise its row and fill
its :class:`~scheduler.table.LoadTable` from its peers' rows, over either
dissemination backend (issue 15, "Dissemination, behind one interface").

::

    exchange = LoadExchange(table=table, own_row=accel_row, address="192.0.2.1",
                            key=load_key_file("/etc/vrdma/cluster.key"), resolve=host_of,
                            backend=DatagramBackend(fabric_address="192.0.2.1"))
    await exchange.start()      # opens the backend's sockets, starts the timer
    ...
    await exchange.close()      # cancels the timer, closes every socket / connection

It runs the :class:`~scheduler.gossip.Announcer`'s timer (each period with
jitter it calls ``own_row()``: None or a row without units = nothing sent)
and hands every received datagram (or Redis value) to one
:class:`~scheduler.gossip.Listener`, the same checks for both backends; a row
it takes goes into the table (newest sequence number wins) and, if the table
took it, to ``on_row``. The backend is a
:class:`~scheduler.gossip.DatagramBackend` or a
:class:`~scheduler.redis_table.RedisBackend`; the exchange owns it and
closes it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from roce.auth import read_key_file
from scheduler.gossip import FUTURE_BOUND, Announcer, Dissemination, DisseminationError, Listener, stop_task
from scheduler.table import LoadRow, LoadTable
from scheduler.wire import derive_load_key

log = logging.getLogger(__name__)

#: how long close() waits for the cancelled announcer
CLOSE_SECONDS = 2.0


def load_key_file(path: str) -> bytes:
    """The load-table key of a cluster key file (``vrdma keygen``; checked as the
    fabric checks it: a regular file of ours, mode 0600, 32 bytes)."""
    return derive_load_key(read_key_file(path))


class LoadExchange:
    """Advertise ``own_row()`` every ``period`` (default the table's) and feed ``table``."""

    def __init__(self, *, table: LoadTable, own_row: Callable[[], LoadRow | None], address: str,
                 key: bytes, resolve: Callable[[str], int | None], backend: Dissemination,
                 period: float | None = None, on_row: Callable[[LoadRow], None] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns, future_bound: float = FUTURE_BOUND) -> None:
        self.table = table
        self.own_row = own_row
        self.period = table.period if period is None else period
        self.backend = backend
        self.on_row = on_row
        self.clock = clock
        self.wall_ns = wall_ns
        self.address = address
        self.announcer = Announcer(key, address, self.period, wall_ns(), rng)
        self.listener = Listener(key, address, resolve, future_bound)
        #: own_row() / on_row() raised (logged; advertising and receiving go on)
        self.row_errors = 0
        self.callback_errors = 0
        #: a backend's publish raised (a bug: network failures are the backend's to count)
        self.publish_errors = 0
        #: close() gave up waiting for the announcer (it swallowed its cancellation)
        self.close_overruns = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._task is not None or self._closed:
            raise DisseminationError("load exchange already started (or closed)")
        await self.backend.start(self._deliver, self.period)
        self.announcer.start(self.clock())
        self._task = asyncio.get_running_loop().create_task(self._announce(), name="load-announcer")

    def _deliver(self, data: bytes, key_address: str | None) -> None:
        row = self.listener.receive(data, self.clock(), self.wall_ns(), key_address)
        if row is None:
            if self.listener.last_refusal is not None:
                log.debug("load row refused: %s: %s", *self.listener.last_refusal)
            return
        if self.table.update(row) and self.on_row is not None:
            try:
                self.on_row(row)
            except Exception:   # the caller's bug must not stop the backend's receiving
                self.callback_errors += 1
                log.exception("load exchange: on_row() failed")

    async def _announce(self) -> None:
        a = self.announcer
        while True:
            assert a.due is not None
            await asyncio.sleep(max(0.0, a.due - self.clock()))
            try:
                row = self.own_row()
            except Exception:   # the row source's bug must not stop the advertisements
                self.row_errors += 1
                log.exception("load exchange: own_row() failed")
                row = None
            data = a.announce(row, self.clock())
            if data is not None:
                try:
                    await self.backend.publish(data, self.address)
                except Exception:   # backends count their network failures; anything else is a bug
                    self.publish_errors += 1
                    log.exception("load exchange: publish failed")

    async def close(self) -> None:
        """Stop the timer and close the backend; idempotent. Bounded: the announcer
        is cancelled and waited for at most :data:`CLOSE_SECONDS` (a cancellation
        swallowed inside a client library must not hold the daemon's shutdown)."""
        self._closed = True
        t, self._task = self._task, None
        if t is not None and not await stop_task(t, CLOSE_SECONDS):
            self.close_overruns += 1
            log.warning("load exchange: the announcer did not stop in %.1f s; abandoned", CLOSE_SECONDS)
        await self.backend.close()

    async def __aenter__(self) -> LoadExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def metrics(self) -> dict[str, object]:
        return {"announcer": self.announcer.metrics.as_dict(),
                "listener": self.listener.metrics.as_dict(),
                "table": {"accepted": self.table.accepted, "stale": self.table.stale},
                "row_errors": self.row_errors, "callback_errors": self.callback_errors,
                "publish_errors": self.publish_errors, "close_overruns": self.close_overruns,
                "backend": self.backend.metrics()}
