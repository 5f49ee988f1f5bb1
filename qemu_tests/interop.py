"""The host side of a wire-interop test against a kernel-rxe guest
(test_rxe_interop.py: ibv_rc_pingpong; test_perftest_interop.py: perftest).

Topology: a network namespace holds a tap device (:data:`HOST_IP`) and our
back-end daemon bound to it (:func:`backend_in_ns`); the QEMU guest
(:class:`qemu_tests.rxe_guest.RxeGuest`) is the tap's other end
(:data:`GUEST_IP`). The guest's script runs its tool first as the client of
our servers, then as the server of our clients, printing a section per run
(``=== guest-client KEY rc=N`` then the tool's output). :func:`exchange`
boots the guest and runs our side meanwhile, in a thread: each of our
servers once, then each of our clients, again while the guest's server is
not listening yet (``Couldn't connect``).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

HOST_IP, GUEST_IP = "203.0.113.1", "203.0.113.2"


def in_ns(ns: str, *argv: str) -> list[str]:
    """``vrdma argv...`` run in network namespace ``ns``."""
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "vrdma", *argv]


@contextlib.contextmanager
def backend_in_ns(ns: str, sock: str, addr: str = HOST_IP, timeout: float = 20) -> Iterator[subprocess.Popen]:
    """Our back-end daemon in ``ns`` on the userspace RoCEv2 fabric at ``addr``, listening
    on ``sock`` when this enters; terminated (then killed) when it leaves."""
    daemon = subprocess.Popen(in_ns(ns, "backend", "--socket", sock, "--roce-addr", addr),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            assert daemon.poll() is None, daemon.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "daemon did not listen"
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()


def sections(pattern: re.Pattern[str], text: str,
             key: Callable[[str], Any] = str) -> dict[tuple[str, Any], tuple[int, str]]:
    """The guest's sections: ``pattern`` matches a section's header line with three groups
    (role, key, rc); (role, key(key)) -> (rc, the section's text)."""
    parts = pattern.split(text)
    return {(parts[i], key(parts[i + 1])): (int(parts[i + 2]), parts[i + 3])
            for i in range(1, len(parts) - 3, 4)}


def exchange(guest, ns: str, servers: Mapping[Any, Sequence[str]], clients: Mapping[Any, Sequence[str]], *,
             guest_timeout: float, run_timeout: float, retry_for: float, join: float):
    """Boot ``guest`` and meanwhile run our ``servers`` (key -> vrdma argv), then our
    ``clients``, in ``ns``. Returns (the guest's run, {("server"|"client", key): our
    CompletedProcess}, a report of both sides' output for assertion messages)."""
    ours: dict[tuple[str, Any], subprocess.CompletedProcess] = {}
    failure: list[BaseException] = []
    guest_done = threading.Event()

    def host_side() -> None:
        try:
            for k, argv in servers.items():  # our server, the guest's client
                ours[("server", k)] = subprocess.run(in_ns(ns, *argv), capture_output=True, text=True,
                                                     timeout=run_timeout, check=False)
            for k, argv in clients.items():  # our client, the guest's server (retry until it listens)
                end = time.monotonic() + retry_for
                while True:
                    r = subprocess.run(in_ns(ns, *argv), capture_output=True, text=True, timeout=run_timeout,
                                       check=False)
                    if r.returncode == 0 or "Couldn't connect" not in r.stderr + r.stdout \
                            or time.monotonic() > end or guest_done.is_set():
                        break
                    time.sleep(0.2)
                ours[("client", k)] = r
        except BaseException as e:  # reported below
            failure.append(e)

    t = threading.Thread(target=host_side, daemon=True)
    t.start()
    try:
        run = guest.run(timeout=guest_timeout)
    finally:
        guest_done.set()
    t.join(join)
    assert not failure, failure
    report = run.output + "\n--- ours ---\n" + "\n".join(
        f"{k}: rc={v.returncode}\n{v.stdout}{v.stderr}" for k, v in ours.items())
    return run, ours, report
