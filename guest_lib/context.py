"""Context: one guest's virtio-rdma device, reached through a virtio transport.

A Context drives the device's three virtqueues (controlq, doorbellq, eventq;
docs/virtio-rdma.md) and reads its config space through a
:class:`~guest_lib.transport.VirtioTransport` (docs/guest-transport.md), and
nothing else. ``Context(path)`` opens the vhost-user transport: it connects
to the back-end daemon as a vhost-user front-end (the virtio-user pattern)
and shares a memfd of guest memory with it. ``Context(transport=t)`` takes
any opened transport instead (and owns it from then on). Every buffer the
device must reach (MRs, work queue and completion rings, doorbell records)
is allocated from the transport's memory.

Daemon death: the device is only as alive as the daemon behind the socket
(or, for other transports, the device behind them). Every wait (control
commands, doorbell buffers, CQ and async events) is the transport's
``wait_used``, which fails at once when the device goes away; calls that
never sleep (``CQ.poll`` on an empty ring, posts) ask the transport's
``check_alive`` at most once per :data:`LIVENESS_INTERVAL`. Either way the error is
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
from guest_lib.transport import NUM_QUEUES, TransportError, VirtioTransport, WaitTimeout, missing_members
from guest_lib.transports.vhost_user import VhostUserTransport
from guest_lib.transports.virtio_mmio import VirtioMmioTransport
from guest_lib.transports.virtio_pci import VirtioPciTransport
from verbs import UnknownValueError
from virtio_rdma import wire
from virtio_rdma.constants import CONTROLQ, DOORBELLQ, EVENTQ, AccelOp, Cmd, EventKind, Feature, Status

REQ_BUF = 64 << 10
RESP_BUF = 4096
EVENT_BUF = 8 * wire.EVENT_SIZE  # 8 records
N_EVENT_BUFS = 64
DOORBELL_BUF = 8 * 64  # 64 records
N_DOORBELL_BUFS = 128
#: ``Context("pci:auto")``, ``Context("pci:0000:00:04.0")``: the virtio-rdma PCI
#: function inside a QEMU guest (guest_lib.transports.virtio_pci), found by its
#: config magic ("auto": the first)
PCI_PREFIX = "pci:"
#: ``Context("mmio:auto")``, ``Context("mmio:0xfeb00e00")``: the virtio-rdma
#: virtio-mmio block inside a QEMU microvm guest (guest_lib.transports.virtio_mmio),
#: found by its config magic ("auto": the first)
MMIO_PREFIX = "mmio:"
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
    """Open the virtio-rdma device behind the back-end socket ``name`` (or,
    ``"pci:auto"`` / ``"pci:<address>"``, its PCI function in a QEMU guest;
    ``"mmio:auto"`` / ``"mmio:<base>"``, its virtio-mmio block in a microvm), or
    drive the already opened ``transport`` (any
    :class:`~guest_lib.transport.VirtioTransport`). A transport that passes
    the argument checks belongs to the Context from then on: it closes it,
    also when this constructor fails later. ``mem_size``, ``queue_size`` and
    ``hugetlb`` are the vhost-user transport's (unused with ``transport``;
    with ``pci:`` and ``mmio:``, ``mem_size`` is the huge-page memory)."""

    def __init__(self, name: str | None = None, *, transport: VirtioTransport | None = None,
                 mem_size: int = 64 << 20, queue_size: int = 256, timeout: float | None = 10.0,
                 hugetlb="auto"):
        super().__init__(None)
        self._next_check = 0.0  # monotonic time of the next liveness look (0: look at every call)
        self.timeout = timeout
        t: VirtioTransport
        if transport is None:
            if name is None:
                raise UserError("Context needs a device: a vhost-user socket path or transport=")
            try:
                if name.startswith(PCI_PREFIX):  # a virtio-pci function inside a guest
                    t = VirtioPciTransport(name[len(PCI_PREFIX):] or "auto", mem_size=mem_size,
                                           queue_size=queue_size, timeout=timeout)
                elif name.startswith(MMIO_PREFIX):  # a virtio-mmio block inside a microvm guest
                    t = VirtioMmioTransport(name[len(MMIO_PREFIX):] or "auto", mem_size=mem_size,
                                            queue_size=queue_size, timeout=timeout)
                else:
                    t = VhostUserTransport(name, mem_size=mem_size, queue_size=queue_size,
                                           hugetlb=hugetlb, timeout=timeout)
            except TransportError as e:
                raise RDMAError(f"cannot open device at {name}: {e}", e.errno) from e
        else:
            if name is not None:
                raise UserError(f"Context takes a socket path ({name!r}) or a transport, not both")
            missing = missing_members(transport)
            if missing:
                raise UserError(f"transport {transport!r} is not a VirtioTransport: "
                                f"it has no {', '.join(missing)}")
            t, name = transport, transport.name
        self.name = name
        self.transport = t
        try:
            if len(t.queues) < NUM_QUEUES:
                raise UserError(f"transport {name} has {len(t.queues)} queues, the device needs {NUM_QUEUES}")
            self.features = t.features
            #: the device may poll doorbell records: while it is polling (its
            #: doorbellq asks for no kicks) a post needs no doorbell at all
            self.dbrec_poll = bool(self.features & (1 << Feature.DBREC_POLL))
            self.doorbells_skipped = 0
            # bound once: what the data path calls per operation
            self._translate, self._uva_to_gpa = t.translate, t.uva_to_gpa
            self._notify_if_needed = t.notify_if_needed
            self._dbq = t.queues[DOORBELLQ]
            self._db_kick_suppressed = self._dbq.kick_suppressed
            self.config = types.SimpleNamespace(**wire.decode_config(t.get_config(0, wire.Config.sizeof())))
            self._req_gpa = t.alloc(REQ_BUF, 4096)
            self._resp_gpa = t.alloc(RESP_BUF, 64)
            self._req = t.translate(self._req_gpa, REQ_BUF)
            self._resp = t.translate(self._resp_gpa, RESP_BUF)
            # Doorbell buffers: completions are polled, never signalled.
            self._db_bufs = [t.alloc(DOORBELL_BUF, 64) for _ in range(N_DOORBELL_BUFS)]
            self._db_free = list(self._db_bufs)
            self._dbq.disable_cb()
            # Event buffers: posted once, re-posted after each use.
            self._ev_bufs = [t.alloc(EVENT_BUF, 64) for _ in range(N_EVENT_BUFS)]
            for gpa in self._ev_bufs:
                t.queues[EVENTQ].add([], [(gpa, EVENT_BUF)], gpa)
            t.notify(EVENTQ)
            self.cq_events: collections.Counter = collections.Counter()
            self.async_events: collections.deque = collections.deque()
            self.qps: dict = {}
            #: accelerator queues by AQN (guest_lib.aq), for CQ.poll
            self.aqs: dict = {}
            #: guest_lib.accel's AccelHelper (PD, staging MR, CQ, AQs), made on first use
            self.accel_helper: VerbsObject | None = None
        except TransportError as e:
            t.close()
            raise RDMAError(f"cannot open device at {name}: {e}", e.errno) from e
        except BaseException:
            t.close()
            raise
        self._next_check = monotonic() + LIVENESS_INTERVAL

    # --- daemon liveness --------------------------------------------------
    @property
    def dead(self) -> bool:
        """Is the daemon behind this Context known to be gone?"""
        return self.transport.dead is not None

    def _gone(self, what: str, e: TransportError) -> RDMAError:
        """The RDMAError for a failure of the transport; once the device is
        known gone every later liveness check fails without a syscall."""
        dead = self.transport.dead
        if dead is not None:
            self._next_check = 0.0
            return RDMAError(f"{what}: the device is gone ({dead})", errno.ENOTCONN)
        return RDMAError(f"{what}: no answer from the device: {e}", e.errno)

    def check_alive(self, what: str = "device") -> None:
        """Raise RDMAError(ENOTCONN) if the daemon is gone (one look by the
        transport, e.g. a poll(2) of the vhost-user socket; none once it is
        known gone)."""
        self._check_open()
        self._next_check = monotonic() + LIVENESS_INTERVAL
        try:
            self.transport.check_alive()
        except TransportError as e:
            raise self._gone(what, e) from e

    def _destroy(self, cmd: Cmd, **fields) -> None:
        """A child's destroy command from its close(): skipped, and never an
        error, once the daemon is gone (its objects went with the connection)."""
        if self._closed or self.transport.dead is not None:
            return
        try:
            self.command(cmd, **fields)
        except RDMAError:
            if self.transport.dead is None:
                raise

    # --- memory -------------------------------------------------------
    def alloc(self, size: int, align: int = 64) -> tuple[int, memoryview]:
        """Zeroed guest memory the device can reach: (gpa, view)."""
        try:
            gpa = self.transport.alloc(size, align)
        except ValueError as e:
            raise UserError(str(e)) from e
        view = self._translate(gpa, size)
        view[:] = bytes(size)
        return gpa, view

    def free(self, gpa: int) -> None:
        self.transport.free(gpa)

    def alloc_mr(self, size: int, align: int = 4096) -> tuple[int, memoryview, list[tuple[int, int]]]:
        """Zeroed memory for an MR: (driver address, view, page list of
        (device address, length) chunks). Through the transport's optional
        ``alloc_mr`` (contiguous only virtually: one chunk per physically
        contiguous piece), else one :meth:`alloc` (one chunk)."""
        am = getattr(self.transport, "alloc_mr", None)
        if am is None:
            gpa, view = self.alloc(size, align)
            return self.uva_of(gpa), view, [(gpa, size)]
        try:
            uva, view, chunks = am(size, align)
        except ValueError as e:
            raise UserError(str(e)) from e
        view[:] = bytes(size)
        return uva, view, chunks

    def free_mr(self, uva: int, gpa: int) -> None:
        """Give back :meth:`alloc_mr`'s memory (``gpa``: its first chunk)."""
        fm = getattr(self.transport, "free_mr", None)
        if fm is None:
            self.transport.free(gpa)
        else:
            fm(uva)

    def uva_of(self, gpa: int) -> int:
        return self.transport.uva_of(gpa)

    def view_of_uva(self, uva: int, length: int) -> memoryview:
        vo = getattr(self.transport, "view_of_uva", None)
        if vo is not None:  # the range may cross physically separate pieces of an MR
            return vo(uva, length)
        return self._translate(self._uva_to_gpa(uva, length), length)

    # --- control queue ------------------------------------------------
    def command(self, cmd: Cmd, **fields) -> dict:
        self._check_open()
        t = self.transport
        if t.dead is not None:
            self._next_check = 0.0
            raise RDMAError(f"{cmd.name}: the device is gone ({t.dead})", errno.ENOTCONN)
        try:
            req = wire.encode_request(cmd, **fields)
        except Exception as e:
            raise UserError(f"{cmd.name}: {e}") from e
        if len(req) > REQ_BUF:
            raise UserError(f"{cmd.name} request of {len(req)} bytes exceeds {REQ_BUF}")
        self._req[: len(req)] = req
        rsz = wire.response_size(cmd)
        t.queues[CONTROLQ].add([(self._req_gpa, len(req))], [(self._resp_gpa, rsz)], cmd)
        self._notify_if_needed(CONTROLQ)
        try:
            _, written = t.wait_used(CONTROLQ, self.timeout)
        except TransportError as e:
            raise self._gone(cmd.name, e) from e
        status, body = wire.decode_response(cmd, self._resp[:written])
        if status != Status.OK:
            raise RDMAError(f"{cmd.name} failed", int(status))
        assert body is not None  # decode_response gives a body with every OK status
        return body

    def query_device(self):
        return types.SimpleNamespace(**self.command(Cmd.QUERY_DEVICE))

    def query_port(self, port_num: int = 1):
        return types.SimpleNamespace(**self.command(Cmd.QUERY_PORT, port_num=port_num))

    def query_gid(self, port_num: int = 1, index: int = 0) -> GID:
        return GID(self.command(Cmd.QUERY_GID, port_num=port_num, index=index)["gid"])

    @property
    def has_accel(self) -> bool:
        """Does the device offer accelerator queues (VIRTIO_RDMA_F_ACCEL)?"""
        return bool(self.features & (1 << Feature.ACCEL))

    def query_accel(self) -> list[types.SimpleNamespace]:
        """The operations the device's accelerators run (QUERY_ACCEL): one
        namespace per op with the fields of ``virtio_rdma_accel_op_info``
        (``op`` an AccelOp). RDMAError EOPNOTSUPP without
        VIRTIO_RDMA_F_ACCEL."""
        r = self.command(Cmd.QUERY_ACCEL)
        out = []
        for info in r["ops"][: r["num_ops"]]:
            if not info["op"]:
                continue
            d = dict(info)
            try:
                d["op"] = AccelOp.parse(info["op"])
            except UnknownValueError:
                pass  # an op this library does not know: reported as its number
            out.append(types.SimpleNamespace(**d))
        return out

    # --- doorbells ----------------------------------------------------
    def device_polling(self) -> bool:
        """With DBREC_POLL: is the device polling right now, so that a doorbell
        record already written will be seen without a doorbell? (The check
        is fenced; the device re-scans the records after it stops polling.)"""
        if monotonic() >= self._next_check:  # a polling daemon that died still "polls"
            self.check_alive("post")
        if self.dbrec_poll and self._db_kick_suppressed():
            self.doorbells_skipped += 1
            return True
        return False

    def ring_doorbells(self, records: bytes) -> None:
        q = self._dbq
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
                    token, _ = self.transport.wait_used(DOORBELLQ, self.timeout)
                except TransportError as e:
                    raise self._gone("doorbell", e) from e
                finally:
                    q.disable_cb()
                self._db_free.append(token)
            gpa = self._db_free.pop()
            self._translate(gpa, len(chunk))[:] = chunk
            q.add([(gpa, len(chunk))], [], gpa)
        self._notify_if_needed(DOORBELLQ)

    # --- events ---------------------------------------------------------
    def _take_events(self, timeout: float | None) -> bool:
        """Collect the event records the device has written; if there are
        none, wait up to ``timeout`` for the first. Re-posts the buffers
        and notifies the device once."""
        t = self.transport
        q = t.queues[EVENTQ]
        item = q.get_used()
        if item is None:
            if timeout == 0:
                if monotonic() >= self._next_check:
                    self.check_alive("events")
                return False
            try:
                item = t.wait_used(EVENTQ, timeout)
            except WaitTimeout as e:
                if t.dead is None:
                    return False
                raise self._gone("events", e) from e
            except TransportError as e:
                raise self._gone("events", e) from e
        while item is not None:
            gpa, written = item
            buf = self._translate(gpa, written)
            for kind, _r, type_, number in wire.iter_event_records(buf[:written]):
                if kind == EventKind.COMPLETION:
                    self.cq_events[number] += 1
                else:
                    self.async_events.append((type_, number))
            q.add([], [(gpa, EVENT_BUF)], gpa)
            item = q.get_used()
        self._notify_if_needed(EVENTQ)
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
        self.transport.close()
