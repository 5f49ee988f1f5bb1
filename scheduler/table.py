"""The cluster load table: one row per host, as the host last advertised it
(issue 15, "Load table").

A host with accelerators advertises a :class:`LoadRow` every period (with
jitter): its accelerator kinds and unit counts, a service-time estimate per
kind (seconds per job on one unit, calibrated as
:class:`accel_core.estimate.ServiceTimeModel` does), the work in its system
per kind (queued and in service, in seconds of estimated service), the units
busy per kind, a sequence number and the time it was made. A host without
accelerators never advertises and is never a candidate (its rows, if one
arrives, are kept out of :meth:`LoadTable.candidates`).

:class:`LoadTable` keeps the newest row per host (an older or repeated
sequence number is ignored and counted). A host silent for
:data:`DROP_AFTER_PERIODS` periods drops out of the view; it comes back with
its next row. :class:`OwnSends` is a host's own sends to each peer since the
row it has of that peer (own-send accounting: Ray's "count your own
dispatches since the last load report").

Pure: ``now`` is passed in, nothing here does I/O or reads a clock.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from scheduler.errors import BadRow

#: sends per peer :class:`OwnSends` remembers for :meth:`OwnSends.in_flight`
RECENT_SENDS = 64
#: a host whose newest row is older than this many periods is out of the view
DROP_AFTER_PERIODS = 3
#: seconds between a host's advertisements unless configured (``--load-period``)
DEFAULT_PERIOD = 1.0


def _check_map(host: int, name: str, values: Mapping[str, float], positive: bool) -> None:
    for kind, v in values.items():
        if not isinstance(kind, str) or not kind:
            raise BadRow(f"host {host}: {name} has a bad kind {kind!r}")
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise BadRow(f"host {host}: {name}[{kind!r}] = {v!r} is not a "
                         f"{'positive' if positive else 'non-negative'} finite number")


@dataclass(frozen=True, slots=True)
class LoadRow:
    """What one host advertises about itself (or what a probe reads of it)."""

    host: int
    #: accelerator units per kind ({} for a host without accelerators)
    units: Mapping[str, int]
    #: estimated seconds of one job of this kind on one unit (1 / service rate)
    service_time: Mapping[str, float]
    #: estimated seconds of work in the system per kind (queued and in service)
    queued: Mapping[str, float]
    #: units of each kind busy now
    busy: Mapping[str, int]
    seq: int = 0
    #: when the row was made (the advertiser's ``now``)
    updated: float = 0.0

    def __post_init__(self) -> None:
        _check_map(self.host, "units", self.units, positive=True)
        _check_map(self.host, "service_time", self.service_time, positive=True)
        _check_map(self.host, "queued", self.queued, positive=False)
        _check_map(self.host, "busy", self.busy, positive=False)
        for name, m in (("service_time", self.service_time), ("queued", self.queued), ("busy", self.busy)):
            extra = set(m) - set(self.units)
            if extra:
                raise BadRow(f"host {self.host}: {name} names kinds {sorted(extra)} it has no units of")
        missing = set(self.units) - set(self.service_time)
        if missing:
            raise BadRow(f"host {self.host}: no service time for kinds {sorted(missing)}")
        if not math.isfinite(self.updated):
            raise BadRow(f"host {self.host}: updated = {self.updated!r}")

    def has(self, kind: str) -> bool:
        """The host has at least one unit of ``kind``."""
        return self.units.get(kind, 0) > 0

    @property
    def has_accelerators(self) -> bool:
        return any(n > 0 for n in self.units.values())

    def idle(self, kind: str) -> bool:
        """A unit of ``kind`` is free now (as of this row)."""
        return self.has(kind) and self.busy.get(kind, 0) < self.units[kind]

    def jobs(self, kind: str, extra: float = 0.0) -> float:
        """Jobs-equivalent in the system: (queued work + ``extra`` seconds) / service time."""
        return (self.queued.get(kind, 0.0) + extra) / self.service_time[kind]


@dataclass(slots=True)
class LoadTable:
    """The newest row of every host that advertised, with expiry.

    ``period`` is the advertisement period; a row older than
    :data:`DROP_AFTER_PERIODS` periods is out of the view until the host
    speaks again.
    """

    period: float
    rows: dict[int, LoadRow] = field(default_factory=dict)
    #: rows taken / ignored (sequence number not newer than the one held)
    accepted: int = 0
    stale: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.period) and self.period > 0):
            raise BadRow(f"table period {self.period!r} is not a positive finite number")

    def update(self, row: LoadRow) -> bool:
        """Take ``row`` if its sequence number is newer than the held one's; say whether it was."""
        held = self.rows.get(row.host)
        if held is not None and row.seq <= held.seq:
            self.stale += 1
            return False
        self.rows[row.host] = row
        self.accepted += 1
        return True

    def alive(self, row: LoadRow, now: float) -> bool:
        return now - row.updated <= DROP_AFTER_PERIODS * self.period

    def view(self, now: float) -> Iterator[LoadRow]:
        """The rows of hosts that spoke within the last :data:`DROP_AFTER_PERIODS` periods."""
        return (r for r in self.rows.values() if self.alive(r, now))

    def candidates(self, kind: str, now: float, exclude: int | None = None) -> list[LoadRow]:
        """Live rows of hosts with a unit of ``kind`` (never a host without accelerators)."""
        return [r for r in self.rows.values()
                if r.host != exclude and r.has(kind) and self.alive(r, now)]

    def get(self, host: int, now: float) -> LoadRow | None:
        row = self.rows.get(host)
        return row if row is not None and self.alive(row, now) else None


@dataclass(slots=True)
class OwnSends:
    """A host's own sends to each peer since the peer's row it holds.

    Each send is recorded against the sequence number of the target's row at
    the time; a newer row (whose queued work includes those jobs, or their
    completion) makes the count restart from zero.
    """

    #: host -> (row seq the sends were made against, seconds of work sent)
    sent: dict[int, tuple[int, float]] = field(default_factory=dict)
    #: host -> (when, seconds) of the recent sends, oldest first (for :meth:`in_flight`)
    recent: dict[int, deque[tuple[float, float]]] = field(default_factory=dict)

    def note(self, host: int, seq: int, seconds: float, now: float = 0.0) -> None:
        held_seq, total = self.sent.get(host, (seq, 0.0))
        self.sent[host] = (seq, (total if held_seq == seq else 0.0) + seconds)
        self.recent.setdefault(host, deque(maxlen=RECENT_SENDS)).append((now, seconds))

    def in_flight(self, host: int, now: float, window: float) -> float:
        """Seconds sent to ``host`` within the last ``window`` (one-way transfer time):
        jobs that may not have reached it yet, so a fresh read of its counters misses them."""
        q = self.recent.get(host)
        if not q:
            return 0.0
        while q and q[0][0] <= now - window:
            q.popleft()
        return sum(s for _, s in q)

    def pending(self, host: int, seq: int) -> float:
        """Seconds sent to ``host`` since its row number ``seq``."""
        held = self.sent.get(host)
        return held[1] if held is not None and held[0] == seq else 0.0
