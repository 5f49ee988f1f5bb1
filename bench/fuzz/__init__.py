"""The project's own fuzzers (issue #12 item 7).

``python -m bench.fuzz TARGET --count N --seed S [--json]``; the tests in
``tests/fuzz/`` run each target briefly with fixed seeds. Targets:

* ``vhost-user`` (:mod:`bench.fuzz.vhost`): mutated vhost-user messages and
  message sequences, with real memfds and eventfds, over the unix socket of
  a real ``vrdma backend`` process;
* ``control`` and ``rings`` (:mod:`bench.fuzz.local`): hostile control
  commands, and garbage WQEs / CQ rings / doorbells, against device cores
  sharing a LocalFabric with a live victim pair whose handles the attacker
  knows;
* ``roce`` (:mod:`bench.fuzz.roce`): RoCEv2 packets with valid and invalid
  ICRC aimed at live wire QPs, through the real UDP endpoints.

Every target checks during and after the run: no exception escapes (crash),
no input exceeds its time bound (hang), canary bytes outside what a guest
allowed to be written are unchanged, a fresh guest still gets a verified RC
SEND / WRITE / READ round trip, and fds and mappings return to baseline.
"""
from __future__ import annotations

from .common import FuzzFailure, Report



TARGETS = ("vhost-user", "control", "rings", "roce")


def run_target(name: str, count: int, seed: int, *, progress=None, **kw) -> Report:
    """Run ``count`` inputs of target ``name`` with ``seed``; the report."""
    if name == "control":
        from .local import ControlTarget as T
    elif name == "rings":
        from .local import RingsTarget as T
    elif name == "roce":
        from .roce import RoceTarget as T
    elif name == "vhost-user":
        from .vhost import VhostUserTarget as T
    else:
        raise ValueError(f"unknown fuzz target {name!r}; one of {', '.join(TARGETS)}")
    return T(seed, **kw).run(count, progress)


__all__ = ["TARGETS", "run_target", "Report", "FuzzFailure"]
