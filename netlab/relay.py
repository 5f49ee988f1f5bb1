"""A userspace L2 relay between two interfaces that impairs traffic without
touching it: frames are reordered, duplicated or dropped, never modified.

The kernel here has no netem, so the multi-host tests put this relay in a
middle namespace (``A <-veth-> R <-veth-> B``, see
:func:`netlab.ns.two_hosts_via_relay`). It opens one AF_PACKET raw socket per
interface (ETH_P_ALL, ``PACKET_IGNORE_OUTGOING`` so it never sees its own
sends; a veth hands its peer every frame, so no promiscuous mode is needed)
and forwards each frame received on one to the other, byte for byte.

Policy (:class:`Policy`), applied per direction with its own seeded
``random.Random`` so a run is reproducible:

* only frames it *impairs* are subject to it: IPv4 UDP frames, optionally
  only those to one UDP port. ARP and everything else passes straight.
* ``loss``: drop the frame.
* ``duplicate``: forward it twice, back to back.
* ``reorder``: hold the frame (both copies if duplicated) and release it
  right after the next ``reorder_depth`` impaired frames of the same
  direction are forwarded, or ``hold_timeout`` seconds after it was held,
  whichever comes first, so nothing is stuck when traffic stops.

:class:`Impairment` is that policy for one direction, sans I/O (frames and
``now`` in, frames to send out). :func:`serve` is the loop;
``python -m netlab.relay IF_A IF_B [options]`` runs it, prints one JSON line
``{"ready": ...}`` once both sockets are bound, writes its counters as JSON
to ``--stats FILE`` on SIGUSR1, and on SIGTERM/SIGINT releases held frames,
writes the file once more and prints the counters as a last JSON line.
:class:`RelayProcess` starts and queries it inside a namespace.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from .errors import NetlabError, ProcessFailed
from .ns import python_argv

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 16 << 20
MAX_FRAME = 65536 + 64       # above the largest veth MTU plus the Ethernet header
BATCH = 64                   # frames taken from one socket before looking at the other


class PolicyError(NetlabError, ValueError):
    def __init__(self, name: str, value: object, why: str) -> None:
        super().__init__(f"relay policy {name}={value!r}: {why}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class Policy:
    seed: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_depth: int = 3
    hold_timeout: float = 0.005      # seconds
    udp_port: int | None = None      # impair only UDP to this port (None: all IPv4 UDP)

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise PolicyError(name, v, "a probability must be within [0, 1]")
        if self.reorder_depth < 1:
            raise PolicyError("reorder_depth", self.reorder_depth, "must be at least 1")
        if not 0.0 < self.hold_timeout <= 10.0:
            raise PolicyError("hold_timeout", self.hold_timeout, "must be in (0, 10] seconds")
        if self.udp_port is not None and not 0 < self.udp_port < 65536:
            raise PolicyError("udp_port", self.udp_port, "not a UDP port")

    def argv(self) -> list[str]:
        """The command-line options that give this policy."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out += ["--" + f.name.replace("_", "-"), str(v)]
        return out


@dataclass(slots=True)
class Counters:
    """One direction. ``rx`` = ``passed`` + ``impaired``; of the impaired,
    ``dropped`` went nowhere, ``duplicated`` went twice, ``held`` were
    released late (``released_by_timeout`` of them by the timer)."""

    rx: int = 0
    passed: int = 0
    impaired: int = 0
    dropped: int = 0
    duplicated: int = 0
    held: int = 0
    released_by_timeout: int = 0
    tx: int = 0
    tx_errors: int = 0
    kernel_drops: int = 0            # frames the ingress socket's buffer had no room for


def impaired_frame(frame, udp_port: int | None) -> bool:
    """Is this Ethernet frame an IPv4 UDP datagram (to ``udp_port``)?"""
    if len(frame) < 42 or frame[12] != 0x08 or frame[13] != 0x00 or frame[23] != 17:
        return False
    if udp_port is None:
        return True
    off = 14 + (frame[14] & 0x0F) * 4 + 2
    return len(frame) >= off + 2 and (frame[off] << 8 | frame[off + 1]) == udp_port


class Impairment:
    """The policy for one direction, sans I/O. :meth:`frame` takes an
    impaired frame and returns the frames to send now, in order;
    :meth:`expire` returns held frames whose timeout passed; :meth:`deadline`
    is when to call it next."""

    __slots__ = ("policy", "counters", "_rng", "_held")

    def __init__(self, policy: Policy, stream: int, counters: Counters | None = None) -> None:
        self.policy = policy
        self.counters = counters or Counters()
        self._rng = random.Random(policy.seed * 2 + stream)  # noqa: S311 (seeded, reproducible loss; no secret)
        self._held: list[list] = []          # [frames_left, deadline, frame, copies]

    def frame(self, frame: bytes, now: float) -> list[bytes]:
        p, c, rnd = self.policy, self.counters, self._rng.random
        c.impaired += 1
        if p.loss and rnd() < p.loss:
            c.dropped += 1
            return []
        copies = 1
        if p.duplicate and rnd() < p.duplicate:
            copies = 2
            c.duplicated += 1
        if p.reorder and rnd() < p.reorder:
            c.held += 1
            self._held.append([p.reorder_depth, now + p.hold_timeout, frame, copies])
            return []
        out = [frame] * copies
        if self._held:
            keep = []
            for h in self._held:
                h[0] -= 1
                if h[0]:
                    keep.append(h)
                else:
                    out += [h[2]] * h[3]
            self._held = keep
        return out

    def deadline(self) -> float | None:
        return min(h[1] for h in self._held) if self._held else None

    def expire(self, now: float) -> list[bytes]:
        out, keep = [], []
        for h in self._held:
            if h[1] <= now:
                out += [h[2]] * h[3]
                self.counters.released_by_timeout += 1
            else:
                keep.append(h)
        self._held = keep
        return out

    def flush(self) -> list[bytes]:
        out = [f for h in self._held for f in [h[2]] * h[3]]
        self._held = []
        return out


# ------------------------------------------------------------------------- I/O
def open_packet_socket(ifname: str) -> socket.socket:
    """A non-blocking AF_PACKET raw socket bound to ``ifname`` for all
    protocols, blind to its own transmissions, with large buffers."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
        s.bind((ifname, ETH_P_ALL))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _kernel_drops(s: socket.socket) -> int:
    """Drops since the last call (PACKET_STATISTICS resets on read)."""
    return struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]


class _Stop(Exception):
    pass


def _on_stop(signum, frame):
    raise _Stop


class Relay:
    """Both directions between two bound sockets; :meth:`run` is the loop."""

    def __init__(self, if_a: str, if_b: str, policy: Policy) -> None:
        self.names = (if_a, if_b)
        self.policy = policy
        self.socks: list[socket.socket] = []
        try:
            for name in self.names:
                self.socks.append(open_packet_socket(name))
        except BaseException:
            self.close()
            raise
        self.dirs = (Impairment(policy, 0), Impairment(policy, 1))   # a->b, b->a
        self.dumps = 0

    def stats(self) -> dict:
        for s, d in zip(self.socks, self.dirs, strict=True):
            d.counters.kernel_drops += _kernel_drops(s)
        self.dumps += 1
        return {"seq": self.dumps, "pid": os.getpid(), "interfaces": list(self.names),
                "policy": asdict(self.policy),
                "a_to_b": asdict(self.dirs[0].counters), "b_to_a": asdict(self.dirs[1].counters)}

    def write_stats(self, path: str) -> dict:
        st = self.stats()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, path)
        return st

    def _send(self, dst: socket.socket, frames: Sequence[bytes | memoryview], c: Counters) -> None:
        for f in frames:
            try:
                dst.send(f)
                c.tx += 1
            except OSError:
                c.tx_errors += 1

    def run(self) -> None:
        """Forward until :class:`_Stop` (raised by the signal handlers)."""
        poller = select.poll()
        for s in self.socks:
            poller.register(s, select.POLLIN)
        route = {s.fileno(): (s, self.socks[1 - i], self.dirs[i])
                 for i, s in enumerate(self.socks)}
        buf = bytearray(MAX_FRAME)
        mv = memoryview(buf)
        port = self.policy.udp_port
        monotonic = time.monotonic
        while True:
            deadline = min((t for t in (d.deadline() for d in self.dirs) if t is not None),
                           default=None)
            timeout = None if deadline is None else max(0, int((deadline - monotonic()) * 1000) + 1)
            events = poller.poll(timeout)
            now = monotonic()
            for fd, _ in events:
                src, dst, imp = route[fd]
                c = imp.counters
                for _ in range(BATCH):
                    try:
                        n = src.recv_into(buf)
                    except BlockingIOError:
                        break
                    c.rx += 1
                    frame = mv[:n]
                    if not impaired_frame(frame, port):
                        c.passed += 1
                        self._send(dst, (frame,), c)
                    else:
                        out = imp.frame(bytes(frame), now)
                        if out:
                            self._send(dst, out, c)
            if deadline is not None and deadline <= now:
                for i, imp in enumerate(self.dirs):
                    self._send(self.socks[1 - i], imp.expire(now), imp.counters)

    def release_all(self) -> None:
        for i, imp in enumerate(self.dirs):
            self._send(self.socks[1 - i], imp.flush(), imp.counters)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


def serve(if_a: str, if_b: str, policy: Policy, stats_path: str | None = None,
          out=sys.stdout) -> dict:
    """Run the relay in this process until SIGTERM/SIGINT; return the counters."""
    relay = Relay(if_a, if_b, policy)
    try:
        if stats_path:
            signal.signal(signal.SIGUSR1, lambda *_: relay.write_stats(stats_path))
        signal.signal(signal.SIGTERM, _on_stop)
        signal.signal(signal.SIGINT, _on_stop)
        print(json.dumps({"ready": True, "pid": os.getpid(), "interfaces": [if_a, if_b]}),
              file=out, flush=True)
        try:
            relay.run()
        except _Stop:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        relay.release_all()
        st = relay.write_stats(stats_path) if stats_path else relay.stats()
        print(json.dumps(st), file=out, flush=True)
        return st
    finally:
        relay.close()


# ------------------------------------------------------------ running it in a ns
class RelayProcess:
    """``python -m netlab.relay`` inside namespace ``ns`` (owner of the
    process and of its stats file). Context manager; :meth:`stats` asks the
    running relay for its counters, :meth:`stop` ends it and returns them."""

    def __init__(self, ns, if_a: str, if_b: str, policy: Policy, *, timeout: float = 10.0) -> None:
        self.policy = policy
        fd, self.stats_path = tempfile.mkstemp(prefix="netlab-relay-", suffix=".json")
        os.close(fd)
        os.unlink(self.stats_path)
        self.final: dict | None = None
        self.proc = ns.popen(python_argv("netlab.relay", if_a, if_b, "--stats", self.stats_path,
                                         *policy.argv()))
        try:
            self.proc.expect('"ready"', timeout=timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self, timeout: float = 5.0) -> dict:
        """Current counters (SIGUSR1, then wait for the relay's next dump)."""
        if self.final is not None:
            return self.final
        seq = self._read().get("seq", 0)
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self._read()
            if st.get("seq", 0) > seq:
                return st
            if not self.proc.alive():
                break
            time.sleep(0.002)
        raise ProcessFailed("relay stats", self.proc.argv, f"no dump within {timeout:g} s")

    def _read(self) -> dict:
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def stop(self) -> dict:
        """Stop the relay (held frames are released first); its last counters."""
        if self.final is None:
            rc = self.proc.stop()
            lines = [ln for ln in self.proc.stdout.splitlines() if ln.startswith("{")]
            final = json.loads(lines[-1]) if lines else {}
            with_counters = "a_to_b" in final
            self.final = final if with_counters else {"error": self.proc.stderr.strip()[-2000:]}
            if os.path.exists(self.stats_path):
                os.unlink(self.stats_path)
            if rc != 0 and not with_counters:
                raise ProcessFailed("relay", self.proc.argv, f"exited {rc}: {self.final['error']}")
        return self.final

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Policy]:
    """The command line of ``python -m netlab.relay``: options and policy."""
    ap = argparse.ArgumentParser(prog="python -m netlab.relay",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("if_a")
    ap.add_argument("if_b")
    ap.add_argument("--stats", help="JSON counters file, rewritten on SIGUSR1 and at exit")
    d = Policy()
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--loss", type=float, default=d.loss)
    ap.add_argument("--duplicate", type=float, default=d.duplicate)
    ap.add_argument("--reorder", type=float, default=d.reorder)
    ap.add_argument("--reorder-depth", type=int, default=d.reorder_depth)
    ap.add_argument("--hold-timeout", type=float, default=d.hold_timeout, help="seconds")
    ap.add_argument("--udp-port", type=int, default=d.udp_port)
    a = ap.parse_args(argv)
    return a, Policy(**{f.name: getattr(a, f.name) for f in fields(Policy)})


def main(argv: list[str] | None = None) -> int:
    a, policy = parse_args(argv)
    serve(a.if_a, a.if_b, policy, a.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
