"""Tenants of the back-end daemon: who connected, and what each may use.

A *tenant* is the peer uid of a vhost-user connection (SO_PEERCRED, read by
:mod:`vhost_user.server` at accept). This module is sans-I/O: plain values
and bookkeeping, no sockets and no clock.

- :class:`ConnectionInfo`: the identity of one accepted connection (pid, uid,
  gid from the kernel, the socket path, a connection id). The server logs it
  and hands it to the device factory (``device_factory(info)``).
- :class:`TenantPolicy`: every limit, configured in one place (command line
  and/or a TOML file, ``vrdma backend --config FILE``): connections per uid
  and host-wide, the handshake timeout, per-connection object caps, pinned
  bytes and in-flight work, and host-wide budgets per uid.
- :class:`TenantLedger` / :class:`TenantAccount`: the running totals. One
  ledger per daemon; one account per connection, charged by the device when
  it creates an object and released when the object goes, the device resets
  or the connection closes (:meth:`TenantAccount.close` releases whatever is
  left, so no path can leak a budget).

Why here: the server (vhost_user) enforces admission and the handshake
timeout and knows the peer; the device (virtio_rdma) charges objects; both
import vhost_user already, and the CLI (vrdma) only parses options into a
:class:`TenantPolicy`.

Statuses (docs/virtio-rdma.md "Status codes"): a connection's own limit
(an object cap, its pinned bytes, its in-flight work) is ENOMEM; its uid's
host-wide budget, shared with the uid's other connections, is ENOSPC; so is a
*tenant quota* (shared by the tenant's connections, below).

Tenants (issue #18, docs/tenants.md): a connection belongs to the tenant whose
``[[tenant]]`` entry names the socket it connected to (``socket = PATH``: one
socket per QEMU guest or Slurm job, ``vrdma backend -s A -s B``), else the one
naming its peer uid (``uid = N``), else the default tenant ``uid:N`` (class
normal, weight 1, no quotas). A :class:`TenantSpec` gives a priority
:class:`Class` and a weight (the accelerators' fair queue) and quotas over all
the tenant's connections: QPs, CQs, MRs, pinned bytes (ENOSPC), in-flight
accelerator jobs and accelerator-seconds per minute (a :class:`TokenBucket`
charged with each job's service time; the job completes
``AccelStatus.QUOTA_EXCEEDED``). :meth:`TenantLedger.reload` swaps the whole
configuration (SIGHUP) and :meth:`TenantLedger.set_tenant` changes one
tenant live (the admin socket): accounts read the ledger's current values on
every charge, so a lowered limit refuses *new* objects and jobs and never
destroys existing ones (usage above a lowered quota stays until released).
A live change is an *override* of the fields it names: it is applied over the
file's entry (or the default tenant), survives reloads, and goes only with
:meth:`TenantLedger.reset_tenant`. :meth:`TenantLedger.live_state` and
:meth:`TenantLedger.restore_live` encode and validate the overrides as plain
JSON-able values (the daemon keeps them in its state directory).
"""
from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from vhost_user.errors import VhostUserError

GiB = 1 << 30


class PolicyError(VhostUserError):
    """A tenant policy value or configuration file is invalid."""

    errno = _errno.EINVAL


class LimitExceeded(VhostUserError):
    """A charge would pass a limit: ``errno`` is ENOMEM (the connection's own
    limit) or ENOSPC (its uid's host-wide budget)."""

    def __init__(self, message: str, errno: int, resource: Resource):
        super().__init__(message)
        self.errno = errno
        self.resource = resource


@dataclass(frozen=True)
class ConnectionInfo:
    """Who is on the other end of one accepted connection (SO_PEERCRED)."""

    conn_id: int
    pid: int
    uid: int
    gid: int
    path: str

    @property
    def name(self) -> str:
        return f"conn{self.conn_id}"

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid} uid {self.uid} gid {self.gid} on {self.path})"


class Resource(enum.Enum):
    """What an account is charged for."""

    QP = "qp"
    CQ = "cq"
    MR = "mr"
    PD = "pd"
    PINNED_BYTES = "pinned_bytes"  # sum of registered MR lengths
    WQES = "wqes"                  # in-flight work: SQ + RQ ring entries of the connection's QPs


#: objects that count towards a uid's ``uid_max_objects``
OBJECTS = (Resource.QP, Resource.CQ, Resource.MR, Resource.PD)


@dataclass(frozen=True)
class TenantPolicy:
    """Every limit the daemon applies to its tenants. Defaults: as generous as
    before where that is safe; object caps sized so a connection filled to them
    costs the daemon a few MB (bench/isolation_bench.py measures it)."""

    #: connections served at once, all uids together (refused at accept past it)
    max_connections: int = 256
    #: connections served at once per peer uid (refused at accept past it)
    max_connections_per_uid: int = 64
    #: seconds a connection may take to start a ring (finish the vhost-user
    #: setup); closed and counted if it has not (0: no timeout)
    handshake_timeout: float = 10.0
    # per-connection caps (the device reports the object caps in QUERY_DEVICE);
    # daemon memory per object, measured: QP ~2.2 KiB, CQ ~0.5, MR ~0.6, PD ~0.3,
    # so a connection filled to these costs ~5 MB (the old 4096/4096/8192/1024: ~16 MB);
    # 1024 QPs and CQs fit besides a guest's own endpoints (tests/guest_lib)
    max_qp: int = 1536
    max_cq: int = 1536
    max_mr: int = 2048
    max_pd: int = 256
    #: registered ("pinned") bytes per connection
    max_pinned_bytes: int = 1 << 40
    #: in-flight work per connection: SQ + RQ ring entries of all its QPs
    max_wqes: int = 1 << 20
    # host-wide budgets per uid (sums over that uid's connections)
    uid_max_objects: int = 8192   # at most ~18 MB of daemon memory per uid (all QPs)
    uid_max_pinned_bytes: int = 4 << 40
    uid_max_wqes: int = 1 << 22

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PolicyError(f"tenant policy {f.name}={v!r}: not a non-negative number")
            if f.type == "int" and not isinstance(v, int):
                raise PolicyError(f"tenant policy {f.name}={v!r}: not an integer")

    @classmethod
    def from_mapping(cls, values: dict, base: TenantPolicy | None = None) -> TenantPolicy:
        """``base`` (default: the defaults) with ``values`` (option name -> value) replaced;
        an unknown name is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in values:
            if k not in names:
                raise PolicyError(f"unknown tenant policy option {k!r} (known: {', '.join(sorted(names))})")
        return dataclasses.replace(base or cls(), **values)

    @classmethod
    def from_toml(cls, text: str, base: TenantPolicy | None = None) -> TenantPolicy:
        """Parse the ``[tenants]`` table of a daemon configuration file."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"configuration file: {e}") from None
        table = doc.get("tenants", {})
        if not isinstance(table, dict):
            raise PolicyError("configuration file: [tenants] is not a table")
        return cls.from_mapping({k.replace("-", "_"): v for k, v in table.items()}, base)

    def cap(self, r: Resource) -> int:
        return getattr(self, "max_" + r.value)

    def uid_budget(self, r: Resource) -> int | None:
        if r is Resource.PINNED_BYTES:
            return self.uid_max_pinned_bytes
        if r is Resource.WQES:
            return self.uid_max_wqes
        return None  # objects: uid_max_objects over all four kinds


class Class(enum.IntEnum):
    """A tenant's priority class on the accelerators: a higher class's waiting
    jobs go first (then weighted fairness within the class, and aging)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, value) -> Class:
        if isinstance(value, Class):
            return value
        if isinstance(value, str):
            for c in cls:
                if c.name.lower() == value.strip().lower():
                    return c
        raise PolicyError(f"tenant class {value!r}: not one of {', '.join(c.name.lower() for c in cls)}")


#: tenant quotas (all optional; None: no quota), over all the tenant's connections
QUOTAS = ("max_qp", "max_cq", "max_mr", "max_pinned_bytes", "max_accel_jobs", "accel_seconds_per_minute")
#: the quotas that are object counts or bytes, by the Resource they limit
QUOTA_RESOURCE = {"max_qp": Resource.QP, "max_cq": Resource.CQ, "max_mr": Resource.MR,
                  "max_pinned_bytes": Resource.PINNED_BYTES}
MAX_WEIGHT = 1000.0
MAX_QUOTA = 1 << 62
MAX_ACCEL_SECONDS_PER_MINUTE = 60.0 * 4096  # a host with 4096 busy accelerator units
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-@")


def _check_quota(name: str, v, where: str):
    if v is None:
        return None
    if name == "accel_seconds_per_minute":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0 <= v <= MAX_ACCEL_SECONDS_PER_MINUTE:
            raise PolicyError(f"{where} {name}={v!r}: not a number in 0..{MAX_ACCEL_SECONDS_PER_MINUTE:g}")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_QUOTA:
        raise PolicyError(f"{where} {name}={v!r}: not an integer in 0..2**62")
    return v


@dataclass(frozen=True)
class TenantSpec:
    """One tenant's configuration: who it is (``uid`` and/or ``socket``), its
    class and weight on the accelerators, and its quotas (None: none)."""

    name: str
    uid: int | None = None
    socket: str | None = None
    klass: Class = Class.NORMAL
    weight: float = 1.0
    max_qp: int | None = None
    max_cq: int | None = None
    max_mr: int | None = None
    max_pinned_bytes: int | None = None
    max_accel_jobs: int | None = None
    accel_seconds_per_minute: float | None = None

    def __post_init__(self):
        n = self.name
        if not isinstance(n, str) or not 0 < len(n) <= 64 or not set(n) <= _NAME_CHARS:
            raise PolicyError(f"tenant name {n!r}: not 1..64 characters of [A-Za-z0-9_.:@-]")
        where = f"tenant {n!r}"
        if self.uid is not None and (isinstance(self.uid, bool) or not isinstance(self.uid, int)
                                     or not 0 <= self.uid < (1 << 32) - 1):
            raise PolicyError(f"{where} uid={self.uid!r}: not a uid (0..4294967294)")
        if self.socket is not None and (not isinstance(self.socket, str) or not self.socket.startswith("/")
                                        or "\0" in self.socket or len(self.socket) > 107):
            raise PolicyError(f"{where} socket={self.socket!r}: not an absolute socket path")
        object.__setattr__(self, "klass", Class.parse(self.klass))
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or not 0 < w <= MAX_WEIGHT:
            raise PolicyError(f"{where} weight={w!r}: not a number in (0, {MAX_WEIGHT:g}]")
        object.__setattr__(self, "weight", float(w))
        for q in QUOTAS:
            object.__setattr__(self, q, _check_quota(q, getattr(self, q), where))

    @classmethod
    def from_mapping(cls, values: Mapping) -> TenantSpec:
        """A spec from one ``[[tenant]]`` table (``class`` for the class; '-' or '_')."""
        if not isinstance(values, Mapping):
            raise PolicyError(f"configuration file: a [[tenant]] entry is not a table: {values!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"klass"} | {"class"}
        kw = {}
        for k, v in values.items():
            key = k.replace("-", "_")
            if key not in known:
                raise PolicyError(f"tenant {values.get('name')!r}: unknown option {k!r} "
                                  f"(known: {', '.join(sorted(known))})")
            kw["klass" if key == "class" else key] = v
        if "name" not in kw:
            raise PolicyError(f"a [[tenant]] entry has no name: {dict(values)!r}")
        return cls(**kw)

    def quota(self, r: Resource) -> int | None:
        for name, res in QUOTA_RESOURCE.items():
            if res is r:
                return getattr(self, name)
        return None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class"] = self.klass.name.lower()
        del d["klass"]
        return d


#: seconds a job may wait before it is served one class higher (per period waited), so a
#: low tenant still progresses under a saturating high one (0: no aging)
DEFAULT_AGING_SECONDS = 1.0


@dataclass(frozen=True)
class TenantConfig:
    """The daemon's whole tenant configuration: the per-connection/per-uid
    :class:`TenantPolicy`, the tenants, and the accelerators' aging period."""

    policy: TenantPolicy = field(default_factory=TenantPolicy)
    tenants: tuple[TenantSpec, ...] = ()
    aging_seconds: float = DEFAULT_AGING_SECONDS

    def __post_init__(self):
        a = self.aging_seconds
        if (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                or not 0 <= a <= 3600):
            raise PolicyError(f"fairness aging_seconds={a!r}: not a number of seconds in 0..3600")
        seen: dict = {}
        for t in self.tenants:
            for key in (("name", t.name), ("uid", t.uid), ("socket", t.socket)):
                if key[1] is None:
                    continue
                if key in seen:
                    raise PolicyError(f"tenant {t.name!r}: {key[0]} {key[1]!r} is already "
                                      f"tenant {seen[key]!r}'s")
                seen[key] = t.name

    @classmethod
    def from_toml(cls, text: str, base: TenantPolicy | None = None) -> TenantConfig:
        """``[tenants]`` (the TenantPolicy), ``[[tenant]]`` entries and ``[fairness]``."""
        policy = TenantPolicy.from_toml(text, base)
        doc = tomllib.loads(text)  # parsed fine above
        entries = doc.get("tenant", [])
        if not isinstance(entries, list):
            raise PolicyError("configuration file: 'tenant' must be an array of tables ([[tenant]])")
        fair = doc.get("fairness", {})
        if not isinstance(fair, dict):
            raise PolicyError("configuration file: [fairness] is not a table")
        for k in fair:
            if k.replace("-", "_") != "aging_seconds":
                raise PolicyError(f"unknown [fairness] option {k!r} (known: aging_seconds)")
        aging = cast(float, fair.get("aging_seconds", fair.get("aging-seconds", DEFAULT_AGING_SECONDS)))
        return cls(policy, tuple(TenantSpec.from_mapping(e) for e in entries), aging)

    @classmethod
    def from_file(cls, path: str, base: TenantPolicy | None = None) -> TenantConfig:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"configuration file {path}: {e}") from None
        return cls.from_toml(text, base)


class TokenBucket:
    """Accelerator-seconds per minute: ``rate`` seconds of service per minute,
    at most one minute's worth banked. Charged after each job with its service
    time (the balance may go negative: a long job is paid for in full); a new
    job is admitted while the balance is positive. Sans-I/O: ``now`` given."""

    __slots__ = ("per_minute", "tokens", "t")

    def __init__(self, per_minute: float, now: float):
        self.per_minute = per_minute
        self.tokens = per_minute
        self.t = now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.per_minute, self.tokens + (now - self.t) * self.per_minute / 60.0)
        self.t = max(self.t, now)

    def set_rate(self, per_minute: float, now: float) -> None:
        self._refill(now)
        self.per_minute = per_minute
        self.tokens = min(self.tokens, per_minute)

    def admit(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def charge(self, seconds: float, now: float) -> None:
        self._refill(now)
        self.tokens -= seconds


@dataclass
class TenantUsage:
    """A tenant's running totals over all its connections (and remote jobs run for it)."""

    used: dict = field(default_factory=dict)          # Resource -> amount
    accel_in_flight: int = 0
    bucket: TokenBucket | None = None
    quota_hits: dict = field(default_factory=dict)    # quota name -> refusals
    connections: int = 0
    #: RDMA bytes (sent, received) of its devices that are gone (live ones: their counters)
    rdma_closed: list = field(default_factory=lambda: [0, 0])

    def hit(self, quota: str) -> None:
        self.quota_hits[quota] = self.quota_hits.get(quota, 0) + 1


@dataclass
class LimitCounters:
    """How often a limit refused something (per connection, summed per uid)."""

    cap_hits: dict = field(default_factory=dict)     # Resource -> count (ENOMEM)
    budget_hits: dict = field(default_factory=dict)  # Resource -> count (ENOSPC)

    def hit(self, kind: str, r: Resource) -> None:
        d = self.cap_hits if kind == "cap" else self.budget_hits
        d[r] = d.get(r, 0) + 1

    def total(self) -> int:
        return sum(self.cap_hits.values()) + sum(self.budget_hits.values())


@dataclass
class UidUsage:
    used: dict = field(default_factory=dict)  # Resource -> amount, over all its connections
    counters: LimitCounters = field(default_factory=LimitCounters)

    def objects(self) -> int:
        return sum(self.used.get(r, 0) for r in OBJECTS)


class TenantLedger:
    """The daemon's running totals per uid and per tenant (one instance, shared
    by all its connections; not thread-safe: used from the daemon's event loop)
    and its current :class:`TenantConfig` (replaced by :meth:`reload`)."""

    def __init__(self, policy: TenantPolicy | None = None, config: TenantConfig | None = None):
        if config is None:
            config = TenantConfig(policy or TenantPolicy())
        self.config = config
        self.policy = config.policy
        self.uids: dict[int, UidUsage] = {}
        self.tenants: dict[str, TenantUsage] = {}
        self._specs: dict[str, TenantSpec] = {}
        self._by_socket: dict[str, TenantSpec] = {}
        self._by_uid: dict[int, TenantSpec] = {}
        #: live overrides (set_tenant): tenant name -> {TenantSpec field: value}, applied over
        #: the file's entry; kept across reloads until reset_tenant
        self._live: dict[str, dict[str, Any]] = {}
        self._merged: dict[str, TenantSpec] = {}  # spec() of the tenants with overrides
        self.reloads = 0
        #: open accounts (their devices' byte counters are read by rdma_bytes)
        self.accounts: set[TenantAccount] = set()
        #: called with no argument after a reload or a live change (e.g. to log it)
        self.on_change: list = []
        self._index()

    def _index(self) -> None:
        self._specs = {t.name: t for t in self.config.tenants}
        self._by_socket = {t.socket: t for t in self.config.tenants if t.socket is not None}
        self._by_uid = {t.uid: t for t in self.config.tenants if t.uid is not None}

    def _changed(self, now: float | None) -> None:
        self._merged.clear()
        self._rebucket(now)
        for fn in list(self.on_change):
            fn()

    # -- configuration
    def reload(self, config: TenantConfig, now: float | None = None) -> None:
        """Apply a new configuration (SIGHUP): new limits apply to the next charge;
        nothing held is taken back; live overrides stay applied over the new entries."""
        self.config = config
        self.policy = config.policy
        self._index()
        self.reloads += 1
        self._changed(now)

    def set_tenant(self, name: str, *, klass: Class | str | None = None, weight: float | None = None,
                   now: float | None = None, **quotas) -> TenantSpec:
        """Change tenant ``name``'s class, weight or quotas live (the admin socket's
        ``tenant set``): validated like the file (PolicyError naming the bad value);
        a quota of None removes it. The fields set override the file's entry, across
        reloads, until :meth:`reset_tenant`."""
        for q in quotas:
            if q not in QUOTAS:
                raise PolicyError(f"unknown tenant quota {q!r} (known: {', '.join(QUOTAS)})")
        changes: dict = dict(quotas)
        if klass is not None:
            changes["klass"] = klass
        if weight is not None:
            changes["weight"] = weight
        new = dataclasses.replace(self.spec(name), **changes)  # validates (PolicyError)
        live = self._live.setdefault(name, {})
        live.update({k: getattr(new, k) for k in changes})
        self._changed(now)
        return new

    def reset_tenant(self, name: str | None = None, now: float | None = None) -> dict[str, list[str]]:
        """Drop tenant ``name``'s live overrides (None: every tenant's), so the file's
        entry applies again; returns {tenant: [fields dropped]} (empty: none had any)."""
        if name is None:
            dropped = {n: sorted(_field_name(k) for k in v) for n, v in self._live.items()}
            self._live.clear()
        else:
            v = self._live.pop(name, None)
            dropped = {} if v is None else {name: sorted(_field_name(k) for k in v)}
        if dropped:
            self._changed(now)
        return dropped

    def overrides(self, name: str) -> list[str]:
        """The fields of tenant ``name`` set live (``class``, ``weight``, quota names)."""
        return sorted(_field_name(k) for k in self._live.get(name, ()))

    def live_state(self) -> dict[str, dict[str, Any]]:
        """The live overrides as JSON-able values ({tenant: {field: value}}; class by name)."""
        return {n: {_field_name(k): (v.name.lower() if isinstance(v, Class) else v) for k, v in d.items()}
                for n, d in sorted(self._live.items())}

    def restore_live(self, state: Any, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Apply overrides saved by :meth:`live_state` (a restarted daemon): all of them
        or, if any tenant name, field or value is invalid, none (PolicyError naming it)."""
        if not isinstance(state, dict):
            raise PolicyError(f"tenant overrides: {str(state)[:64]!r} is not a mapping of tenants")
        live: dict[str, dict[str, Any]] = {}
        for name, fields in state.items():
            if not isinstance(fields, dict):
                raise PolicyError(f"tenant overrides of {str(name)[:64]!r}: not a mapping of fields")
            kw: dict[str, Any] = {}
            for k, v in fields.items():
                if k not in ("class", "weight", *QUOTAS):
                    raise PolicyError(f"tenant overrides of {str(name)[:64]!r}: "
                                      f"unknown field {str(k)[:64]!r}")
                kw["klass" if k == "class" else k] = v
            spec = TenantSpec(name, **kw)  # validates the name and every value (PolicyError)
            live[spec.name] = {k: getattr(spec, k) for k in kw}
        self._live = live
        self._changed(now)
        return self.live_state()

    def spec(self, name: str) -> TenantSpec:
        """Tenant ``name``'s current configuration: its entry (the default one if it
        has none) with its live overrides applied."""
        s = self._specs.get(name)
        if s is None:
            s = TenantSpec(name)
        live = self._live.get(name)
        if not live:
            return s
        merged = self._merged.get(name)
        if merged is None:  # replace() validates: once per change, not per charge
            merged = self._merged[name] = dataclasses.replace(s, **live)
        return merged

    def resolve(self, info: ConnectionInfo | None) -> str:
        """The tenant of a connection: by its socket, else its uid, else ``uid:N``."""
        if info is None:  # an in-process device without a connection
            return "uid:-1"
        t = self._by_socket.get(info.path) or self._by_uid.get(info.uid)
        return t.name if t is not None else f"uid:{info.uid}"

    def name_for_uid(self, uid: int) -> str:
        """The tenant a connection of ``uid`` belongs to unless its socket names another."""
        t = self._by_uid.get(uid)
        return t.name if t is not None else f"uid:{uid}"

    def specs(self) -> dict[str, TenantSpec]:
        """Every tenant configured or seen, by name, with its current configuration."""
        names = set(self._specs) | set(self.tenants) | set(self._live)
        return {n: self.spec(n) for n in sorted(names)}

    # -- usage
    def usage(self, uid: int) -> UidUsage:
        u = self.uids.get(uid)
        if u is None:
            u = self.uids[uid] = UidUsage()
        return u

    def tenant(self, name: str) -> TenantUsage:
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = TenantUsage()
        return t

    def account(self, info: ConnectionInfo | None) -> TenantAccount:
        """A new account for one connection (``info`` None: an anonymous tenant, uid -1)."""
        return TenantAccount(self, -1 if info is None else info.uid, self.resolve(info))

    def rdma_bytes(self) -> dict[str, tuple[int, int]]:
        """Cumulative RDMA bytes (sent, received) per tenant since the daemon started:
        its closed devices' and its live devices' counters (call on the event loop)."""
        out = {name: (t.rdma_closed[0], t.rdma_closed[1]) for name, t in self.tenants.items()}
        for a in self.accounts:
            m = a.byte_counters
            if m is not None:
                s, r = out.get(a.tenant, (0, 0))
                out[a.tenant] = (s + m.bytes_sent, r + m.bytes_received)
        return out

    def quota_hits(self) -> dict[str, dict[str, int]]:
        """Cumulative refusals per tenant and quota since the daemon started."""
        return {n: dict(t.quota_hits) for n, t in self.tenants.items() if t.quota_hits}

    def totals(self, uid: int) -> dict[Resource, int]:
        u = self.uids.get(uid)
        return {r: (u.used.get(r, 0) if u else 0) for r in Resource}

    def classify(self, name: str) -> tuple[int, float]:
        """(class, weight) of tenant ``name`` for the accelerators' fair queue."""
        s = self.spec(name)
        return int(s.klass), s.weight

    # -- accelerator quotas (in-flight jobs, accelerator-seconds per minute)
    def _rebucket(self, now: float | None) -> None:
        import time

        now = time.monotonic() if now is None else now
        for name, t in self.tenants.items():
            rate = self.spec(name).accel_seconds_per_minute
            if rate is None:
                t.bucket = None
            elif t.bucket is None:
                t.bucket = TokenBucket(rate, now)
            else:
                t.bucket.set_rate(rate, now)

    def accel_admit(self, name: str, now: float) -> str | None:
        """Take an in-flight accelerator job for tenant ``name``: None if admitted,
        else the quota refusing it (counted; nothing taken)."""
        spec = self.spec(name)
        t = self.tenant(name)
        if spec.max_accel_jobs is not None and t.accel_in_flight >= spec.max_accel_jobs:
            t.hit("max_accel_jobs")
            return "max_accel_jobs"
        rate = spec.accel_seconds_per_minute
        if rate is not None:
            if t.bucket is None:
                t.bucket = TokenBucket(rate, now)
            if not t.bucket.admit(now):
                t.hit("accel_seconds_per_minute")
                return "accel_seconds_per_minute"
        t.accel_in_flight += 1
        return None

    def accel_done(self, name: str, seconds: float, now: float) -> None:
        """An admitted job of tenant ``name`` ended after ``seconds`` of service."""
        t = self.tenant(name)
        t.accel_in_flight = max(0, t.accel_in_flight - 1)
        if t.bucket is not None and seconds > 0:
            t.bucket.charge(seconds, now)


def _field_name(k: str) -> str:
    return "class" if k == "klass" else k


class TenantAccount:
    """One connection's usage, charged against its caps, its uid's budget and
    its tenant's quotas (the ledger's current ones: a reload applies at once)."""

    def __init__(self, ledger: TenantLedger, uid: int, tenant: str | None = None):
        self.ledger = ledger
        self.uid = uid
        self.tenant = tenant if tenant is not None else f"uid:{uid}"
        self.used: dict[Resource, int] = {}
        self.counters = LimitCounters()
        self.closed = False
        #: the device's counters with ``bytes_sent`` / ``bytes_received`` (set_byte_counters)
        self.byte_counters: Any = None
        ledger.tenant(self.tenant).connections += 1
        ledger.accounts.add(self)

    def set_byte_counters(self, metrics: Any) -> None:
        """The device's (new) counters; a previous device's (before a reset) are kept as closed."""
        self._fold_bytes()
        self.byte_counters = metrics

    def _fold_bytes(self) -> None:
        m = self.byte_counters
        if m is not None:
            closed = self.ledger.tenant(self.tenant).rdma_closed
            closed[0] += m.bytes_sent
            closed[1] += m.bytes_received
            self.byte_counters = None

    @property
    def policy(self) -> TenantPolicy:
        return self.ledger.policy

    def charge(self, r: Resource, amount: int = 1) -> None:
        """Take ``amount`` of ``r`` or raise :class:`LimitExceeded` (nothing taken)."""
        self.charge_all(((r, amount),))

    def charge_all(self, charges, *, check_only: bool = False) -> None:
        """Take every ``(Resource, amount)`` of ``charges``, or none of them and
        raise :class:`LimitExceeded` for the first that does not fit (counted).
        ``check_only``: raise the same way, but take nothing."""
        p = self.policy
        u = self.ledger.usage(self.uid)
        spec = self.ledger.spec(self.tenant)
        tu = self.ledger.tenant(self.tenant)
        objects = u.objects()
        for r, amount in charges:
            if amount < 0:
                raise PolicyError(f"negative charge {amount} of {r.value}")
            have = self.used.get(r, 0)
            if have + amount > p.cap(r):
                self._hit("cap", r, u)
                raise LimitExceeded(f"{r.value}: {have} + {amount} exceeds this connection's "
                                    f"max_{r.value} {p.cap(r)}", _errno.ENOMEM, r)
            budget = p.uid_budget(r)
            if budget is None:
                total, budget, name = objects, p.uid_max_objects, "uid_max_objects"
                objects += amount
            else:
                total, name = u.used.get(r, 0), f"uid_max_{r.value}"
            if total + amount > budget:
                self._hit("budget", r, u)
                raise LimitExceeded(f"{r.value}: uid {self.uid} uses {total} + {amount}, exceeding "
                                    f"{name} {budget}", _errno.ENOSPC, r)
            quota = spec.quota(r)
            if quota is not None and tu.used.get(r, 0) + amount > quota:
                self._hit("budget", r, u)
                tu.hit(f"max_{r.value}")
                raise LimitExceeded(f"{r.value}: tenant {self.tenant!r} uses {tu.used.get(r, 0)} + {amount}, "
                                    f"exceeding its quota max_{r.value} {quota}", _errno.ENOSPC, r)
        if check_only:
            return
        for r, amount in charges:
            self.used[r] = self.used.get(r, 0) + amount
            u.used[r] = u.used.get(r, 0) + amount
            tu.used[r] = tu.used.get(r, 0) + amount

    def release(self, r: Resource, amount: int = 1) -> None:
        """Give back ``amount`` of ``r`` (clamped to what this account holds)."""
        amount = min(amount, self.used.get(r, 0))
        if amount <= 0:
            return
        self.used[r] -= amount
        u = self.ledger.usage(self.uid)
        u.used[r] = u.used.get(r, 0) - amount
        tu = self.ledger.tenant(self.tenant)
        tu.used[r] = tu.used.get(r, 0) - amount

    def release_all(self) -> None:
        for r in list(self.used):
            self.release(r, self.used[r])

    def close(self) -> None:
        """Release everything (idempotent): the connection is gone."""
        if not self.closed:
            self.closed = True
            self.release_all()
            self._fold_bytes()
            self.ledger.accounts.discard(self)
            self.ledger.tenant(self.tenant).connections -= 1

    def _hit(self, kind: str, r: Resource, u: UidUsage) -> None:
        self.counters.hit(kind, r)
        u.counters.hit(kind, r)
