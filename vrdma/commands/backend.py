"""``vrdma backend``: run the vhost-user back-end daemon."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

NAME = "backend"
HELP = "run the vhost-user back-end daemon (one device instance per connection)"

log = logging.getLogger("vrdma.backend")


def add_arguments(p) -> None:
    p.add_argument("--socket", "-s", action="append", required=True, metavar="PATH",
                   help="unix socket path to listen on (repeat for several)")
    p.add_argument("--device", choices=["rdma", "blk"], default="rdma",
                   help="device to serve (rdma: virtio-rdma, ID 42; "
                        "blk: virtio-blk, the transport's test device)")
    p.add_argument("--image", metavar="FILE",
                   help="blk: back every connection with this raw image file (shared)")
    p.add_argument("--size", default="64M", help="blk: per-connection RAM disk size (default 64M)")
    p.add_argument("--boot-marker", metavar="TEXT",
                   help="blk: put a boot sector that prints TEXT on COM1 in sector 0 of each RAM disk")
    p.add_argument("--num-queues", type=int, default=1, help="blk: number of virtqueues")
    p.add_argument("--read-only", action="store_true", help="blk: refuse writes")
    p.add_argument("--poll-us", type=float, default=0.0, metavar="US",
                   help="after work, busy-poll rings, doorbell records and the fabric's socket "
                        "until US microseconds pass without work, then sleep (0: never poll)")
    p.add_argument("--poll-adaptive", action="store_true",
                   help="adapt the busy-poll window within --poll-us (vhost_user.spin): it grows "
                        "when sleeps end sooner than US, shrinks when they outlast it, and is 0 "
                        "for a while after another task held the CPU during a poll pass")
    p.add_argument("--poll-stay", action="store_true",
                   help="keep the busy-poll loop on the CPUs the kernel gives it. By default a "
                        "loop not pinned to one CPU moves itself to another CPU of its affinity "
                        "when most of its idle sched_yields keep the CPU from it for over 50 us "
                        "(another busy poller shares it; vhost_user.spin.CpuShare), and stays there")
    p.add_argument("--fabric", choices=["auto", "local", "roce", "verbs"], default="auto",
                   help="rdma: how QPs reach peers. local: this host only; roce: our RoCEv2 over "
                        "UDP 4791 on --roce-addr; verbs: the host's RDMA device --verbs-device "
                        "(kernel rxe or a NIC, through pyverbs; guest memory is registered with "
                        "it). Peers on this host still meet locally. auto (default): verbs when "
                        "--verbs-device is given, roce when --roce-addr is given, else local")
    p.add_argument("--roce-addr", metavar="IP",
                   help="rdma: this host's RoCE address (IPv4 or IPv6, must be local); the port's "
                        "GID is its IPv4-mapped form, as kernel rxe derives it")
    p.add_argument("--roce-port", type=int, default=4791, help=argparse.SUPPRESS)
    p.add_argument("--cluster-key", metavar="FILE",
                   help="roce: authenticate every RoCE packet to and from other daemons with this "
                        "key; verbs: authenticate the peer links' RDMA CM handshake with it (a "
                        "regular file of 32 bytes owned by the daemon's user, mode 0600 or "
                        "stricter; make one with 'vrdma keygen FILE'); see docs/fabric.md and "
                        "docs/peering.md")
    p.add_argument("--plaintext-peer", action="append", default=[], metavar="ADDR",
                   help="roce, with --cluster-key: talk plain RoCEv2 (source port checked) to this "
                        "trusted peer, e.g. kernel rxe or a NIC (repeat for several)")
    p.add_argument("--peer-port-check", action="append", default=[], metavar="[ADDR=]MODE",
                   help="roce: which UDP source ports a peer may send from: daemon (our daemons' "
                        "port), rxe (kernel rxe's per-QP port), auto (either), any (no check). "
                        "MODE alone sets the default (auto; daemon for authenticated peers)")
    p.add_argument("--verbs-device", metavar="NAME",
                   help="rdma: the host RDMA device for --fabric verbs (e.g. rxe0, mlx5_0)")
    p.add_argument("--verbs-port", type=int, default=1, metavar="N",
                   help="rdma: its port (default 1)")
    p.add_argument("--verbs-gid-index", type=int, metavar="N",
                   help="rdma: its GID index (default: the GID of --roce-addr if given, else the "
                        "first IPv4-mapped RoCE v2 GID)")
    p.add_argument("--allow-unsealed-memory", action="store_true",
                   help="accept guest memory fds that are not memfds sealed against shrinking "
                        "(e.g. hugetlbfs files); a front-end could then crash the daemon")
    p.add_argument("--accelerators", default="auto", metavar="SPEC",
                   help="rdma: this host's accelerators, shared by all guests through accelerator "
                        "queues (VIRTIO_RDMA_F_ACCEL): NAME=WORKERS,... where fft runs FFT and "
                        "IFFT and turbo runs Turbo encode and decode; auto (the default): one "
                        "accelerator of each, with one worker thread per CORES_PER_WORKER cores "
                        "this process may run on (at least 1: fft=1,turbo=1 on up to 7 cores); "
                        "none: queues are offered but no job runs here (NO_ACCELERATOR)")
    p.add_argument("--accel-slowdown", default="1.0", metavar="FACTOR",
                   help="rdma: emulate accelerators FACTOR times slower than this host's kernels: "
                        "after each job a worker waits (FACTOR-1) x the kernel's time (default 1.0; "
                        "for tests and benchmarks that need a slow, shared accelerator)")
    g = p.add_argument_group("peer hosts (accelerator jobs shipped over RDMA; RoCE or verbs fabric)")
    g.add_argument("--peer", action="append", default=[], metavar="ADDR",
                   help="another host's daemon (its --roce-addr), reached over a daemon-owned RC "
                        "link; repeat for more. Host ids 1, 2, ... follow the order given "
                        "(FORCE_TARGET's target_host, the CQE's host)")
    g.add_argument("--cluster", metavar="FILE",
                   help="the cluster's hosts, one address per line (# comments), this host's "
                        "own line skipped: each other line is a --peer, in file order")
    g.add_argument("--peer-credits", type=int, default=None, metavar="N",
                   help="accelerator jobs each peer may have in flight here (default 64)")
    p.add_argument("--metrics-file", metavar="PATH",
                   help="rdma: at exit, write the daemon's accelerator, scheduler, peer-link and "
                        "load-table counters to PATH as JSON")
    g.add_argument("--policy", default=None, metavar="NAME",
                   help="where a job no queue pins runs (docs/scheduler.md): seed, local, random, "
                        "p2c, probe[:D], guided[:D], board, each optionally +own (own-send "
                        "accounting); default board (the best measured: one RDMA READ of the load "
                        "board on the cluster's lowest address, one FETCH_ADD announcing the job; "
                        "every host of a cluster runs the same policy)")
    g.add_argument("--load-period", type=float, default=None, metavar="SECONDS",
                   help="how often this host advertises its load row (default 1.0; with jitter); "
                        "a host silent for 3 periods leaves the load table")
    g.add_argument("--load-backend", choices=["auto", "datagram", "redis", "none"], default="auto",
                   help="how load rows travel: datagram (authenticated UDP broadcasts on the fabric "
                        "network, port 4792), redis (a Redis server, --redis-url: for clusters past "
                        "one broadcast domain), none (the table holds what the "
                        "peer links say; probes read live counters); auto: datagram with "
                        "--cluster-key (the rows' HMAC key derives from it), else none")
    g.add_argument("--redis-url", metavar="URL",
                   help="--load-backend redis: the server (redis://HOST:PORT/DB or unix://PATH)")
    g.add_argument("--redis-cluster", default="default", metavar="NAME",
                   help="--load-backend redis: the cluster's name in the keys (vrdma:NAME:load:ADDR), "
                        "so clusters can share a server (default: default)")
    _add_tenant_arguments(p)
    o = p.add_argument_group("operations (docs/operations.md)")
    o.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve the daemon's counters in Prometheus text format on http://HOST:PORT/metrics")
    o.add_argument("--admin-socket", metavar="PATH",
                   help="the admin socket for 'vrdma ctl' and 'vrdma top' (mode 0600; uid 0 or the "
                        "daemon's); default: the first --socket with .admin appended; none: no socket")
    o.add_argument("--admin-timeout", type=float, default=None, help=argparse.SUPPRESS)


def make_peering(args, fabric, accel):
    """The daemon's links to its peer hosts (a service for its loop), or None."""
    from fabric.hca import VerbsFabric

    if not (args.peer or args.cluster):
        for flag, v in (("--peer-credits", args.peer_credits), ("--policy", args.policy),
                        ("--load-period", args.load_period), ("--redis-url", args.redis_url)):
            if v is not None:
                raise SystemExit(f"vrdma backend: {flag} needs --peer or --cluster")
        if args.cluster_key and isinstance(fabric, VerbsFabric):
            raise SystemExit("vrdma backend: --cluster-key on a verbs device authenticates peer links: "
                             "it needs --peer or --cluster")
        return None
    from fabric.roce import RoceFabric
    from peering.remote import DEFAULT_CREDITS
    from peering.service import PeerConfigError, Peering, PeeringService, read_cluster_file

    if not isinstance(fabric, (RoceFabric, VerbsFabric)):
        raise SystemExit("vrdma backend: --peer and --cluster need a fabric that reaches other hosts: "
                         "the userspace RoCE fabric (--roce-addr) or a verbs device (--verbs-device)")
    if accel is None:
        raise SystemExit("vrdma backend: --peer and --cluster need --device rdma")
    credits = DEFAULT_CREDITS if args.peer_credits is None else args.peer_credits
    if not 1 <= credits <= 4096:
        raise SystemExit(f"vrdma backend: --peer-credits {credits}: must be in 1..4096")
    from scheduler.decide import DEFAULT_POLICY, parse_policy
    from scheduler.errors import SchedulerError

    # a verbs link cannot offer the board's windows (peering/verbs_link.py: its slot and
    # announced-work windows do not start on a page): probes of the peers' live counters instead
    verbs = isinstance(fabric, VerbsFabric)
    try:
        default = "probe" if verbs else DEFAULT_POLICY
        policy = parse_policy(args.policy or default, allow_reference=False).name
    except SchedulerError as e:
        raise SystemExit(f"vrdma backend: --policy: {e}") from None
    if verbs and policy.startswith("board"):
        raise SystemExit(f"vrdma backend: --policy {args.policy}: the load board needs the RoCE fabric "
                         "(verbs links offer no board windows); probe is the default there")
    from scheduler.table import DEFAULT_PERIOD

    period = DEFAULT_PERIOD if args.load_period is None else args.load_period
    if not 0.01 <= period <= 3600:
        raise SystemExit(f"vrdma backend: --load-period {period}: must be in 0.01..3600 seconds")
    try:
        peers = list(args.peer)
        if args.cluster:
            peers += read_cluster_file(args.cluster, fabric.address)
        link_key = None
        if verbs and args.cluster_key:
            from peering.verbs_link import derive_link_key
            from roce.auth import KeyFileError, read_key_file

            try:
                link_key = derive_link_key(read_key_file(args.cluster_key))
            except KeyFileError as e:
                raise SystemExit(f"vrdma backend: --cluster-key: {e}") from None
        peering = Peering(fabric, accel, peers, credits=credits, policy=policy, load_period=period,
                          link_key=link_key)
    except (PeerConfigError, OSError) as e:
        raise SystemExit(f"vrdma backend: {e}") from None
    return PeeringService(peering, exchange=_load_exchange(args, peering, period))


def _load_exchange(args, peering, period: float):
    """The load table's dissemination (scheduler.exchange), or None."""
    backend = args.load_backend
    if backend == "auto":
        # (verbs links: probes of the peers' counters; no datagram rows unless asked for)
        backend = "datagram" if args.cluster_key and not peering.verbs else "none"
    if backend != "redis" and args.redis_url:
        raise SystemExit("vrdma backend: --redis-url needs --load-backend redis")
    if backend == "none":
        log.info("load table: no dissemination (--load-backend none, or no --cluster-key): "
                 "peers stand in it with what their links say; probes read live counters")
        return None
    if not args.cluster_key:
        raise SystemExit(f"vrdma backend: --load-backend {backend} needs --cluster-key "
                         "(load rows are authenticated with a key derived from it)")
    from roce.auth import KeyFileError
    from scheduler.errors import SchedulerError
    from scheduler.exchange import LoadExchange, load_key_file
    from scheduler.gossip import Dissemination

    try:
        key = load_key_file(args.cluster_key)
        if backend == "redis":
            if not args.redis_url:
                raise SystemExit("vrdma backend: --load-backend redis needs --redis-url")
            from scheduler.redis_table import RedisBackend

            be: Dissemination = RedisBackend(args.redis_url, args.redis_cluster)
        else:
            from scheduler.gossip import DatagramBackend

            be = DatagramBackend(fabric_address=peering.fabric.address)
    except (KeyFileError, SchedulerError, OSError, ValueError) as e:
        raise SystemExit(f"vrdma backend: load table: {e}") from None
    d = peering.dispatcher
    return LoadExchange(table=d.table, own_row=d.advertised_row, address=peering.fabric.address, key=key,
                        resolve=peering.resolve, backend=be, period=period)


#: what each --accelerators name runs (accel_core operation names)
ACCELERATOR_KINDS = {"fft": ("fft", "ifft"), "turbo": ("turbo_encode", "turbo_decode")}
#: --accelerators auto: a worker thread of each kind per this many cores (the guests, the
#: daemon's loop and the other kinds' workers need the rest)
CORES_PER_WORKER = 8


def auto_accelerators(cores: int | None = None) -> str:
    """What ``--accelerators auto`` means on a host with ``cores`` usable cores
    (default: the ones this process may run on)."""
    import os

    n = cores if cores is not None else len(os.sched_getaffinity(0))
    w = min(64, max(1, n // CORES_PER_WORKER))
    return f"fft={w},turbo={w}"


def parse_accelerators(text: str) -> list[tuple[str, tuple[str, ...], int]]:
    """``--accelerators`` as (name, accel_core op names, workers) triples; [] for ``none``."""
    t = text.strip().lower()
    if t == "none":
        return []
    if t == "auto":
        t = auto_accelerators()
    out: list[tuple[str, tuple[str, ...], int]] = []
    for item in t.split(","):
        name, sep, value = item.strip().partition("=")
        if name not in ACCELERATOR_KINDS:
            raise SystemExit(f"vrdma backend: --accelerators {text!r}: unknown accelerator {name!r} "
                             f"(known: {', '.join(ACCELERATOR_KINDS)}, or none)")
        try:
            workers = int(value) if sep else 1
        except ValueError:
            raise SystemExit(f"vrdma backend: --accelerators {text!r}: {value!r} is not a number "
                             f"of workers") from None
        if not 1 <= workers <= 64 or any(n == name for n, _, _ in out):
            raise SystemExit(f"vrdma backend: --accelerators {text!r}: {name} must appear once "
                             f"with 1..64 workers")
        out.append((name, ACCELERATOR_KINDS[name], workers))
    return out


def parse_slowdown(text) -> float:
    """``--accel-slowdown`` as a float in [1, accel_core's MAX_SLOWDOWN]; SystemExit naming it otherwise."""
    from accel_core.service import MAX_SLOWDOWN

    try:
        factor = float(text)
    except (TypeError, ValueError):
        raise SystemExit(f"vrdma backend: --accel-slowdown {text!r} is not a number") from None
    if not 1.0 <= factor <= MAX_SLOWDOWN:  # also refuses nan
        raise SystemExit(f"vrdma backend: --accel-slowdown {text!r}: the factor must be in "
                         f"[1, {MAX_SLOWDOWN:g}] (1: full speed; 2: twice as slow)")
    return factor


def make_accel_router(args):
    """The daemon's accelerator router (one AcceleratorService shared by all guests)."""
    from accel_core import AcceleratorService, AcceleratorSpec, Op, ServiceTimeModel
    from virtio_rdma.accel import AccelRouter

    specs = parse_accelerators(getattr(args, "accelerators", "auto"))
    slowdown = parse_slowdown(getattr(args, "accel_slowdown", "1.0"))
    if not specs:
        return AccelRouter(None)
    # the service-time model: this machine's kernels timed now (~0.1 s), then learned online
    return AccelRouter(AcceleratorService([AcceleratorSpec(name, frozenset(Op.parse(o) for o in ops), w,
                                                           slowdown=slowdown)
                                           for name, ops, w in specs], model=ServiceTimeModel.calibrate()))


def _add_tenant_arguments(p) -> None:
    """Options of the TenantPolicy (vhost_user/tenancy.py) and the socket's ownership."""
    g = p.add_argument_group("tenants (connection admission, per-connection caps, per-uid budgets)")
    g.add_argument("--config", metavar="FILE",
                   help="TOML file; its [tenants] table sets any tenant policy option "
                        "(names as for --limit, e.g. max_connections_per_uid = 8); [[tenant]] "
                        "entries give tenants (by uid or socket) a class, weight and quotas, "
                        "[fairness] aging_seconds (docs/tenants.md). SIGHUP reloads it")
    g.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="set one tenant policy option, over --config (repeatable): max_connections, "
                        "max_connections_per_uid, handshake_timeout, max_qp, max_cq, max_mr, max_pd, "
                        "max_pinned_bytes, max_wqes, uid_max_objects, uid_max_pinned_bytes, uid_max_wqes "
                        "(sizes take K/M/G/T)")
    g.add_argument("--max-connections-per-uid", type=int, metavar="N",
                   help="connections served at once per peer uid (default 64)")
    g.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                   help="close a connection that has not started a ring this long after "
                        "connecting (default 10; 0: never)")
    g.add_argument("--state-dir", metavar="DIR",
                   help="keep per-tenant accounting in DIR/accounting.db (SQLite, WAL; flushed "
                        "every --accounting-flush seconds and at exit; read it with 'vrdma accounting')")
    g.add_argument("--accounting-flush", type=float, default=10.0, metavar="SECONDS",
                   help=argparse.SUPPRESS)
    g.add_argument("--host-name", metavar="NAME",
                   help="this host's name in accounting rows (default: the node name)")
    g.add_argument("--socket-mode", type=lambda t: int(t, 8), default=0o660, metavar="OCTAL",
                   help="the socket's mode, set explicitly whatever the umask (default 0660)")
    g.add_argument("--socket-group", metavar="GROUP",
                   help="the socket's group, a name or gid (default: the daemon's group)")


def tenant_policy(args):
    """The daemon's TenantPolicy: defaults, then --config, then --limit and the named options."""
    from vhost_user.tenancy import PolicyError, TenantPolicy

    try:
        policy = TenantPolicy()
        if getattr(args, "config", None):
            with open(args.config, encoding="utf-8") as f:
                policy = TenantPolicy.from_toml(f.read(), policy)
        values = {}
        for item in getattr(args, "limit", []):
            name, sep, value = item.partition("=")
            if not sep:
                raise PolicyError(f"--limit {item!r}: expected NAME=VALUE")
            name = name.strip().replace("-", "_")
            try:
                values[name] = float(value) if name == "handshake_timeout" else parse_size(value)
            except ValueError:
                raise PolicyError(f"--limit {item!r}: {value.strip()!r} is not a number") from None
        if getattr(args, "max_connections_per_uid", None) is not None:
            values["max_connections_per_uid"] = args.max_connections_per_uid
        if getattr(args, "handshake_timeout", None) is not None:
            values["handshake_timeout"] = args.handshake_timeout
        return TenantPolicy.from_mapping(values, policy)
    except (PolicyError, OSError, ValueError) as e:
        raise SystemExit(f"vrdma backend: {e}") from None


def tenant_config(args):
    """The daemon's TenantConfig: tenant_policy(args) and the --config file's tenants."""
    from vhost_user.tenancy import PolicyError, TenantConfig

    policy = tenant_policy(args)
    if not getattr(args, "config", None):
        return TenantConfig(policy)
    try:
        cfg = TenantConfig.from_file(args.config)
        return TenantConfig(policy, cfg.tenants, cfg.aging_seconds)
    except PolicyError as e:
        raise SystemExit(f"vrdma backend: {e}") from None


class ByteSampler:
    """A daemon service: every ``period`` seconds (and at exit, after the last
    connection closed) the tenants' RDMA byte counters and quota refusals go into
    the accounting, read on the event loop (TenantLedger.rdma_bytes, quota_hits),
    written by its flusher."""

    def __init__(self, ledger, accounting, period: float):
        self.ledger, self.accounting, self.period = ledger, accounting, period
        self._task: Any = None

    async def start(self) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.period)
            self.sample()

    def sample(self) -> None:
        self.accounting.sample_bytes(self.ledger.rdma_bytes())
        self.accounting.sample_quota_hits(self.ledger.quota_hits())

    async def aclose(self) -> None:
        import asyncio
        import contextlib

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


def socket_group(args) -> int | None:
    import grp

    g = getattr(args, "socket_group", None)
    if g is None:
        return None
    if g.isdigit():
        return int(g)
    try:
        return grp.getgrnam(g).gr_gid
    except KeyError:
        raise SystemExit(f"vrdma backend: --socket-group {g!r}: no such group") from None


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper()
    mult = units.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in units else t) * mult


def make_fabric(args):
    """The fabric the daemon's devices share, and the services it needs in the loop."""
    kind = args.fabric
    if kind == "auto":
        kind = "verbs" if args.verbs_device else "roce" if args.roce_addr else "local"
    if kind not in ("roce", "verbs") and args.cluster_key:
        raise SystemExit("vrdma backend: --cluster-key applies to the RoCE fabric (--roce-addr) and "
                         "to peer links over a verbs device (--verbs-device)")
    if kind != "roce" and (args.plaintext_peer or args.peer_port_check):
        raise SystemExit("vrdma backend: --plaintext-peer and --peer-port-check "
                         "apply to the RoCE fabric (--roce-addr) only")
    if kind == "verbs":
        return _verbs_fabric(args)
    if kind == "local":
        from fabric.local import LocalFabric

        return LocalFabric(), []  # one host: every guest of this daemon shares the QPN space
    if not args.roce_addr:
        raise SystemExit("vrdma backend: --fabric roce needs --roce-addr IP")
    from fabric.roce import RoceFabric, RoceFabricService
    from roce.errors import RoceError
    from virtio_rdma.errors import FabricError

    checks, default = {}, "auto"
    for item in args.peer_port_check:
        addr, eq, mode = item.rpartition("=")
        if eq:
            checks[addr] = mode
        else:
            default = mode
    try:
        mac_key = None
        if args.cluster_key:
            from roce.auth import load_key_file

            mac_key = load_key_file(args.cluster_key)
        elif args.plaintext_peer:
            raise SystemExit("vrdma backend: --plaintext-peer needs --cluster-key")
        fabric = RoceFabric(args.roce_addr, port=args.roce_port, port_checks=checks,
                            default_port_check=default, mac_key=mac_key,
                            plaintext_peers=args.plaintext_peer)
    except (FabricError, RoceError) as e:
        raise SystemExit(f"vrdma backend: {e}") from None
    return fabric, [RoceFabricService(fabric, args.roce_port)]


def _verbs_fabric(args):
    if not args.verbs_device:
        raise SystemExit("vrdma backend: --fabric verbs needs --verbs-device NAME")
    from fabric.hca import VerbsFabric, VerbsFabricService
    from virtio_rdma.errors import FabricError

    try:
        fabric = VerbsFabric(args.verbs_device, port=args.verbs_port,
                             gid_index=args.verbs_gid_index, address=args.roce_addr)
    except FabricError as e:
        raise SystemExit(f"vrdma backend: {e}") from None
    return fabric, [VerbsFabricService(fabric)]


def make_ops_services(args, ledger, accel, peering, fabric=None, fabric_services=()):
    """The admin socket and the Prometheus endpoint (docs/operations.md), as asked, and
    the DaemonView they share (None: neither)."""
    admin = getattr(args, "admin_socket", None) or args.socket[0] + ".admin"
    addr = getattr(args, "metrics_addr", None)
    if admin == "none" and not addr:
        return [], None
    from vrdma.ops.view import DaemonView

    view = DaemonView(ledger=ledger, accel=accel, peering=peering, fabric=fabric,
                      fabric_services=[s for s in fabric_services if s is not peering])
    out: list = []
    if admin != "none":
        from vrdma.ops.admin import IDLE_TIMEOUT, AdminService

        timeout = args.admin_timeout if getattr(args, "admin_timeout", None) else IDLE_TIMEOUT
        out.append(AdminService(admin, view, idle_timeout=timeout))
    if addr:
        from vrdma.ops.prom import MetricsService

        try:
            out.append(MetricsService(addr, view))
        except ValueError as e:
            raise SystemExit(f"vrdma backend: {e}") from None
    return out, view


def make_device_factory(args, fabric=None, policy=None, accel=None, ledger=None):
    """``device_factory(info)``: one device per connection (``info``: who connected)."""
    if args.device == "rdma":
        from vhost_user.tenancy import TenantLedger
        from virtio_rdma.device import RdmaDevice

        if fabric is None:
            fabric, _ = make_fabric(args)
        if ledger is None:
            ledger = TenantLedger(policy or tenant_policy(args))
        return RdmaDevice.factory(fabric, ledger, accel)

    from vhost_user.blk import BlkDevice, Disk

    if args.image:
        disk = Disk.file(args.image, read_only=args.read_only)
        return lambda info: BlkDevice(disk, num_queues=args.num_queues)
    size = parse_size(args.size)
    init = b""
    if args.boot_marker:
        from vhost_user.bootsector import make_boot_sector

        init = make_boot_sector(args.boot_marker.encode())

    def factory(info):
        disk = Disk.ram(size, init)
        disk.read_only = args.read_only
        return BlkDevice(disk, num_queues=args.num_queues, owns_disk=True)

    return factory


def run(args) -> int:
    from vhost_user.server import run_backend
    from vhost_user.tenancy import TenantLedger

    config = tenant_config(args)
    policy = config.policy
    ledger = TenantLedger(config=config)
    group = socket_group(args)
    accounting = None
    if getattr(args, "state_dir", None):
        import socket as _socket

        from vrdma.accounting import Accounting

        os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
        accounting = Accounting(os.path.join(args.state_dir, "accounting.db"),
                                args.host_name or _socket.gethostname(), flush_seconds=args.accounting_flush)
        accounting.start()
    fabric, services = make_fabric(args) if args.device == "rdma" else (None, [])
    accel = make_accel_router(args) if args.device == "rdma" else None
    if accel is not None:
        accel.set_tenancy(ledger, accounting)
    peering = make_peering(args, fabric, accel) if args.device == "rdma" else None
    if peering is not None:
        services = [*services, peering]
    reaches_out = bool(services)  # a fabric service or peer links: the fabric says how it reaches out
    factory = make_device_factory(args, fabric, policy, accel, ledger)
    ops, view = make_ops_services(args, ledger if args.device == "rdma" else None, accel, peering, fabric,
                                  services)
    if accounting is not None:
        services = [*services, ByteSampler(ledger, accounting, max(0.05, args.accounting_flush / 2))]
    services = [*services, *ops]
    if view is not None:
        factory = view.factory(factory)  # counters of guests that came and went are kept

    if getattr(args, "state_dir", None) and args.device == "rdma":
        from vrdma.ops.overrides import OverrideStore

        OverrideStore(args.state_dir).attach(ledger)  # live tenant overrides of the last run

    def reload():
        """SIGHUP: read --config again; a bad file keeps the running configuration.
        The new TenantPolicy's admission limits apply from the next connection on."""
        try:
            ledger.reload(tenant_config(args))
        except SystemExit as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return None
        live = {n: ledger.overrides(n) for n in ledger.specs() if ledger.overrides(n)}
        p = ledger.policy
        print(f"vrdma backend: configuration reloaded ({len(ledger.config.tenants)} tenants; "
              f"max_connections {p.max_connections}, max_connections_per_uid {p.max_connections_per_uid}, "
              f"handshake_timeout {p.handshake_timeout:g}"
              + (f"; live overrides kept: {live}" if live else "") + ")", flush=True)
        return p

    def ready():
        if reaches_out:  # a fabric that reaches other hosts says how
            print(f"vrdma backend: {fabric.describe()}", flush=True)
        if peering is not None:
            for addr, t in peering.peering.targets.items():
                print(f"vrdma backend: peer host {t.host} = {addr}", flush=True)
        for svc in services:
            if hasattr(svc, "port") and hasattr(svc, "registry"):
                print(f"vrdma backend: metrics on http://{svc.host}:{svc.port}/metrics", flush=True)
            elif hasattr(svc, "view") and hasattr(svc, "path"):
                print(f"vrdma backend: admin socket {svc.path}", flush=True)
        for path in args.socket:
            print(f"vrdma backend: listening on {path}", flush=True)

    try:
        return run_backend(args.socket, factory, ready=ready, poll_us=args.poll_us,
                           poll_adaptive=args.poll_adaptive, poll_move=not args.poll_stay,
                           require_sealed_memory=not args.allow_unsealed_memory, services=services,
                           policy=policy, socket_mode=args.socket_mode, socket_group=group,
                           on_reload=reload)
    except OSError as e:
        if reaches_out and e.errno is not None:
            raise SystemExit(f"vrdma backend: cannot open {fabric.describe()}: {e.strerror}") from None
        raise
    finally:
        if accel is not None:
            metrics = accel.metrics()
            log.info("accelerators: %s", metrics)  # peers' counters: logged by their service
            if args.metrics_file:
                _write_metrics(args.metrics_file, {
                    "accelerators": metrics,
                    "peering": peering.peering.describe() if peering is not None else None,
                    "load_table": peering.load_metrics if peering is not None else None})
            accel.close()
        if accounting is not None:
            accounting.close()


def _write_metrics(path: str, data: dict) -> None:
    import json

    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("--metrics-file %s: %s", path, e)
