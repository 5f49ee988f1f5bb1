"""A greedy guest for the tenant-limit tests and ``bench.isolation_bench``.

It opens the virtio-rdma device through guest_lib and fills its connection's
object caps (PDs, CQs, MRs, QPs) with raw control commands, every object
sharing one small ring, doorbell record and page of guest memory, so that
thousands of objects cost the guest almost nothing and the daemon all it will
give. Each fill stops at the first refusal and records its errno (ENOMEM: a
per-connection cap; ENOSPC: the uid's budget). Also: many idle connections
(sockets that never start the vhost-user handshake).
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from guest_lib import Context
from guest_lib.errors import RDMAError
from virtio_rdma import wire
from verbs import Access, QpType
from virtio_rdma.constants import Cmd

PAGE = 4096


@dataclass
class Filled:
    pds: list = field(default_factory=list)
    cqs: list = field(default_factory=list)
    mrs: list = field(default_factory=list)
    qps: list = field(default_factory=list)
    #: object kind -> errno of the refusal that stopped its fill
    stopped: dict = field(default_factory=dict)


class Hog:
    """One greedy guest on ``path`` (a guest_lib Context of its own)."""

    def __init__(self, path: str | None = None, *, ctx: Context | None = None,
                 mem_size: int = 16 << 20, timeout: float = 30.0):
        """Open a Context on ``path``, or use ``ctx`` (then close() leaves it open)."""
        self._owns = ctx is None
        self.ctx = ctx = ctx if ctx is not None else Context(path, mem_size=mem_size, timeout=timeout)
        self.ring_gpa, _ = ctx.alloc(64 * PAGE, PAGE)       # shared by every CQ and QP
        self.dbrec_gpa, _ = ctx.alloc(wire.DBREC_SIZE, 64)
        self.page_gpa, _ = ctx.alloc(PAGE, PAGE)             # shared by every MR
        self.filled = Filled()

    def _fill(self, kind: str, make, limit: int | None) -> list:
        out = getattr(self.filled, kind)
        while limit is None or len(out) < limit:
            try:
                out.append(make())
            except RDMAError as e:
                self.filled.stopped[kind] = e.errno
                break
        return out

    def alloc_pd(self) -> int:
        return self.ctx.command(Cmd.ALLOC_PD)["pdn"]

    def create_cq(self) -> int:
        return self.ctx.command(Cmd.CREATE_CQ, cqe=1, comp_vector=0, ring_gpa=self.ring_gpa,
                                dbrec_gpa=self.dbrec_gpa)["cqn"]

    def reg_mr(self, pdn: int, length: int = PAGE, gpa: int | None = None) -> int:
        gpa = self.page_gpa if gpa is None else gpa
        r = self.ctx.command(Cmd.REG_MR, pdn=pdn, access=int(Access.LOCAL_WRITE), iova=gpa,
                             length=length, nchunks=1, reserved=0, chunks=[dict(gpa=gpa, length=length)])
        return r["lkey"]

    def create_qp(self, pdn: int, cqn: int, wr: int = 1) -> int:
        return self.ctx.command(Cmd.CREATE_QP, pdn=pdn, qp_type=int(QpType.RC), send_cqn=cqn, recv_cqn=cqn,
                                max_send_wr=wr, max_recv_wr=wr, max_send_sge=1, max_recv_sge=1,
                                max_inline_data=0, flags=0, sq_gpa=self.ring_gpa, rq_gpa=self.ring_gpa,
                                dbrec_gpa=self.dbrec_gpa)["qpn"]

    def fill(self, fraction: float = 1.0) -> Filled:
        """Create objects until refused (``fraction`` < 1: that share of the
        caps the device reports); return what was made and why it stopped."""
        cfg = self.ctx.query_device()
        lim = (lambda n: None) if fraction >= 1.0 else (lambda n: max(1, int(n * fraction)))
        pds = self._fill("pds", self.alloc_pd, lim(cfg.max_pd))
        cqs = self._fill("cqs", self.create_cq, lim(cfg.max_cq))
        self._fill("mrs", lambda: self.reg_mr(pds[0]), lim(cfg.max_mr))
        self._fill("qps", lambda: self.create_qp(pds[0], cqs[0]), lim(cfg.max_qp))
        return self.filled

    def hammer(self, rounds: int) -> dict:
        """Control commands against the caps: one refused create of each kind and one
        query, ``rounds`` times; returns errno -> count (0 for successes)."""
        seen: dict[int, int] = {}
        pdn, cqn = self.filled.pds[0], self.filled.cqs[0]
        for _ in range(rounds):
            for op in (self.alloc_pd, self.create_cq, lambda: self.reg_mr(pdn),
                       lambda: self.create_qp(pdn, cqn), self.ctx.query_device):
                try:
                    op()
                    seen[0] = seen.get(0, 0) + 1
                except RDMAError as e:
                    seen[e.errno] = seen.get(e.errno, 0) + 1
        return seen

    def burst(self, n: int, cmd: Cmd = Cmd.QUERY_DEVICE, **fields) -> dict[int, int]:
        """``n`` control commands queued at once, one kick (a guest need not wait
        for each answer); returns status -> count."""
        from guest_lib.context import CONTROLQ, RESP_BUF

        ctx, t = self.ctx, self.ctx.transport
        req = wire.encode_request(cmd, **fields)
        rsz = wire.response_size(cmd)
        if not hasattr(self, "_burst_bufs") or len(self._burst_bufs) < n:
            self._burst_bufs = [(ctx.alloc(len(req), 64)[0], ctx.alloc(RESP_BUF, 64)[0]) for _ in range(n)]
        q = t.queues[CONTROLQ]
        for i, (rq, rs) in enumerate(self._burst_bufs[:n]):
            t.translate(rq, len(req))[:] = req
            q.add([(rq, len(req))], [(rs, rsz)], i)
        t.notify_if_needed(CONTROLQ)
        out: dict[int, int] = {}
        for _ in range(n):
            i, written = t.wait_used(CONTROLQ, ctx.timeout)
            status, _ = wire.decode_response(cmd, t.translate(self._burst_bufs[i][1], written))
            out[int(status)] = out.get(int(status), 0) + 1
        return out

    def close(self) -> None:
        if self._owns:
            self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def idle_connections(path: str, n: int) -> list[socket.socket]:
    """``n`` connections that never say a word (the daemon refuses or times
    them out); a connect the kernel refuses outright (backlog full) is skipped."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            if e.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                raise
            continue
        out.append(s)
    return out


def closed_by_peer(s: socket.socket) -> bool:
    """True if the daemon has closed this connection (EOF or reset)."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
