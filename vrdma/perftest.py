"""perftest over the virtio-rdma device: the engine behind ``vrdma demo`` and ``bench.perftest``.

Like ib_send_lat / ib_write_bw / ib_read_lat, two processes (a server and a
client guest, each with its own Context on the back-end) connect RC QPs out
of band and poll their CQs: :func:`run_pair` runs one test (``send_lat``,
``write_bw``, ``read_lat``) between them and returns the client's figures.
:func:`eventfd_floor` (a two-process eventfd ping-pong) and
:func:`memcpy_floor` (a plain memcpy of the same size) measure, in the same
run, the floors those figures are compared with; :func:`print_rows` prints
them in perftest's columns.

Tests: ``send_lat``, ``write_lat``, ``read_lat`` (latency, like ib_*_lat),
``write_bw`` and ``send_bw`` (post lists of ``batch`` WRs, like ib_*_bw -l).

How a guest waits for completions (``wait``, :class:`CqWaiter`): it polls
its CQ with :meth:`~guest_lib.cq.CQ.poll_counts` (no object per
completion) and, between empty polls, ``spin`` does nothing, ``yield``
calls sched_yield, and ``adaptive`` (the default) spins for a budget learnt
from the completion latencies it sees, then arms the CQ and blocks on its
completion event, giving the CPU to whoever must produce the completion (a
daemon or a peer on the same CPU). ``guest_cpu`` pins the guests. Starting
the daemon, pinning it and keeping idle vCPUs awake is the caller's
business (``bench/perftest.py``).
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from guest_lib import SGE, QPCap, RecvWR, SendWR, cq as cq_mod
from guest_lib.endpoint import RcEndpoint
from verbs import SendFlags, WrOpcode

#: the ways a guest can wait for a completion (:class:`CqWaiter`)
WAITS = ("adaptive", "yield", "spin")

LAT_HEADER = ("#bytes #iterations t_min[usec] t_max[usec] t_typical[usec] t_avg[usec] t_stdev[usec] "
              "99% percentile[usec] 99.9% percentile[usec]")
BW_HEADER = "#bytes #iterations BW peak[MiB/sec] BW average[MiB/sec] MsgRate[Mpps]"


def make_guest(path: str, buf_size: int, depth: int = 128) -> RcEndpoint:
    """One perftest side: one MR, one CQ, one RC QP of ``depth`` WRs."""
    return RcEndpoint(path, buf_size, cap=QPCap(depth, depth, 1, 1, 64), cq_size=4 * depth,
                      mem_size=max(32 << 20, 2 * buf_size + (8 << 20)))


def latency_stats(ns: list[int], size: int) -> dict:
    """perftest's latency columns (microseconds) of ``ns`` samples in nanoseconds."""
    s = sorted(ns)
    n = len(s)
    us = [v / 1000.0 for v in s]
    return {"bytes": size, "iterations": n, "t_min": us[0], "t_max": us[-1], "t_typical": us[n // 2],
            "t_avg": sum(us) / n, "t_stdev": statistics.pstdev(us), "p99": us[min(n - 1, int(n * 0.99))],
            "p999": us[min(n - 1, int(n * 0.999))]}


def lat_row(r: dict) -> str:
    """One row of :data:`LAT_HEADER`."""
    return (f"{r['bytes']:<8}{r['iterations']:<12}{r['t_min']:<13.2f}{r['t_max']:<13.2f}"
            f"{r['t_typical']:<17.2f}"
            f"{r['t_avg']:<12.2f}{r['t_stdev']:<15.2f}{r['p99']:<22.2f}{r['p999']:.2f}")


# --------------------------------------------------------------------------
# the two sides, each in its own process


class CqWaiter:
    """Waits for completions on one CQ (perftest's polling loop).

    ``spin``: poll without pause. ``yield``: sched_yield between empty
    polls. ``adaptive``: spin for at most ``spin_ns``, then poll with
    sched_yield between looks, and after :attr:`BLOCK_NS` without a
    completion arm the CQ (REQ_NOTIFY_CQ), poll once more (a completion
    written before the arm raises no event) and block on its completion
    event. The spin budget is learnt from what each wait shows:

    * spinning caught the completion: budget twice the moving average of
      such waits;
    * a sched_yield gave the CPU away (it took longer than
      :attr:`SWITCH_NS`) and the completion came while we yielded: some
      other task wanted this CPU, perhaps the daemon or the peer that
      produces our completions, which cannot run while we spin: the budget
      shrinks fourfold, and below :attr:`MIN_NS` to none (yield at once:
      with a daemon polling on our CPU, spinning even 1 us before the
      first yield delayed every send it had to pick up; two-host send_lat
      typical 52.6 -> 48.4 us, medians of three interleaved runs);
    * the yields came straight back (nobody else wanted the CPU) and the
      completion came later: it is produced elsewhere and spinning longer
      would have caught it: the budget doubles (at most :attr:`MAX_NS`).

    Measured on a shared 2-vCPU VM (bench/perftest.py, both layouts):
    spinning without yielding collapses to the scheduler's tick (ms) as
    soon as the peer or the daemon shares the CPU; sched_yield polling
    stays within a few microseconds of the best; longer spin budgets (up to
    200 us) starved whoever shared the CPU in send_bw, hence the small
    :attr:`MAX_NS`; blocking through the event queue costs hundreds of
    microseconds, so it is the last resort, for a CQ idle for
    :attr:`BLOCK_NS`. ``spun`` / ``yielded`` / ``blocked`` count how the
    waits ended."""

    MIN_NS = 1_000
    MAX_NS = 20_000
    SWITCH_NS = 3_000
    BLOCK_NS = 2_000_000

    def __init__(self, cq, mode: str = "adaptive", spin_ns: int = 2_000):
        if mode not in WAITS:
            raise ValueError(f"wait mode {mode!r} is not one of {WAITS}")
        self.cq, self.mode, self.spin_ns = cq, mode, spin_ns
        self.avg_ns = spin_ns / 2
        self.spun = self.yielded = self.blocked = 0

    def wait(self, n: int = 16) -> tuple[int, int]:
        """Consume 1..``n`` completions: (receive completions, others);
        RuntimeError if one is in error. The polling itself is
        :meth:`guest_lib.cq.CQ.wait_counts` (native: without the GIL)."""
        cq = self.cq
        if self.mode == "adaptive":
            # the common case (a wait ended while yielding) without another frame:
            # every wait of a latency loop is on its critical path
            nrecv, nother, nerr, phase, waited, away = cq.wait_counts(n, self.spin_ns, self.BLOCK_NS)
            if phase == 2:
                self.yielded += 1
                if self.spin_ns or away <= self.SWITCH_NS:     # else: no spin stays no spin
                    self._learn_yield(away)
            elif phase:
                nrecv, nother, nerr = self._adapted(n, phase, waited, (nrecv, nother, nerr))
        else:
            spin = self.BLOCK_NS if self.mode == "spin" else 0
            while True:  # wait_counts comes back every BLOCK_NS: the CQ looks at the daemon then
                nrecv, nother, nerr, phase, _, _ = cq.wait_counts(n, spin, self.BLOCK_NS)
                if phase != 3:
                    break
        if nerr:
            raise RuntimeError(f"{nerr} completion(s) in error on CQ {cq.cqn}")
        return nrecv, nother

    def _learn(self, spin_ns: float) -> None:
        self.spin_ns = int(min(self.MAX_NS, max(self.MIN_NS, spin_ns)))

    def _learn_yield(self, away: int) -> None:
        """The budget after a wait that ended while yielding, whose longest
        sched_yield kept the CPU from us ``away`` ns."""
        if away <= self.SWITCH_NS:
            self._learn(2 * self.spin_ns)       # from no spin: MIN_NS
        elif self.spin_ns / 4 >= self.MIN_NS:
            self._learn(self.spin_ns / 4)
        else:
            # the producer shares our CPU and used it (a daemon polling beside us,
            # two-host send_lat): spinning first only delays it; yield at once
            self.spin_ns = 0

    def _adapted(self, n: int, phase: int, waited: int,
                 got: tuple[int, int, int]) -> tuple[int, int, int]:
        """An adaptive wait that ended while spinning (phase 1: what it
        teaches, and ``got``, its counts) or found nothing within BLOCK_NS
        (phase 3: the counts of a blocking wait)."""
        cq = self.cq
        if phase == 1:
            self.spun += 1
            self.avg_ns += (waited - self.avg_ns) / 8
            self._learn(2 * self.avg_ns)
            return got
        self.blocked += 1
        while True:
            cq.req_notify()
            r = cq.poll_counts(n)
            if r[0] or r[1]:
                return r
            cq.get_event(1.0)  # an event, or a second to look again (a dead daemon raises)
            r = cq.poll_counts(n)
            if r[0] or r[1]:
                return r


#: how this process's guest waits (set per process by _side)
_WAIT = "adaptive"


def _waiter(g) -> CqWaiter:
    w = getattr(g, "waiter", None)
    if w is None:
        w = g.waiter = CqWaiter(g.cq, _WAIT)
    return w


def _poll_one(g) -> None:
    """Wait for the next completion (which must be successful)."""
    _waiter(g).wait(1)


def _side(role: str, test: str, path: str, size: int, iters: int, batch: int, conn, out,
          cpu: int | None = None, connect_attrs: dict | None = None, native: bool | None = None,
          wait: str = "adaptive") -> None:
    global _WAIT  # noqa: PLW0603  each side is its own process: how it waits is process state
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if native is not None:
            cq_mod.NATIVE = native
        _WAIT = wait
        g = make_guest(path, max(size, 4096) * (2 if test in ("write_bw", "write_lat") else 1) + 4096)
        conn.send(g.info())
        peer = conn.recv()
        g.connect(peer, **(connect_attrs or {}))
        result = globals()[f"_{test}_{role}"](g, peer, size, iters, batch, conn)
        if result is None:  # a server: what it has to tell is how its waits went
            result = {}
        if isinstance(result, dict):
            w = _waiter(g)
            result.update(native=g.qp.native, wait=w.mode, waits_spun=w.spun, waits_yielded=w.yielded,
                          waits_blocked=w.blocked)
        g.close()
        out.put((role, result))
    except BaseException as e:  # report, never hang the parent
        out.put((role, {"error": f"{type(e).__name__}: {e}"}))


#: perftest's DEF_CQ_MOD: ib_send_lat signals one send in CQ_MOD (and the last)
#: and polls the send CQ only then
CQ_MOD = 100


class _LatSide:
    """One side of ib_send_lat's loop (perftest's run_iter_lat_send): the
    same WRs posted every time, receives reposted as they complete, a send
    signaled (and waited for) every CQ_MOD sends."""

    def __init__(self, g, size: int):
        self.g = g
        sge = SGE(g.mr.buf, size, g.mr.lkey)
        inline = SendFlags.INLINE if size <= 64 else 0
        self.rwr = RecvWR(wr_id=0, sg=[sge])
        self.wr = SendWR(wr_id=0, opcode=WrOpcode.SEND, sg=[sge], send_flags=inline)
        self.wr_signaled = SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[sge],
                                  send_flags=inline | SendFlags.SIGNALED)
        self.seen = {True: 0, False: 0}   # completions polled ahead: recv?, send?
        self.scnt = 0
        self.waiter = _waiter(g)
        g.qp.post_recv([self.rwr] * 64)

    def _wait(self, recv: bool) -> None:
        seen, w = self.seen, self.waiter
        while not seen[recv]:
            nrecv, nother = w.wait()     # one CQ for both: the other kind is counted for later
            seen[True] += nrecv
            seen[False] += nother
        seen[recv] -= 1

    def receive(self) -> None:
        self._wait(True)
        self.g.qp.post_recv(self.rwr)

    def send(self, iters: int) -> None:
        self.scnt += 1
        signaled = self.scnt % CQ_MOD == 0 or self.scnt == iters
        self.g.qp.post_send(self.wr_signaled if signaled else self.wr)
        if signaled:
            self._wait(False)


def _send_lat_server(g, peer, size, iters, batch, conn):
    side = _LatSide(g, size)
    conn.send("ready")
    for _ in range(iters):
        side.receive()  # the client's message
        side.send(iters)
    return None


def _send_lat_client(g, peer, size, iters, batch, conn):
    side = _LatSide(g, size)
    conn.recv()
    clock = time.perf_counter_ns
    posted = []
    for i in range(iters):
        if i:
            side.receive()  # the server's reply to the previous send
        posted.append(clock())
        side.send(iters)
    side.receive()
    posted.append(clock())
    # ib_send_lat: consecutive post times, halved (a round trip covers two sends)
    samples = [(b - a) // 2 for a, b in itertools.pairwise(posted)]
    return latency_stats(samples[iters // 10:], size)


class _WriteLatSide:
    """One side of ib_write_lat's loop: RDMA WRITE ``size`` bytes whose last
    byte is the iteration's tag (from the second half of our buffer) into
    the first half of the peer's, then watch the last byte of our first half
    for the peer's write (perftest polls memory too); a write signaled (and
    waited for) every CQ_MOD."""

    def __init__(self, g, peer, size: int):
        self.g, self.size = g, size
        self.view = g.mr.view
        inline = SendFlags.INLINE if size <= 64 else 0
        sge = SGE(g.mr.buf + size, size, g.mr.lkey)
        kw = dict(opcode=WrOpcode.RDMA_WRITE, sg=[sge], remote_addr=peer["addr"], rkey=peer["rkey"])
        self.wr = SendWR(wr_id=0, send_flags=inline, **kw)
        self.wr_signaled = SendWR(wr_id=1, send_flags=inline | SendFlags.SIGNALED, **kw)
        self.scnt = 0
        self.spin = _WAIT == "spin"

    def write(self, tag: int, iters: int) -> None:
        self.view[2 * self.size - 1] = tag
        self.scnt += 1
        signaled = self.scnt % CQ_MOD == 0 or self.scnt == iters
        self.g.qp.post_send(self.wr_signaled if signaled else self.wr)
        if signaled:
            _poll_one(self.g)

    def watch(self, tag: int) -> None:
        """Until the peer's write of ``tag`` lands (memory cannot be waited
        on: spin, or sched_yield between looks)."""
        view, last = self.view, self.size - 1
        while view[last] != tag:
            if not self.spin:
                os.sched_yield()


def _tag(i: int) -> int:
    return i % 255 + 1


def _write_lat_server(g, peer, size, iters, batch, conn):
    side = _WriteLatSide(g, peer, size)
    conn.send("ready")
    for i in range(iters):
        side.watch(_tag(i))
        side.write(_tag(i), iters)
    return None


def _write_lat_client(g, peer, size, iters, batch, conn):
    side = _WriteLatSide(g, peer, size)
    conn.recv()
    clock = time.perf_counter_ns
    posted = []
    for i in range(iters):
        if i:
            side.watch(_tag(i - 1))
        posted.append(clock())
        side.write(_tag(i), iters)
    side.watch(_tag(iters - 1))
    posted.append(clock())
    samples = [(b - a) // 2 for a, b in itertools.pairwise(posted)]
    return latency_stats(samples[iters // 10:], size)


def _send_bw_server(g, peer, size, iters, batch, conn):
    """ib_send_bw's receiver: the RQ kept full, receives reposted as they complete."""
    depth = g.qp.rq_depth
    rwr = RecvWR(wr_id=0, sg=[SGE(g.mr.buf, max(size, 1), g.mr.lkey)])
    g.qp.post_recv([rwr] * depth)
    conn.send("ready")
    w = _waiter(g)
    got, want = 0, max(1, iters // batch) * batch  # what the client sends
    while got < want:
        nrecv, _ = w.wait(depth)
        got += nrecv
        if nrecv:
            g.qp.post_recv([rwr] * nrecv)
    conn.recv()
    return None


def _send_bw_client(g, peer, size, iters, batch, conn):
    sge = SGE(g.mr.buf, size, g.mr.lkey)
    inline = SendFlags.INLINE if size <= 64 else 0
    wrs = g.qp.prepare_send([SendWR(wr_id=i, opcode=WrOpcode.SEND, sg=[sge],
                                    send_flags=(SendFlags.SIGNALED if i == batch - 1 else 0) | inline)
                             for i in range(batch)])
    conn.recv()
    rounds = max(1, iters // batch)
    t_start = time.perf_counter()
    for _ in range(rounds):
        g.qp.post_list(wrs)
        _poll_one(g)
    total = time.perf_counter() - t_start
    conn.send("done")
    n = rounds * batch
    return {"bytes": size, "iterations": n, "bw_peak_MiB": n * size / total / 2**20,
            "bw_avg_MiB": n * size / total / 2**20, "msg_rate_Mpps": n / total / 1e6}


def _read_lat_server(g, peer, size, iters, batch, conn):
    conn.recv()  # wait for the client to finish
    return None


def _read_lat_client(g, peer, size, iters, batch, conn):
    clock = time.perf_counter_ns
    samples = []
    sge = SGE(g.mr.buf, size, g.mr.lkey)
    for i in range(iters):
        t0 = clock()
        g.qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.RDMA_READ, sg=[sge], remote_addr=peer["addr"],
                              rkey=peer["rkey"]))
        _poll_one(g)
        samples.append(clock() - t0)
    conn.send("done")
    return latency_stats(samples[iters // 10:], size)


def _write_bw_server(g, peer, size, iters, batch, conn):
    conn.recv()
    return None


def _write_bw_client(g, peer, size, iters, batch, conn):
    sge = SGE(g.mr.buf, size, g.mr.lkey)
    inline = SendFlags.INLINE if size <= 64 else 0
    wrs = g.qp.prepare_send([
        SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, sg=[sge], remote_addr=peer["addr"], rkey=peer["rkey"],
               send_flags=(SendFlags.SIGNALED if i == batch - 1 else 0) | inline) for i in range(batch)])
    rounds = max(1, iters // batch)
    best = 0.0
    t_start = time.perf_counter()
    for _ in range(rounds):
        t0 = time.perf_counter()
        g.qp.post_list(wrs)  # one doorbell (or none, while the daemon polls) per list
        _poll_one(g)
        dt = time.perf_counter() - t0
        best = max(best, batch * size / dt)
    total = time.perf_counter() - t_start
    conn.send("done")
    n = rounds * batch
    return {"bytes": size, "iterations": n, "bw_peak_MiB": best / 2**20,
            "bw_avg_MiB": n * size / total / 2**20,
            "msg_rate_Mpps": n / total / 1e6}


# --------------------------------------------------------------------------
# floors measured in the same run


def rtt_stats(samples_ns: list[int]) -> dict:
    """Round-trip statistics in microseconds (``t_typical_us`` is the median)."""
    s = sorted(samples_ns)
    n = len(s)

    def us(v: float) -> float:
        return v / 1000.0

    return {
        "iterations": n,
        "t_min_us": us(s[0]),
        "t_typical_us": us(s[n // 2]),
        "t_avg_us": us(sum(s) / n),
        "t_stdev_us": us(statistics.pstdev(s)),
        "p99_us": us(s[min(n - 1, int(n * 0.99))]),
        "p999_us": us(s[min(n - 1, int(n * 0.999))]),
    }


def eventfd_pingpong(iterations: int, cpus: tuple[int, int] | None = None) -> dict:
    """Two-process eventfd ping-pong (write, the other side wakes, writes back,
    we wake): the least any kick/call round trip can cost; :func:`rtt_stats`.
    ``cpus``: (ours, the echo's), each process pinned to its own (else the
    kernel places them: on a 2-vCPU machine sometimes on one CPU, sometimes
    on two, which differ several-fold)."""
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    mask = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:  # child: echo
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            for _ in range(iterations + 100):
                os.eventfd_read(ping)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    samples = []
    clock = time.perf_counter_ns
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        for i in range(iterations + 100):
            t0 = clock()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            if i >= 100:
                samples.append(clock() - t0)
    finally:
        os.sched_setaffinity(0, mask)
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    return rtt_stats(samples)


def eventfd_floor(iters: int, cpus: tuple[int, int] | None = None) -> dict:
    """The latency floor: half an eventfd round trip (``t_typical``, ``t_min``, ``t_avg``);
    ``cpus`` as :func:`eventfd_pingpong`."""
    r = eventfd_pingpong(iters, cpus)
    half = {k: v / 2 for k, v in r.items() if k.endswith("_us")}
    return {"t_typical": half["t_typical_us"], "t_min": half["t_min_us"], "t_avg": half["t_avg_us"]}


def memcpy_floor(size: int, reps: int = 200) -> dict:
    """The bandwidth floor: a plain memcpy of ``size`` bytes (``bw_avg_MiB``, ``bw_peak_MiB``)."""
    src = np.ones(size, np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    t_all = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, size / (time.perf_counter() - t0))
    avg = reps * size / (time.perf_counter() - t_all)
    return {"bw_peak_MiB": best / 2**20, "bw_avg_MiB": avg / 2**20}


# --------------------------------------------------------------------------
# a pair of guests, and the report


def run_pair(path: str, test: str, size: int, iters: int, batch: int = 16,
             guest_cpu: int | tuple[int, int] | None = None,
             *, client_path: str | None = None, connect_attrs: dict | None = None,
             native: bool | None = None, wait: str = "adaptive") -> dict:
    """Server and client guests in two processes; the client's daemon is
    ``client_path`` if given (two hosts), else the server's.  ``guest_cpu``
    pins both guests to one CPU, or (server CPU, client CPU) each to its own.
    ``native`` chooses the guests' fast path (None: guest_lib's default),
    ``wait`` how they wait for completions (:data:`WAITS`)."""
    if wait not in WAITS:
        raise ValueError(f"wait mode {wait!r} is not one of {WAITS}")
    server_cpu, client_cpu = guest_cpu if isinstance(guest_cpu, tuple) else (guest_cpu, guest_cpu)
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    ps = [ctx.Process(target=_side, args=("server", test, path, size, iters, batch, a, out, server_cpu,
                                           connect_attrs, native, wait)),
          ctx.Process(target=_side, args=("client", test, client_path or path, size, iters, batch, b, out,
                                           client_cpu, connect_attrs, native, wait))]
    for p in ps:
        p.start()
    results = {}
    try:
        for _ in ps:
            role, r = out.get(timeout=300)
            results[role] = r
            if isinstance(r, dict) and "error" in r:
                break  # e.g. the daemon died: the other side may wait on the pipe for ever
    finally:
        for p in ps:
            p.join(0 if len(results) < len(ps) else 10)
            if p.is_alive():
                p.kill()
                p.join()
    for role, r in results.items():
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"{test} {role}: {r['error']}")
    server = {f"server_{k}": v for k, v in results.get("server", {}).items() if k.startswith("waits_")}
    return dict(results["client"], batch=batch, **server)


def print_rows(test: str, rows: list[dict]) -> None:
    """perftest's columns for ``rows`` of one test, then each row's floor and ratio."""
    if test in ("write_bw", "send_bw"):
        print(BW_HEADER)
        for r in rows:
            print(f"{r['bytes']:<8}{r['iterations']:<12}{r['bw_peak_MiB']:<19.2f}{r['bw_avg_MiB']:<22.2f}"
                  f"{r['msg_rate_Mpps']:.6f}")
        for r in rows:
            print(f"# {r['bytes']} B, post list {r['batch']}: memcpy {r['floor_memcpy_MiB']:.0f} MiB/s, "
                  f"ratio {r['ratio_vs_memcpy']:.3f}, {r['msg_rate_Mpps'] * 1e3:.0f} k msg/s")
    else:
        print(LAT_HEADER)
        for r in rows:
            print(lat_row(r))
        for r in rows:
            key = next(k for k in r if k.startswith("floor_eventfd"))
            print(f"# {r['bytes']} B: floor ({key}) {r[key]:.2f} us, ratio {r['ratio_vs_floor']:.2f}x")
    for r in rows[:1]:
        if "vcpu_state" in r:  # bench.perftest.run() measures it; a caller of run_pair may not
            print(f"# vCPUs during the run: {r['vcpu_state']}; during the floor: "
                  f"{r.get('floor_vcpu_state', 'not measured')}")
