"""Network namespaces, veth links and the processes that run inside them.

A :class:`Namespace` is one ``ip netns`` namespace with its loopback up. It
owns what it creates: processes started with :meth:`Namespace.popen` are
stopped and reaped on :meth:`Namespace.close`, any other process found in the
namespace then (a grandchild) is killed by pid, and the namespace is deleted,
which also destroys the veth ends inside it. ``close`` is idempotent and also
runs at interpreter exit if the owner forgot it.

:func:`veth_pair` joins two namespaces; :func:`two_hosts` and
:func:`two_hosts_via_relay` build the two topologies the multi-host tests use:

* ``A <-veth-> B`` (one subnet, link MTU 9000 by default so that 4096-byte
  RoCE payloads fit);
* ``A <-veth-> R <-veth-> B`` where R runs :mod:`netlab.relay`, which bridges
  L2 frames between its two veths and may reorder, duplicate or drop them.
  A and B send with checksum offload off: a frame forwarded through an
  AF_PACKET socket loses the kernel's "checksum still to do" mark, so the
  UDP checksum must already be in the bytes.

Lab addresses must come from the documentation ranges of RFC 5737.
:meth:`Namespace.entered` switches the calling thread into the namespace
(``setns``) for a ``with`` block, so a test can open sockets there without a
process of its own; sockets keep their namespace after the block.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import AddressNotAllowed, CommandFailed, NetlabError, ProcessFailed

LAB_NETWORKS = tuple(ipaddress.ip_network(n) for n in
                     ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))
DEFAULT_MTU = 9000          # RoCE MTU 4096 + BTH/RETH/ICRC + UDP/IP headers fit
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "vrdma"
_CLONE_NEWNET = 0x40000000
_SIOCETHTOOL = 0x8946
_ETHTOOL_STXCSUM = 0x00000017
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_names = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a host command to completion; :class:`CommandFailed` if it fails."""
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and cp.returncode != 0:
        raise CommandFailed(argv, cp.returncode, cp.stderr)
    return cp


def python_argv(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def lab_interface(addr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Parse ``addr`` ("192.0.2.1/24") and check it is a lab address."""
    try:
        iface = ipaddress.ip_interface(addr)
    except ValueError:
        raise AddressNotAllowed(addr) from None
    if not any(iface.ip in net for net in LAB_NETWORKS):
        raise AddressNotAllowed(addr)
    return iface


# --------------------------------------------------------------------- processes
class NsProcess:
    """A process started inside a namespace (``ip netns exec`` execs the
    command, so :attr:`pid` is the command itself). Its output pipes are
    read while waiting for it, so a chatty process never blocks on a full
    pipe: :meth:`expect` waits for a line, :meth:`wait` for the exit,
    :meth:`stop` signals and reaps; then :attr:`stdout` / :attr:`stderr`
    hold the output not consumed by :meth:`expect`."""

    def __init__(self, argv: list[str], popen: subprocess.Popen) -> None:
        self.argv = argv
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.stdout = ""
        self.stderr = ""
        self._pending = {"stdout": b"", "stderr": b""}
        self._open = {name: getattr(popen, name) for name in ("stdout", "stderr")
                      if getattr(popen, name) is not None}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def _pump(self, end: float, until=None) -> bool:
        """Read the pipes until ``until()`` holds (True), or until EOF, or the
        process has exited and its pipes are idle (a descendant may keep
        them open), or time ``end`` (False)."""
        with selectors.DefaultSelector() as sel:
            for name, f in self._open.items():
                sel.register(f.fileno(), selectors.EVENT_READ, name)
            while True:
                if until is not None and until():
                    return True
                left = end - time.monotonic()
                if not sel.get_map() or left <= 0:
                    return False
                ready = sel.select(min(left, 0.05))
                if not ready and self.popen.poll() is not None:
                    return False
                for key, _ in ready:
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._pending[key.data] += chunk
                    else:
                        sel.unregister(key.fd)
                        self._open.pop(key.data).close()

    def expect(self, text: str, *, stream: str = "stdout", timeout: float = 10.0) -> str:
        """Read ``stream`` until a line containing ``text``; return that line.
        Raises :class:`ProcessFailed` if the process exits or time runs out."""
        if getattr(self.popen, stream, None) is None:
            raise ValueError(f"{stream} of {self.argv[0]} is not a pipe")
        needle = text.encode()
        found: list[bytes] = []

        def line_found() -> bool:
            buf = self._pending[stream]
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._pending[stream] = buf
                if needle in line:
                    found.append(line)
                    return True
            return False

        end = time.monotonic() + timeout
        if self._pump(end, line_found):
            return found[0].decode(errors="replace")
        if not self._open:                       # EOF on every pipe: the process is ending
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(max(0.5, end - time.monotonic()))
        if self.popen.poll() is None:
            raise ProcessFailed("no line with " + repr(text), self.argv,
                                f"timed out after {timeout:g} s")
        self.stop()
        raise ProcessFailed("no line with " + repr(text), self.argv,
                            f"exited {self.returncode}: {self.stderr.strip()[-500:]}")

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit by itself and collect its output;
        :class:`ProcessFailed` (after killing it) if it takes longer."""
        if self.returncode is None:
            end = time.monotonic() + timeout
            self._pump(end)
            try:
                self.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                self.stop(timeout=1.0, sig=signal.SIGKILL)
                raise ProcessFailed("still running", self.argv,
                                    f"killed after {timeout:g} s: {self.stderr.strip()[-500:]}") from e
            self._finish()
        return self.returncode  # type: ignore[return-value]  # _finish() set it

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int:
        """Signal (default SIGTERM), wait up to ``timeout``, then SIGKILL.
        Idempotent; returns the exit status."""
        if self.returncode is None:
            self.send_signal(sig)
            self._pump(time.monotonic() + timeout, lambda: self.popen.poll() is not None)
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()
            self._finish()
        return self.returncode  # type: ignore[return-value]  # _finish() set it

    def _finish(self) -> None:
        self._pump(time.monotonic() + 1.0)       # what the exited process left in the pipes
        for f in self._open.values():
            f.close()
        self._open.clear()
        self.returncode = self.popen.returncode
        self.stdout = self._pending["stdout"].decode(errors="replace")
        self.stderr = self._pending["stderr"].decode(errors="replace")


# -------------------------------------------------------------------- namespaces
def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _destroy(name: str, procs: list[NsProcess]) -> None:
    for p in reversed(procs):
        p.stop()
    leftovers = _pids(name)
    for pid in leftovers:              # grandchildren of ours: nobody else runs here
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while leftovers and time.monotonic() < end:
        time.sleep(0.01)
        leftovers = _pids(name)
    run(["ip", "netns", "del", name], check=False)


def _pids(name: str) -> list[int]:
    cp = run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in cp.stdout.split()]


def reap_stale(prefix: str = NAME_PREFIX) -> list[str]:
    """Delete the namespaces a killed run left: named ``<prefix>-<pid>-...``
    with that pid gone and no process inside.  Returns the names deleted."""
    cp = run(["ip", "netns", "list"], check=False)
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-\d+-[0-9a-f]+")
    reaped = []
    for line in cp.stdout.splitlines():
        m = pattern.fullmatch(line.split(" ", 1)[0])
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                   # its creator is alive (or the pid was reused): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if not _pids(m.group(0)):
            run(["ip", "netns", "del", m.group(0)], check=False)
            reaped.append(m.group(0))
    return reaped


_reaped_prefixes: set[str] = set()


class Namespace:
    """One network namespace with ``lo`` up (see module doc). Context manager.

    The first one a process creates under a prefix first deletes what killed
    runs left under it (:func:`reap_stale`)."""

    def __init__(self, prefix: str = NAME_PREFIX) -> None:
        if prefix not in _reaped_prefixes:
            _reaped_prefixes.add(prefix)
            reap_stale(prefix)
        for _ in range(8):
            name = f"{prefix}-{os.getpid()}-{next(_names)}-{secrets.token_hex(2)}"
            cp = run(["ip", "netns", "add", name], check=False)
            if cp.returncode == 0:
                break
            if "exists" not in cp.stderr:
                raise CommandFailed(["ip", "netns", "add", name], cp.returncode, cp.stderr)
        else:
            raise CommandFailed(["ip", "netns", "add", name], cp.returncode, cp.stderr)
        self.name = name
        self._procs: list[NsProcess] = []
        self._finalizer = weakref.finalize(self, _destroy, name, self._procs)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # commands
    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace to completion (see :func:`run`)."""
        return run(self.exec_argv(argv), **kw)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args])

    def popen(self, argv: list[str], *, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              env: dict | None = None) -> NsProcess:
        """Start a long-running ``argv`` inside the namespace; the namespace
        owns it and stops it on close (or stop it earlier with
        :meth:`NsProcess.stop`). ``python -m`` commands find this repository's
        packages even when it is not installed."""
        if self.closed:
            raise ProcessFailed("namespace closed", argv, self.name)
        full = self.exec_argv(argv)
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        proc = NsProcess(full, subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=stdout,
                                                stderr=stderr, env=env))
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        return _pids(self.name)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the ``with`` block with the calling thread in this namespace."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.name, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a net sysctl of this namespace (``key`` as in ``net.ipv4...``)."""
        with self.entered(), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(str(value))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """One veth pair: ``if_a`` in ``ns_a`` and ``if_b`` in ``ns_b``."""

    ns_a: Namespace
    if_a: str
    ns_b: Namespace
    if_b: str
    mtu: int
    addr_a: str | None = None        # "192.0.2.1/24" or None (no address: an L2 port)
    addr_b: str | None = None


def veth_pair(ns_a: Namespace, ns_b: Namespace, addr_a: str | None = None,
              addr_b: str | None = None, *, mtu: int = DEFAULT_MTU, if_a: str = "veth0",
              if_b: str = "veth0", tx_checksum: bool = True, ipv6: bool = False) -> Link:
    """Create a veth pair directly inside two namespaces, set its MTU, give
    each end its (optional) lab address and bring both up. IPv6 is disabled
    on both ends by default so that no router solicitations or MLD reports
    wander through the lab. With ``tx_checksum=False`` the ends compute UDP
    and TCP checksums in software (needed behind an L2 relay). The pair goes
    away with either namespace."""
    for a in (addr_a, addr_b):
        if a is not None:
            lab_interface(a)
    run(["ip", "link", "add", if_a, "netns", ns_a.name, "mtu", str(mtu), "type", "veth",
         "peer", "name", if_b, "netns", ns_b.name, "mtu", str(mtu)])
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        if not ipv6:
            ns.sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", 1)
        if not tx_checksum:
            set_tx_checksum(ns, ifname, False)
        if addr is not None:
            ns.ip("addr", "add", addr, "dev", ifname)
        ns.ip("link", "set", ifname, "up")
    return Link(ns_a, if_a, ns_b, if_b, mtu, addr_a, addr_b)


def tap_device(ns: Namespace, name: str, addr: str | None = None, *, mtu: int | None = None) -> str:
    """Create a persistent tap device ``name`` inside ``ns`` (for a QEMU
    NIC that opens it there), give it its (optional) lab address and MTU and
    bring it up; returns ``name``. It goes away with the namespace."""
    if addr is not None:
        lab_interface(addr)
    ns.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
    if mtu is not None:
        ns.ip("link", "set", name, "mtu", str(mtu))
    if addr is not None:
        ns.ip("addr", "add", addr, "dev", name)
    ns.ip("link", "set", name, "up")
    return name


def set_tx_checksum(ns: Namespace, ifname: str, enabled: bool) -> None:
    """ethtool -K IF tx on|off, through the SIOCETHTOOL ioctl (no ethtool
    binary needed). Turning it off also turns off TSO and UDP GSO."""
    val = ctypes.create_string_buffer(struct.pack("=II", _ETHTOOL_STXCSUM, int(enabled)))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(val)).ljust(40, b"\0")
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
        except OSError as e:
            raise CommandFailed([f"SIOCETHTOOL STXCSUM {ifname} {int(enabled)}"], e.errno or 1,
                                f"in {ns.name}: {e.strerror}") from None


def resolve_neighbour(ns: Namespace, ip: str, timeout: float = 5.0) -> str:
    """Make ``ns`` resolve ``ip`` (a UDP datagram to the discard port starts
    ARP) and wait until the neighbour entry has a link address; return it."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        end = time.monotonic() + timeout
        while True:
            out = ns.ip("neigh", "show", ip).stdout
            m = re.search(r"lladdr (\S+) (?:REACHABLE|STALE|DELAY|PROBE|PERMANENT)", out)
            if m:
                return m.group(1)
            if time.monotonic() >= end:
                raise NetlabError(f"{ns.name} cannot resolve {ip}: {out.strip() or 'no entry'}")
            with contextlib.suppress(OSError):
                s.sendto(b"", (ip, 9))
            time.sleep(0.005)


# -------------------------------------------------------------------- topologies
@dataclass(frozen=True)
class TwoHosts:
    """Two namespaces ``a`` and ``b`` joined by ``link``; ``ip_a``/``ip_b``
    are their addresses without prefix length."""

    a: Namespace
    b: Namespace
    link: Link
    ip_a: str
    ip_b: str

    def resolve(self, timeout: float = 5.0) -> None:
        """Resolve each side's neighbour entry for the other (ARP) now.
        Datagrams sent while ARP is pending wait in a small queue that may
        overflow and is flushed from the CPU that takes the reply, so traffic
        whose loss or order a test checks should start after this."""
        resolve_neighbour(self.a, self.ip_b, timeout)
        resolve_neighbour(self.b, self.ip_a, timeout)


@contextlib.contextmanager
def two_hosts(addr_a: str = "192.0.2.1/24", addr_b: str = "192.0.2.2/24", *,
              mtu: int = DEFAULT_MTU, tx_checksum: bool = True) -> Iterator[TwoHosts]:
    """``A <-veth-> B``; both namespaces are deleted when the block ends."""
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(Namespace())
        b = stack.enter_context(Namespace())
        link = veth_pair(a, b, addr_a, addr_b, mtu=mtu, tx_checksum=tx_checksum)
        yield TwoHosts(a, b, link, str(lab_interface(addr_a).ip), str(lab_interface(addr_b).ip))


def switch(hub: Namespace, hosts: list[tuple[Namespace, str]], *, mtu: int = DEFAULT_MTU,
           bridge: str = "br0") -> list[Link]:
    """Join ``hosts`` ((namespace, lab address/prefix) each) through a Linux
    bridge in ``hub``: one veth from each host (``veth0`` there, ``hN`` in the
    hub) enslaved to ``bridge``. Every host reaches every other on one subnet
    (a star: the topology of a rack behind one switch)."""
    hub.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    hub.ip("link", "add", bridge, "mtu", str(mtu), "type", "bridge")
    hub.ip("link", "set", bridge, "up")
    links = []
    for i, (ns, addr) in enumerate(hosts):
        link = veth_pair(ns, hub, addr, None, mtu=mtu, if_b=f"h{i}")
        hub.ip("link", "set", f"h{i}", "master", bridge)
        links.append(link)
    return links


@dataclass(frozen=True)
class RelayedHosts(TwoHosts):
    """``A <-veth-> R <-veth-> B``: :attr:`relay` forwards between R's
    ``ra`` (towards A) and ``rb`` (towards B)."""

    r: Namespace | None = None
    link_b: Link | None = None
    relay: object = None             # netlab.relay.RelayProcess


@contextlib.contextmanager
def two_hosts_via_relay(policy=None, addr_a: str = "192.0.2.1/24",
                        addr_b: str = "192.0.2.2/24", *,
                        mtu: int = DEFAULT_MTU) -> Iterator[RelayedHosts]:
    """``A <-veth-> R <-veth-> B`` with the relay running in R under
    ``policy`` (a :class:`netlab.relay.Policy`; default: forward only)."""
    from .relay import Policy, RelayProcess
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(Namespace())
        r = stack.enter_context(Namespace())
        b = stack.enter_context(Namespace())
        r.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        link_a = veth_pair(a, r, addr_a, None, mtu=mtu, if_b="ra", tx_checksum=False)
        link_b = veth_pair(r, b, None, addr_b, mtu=mtu, if_a="rb", tx_checksum=False)
        relay = stack.enter_context(RelayProcess(r, "ra", "rb", policy or Policy()))
        yield RelayedHosts(a, b, link_a, str(lab_interface(addr_a).ip),
                           str(lab_interface(addr_b).ip), r=r, link_b=link_b, relay=relay)
