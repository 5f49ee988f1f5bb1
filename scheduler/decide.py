"""Where a job runs: the scheduling policies, sans-I/O (issue 15, "Policies").

:func:`decide` takes the job, this host's own live counters (``here``, a
:class:`~scheduler.table.LoadRow` it makes fresh), a :class:`View` (the load
table at ``now``, the one-way transfer time to each peer, this host's own
sends since each peer's row, and a ``probe`` callable that reads a peer's
live counters: an RDMA READ in the daemon, the true state in the
simulator) and a ``random.Random``; it returns a :class:`Decision`: the
target host, every candidate considered with its estimate, the number of
probes it made, and why. Same inputs and rng state, same decision.

The daemon cannot read a peer's counters synchronously (a READ is a round
trip), so :func:`decide` is two steps it can take apart: :func:`plan` gives a
:class:`Decision` at once, or a :class:`Plan` naming the hosts to read;
:func:`finish` decides once the reads are in (a failed read: that host is
not chosen). The simulator reads at once (:func:`decide` does both steps).

The cost of running a job of kind ``k`` on host ``h`` (:func:`estimate`)::

    cost = 2 x transfer(h)  +  wait(h)  +  size x service_time(h, k)

with transfer 0 for this host, and ``wait`` the expected wait for a unit
when ``n`` jobs' worth of work (queued work / service time, plus this
host's own sends since the row if accounted) are in a system of ``u``
units: ``max(0, n - u + 1) x service_time / u`` (for one unit, the sum of
the service times queued ahead). With perfect information this is the
shortest-expected-delay cost (least work left when the counters are exact
seconds of work). The job's own service is counted on both sides: on hosts
of equal speed it cancels out and the comparison is the original rule's
(local wait against 2 x transfer + the remote host's processing); on hosts
of different speeds it is what differs.

Policies (:func:`parse_policy`; ``+own`` adds own-send accounting to the
table-based ones, ``probe:D`` sets the number of probed candidates):

* ``seed``: the original rule exactly: run here if a local unit of the kind
  is idle; else the best remote estimate from the (possibly stale) table
  (equal ones broken at random) against the local cost; here wins ties.
* ``local``: always here; a host without the kind picks a random host that
  has it.
* ``random``: uniform over the hosts with the kind (here included).
* ``p2c``: the cheapest of here and 2 random remote candidates, their costs
  from the table.
* ``probe``: the cheapest of here and ``d`` random remote candidates whose
  counters are read fresh at decision time (``d`` probes per decision; none
  when here is idle and no host is fast enough to beat it even idle).
  Fresh counters miss the jobs still on their way, so ``+own`` adds this
  host's own sends to the candidate within the last one-way transfer time.
* ``guided``: as ``probe``, but the first probed candidate is the table's
  cheapest (with own-send accounting if ``+own``), the other ``d - 1`` random:
  the table says where to look, the probe whether it is still true.
* ``board``: one READ of a board, a region on one host where every
  accelerator host keeps its live counters and every dispatcher announces
  the work it sends (one RDMA FETCH_ADD on the target's slot, as it sends):
  the cheapest of here and every candidate, all read fresh in one
  operation, and counting the jobs still on their way to each (what no
  per-host probe sees: the herding of many dispatchers within one transfer
  time). One READ and one atomic per remote job; none when here is idle and
  no host is fast enough to beat it even idle.
* ``oracle``: reference only (perfect information: every host's true state,
  uncounted); not a daemon policy.

A host without accelerators is never a candidate; a job nobody can run
raises :class:`~scheduler.errors.NoCandidate`.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from scheduler.errors import NoCandidate, SchedulerError, UnknownPolicy
from scheduler.table import LoadRow, LoadTable, OwnSends

#: the policies a daemon may run
DAEMON_POLICIES = ("seed", "local", "random", "p2c", "probe", "guided", "board")
#: policies that exist only as references for the simulator
REFERENCE_POLICIES = ("oracle",)
#: what ``--policy`` means when not given: the best measured (docs: issue 15's closing note)
DEFAULT_POLICY = "board"
#: candidates sampled by ``p2c`` and (by default) by ``probe`` and ``guided``
DEFAULT_D = 2
_PROBING = ("probe", "guided")


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy name: the base rule, probed candidates, own-send accounting."""

    base: str
    d: int = DEFAULT_D
    own_sends: bool = False

    @property
    def name(self) -> str:
        d = f":{self.d}" if self.base in _PROBING and self.d != DEFAULT_D else ""
        return f"{self.base}{d}{'+own' if self.own_sends else ''}"

    @property
    def reference(self) -> bool:
        return self.base in REFERENCE_POLICIES


def parse_policy(name: str, allow_reference: bool = True) -> Policy:
    """``seed``, ``p2c+own``, ``probe:3``, ... as a :class:`Policy`; anything else
    raises :class:`UnknownPolicy` naming it (so does ``oracle`` if not ``allow_reference``)."""
    known = DAEMON_POLICIES + (REFERENCE_POLICIES if allow_reference else ())
    base, own = name, False
    if base.endswith("+own"):
        base, own = base[: -len("+own")], True
    d = DEFAULT_D
    head, colon, digits = base.partition(":")
    if colon and head in _PROBING:
        if not digits.isdigit() or int(digits) < 1:
            raise UnknownPolicy(name, known)
        base, d = head, int(digits)
    if base not in known:
        raise UnknownPolicy(name, known)
    return Policy(base, d, own)


@dataclass(frozen=True, slots=True)
class Job:
    """What the decision needs of a job: its kind (the accelerator operation) and its
    size, in multiples of the kind's mean service time (1 when not known)."""

    kind: str
    size: float = 1.0


@dataclass(frozen=True, slots=True)
class View:
    """What a host knows at ``now`` besides its own counters."""

    table: LoadTable
    now: float
    #: one-way transfer time to a peer: one number for all, or per host
    transfer: float | Mapping[int, float]
    own: OwnSends | None = None
    #: reads a peer's live counters (RDMA READ / the simulator's truth)
    probe: Callable[[int], LoadRow] | None = None

    def transfer_to(self, host: int) -> float:
        if isinstance(self.transfer, Mapping):
            return self.transfer[host]
        return self.transfer


@dataclass(frozen=True, slots=True)
class Estimate:
    """One candidate's estimated cost, and where it came from."""

    host: int
    wait: float
    service: float
    transfer: float
    #: read at decision time (here, a probe, the oracle) rather than from the table
    fresh: bool
    #: own sends (seconds) added to the row's queued work
    own: float = 0.0

    @property
    def cost(self) -> float:
        return 2 * self.transfer + self.wait + self.service

    def __str__(self) -> str:
        src = "fresh" if self.fresh else "table"
        own = f" own={self.own:.3g}" if self.own else ""
        return (f"host {self.host}: {self.cost:.3g} = 2x{self.transfer:.3g} + wait {self.wait:.3g}"
                f" + service {self.service:.3g} ({src}{own})")


@dataclass(frozen=True, slots=True)
class Decision:
    """The choice, the candidates considered and why: one debug line (:meth:`explain`)."""

    policy: str
    here: int
    target: int
    candidates: tuple[Estimate, ...]
    probes: int
    reason: str

    @property
    def local(self) -> bool:
        return self.target == self.here

    def explain(self) -> str:
        cands = "; ".join(str(c) for c in self.candidates) or "none"
        where = "here" if self.local else f"host {self.target}"
        return (f"{self.policy} on host {self.here}: {where} ({self.reason}); probes {self.probes};"
                f" candidates: {cands}")


@dataclass(slots=True)
class DecisionCounters:
    """Every decision counted: how many, where they went, probes made, by reason."""

    decisions: int = 0
    local: int = 0
    remote: int = 0
    probes: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def count(self, d: Decision) -> None:
        self.decisions += 1
        if d.local:
            self.local += 1
        else:
            self.remote += 1
        self.probes += d.probes
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1


def estimate(row: LoadRow, kind: str, transfer: float, fresh: bool, own: float = 0.0,
             size: float = 1.0) -> Estimate:
    """The cost of one job of ``kind`` and ``size`` on the host ``row`` describes (module docstring)."""
    s = row.service_time[kind]
    u = row.units[kind]
    n = row.jobs(kind, own)
    wait = max(0.0, n - u + 1) * s / u
    return Estimate(row.host, wait, size * s, transfer, fresh, own)


def _cheapest(ests: list[Estimate], rng: random.Random) -> Estimate:
    best = min(e.cost for e in ests)
    ties = [e for e in ests if e.cost == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


@dataclass(frozen=True, slots=True)
class Plan:
    """A probing decision waiting for its reads: the hosts to read (in order),
    and what :func:`finish` needs to choose once their counters are in.

    The daemon issues one RDMA READ per host in :attr:`reads` and calls
    :func:`finish` with what came back (None for a read that failed; a late
    one left out, the table's row standing in); the
    simulator (and :func:`decide`) reads at once."""

    policy: Policy
    job: Job
    here: int
    #: this host's own estimate (None: it has no unit of the kind)
    mine: Estimate | None
    #: hosts whose counters to read, in order
    reads: tuple[int, ...]
    #: every live remote candidate from the table (a failed read's fallback)
    remote: tuple[int, ...]
    #: the reads are one READ of the board (``board``), not one per host
    board: bool = False


def plan(job: Job, here: LoadRow, view: View, rng: random.Random, policy: Policy | str) -> Decision | Plan:
    """Where ``job``, submitted on host ``here.host``, runs (module docstring): a
    :class:`Decision` when the policy needs no fresh counters for it, else a
    :class:`Plan` naming the hosts to read; :func:`finish` completes it. The
    same inputs and rng state give the same result."""
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    kind = job.kind
    now = view.now
    mine = estimate(here, kind, 0.0, fresh=True, size=job.size) if here.has(kind) else None
    remote = view.table.candidates(kind, now, exclude=here.host)
    if mine is None and not remote:
        raise NoCandidate(f"no host runs {kind!r} (host {here.host} has none, its table none)")

    def table_est(row: LoadRow) -> Estimate:
        own = view.own.pending(row.host, row.seq) if pol.own_sends and view.own is not None else 0.0
        return estimate(row, kind, view.transfer_to(row.host), fresh=False, own=own, size=job.size)

    def choose(ests: list[Estimate], probes: int, reason: str) -> Decision:
        return _choose(pol, here.host, mine, ests, probes, reason, rng)

    base = pol.base
    if base == "seed":
        if here.idle(kind):
            assert mine is not None
            return Decision(pol.name, here.host, here.host, (mine,), 0, "local idle")
        if not remote:
            assert mine is not None
            return Decision(pol.name, here.host, here.host, (mine,), 0, "no remote")
        return choose([table_est(r) for r in remote], 0, "cheapest in table")
    if base == "local":
        if mine is not None:
            return Decision(pol.name, here.host, here.host, (mine,), 0, "local")
        row = rng.choice(remote)
        return Decision(pol.name, here.host, row.host, (table_est(row),), 0, "no local unit: random")
    if base == "random":
        pool: list[LoadRow] = [here, *remote] if mine is not None else remote
        row = rng.choice(pool)
        est = mine if row is here and mine is not None else table_est(row)
        return Decision(pol.name, here.host, row.host, (est,), 0, "random")
    if base == "p2c":
        sample = rng.sample(remote, min(DEFAULT_D, len(remote)))
        if not sample:
            assert mine is not None
            return Decision(pol.name, here.host, here.host, (mine,), 0, "no remote")
        return choose([table_est(r) for r in sample], 0, "best of sampled (table)")
    if base in ("probe", "guided", "oracle", "board"):
        if (base != "oracle" and mine is not None and here.idle(kind)
                and all(mine.cost <= 2 * view.transfer_to(r.host) + job.size * r.service_time[kind]
                        for r in remote)):
            # here is idle and no host could beat it even if idle: no read can change the choice
            return Decision(pol.name, here.host, here.host, (mine,), 0, "local idle, none faster")
        if base in ("oracle", "board"):
            sample = remote
        elif base == "probe" or not remote:
            sample = rng.sample(remote, min(pol.d, len(remote)))
        else:
            best = _cheapest([table_est(r) for r in remote], rng).host
            rest = [r for r in remote if r.host != best]
            sample = [view.table.rows[best], *rng.sample(rest, min(pol.d - 1, len(rest)))]
        if not sample:
            assert mine is not None
            return Decision(pol.name, here.host, here.host, (mine,), 0, "no remote")
        return Plan(pol, job, here.host, mine, tuple(r.host for r in sample), tuple(r.host for r in remote),
                    board=base == "board")
    raise UnknownPolicy(pol.base, DAEMON_POLICIES + REFERENCE_POLICIES)


def finish(p: Plan, view: View, read: Mapping[int, LoadRow | None], rng: random.Random) -> Decision:
    """The decision of a :class:`Plan` once its reads are in: ``read[host]`` is
    the counters read of each host of ``p.reads``; None: the read failed, and
    that host is not chosen; missing: the read is late, and the host's table
    row stands in for it."""
    pol, job, kind = p.policy, p.job, p.job.kind
    ests = []
    for host in p.reads:
        d = view.transfer_to(host)
        if host in read:
            fresh = read[host]
            if fresh is not None and fresh.has(kind):
                own = (view.own.in_flight(host, view.now, d)
                       if pol.own_sends and view.own is not None and pol.base != "oracle" else 0.0)
                ests.append(estimate(fresh, kind, d, fresh=True, own=own, size=job.size))
        else:
            row = view.table.get(host, view.now)
            if row is not None and row.has(kind):
                own = (view.own.pending(host, row.seq)
                       if pol.own_sends and view.own is not None else 0.0)
                ests.append(estimate(row, kind, d, fresh=False, own=own, size=job.size))
    probes = 0 if pol.base == "oracle" else 1 if p.board else len(p.reads)
    if not ests:
        if p.mine is not None:
            return Decision(pol.name, p.here, p.here, (p.mine,), probes, "probes found none")
        # nobody read could run it: any other live candidate, unread
        rest = [h for h in p.remote if h not in p.reads]
        if not rest:
            raise NoCandidate(f"no host runs {kind!r}: every read of {list(p.reads)} failed")
        row = view.table.rows[rng.choice(rest)]
        est = estimate(row, kind, view.transfer_to(row.host), fresh=False, size=job.size)
        return Decision(pol.name, p.here, row.host, (est,), probes, "probes found none: random")
    why = {"probe": "best of probed", "guided": "best of probed (table's best + random)",
           "oracle": "shortest expected delay", "board": "best on the board"}[pol.base]
    return _choose(pol, p.here, p.mine, ests, probes, why, rng)


def _choose(pol: Policy, here: int, mine: Estimate | None, ests: list[Estimate], probes: int,
            reason: str, rng: random.Random) -> Decision:
    pick = _cheapest(ests, rng)
    if mine is not None and mine.cost <= pick.cost:
        pick = mine
    cands = tuple(ests) if mine is None else (mine, *ests)
    return Decision(pol.name, here, pick.host, cands, probes, reason)


def decide(job: Job, here: LoadRow, view: View, rng: random.Random, policy: Policy | str) -> Decision:
    """Where ``job``, submitted on host ``here.host``, runs (module docstring):
    :func:`plan`, then each read at once through ``view.probe``, then :func:`finish`."""
    p = plan(job, here, view, rng, policy)
    if isinstance(p, Decision):
        return p
    if view.probe is None:
        raise SchedulerError(f"policy {p.policy.name!r} needs view.probe (live counters)")
    return finish(p, view, {h: view.probe(h) for h in p.reads}, rng)
