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
host-wide budget, shared with the uid's other connections, is ENOSPC.
"""
from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import tomllib
from dataclasses import dataclass, field

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
    """The daemon's running totals per uid (one instance, shared by all its
    connections; not thread-safe: used from the daemon's event loop)."""

    def __init__(self, policy: TenantPolicy | None = None):
        self.policy = policy or TenantPolicy()
        self.uids: dict[int, UidUsage] = {}

    def usage(self, uid: int) -> UidUsage:
        u = self.uids.get(uid)
        if u is None:
            u = self.uids[uid] = UidUsage()
        return u

    def account(self, info: ConnectionInfo | None) -> TenantAccount:
        """A new account for one connection (``info`` None: an anonymous tenant, uid -1)."""
        return TenantAccount(self, -1 if info is None else info.uid)

    def totals(self, uid: int) -> dict[Resource, int]:
        u = self.uids.get(uid)
        return {r: (u.used.get(r, 0) if u else 0) for r in Resource}


class TenantAccount:
    """One connection's usage, charged against its caps and its uid's budget."""

    def __init__(self, ledger: TenantLedger, uid: int):
        self.ledger = ledger
        self.policy = ledger.policy
        self.uid = uid
        self.used: dict[Resource, int] = {}
        self.counters = LimitCounters()
        self.closed = False

    def charge(self, r: Resource, amount: int = 1) -> None:
        """Take ``amount`` of ``r`` or raise :class:`LimitExceeded` (nothing taken)."""
        self.charge_all(((r, amount),))

    def charge_all(self, charges, *, check_only: bool = False) -> None:
        """Take every ``(Resource, amount)`` of ``charges``, or none of them and
        raise :class:`LimitExceeded` for the first that does not fit (counted).
        ``check_only``: raise the same way, but take nothing."""
        p = self.policy
        u = self.ledger.usage(self.uid)
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
        if check_only:
            return
        for r, amount in charges:
            self.used[r] = self.used.get(r, 0) + amount
            u.used[r] = u.used.get(r, 0) + amount

    def release(self, r: Resource, amount: int = 1) -> None:
        """Give back ``amount`` of ``r`` (clamped to what this account holds)."""
        amount = min(amount, self.used.get(r, 0))
        if amount <= 0:
            return
        self.used[r] -= amount
        u = self.ledger.usage(self.uid)
        u.used[r] = u.used.get(r, 0) - amount

    def release_all(self) -> None:
        for r in list(self.used):
            self.release(r, self.used[r])

    def close(self) -> None:
        """Release everything (idempotent): the connection is gone."""
        if not self.closed:
            self.closed = True
            self.release_all()

    def _hit(self, kind: str, r: Resource, u: UidUsage) -> None:
        self.counters.hit(kind, r)
        u.counters.hit(kind, r)
