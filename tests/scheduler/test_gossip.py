"""Load datagrams (scheduler.gossip, scheduler.exchange): the announcer's timer
and sequence, the listener's refusals (every one counted), and exchanges over
real UDP sockets: rows flow, a host without accelerators never advertises, a
silent host drops out of the tables after 3 periods and comes back when it
speaks, hostile datagrams are ignored and counted; in network namespaces,
over a bridge, by broadcast."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from scheduler.exchange import LoadExchange, load_key_file
from scheduler.gossip import (
    FUTURE_BOUND,
    JITTER,
    LOAD_PORT,
    REASONS,
    Announcer,
    DatagramBackend,
    DisseminationError,
    Listener,
    broadcast_address,
)
from scheduler.table import DROP_AFTER_PERIODS, LoadRow, LoadTable
from scheduler.wire import decode_load, derive_load_key, encode_load
from tests.scheduler.test_wire import KEY as WIRE_KEY, kind, signed

KEY = WIRE_KEY
OTHER = derive_load_key(bytes(range(100, 132)))
ADDR = {1: "192.0.2.1", 2: "192.0.2.2", 3: "192.0.2.3"}
HOST = {a: h for h, a in ADDR.items()}
PERIOD = 0.05


def row(queued: float = 0.0, units: int = 1) -> LoadRow:
    return LoadRow(0, {"fft": units, "turbo_decode": 1}, {"fft": 0.001, "turbo_decode": 0.002},
                   {"fft": queued}, {"fft": 0})


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio") -> None:
    """Run ``main()`` on the stdlib event loop or on uvloop (the daemon's)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        uvloop.run(main())
    else:
        asyncio.run(main())


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until ``cond()``; generous timeout, the condition is what is asserted."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met in {timeout} s")
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ sans-I/O
def test_the_announcer_starts_at_a_random_phase_and_jitters_each_period():
    rng = random.Random(4)   # noqa: S311
    a = Announcer(KEY, "192.0.2.1", 1.0, seq0=1000, rng=rng)
    firsts = [Announcer(KEY, "192.0.2.1", 1.0, 0, random.Random(s)).start(10.0)  # noqa: S311
              for s in range(50)]
    assert all(10.0 <= f < 11.0 for f in firsts) and len(set(firsts)) == 50
    a.start(0.0)
    now = 0.0
    for i in range(200):
        data = a.announce(row(queued=i), now)
        assert data is not None and a.due is not None
        assert JITTER[0] <= a.due - now <= JITTER[1]
        ad = decode_load(data, KEY)
        assert (ad.seq, ad.address, ad.queued["fft"]) == (1000 + i, "192.0.2.1", float(i))
        now = a.due
    assert a.metrics.as_dict() == {"sent": 200, "skipped": 0}


def test_a_host_without_accelerators_never_advertises():
    a = Announcer(KEY, "192.0.2.3", 1.0, seq0=5)
    a.start(0.0)
    assert a.announce(None, 1.0) is None
    assert a.announce(LoadRow(0, {}, {}, {}, {}), 2.0) is None
    assert a.due is not None and a.due > 2.0          # still ticking: it may get accelerators later
    assert a.metrics.as_dict() == {"sent": 0, "skipped": 2}
    assert a.seq == 5


def _listener() -> Listener:
    return Listener(KEY, "192.0.2.1", HOST.get)


def test_the_listener_takes_a_members_newer_row_and_refuses_everything_else_counted():
    li = _listener()
    wall = time.time_ns()
    a2 = Announcer(KEY, "192.0.2.2", PERIOD, seq0=wall)
    good = a2.announce(row(queued=1.0), 0.0)
    assert good is not None
    got = li.receive(good, now=5.0, wall_ns=wall)
    assert got is not None and (got.host, got.updated, got.seq, got.queued["fft"]) == (2, 5.0, wall, 1.0)

    def refused(data: bytes, reason: str, *, wall_ns: int = wall, key_address: str | None = None) -> None:
        before = li.metrics.as_dict()
        assert li.receive(data, 6.0, wall_ns, key_address) is None
        after = li.metrics.as_dict()
        assert after[reason] == before[reason] + 1, (reason, li.last_refusal)
        assert li.last_refusal is not None and li.last_refusal[0] == reason
        assert sum(after[r] for r in REASONS) == sum(before[r] for r in REASONS) + 1

    refused(good, "duplicate")                                                  # the same one again
    refused(encode_load(row(), "192.0.2.2", PERIOD, OTHER), "forged")           # another cluster's key
    refused(good[:-1], "truncated")
    refused(good[:10], "truncated")
    refused(b"", "truncated")
    refused(b"\xff" * 200, "malformed")
    bad_kind = bytearray(good)
    bad_kind[40] = 9                 # the first kind's op, tag not updated: forged
    refused(bytes(bad_kind), "forged")
    refused(Announcer(KEY, "192.0.2.1", PERIOD, wall + 10).announce(row(), 0.0) or b"", "own")
    refused(Announcer(KEY, "192.0.2.99", PERIOD, wall + 10).announce(row(), 0.0) or b"", "unknown_sender")
    refused(Announcer(KEY, "192.0.2.2", PERIOD, wall - 10).announce(row(), 0.0) or b"", "replayed")
    future = int(wall + (FUTURE_BOUND + 5) * 1e9)
    refused(Announcer(KEY, "192.0.2.2", PERIOD, future).announce(row(), 0.0) or b"", "future")
    refused(good, "wrong_key", key_address="192.0.2.3")
    refused(signed([kind(op=7)]), "unknown_kind")                                # authentic, but no AccelOp
    refused(signed([kind(queued=-1.0)]), "absurd")
    # the next row, and a restarted host (its clock went on: a later seq0), are taken
    nxt = a2.announce(row(queued=2.0), 1.0)
    assert nxt is not None and li.receive(nxt, 7.0, wall) is not None
    restarted = Announcer(KEY, "192.0.2.2", PERIOD, seq0=wall + 10**9).announce(row(), 0.0)
    assert restarted is not None and li.receive(restarted, 8.0, wall + 10**9) is not None
    m = li.metrics
    assert (m.received, m.accepted, m.ignored) == (m.accepted + m.ignored, 3, 14)
    assert (m.truncated, m.forged, m.malformed, m.own, m.unknown_sender, m.replayed, m.future,
            m.duplicate, m.wrong_key, m.unknown_kind, m.absurd) == (3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1)


# ------------------------------------------------------------------ real UDP
def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


class Host:
    """One host's exchange over loopback UDP (its identity: a lab address)."""

    def __init__(self, hid: int, sock: socket.socket, peers: list[tuple[str, int]], accel: bool) -> None:
        self.hid = hid
        self.accel = accel
        self.queued = 0.0
        self.table = LoadTable(PERIOD)
        self.seen: list[LoadRow] = []
        self.backend = DatagramBackend(peers=peers, sock=sock)
        self.ex = LoadExchange(table=self.table, own_row=self.own_row, address=ADDR[hid], key=KEY,
                               resolve=HOST.get, backend=self.backend, on_row=self.seen.append)

    def own_row(self) -> LoadRow | None:
        if not self.accel:
            return None
        self.queued += 1.0
        return dataclasses_replace(row(queued=self.queued), host=self.hid)

    def has(self, hid: int) -> bool:
        return self.table.get(hid, time.monotonic()) is not None


def dataclasses_replace(r: LoadRow, **kw) -> LoadRow:
    return dataclasses.replace(r, **kw)


@contextlib.asynccontextmanager
async def cluster(accel: dict[int, bool]):
    socks = {h: _udp() for h in accel}
    ports = {h: s.getsockname()[1] for h, s in socks.items()}
    hosts = {h: Host(h, socks[h], [("127.0.0.1", ports[o]) for o in accel if o != h], accel[h])
             for h in accel}
    try:
        for h in hosts.values():
            await h.ex.start()
        yield hosts, ports
    finally:
        for h in hosts.values():
            await h.ex.close()
        assert all(s.fileno() == -1 for s in socks.values())     # every socket closed by its owner


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_rows_flow_over_udp_a_silent_host_drops_out_and_comes_back(loop):
    async def main() -> None:
        async with cluster({1: True, 2: True, 3: False}) as (hosts, _):
            h1, h2, h3 = hosts[1], hosts[2], hosts[3]
            await wait_for(lambda: h1.has(2) and h2.has(1) and h3.has(1) and h3.has(2))
            # a newer row replaces an older one: the queued work grows with every row
            q = h1.table.rows[2].queued["fft"]
            await wait_for(lambda: h1.table.rows[2].queued["fft"] > q)
            # host 3 has no accelerators: never advertises, never in a table
            assert 3 not in h1.table.rows and 3 not in h2.table.rows
            assert h3.ex.announcer.metrics.sent == 0 and h3.ex.announcer.metrics.skipped > 0
            assert [r.host for r in h1.table.candidates("fft", time.monotonic())] == [2]
            # host 2 goes silent (it loses its accelerators): out of every table after 3 periods
            h2.accel = False
            await wait_for(lambda: not h1.has(2) and not h3.has(2))
            silent_since = h1.table.rows[2].updated
            assert time.monotonic() - silent_since > DROP_AFTER_PERIODS * PERIOD
            assert h1.has(1) is False and h3.has(1)        # host 1 itself is never in its own table
            h2.accel = True                                 # it speaks again: back
            await wait_for(lambda: h1.has(2) and h3.has(2))
            for h in (h1, h2, h3):
                m = h.ex.metrics()
                li = m["listener"]
                assert isinstance(li, dict)
                assert li["accepted"] > 0 and sum(li[r] for r in REASONS) == 0, li
                assert m["row_errors"] == m["callback_errors"] == m["publish_errors"] == 0
            assert all(r.host == 2 for r in h1.seen) and all(r.host in (1, 2) for r in h3.seen)
    run(main, loop)


def test_hostile_datagrams_over_udp_are_ignored_and_counted():
    async def main() -> None:
        async with cluster({1: True, 2: True}) as (hosts, ports):
            h1 = hosts[1]
            await wait_for(lambda: h1.has(2))
            held = h1.table.rows[2]
            wall = time.time_ns()
            hostile = {
                "forged": [encode_load(row(), ADDR[2], PERIOD, OTHER)],
                "truncated": [b"VRLT", b""],
                "malformed": [os.urandom(100)[:3] + b"\0" * 200],
                "unknown_sender": [encode_load(row(), "198.51.100.7", PERIOD, KEY)],
                "replayed": [encode_load(dataclasses_replace(row(queued=99.0), seq=wall - 10**12),
                                         ADDR[2], PERIOD, KEY)],
                "future": [encode_load(dataclasses_replace(row(), seq=wall + 10**12), ADDR[2], PERIOD, KEY)],
                "own": [encode_load(dataclasses_replace(row(), seq=wall + 1), ADDR[1], PERIOD, KEY)],
            }
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for datagrams in hostile.values():
                    for d in datagrams:
                        s.sendto(d, ("127.0.0.1", ports[1]))
                li = h1.ex.listener.metrics
                await wait_for(lambda: all(getattr(li, r) >= len(d) for r, d in hostile.items()))
            assert {r: getattr(li, r) for r in hostile} == {r: len(d) for r, d in hostile.items()}
            # nothing hostile reached the table, and the exchange keeps taking host 2's rows
            assert h1.table.rows[2].queued["fft"] != 99.0 and h1.table.rows[2].seq >= held.seq
            n = li.accepted
            await wait_for(lambda: li.accepted > n)
    asyncio.run(main())


def test_configuration_errors_are_typed():
    with pytest.raises(DisseminationError, match="no broadcast address"):
        DatagramBackend(fabric_address="203.0.113.250")
    assert broadcast_address("not an address") is None
    assert DatagramBackend(broadcast="192.0.2.255").targets == [("192.0.2.255", LOAD_PORT)]
    assert DatagramBackend(peers=[("192.0.2.2", 5000)], port=1).targets == [("192.0.2.2", 5000)]


def test_a_port_in_use_is_a_typed_error_naming_it():
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            b = DatagramBackend(bind="127.0.0.1", port=port, peers=[("127.0.0.1", 9)])
            with pytest.raises(DisseminationError, match=f"cannot bind UDP 127.0.0.1:{port}"):
                await b.start(lambda d, a: None, PERIOD)
            await b.close()
    asyncio.run(main())


def test_the_load_key_file_is_the_fabric_key_file(tmp_path):
    from roce.auth import KeyFileError, write_key_file

    path = str(tmp_path / "cluster.key")
    write_key_file(path)
    with open(path, "rb") as f:
        assert load_key_file(path) == derive_load_key(f.read())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError):
        load_key_file(path)


# ------------------------------------------------------------------ netns, broadcast
@pytest.mark.netns
def test_broadcast_datagrams_in_namespaces_reach_every_host():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    from netlab.ns import Namespace, switch

    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(Namespace())
        spaces = {h: stack.enter_context(Namespace()) for h in ADDR}
        switch(hub, [(spaces[h], f"{ADDR[h]}/24") for h in ADDR])
        socks, bcast = {}, {}
        for h, ns in spaces.items():
            with ns.entered():
                bcast[h] = broadcast_address(ADDR[h])
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("0.0.0.0", LOAD_PORT))   # noqa: S104 (broadcasts reach wildcard sockets)
                socks[h] = s
        assert set(bcast.values()) == {"192.0.2.255"}

        async def main() -> None:
            tables = {h: LoadTable(PERIOD) for h in ADDR}
            exes = {h: LoadExchange(table=tables[h], own_row=lambda h=h: dataclasses_replace(row(), host=h),
                                    address=ADDR[h], key=KEY, resolve=HOST.get,
                                    backend=DatagramBackend(broadcast=bcast[h], sock=socks[h]))
                    for h in ADDR}
            try:
                for ex in exes.values():
                    await ex.start()
                await wait_for(lambda: all({r.host for r in tables[h].view(time.monotonic())}
                                           == set(ADDR) - {h} for h in ADDR))
                for ex in exes.values():
                    li = ex.listener.metrics
                    # one datagram per period reaches everyone, the sender's own included
                    assert li.own > 0 and li.forged == li.replayed == li.unknown_sender == 0
                    assert ex.metrics()["backend"]["targets"] == [f"192.0.2.255:{LOAD_PORT}"]
            finally:
                for ex in exes.values():
                    await ex.close()
        asyncio.run(main())


def test_a_failing_row_source_or_callback_is_counted_and_the_exchange_goes_on():
    async def main() -> None:
        s1, s2 = _udp(), _udp()
        p1, p2 = s1.getsockname()[1], s2.getsockname()[1]
        calls = {"own": 0, "on_row": 0}

        def flaky_row() -> LoadRow:
            calls["own"] += 1
            if calls["own"] % 2:
                raise RuntimeError("row source bug")
            return dataclasses.replace(row(), host=2)

        def flaky_callback(r: LoadRow) -> None:
            calls["on_row"] += 1
            if calls["on_row"] == 1:
                raise RuntimeError("callback bug")

        t1, t2 = LoadTable(PERIOD), LoadTable(PERIOD)
        e1 = LoadExchange(table=t1, own_row=lambda: None, address=ADDR[1], key=KEY, resolve=HOST.get,
                          backend=DatagramBackend(peers=[("127.0.0.1", p2)], sock=s1), on_row=flaky_callback)
        e2 = LoadExchange(table=t2, own_row=flaky_row, address=ADDR[2], key=KEY, resolve=HOST.get,
                          backend=DatagramBackend(peers=[("127.0.0.1", p1)], sock=s2))
        async with e1, e2:
            await wait_for(lambda: calls["on_row"] >= 3)
        assert e2.metrics()["row_errors"] >= 2 and e1.metrics()["callback_errors"] == 1
        assert t1.accepted >= 3
        assert s1.fileno() == s2.fileno() == -1
    asyncio.run(main())


class _StuckBackend:
    """A backend whose publish swallows its cancellation and only ends when the backend
    is closed under it (what a client library stuck mid-call on a connection does until
    the connection goes): the exchange must still get to closing the backend."""

    def __init__(self) -> None:
        self.publishing = 0
        self.closed: asyncio.Event | None = None

    async def start(self, deliver, period: float) -> None:
        self.closed = asyncio.Event()

    async def publish(self, data: bytes, address: str) -> None:
        assert self.closed is not None
        self.publishing += 1
        while not self.closed.is_set():
            try:
                await self.closed.wait()
            except asyncio.CancelledError:
                continue  # swallowed

    async def close(self) -> None:
        if self.closed is not None:
            self.closed.set()

    def metrics(self) -> dict[str, object]:
        return {"backend": "stuck"}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_close_is_bounded_when_the_backend_swallows_its_cancellation(loop):
    """A Redis round trip cancelled mid-call once hung ``LoadExchange.close`` for ever
    (a CI run waited in epoll with no timer left): close() now waits for the announcer
    at most CLOSE_SECONDS, abandons it and counts it."""
    from scheduler import exchange as ex_mod

    async def main() -> None:
        be = _StuckBackend()
        ex = LoadExchange(table=LoadTable(PERIOD), own_row=row, address=ADDR[1], key=KEY,
                          resolve=HOST.get, backend=be)
        await ex.start()
        await wait_for(lambda: be.publishing > 0)
        t0 = time.monotonic()
        await ex.close()
        assert time.monotonic() - t0 < ex_mod.CLOSE_SECONDS + 1.0
        assert ex.close_overruns == 1 and ex.metrics()["close_overruns"] == 1
    run(main, loop)
