"""A cluster of vrdma hosts on one machine: the stage of ``vrdma demo
--hosts N``, of the multi-host accelerator tests and of the remote-job
benchmarks.

Each host is a network namespace with a lab address (RFC 5737), joined to
the others through a bridge in a hub namespace (:func:`netlab.ns.switch`),
running a real ``vrdma backend`` with its own accelerators (``HostSpec``;
``none`` for a host without) and every other host as a ``--peer``, so each
daemon opens a daemon-owned RC link to each other one over the userspace
RoCEv2 fabric. Guests are processes of the root namespace that open a
host's unix socket (a file path: reachable from any namespace).

Host ids: host ``i``'s daemon numbers its peers 1, 2, ... in the order of its
``--peer`` options, which follow the cluster's order with ``i`` left out;
:meth:`LabCluster.ran_on` turns the host id of a completion back into the
host that ran the job. Needs root (namespaces); :func:`available` says why
not.

Shared services (e.g. the redis-server of the scheduler's Redis load table):
``hub_ip`` gives the bridge an address on the hosts' subnet, so a process of
the hub namespace (:attr:`LabCluster.hub`) listening there is reachable
from every host; ``on_network(cluster)`` is called once the network is up,
before any daemon starts, to start such processes (``cluster.hub.popen``:
the hub owns them and stops them on exit).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: accelerator operations each --accelerators kind runs (the lab's own view, for waiting)
_KIND_OPS = {"fft": ("FFT", "IFFT"), "turbo": ("TURBO_ENCODE", "TURBO_DECODE")}
#: the hub's bridge
_BRIDGE = "br0"


def available() -> str | None:
    """None if this process can build a lab cluster, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        import netlab.ns  # noqa: F401
    except ImportError as e:  # pragma: no cover - netlab ships with vrdma
        return f"netlab is missing: {e}"
    return None


@dataclass(frozen=True)
class HostSpec:
    """One host: its ``--accelerators`` (``none``: a host without), an
    ``--accel-slowdown`` and any further backend options."""

    accelerators: str = "fft=1,turbo=1"
    slowdown: float = 1.0
    extra: tuple[str, ...] = ()

    def ops(self) -> set[str]:
        if self.accelerators == "none":
            return set()
        return {op for item in self.accelerators.split(",") for op in _KIND_OPS[item.split("=")[0]]}


@dataclass
class LabHost:
    index: int
    ip: str
    sock: str
    spec: HostSpec
    peers: list[str]
    ns: Any = None
    proc: Any = None
    banner: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"host{self.index}"

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "vrdma", "backend", "--socket", self.sock, "--roce-addr", self.ip,
             "--accelerators", self.spec.accelerators, "--accel-slowdown", f"{self.spec.slowdown:g}"]
        for p in self.peers:
            a += ["--peer", p]
        return a + list(self.spec.extra)

    def start(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        self.proc = self.ns.popen(self.argv())
        self.proc.expect("listening", timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (a host failing: no goodbye to its peers)."""
        p = self.proc
        if p is not None and p.alive():
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        p, self.proc = self.proc, None
        return p.stop() if p is not None else None


class LabCluster:
    """``len(specs)`` hosts at ``{subnet}.1``, ``{subnet}.2``, ... (see the module doc)."""

    def __init__(self, specs: list[HostSpec], workdir: str | Path, *, subnet: str = "192.0.2",
                 relay=None, hub_ip: str | None = None,
                 on_network: Callable[[LabCluster], None] | None = None):
        if not 2 <= len(specs) <= 200:
            raise ValueError(f"a lab cluster has 2..200 hosts, not {len(specs)}")
        if relay is not None and len(specs) != 2:
            raise ValueError("a relayed lab cluster has 2 hosts")
        if hub_ip is not None and relay is not None:
            raise ValueError("a relayed lab cluster has no hub")
        #: the hub namespace (the bridge's), once entered; None when relayed
        self.hub: Any = None
        #: the bridge's address on the hosts' subnet, if given (module doc)
        self.hub_ip = hub_ip
        self._on_network = on_network
        #: two hosts only: a :class:`netlab.relay.Policy` for an L2 relay between them
        #: (reordering, duplication, loss) instead of the bridge; its process is :attr:`relay`
        self.policy = relay
        self.relay: Any = None
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ips = [f"{subnet}.{i + 1}" for i in range(len(specs))]
        if hub_ip is not None and (hub_ip in ips or hub_ip.rpartition(".")[0] != subnet):
            raise ValueError(f"hub address {hub_ip} is not a free address of {subnet}.0/24")
        self.hosts = [LabHost(i, ip, str(self.workdir / f"host{i}.sock"), spec, [p for p in ips if p != ip])
                      for i, (ip, spec) in enumerate(zip(ips, specs, strict=True))]
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LabCluster:
        from netlab.ns import Namespace, switch, two_hosts_via_relay

        try:
            if self.policy is not None:
                a, b = self.hosts
                pair = self._stack.enter_context(two_hosts_via_relay(self.policy, f"{a.ip}/24", f"{b.ip}/24"))
                a.ns, b.ns, self.relay = pair.a, pair.b, pair.relay
            else:
                hub = self.hub = self._stack.enter_context(Namespace())
                for h in self.hosts:
                    h.ns = self._stack.enter_context(Namespace())
                switch(hub, [(h.ns, f"{h.ip}/24") for h in self.hosts], bridge=_BRIDGE)
                if self.hub_ip is not None:
                    hub.ip("addr", "add", f"{self.hub_ip}/24", "dev", _BRIDGE)
            if self._on_network is not None:
                self._on_network(self)
            for h in self.hosts:
                self._stack.callback(h.stop)
                h.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def ran_on(self, i: int, host_id: int) -> LabHost:
        """The host that ran a job of host ``i``'s guest whose completion says ``host_id``."""
        if host_id == 0:
            return self.hosts[i]
        ip = self.hosts[i].peers[host_id - 1]
        return next(h for h in self.hosts if h.ip == ip)

    def host_id(self, i: int, j: int) -> int:
        """Host ``j`` as host ``i``'s daemon numbers it (FORCE_TARGET's target_host)."""
        return 0 if i == j else self.hosts[i].peers.index(self.hosts[j].ip) + 1

    def expected_reach(self, i: int) -> dict[str, int]:
        """Per accelerator op: how many hosts host ``i``'s guests reach once every link is up."""
        out: dict[str, int] = {}
        for h in self.hosts:
            if h.proc is None and h.index != i:
                continue
            for op in h.spec.ops():
                out[op] = out.get(op, 0) + 1
        return out

    def wait_linked(self, timeout: float = 30.0, hosts=None) -> None:
        """Until each host's device reaches every live host's accelerators
        (QUERY_ACCEL's reachable_hosts: its peer links are up)."""
        from guest_lib import Context

        deadline = time.monotonic() + timeout
        for h in (self.hosts if hosts is None else hosts):
            want = self.expected_reach(h.index)
            with Context(h.sock, mem_size=1 << 20) as ctx:
                while True:
                    got = {o.op.name: o.reachable_hosts for o in ctx.query_accel() if o.reachable_hosts}
                    if all(got.get(op, 0) >= n for op, n in want.items()):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{h.name} ({h.ip}) reaches {got}, expected {want}: "
                                           "peer links did not come up")
                    time.sleep(0.05)
