"""Accelerator jobs between daemons: one :class:`PeerTarget` per peer host,
in both roles (docs/peering.md).

**Origin** (a job of one of this host's guests runs on the peer): the
device's router (:class:`virtio_rdma.accel.AccelRouter`) hands the target a
checked job whose input and output are views of the guest's registered
memory. The target opens a window on its link over the output (REMOTE_WRITE:
:class:`peering.link.WindowTable`) and SENDs a :class:`~peering.wire.JobMsg`
naming it, if the peer's credits allow;
otherwise the job waits in this peer's remote queue (``backlog``, round robin
across guests: :class:`RemoteQueue`). The peer
grants a window on its staging memory (:class:`~peering.wire.GrantMsg`),
the target WRITEs the input there straight from the guest's buffers and
SENDs GO; the peer runs the job, WRITEs the output straight into the guest's
buffer and SENDs a :class:`~peering.wire.ResultMsg`; the target closes the
window and settles the job (:func:`virtio_rdma.accel.settle`). (Pushing the
input with WRITE rather than letting the peer READ it costs a round trip but
takes the transport's fast paths both ways: WRITE bursts are encoded and
placed natively, READ responses are not.) If the link
fails, every job sent or queued on it is given back: placed again by this
host's scheduler if its queue asked (LOCAL_FALLBACK; never on a host that
gave it back), else REMOTE_FAILED. The peer runs a job on its own
accelerators or refuses it, never sends it on. A result for a job no longer outstanding (the
link failed meanwhile, or the queue went) is dropped: never delivered twice.

**Server** (the peer's job runs here): a JobMsg is checked as a guest's job
is (:func:`virtio_rdma.accel.check_params`, lengths matching the operation,
this host runs the op, the peer within the credits this host granted, the
staging memory within :data:`MAX_STAGING_BYTES`); a refusal is a ResultMsg
with NO_ACCELERATOR, INVALID_PARAMS or REMOTE_FAILED. An accepted job's
input is written by the peer into zeroed staging arrays, run on the local service under this
peer's own guest id (the peer host is one guest in the fair queue, with its
job's priority), and its output WRITten back, then the result SENT.

A malformed message from a peer fails the link (its jobs are given back on
both sides): a daemon that speaks the protocol wrongly is not trusted with
more.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import count
from time import monotonic
from typing import TYPE_CHECKING, Any

import numpy as np

from accel_core.errors import AccelError, InvalidInput
from accel_core.jobs import MAX_PRIORITY, JobState
from peering.link import LinkState, PeerLink
from peering.wire import NO_SLOT, GoMsg, GrantMsg, JobMsg, PeerWireError, ResultMsg, decode_link
from scheduler.board import board_size
from verbs import Access, WcStatus
from virtio_rdma.accel import (
    CORE_OP,
    NP_DTYPE,
    Entry,
    check_params,
    job_times_us,
    make_job,
    need_bytes,
    settle,
)
from virtio_rdma.constants import AccelOp, AccelStatus
from virtio_rdma.wire import AccelJob

if TYPE_CHECKING:
    from accel_core.jobs import Job
    from virtio_rdma.accel import AccelRouter

log = logging.getLogger(__name__)

#: staging memory (bytes) the jobs one peer has running here may hold
MAX_STAGING_BYTES = 256 << 20
#: jobs a peer may have in flight here unless configured (--peer-credits)
DEFAULT_CREDITS = 64
#: seconds a job may stay on a peer whose link is alive before it is given back
#: (REMOTE_FAILED, or LOCAL_FALLBACK): a wedged accelerator must not hold it for ever
DEFAULT_JOB_TIMEOUT = 30.0
#: tenants of one peer that get a share of their own here (more share the peer's)
MAX_PEER_TENANTS = 64
#: landing slots this host offers each peer for job inputs, and their size: a job whose
#: input fits a free slot is written there before its JOB message (no GRANT round trip)
LANDING_SLOTS = 16
LANDING_SLOT_KIB = 1024
# send WR ids: the low 3 bits say what completed, the rest is the job's tag
_WR_JOB, _WR_GRANT, _WR_INPUT, _WR_GO, _WR_OUTPUT, _WR_RESULT, _WR_PROBE, _WR_BOARD = 0, 1, 2, 3, 4, 5, 6, 7
_WR_KIND = 3


@dataclass(slots=True)
class PeerMetrics:
    jobs_sent: int = 0          # origin: JobMsgs sent to the peer
    jobs_backlogged: int = 0    # origin: waited in the remote queue for credits
    jobs_done: int = 0          # origin: settled with the peer's SUCCESS
    jobs_given_back: int = 0    # origin: the link failed or the peer refused
    jobs_timed_out: int = 0     # origin: on the peer past the job timeout (given back)
    results_dropped: int = 0    # origin: a result for no outstanding job
    jobs_served: int = 0        # server: results sent for the peer's jobs
    jobs_landed: int = 0        # server: ... whose input came ahead into a landing slot
    jobs_granted: int = 0       # server: ... whose input came after a GRANT
    jobs_refused: int = 0       # server: refused (credits, staging, no accelerator)
    jobs_invalid: int = 0       # server: INVALID_PARAMS
    bad_messages: int = 0       # malformed messages (each failed the link)

    def as_dict(self) -> dict:
        return asdict(self)


class _Out:
    """A guest's job sent (or queued) to the peer."""

    __slots__ = ("tag", "entry", "guest", "out_key", "granted", "abandoned", "slot", "input_pending",
                 "result", "deadline", "sent_at", "nbytes", "announced")

    def __init__(self, tag: int, entry: Entry, guest: int = 0):
        self.tag = tag
        self.entry = entry
        self.guest = guest  # the submitting device's guest id (its turn in the remote queue)
        self.out_key = 0
        self.granted = False
        self.abandoned = False
        self.slot: int | None = None  # the peer's landing slot its input went to
        #: its input WRITE is posted and not yet acknowledged: the guest's input buffer is
        #: still read (retransmissions), so the job is not completed before it is
        self.input_pending = False
        self.result: ResultMsg | None = None  # a result that came before that acknowledgement
        self.deadline = 0.0  # when it is given back if the peer has not answered
        self.sent_at = 0.0   # when its JOB went (its time on the wire: response - wait - service)
        self.nbytes = 0      # input + output bytes it moves
        self.announced = 0   # board units announced to the peer for it (0: none)


class _Served:
    """A peer's job running here (the router's owner of its local job)."""

    __slots__ = ("target", "msg", "spec", "x", "y", "its", "job", "bytes", "in_key", "slot", "epoch")

    def __init__(self, target: PeerTarget, msg: JobMsg, spec: AccelJob):
        self.target = target
        self.msg = msg
        self.spec = spec              # its parameters, as a guest's job has them (checked)
        self.slot: int | None = None  # the landing slot holding its input
        self.epoch = target.link.epoch  # the link's life it arrived in
        self.in_key = 0  # the window the origin WRITEs the input into, until its GO
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.its: np.ndarray | None = None
        self.job: Job | None = None
        self.bytes = 0

    def job_done(self, job: Job) -> None:
        self.target._finished(self, job)


class RemoteQueue:
    """A peer's remote queue: the jobs waiting for its credits, each guest's
    (device's) in posted order. Which guest's job goes next is its owner's
    choice (:meth:`popleft`'s key; ties go in turn), so that one guest's deep
    queues do not hold every other guest's jobs back."""

    def __init__(self) -> None:
        self._q: dict[int, deque[_Out]] = {}
        self._turns: deque[int] = deque()  # guests with jobs waiting, whose turn is next first
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        for d in self._q.values():
            yield from d

    def __contains__(self, o: _Out) -> bool:
        d = self._q.get(o.guest)
        return d is not None and o in d

    def append(self, o: _Out) -> None:
        d = self._q.get(o.guest)
        if d is None:
            d = self._q[o.guest] = deque()
            self._turns.append(o.guest)
        d.append(o)
        self._n += 1

    def popleft(self, key: Callable[[int], Any] = lambda g: 0) -> _Out:
        """The oldest job of the waiting guest with the smallest ``key(guest)``."""
        g = min(self._turns, key=key)  # min keeps the first of equals: the round robin
        self._turns.remove(g)
        d = self._q[g]
        o = d.popleft()
        if d:
            self._turns.append(g)  # its next job waits for the other guests' turns
        else:
            del self._q[g]
        self._n -= 1
        return o

    def remove(self, o: _Out) -> None:
        d = self._q[o.guest]
        d.remove(o)
        self._n -= 1
        if not d:
            del self._q[o.guest]
            self._turns.remove(o.guest)

    def clear(self) -> None:
        self._q.clear()
        self._turns.clear()
        self._n = 0


def _as_accel_job(m: JobMsg) -> AccelJob:
    return AccelJob(m.tag, m.op, m.dtype, m.size, m.batch, m.iterations, m.early_stop, m.scaling, [], [])


class PeerTarget:
    """Host ``host`` (a peer daemon) as a target of this host's router, and
    this host as its server (see the module doc). ``link_factory(target)``
    makes the link, whose owner the target is."""

    def __init__(self, host: int, router: AccelRouter, link_factory: Callable[[PeerTarget], PeerLink], *,
                 credits: int = DEFAULT_CREDITS, clock: Callable[[], float] = monotonic,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT):
        self.host = host
        self.job_timeout = job_timeout
        self.router = router
        self.credits = credits
        self.clock = clock
        self.metrics = PeerMetrics()
        self.guest_id = router.new_guest_id()  # this peer's share of the local accelerators
        #: this peer in the tenant configuration (its ``[[tenant]]`` entry caps the class and
        #: gives the weight of the jobs it sends); peering.service names it by address
        self.name = f"peer:{host}"
        #: a guest id (share of the local accelerators) per tenant of the peer's jobs
        self.tenant_gids: dict[str, int] = {}
        self._tags = count(1)
        self.sent: dict[int, _Out] = {}
        #: results in, input WRITE not yet acknowledged (they complete when it is)
        self.unacked: dict[int, _Out] = {}
        self.backlog = RemoteQueue()
        self._sends = 0
        self._last_send: dict[int, int] = {}  # guest -> the number of its latest send
        self.served: dict[int, _Served] = {}   # the peer's jobs here, by tag, until results are sent
        #: results sent, not yet acknowledged: their staging stays (the output
        #: WRITE may be retransmitted) but the peer's credit is back
        self.draining: dict[int, _Served] = {}
        self.staging = 0
        self.link: PeerLink = link_factory(self)
        #: origin: the peer's landing slots free for our next inputs
        self.free_slots: list[int] = []
        #: server: landing memory for this peer's inputs (a host that runs nothing offers none)
        self._landing: np.ndarray | None = None
        self._slot_bytes = LANDING_SLOT_KIB << 10
        self._busy_slots: set[int] = set()
        if router.local is not None and any(router.local.units(op) for op in AccelOp):
            self._new_landing()

    # ----------------------------------------------------------- RemoteTarget
    def units(self, op: AccelOp) -> int:
        if self.link.state is not LinkState.UP or not self.link.peer_credits:
            return 0
        info = self.link.peer_ops.get(int(op))
        return info.units if info is not None else 0

    def submit(self, entry: Entry) -> AccelStatus | None:
        if self.link.state is not LinkState.UP:
            return AccelStatus.REMOTE_FAILED
        if not self.units(entry.op):
            return AccelStatus.NO_ACCELERATOR
        core = entry.aq.core
        o = _Out(next(self._tags), entry, core.accel_guest if core is not None else 0)
        entry.remote = o
        d = self._dispatcher()
        if d is not None and entry.spec is not None:
            o.announced = d.announce(self.host, entry.spec)
        if len(self.sent) < self.link.peer_credits:
            self._send(o)
            self.link.kick_soon(self.clock)  # from the loop: nothing completes inside start()
        else:
            self.backlog.append(o)
            self.metrics.jobs_backlogged += 1
        return None

    def cancel(self, entry: Entry) -> bool:
        o = entry.remote
        if isinstance(o, _Out) and o in self.backlog:
            self.backlog.remove(o)
            self._unannounce(o)
            return True
        return False

    def _unannounce(self, o: _Out) -> None:
        """A job announced to the peer that will never reach it: take its work off."""
        d = self._dispatcher()
        if o.announced and d is not None and o.entry.spec is not None:
            d.unannounce(self.host, o.entry.spec, o.announced)
        o.announced = 0

    def abandon(self, entry: Entry) -> None:
        o = entry.remote
        if not isinstance(o, _Out):
            return
        if o in self.backlog:
            self.backlog.remove(o)
            self._unannounce(o)
            return
        o.abandoned = True
        # the peer may still write the output: it finds nothing there (its result closes the window)
        self.link.sink_window(o.out_key)
        if o.input_pending:
            # the input is still being sent from the guest's memory (retransmissions read it
            # again): fail the link, so that nothing more is read from a device that is gone
            self._protocol_error(f"job {o.tag}'s device went while its input was being sent")

    def probe(self, tag: int, into: memoryview) -> bool:
        """RDMA READ the peer's counters window into ``into`` (the dispatcher's
        read ``tag``: its completion goes to ``router.dispatcher.read_done``);
        False if the link is not up or the peer offers no counters."""
        pc = self.link.peer_counters
        if self.link.state is not LinkState.UP or pc is None or len(into) > pc[1]:
            return False
        self.link.read(tag << _WR_KIND | _WR_PROBE, into, pc[0], 0)
        return self._posted()

    def _board(self) -> tuple[int, int, int, int] | None:
        """The load board this peer holds, while the link is up (None: down, or it holds none)."""
        return self.link.peer_board if self.link.state is LinkState.UP else None

    def _posted(self) -> bool:
        self.link.kick_soon(self.clock)
        return True

    def board_read(self, tag: int, into: memoryview) -> bool:
        """RDMA READ the whole load board this peer holds into ``into`` (the
        dispatcher's read ``tag``); False if the link is not up, it holds none,
        or ``into`` is larger than its board."""
        pb = self._board()
        if pb is None or len(into) > board_size(pb[0]):
            return False
        self.link.read(tag << _WR_KIND | _WR_PROBE, into, pb[1], 0)
        return self._posted()

    def board_write(self, counters: memoryview) -> bool:
        """WRITE this host's counters into its slot of the board this peer holds (unsignaled)."""
        pb = self._board()
        if pb is None:
            return False
        self.link.write(_WR_BOARD, [counters], pb[2], 0, signaled=False)
        return self._posted()

    def board_add(self, offset: int, add: int) -> bool:
        """FETCH_ADD ``add`` at ``offset`` of the announced-work array of the board this peer holds."""
        pb = self._board()
        if pb is None:
            return False
        self.link.fetch_add(_WR_BOARD, pb[3], offset, add)
        return self._posted()

    def _dispatcher(self) -> Any:
        return self.router.dispatcher

    # ----------------------------------------------------------------- origin
    def _send(self, o: _Out) -> None:
        e, link = o.entry, self.link
        job = e.spec
        assert job is not None
        o.out_key = link.table.open(e.out_views, Access.REMOTE_WRITE)
        in_len = sum(len(v) for v in e.in_views)
        slot = NO_SLOT
        pl = link.peer_landing
        if pl is not None and self.free_slots and in_len <= pl[2]:
            # the input goes ahead into a landing slot: the JOB behind it needs no GRANT
            o.slot = slot = self.free_slots.pop()
            o.granted = o.input_pending = True
            link.write(o.tag << _WR_KIND | _WR_INPUT, e.in_views, pl[0], slot * pl[2])
        klass = self.router.tenant_class(e.tenant)
        msg = JobMsg(o.tag, job.op, job.dtype, job.size, job.batch, job.iterations, job.early_stop,
                     job.scaling, e.aq.priority, in_len, 0, o.out_key, e.out_len, slot, o.announced > 0,
                     e.tenant or "", klass)
        self.sent[o.tag] = o
        o.sent_at = self.clock()
        o.nbytes = in_len + e.out_len
        o.deadline = o.sent_at + self.job_timeout
        self._sends += 1
        if len(self._last_send) > 4096 and o.guest not in self._last_send:
            self._last_send.clear()  # devices come and go: forget the long gone
        self._last_send[o.guest] = self._sends
        link.send(o.tag << _WR_KIND | _WR_JOB, msg.encode())
        self.metrics.jobs_sent += 1

    def _dispatch(self) -> None:
        while self.backlog and len(self.sent) < self.link.peer_credits and self.link.state is LinkState.UP:
            self._send(self.backlog.popleft(self._turn_key()))

    def next_deadline(self) -> float | None:
        """When the oldest job on the peer times out (None: none is there)."""
        ds = [o.deadline for o in self.sent.values() if not o.abandoned]
        return min(ds) if ds else None

    def on_timer(self, now: float) -> None:
        """Give back the jobs the peer has held past the job timeout. Each stays
        counted on the peer (its credit, its landing slot) until its result
        comes, and its output window is a sink from now on."""
        for o in list(self.sent.values()):
            if o.abandoned or o.deadline > now:
                continue
            log.warning("peer %s: job %d unanswered after %.1f s: given back", self.link.peer, o.tag,
                        self.job_timeout)
            o.abandoned = True
            self.link.sink_window(o.out_key)
            self.metrics.jobs_timed_out += 1
            self.metrics.jobs_given_back += 1
            o.entry.remote = None
            settle(o.entry, AccelStatus.REMOTE_FAILED)

    def _turn_key(self) -> Callable[[int], tuple[int, int]]:
        """Whose job goes next: the guest with the fewest jobs on the peer, then the
        one served longest ago."""
        on_peer = Counter(o.guest for o in self.sent.values())
        last = self._last_send
        return lambda g: (on_peer[g], last.get(g, 0))

    def _result(self, r: ResultMsg) -> None:
        o = self.sent.pop(r.tag, None)
        if o is None:
            self.metrics.results_dropped += 1
            return
        self.link.table.close(o.out_key)
        if o.slot is not None:
            self.free_slots.append(o.slot)
        self._dispatch()
        if o.abandoned:
            return
        if o.input_pending:  # complete once the input WRITE is acknowledged too
            o.result = r
            self.unacked[o.tag] = o
            return
        self._complete(o, r)

    def _complete(self, o: _Out, r: ResultMsg) -> None:
        e = o.entry
        e.remote = None
        status = r.status
        if status is AccelStatus.SUCCESS and r.byte_len != e.out_len:
            log.warning("peer %s: job %d reports %d bytes written, %d expected", self.link.peer, r.tag,
                        r.byte_len, e.out_len)
            status = AccelStatus.REMOTE_FAILED
        if status is AccelStatus.SUCCESS:
            self.metrics.jobs_done += 1
            d = self._dispatcher()
            if d is not None:
                d.job_done(self.host, o.nbytes,
                           self.clock() - o.sent_at - (r.wait_us + r.service_us) * 1e-6)
        elif status in (AccelStatus.REMOTE_FAILED, AccelStatus.NO_ACCELERATOR):
            self.metrics.jobs_given_back += 1
        settle(e, status, byte_len=r.byte_len, wait_us=r.wait_us, service_us=r.service_us,
               iterations=r.iterations, host=self.host)

    # --------------------------------------------------------- link callbacks
    def on_up(self, link: PeerLink) -> None:
        d = self._dispatcher()
        if d is not None:
            d.host_up(self.host)
        self.free_slots = list(range(link.peer_landing[1])) if link.peer_landing is not None else []
        log.info("peer host %d (%s) up: credits %d, accelerators %s", self.host, link.peer,
                 link.peer_credits, {AccelOp(o).name: i.units for o, i in link.peer_ops.items()})

    def on_down(self, link: PeerLink, reason: str) -> None:
        d = self._dispatcher()
        if d is not None:  # first: its jobs given back below are placed elsewhere
            d.host_down(self.host, f"its link went down ({reason})")
        for o in self.backlog:   # never sent: their announcement comes off
            self._unannounce(o)
        outs = list(self.sent.values()) + list(self.backlog)
        done = list(self.unacked.values())
        self.sent.clear()
        self.backlog.clear()
        self.unacked.clear()
        for o in done:  # their output is in place; the QP that read their input is gone
            if not o.abandoned and o.result is not None:
                self._complete(o, o.result)
        self.free_slots = []
        if self._landing is not None:
            self._new_landing()
        for o in outs:
            if o.abandoned:
                continue
            o.entry.remote = None
            self.metrics.jobs_given_back += 1
            settle(o.entry, AccelStatus.REMOTE_FAILED)
        for s in self.draining.values():
            self._release(s)
        self.draining.clear()
        served, self.served = list(self.served.values()), {}
        for s in served:
            if s.job is None:  # its input never came (GO): it never starts
                self._release(s)
            elif self.router.local is not None and self.router.local.cancel(s.job):
                self.router.forget(s.job)
                self._release(s)
            # else it runs: _finished finds it gone from self.served and drops its output

    def on_message(self, link: PeerLink, data: bytes) -> None:
        try:
            msg = decode_link(data)
        except PeerWireError as e:
            self._protocol_error(f"malformed message: {e}")
            return
        if isinstance(msg, ResultMsg):
            self._result(msg)
        elif isinstance(msg, GrantMsg):
            self._granted(msg)
        elif isinstance(msg, GoMsg):
            self._go(msg)
        else:
            self._serve(msg)

    def _granted(self, g: GrantMsg) -> None:
        """The peer took the job: WRITE the input into its window, then GO."""
        o = self.sent.get(g.tag)
        if o is None or o.granted:
            self._protocol_error(f"grant for job {g.tag}, which {'has one' if o else 'is not outstanding'}")
            return
        o.granted = True
        link = self.link
        # abandoned (its device went): nothing is read from the guest; the peer runs on zeros
        if not o.abandoned:
            o.input_pending = True
            link.write(g.tag << _WR_KIND | _WR_INPUT, o.entry.in_views, g.rkey, 0)
        link.send(g.tag << _WR_KIND | _WR_GO, GoMsg(g.tag).encode())
        link.kick(self.clock())

    def _protocol_error(self, what: str) -> None:
        self.metrics.bad_messages += 1
        log.warning("peer %s: %s: failing the link", self.link.peer, what)
        self.link.fail(what, self.clock())

    def on_send_done(self, link: PeerLink, wr_id: int, status: WcStatus) -> None:
        kind, tag = wr_id & ((1 << _WR_KIND) - 1), wr_id >> _WR_KIND
        if kind == _WR_INPUT and status is WcStatus.SUCCESS:
            o = self.sent.get(tag) or self.unacked.get(tag)
            if o is not None:
                o.input_pending = False
                if o.result is not None:
                    del self.unacked[tag]
                    self._complete(o, o.result)
        elif kind == _WR_RESULT:  # acknowledged: so is the output WRITE before it
            s = self.draining.pop(tag, None)
            if s is not None:
                self._release(s)
        elif kind == _WR_PROBE:
            d = self._dispatcher()
            if d is not None:
                d.read_done(tag, status is WcStatus.SUCCESS)

    # ----------------------------------------------------------------- server
    def _refuse(self, tag: int, status: AccelStatus) -> None:
        if status is AccelStatus.INVALID_PARAMS:
            self.metrics.jobs_invalid += 1
        else:
            self.metrics.jobs_refused += 1
        self.link.send(tag << _WR_KIND | _WR_RESULT, ResultMsg(tag, status).encode())
        self.link.kick(self.clock())

    def _serve(self, m: JobMsg) -> None:
        if m.tag in self.served or m.tag in self.draining:
            self._protocol_error(f"job tag {m.tag} reused while in flight")
            return
        d = self._dispatcher()
        if m.announced and d is not None:
            # its announcement comes off as it arrives: with its input in a landing slot it
            # is queued here at once; with a GRANT, its input is one round trip away
            d.landed(_as_accel_job(m))
        self._serve_checked(m)

    def _serve_checked(self, m: JobMsg) -> None:
        link = self.link
        spec = _as_accel_job(m)
        try:
            check_params(spec)
        except InvalidInput as ex:
            log.debug("peer %s job %d: %s", link.peer, m.tag, ex)
            self._refuse(m.tag, AccelStatus.INVALID_PARAMS)
            return
        in_need, k_out, out_need = need_bytes(spec)
        if m.in_len != in_need or m.out_len != out_need:
            self._refuse(m.tag, AccelStatus.INVALID_PARAMS)
            return
        local = self.router.local
        if local is None or not local.units(m.op):
            self._refuse(m.tag, AccelStatus.NO_ACCELERATOR)
            return
        fft = m.op in (AccelOp.FFT, AccelOp.IFFT)
        nbytes = in_need + (0 if fft else k_out + m.batch)
        if (len(self.served) >= self.credits or self.staging + nbytes > MAX_STAGING_BYTES
                or not self.router.accept_remote):  # full, or draining (vrdma ctl drain)
            self._refuse(m.tag, AccelStatus.REMOTE_FAILED)
            return
        if m.slot != NO_SLOT:
            self._serve_landed(m, spec, in_need, k_out)
            return
        s = _Served(self, m, spec)
        # zeroed: a peer that says GO without writing finds zeros, never another job's bytes
        if fft:  # in place
            s.x = s.y = np.zeros(in_need // NP_DTYPE[m.dtype].itemsize, dtype=NP_DTYPE[m.dtype])
        elif m.op is AccelOp.TURBO_ENCODE:
            s.x = np.zeros(in_need, dtype=np.uint8)
            s.y = np.empty(k_out, dtype=np.uint8)
        else:
            s.x = np.zeros(in_need // 4, dtype=np.float32)
            s.y = np.empty(k_out, dtype=np.uint8)
            s.its = np.zeros(m.batch, dtype=np.uint8)
        s.bytes = nbytes
        self.staging += nbytes
        self.served[m.tag] = s
        s.in_key = link.table.open([s.x.view(np.uint8).data], Access.REMOTE_WRITE)
        self.metrics.jobs_granted += 1
        link.send(m.tag << _WR_KIND | _WR_GRANT, GrantMsg(m.tag, s.in_key).encode())
        link.kick(self.clock())

    def _serve_landed(self, m: JobMsg, spec: AccelJob, in_need: int, k_out: int) -> None:
        """A job whose input the peer wrote into landing slot ``m.slot`` ahead of it:
        run it on the slot in place (the slot is this peer's alone: nothing of
        another peer's is ever there)."""
        slot = m.slot
        if self._landing is None or slot >= LANDING_SLOTS or slot in self._busy_slots \
                or in_need > self._slot_bytes:
            self._protocol_error(f"job {m.tag} names landing slot {slot}, which is not free for "
                                 f"{in_need} bytes")
            return
        s = _Served(self, m, spec)
        s.slot = slot
        self._busy_slots.add(slot)
        raw = self._landing[slot * self._slot_bytes:slot * self._slot_bytes + in_need]
        if m.op in (AccelOp.FFT, AccelOp.IFFT):
            s.x = s.y = raw.view(NP_DTYPE[m.dtype])
        else:
            s.x = raw if m.op is AccelOp.TURBO_ENCODE else raw.view(np.float32)
            s.y = np.empty(k_out, dtype=np.uint8)
            if m.op is AccelOp.TURBO_DECODE:
                s.its = np.zeros(m.batch, dtype=np.uint8)
            s.bytes = k_out + m.batch
            self.staging += s.bytes
        self.served[m.tag] = s
        self.metrics.jobs_landed += 1
        self._run(s)

    def _free_slot(self, s: _Served) -> None:
        if s.slot is not None and s.epoch == self.link.epoch:  # else its slot went with an earlier life
            self._busy_slots.discard(s.slot)
        s.slot = None

    def _new_landing(self) -> None:
        """Fresh landing memory for the next life of the link (``link.epoch``): a
        job of the last one still running keeps its own slot (its view keeps that
        memory), and nothing written into the new slots can reach it."""
        self._landing = np.zeros(LANDING_SLOTS * self._slot_bytes, dtype=np.uint8)  # lazily zeroed pages
        self.link.landing = (self._landing.data, LANDING_SLOTS, LANDING_SLOT_KIB)
        self._busy_slots = set()

    def _go(self, g: GoMsg) -> None:
        """The peer's input is in the staging window (RC order): close it, run the job."""
        s = self.served.get(g.tag)
        if s is None or not s.in_key:
            self._protocol_error(f"GO for job {g.tag}, which is not waiting for its input")
            return
        self.link.table.close(s.in_key)
        s.in_key = 0
        self._run(s)

    def _run(self, s: _Served) -> None:
        """The input is here: run the job on this host's accelerators."""
        m = s.msg
        local = self.router.local
        assert local is not None and s.x is not None and s.y is not None
        try:
            job = make_job(CORE_OP[m.op], s.spec, s.x, s.y, guest_id=self._tenant_gid(m),
                           priority=min(m.priority, MAX_PRIORITY))
        except InvalidInput:
            self._drop_served(s, AccelStatus.INVALID_PARAMS)
            return
        s.job = job
        self.router.track(job, s)
        try:
            local.submit(job)
        except AccelError:
            self.router.forget(job)
            self._drop_served(s, AccelStatus.NO_ACCELERATOR)
            return
        self.router.load_changed()

    def _tenant_gid(self, m: JobMsg) -> int:
        """The local share a peer's job runs in: one per (peer, tenant), classed by the
        router with the job's class capped by this host's entry for the peer (bounded:
        past MAX_PEER_TENANTS a peer's further tenants share its own guest id)."""
        if not m.tenant or self.router.ledger is None:
            return self.guest_id
        gid = self.tenant_gids.get(m.tenant)
        if gid is None:
            if len(self.tenant_gids) >= MAX_PEER_TENANTS:
                return self.guest_id
            gid = self.tenant_gids[m.tenant] = self.router.new_guest_id()
        self.router.remote_tenant(gid, self.name, m.tenant, m.klass)
        return gid

    def _drop_served(self, s: _Served, status: AccelStatus) -> None:
        del self.served[s.msg.tag]
        self._free_slot(s)
        self._release(s)
        self._refuse(s.msg.tag, status)

    def _finished(self, s: _Served, job: Job) -> None:
        """The local service finished a peer's job (AccelRouter.deliver)."""
        m = s.msg
        link = self.link
        if self.served.get(m.tag) is not s or link.state is not LinkState.UP:
            self._release(s)  # the link failed meanwhile: nobody waits for it
            return
        if job.state is not JobState.DONE:
            self._drop_served(s, AccelStatus.INVALID_PARAMS if job.state is JobState.FAILED
                              and isinstance(job.error, InvalidInput) else AccelStatus.REMOTE_FAILED)
            return
        wait, service = job_times_us(job)
        if self.router.accounting is not None:  # run here for the peer's tenant
            self.router.accounting.record_job(f"{m.tenant or '-'}@{self.name}", m.op.name.lower(), "served",
                                              True, service / 1e6, wait / 1e6)
        assert s.y is not None
        views = [s.y.view(np.uint8).data]
        its = 0
        if m.op is AccelOp.TURBO_DECODE:
            used = np.atleast_1d(np.asarray(job.result, dtype=np.int64))
            assert s.its is not None
            s.its[:] = np.minimum(used, 255)
            views.append(s.its.data)
            its = int(used.max()) if used.size else 0
        # the output straight into the guest's buffer, then the result behind it (RC order)
        link.write(m.tag << _WR_KIND | _WR_OUTPUT, views, m.out_rkey, m.out_va, signaled=False)
        link.send(m.tag << _WR_KIND | _WR_RESULT,
                  ResultMsg(m.tag, AccelStatus.SUCCESS, m.out_len, wait, service, its).encode())
        # the peer may send its next job as soon as it has the result: the credit (and the
        # slot: the output WRITE is placed there before the result arrives) is back now
        del self.served[m.tag]
        self._free_slot(s)
        self.draining[m.tag] = s
        self.metrics.jobs_served += 1
        link.kick(self.clock())

    def _release(self, s: _Served) -> None:
        self.staging -= s.bytes
        s.bytes = 0
        s.x = s.y = s.its = None

    def describe(self) -> dict:
        return {"host": self.host, "remote_queue": len(self.backlog), "in_flight": len(self.sent),
                "serving": len(self.served) + len(self.draining), "staging_bytes": self.staging,
                "link": self.link.describe(), **self.metrics.as_dict()}
