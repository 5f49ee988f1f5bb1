"""Context: one process guest's virtio-rdma device, opened by socket path.

Opening a Context connects to the back-end daemon as a vhost-user front-end
(the virtio-user pattern), shares a memfd of guest memory with it, sets up
the three virtqueues of the device (controlq, doorbellq, eventq; see
docs/virtio-rdma.md) and reads the device's config space. Every buffer the
device must reach (MRs, work queue and completion rings, doorbell records)
is allocated from that shared memory.

Daemon death: the device is only as alive as the daemon behind the socket.
Every wait (control commands, doorbell buffers, CQ and async events) sleeps
on the socket too and fails at once when the daemon goes away; calls that
never sleep (``CQ.poll`` on an empty ring, posts) look at the socket at most
once per :data:`LIVENESS_INTERVAL`. Either way the error is
``RDMAError`` with errno ``ENOTCONN`` (and so is every call after it, on any
object of the Context), never a hang. Completions already in a CQ's ring can
still be polled. ``close()`` of a dead Context skips the destroy commands
(the daemon's state went with the connection) and releases every fd and
mapping; a new Context opens on a restarted daemon at the same path.
"""
from __future__ import annotations

import collections
import errno
import types
from time import monotonic

from guest_lib.base import VerbsObject
from guest_lib.errors import RDMAError, UserError
from vhost_user.errors import TransportError, VhostUserError
from vhost_user.frontend import VirtioUserDevice
from virtio_rdma import wire
from virtio_rdma.constants import CONTROLQ, DOORBELLQ, EVENTQ, Cmd, EventKind, Feature, Status

REQ_BUF = 64 << 10
RESP_BUF = 4096
EVENT_BUF = 8 * wire.EVENT_SIZE  # 8 records
N_EVENT_BUFS = 64
DOORBELL_BUF = 8 * 64  # 64 records
N_DOORBELL_BUFS = 128
#: seconds between looks at the socket from calls that never sleep
LIVENESS_INTERVAL = 0.02


class GID:
    def __init__(self, raw: bytes):
        if len(raw) != 16:
            raise UserError(f"a GID is 16 bytes, got {len(raw)}")
        self.raw = bytes(raw)

    @property
    def gid(self) -> str:
        h = self.raw.hex()
        return ":".join(h[i : i + 4] for i in range(0, 32, 4))

    def __str__(self):
        return self.gid

    def __eq__(self, other):
        return isinstance(other, GID) and other.raw == self.raw

    def __hash__(self):
        return hash(self.raw)


class Context(VerbsObject):
    """Open the virtio-rdma device behind the back-end socket ``name``."""

    def __init__(self, name: str, *, mem_size: int = 64 << 20, queue_size: int = 256,
                 timeout: float | None = 10.0, hugetlb="auto"):
        super().__init__(None)
        self._next_check = 0.0  # monotonic time of the next liveness look (0: look at every call)
        self.name = name
        self.timeout = timeout
        features = (1 << Feature.INLINE_DATA) | (1 << Feature.ATOMIC) | (1 << Feature.DBREC_POLL)
        try:
            self.dev = VirtioUserDevice(name, mem_size=mem_size, num_queues=3, queue_size=queue_size,
                                        device_features=features, hugetlb=hugetlb, timeout=timeout)
        except (VhostUserError, OSError) as e:
            raise RDMAError(f"cannot open device at {name}: {e}", getattr(e, "errno", None) or errno.ENODEV) from e
        try:
            self.features = self.dev.features
            dev = self.dev
            #: the device may poll doorbell records: while it is polling (its
            #: doorbellq asks for no kicks) a post needs no doorbell at all
            self.dbrec_poll = bool(self.features & (1 << Feature.DBREC_POLL))
            self.doorbells_skipped = 0
            self.config = types.SimpleNamespace(**wire.decode_config(dev.get_config(0, wire.Config.sizeof())))
            self._req_gpa = dev.alloc(REQ_BUF, 4096)
            self._resp_gpa = dev.alloc(RESP_BUF, 64)
            self._req = dev.translate(self._req_gpa, REQ_BUF)
            self._resp = dev.translate(self._resp_gpa, RESP_BUF)
            # Doorbell buffers: completions are polled, never signalled.
            self._db_bufs = [dev.alloc(DOORBELL_BUF, 64) for _ in range(N_DOORBELL_BUFS)]
            self._db_free = list(self._db_bufs)
            dev.queues[DOORBELLQ].disable_cb()
            # Event buffers: posted once, re-posted after each use.
            self._ev_bufs = [dev.alloc(EVENT_BUF, 64) for _ in range(N_EVENT_BUFS)]
            for gpa in self._ev_bufs:
                dev.queues[EVENTQ].add([], [(gpa, EVENT_BUF)], gpa)
            dev.kick(EVENTQ)
            self.cq_events: collections.Counter = collections.Counter()
            self.async_events: collections.deque = collections.deque()
            self.qps: dict = {}
        except VhostUserError as e:
            self.dev.close()
            raise RDMAError(f"cannot open device at {name}: {e}", e.errno) from e
        except BaseException:
            self.dev.close()
            raise
        self._next_check = monotonic() + LIVENESS_INTERVAL

    # --- daemon liveness --------------------------------------------------
    @property
    def dead(self) -> bool:
        """Is the daemon behind this Context known to be gone?"""
        return self.dev.dead is not None

    def _gone(self, what: str, e: VhostUserError) -> RDMAError:
        """The RDMAError for a failure of the connection; once the daemon is
        known dead every later liveness check fails without a syscall."""
        if self.dev.dead is not None:
            self._next_check = 0.0
            return RDMAError(f"{what}: the device is gone ({self.dev.dead})", errno.ENOTCONN)
        return RDMAError(f"{what}: no answer from the device: {e}", e.errno)

    def check_alive(self, what: str = "device") -> None:
        """Raise RDMAError(ENOTCONN) if the daemon is gone (one poll(2) of
        the socket, none once it is known gone)."""
        self._check_open()
        self._next_check = monotonic() + LIVENESS_INTERVAL
        try:
            self.dev.check_alive()
        except VhostUserError as e:
            raise self._gone(what, e) from e

    def _destroy(self, cmd: Cmd, **fields) -> None:
        """A child's destroy command from its close(): skipped, and never an
        error, once the daemon is gone (its objects went with the connection)."""
        if self._closed or self.dev.dead is not None:
            return
        try:
            self.command(cmd, **fields)
        except RDMAError:
            if self.dev.dead is None:
                raise

    # --- memory -------------------------------------------------------
    def alloc(self, size: int, align: int = 64) -> tuple[int, memoryview]:
        """Zeroed guest memory the device can reach: (gpa, view)."""
        try:
            gpa = self.dev.alloc(size, align)
        except ValueError as e:
            raise UserError(str(e)) from e
        view = self.dev.translate(gpa, size)
        view[:] = bytes(size)
        return gpa, view

    def free(self, gpa: int) -> None:
        self.dev.free(gpa)

    def uva_of(self, gpa: int) -> int:
        return self.dev.uva_of(gpa)

    def view_of_uva(self, uva: int, length: int) -> memoryview:
        return self.dev.mem.translate(self.dev.mem.uva_to_gpa(uva, length), length)

    # --- control queue ------------------------------------------------
    def command(self, cmd: Cmd, **fields) -> dict | None:
        self._check_open()
        if self.dev.dead is not None:
            self._next_check = 0.0
            raise RDMAError(f"{cmd.name}: the device is gone ({self.dev.dead})", errno.ENOTCONN)
        try:
            req = wire.encode_request(cmd, **fields)
        except Exception as e:
            raise UserError(f"{cmd.name}: {e}") from e
        if len(req) > REQ_BUF:
            raise UserError(f"{cmd.name} request of {len(req)} bytes exceeds {REQ_BUF}")
        self._req[: len(req)] = req
        rsz = wire.response_size(cmd)
        q = self.dev.queues[CONTROLQ]
        q.add([(self._req_gpa, len(req))], [(self._resp_gpa, rsz)], cmd)
        self.dev.kick_if_needed(CONTROLQ)
        try:
            _, written = self.dev.wait_used(CONTROLQ, self.timeout)
        except VhostUserError as e:
            raise self._gone(cmd.name, e) from e
        status, body = wire.decode_response(cmd, self._resp[:written])
        if status != Status.OK:
            raise RDMAError(f"{cmd.name} failed", int(status))
        return body

    def query_device(self):
        return types.SimpleNamespace(**self.command(Cmd.QUERY_DEVICE))

    def query_port(self, port_num: int = 1):
        return types.SimpleNamespace(**self.command(Cmd.QUERY_PORT, port_num=port_num))

    def query_gid(self, port_num: int = 1, index: int = 0) -> GID:
        return GID(self.command(Cmd.QUERY_GID, port_num=port_num, index=index)["gid"])

    # --- doorbells ----------------------------------------------------
    def device_polling(self) -> bool:
        """With DBREC_POLL: is the device polling right now, so that a doorbell
        record already written will be seen without a doorbell? (The check
        is fenced; the device re-scans the records after it stops polling.)"""
        if monotonic() >= self._next_check:  # a polling daemon that died still "polls"
            self.check_alive("post")
        if self.dbrec_poll and self.dev.queues[DOORBELLQ].kick_suppressed():
            self.doorbells_skipped += 1
            return True
        return False

    def ring_doorbells(self, records: bytes) -> None:
        q = self.dev.queues[DOORBELLQ]
        for off in range(0, len(records), DOORBELL_BUF):
            chunk = records[off : off + DOORBELL_BUF]
            while True:
                used = q.get_used()
                if used is None:
                    break
                self._db_free.append(used[0])
            if not self._db_free:
                q.enable_cb()
                try:
                    token, _ = self.dev.wait_used(DOORBELLQ, self.timeout)
                except VhostUserError as e:
                    raise self._gone("doorbell", e) from e
                finally:
                    q.disable_cb()
                self._db_free.append(token)
            gpa = self._db_free.pop()
            self.dev.translate(gpa, len(chunk))[:] = chunk
            q.add([(gpa, len(chunk))], [], gpa)
        self.dev.kick_if_needed(DOORBELLQ)

    # --- events ---------------------------------------------------------
    def _take_events(self, timeout: float | None) -> bool:
        """Collect the event records the device has written; if there are
        none, wait up to ``timeout`` for the first. Re-posts the buffers
        and notifies the device once."""
        q = self.dev.queues[EVENTQ]
        item = q.get_used()
        if item is None:
            if timeout == 0:
                if monotonic() >= self._next_check:
                    self.check_alive("events")
                return False
            try:
                item = self.dev.wait_used(EVENTQ, timeout)
            except TransportError as e:
                if e.errno == errno.ETIMEDOUT and self.dev.dead is None:
                    return False
                raise self._gone("events", e) from e
            except VhostUserError as e:
                raise self._gone("events", e) from e
        while item is not None:
            gpa, written = item
            buf = self.dev.translate(gpa, written)
            for kind, _r, type_, number in wire.iter_event_records(buf[:written]):
                if kind == EventKind.COMPLETION:
                    self.cq_events[number] += 1
                else:
                    self.async_events.append((type_, number))
            q.add([], [(gpa, EVENT_BUF)], gpa)
            item = q.get_used()
        self.dev.kick_if_needed(EVENTQ)
        return True

    def get_async_event(self, timeout: float | None = None):
        """(ibv_event_type, object number) of the next async event, or None."""
        self._check_open()
        if not self.async_events:
            self._take_events(self.timeout if timeout is None else timeout)
        return self.async_events.popleft() if self.async_events else None

    def _release(self) -> None:
        for v in (self._req, self._resp):
            v.release()
        self.dev.close()
