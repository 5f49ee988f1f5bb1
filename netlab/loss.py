"""Random packet loss with iptables' ``statistic`` match (this kernel has no
netem).

:class:`RandomLoss` appends, inside one namespace, the rule

    iptables -A INPUT -p udp --dport 4791 -m statistic --mode random
             --probability P -m comment --comment netlab-loss-<id> -j DROP

so each datagram to that port *arriving* in the namespace is dropped with
probability P, independently. The rule sits on ingress on purpose: a DROP in
OUTPUT or POSTROUTING makes the sender's ``sendto`` fail with EPERM, which no
wire does. Loss in both directions of a link is one rule on each side
(:func:`lossy_link`). Other ports and protocols are untouched.

Debian 12 ships iptables over nf_tables, plus iptables-legacy. The first of
``iptables``, ``iptables-nft``, ``iptables-legacy`` that accepts the rule in
the namespace is used (and remembered for deleting it); if none does,
:class:`netlab.errors.IptablesUnavailable` carries each one's error.
:meth:`RandomLoss.dropped` reads the rule's packet counter. The rule is
deleted on :meth:`RandomLoss.close` (or with the namespace).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

from .errors import CommandFailed, IptablesUnavailable, NetlabError
from .ns import Namespace

BACKENDS = ("iptables", "iptables-nft", "iptables-legacy")
ROCE_PORT = 4791
_ids = itertools.count()


class RandomLoss:
    """Drop incoming UDP datagrams to ``port`` in ``ns`` with probability
    ``probability``. Context manager; :meth:`close` is idempotent."""

    def __init__(self, ns: Namespace, probability: float, *, port: int = ROCE_PORT,
                 iface: str | None = None) -> None:
        if not 0.0 <= probability <= 1.0:
            raise NetlabError(f"loss probability {probability!r} is not within [0, 1]")
        if not 0 < port < 65536:
            raise NetlabError(f"loss port {port!r} is not a UDP port")
        self.ns = ns
        self.probability = probability
        self.port = port
        self.tag = f"netlab-loss-{os.getpid()}-{next(_ids)}"
        self.spec = ["INPUT", "-p", "udp", "--dport", str(port),
                     *(["-i", iface] if iface else []),
                     "-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}",
                     "-m", "comment", "--comment", self.tag, "-j", "DROP"]
        self.backend: str | None = None
        errors = []
        for backend in BACKENDS:
            cp = ns.run([backend, "-w", "-A", *self.spec], check=False)
            if cp.returncode == 0:
                self.backend = backend
                break
            errors.append(f"{backend}: {cp.stderr.strip() or f'exit {cp.returncode}'}")
        if self.backend is None:
            raise IptablesUnavailable(f"no iptables backend takes a statistic rule in {ns.name}: "
                                      + "; ".join(errors))

    def dropped(self) -> int:
        """Packets this rule has dropped so far."""
        if self.backend is None:
            raise NetlabError(f"loss rule {self.tag} is closed")
        cp = self.ns.run([self.backend, "-w", "-L", "INPUT", "-v", "-x", "-n"])
        for line in cp.stdout.splitlines():
            if f"/* {self.tag} */" in line:
                return int(line.split()[0])
        raise NetlabError(f"loss rule {self.tag} is missing from INPUT in {self.ns.name}")

    def close(self) -> None:
        if self.backend is None:
            return
        backend, self.backend = self.backend, None
        if self.ns.closed:
            return                                  # the rule went with the namespace
        cp = self.ns.run([backend, "-w", "-D", *self.spec], check=False)
        if cp.returncode != 0:
            raise CommandFailed([backend, "-D", *self.spec], cp.returncode, cp.stderr)

    def __enter__(self) -> RandomLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def lossy_link(ns_a: Namespace, ns_b: Namespace, probability: float, *,
               port: int = ROCE_PORT) -> Iterator[tuple[RandomLoss, RandomLoss]]:
    """Loss ``probability`` in both directions between two namespaces: one
    ingress rule in each. Yields ``(rule in a, rule in b)``."""
    with RandomLoss(ns_a, probability, port=port) as la, \
            RandomLoss(ns_b, probability, port=port) as lb:
        yield la, lb
