"""Where a guest's accelerator job runs, decided in the daemon (issue 15;
docs/scheduler.md, "In the daemon").

:class:`Dispatcher` is the cluster scheduler's daemon side: the
:class:`~virtio_rdma.accel.AccelRouter` asks it where each job goes that its
queue did not pin (FORCE_TARGET), and it answers with
:func:`scheduler.decide.plan`/:func:`~scheduler.decide.finish`, the decision
code the simulator runs, over what this host knows:

* **Here**: this host's own live row (:meth:`Dispatcher.here_row`): its units
  per kind, a service-time estimate per kind (the service-time model's
  estimate of the kind's reference job, :data:`REFERENCE`), the work in its
  accelerators' systems in seconds (queued estimates + what remains of the
  running ones) and the units busy.
* **The table**: rows other hosts advertised (dissemination, :mod:`scheduler.gossip`
  or :mod:`scheduler.redis_table`, feeds :attr:`Dispatcher.table`); a peer
  whose link is up but whose row has not come (or expired) stands in the
  view with what its connect message said (units, service-time estimates)
  and no known load. A peer whose link is down, or whose last READ failed,
  is never a candidate (it is back when its link comes up again).
* **Fresh counters** (policies ``probe`` and ``guided``): each host keeps its
  own row in a counters region (:func:`scheduler.wire.store_counters`),
  refreshed whenever its load changes, and its peer links open it to the
  peer as a REMOTE_READ window. A decision that needs reads parks the job
  (:class:`_Deferred`, a target the router treats as any other) and RDMA
  READs the counters of the planned hosts; when they are in (or failed, or
  :data:`READ_DEADLINE` passed) it finishes and hands the job on.
* **Transfer time** per peer (:class:`TransferEstimates`): the one-way
  latency from READ round trips, the cost per byte from remote jobs (their
  time on the wire: response time minus the peer's wait and service).

A job's ``size`` is its work (:func:`accel_core.estimate.query_units`) over
its kind's reference job's, so rows need only one service time per kind.
Every decision is counted (:class:`scheduler.decide.DecisionCounters`) and
logged at debug level with its candidates and estimates
(:meth:`scheduler.decide.Decision.explain`).
"""
from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

import numpy as np

from accel_core.errors import ModelError
from accel_core.estimate import query_units
from accel_core.jobs import JobParams
from scheduler.board import (
    INBOUND_SIZE,
    add as board_add,
    as_u64,
    board_size,
    counters_offset,
    decode_board,
    inbound_base,
    inbound_offset,
    units_of,
)
from scheduler.decide import (
    Decision,
    DecisionCounters,
    Job,
    Plan,
    Policy,
    View,
    finish,
    parse_policy,
    plan,
)
from scheduler.errors import NoCandidate
from scheduler.table import DEFAULT_PERIOD, LoadRow, LoadTable, OwnSends
from scheduler.wire import COUNTERS_SIZE, TornRead, WireError, decode_counters, kind_name, store_counters
from virtio_rdma.accel import CORE_OP, AccelQueue, Entry, LocalTarget, RemoteTarget, need_bytes, route
from virtio_rdma.constants import AccelOp

if TYPE_CHECKING:
    from virtio_rdma.accel import AccelRouter
    from virtio_rdma.wire import AccelJob

log = logging.getLogger(__name__)

#: the reference job of each kind (a row's service time is this job's): (size, batch, iterations)
REFERENCE = {AccelOp.FFT: (4096, 1, 0), AccelOp.IFFT: (4096, 1, 0),
             AccelOp.TURBO_ENCODE: (6144, 1, 0), AccelOp.TURBO_DECODE: (6144, 1, 8)}
#: seconds a decision waits for its READs before it decides on those that came
READ_DEADLINE = 0.05
#: until measured: one-way latency (s) and seconds per byte (1 GB/s) of a peer
DEFAULT_LATENCY = 100e-6
DEFAULT_SECONDS_PER_BYTE = 1e-9
#: weight of a new sample in the transfer estimates
EWMA = 0.2
#: service time (s) of a kind a peer's connect message gave no estimate for
UNKNOWN_SERVICE_TIME = 1e-3


def reference_units(op: AccelOp) -> float:
    size, batch, it = REFERENCE[op]
    return query_units(CORE_OP[op], size, batch, it)


def job_size(job: AccelJob) -> float:
    """The job's work in multiples of its kind's reference job's."""
    return query_units(CORE_OP[job.op], job.size, job.batch, job.iterations) / reference_units(job.op)


def _ref_params(op: AccelOp) -> JobParams:
    size, batch, it = REFERENCE[op]
    if op in (AccelOp.FFT, AccelOp.IFFT):
        return JobParams(batch=batch, n=size, dtype=np.dtype(np.complex64))
    if op is AccelOp.TURBO_ENCODE:
        return JobParams(batch=batch, k=size)
    return JobParams(batch=batch, k=size, iterations=it, scaling=None, early_stop="none")


class TransferEstimates:
    """Per peer: one-way latency (half a READ's round trip) and seconds per
    byte (from remote jobs), both moving averages. Pure."""

    def __init__(self) -> None:
        self.latency: dict[int, float] = {}
        self.per_byte: dict[int, float] = {}
        self.samples: dict[int, int] = {}

    def read_rtt(self, host: int, seconds: float) -> None:
        if seconds >= 0:
            old = self.latency.get(host)
            self.latency[host] = seconds / 2 if old is None else old + EWMA * (seconds / 2 - old)
            self.samples[host] = self.samples.get(host, 0) + 1

    def job(self, host: int, nbytes: int, wire_seconds: float) -> None:
        """A remote job moved ``nbytes`` (input there, output back) in ``wire_seconds``
        of its response time (the rest was the peer's wait and service)."""
        if nbytes <= 0 or wire_seconds < 0:
            return
        lat = self.latency.get(host, DEFAULT_LATENCY)
        sample = max(0.0, wire_seconds - 2 * lat) / nbytes
        old = self.per_byte.get(host)
        self.per_byte[host] = sample if old is None else old + EWMA * (sample - old)
        self.samples[host] = self.samples.get(host, 0) + 1

    def one_way(self, host: int, nbytes: int) -> float:
        """Seconds for a job moving ``nbytes`` in all, counted one way (the cost counts it twice)."""
        return (self.latency.get(host, DEFAULT_LATENCY)
                + nbytes / 2 * self.per_byte.get(host, DEFAULT_SECONDS_PER_BYTE))

    def describe(self) -> dict:
        return {h: {"latency_us": round(self.latency.get(h, DEFAULT_LATENCY) * 1e6, 1),
                    "mb_per_s": round(1e-6 / max(self.per_byte.get(h, DEFAULT_SECONDS_PER_BYTE), 1e-15), 1),
                    "samples": n}
                for h, n in sorted(self.samples.items())}


@dataclass(slots=True)
class DispatchMetrics:
    deferred: int = 0          # decisions that waited for READs
    reads: int = 0             # RDMA READs posted (of a peer's counters, or of the board)
    reads_failed: int = 0      # completed in error, or their link went down (the host is marked down)
    reads_late: int = 0        # not back by the deadline (decided without them)
    reads_bad: int = 0         # came back malformed (its host left out of that decision)
    reads_torn: int = 0        # raced the peer's update (its table row stood in, as a late read's)
    redispatched: int = 0      # given back by a failed host and placed again
    no_candidate: int = 0      # nobody could run it (NO_ACCELERATOR)
    publishes: int = 0         # counters region refreshed
    board_reads: int = 0       # decisions that read the board (one READ, or the holder's own)
    board_writes: int = 0      # this host's counters WRITten into its board slot
    board_fallbacks: int = 0   # decisions that probed because the board's holder was down
    announced: int = 0         # jobs announced on the board (FETCH_ADD +)
    unannounced: int = 0       # ... taken off by this host: they never reached their target
    landed: int = 0            # peers' jobs whose announcement this host took off on arrival

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class Board:
    """This daemon's part in the cluster's load board (scheduler.board): the
    cluster in slot order, its own slot, the board holder's host id (0: this
    host, which then holds ``region``) and each peer's slot by host id."""

    hosts: int
    own_slot: int
    holder: int
    slots: dict[int, int]
    region: memoryview | None = None


class _Deferred:
    """A job parked while its decision's READs are out: a target the router
    treats as any other (cancel takes it back, abandon forgets it)."""

    host = 0

    def __init__(self, dispatcher: Dispatcher, plan: Plan, view: View, aq: AccelQueue, job: AccelJob,
                 exclude: tuple[int, ...], deadline: float):
        self.dispatcher = dispatcher
        self.plan = plan
        self.view = view
        self.aq = aq
        self.job = job
        self.exclude = exclude
        self.deadline = deadline
        self.entry: Entry | None = None
        self.got: dict[int, LoadRow | None] = {}
        self.out: set[int] = set()          # read tags outstanding
        self.done = False
        self.board = False                  # its one read is of the load board

    def units(self, op: AccelOp) -> int:
        return 0

    def submit(self, entry: Entry) -> None:
        self.entry = entry
        if not self.out:   # every read failed at once: decide now
            self.dispatcher._decided(self)
        return None

    def cancel(self, entry: Entry) -> bool:
        self.dispatcher._forget(self)
        return True

    def abandon(self, entry: Entry) -> None:
        self.dispatcher._forget(self)

    def describe(self) -> dict:
        return {"reads": list(self.plan.reads), "outstanding": len(self.out)}


class Dispatcher:
    """The daemon's cluster scheduler (module doc). ``router`` is the daemon's;
    its remote targets (host ids 1, 2, ...) are the candidates. ``address_of``
    gives a host id's fabric address (for logs)."""

    def __init__(self, router: AccelRouter, policy: Policy | str, *, period: float = DEFAULT_PERIOD,
                 clock: Callable[[], float] = monotonic, seed: int | None = None,
                 read_deadline: float = READ_DEADLINE):
        self.router = router
        self.policy = parse_policy(policy, allow_reference=False) if isinstance(policy, str) else policy
        self.clock = clock
        self.rng = random.Random(secrets.randbits(64) if seed is None else seed)  # noqa: S311 (not a key)
        self.read_deadline = read_deadline
        #: rows other hosts advertised, by host id (dissemination fills it)
        self.table = LoadTable(period)
        self.own = OwnSends()
        self.transfer = TransferEstimates()
        self.counters = DecisionCounters()
        self.metrics = DispatchMetrics()
        #: this host's counters region, READ by its peers (every link opens a window on it)
        self.region = memoryview(bytearray(COUNTERS_SIZE))
        self._seq = time.time_ns()
        #: hosts whose READ failed: not candidates until their link comes up again
        self.down: set[int] = set()
        self._tags = 0
        self._reads: dict[int, tuple[_Deferred, int, memoryview, float]] = {}
        self._deferred: set[_Deferred] = set()
        self._publish_due = False
        #: set by the adapter: ``defer(fn)`` runs ``fn`` soon on the loop (None: at once)
        self.defer: Callable[[Callable[[], None]], Any] | None = None
        #: set by the adapter: the earliest deadline may have moved
        self.rearm: Callable[[], None] | None = None
        #: the load board (policy ``board``; set by :meth:`use_board`), and whether its holder is down
        self.board: Board | None = None
        self.board_down = False
        router.dispatcher = self
        router.on_load = self.load_changed
        self.publish()

    # ------------------------------------------------------------- own load
    def here_row(self, now: float | None = None) -> LoadRow:
        """This host's live counters (host id 0)."""
        local = self.router.local
        units: dict[str, int] = {}
        st: dict[str, float] = {}
        queued: dict[str, float] = {}
        busy: dict[str, int] = {}
        if local is not None:
            model = local.service.model
            for op in AccelOp:
                accs = local.service.serving(CORE_OP[op])
                n = sum(a.workers for a in accs)
                if not n:
                    continue
                k = kind_name(op)
                units[k] = n
                try:
                    st[k] = max(model.estimate_params(CORE_OP[op], _ref_params(op)), 1e-9)
                except ModelError:  # a model without this op's cost: a stand-in, said in the doc
                    st[k] = UNKNOWN_SERVICE_TIME
                queued[k] = sum(a.queued_work_seconds() for a in accs)
                busy[k] = min(sum(a.running_count() for a in accs), n)
        self._seq += 1
        return LoadRow(0, units, st, queued, busy, seq=self._seq,
                       updated=self.clock() if now is None else now)

    def advertised_row(self, now: float | None = None) -> LoadRow:
        """What peers are told (load table, counters region, board): :meth:`here_row`, with
        no units while the daemon drains (``router.accept_remote`` False)."""
        row = self.here_row(now)
        if self.router.accept_remote:
            return row
        return LoadRow(0, {}, {}, {}, {}, seq=row.seq, updated=row.updated)

    def publish(self) -> None:
        """Refresh the counters region peers READ (and this host's slot of the board)."""
        self._publish_due = False
        row = self.advertised_row()
        store_counters(self.region, row)
        self.metrics.publishes += 1
        b = self.board
        if b is None or (not row.has_accelerators and self.router.accept_remote):
            # a host without accelerators never advertises; a draining one writes its empty row
            return
        if b.region is not None:
            off = counters_offset(b.own_slot)
            b.region[off:off + COUNTERS_SIZE] = self.region
        else:
            holder = self.router.remotes.get(b.holder)
            write = getattr(holder, "board_write", None)
            if write is not None and write(self.region):
                self.metrics.board_writes += 1

    # ------------------------------------------------------------ the board
    def use_board(self, board: Board) -> None:
        self.board = board
        self.publish()

    def _board_op(self, host: int, kind: str, delta: int) -> bool:
        """Add ``delta`` units to ``host``'s announced work of ``kind`` on the board."""
        b = self.board
        if b is None:
            return False
        slot = b.own_slot if host == 0 else b.slots.get(host)
        if slot is None:
            return False
        off = inbound_offset(b.hosts, slot, kind)
        if b.region is not None:
            board_add(b.region, off, delta)
            return True
        holder = self.router.remotes.get(b.holder)
        add = getattr(holder, "board_add", None)
        return add is not None and add(off - inbound_base(b.hosts), as_u64(delta))

    def announce(self, host: int, job: AccelJob) -> int:
        """A job goes to peer ``host``: announce its work on the board; the units
        announced (0: no board, or its holder is unreachable)."""
        if self.board is None or self.board_down:
            return 0
        try:
            units = units_of(job_size(job))
        except ModelError:  # a size the model cannot weigh: not announced
            return 0
        if not self._board_op(host, kind_name(job.op), units):
            return 0
        self.metrics.announced += 1
        return units

    def unannounce(self, host: int, job: AccelJob, units: int) -> None:
        """A job announced to ``host`` will never reach it."""
        if self._board_op(host, kind_name(job.op), -units):
            self.metrics.unannounced += 1

    def landed(self, job: AccelJob) -> None:
        """A peer's job announced to this host arrived: its announcement comes off."""
        try:
            units = units_of(job_size(job))
        except ModelError:  # a hostile peer's job of no size: nothing was announced for it
            return
        if self._board_op(0, kind_name(job.op), -units):
            self.metrics.landed += 1

    def board_reset(self, host: int) -> None:
        """The holder's link to ``host`` came up: its slot starts clean (what a
        previous life of that host left there, and announcements it never got, go)."""
        b = self.board
        slot = b.slots.get(host) if b is not None else None
        if b is None or b.region is None or slot is None:
            return
        off = counters_offset(slot)
        b.region[off:off + COUNTERS_SIZE] = bytes(COUNTERS_SIZE)
        base = inbound_base(b.hosts) + slot * INBOUND_SIZE
        b.region[base:base + INBOUND_SIZE] = bytes(INBOUND_SIZE)

    def load_changed(self) -> None:
        """This host's load moved (a job submitted or finished here): refresh the
        counters once, soon (one refresh for every change in one loop pass)."""
        if self._publish_due:
            return
        if self.defer is None:
            self.publish()
            return
        self._publish_due = True
        self.defer(self.publish)

    # ------------------------------------------------------------ placement
    def _peer_row(self, host: int, target: RemoteTarget, now: float) -> LoadRow | None:
        row = self.table.get(host, now)
        if row is not None:
            return row
        # no advertisement yet: what its connect message said, load unknown
        link = getattr(target, "link", None)
        ops = getattr(link, "peer_ops", {}) if link is not None else {}
        units, st = {}, {}
        for op_id, info in ops.items():
            op = AccelOp(op_id)
            if info.units:
                k = kind_name(op)
                units[k] = info.units
                est = (info.est_fixed_ns * 1e-9 + info.est_unit_ps * 1e-12 * reference_units(op))
                st[k] = est if est > 0 else UNKNOWN_SERVICE_TIME
        if not units:
            return None
        return LoadRow(host, units, st, {}, {}, seq=0, updated=now)

    def _view(self, now: float, op: AccelOp, nbytes: int, exclude: tuple[int, ...]) -> View:
        t = LoadTable(self.table.period)
        transfer: dict[int, float] = {}
        for host, target in self.router.remotes.items():
            if host in exclude or host in self.down or not target.units(op):
                continue
            row = self._peer_row(host, target, now)
            if row is not None:
                t.rows[host] = row
                transfer[host] = self.transfer.one_way(host, nbytes)
        return View(t, now, transfer, self.own, None)

    def place(self, aq: AccelQueue, job: AccelJob, exclude: tuple[int, ...] = ()
              ) -> LocalTarget | RemoteTarget | None:
        """Where a job of ``aq`` runs: this host (the router's local target), a
        peer, a :class:`_Deferred` (its READs are out; it hands the job on
        itself), or None (nobody runs it). ``exclude``: hosts it was given back by."""
        if exclude:
            self.metrics.redispatched += 1
        now = self.clock()
        in_len, _, out_len = need_bytes(job)
        view = self._view(now, job.op, in_len + out_len, exclude)
        here = self.here_row(now)
        djob = Job(kind_name(job.op), job_size(job))
        policy = self.policy
        b = self.board
        if policy.base == "board" and (b is None or self.board_down):
            # the board's holder is down: probe the candidates' own counters meanwhile
            policy = Policy("probe", policy.d, policy.own_sends)
            self.metrics.board_fallbacks += 1
        try:
            p = plan(djob, here, view, self.rng, policy)
        except NoCandidate:
            self.metrics.no_candidate += 1
            return None
        if isinstance(p, Decision):
            return self._target(p, view, djob)
        if p.board and b is not None and b.region is not None:   # this host holds the board
            rows = decode_board(b.region, b.hosts, {h: b.slots[h] for h in p.reads if h in b.slots}, now)
            self.metrics.board_reads += 1
            try:
                dec = finish(p, view, rows, self.rng)
            except NoCandidate:      # no slot of the plan's hosts holds a current row
                self.metrics.no_candidate += 1
                return None
            return self._target(dec, view, djob)
        self.metrics.deferred += 1
        d = _Deferred(self, p, view, aq, job, exclude, now + self.read_deadline)
        self._deferred.add(d)
        if p.board and b is not None:
            holder = self.router.remotes.get(b.holder)
            read = getattr(holder, "board_read", None)
            self._tags += 1
            buf = memoryview(bytearray(board_size(b.hosts)))
            d.board = True
            if read is not None and read(self._tags, buf):
                self._reads[self._tags] = (d, b.holder, buf, now)
                d.out.add(self._tags)
                self.metrics.board_reads += 1
                self.metrics.reads += 1
            if self.rearm is not None:
                self.rearm()
            return d
        for host in p.reads:
            target = self.router.remotes.get(host)
            probe = getattr(target, "probe", None)
            self._tags += 1
            buf = memoryview(bytearray(COUNTERS_SIZE))
            if probe is not None and probe(self._tags, buf):
                self._reads[self._tags] = (d, host, buf, now)
                d.out.add(self._tags)
                self.metrics.reads += 1
            else:
                d.got[host] = None
        if self.rearm is not None:
            self.rearm()
        return d

    def _target(self, d: Decision, view: View, djob: Job) -> LocalTarget | RemoteTarget | None:
        self.counters.count(d)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", d.explain())
        if d.local:
            return self.router.local
        self.own.note(d.target, view.table.rows[d.target].seq,
                      djob.size * view.table.rows[d.target].service_time[djob.kind], view.now)
        return self.router.remotes.get(d.target)

    def _decided(self, d: _Deferred) -> None:
        """All reads of ``d`` are in (or given up): decide and hand the job on."""
        if d.done:
            return
        d.done = True
        self._deferred.discard(d)
        d.out.clear()  # reads still out stay in _reads: a late failure still marks its host down
        e = d.entry
        if e is None:
            return
        try:
            dec = finish(d.plan, d.view, d.got, self.rng)
        except NoCandidate:
            self.metrics.no_candidate += 1
            target = None
        else:
            target = self._target(dec, d.view, d.plan.job)
        route(e, target)

    def _forget(self, d: _Deferred) -> None:
        d.done = True
        self._deferred.discard(d)
        d.out.clear()

    # ------------------------------------------------------ read completions
    def read_done(self, tag: int, ok: bool) -> None:
        """A counters READ completed (PeerTarget's send completion)."""
        r = self._reads.pop(tag, None)
        if r is None:
            return
        d, host, buf, t0 = r
        d.out.discard(tag)
        now = self.clock()
        if d.done:  # decided without it (late), or its job went: only a failure matters now
            if not ok:
                self.metrics.reads_failed += 1
                self.host_down(host, "its counters READ failed")
            return
        if d.board:
            b = self.board
            if ok and b is not None:
                self.transfer.read_rtt(host, now - t0)
                try:
                    d.got.update(decode_board(buf, b.hosts, {h: b.slots[h] for h in d.plan.reads
                                                             if h in b.slots}, now))
                except WireError as ex:
                    self.metrics.reads_bad += 1
                    log.debug("board READ of host %d: %s", host, ex)
                # a torn or empty slot (None): its host is left out, as a failed read's
            elif not ok:
                self.metrics.reads_failed += 1
                self.board_down = True   # until the holder's link is up again; the table stands in
        elif ok:
            try:
                d.got[host] = decode_counters(buf, host, now)
                self.transfer.read_rtt(host, now - t0)
            except TornRead:
                # the READ raced the peer's rewrite of its counters: nothing is wrong with the
                # host, its table row stands in (as for a late read)
                self.metrics.reads_torn += 1
            except WireError as ex:
                self.metrics.reads_bad += 1
                log.debug("counters READ of host %d: %s", host, ex)
                d.got[host] = None
        else:
            self.metrics.reads_failed += 1
            self.host_down(host, "its counters READ failed")
            d.got[host] = None
        if not d.out:
            self._decided(d)

    def host_down(self, host: int, why: str) -> None:
        """``host`` failed (a READ in error, or its link went down): not a
        candidate until its link is up again; its outstanding READs fail."""
        if host not in self.down:
            log.info("scheduler: host %d marked down: %s", host, why)
        self.down.add(host)
        if self.board is not None and host == self.board.holder:
            self.board_down = True
        for tag, (d, h, _, _) in list(self._reads.items()):
            if h == host:
                del self._reads[tag]
                self.metrics.reads_failed += 1
                if d.done:
                    continue
                d.out.discard(tag)
                d.got[host] = None
                if not d.out:
                    self._decided(d)

    def host_up(self, host: int) -> None:
        self.down.discard(host)
        b = self.board
        if b is not None:
            if host == b.holder:
                self.board_down = False
                self.publish()          # this host's slot, fresh on the holder's new life
            else:
                self.board_reset(host)

    def job_done(self, host: int, nbytes: int, wire_seconds: float) -> None:
        self.transfer.job(host, nbytes, wire_seconds)

    # --------------------------------------------------------------- timers
    def next_deadline(self) -> float | None:
        ds = [d.deadline for d in self._deferred]
        return min(ds) if ds else None

    def on_timer(self, now: float) -> None:
        for d in [d for d in self._deferred if d.deadline <= now]:
            self.metrics.reads_late += len(d.out)
            self._decided(d)

    def describe(self) -> dict:
        c = self.counters
        return {"policy": self.policy.name, "decisions": c.decisions, "local": c.local, "remote": c.remote,
                "probes": c.probes, "reasons": dict(c.reasons), **self.metrics.as_dict(),
                "down": sorted(self.down), "table_rows": len(self.table.rows),
                "table_accepted": self.table.accepted, "table_stale": self.table.stale,
                "transfer": self.transfer.describe()}

