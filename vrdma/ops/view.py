"""What a running daemon's objects say, asked on its event loop.

:class:`DaemonView` reads the objects the daemon already keeps (its
servers' connections and their devices, the tenant ledger, the accelerator
router and service, the peer links and the load table) when asked: no
second bookkeeping. Every method runs on the daemon's loop (the admin
socket's handlers do; the Prometheus collector, in its own thread, asks the
loop with :meth:`DaemonView.call`).

Counters of guests that left are folded into per-tenant totals, so a
``_total`` never goes back when a guest disconnects. The ``tenant`` label is
the tenant's name as the ledger resolves the connection (a ``[[tenant]]``
entry naming its socket or its uid, else ``uid:N``), so guests of one uid on
two tenants' sockets are two series. Label sets are bounded: at most
:data:`MAX_TENANT_SERIES` tenants get their own series (the first seen); the
rest share ``tenant="other"``. Queues are
summed per tenant and operation kind (4 kinds), never labelled per queue;
peers are the configured hosts (a fixed list).

Drain (``drain``/``undrain``) stops this host taking remote work: the
router's ``accept_remote`` flag makes every peer link refuse new jobs with
its existing refusal (REMOTE_FAILED) and the dispatcher advertise no units;
jobs already taken run to the end. ``drained`` is true once none is left.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from vrdma.ops.wire import BadArgument, Busy, NotFound, NotSupported

#: tenants with series of their own; the rest are summed under tenant="other"
MAX_TENANT_SERIES = 64
#: devices tracked between two folds (scrapes) before a fold is forced
MAX_DEVICES_TRACKED = 1024
#: how long the collector's thread waits for the loop to answer
CALL_TIMEOUT = 5.0
#: the TenantPolicy fields ``tenant set`` may change live (they apply to new
#: charges at once: every account reads its policy when it charges)
LIVE_POLICY_FIELDS = ("max_qp", "max_cq", "max_mr", "max_pd", "max_pinned_bytes", "max_wqes",
                      "uid_max_objects", "uid_max_pinned_bytes", "uid_max_wqes",
                      "max_connections_per_uid")
#: ``tenant set`` fields of the tenant's own entry (class and weight on the accelerators,
#: its quotas): overrides kept per tenant by TenantLedger.set_tenant, across reloads,
#: until ``tenant reset``
SPEC_FIELDS = ("class", "weight", "quota")

Sample = tuple[str, dict[str, str], float]


class DaemonView:
    """The daemon's objects (see the module doc). ``servers`` is bound by
    :meth:`bind_servers` once ``run_backend`` made them."""

    def __init__(self, *, ledger=None, accel=None, peering=None, fabric=None, fabric_services=(),
                 clock: Callable[[], float] = time.monotonic):
        self.ledger = ledger
        self.accel = accel
        self.peering = peering  # a PeeringService or None
        self.fabric = fabric
        #: the fabric's loop services (RoceFabricService: its UDP endpoint's counters)
        self.fabric_services = tuple(fabric_services)
        self.clock = clock
        self.servers: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = clock()
        #: device -> (tenant label, core last seen): cores replaced or closed fold into ``retired``
        self._seen: dict[Any, tuple[str, Any]] = {}
        self._retired: dict[str, dict[str, int]] = {}
        self._tenant_labels: dict[str, str] = {}
        self.drain_requested_at: float | None = None
        self.cancelled_by_admin = 0

    def bind_servers(self, servers) -> None:
        self.servers = list(servers)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        """Run ``fn()`` on the daemon's loop from another thread; its result."""
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the daemon's loop is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the waiting thread
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    # ------------------------------------------------------------ objects
    def connections(self) -> list:
        return [c for s in self.servers for c in s.connections if not c.closed]

    def tenant(self, info: Any = None, *, uid: int | None = None) -> str:
        """The ``tenant`` label of a connection (``info``: its ConnectionInfo), or of
        ``uid`` (the per-uid limit counters: the tenant a connection of that uid
        belongs to unless its socket names another)."""
        if self.ledger is not None:
            name = self.ledger.resolve(info) if uid is None else self.ledger.name_for_uid(uid)
        else:
            name = f"uid:{uid if uid is not None else (info.uid if info is not None else -1)}"
        label = self._tenant_labels.get(name)
        if label is None:
            if len(self._tenant_labels) >= MAX_TENANT_SERIES:
                return "other"  # not remembered either: the map stays bounded
            label = self._tenant_labels[name] = name
        return label

    def devices(self) -> list[tuple[Any, Any]]:
        """(served connection, device) of every live connection with an RDMA device."""
        return [(c, c.core.device) for c in self.connections() if hasattr(c.core.device, "core")]

    def factory(self, make: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``make`` (a device factory) whose devices are tracked from birth, so the
        counters of a guest that comes and goes between two scrapes are kept."""
        def tracked(info):
            dev = make(info)
            if hasattr(dev, "core"):
                self._seen[dev] = (self.tenant(info), None)
                if len(self._seen) > 4 * MAX_DEVICES_TRACKED:
                    self._fold()  # bounded: closed devices are folded and let go
            return dev

        return tracked

    @staticmethod
    def _totals(dev) -> dict[str, int]:
        """A device's counters over its life: its earlier cores' (it was reset) and its core's."""
        out = dict(getattr(dev, "retired_metrics", {}))
        core = getattr(dev, "core", None)
        if core is not None:
            for k, v in core.metrics.as_dict().items():
                out[k] = out.get(k, 0) + v
        return out

    def _fold(self) -> dict[str, dict[str, int]]:
        """Device counters per tenant: live devices plus everything retired."""
        live = {dev: self.tenant(c.info) for c, dev in self.devices()}
        for dev, (label, _) in list(self._seen.items()):
            if dev not in live:  # gone (or never served): its final counters are kept
                acc = self._retired.setdefault(label, {})
                for k, v in self._totals(dev).items():
                    acc[k] = acc.get(k, 0) + v
                del self._seen[dev]
        for dev, label in live.items():
            self._seen[dev] = (label, None)
        out = {label: dict(v) for label, v in self._retired.items()}
        for dev, label in live.items():
            acc = out.setdefault(label, {})
            for k, v in self._totals(dev).items():
                acc[k] = acc.get(k, 0) + v
        return out

    # ------------------------------------------------------------ commands
    def guests(self) -> list[dict]:
        out = []
        for c in self.connections():
            dev = c.core.device
            core = getattr(dev, "core", None)
            row = {"name": c.name, "pid": c.info.pid, "uid": c.info.uid, "gid": c.info.gid,
                   "socket": c.info.path, "qps": 0, "cqs": 0, "mrs": 0, "aqs": 0}
            if core is not None:
                row.update(qps=len(core.qps), cqs=len(core.cqs), mrs=getattr(core.mrs, "count", 0),
                           aqs=len(core.aqs), completions=core.metrics.completions,
                           command_errors=core.metrics.command_errors)
            out.append(row)
        return out

    def qps(self) -> list[dict]:
        out: list[dict] = []
        for c, dev in self.devices():
            core = dev.core
            if core is None:
                continue
            out.extend({"guest": c.name, "uid": c.info.uid, "qpn": qp.qpn,
                        "state": getattr(qp.state, "name", str(qp.state)),
                        "sq_outstanding": (qp.sq_pi - qp.sq_ci) & 0xFFFFFFFF,
                        "rq_outstanding": (qp.rq_pi - qp.rq_ci) & 0xFFFFFFFF} for qp in core.qps.values())
        return out

    def queues(self) -> list[dict]:
        out: list[dict] = []
        for c, dev in self.devices():
            core = dev.core
            if core is None:
                continue
            out.extend({"guest": c.name, "uid": c.info.uid, "aqn": aq.aqn, "op": aq.op.name,
                        "depth": aq.depth, "priority": aq.priority,
                        "in_flight": sum(1 for e in aq.entries if not e.done),
                        "jobs_posted": aq.metrics.jobs_posted,
                        "jobs_completed": aq.metrics.jobs_completed} for aq in core.aqs.values())
        return out

    def jobs(self) -> list[dict]:
        """Guests' accelerator jobs not yet completed; ``id`` is what ``cancel`` takes."""
        out = []
        for c, dev in self.devices():
            core = dev.core
            if core is None:
                continue
            for aq in core.aqs.values():
                for e in aq.entries:
                    if e.done:
                        continue
                    out.append({"id": f"{c.info.conn_id}.{aq.aqn}.{e.wr_id}", "guest": c.name,
                                "uid": c.info.uid, "aqn": aq.aqn, "wr_id": e.wr_id, "op": e.op.name,
                                "where": "remote" if e.target is not None else "local",
                                "started": bool(e.started)})
        return out

    def cancel(self, job_id: Any) -> dict:
        """Cancel a queued job (the guest gets its CQE with status CANCELLED)."""
        from virtio_rdma.accel import cancel_aq_job
        from virtio_rdma.errors import CommandError
        from virtio_rdma.events import flush_notify
        from virtio_rdma.wire import CancelAqJobReq

        try:
            conn_s, aqn_s, wr_s = str(job_id).split(".")
            conn_id, aqn, wr_id = int(conn_s), int(aqn_s), int(wr_s)
        except ValueError:
            raise BadArgument(f"job id {str(job_id)[:64]!r} is not CONN.AQN.WR_ID "
                              "(see 'vrdma ctl jobs')") from None
        for c, dev in self.devices():
            if c.info.conn_id != conn_id or dev.core is None:
                continue
            core = dev.core
            if aqn not in core.aqs:
                break
            core.in_call += 1
            try:
                cancel_aq_job(core, CancelAqJobReq(aqn=aqn, reserved=0, wr_id=wr_id), self.clock())
            except CommandError as e:
                if e.status == errno.EBUSY:
                    raise Busy(f"job {job_id}: {e}") from None
                raise NotFound(f"job {job_id}: {e}") from None
            finally:
                core.in_call -= 1
            flush_notify(core)
            self.cancelled_by_admin += 1
            return {"cancelled": str(job_id)}
        raise NotFound(f"job {job_id}: no such connection and queue")

    def tenant_set(self, args: dict) -> dict:
        """Change a tenant live: its class, weight and quotas (``TenantLedger.set_tenant``:
        that tenant only, overrides kept across reloads until ``tenant reset``), and/or
        the TenantPolicy limits (every connection: the policy has no per-tenant values;
        replaced by the next SIGHUP reload's)."""
        from vhost_user.tenancy import PolicyError, TenantPolicy

        uid = args.get("uid")
        name = args.get("tenant")
        if name is not None:
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise BadArgument(f"tenant {str(name)[:64]!r} is not a tenant name")
        elif isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 1 << 32:
            raise BadArgument(f"uid {uid!r} is not a uid (0..2^32-1)")
        fields = {k: v for k, v in args.items() if k not in ("uid", "tenant")}
        spec = {k: fields.pop(k) for k in SPEC_FIELDS if k in fields}
        bad = sorted(k for k in fields if k not in LIVE_POLICY_FIELDS)
        if bad:
            raise BadArgument(f"tenant field {bad[0]!r} is unknown (live: "
                              f"{', '.join((*SPEC_FIELDS, *LIVE_POLICY_FIELDS))})")
        if not fields and not spec:
            raise BadArgument("tenant set: nothing to set")
        if self.ledger is None:
            raise NotSupported("this daemon has no tenant ledger (--device blk)")
        reply: dict = {}
        if spec:
            quotas = spec.get("quota") or {}
            if not isinstance(quotas, dict):
                raise BadArgument(f"quota {str(quotas)[:64]!r} is not a mapping of quota names to values")
            if name is None:
                name = self.ledger.name_for_uid(uid)
            try:
                new = self.ledger.set_tenant(name, klass=spec.get("class"), weight=spec.get("weight"),
                                             **quotas)
            except (PolicyError, TypeError, ValueError, KeyError) as e:
                raise BadArgument(str(e)) from None
            reply["tenant"] = new.as_dict()
        if fields:
            try:
                policy = TenantPolicy.from_mapping(fields, self.ledger.policy)
            except (PolicyError, TypeError) as e:
                raise BadArgument(str(e)) from None
            self.ledger.policy = policy   # every account reads its ledger's policy when it charges
            for s in self.servers:
                s.set_policy(policy)
            reply.update({"applied": fields, "scope": "all tenants (TenantPolicy limits)",
                          "policy": dataclasses.asdict(policy)})
        return reply

    def _tenant_name(self, args: dict) -> str:
        uid, name = args.get("uid"), args.get("tenant")
        if name is not None:
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise BadArgument(f"tenant {str(name)[:64]!r} is not a tenant name")
            return name
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 1 << 32:
            raise BadArgument(f"uid {uid!r} is not a uid (0..2^32-1)")
        assert self.ledger is not None
        return self.ledger.name_for_uid(uid)

    def tenant_reset(self, args: dict) -> dict:
        """Drop a tenant's live overrides (``all``: every tenant's): its entry in the
        configuration file applies again."""
        if self.ledger is None:
            raise NotSupported("this daemon has no tenant ledger (--device blk)")
        bad = sorted(k for k in args if k not in ("uid", "tenant", "all"))
        if bad:
            raise BadArgument(f"tenant reset: unknown field {bad[0]!r} (known: uid, tenant, all)")
        if args.get("all") is True:
            if "uid" in args or "tenant" in args:
                raise BadArgument("tenant reset: all, or one tenant, not both")
            return {"reset": self.ledger.reset_tenant(None)}
        return {"reset": self.ledger.reset_tenant(self._tenant_name(args))}

    def tenants(self) -> list[dict]:
        """Every tenant configured or seen: its current class, weight and quotas, which
        of them are live overrides, its connections and quota refusals."""
        if self.ledger is None:
            return []
        from vhost_user.tenancy import QUOTAS

        out = []
        for name, spec in self.ledger.specs().items():
            t = self.ledger.tenants.get(name)
            out.append({"tenant": name, "uid": spec.uid, "socket": spec.socket,
                        "class": spec.klass.name.lower(), "weight": spec.weight,
                        **{q: getattr(spec, q) for q in QUOTAS},
                        "live": ",".join(self.ledger.overrides(name)) or "-",
                        "connections": t.connections if t is not None else 0,
                        "quota_hits": sum(t.quota_hits.values()) if t is not None else 0})
        return out

    def _served_remote(self) -> int:
        if self.peering is None:
            return 0
        return sum(len(t.served) + len(t.draining) for t in self.peering.peering.targets.values())

    def drain(self) -> dict:
        if self.accel is None:
            raise NotSupported("this daemon has no accelerators to drain (--device blk)")
        if self.accel.accept_remote:
            self.accel.accept_remote = False
            self.drain_requested_at = self.clock()
            self._republish()
        return self.drain_status()

    def undrain(self) -> dict:
        if self.accel is None:
            raise NotSupported("this daemon has no accelerators (--device blk)")
        self.accel.accept_remote = True
        self.drain_requested_at = None
        self._republish()
        return self.drain_status()

    def _republish(self) -> None:
        d = getattr(self.accel, "dispatcher", None)
        if d is not None:
            d.publish()

    def drain_status(self) -> dict:
        draining = self.accel is not None and not self.accel.accept_remote
        left = self._served_remote()
        state = "serving" if not draining else "drained" if left == 0 else "draining"
        return {"state": state, "remote_jobs_left": left,
                "local_jobs": len(self.accel._jobs) if self.accel is not None else 0,
                "since": None if self.drain_requested_at is None else self.clock() - self.drain_requested_at}

    def peers(self) -> list[dict]:
        if self.peering is None:
            return []
        p = self.peering.peering
        d = p.dispatcher
        now = d.clock() if d is not None else self.clock()
        out = []
        for addr, t in p.targets.items():
            row = d.table.rows.get(t.host) if d is not None else None
            out.append({"addr": addr, "host": t.host, "link": t.link.describe().get("state"),
                        "in_table": bool(row is not None and d is not None and d.table.alive(row, now)),
                        "row_age_seconds": None if row is None else now - row.updated,
                        "in_flight": len(t.sent), "serving": len(t.served) + len(t.draining),
                        "jobs_refused": t.metrics.jobs_refused})
        return out

    def health(self) -> dict:
        return {"pid": os.getpid(), "uptime_seconds": self.clock() - self.started,
                "connections": len(self.connections()),
                "sockets": [s.path for s in self.servers], "drain": self.drain_status(),
                "admission": self._admission()}

    def _admission(self) -> dict:
        """The servers' admission limits now (they follow a reload) and their refusals."""
        if not self.servers:
            return {}
        p = self.servers[0].policy
        return {"max_connections": self.servers[0].max_connections,
                "max_connections_per_uid": p.max_connections_per_uid,
                "handshake_timeout": p.handshake_timeout,
                **{k: sum(getattr(s.metrics, k) for s in self.servers)
                   for k in ("accepted", "refused_uid_limit", "refused_host_limit", "handshake_timeouts")}}

    def status(self) -> dict:
        """Everything ``vrdma top`` shows, in one answer."""
        return {"health": self.health(), "guests": self.guests(), "queues": self.queues(),
                "peers": self.peers(), "accelerators": self._accel_rows()}

    def _accel_rows(self) -> list[dict]:
        local = getattr(self.accel, "local", None)
        if local is None:
            return []
        return [{"name": a.name, "workers": a.workers, **{k: v for k, v in a.stats().items()
                                                           if k in ("queue_depth", "running", "utilization")}}
                for a in local.service.accelerators]

    # ------------------------------------------------------------ metrics
    def samples(self) -> dict[str, Any]:
        """Everything the Prometheus collector exports (module doc), on the loop."""
        counters: list[tuple[str, str, dict[str, str], float]] = []
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        hists: list[tuple[str, str, dict[str, str], list[tuple[str, float]], float]] = []
        c, g = counters.append, gauges.append
        for s in self.servers:
            m = s.metrics
            lab = {"socket": s.path}
            for f in dataclasses.fields(m):
                v = getattr(m, f.name)
                if isinstance(v, int) and not isinstance(v, bool):
                    c((f"vrdma_server_{f.name}", f"vhost-user server counter {f.name}", lab, v))
            g(("vrdma_server_connections", "connections served now", lab,
               sum(1 for x in s.connections if not x.closed)))
            if s.share is not None:   # the busy-poll loop's CPU moves (vhost_user.spin.CpuShare)
                for k, v in s.share.metrics.as_dict().items():
                    c((f"vrdma_server_poll_{k}", f"busy-poll loop {k} (vhost_user.spin.ShareMetrics)",
                       lab, v))
        for label, vals in sorted(self._fold().items()):
            for k, v in vals.items():
                c((f"vrdma_device_{k}", f"virtio-rdma device counter {k} (summed per tenant)",
                   {"tenant": label}, v))
        per_tenant: dict[str, dict[str, int]] = {}
        aq_depth: dict[tuple[str, str], int] = {}
        for conn, dev in self.devices():
            label = self.tenant(conn.info)
            t = per_tenant.setdefault(label, {"connections": 0, "qps": 0, "aqs": 0})
            t["connections"] += 1
            if dev.core is not None:
                t["qps"] += len(dev.core.qps)
                t["aqs"] += len(dev.core.aqs)
                for aq in dev.core.aqs.values():
                    key = (label, aq.op.name.lower())
                    aq_depth[key] = aq_depth.get(key, 0) + sum(1 for e in aq.entries if not e.done)
        for label, t in sorted(per_tenant.items()):
            g(("vrdma_tenant_connections", "connections of a tenant", {"tenant": label}, t["connections"]))
            g(("vrdma_tenant_qps", "QPs of a tenant", {"tenant": label}, t["qps"]))
            g(("vrdma_tenant_accel_queues", "accelerator queues of a tenant", {"tenant": label}, t["aqs"]))
        for (label, op), n in sorted(aq_depth.items()):
            g(("vrdma_accel_queue_jobs", "guests' accelerator jobs not yet completed, per tenant and op",
               {"tenant": label, "op": op}, n))
        if self.ledger is not None:
            hits: dict[tuple[str, str, str], int] = {}
            used: dict[tuple[str, str], int] = {}
            for uid, u in self.ledger.uids.items():
                label = self.tenant(uid=uid)
                for kind, d in (("cap", u.counters.cap_hits), ("budget", u.counters.budget_hits)):
                    for r, n in d.items():
                        hits[(label, kind, r.value)] = hits.get((label, kind, r.value), 0) + n
                for r, n in u.used.items():
                    used[(label, r.value)] = used.get((label, r.value), 0) + n
            for (label, kind, r), n in sorted(hits.items()):
                c(("vrdma_tenant_limit_rejections",
                   "requests a tenant limit refused (cap: per connection, budget: per uid)",
                   {"tenant": label, "limit": kind, "resource": r}, n))
            for (label, r), n in sorted(used.items()):
                g(("vrdma_tenant_usage", "resources a tenant holds now", {"tenant": label, "resource": r}, n))
        self._accel_samples(c, g, hists)
        self._peer_samples(c, g)
        self._fabric_samples(c, g)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        g(("vrdma_daemon_max_rss_bytes", "the daemon's peak resident set", {}, ru.ru_maxrss * 1024))
        g(("vrdma_daemon_rss_bytes", "the daemon's resident set", {}, _rss_bytes()))
        g(("vrdma_drain_state", "0 serving, 1 draining, 2 drained", {},
           {"serving": 0, "draining": 1, "drained": 2}[self.drain_status()["state"]]))
        c(("vrdma_admin_cancelled_jobs", "jobs cancelled through the admin socket", {},
           self.cancelled_by_admin))
        return {"counters": counters, "gauges": gauges, "histograms": hists}

    def _accel_samples(self, c, g, hists) -> None:
        r = self.accel
        if r is None:
            return
        c(("vrdma_accel_jobs_dropped", "finished jobs whose guest had gone", {}, r.jobs_dropped))
        g(("vrdma_accel_router_in_flight", "jobs on this host's accelerators for guests and peers", {},
           len(r._jobs)))
        local = r.local
        if local is None:
            return
        from accel_core.metrics import QUEUE_WAIT_BUCKETS

        for a in local.service.accelerators:
            st = a.stats()
            lab = {"accelerator": a.name}
            g(("vrdma_accel_queue_depth", "jobs queued on an accelerator", lab, st["queue_depth"]))
            g(("vrdma_accel_running", "jobs running on an accelerator", lab, st["running"]))
            g(("vrdma_accel_workers", "worker threads of an accelerator", lab, a.workers))
            for op, o in st["ops"].items():
                if not o["submitted"] and not o["rejected"]:
                    continue
                ol = {**lab, "op": op}
                for k in ("submitted", "completed", "failed", "cancelled", "rejected", "queue_full"):
                    c((f"vrdma_accel_jobs_{k}", f"accelerator jobs {k}", ol, o[k]))
                for k in ("busy_seconds", "kernel_seconds"):  # queue wait: the histogram below
                    c((f"vrdma_accel_{k}", f"accelerator {k.replace('_', ' ')}", ol, o[k]))
                cum, buckets = 0, []
                bounds = (*QUEUE_WAIT_BUCKETS, float("inf"))
                for bound, n in zip(bounds, o["queue_wait_buckets"], strict=True):
                    cum += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
                hists.append(("vrdma_accel_queue_wait_seconds", "time jobs waited for a worker",
                              ol, buckets, o["queue_wait_seconds"]))

    def _fabric_samples(self, c, g) -> None:
        m = getattr(self.fabric, "metrics", None)
        if m is not None and hasattr(m, "as_dict"):
            kind = type(self.fabric).__name__
            for k, v in _ints(m.as_dict()):
                if k in _FABRIC_GAUGES:
                    g((f"vrdma_fabric_{k}", f"fabric objects alive: {k}", {"fabric": kind}, v))
                else:
                    c((f"vrdma_fabric_{k}", f"fabric counter {k}", {"fabric": kind}, v))
        for svc in self.fabric_services:
            ep = getattr(svc, "endpoint", None)
            um = getattr(ep, "metrics", None)
            if um is not None and dataclasses.is_dataclass(um) and not isinstance(um, type):
                for k, v in _ints(dataclasses.asdict(um)):
                    c((f"vrdma_roce_udp_{k}", f"RoCEv2 UDP endpoint counter {k}", {}, v))

    def _peer_samples(self, c, g) -> None:
        if self.peering is None:
            return
        p = self.peering.peering
        d = p.dispatcher
        now = d.clock() if d is not None else self.clock()
        for addr, t in p.targets.items():
            lab = {"peer": addr}
            for k, v in t.metrics.as_dict().items():
                if isinstance(v, int):
                    c((f"vrdma_peer_{k}", f"peer link counter {k}", lab, v))
            g(("vrdma_peer_in_flight", "jobs sent to a peer not yet back", lab, len(t.sent)))
            g(("vrdma_peer_serving", "a peer's jobs this host runs now", lab,
               len(t.served) + len(t.draining)))
            g(("vrdma_peer_link_up", "1 while the RC link to a peer is up", lab,
               1 if t.link.describe().get("state") == "up" else 0))
            if d is not None:
                row = d.table.rows.get(t.host)
                alive = row is not None and d.table.alive(row, now)
                g(("vrdma_load_table_present", "1 while a peer's row is in the load table", lab,
                   1 if alive else 0))
                if row is not None:
                    g(("vrdma_load_table_age_seconds", "age of a peer's newest load row", lab,
                       now - row.updated))
        for addr, t in p.targets.items():
            for k, v in t.link.metrics.as_dict().items():
                if isinstance(v, int):
                    c((f"vrdma_peer_link_{k}", f"peer RC link counter {k}", {"peer": addr}, v))
        ex = self.peering.exchange
        if ex is not None:
            try:
                for k, v in _ints(ex.metrics()):
                    c((f"vrdma_load_exchange_{k}", f"load-row dissemination counter {k}", {}, v))
            except Exception:  # a backend that cannot say (Redis down): its counters are skipped
                pass
        if d is not None:
            c(("vrdma_load_table_rows_accepted", "load rows taken", {}, d.table.accepted))
            c(("vrdma_load_table_rows_stale", "load rows ignored (not newer)", {}, d.table.stale))
            for k, v in d.metrics.as_dict().items() if hasattr(d.metrics, "as_dict") else ():
                if isinstance(v, int):
                    c((f"vrdma_scheduler_{k}", f"scheduler counter {k}", {}, v))


#: fabric counters that are levels (objects alive now), not events
_FABRIC_GAUGES = frozenset({"wire_qps", "device_qps", "device_mrs", "alias_vmas"})


def _ints(d: dict, prefix: str = "") -> list[tuple[str, int]]:
    """The integer entries of ``d`` (one level of nesting joined with ``_``)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _ints(v, f"{prefix}{k}_") if not prefix else []
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
