"""How long the daemon busy-polls before it sleeps (``--poll-us``), adapted
to what polling buys on this machine, sans-I/O.

The back-end's busy-poll loop (:meth:`vhost_user.server.BackendServer._spin`)
keeps polling rings, doorbell records and the fabric's socket while work
keeps coming, and sleeps in the event loop once ``window`` seconds pass
without work. ``--poll-us US`` is the upper bound of that window. Within it,
the window adapts the way KVM's halt polling adapts ``halt_poll_ns``
(virt/kvm/kvm_main.c, grow_halt_poll_ns / shrink_halt_poll_ns):

* a sleep that ended (work arrived) sooner than the bound means polling a
  little longer would have caught that work without the wake-up: the window
  grows (doubled, from :data:`GROW_START`, up to the bound);
* a sleep longer than the bound, after a polling session that caught no
  work (nothing arrived while it polled: all it did was burn the CPU before
  sleeping anyway), shrinks the window (halved; below :data:`GROW_START`, to
  zero: sleep at once). A session that did catch work (e.g. the ACK of the
  request just sent) earned its window even if the sleep after it was long;
* a poll pass that took longer than :data:`PREEMPTED` (the loop yields the
  CPU after every empty pass, so this is the time another task held our
  CPU) means the CPU is shared with a task that does not give it back
  promptly, e.g. a guest spinning on its CQ without yielding. Polling then
  delays that task and is delayed by it; sleeping lets the scheduler's
  wake-up preemption run us as soon as work arrives. The window drops to
  zero and stays there for :data:`CONTENDED_HOLD`.

The daemon adapts with ``--poll-adaptive``; without it (``adaptive=False``)
the window stays ``--poll-us``. Times are ``monotonic()`` seconds passed in; nothing here reads
a clock or sleeps. Counters: :class:`SpinMetrics`.

Where the loop polls, :class:`CpuShare` (always on) watches its idle
``sched_yield`` calls. Beside a guest that polls its CQ with sched_yield a
yield gives the CPU back within a few microseconds; beside another busy
poller that does no such thing (measured on a 2-vCPU VM, Linux 6.18 EEVDF:
two daemons on one vCPU) a yield keeps the CPU from us for ~110 us, the
time the scheduler makes a yielder wait, and every packet between them
waits that long. The kernel's balancer sees two busy tasks per CPU as
balanced and never moves them (no migration in a run), so the loop moves
itself: when most of its recent idle yields were slow (more than
:data:`SLOW_YIELD`), it asks to run on another CPU it is allowed on (a
daemon pinned to one CPU stays). Two pollers that share a CPU may both
decide to move, and meet again: the hold before the next move is drawn at
random (up to :data:`MOVE_HOLD`), as is the number of yields judged at a
time (around :data:`SHARE_SAMPLE`), so one of them soon moves alone.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

#: the first non-zero window after a zero one (KVM's halt_poll_ns_grow_start is 10 us)
GROW_START = 10e-6
#: a poll pass longer than this was preempted by another task on our CPU
PREEMPTED = 500e-6
#: after a preempted pass, sleep at once (window 0) for this long
CONTENDED_HOLD = 0.05


@dataclass(slots=True)
class SpinMetrics:
    sleeps: int = 0        # the loop went to sleep (its window passed without work)
    caught: int = 0        # work found by a poll pass after an empty one (polling paid off)
    grows: int = 0         # a sleep ended within the bound: the window grew
    shrinks: int = 0       # a sleep outlasted the bound: the window shrank
    preempted: int = 0     # a poll pass outlasted PREEMPTED: window 0 for CONTENDED_HOLD

    def as_dict(self) -> dict:
        return asdict(self)


class SpinPolicy:
    """The busy-poll window of one daemon's loop (see the module doc).

    ``bound``: ``--poll-us`` in seconds (0: never poll). The loop asks
    :attr:`window` while idle and reports :meth:`pass_took` (each poll
    pass), :meth:`caught` (a pass found work after an empty one),
    :meth:`sleeping` (it goes to sleep) and :meth:`woken` (work woke it)."""

    __slots__ = ("bound", "adaptive", "window", "metrics", "_slept_at", "_contended_until",
                 "_caught", "_fruitless")

    def __init__(self, bound: float, adaptive: bool = True) -> None:
        if bound < 0:
            raise ValueError(f"poll window {bound!r} s is negative")
        self.bound = bound
        self.adaptive = adaptive
        #: seconds without work after which the loop sleeps
        self.window = bound
        self.metrics = SpinMetrics()
        self._slept_at: float | None = None
        self._contended_until = 0.0
        self._caught = False        # this polling session caught work
        self._fruitless = False     # the last session caught none

    def pass_took(self, seconds: float, now: float) -> None:
        """One poll pass (poll, then yield if idle) took ``seconds``."""
        if self.adaptive and seconds > PREEMPTED and self.bound > 0:
            self.metrics.preempted += 1
            self.window = 0.0
            self._contended_until = now + CONTENDED_HOLD

    def caught(self) -> None:
        """A poll pass found work after an empty pass: polling paid off."""
        self.metrics.caught += 1
        self._caught = True

    def sleeping(self, now: float) -> None:
        """The loop goes to sleep (no work for ``window``)."""
        self.metrics.sleeps += 1
        self._slept_at = now
        self._fruitless = not self._caught
        self._caught = False

    def woken(self, now: float) -> None:
        """Work arrived and the loop starts polling again."""
        slept_at, self._slept_at = self._slept_at, None
        if slept_at is None or not self.adaptive or self.bound <= 0:
            return
        if now < self._contended_until:
            return
        slept = now - slept_at
        if slept <= self.bound:
            if self.window < self.bound:
                self.metrics.grows += 1
                self.window = min(self.bound, max(GROW_START, self.window * 2))
        elif self.window > 0 and self._fruitless:
            self.metrics.shrinks += 1
            self.window = self.window / 2 if self.window / 2 >= GROW_START else 0.0


#: an idle sched_yield that kept the CPU from the loop longer than this was slow
SLOW_YIELD = 50e-6
#: idle yields judged at a time (drawn between half and one and a half times this)
SHARE_SAMPLE = 64
#: at most seconds between two moves (each hold drawn between a tenth of this and this)
MOVE_HOLD = 0.2


@dataclass(slots=True)
class ShareMetrics:
    slow_yields: int = 0   # idle yields longer than SLOW_YIELD
    moves: int = 0         # the loop moved to another CPU (a verdict not carried out is taken back)

    def as_dict(self) -> dict:
        return asdict(self)


class CpuShare:
    """Whether the busy-poll loop should move to another CPU (see the module
    doc). The loop reports each idle ``sched_yield`` with :meth:`yielded`;
    True means: move now. ``rng``: the source of the sample sizes."""

    __slots__ = ("metrics", "_rng", "_n", "_slow", "_need", "_hold_until")

    def __init__(self, rng: random.Random | None = None) -> None:
        self.metrics = ShareMetrics()
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (sample sizes)
        self._n = self._slow = 0
        self._need = self._draw()
        self._hold_until = 0.0

    def _draw(self) -> int:
        return self._rng.randint(SHARE_SAMPLE // 2, SHARE_SAMPLE * 3 // 2)

    def yielded(self, seconds: float, now: float) -> bool:
        """An idle sched_yield kept the CPU from the loop for ``seconds``."""
        self._n += 1
        if seconds > SLOW_YIELD:
            self._slow += 1
            self.metrics.slow_yields += 1
        if self._n < self._need:
            return False
        move = 2 * self._slow > self._n and now >= self._hold_until
        self._n = self._slow = 0
        self._need = self._draw()
        if move:
            self.metrics.moves += 1
            self._hold_until = now + self._rng.uniform(MOVE_HOLD / 10, MOVE_HOLD)
        return move
