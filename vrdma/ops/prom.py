"""Prometheus export of a daemon's counters (``vrdma backend --metrics-addr``).

A custom :class:`prometheus_client` collector: at each scrape, in the HTTP
server's thread, it asks the daemon's loop for
:meth:`~vrdma.ops.view.DaemonView.samples` (one call, answered between two
loop callbacks, so every value is read where it is written) and turns them
into metric families. Nothing is counted twice: the daemon's own counters
are the source. Names follow the Prometheus conventions (``vrdma_`` prefix,
``_total`` on counters, units in names); label sets are bounded as
:mod:`vrdma.ops.view` says. A scrape the loop does not answer within
``CALL_TIMEOUT`` yields ``vrdma_scrape_ok 0`` and nothing else.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from vrdma.ops.view import DaemonView

log = logging.getLogger(__name__)


class DaemonCollector:
    """Reads a :class:`DaemonView` at scrape time."""

    def __init__(self, view: DaemonView):
        self.view = view
        self.scrape_errors = 0

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.view.call(self.view.samples)
        except Exception as e:  # loop gone or too slow: say so in the scrape, never raise into the server
            self.scrape_errors += 1
            log.warning("metrics scrape: %s: %s", type(e).__name__, e)
            ok = GaugeMetricFamily("vrdma_scrape_ok", "1 if the daemon's loop answered the scrape")
            ok.add_metric([], 0)
            yield ok
            return
        yield from families(snap)
        ok = GaugeMetricFamily("vrdma_scrape_ok", "1 if the daemon's loop answered the scrape")
        ok.add_metric([], 1)
        yield ok

    def describe(self) -> list[Metric]:
        return []  # names depend on the daemon's configuration: no eager registration check


def families(snap: dict[str, Any]) -> list[Metric]:
    """Metric families of :meth:`DaemonView.samples` output (one family per name)."""
    fams: dict[str, Any] = {}
    for name, doc, labels, value in snap["counters"]:
        f = fams.get(name)
        if f is None:
            f = fams[name] = CounterMetricFamily(name, doc, labels=list(labels))
        f.add_metric(list(labels.values()), value)
    for name, doc, labels, value in snap["gauges"]:
        f = fams.get(name)
        if f is None:
            f = fams[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        f.add_metric(list(labels.values()), value)
    for name, doc, labels, buckets, total in snap["histograms"]:
        f = fams.get(name)
        if f is None:
            f = fams[name] = HistogramMetricFamily(name, doc, labels=list(labels))
        f.add_metric(list(labels.values()), buckets, total)
    return list(fams.values())


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; HOST empty: all addresses) as (host, port); ValueError naming it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {text!r}: expected HOST:PORT with a port in 0..65535")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (the operator asked for all)


class MetricsService:
    """The HTTP endpoint as a ``run_backend`` service: started in its own thread,
    shut down with the daemon. ``port`` is the bound port (useful with port 0)."""

    def __init__(self, addr: str, view: DaemonView):
        self.host, self.port = parse_addr(addr)
        self.view = view
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DaemonCollector(view)
        self.registry.register(self.collector)
        self._server: Any = None
        self._thread: Any = None

    async def start(self) -> None:
        import asyncio

        from prometheus_client import start_http_server

        self.view.bind_loop(asyncio.get_running_loop())
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            import asyncio

            server, self._server = self._server, None
            # in a thread: a scrape in progress waits for this loop (view.call)
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            await asyncio.to_thread(self._thread.join, 5)
