"""Authenticated RoCEv2 between vrdma daemons that share a cluster key: the
reference codec (pure: no sockets, no I/O but :func:`load_key_file`'s one
read; the native version is :mod:`roce._auth`, used by :mod:`roce._udpio`).

Wire format. A sealed datagram is an ordinary RoCEv2 packet (BTH, extension
headers, payload, pad, ICRC: unchanged) followed by a 24-byte trailer::

    +--------------------------------+---------------------------+
    | counter: 8 bytes, big-endian   | tag: 16 bytes             |
    +--------------------------------+---------------------------+

    tag = HMAC-SHA256(K, pseudo || packet || counter)[:16]    (RFC 2104, RFC 4868 truncation)
    pseudo = version (1 byte: 4 or 6) || source address (16) || destination address (16)
             || UDP source port (2) || UDP destination port (2)

IPv4 addresses are their 4 bytes followed by 12 zero bytes. ``K`` is derived
from the 32-byte cluster key ``C`` in the key file:
``K = HMAC-SHA256(C, "vrdma fabric auth v1")``.

Replay protection (RFC 4303 3.4.3, ESP's sliding window): the sender's
counter is one 64-bit sequence per daemon, starting at the wall clock in
nanoseconds when the daemon starts and incremented for every sealed packet
(RC retransmissions are new datagrams with new counters), so it keeps
increasing across restarts. The receiver keeps, per sending address and port,
the highest counter it accepted and a :data:`WINDOW`-bit bitmap of the ones
below it: a counter already seen, or :data:`WINDOW` or more below the
highest, is a replay. The tag is verified first (so ``rx_replayed`` counts
only authentic datagrams seen before, never forgeries), then the window is
checked and updated.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import struct

from .errors import RoceError

KEY_LEN = 32
TAG_LEN = 16
CTR_LEN = 8
TRAILER_LEN = CTR_LEN + TAG_LEN
WINDOW = 256
LABEL = b"vrdma fabric auth v1"


class AuthError(RoceError):
    """A datagram failed authentication (``reason``: "short", "tag", "replayed")."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


class KeyFileError(RoceError):
    """The cluster key file is unusable; the message says why and names the file."""


# ------------------------------------------------------------------ keys
def derive_mac_key(cluster_key: bytes) -> bytes:
    """The MAC key ``K`` of a cluster key (see module doc)."""
    if len(cluster_key) != KEY_LEN:
        raise KeyFileError(f"cluster key is {len(cluster_key)} bytes, not {KEY_LEN}")
    return hmac.new(cluster_key, LABEL, hashlib.sha256).digest()


def check_key_file(path: str, uid: int | None = None) -> None:
    """Refuse a key file that is not a regular file owned by ``uid`` (default:
    ours) with no group/other permissions. Raises :class:`KeyFileError`."""
    uid = os.geteuid() if uid is None else uid
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        raise KeyFileError(f"cluster key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"cluster key file {path} is not a regular file")
    if st.st_uid != uid:
        raise KeyFileError(f"cluster key file {path} is owned by uid {st.st_uid}, not by the "
                           f"daemon's uid {uid}")
    if st.st_mode & 0o077:
        raise KeyFileError(f"cluster key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                           f"group and others must have no access (chmod 600 {path})")


def load_key_file(path: str) -> bytes:
    """The MAC key from a cluster key file (checked as :func:`check_key_file`)."""
    return derive_mac_key(read_key_file(path))


def read_key_file(path: str) -> bytes:
    """The cluster key itself (checked as :func:`check_key_file`): never used as
    a key as it is, each use derives its own (:func:`derive_mac_key`,
    :func:`scheduler.wire.derive_load_key`)."""
    check_key_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.read(fd, KEY_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_LEN:
        raise KeyFileError(f"cluster key file {path} holds {len(data)} bytes, not {KEY_LEN} "
                           f"(make one with: vrdma keygen {path})")
    return data


def write_key_file(path: str) -> None:
    """Create ``path`` (it must not exist) with 32 random bytes, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)   # whatever the umask
        os.write(fd, secrets.token_bytes(KEY_LEN))
    finally:
        os.close(fd)


# ----------------------------------------------------------------- codec
def pseudo_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"address families differ: {s} / {d}")
    return (bytes([s.version]) + s.packed.ljust(16, b"\0") + d.packed.ljust(16, b"\0")
            + struct.pack(">HH", sport, dport))


def tag(key: bytes, pseudo: bytes, packet: bytes, counter: int) -> bytes:
    return hmac.new(key, pseudo + bytes(packet) + counter.to_bytes(8, "big"),
                    hashlib.sha256).digest()[:TAG_LEN]


def seal(key: bytes, packet: bytes, counter: int, src: str, dst: str, sport: int,
         dport: int) -> bytes:
    """``packet`` (a whole RoCEv2 datagram, ICRC included) with its trailer."""
    if not 0 <= counter < 1 << 64:
        raise ValueError(f"counter {counter} out of range")
    ctr = counter.to_bytes(8, "big")
    return bytes(packet) + ctr + tag(key, pseudo_header(src, dst, sport, dport), packet, counter)


def open_sealed(key: bytes, datagram: bytes, src: str, dst: str, sport: int,
                dport: int) -> tuple[int, bytes]:
    """``(counter, packet)`` of a sealed datagram whose tag verifies; raises
    :class:`AuthError` otherwise. Replay is the caller's (:class:`ReplayWindow`)."""
    n = len(datagram)
    if n < TRAILER_LEN + 12:
        raise AuthError(f"datagram of {n} bytes from {src}:{sport} too short to be sealed",
                        "short")
    packet = bytes(datagram[:n - TRAILER_LEN])
    counter = int.from_bytes(datagram[n - TRAILER_LEN:n - TAG_LEN], "big")
    want = tag(key, pseudo_header(src, dst, sport, dport), packet, counter)
    if not hmac.compare_digest(want, bytes(datagram[n - TAG_LEN:])):
        raise AuthError(f"bad tag on counter {counter} from {src}:{sport}", "tag")
    return counter, packet


class ReplayWindow:
    """RFC 4303 3.4.3 anti-replay window of :data:`WINDOW` counters."""

    __slots__ = ("top", "bits", "started")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 0          # bit k: counter top - k was accepted
        self.started = False

    def check(self, counter: int) -> bool:
        """True if ``counter`` may be new (not yet seen, not too old)."""
        if not self.started or counter > self.top:
            return True
        d = self.top - counter
        return d < WINDOW and not (self.bits >> d) & 1

    def update(self, counter: int) -> None:
        """Record ``counter`` (its tag verified and :meth:`check` passed)."""
        if not self.started:
            self.started, self.top, self.bits = True, counter, 1
        elif counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)

    def accept(self, counter: int) -> bool:
        """:meth:`check`, then :meth:`update` if it passed."""
        if not self.check(counter):
            return False
        self.update(counter)
        return True
