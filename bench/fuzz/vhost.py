"""The ``vhost-user`` target: mutated vhost-user messages and message
sequences against a real ``vrdma backend`` process, over its unix socket.

Each fuzz connection sends a valid setup prefix of random length (the
handshake a front-end makes: features, protocol features, owner, status,
memory table with a sealed memfd, vrings with eventfds), then mutated
messages: wrong sizes and flags, lying size fields, truncated headers, fd
counts off by one or nine, fds of the wrong kind (pipes, /dev/null, an
unsealed memfd), memory tables with bad and overlapping regions, ring
addresses outside memory, huge indices, unknown requests, messages before
and after features are set; and, once the rings are set up, garbage
descriptors written into its rings (in memory shared with the daemon) and
kicked. Every message sent is one input.

Checked: the daemon process stays alive and logs no traceback (its
connection boundary logs an exception it caught: each one is a crash); a
message that must be answered is answered or the connection closed within
the bound (else a hang, confirmed by a fresh connection's GET_FEATURES);
an idle victim pair of guest_lib guests on the same daemon keeps every byte
of its memory, and its QPs carry a verified round trip at the end; fresh
guest_lib guests get a verified SEND / WRITE / READ round trip; the
daemon's fds and guest-memory mappings (/proc/PID/fd, /proc/PID/maps) come
back to baseline once the fuzz connections are closed.
"""
from __future__ import annotations

import array
import fcntl
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from vhost_user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MEM_REGION_SIZE,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq as R,
    ProtocolFeature as PF,
)
from virtio.constants import split_ring_layout

from .common import Canary, Report, fd_count, maps_count, settle

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_DESC = struct.Struct("<QIHH")
MEM_SIZE = 1 << 20
QSIZE = 64
NQ = 3
#: the transport features a front-end asks for (VERSION_1, INDIRECT_DESC, EVENT_IDX) + the device's
WANTED = (1 << 32) | (1 << 28) | (1 << 29) | 0b111
STATUS_OK = 1 | 2 | 8 | 4      # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK


class Daemon:
    """``sys.executable -m vrdma backend --socket PATH`` in a process of its own."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "fuzz.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self._log = open(self.log_path, "ab")  # O_APPEND: we may truncate it under the daemon
        self.proc = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "--socket", self.path],
                                     stdout=subprocess.DEVNULL, stderr=self._log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vrdma backend did not start: {open(self.log_path).read()[-2000:]}")
            time.sleep(0.05)
        self.tracebacks = 0
        self.first_traceback = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return fd_count(self.pid)

    def maps(self) -> int:
        return maps_count(self.pid)

    def fd_targets(self) -> dict[int, str]:
        out = {}
        d = f"/proc/{self.pid}/fd"
        for n in os.listdir(d):
            try:
                out[int(n)] = os.readlink(f"{d}/{n}")
            except OSError:
                pass
        return out

    def diagnose(self, fds) -> str:
        """What the daemon still holds for ``fds``, for a leaked-fd finding: whether
        the daemon's epoll set lists each fd (the ``tfd`` lines of
        /proc/PID/fdinfo of every eventpoll fd), and each socket's ``ss -xapen``
        line (queues; a peer of ``* 0`` is a peer that closed)."""
        lines = []
        targets = self.fd_targets()
        for efd, t in sorted(targets.items()):
            if t != "anon_inode:[eventpoll]":
                continue
            try:
                with open(f"/proc/{self.pid}/fdinfo/{efd}") as f:
                    info = f.read()
            except OSError:
                continue
            tfds = {int(m.group(1)): m.group(0) for m in re.finditer(r"tfd:\s*(\d+).*", info)}
            lines += [f"epoll fd {efd}: fd {fd} " + (f"registered: {tfds[fd]}" if fd in tfds
                                                     else "NOT registered") for fd in fds]
        inodes = {m.group(1) for fd in fds if (m := re.match(r"socket:\[(\d+)\]", targets.get(fd, "")))}
        if inodes:
            try:
                out = subprocess.run(["ss", "-xapen"], capture_output=True, text=True, timeout=10,
                                     check=False).stdout
            except (OSError, subprocess.TimeoutExpired) as e:
                out = f"ss failed: {e}"
            lines += ["ss: " + " ".join(line.split()) for line in out.splitlines()
                      if any(f" {ino} " in line for ino in inodes)]
        return "\n".join(lines)

    def scan_log(self) -> int:
        """New tracebacks in the daemon's log since the last scan (the log is then emptied)."""
        with open(self.log_path, "rb") as f:
            data = f.read()
        os.truncate(self.log_path, 0)
        n = data.count(b"Traceback (most recent call last)")
        if n and not self.first_traceback:
            i = data.find(b"Traceback")
            self.first_traceback = data[max(0, i - 300):i + 3000].decode(errors="replace")
        self.tracebacks += n
        return n

    def close(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _memfd(size: int, sealed: bool = True) -> int:
    fd = os.memfd_create("vrdma-fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class FuzzConnection:
    """One front-end connection of the fuzzer: raw messages with fds."""

    def __init__(self, path: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.closed_by_peer = False
        self._buf = bytearray()

    def send(self, request: int, flags: int, payload: bytes, fds=(), size: int | None = None,
             truncate: int | None = None) -> bool:
        """False if the daemon has closed the connection."""
        data = _HDR.pack(request & 0xFFFFFFFF, flags & 0xFFFFFFFF,
                         len(payload) if size is None else size & 0xFFFFFFFF) + payload
        if truncate is not None:
            data = data[:truncate]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        except socket.timeout:
            raise
        except OSError:
            self.closed_by_peer = True
            return False
        return True

    def drain(self) -> None:
        """Take whatever replies arrived (closing any fds they carry)."""
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return
            if not self._recv_some():
                return

    def _recv_some(self) -> bool:
        try:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except socket.timeout:
            raise
        except OSError:
            self.closed_by_peer = True
            return False
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                for fd in fds:
                    os.close(fd)
        if not data:
            self.closed_by_peer = True
            return False
        self._buf += data
        if len(self._buf) > 1 << 20:
            del self._buf[:]
        return True

    def call(self, request: int, payload: bytes = b"", flags: int = VERSION) -> bytes | None:
        """Send and wait for the reply: its payload, None if the connection
        closed. socket.timeout propagates (a hang candidate)."""
        self.drain()
        del self._buf[:]
        if not self.send(request, flags, payload):
            return None
        while True:
            if len(self._buf) >= 12:
                req, fl, size = _HDR.unpack_from(self._buf)
                if len(self._buf) >= 12 + size:
                    body = bytes(self._buf[12:12 + size])
                    del self._buf[:12 + size]
                    if req == request and fl & FLAG_REPLY:
                        return body
                    continue
            if self.closed_by_peer or not self._recv_some():
                return None

    def close(self) -> None:
        self.sock.close()


class VhostUserTarget:
    name = "vhost-user"

    def __init__(self, seed: int, *, live_every: int = 20000, check_every: int = 2000,
                 bound_s: float = 10.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report(self.name, seed)
        self.live_every, self.check_every, self.bound = live_every, check_every, bound_s
        self.connections = 0
        self.closed_by_daemon = 0
        self.kicks = 0
        self.replies = 0

    # ---- fds ---------------------------------------------------------------------
    def _open_fds(self) -> None:
        self.mem_fd = _memfd(MEM_SIZE)
        self.unsealed_fd = _memfd(MEM_SIZE, sealed=False)
        self.small_fd = _memfd(4096)
        self.kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(NQ)]
        self.call_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(NQ)]
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
        self.null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        import mmap
        self.mem = mmap.mmap(self.mem_fd, MEM_SIZE)
        self.rings = [split_ring_layout(QSIZE, 0x10000 * (i + 1)) for i in range(NQ)]

    def _close_fds(self) -> None:
        self.mem.close()
        for fd in (self.mem_fd, self.unsealed_fd, self.small_fd, *self.kick_fds, *self.call_fds,
                   self.pipe_r, self.pipe_w, self.null_fd):
            os.close(fd)

    def _random_fds(self) -> list[int]:
        rng = self.rng
        pool = [self.mem_fd, self.unsealed_fd, self.small_fd, self.kick_fds[0], self.call_fds[0],
                self.pipe_r, self.pipe_w, self.null_fd]
        return [rng.choice(pool) for _ in range(rng.choice((0, 1, 1, 2, 8, 9)))]

    # ---- messages -------------------------------------------------------------------
    UVA = 0x7F00_0000_0000   # the front-end's user address of the memfd (any value: it names the region)

    def _mem_table(self, regions) -> bytes:
        body = struct.pack("<II", len(regions), 0) + b"".join(
            _REGION.pack(*(v & (2 ** 64 - 1) for v in r)) for r in regions)
        return body.ljust(8 + 8 * MEM_REGION_SIZE, b"\0") if self.rng.random() < 0.8 else body

    def _setup_prefix(self) -> list[tuple]:
        """The handshake of a front-end, as (request, flags, payload, fds) tuples."""
        rng = self.rng
        proto = int(PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.RESET_DEVICE)
        if rng.random() < 0.2:
            proto = rng.getrandbits(20)
        self.ack = bool(proto & PF.REPLY_ACK)
        feats = WANTED | VHOST_USER_F_PROTOCOL_FEATURES
        if rng.random() < 0.1:
            feats = rng.getrandbits(64)
        msgs = [(R.GET_FEATURES, VERSION, b"", ()), (R.GET_PROTOCOL_FEATURES, VERSION, b"", ()),
                (R.SET_PROTOCOL_FEATURES, VERSION, _U64.pack(proto), ()), (R.SET_OWNER, VERSION, b"", ()),
                (R.GET_QUEUE_NUM, VERSION, b"", ()), (R.SET_STATUS, VERSION, _U64.pack(3), ()),
                (R.SET_FEATURES, VERSION, _U64.pack(feats), ()), (R.SET_STATUS, VERSION, _U64.pack(11), ()),
                (R.SET_MEM_TABLE, VERSION, self._mem_table([(0, MEM_SIZE, self.UVA, 0)]), (self.mem_fd,))]
        for i, (desc, avail, used, _) in enumerate(self.rings):
            msgs += [(R.SET_VRING_NUM, VERSION, _STATE.pack(i, QSIZE), ()),
                     (R.SET_VRING_BASE, VERSION, _STATE.pack(i, 0), ()),
                     (R.SET_VRING_ADDR, VERSION, _ADDR.pack(i, 0, self.UVA + desc, self.UVA + used,
                                                           self.UVA + avail, 0), ()),
                     (R.SET_VRING_CALL, VERSION, _U64.pack(i), (self.call_fds[i],)),
                     (R.SET_VRING_KICK, VERSION, _U64.pack(i), (self.kick_fds[i],)),
                     (R.SET_VRING_ENABLE, VERSION, _STATE.pack(i, 1), ())]
        msgs.append((R.SET_STATUS, VERSION, _U64.pack(STATUS_OK), ()))
        return msgs

    def _region(self):
        rng = self.rng
        return (rng.choice((0, 0, 4096, MEM_SIZE - 4096, MEM_SIZE, 1 << 40, (1 << 64) - 4096, rng.getrandbits(64))),
                rng.choice((MEM_SIZE, MEM_SIZE, 0, 1, 4096, MEM_SIZE * 2, 1 << 40, (1 << 64) - 1,
                            rng.getrandbits(64))),
                rng.choice((self.UVA, self.UVA, self.UVA + 4096, 0, rng.getrandbits(64))),
                rng.choice((0, 0, 0, 4096, MEM_SIZE, MEM_SIZE - 1, 1 << 63, rng.getrandbits(64))))

    def _mutant(self) -> tuple:
        """One hostile message: (request, flags, payload, fds, size override, truncate)."""
        rng = self.rng
        req = rng.choice(list(R)) if rng.random() < 0.9 else rng.choice((0, 44, 100, 255, 0xFFFFFFFF,
                                                                         rng.getrandbits(32)))
        flags = VERSION
        r = rng.random()
        if r < 0.1:
            flags = rng.getrandbits(32)
        elif r < 0.25:
            flags |= FLAG_NEED_REPLY
        elif r < 0.3:
            flags |= FLAG_REPLY
        elif r < 0.35:
            flags = rng.choice((0, 2, 3))
        fds: tuple = ()
        kind = rng.random()
        if req in (R.SET_MEM_TABLE,):
            n = rng.choice((1, 1, 2, 3, 8, 9, 0))
            regions = [self._region() for _ in range(min(n, 9))]
            if rng.random() < 0.3 and n >= 2:        # overlapping regions
                regions[1] = (regions[0][0] + 4096, MEM_SIZE, self.UVA + 8192, 0)
            payload = self._mem_table(regions) if n <= 8 else struct.pack("<II", n, 0) + rng.randbytes(32 * 8)
            fds = tuple(rng.choice((self.mem_fd, self.mem_fd, self.unsealed_fd, self.small_fd, self.null_fd,
                                    self.kick_fds[0])) for _ in range(rng.choice((n, n, 0, n + 1, max(0, n - 1)))))
        elif req in (R.ADD_MEM_REG, R.REM_MEM_REG):
            payload = _U64.pack(0) + _REGION.pack(*self._region())
            fds = tuple(rng.choice((self.mem_fd, self.unsealed_fd, self.small_fd, self.pipe_r))
                        for _ in range(rng.choice((1, 1, 0, 2))))
        elif req == R.SET_VRING_ADDR:
            desc, avail, used, _ = self.rings[0]
            pick = lambda off: rng.choice((self.UVA + off, self.UVA + off, self.UVA + MEM_SIZE - 8, self.UVA - 4096,  # noqa: E731
                                           self.UVA + off + 1, 0, rng.getrandbits(64)))
            payload = _ADDR.pack(rng.choice((0, 1, 2, 3, 255, 0xFFFFFFFF)), rng.choice((0, 0, 1, 2)),
                                 pick(desc), pick(used), pick(avail), rng.getrandbits(64))
        elif req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
            payload = _STATE.pack(rng.choice((0, 1, 2, 3, 255, 256, 0xFFFFFFFF)),
                                  rng.choice((0, 1, 2, 63, 64, 65, 256, 32768, 32769, 65535, 65536, 0xFFFFFFFF)))
        elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            payload = _U64.pack(rng.choice((0, 1, 2, 3, 255, 0x100, 0x101, 0x1FF, rng.getrandbits(64))))
            fds = tuple(rng.choice((self.kick_fds[1], self.call_fds[1], self.pipe_r, self.null_fd, self.mem_fd))
                        for _ in range(rng.choice((0, 1, 1, 2))))
        elif req in (R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS, R.SET_LOG_BASE):
            payload = _U64.pack(rng.choice((0, WANTED | VHOST_USER_F_PROTOCOL_FEATURES, rng.getrandbits(64),
                                            (1 << 64) - 1, STATUS_OK, 0x40, 0x80)))
        elif req in (R.GET_CONFIG, R.SET_CONFIG):
            size = rng.choice((0, 1, 4, 64, 256, 257, 0xFFFFFFFF))
            body = rng.randbytes(min(size, 300)) if rng.random() < 0.7 else b""
            payload = struct.pack("<III", rng.choice((0, 4, 60, 255, 256, 0xFFFFFFFF)), size,
                                  rng.choice((0, 0, 1, rng.getrandbits(32)))) + body
        else:
            payload = rng.randbytes(rng.choice((0, 0, 4, 8, 12, 40, 64, 4096)))
        if kind < 0.15:           # a payload of the wrong size
            payload = payload[:rng.randrange(len(payload) + 1)] if payload and rng.random() < 0.5 \
                else payload + rng.randbytes(rng.choice((1, 4, 8)))
        elif kind < 0.25:
            fds = tuple(self._random_fds())
        size, truncate = None, None
        r = rng.random()
        if r < 0.05:              # the size field lies
            size = rng.choice((0, len(payload) + 1, max(0, len(payload) - 1), 4096, 4097, 0xFFFFFFFF))
        elif r < 0.08:            # a truncated header or payload, then the connection closes
            truncate = rng.randrange(12 + len(payload))
        return req, flags, payload, fds, size, truncate

    def _kick_garbage(self, conn: FuzzConnection) -> None:
        """Garbage descriptors in a ring (memory shared with the daemon), then a kick."""
        rng = self.rng
        q = rng.randrange(NQ)
        desc, avail, used, total = self.rings[q]
        m = self.mem
        for i in range(rng.choice((1, 2, 4))):
            d = rng.randrange(QSIZE) if rng.random() < 0.9 else rng.getrandbits(16)
            addr = rng.choice((0x20000, 0x40000, MEM_SIZE - 16, MEM_SIZE, 1 << 40, rng.getrandbits(64),
                               desc, used))
            length = rng.choice((0, 1, 16, 64, 4096, MEM_SIZE, 0xFFFFFFFF, rng.getrandbits(32)))
            flags = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, rng.getrandbits(16)))
            nxt = rng.randrange(QSIZE) if rng.random() < 0.9 else rng.getrandbits(16)
            _DESC.pack_into(m, desc + (d % QSIZE) * 16, addr, length, flags, nxt)
            if rng.random() < 0.5:     # a control request body with random bytes behind it
                m[0x20000:0x20000 + 64] = rng.randbytes(64)
        idx = struct.unpack_from("<H", m, avail + 2)[0]
        n = rng.choice((1, 1, 2, 64, 65, 0x8000, rng.getrandbits(16)))
        for k in range(min(n, 4)):
            struct.pack_into("<H", m, avail + 4 + ((idx + k) % QSIZE) * 2,
                             rng.randrange(QSIZE) if rng.random() < 0.9 else rng.getrandbits(16))
        struct.pack_into("<H", m, avail + 2, (idx + n) & 0xFFFF)
        if rng.random() < 0.1:
            m[used:used + 8] = rng.randbytes(8)
        os.eventfd_write(self.kick_fds[q], 1)
        self.kicks += 1

    # ---- guest_lib guests: victim, liveness ------------------------------------------------
    def _endpoint(self):
        from guest_lib import QPCap
        from guest_lib.endpoint import RcEndpoint
        return RcEndpoint(self.daemon.path, 64 << 10, cap=QPCap(16, 16, 2, 2, 64), cq_size=32,
                          mem_size=4 << 20, hugetlb=False)

    def _round_trip(self, a, b, tag: int) -> None:
        from guest_lib import SGE, RecvWR, SendWR
        from verbs import WrOpcode
        pat = bytes((tag + 3 * i) & 0xFF for i in range(256))
        b.qp.post_recv(RecvWR(wr_id=1, sg=[SGE(b.mr.buf, 256, b.mr.lkey)]))
        a.mr.write(pat)
        a.qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 256, a.mr.lkey)]))
        a.poll_one(self.bound)
        b.poll_one(self.bound)
        assert b.mr.read(256) == pat, "SEND payload differs"
        a.mr.write(pat[::-1], offset=1024)
        a.qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(a.mr.buf + 1024, 256, a.mr.lkey)],
                              remote_addr=b.mr.buf + 2048, rkey=b.mr.rkey))
        a.poll_one(self.bound)
        assert b.mr.read(256, 2048) == pat[::-1], "RDMA WRITE payload differs"
        b.mr.write(pat[1:] + b"!", offset=4096)
        a.qp.post_send(SendWR(wr_id=4, opcode=WrOpcode.RDMA_READ, sg=[SGE(a.mr.buf + 8192, 256, a.mr.lkey)],
                              remote_addr=b.mr.buf + 4096, rkey=b.mr.rkey))
        a.poll_one(self.bound)
        assert a.mr.read(256, 8192) == pat[1:] + b"!", "RDMA READ payload differs"

    def _live(self, i: int) -> None:
        from guest_lib.endpoint import connect_pair
        a = b = None
        try:
            a, b = self._endpoint(), self._endpoint()
            connect_pair(a, b)
            self._round_trip(a, b, i & 0xFF)
            self.report.liveness_checks += 1
        except Exception as e:  # noqa: BLE001 - a finding
            self.report.fail(i, f"fresh guest round trip failed: {e!r}")
        finally:
            for ep in (a, b):
                if ep is not None:
                    ep.close()

    def _quiesce_victims(self, timeout: float = 10.0) -> None:
        """Wait until the daemon has used every buffer the victims posted on their
        control and doorbell queues: the canary copy is then of memory the daemon
        has no reason to write. The daemon pushes a doorbell's used entry after
        the work it rang (the CQE the round trip waits for), so a copy taken at
        once could miss that push: seen once in ~200 short runs as "2 canary
        bytes of victim0 changed (first at offset 0x320a)", the doorbellq's used
        index."""
        deadline = time.monotonic() + timeout
        for ep in self.victim:
            dev = ep.ctx.transport.device
            region = dev.mem.regions()[0]
            for q in dev.queues[:2]:        # CONTROLQ, DOORBELLQ; the eventq keeps its buffers
                at = q.used_gpa + 2 - region.gpa
                while (_U16.unpack_from(region.view, at)[0] != q.avail_idx & 0xFFFF
                       and time.monotonic() < deadline):
                    time.sleep(0.01)

    def _victim_views(self):
        return [ep.ctx.transport.device.mem.regions()[0].view for ep in self.victim]

    # ---- checks --------------------------------------------------------------------------
    def _checks(self, i: int, settle_s: float = 0.0) -> None:
        rep = self.report
        if not self.daemon.alive():
            rep.crashes += 1
            rep.fail(i, f"the daemon died (exit status {self.daemon.proc.returncode})")
            raise _DaemonDead
        n = self.daemon.scan_log()
        if n:
            rep.crashes += n
            rep.fail(i, f"{n} tracebacks in the daemon's log; first:\n{self.daemon.first_traceback}")
        for c in self.canaries:
            k, first = c.check()
            if k:
                rep.canary_violations += k
                rep.fail(i, f"{k} canary bytes of {c.name} changed (first at offset {first:#x})")
                c.copies = [bytes(c.view[a:b]) for a, b in c.spans]

    def _probe(self) -> bool:
        """A fresh connection's GET_FEATURES is answered within the bound."""
        try:
            c = FuzzConnection(self.daemon.path, self.bound)
        except OSError:
            return False
        try:
            return c.call(R.GET_FEATURES) is not None
        except (socket.timeout, OSError):
            return False
        finally:
            c.close()

    # ---- the run -----------------------------------------------------------------------------
    def run(self, count: int, progress=None) -> Report:
        from guest_lib.endpoint import connect_pair
        rep = self.report
        workdir = tempfile.mkdtemp(prefix="vrdma-fuzz-")
        fd_self0 = fd_count()
        self.daemon = Daemon(workdir)
        self._open_fds()
        self.victim = []
        try:
            self.victim = [self._endpoint(), self._endpoint()]
            connect_pair(*self.victim)
            self._round_trip(*self.victim, 0x11)
            self._quiesce_victims()
            self.canaries = [Canary(v, (), f"victim{k}") for k, v in enumerate(self._victim_views())]
            time.sleep(0.2)
            fd0, maps0 = self.daemon.fds(), self.daemon.maps()
            targets0 = self.daemon.fd_targets()
            t0 = time.perf_counter()
            i = 0
            while i < count:
                i = self._connection(i, count)
                if i // self.check_every != getattr(self, "_last_check", 0):
                    self._last_check = i // self.check_every
                    self._checks(i - 1)
                if i // self.live_every != getattr(self, "_last_live", 0):
                    self._last_live = i // self.live_every
                    self._live(i - 1)
                    if progress:
                        progress(rep, time.perf_counter() - t0)
            rep.seconds = time.perf_counter() - t0
            self._checks(count - 1)
            self._live(count - 1)
            fd1 = settle(self.daemon.fds, fd0)
            maps1 = settle(self.daemon.maps, maps0)
            rep.fd_delta, rep.maps_delta = fd1 - fd0, maps1 - maps0
            if rep.fd_delta or rep.maps_delta:
                targets1 = self.daemon.fd_targets()
                extra = {k: v for k, v in targets1.items() if targets0.get(k) != v}
                rep.fail(count - 1, f"daemon fds {fd0} -> {fd1}, guest mappings {maps0} -> {maps1} "
                                    f"after every fuzz connection closed; new fds {extra}\n"
                                    + self.daemon.diagnose(list(extra)))
            self._checks(count - 1)
            try:
                self._round_trip(*self.victim, 0x22)
            except Exception as e:  # noqa: BLE001
                rep.fail(count - 1, f"victim round trip failed after the run: {e!r}")
        except _DaemonDead:
            rep.seconds = rep.seconds or 0.0
        finally:
            for ep in self.victim:
                ep.close()
            self._close_fds()
            self.daemon.close()
            shutil.rmtree(workdir, ignore_errors=True)
        delta_self = fd_count() - fd_self0
        if delta_self:
            rep.fail(count - 1, f"the fuzzer's own fd count changed by {delta_self}")
        rep.counters = dict(connections=self.connections, closed_by_daemon=self.closed_by_daemon,
                            ring_kicks=self.kicks, replies_waited=self.replies)
        rep.accepted = rep.count - rep.rejected
        return rep

    def _connection(self, i: int, count: int) -> int:
        """One fuzz connection: a setup prefix, then mutants; returns the next input index."""
        rng, rep = self.rng, self.report
        self.connections += 1
        conn = FuzzConnection(self.daemon.path, self.bound)
        try:
            self.ack = False
            prefix = self._setup_prefix()
            n_prefix = rng.choice((0, 1, 3, 4, 8, 9, 12, len(prefix), len(prefix), len(prefix)))
            set_up = n_prefix == len(prefix)
            n_mut = rng.choice((1, 2, 4, 8, 16, 32))
            ring_mode = set_up and rng.random() < 0.5    # garbage in the rings only, kicked
            if ring_mode:
                n_mut = rng.choice((8, 16, 64))
            for k in range(n_prefix + n_mut):
                if i >= count:
                    break
                t = time.perf_counter()
                truncate = size = None
                if k < n_prefix:
                    req, flags, payload, fds = prefix[k]
                else:
                    if ring_mode or (set_up and rng.random() < 0.2):
                        self._kick_garbage(conn)
                        i += 1
                        rep.count += 1
                        continue
                    req, flags, payload, fds, size, truncate = self._mutant()
                ok = conn.send(req, flags, payload, fds, size, truncate)
                i += 1
                rep.count += 1
                if not ok:
                    rep.rejected += 1
                    self.closed_by_daemon += 1
                    break
                if truncate is not None or (size is not None and size != len(payload)):
                    # the framing is off: the daemon rightly waits for bytes that never come (or
                    # reads our next header as payload); nothing to wait for, close the connection
                    conn.drain()
                    break
                try:
                    # Sync (a GET_FEATURES answered in order proves every message before it was
                    # handled) after every message that is answered and after half of the rest;
                    # the other half leave batches queued behind each other, as a fast front-end does.
                    if req in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_VRING_BASE,
                               R.GET_CONFIG, R.GET_MAX_MEM_SLOTS, R.GET_STATUS) or (
                            self.ack and flags == VERSION | FLAG_NEED_REPLY) or rng.random() < 0.5:
                        if conn.call(R.GET_FEATURES) is None:   # answered in order, or closed
                            rep.rejected += 1
                            self.closed_by_daemon += 1
                            break
                        self.replies += 1
                    else:
                        conn.drain()
                        if conn.closed_by_peer:
                            rep.rejected += 1
                            self.closed_by_daemon += 1
                            break
                except socket.timeout:
                    if self._probe():
                        rep.hangs += 1
                        rep.fail(i - 1, f"no reply and no close within {self.bound} s on a live connection "
                                        f"(request {req}); the daemon answers others")
                    else:
                        rep.hangs += 1
                        rep.fail(i - 1, f"the daemon stopped answering (request {req})")
                    break
                finally:
                    dt = time.perf_counter() - t
                    if dt > rep.slowest_input_s:
                        rep.slowest_input_s, rep.slowest_input_index = dt, i - 1
        finally:
            conn.close()
        return i


class _DaemonDead(Exception):
    pass
