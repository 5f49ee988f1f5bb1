"""The verbs side of perftest's six RC tests, over guest_lib.

Follows linux-rdma/perftest v4.5-0.17 (src/perftest_resources.c):

- :class:`Resources` is ``ctx_init``: two buffers of ``BUFF_SIZE`` bytes
  (the largest message size run, at least the cycle buffer), a send CQ, a
  receive CQ and one RC QP. perftest registers one buffer of twice that size
  and hands the peer an rkey for all of it; we register two: what we send
  from (or READ into), local only, and the window the peer may write, read
  or send into, with the test's remote access only: its address and rkey
  are the ``vaddr`` and ``rkey`` we publish (``set_up_connection``).
- :class:`Session` walks :func:`.exchange.flow` for the test and role: the
  side-channel exchanges in perftest's order, ``ctx_connect`` (RTR with our
  outstanding reads as ``max_dest_rd_atomic``, RTS with the peer's as
  ``max_rd_atomic``, timeout 14, retry 7, RNR retry 7, min RNR timer 12,
  hop limit 255) and each size's measured loop:

  * send_lat: ``run_iter_lat_send``: the server waits for a receive before
    each send, the client sends first; a send is signaled every ``cq_mod``
    (and the last) and then waited for; receives are reposted while more are
    expected than posted.
  * write_lat: ``run_iter_lat_write``: RDMA WRITE of ``size`` bytes whose
    last byte is the send count; each side spins on the last byte of its
    own target window until it equals the count it expects (the server
    sends first).
  * read_lat: ``run_iter_lat``: the client's RDMA READs, one at a time.
  * write_bw / read_bw / send_bw client: ``run_iter_bw``: up to
    ``tx_depth`` WRs in flight, posted ``post_list`` at a time, one in
    ``cq_mod`` signaled (and the last); below half the cycle buffer the
    local and remote addresses step by ``INC(size)`` through it.
  * send_bw server: ``run_iter_bw_server``: ``iters`` receives.

  Latency is perftest's: differences of consecutive post times (halved for
  SEND and WRITE, a round trip), sorted, the two largest dropped; bandwidth
  and message rate are ``print_report_bw``'s, peak included.

Never trusting the peer: its address message is parsed strictly, only the
test's verb may touch our buffer, and what it wrote can be checked
(:attr:`Session.checks`, ``--check``): receive lengths and counts, the
window a WRITE peer covered, and with ``pattern`` (both sides ours) every
byte.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from guest_lib import CQ, MR, PD, QP, SGE, AHAttr, Context, QPAttr, QPCap, QPInitAttr, RecvWR, SendWR
from guest_lib.endpoint import new_psn
from guest_lib.errors import VerbsError
from verbs import Access, SendFlags, WcStatus, WrOpcode
from vrdma.perftest_compat import exchange as X, report
from vrdma.perftest_compat.errors import CompletionError, ExchangeError, SetupError
from vrdma.perftest_compat.oob import Channel

MAX_SIZE = 8388608          # perftest's MAX_SIZE: -a runs 2 .. 2^23
DEF_PAGE_SIZE = 4096        # cycle buffer
DEF_CACHE_LINE_SIZE = 64
DEF_CQ_MOD = 100
DEF_RX_SEND = 512
DEF_TX_BW = 128
DEF_TX_LAT = 1
MSG_SIZE_CQ_MOD_LIMIT = 8192
MIN_RNR_TIMER = 12
DEF_QP_TIME = 14
LAT_MEASURE_TAIL = 2
MAX_CYCLE_BUFFER = 2 << 20  # the largest cycle buffer a peer may ask for (a huge page)
PEAK_WORK = 20_000_000      # start x completion pairs the peak search may visit
CANARY = 0xA5               # our target window before the test, to see what a peer wrote


def buff_size(size: int, cycle_buffer: int) -> int:
    """BUFF_SIZE(size, cycle_buffer)."""
    return max(size, cycle_buffer)


def inc(size: int, cache_line: int) -> int:
    """INC(size, cache_line_size): the step between consecutive addresses."""
    if size <= cache_line:
        return cache_line
    return -(-size // cache_line) * cache_line


def pattern(n: int) -> bytes:
    """What both sides of ours send with ``--check pattern``: position-dependent bytes."""
    return bytes((i * 7 + 3) & 0xFF for i in range(251)) * (n // 251 + 1)


@dataclass
class Params:
    """One run's settings (perftest's options that reach the test); 0 (``inline_size``:
    -1, perftest's DEF_INLINE) means perftest's default for the test."""

    test: X.Test
    backend: str
    server: str | None = None   # the server's host name: we are the client
    port: int = X.DEFAULT_PORT
    size: int = 0               # 2 for latency, 65536 for bandwidth
    iters: int = 0              # 1000 for latency, 5000 for bandwidth
    run_all: bool = False
    gid_index: int = 0
    mtu: int = 0                # bytes; 0: the port's active MTU
    post_list: int = 1
    tx_depth: int = 0
    rx_depth: int = 0
    cq_mod: int = 0
    inline_size: int = -1
    out_reads: int = 0          # 0: the device's max_qp_rd_atom
    ib_port: int = 1
    report_gbits: bool = False
    timeout: float | None = None   # every wait; None: for ever, as perftest
    check: str | None = None       # None, "basic" or "pattern"
    ib_devname: str = "vrdma0"

    def __post_init__(self) -> None:
        t = self.test
        if not self.size:
            self.size = 65536 if t.is_bw else 2
        if not self.iters:
            self.iters = 5000 if t.is_bw else 1000
        if self.size < 0 or self.size > MAX_SIZE:
            raise SetupError(f"message size {self.size} out of range 1..{MAX_SIZE}")
        if self.iters < 5 and not t.is_bw:
            raise SetupError(f"iterations {self.iters}: a latency test needs at least 5")
        if self.iters <= 0:
            raise SetupError(f"iterations {self.iters} must be positive")
        if self.post_list < 1 or self.iters % self.post_list:
            raise SetupError(f"iterations {self.iters} must be a multiple of the post list {self.post_list}")
        for name in ("tx_depth", "rx_depth", "cq_mod", "out_reads", "mtu"):
            if getattr(self, name) < 0:
                raise SetupError(f"{name} {getattr(self, name)} must not be negative")
        if not self.tx_depth:
            self.tx_depth = DEF_TX_BW if t.is_bw else DEF_TX_LAT
        if not self.rx_depth:
            self.rx_depth = DEF_RX_SEND if t.verb == "send" else 1
        self.tx_depth = min(self.tx_depth, self.iters)
        if t.verb == "send":
            self.rx_depth = min(self.rx_depth, self.iters)
        requested_cq_mod = bool(self.cq_mod)
        if not self.cq_mod:
            self.cq_mod = self.post_list if self.post_list > 1 else DEF_CQ_MOD
        if self.size > MSG_SIZE_CQ_MOD_LIMIT and not self.run_all and not requested_cq_mod:
            self.cq_mod = 1
        self.cq_mod = max(1, min(self.cq_mod, self.tx_depth))
        if self.tx_depth < self.post_list:
            raise SetupError(f"TX depth {self.tx_depth} below the post list {self.post_list}")
        if self.inline_size < 0:
            self.inline_size = {"send": 236, "write": 220}.get(t.verb, 0) if not t.is_bw else 0
        if t.verb == "read":
            self.inline_size = 0
        if self.mtu:
            X.mtu_enum(self.mtu)  # raises ExchangeError naming it
        if self.check not in (None, "basic", "pattern"):
            raise SetupError(f"check {self.check!r} must be basic or pattern")

    @property
    def client(self) -> bool:
        return self.server is not None

    def sizes(self) -> list[int]:
        """The message sizes run: ``-a`` is every power of two from 2 up to 2^23."""
        return [1 << i for i in range(1, 24)] if self.run_all else [self.size]

    @property
    def max_size(self) -> int:
        return MAX_SIZE if self.run_all else self.size


class Resources:
    """ctx_init: the device context and PD (opened before the side channel, as
    perftest opens its device first), then (:meth:`setup`, once the cycle
    buffer is agreed) the two MRs, two CQs and the RC QP; owns the context."""

    def __init__(self, p: Params):
        self.p = p
        try:
            # room for the largest window: the largest size run or the largest cycle buffer accepted
            self.ctx = Context(p.backend, mem_size=2 * buff_size(p.max_size, MAX_CYCLE_BUFFER) + (16 << 20))
        except VerbsError as e:
            raise SetupError(f"Couldn't get context for the device: {e}") from e
        try:
            dev = self.ctx.query_device()
            port = self.ctx.query_port(p.ib_port)
            self.max_rd_atom = int(getattr(dev, "max_qp_rd_atom", 1) or 1)
            self.active_mtu = int(port.active_mtu)
            self.gid = self.ctx.query_gid(p.ib_port, p.gid_index).raw
            self.pd = PD(self.ctx)
        except VerbsError as e:
            self.ctx.close()
            raise SetupError(f"Couldn't query the device (port {p.ib_port}, GID index {p.gid_index}): "
                             f"{e}") from e
        except BaseException:
            self.ctx.close()
            raise
        self.psn = new_psn()

    def setup(self, cycle_buffer: int) -> None:
        p = self.p
        if not 0 < cycle_buffer <= MAX_CYCLE_BUFFER:
            raise SetupError(f"cycle buffer {cycle_buffer} out of range 1..{MAX_CYCLE_BUFFER}")
        self.buff = buff_size(p.max_size, cycle_buffer)
        # only the test's verb may reach the window from the peer
        access = Access.LOCAL_WRITE | {"write": Access.REMOTE_WRITE, "read": Access.REMOTE_READ}.get(
            p.test.verb, 0)
        try:
            # two regions: what we send from (or READ into), local only; and the
            # window the peer is given, with the test's remote access only
            self.local = MR(self.pd, self.buff, Access.LOCAL_WRITE)
            self.window = MR(self.pd, self.buff, access)
            depth = max(p.tx_depth, 1) + p.post_list
            self.scq = CQ(self.ctx, max(depth, 16))
            self.rcq = CQ(self.ctx, max(p.rx_depth, 16))
            self.qp = QP(self.pd, QPInitAttr(scq=self.scq, rcq=self.rcq,
                                             cap=QPCap(max(depth, DEF_CQ_MOD + 1), max(p.rx_depth, 1), 1, 1,
                                                       min(p.inline_size, 256))))
        except VerbsError as e:
            raise SetupError(f"Couldn't create IB resources: {e}") from e
        self.lview, self.wview = self.local.view, self.window.view
        # what we send or write from (and, for READ tests, what the peer reads): the
        # pattern; the peer's window: the canary (write_lat: zeros, as perftest's, so
        # the polled last byte starts at 0; READ tests: the pattern the peer reads)
        b = self.buff
        if p.test is X.Test.WRITE_LAT:
            self.lview[0:b] = pattern(b)[:b] if p.check == "pattern" else bytes(b)
            self.wview[0:b] = bytes(b)
        else:
            self.lview[0:b] = pattern(b)[:b]
            self.wview[0:b] = pattern(b)[:b] if p.test.verb == "read" else bytes([CANARY]) * b

    @property
    def vaddr(self) -> int:
        """The window the peer uses."""
        return self.window.buf

    def out_reads(self) -> int:
        want = self.p.out_reads or self.max_rd_atom
        return max(1, min(want, self.max_rd_atom))

    def dest(self) -> X.Dest:
        return X.Dest(lid=0, out_reads=self.out_reads() if self.p.test.verb == "read" else 1,
                      qpn=self.qp.qp_num, psn=self.psn, rkey=self.window.rkey, vaddr=self.vaddr, gid=self.gid)

    def connect(self, rem: X.Dest, mtu_enum: int) -> None:
        """ctx_connect: RTR then RTS towards ``rem``."""
        if rem.gid is None:
            raise ExchangeError("the peer sent no GID: a RoCE QP needs one")
        access = {"write": Access.REMOTE_WRITE, "read": Access.REMOTE_READ}.get(self.p.test.verb, 0)
        access |= Access.LOCAL_WRITE
        attr = QPAttr(qp_access_flags=int(access), pkey_index=0, port_num=self.p.ib_port, path_mtu=mtu_enum,
                      dest_qp_num=rem.qpn, rq_psn=rem.psn, sq_psn=self.psn,
                      max_dest_rd_atomic=self.out_reads(),
                      max_rd_atomic=max(1, min(rem.out_reads, self.max_rd_atom)),
                      min_rnr_timer=MIN_RNR_TIMER, timeout=DEF_QP_TIME, retry_cnt=7, rnr_retry=7,
                      ah_attr=AHAttr(dgid=rem.gid, sgid_index=self.p.gid_index, hop_limit=0xFF,
                                     port_num=self.p.ib_port))
        try:
            self.qp.to_init(attr)
            self.qp.to_rtr(attr)
            self.qp.to_rts(attr)
        except VerbsError as e:
            raise SetupError(f"Unable to Connect the HCA's through the link: {e}") from e

    def close(self) -> None:
        self.ctx.close()


@dataclass
class LatResult:
    size: int
    iters: int
    t_min: float
    t_max: float
    t_typical: float
    t_avg: float
    t_stdev: float
    p99: float
    p999: float


def lat_result(size: int, iters: int, tposted: list[int], rtt_factor: int) -> LatResult:
    """print_report_lat over post times in ns (microseconds out), perftest's
    arithmetic included (the tail dropped, the stdev's terms truncated to int)."""
    delta = sorted(b - a for a, b in itertools.pairwise(tposted))
    q = 1000.0 * rtt_factor
    n = len(delta) - LAT_MEASURE_TAIL
    if n < 2:
        raise SetupError(f"{iters} iterations leave {n} latency samples")
    median = (delta[n // 2] + delta[n // 2 - 1]) // 2 if (n - 1) % 2 else delta[n // 2]
    avg = sum(d / q for d in delta[:n]) / n
    var = sum(int(int(avg - d / q) ** 2) for d in delta[:n]) / n
    return LatResult(size, iters, delta[0] / q, delta[n] / q, median / q, avg, math.sqrt(var),
                     delta[math.ceil(n * 0.99)] / q, delta[math.ceil(n * 0.999)] / q)


@dataclass
class BwResult:
    size: int
    iters: int
    bw_peak: float
    bw_avg: float
    msg_rate: float
    gbits: bool = False

    def wire(self) -> X.BwReport:
        return X.BwReport(self.size, self.iters, self.bw_peak, self.bw_avg, self.msg_rate)


def bw_result(size: int, iters: int, tposted: list[int], tcompleted: dict[int, int], cq_mod: int,
              post_list: int, gbits: bool) -> BwResult:
    """print_report_bw (one QP) over post and completion times in ns; ``tcompleted``
    maps the completed-count index perftest stores a time at to that time."""
    fmt = 125000000 if gbits else 0x100000
    last = tcompleted[iters - 1]
    total = (last - tposted[0]) / 1e9
    opt = float(last - tposted[0])
    marks = np.array(sorted(tcompleted), dtype=np.int64)
    times = np.array([tcompleted[j] for j in marks], dtype=np.float64)
    starts = np.arange(0, min(iters, len(tposted)), post_list)
    if len(starts) * len(marks) > PEAK_WORK:  # perftest's O(n^2) search, on a sample of start points
        starts = starts[np.linspace(0, len(starts) - 1, max(1, PEAK_WORK // len(marks))).astype(np.int64)]
    tp = np.array(tposted, dtype=np.float64)
    for i in starts:
        first = -(-(int(i) + 1) // cq_mod) * cq_mod - 1
        k = int(np.searchsorted(marks, first))
        if k < len(marks):
            t = ((times[k:] - tp[i]) / (marks[k:] - i + 1)).min()
            opt = min(opt, float(t))
    peak = size / (opt / 1e9) / fmt if opt > 0 else 0.0
    return BwResult(size, iters, peak, size * iters / total / fmt if total > 0 else 0.0,
                    iters / total / 1e6 if total > 0 else 0.0, gbits)


@dataclass
class Check:
    """One verification of what went over the wire."""

    what: str
    ok: bool

    def line(self) -> str:
        return f"# check {'ok' if self.ok else 'FAILED'}: {self.what}"


@dataclass
class Session:
    """One test run for one role over a connected :class:`Channel`."""

    p: Params
    chan: Channel
    res: Resources              # owned from here on: closed by run()
    out: TextIO | None = None   # perftest's output (None: stdout)
    results: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    peer_version: str = ""
    cycle_buffer: int = DEF_PAGE_SIZE
    cache_line: int = DEF_CACHE_LINE_SIZE
    mtu_enum: int = 0
    _ready: bool = False
    rem: X.Dest | None = None
    remote_report: X.BwReport | None = None
    received: int = 0     # receive completions (send tests)
    completed: int = 0    # successful send-queue WRs (by cq_mod accounting)
    _posted_recv: int = 0
    _write_lat_sizes: set = field(default_factory=set)

    def emit(self, text: str) -> None:
        print(text, end="", file=self.out, flush=True)

    # --- the whole test ------------------------------------------------------
    def run(self) -> None:
        p = self.p
        sizes = p.sizes()
        steps = X.flow(p.test, p.client, len(sizes), p.run_all)
        hand_shakes = 0
        try:
            for step, i in steps:
                size = sizes[i]
                if step is X.Step.VERSION:
                    self.peer_version = X.decode_version(self.chan.xchg(X.encode_version(), X.VERSION_SIZE))
                    X.check_peer_version(self.peer_version)
                elif step is X.Step.SYS_DATA:
                    theirs = X.decode_int(self.chan.xchg(X.encode_int(DEF_PAGE_SIZE), X.INT_SIZE))
                    cl = X.decode_int(self.chan.xchg(X.encode_int(DEF_CACHE_LINE_SIZE), X.INT_SIZE))
                    if not 0 < theirs <= MAX_CYCLE_BUFFER or theirs & (theirs - 1):
                        raise ExchangeError(f"peer cycle buffer {theirs} is not a power of two up to "
                                            f"{MAX_CYCLE_BUFFER}")
                    if not 0 < cl <= 4096:
                        raise ExchangeError(f"peer cache line size {cl} out of range 1..4096")
                    self.cycle_buffer = max(DEF_PAGE_SIZE, theirs)
                    self.cache_line = max(DEF_CACHE_LINE_SIZE, cl)
                    self.res.setup(self.cycle_buffer)
                    self._ready = True
                elif step is X.Step.MTU:
                    res = self._res()
                    ours = X.mtu_enum(p.mtu) if p.mtu else res.active_mtu
                    theirs_mtu = X.decode_mtu(self.chan.xchg(X.encode_mtu(ours), X.MTU_MSG_SIZE))
                    self.mtu_enum = min(ours, theirs_mtu) if theirs_mtu else ours
                    self.emit(report.test_info(self))
                elif step is X.Step.HAND_SHAKE:
                    self._hand_shake(hand_shakes)
                    hand_shakes += 1
                elif step is X.Step.CONNECT:
                    assert self.rem is not None
                    self._res().connect(self.rem, self.mtu_enum)
                    self.emit(report.address(self, local=True))
                elif step is X.Step.POST_RECV:
                    self._post_recvs(size)
                elif step is X.Step.RUN:
                    self._run_size(size)
                elif step is X.Step.REPORTS:
                    self._reports()
                elif step is X.Step.DONE:
                    self._hand_shake(hand_shakes)
                    self.chan.write(X.DONE)
            self.emit(report.RESULT_LINE)
        except VerbsError as e:
            raise CompletionError(f"{p.test.value}: the device failed: {e}") from e
        finally:
            self.res.close()
            self.chan.close()

    def _res(self) -> Resources:
        if not self._ready:
            raise SetupError("no resources before the system data exchange")
        return self.res

    def _hand_shake(self, n: int) -> None:
        res = self._res()
        rem = X.decode_dest(self.chan.xchg(X.encode_dest(res.dest()), X.KEY_MSG_SIZE_GID))
        if self.rem is None:
            self.rem = rem
        # the hand shake after the local address is printed brings the remote's
        if n == self._remote_print_at():
            self.emit(report.address(self, local=False))
            if self.p.client or self.p.test is not X.Test.READ_LAT:
                self.emit(report.result_header(self))

    def _remote_print_at(self) -> int:
        """Which hand shake (0-based) is followed by the remote address print."""
        return {X.Test.SEND_LAT: 2, X.Test.SEND_BW: 2, X.Test.WRITE_LAT: 2, X.Test.READ_LAT: 2,
                X.Test.WRITE_BW: 1, X.Test.READ_BW: 1}[self.p.test]

    # --- receives -------------------------------------------------------------
    def _recv_wr(self, size: int) -> RecvWR:
        res = self._res()
        return RecvWR(wr_id=0, sg=[SGE(res.window.buf, size, res.window.lkey)])

    def _post_recvs(self, size: int) -> None:
        res = self._res()
        if self.p.check == "pattern" or self.p.check == "basic":
            res.wview[0:size] = bytes([CANARY]) * size
        n = min(self.p.rx_depth, self.p.iters)
        res.qp.post_recv([self._recv_wr(size)] * n)
        self._posted_recv = n

    # --- polling ----------------------------------------------------------------
    def _deadline(self) -> float | None:
        return None if self.p.timeout is None else time.monotonic() + self.p.timeout

    def _poll(self, cq: CQ, n: int, what: str) -> list:
        deadline = self._deadline()
        spins = 0
        while True:
            got, wcs = cq.poll(n)
            if got:
                for wc in wcs:
                    if wc.status != WcStatus.SUCCESS:
                        raise CompletionError(f"{what} completion with error: {wc}")
                return wcs
            spins += 1
            if spins & 63 == 0:
                if deadline is not None and time.monotonic() > deadline:
                    raise CompletionError(f"no {what} completion within {self.p.timeout:g} s")
                os.sched_yield()

    # --- the measured loops -----------------------------------------------------
    def _run_size(self, size: int) -> None:
        t = self.p.test
        if t is X.Test.SEND_LAT:
            self._lat_send(size)
        elif t is X.Test.WRITE_LAT:
            self._lat_write(size)
        elif t is X.Test.READ_LAT:
            self._lat_read(size)
        elif t is X.Test.SEND_BW and not self.p.client:
            self._bw_server(size)
        else:
            self._bw_client(size)

    def _lat_send(self, size: int) -> None:
        p, res = self.p, self._res()
        client = p.client
        inline = SendFlags.INLINE if size <= res.qp.cap.max_inline_data else 0
        sge = [SGE(res.local.buf, size, res.local.lkey)]
        wr = SendWR(wr_id=0, opcode=WrOpcode.SEND, sg=sge, send_flags=inline)
        wr_sig = SendWR(wr_id=0, opcode=WrOpcode.SEND, sg=sge, send_flags=inline | SendFlags.SIGNALED)
        rwr = self._recv_wr(size)
        iters, cq_mod = p.iters, p.cq_mod
        scnt = rcnt = 0
        bad_len = 0
        tposted: list[int] = []
        clock = time.perf_counter_ns
        while scnt < iters or rcnt < iters:
            if rcnt < iters and not (scnt < 1 and client):
                (wc,) = self._poll(res.rcq, 1, "receive")
                rcnt += 1
                if wc.byte_len != size:
                    bad_len += 1
                if self._posted_recv < iters:
                    res.qp.post_recv(rwr)
                    self._posted_recv += 1
            if scnt < iters:
                tposted.append(clock())
                scnt += 1
                signaled = scnt % cq_mod == 0 or scnt == iters
                res.qp.post_send(wr_sig if signaled else wr)
                if signaled:
                    self._poll(res.scq, 1, "send")
                    self.completed = scnt
        self.received += rcnt
        self._check_received(size, rcnt, bad_len)
        self._lat_report(size, tposted, 2)

    def _lat_write(self, size: int) -> None:
        p, res = self.p, self._res()
        lview, wview = res.lview, res.wview
        rem = self.rem
        assert rem is not None
        inline = SendFlags.INLINE if size <= res.qp.cap.max_inline_data else 0
        wr = SendWR(wr_id=0, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(res.local.buf, size, res.local.lkey)],
                    send_flags=inline | SendFlags.SIGNALED, remote_addr=rem.vaddr, rkey=rem.rkey)
        post_at = poll_at = size - 1
        iters = p.iters
        server = not p.client
        scnt = rcnt = ccnt = 0
        tposted: list[int] = []
        clock = time.perf_counter_ns
        while scnt < iters or ccnt < iters or rcnt < iters:
            if rcnt < iters and not (scnt < 1 and server):
                rcnt += 1
                want = rcnt & 0xFF
                deadline = self._deadline()
                spins = 0
                while wview[poll_at] != want:
                    spins += 1
                    if spins & 63 == 0:
                        if deadline is not None and time.monotonic() > deadline:
                            raise CompletionError(f"write {rcnt} of the peer did not arrive within "
                                                  f"{p.timeout:g} s (last byte {wview[poll_at]})")
                        os.sched_yield()
            if scnt < iters:
                tposted.append(clock())
                scnt += 1
                lview[post_at] = scnt & 0xFF
                res.qp.post_send(wr)
            if ccnt < iters:
                self._poll(res.scq, 1, "RDMA WRITE")
                ccnt += 1
        self.completed += ccnt
        if p.check:
            self.checks.append(Check(f"write_lat {size} B: {rcnt} writes of the peer seen, last byte "
                                     f"{wview[poll_at]} (expected {iters & 0xFF})",
                                     wview[poll_at] == iters & 0xFF))
            if p.check == "pattern" and size > 1:
                # the bytes the peer wrote, but the counters of this and the smaller sizes
                self._write_lat_sizes.add(size - 1)
                got, pat = bytes(wview[0:size]), pattern(size)
                bad = [i for i in range(size) if i not in self._write_lat_sizes and got[i] != pat[i]]
                self.checks.append(Check(f"write_lat {size} B: the peer's data, {len(bad)} bytes differ",
                                         not bad))
        self._lat_report(size, tposted, 2)

    def _lat_read(self, size: int) -> None:
        p, res = self.p, self._res()
        rem = self.rem
        assert rem is not None
        res.lview[0:size] = bytes([CANARY]) * size
        wr = SendWR(wr_id=0, opcode=WrOpcode.RDMA_READ, sg=[SGE(res.local.buf, size, res.local.lkey)],
                    send_flags=SendFlags.SIGNALED, remote_addr=rem.vaddr, rkey=rem.rkey)
        tposted: list[int] = []
        clock = time.perf_counter_ns
        for _ in range(p.iters):
            tposted.append(clock())
            res.qp.post_send(wr)
            self._poll(res.scq, 1, "RDMA READ")
        self.completed += p.iters
        self._check_read(size)
        self._lat_report(size, tposted, 1)

    def _lat_report(self, size: int, tposted: list[int], rtt_factor: int) -> None:
        r = lat_result(size, self.p.iters, tposted, rtt_factor)
        self.results.append(r)
        self.emit(report.lat_row(r))

    def _addr_offset(self, k: int, size: int, post_list: int = 1) -> int:
        """increase_loc_addr / increase_rem_addr: the k-th WR's offset; with a
        post list, the list's WRs step and every list uses the same addresses."""
        if size > self.cycle_buffer // 2:
            return 0
        step = inc(size, self.cache_line)
        slots = max(1, self.cycle_buffer // step)
        if post_list != 1:
            k %= post_list
        return (k % slots) * step

    def _bw_client(self, size: int) -> None:
        p, res = self.p, self._res()
        rem = self.rem
        assert rem is not None
        verb = p.test.verb
        if verb == "read":
            res.lview[0:res.buff] = bytes([CANARY]) * res.buff
        op = {"write": WrOpcode.RDMA_WRITE, "read": WrOpcode.RDMA_READ, "send": WrOpcode.SEND}[verb]
        inline = SendFlags.INLINE if verb != "read" and size <= min(p.inline_size,
                                                                    res.qp.cap.max_inline_data) else 0
        iters, tx_depth, cq_mod, plist = p.iters, p.tx_depth, p.cq_mod, p.post_list
        base, rbase, lkey = res.local.buf, rem.vaddr, res.local.lkey
        scnt = ccnt = 0
        tposted: list[int] = []
        tcompleted: dict[int, int] = {}
        clock = time.perf_counter_ns
        deadline = self._deadline()
        spins = 0
        while scnt < iters or ccnt < iters:
            while scnt < iters and scnt - ccnt + plist <= tx_depth:
                wrs = []
                for j in range(plist):
                    k = scnt + j
                    off = self._addr_offset(k, size, plist)
                    signaled = (k % cq_mod == cq_mod - 1) or k == iters - 1
                    wrs.append(SendWR(wr_id=0, opcode=op, sg=[SGE(base + off, size, lkey)],
                                      send_flags=inline | (SendFlags.SIGNALED if signaled else 0),
                                      remote_addr=rbase + off if verb != "send" else 0,
                                      rkey=rem.rkey if verb != "send" else 0))
                tposted.append(clock())
                res.qp.post_send(wrs)
                scnt += plist
                if plist > 1:
                    tposted.extend([tposted[-1]] * (plist - 1))
            got, wcs = res.scq.poll(16)
            if got:
                now = clock()
                for wc in wcs:
                    if wc.status != WcStatus.SUCCESS:
                        raise CompletionError(f"send-queue completion with error: {wc} "
                                              f"(posted {scnt}, completed {ccnt})")
                    ccnt += cq_mod
                    tcompleted[min(ccnt, iters) - 1] = now
                spins = 0
                deadline = self._deadline()
            else:
                spins += 1
                if spins & 63 == 0:
                    if deadline is not None and time.monotonic() > deadline:
                        raise CompletionError(f"no completion within {p.timeout:g} s "
                                              f"(posted {scnt}, completed {ccnt})")
                    os.sched_yield()
        self.completed += iters
        if verb == "read":
            self._check_read(size)
        r = bw_result(size, iters, tposted, tcompleted, cq_mod, plist, p.report_gbits)
        self.results.append(r)
        self.emit(report.bw_row(r))

    def _bw_server(self, size: int) -> None:
        """run_iter_bw_server: receive ``iters`` messages, reposting."""
        p, res = self.p, self._res()
        rwr = self._recv_wr(size)
        iters = p.iters
        rcnt = bad_len = 0
        first = 0
        tcompleted: dict[int, int] = {}
        clock = time.perf_counter_ns
        while rcnt < iters:
            wcs = self._poll(res.rcq, 16, "receive")
            now = clock()
            if not rcnt:
                first = now
            for wc in wcs:
                rcnt += 1
                if wc.byte_len != size:
                    bad_len += 1
                tcompleted[rcnt - 1] = now
            more = min(len(wcs), iters - self._posted_recv)
            if more > 0:
                res.qp.post_recv([rwr] * more)
                self._posted_recv += more
        self.received += rcnt
        self._check_received(size, rcnt, bad_len)
        r = bw_result(size, iters, [first], {iters - 1: tcompleted[iters - 1]},
                      1, 1, p.report_gbits)
        self.results.append(r)
        self.emit(report.bw_row(r))

    # --- reports and checks -------------------------------------------------------
    def _reports(self) -> None:
        """xchg_bw_reports; the write/read bw server prints the client's row."""
        p = self.p
        v = X.version_number(self.peer_version)
        mine = self.results[-1].wire() if self.results else X.BwReport(0, 0, 0.0, 0.0, 0.0)
        parts = [self.chan.xchg(m, n)
                 for m, n in zip(X.encode_bw_report(mine, v), X.bw_report_sizes(v), strict=True)]
        self.remote_report = X.decode_bw_report(parts, v)
        if not p.client:
            rr = self.remote_report
            self.results.append(BwResult(rr.size, rr.iters, rr.bw_peak, rr.bw_avg, rr.msg_rate,
                                         p.report_gbits))
            self.emit(report.bw_row(self.results[-1]))
            if p.test is X.Test.WRITE_BW:
                self._check_written(rr.size, rr.iters)

    def _check_received(self, size: int, rcnt: int, bad_len: int) -> None:
        if not self.p.check:
            return
        res = self._res()
        self.checks.append(Check(f"{self.p.test.value} {size} B: {rcnt} messages received, "
                                 f"{bad_len} of another length", rcnt == self.p.iters and bad_len == 0))
        if self.p.check == "pattern":
            # a bw sender steps through its cycle buffer (unless it posts lists): the
            # last message left from the last step's offset
            got = bytes(res.wview[0:size])
            offs = {0, self._addr_offset(self.p.iters - 1, size)} if self.p.test.is_bw else {0}
            self.checks.append(Check(f"{self.p.test.value} {size} B: the last message's bytes",
                                     any(got == pattern(o + size)[o:o + size] for o in offs)))

    def _check_read(self, size: int) -> None:
        if not self.p.check:
            return
        res = self._res()
        got = bytes(res.lview[0:size])
        if self.p.check == "pattern":
            self.checks.append(Check(f"{self.p.test.value} {size} B: the bytes read",
                                     got == pattern(size)[:size]))
        else:
            left = got.count(CANARY)
            self.checks.append(Check(f"{self.p.test.value} {size} B: {size - left} of {size} bytes read "
                                     f"differ from the canary", size < 64 or left < size // 8))

    def _check_written(self, size: int, iters: int) -> None:
        """What a write_bw client left in our window: the first message's bytes
        changed (perftest's are random: about 1 in 256 keeps the canary), with
        ``pattern`` every changed byte equal to ours; nothing changed beyond the
        window its WRITEs may aim at."""
        if not self.p.check:
            return
        res = self._res()
        if size <= 0 or size > res.buff or iters <= 0:
            self.checks.append(Check(f"write_bw: the client's report names {size} B x {iters}", False))
            return
        covered = np.zeros(res.buff, dtype=bool)
        for k in range(min(iters, max(1, self.cycle_buffer // inc(size, self.cache_line)))):
            off = self._addr_offset(k, size)
            covered[off:off + size] = True
        win = np.frombuffer(res.wview, dtype=np.uint8, count=res.buff).copy()
        changed = win != CANARY
        first = int(changed[:size].sum())
        if self.p.check == "pattern":
            pat = np.frombuffer(pattern(res.buff)[:res.buff], dtype=np.uint8)
            first = int((win[:size] == pat[:size]).sum())  # the pattern has canary bytes too
            bad = int((changed & (win != pat)).sum())
            self.checks.append(Check(f"write_bw {size} B: {first} of the first message's {size} bytes "
                                     f"written, {bad} bytes differ from ours", first == size and not bad))
        else:
            self.checks.append(Check(f"write_bw {size} B: {first} of the first message's {size} bytes "
                                     "changed", size - first <= size // 32 + 2))
        beyond = int((changed & ~covered).sum())
        self.checks.append(Check(f"write_bw {size} B: {beyond} bytes changed beyond the "
                                 f"{int(covered.sum())}-byte window", beyond == 0))
