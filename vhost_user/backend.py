"""The vhost-user back-end's message dispatcher: one connection's protocol state.

This is the front-end-to-back-end half of docs/interop/vhost-user.rst. The
dispatcher is sans-I/O: it takes decoded :class:`Message` objects (with their
fds) and returns the replies to send; it never reads or writes the socket.
Event-loop work (watching kick eventfds, polling rings without a kick fd) is
asked of a *watcher* the adapter supplies (:mod:`vhost_user.server`).

Checks happen in one place, before any handler runs: the request id is
known, the payload size and fd count fit the request, and the protocol
feature that gates it was negotiated. REPLY_ACK is handled here too. After
any protocol violation the connection is *broken*: the adapter closes it,
and every fd and mapping it held is released.

Ownership: the dispatcher owns the fds of every message handed to it. Fds a
handler keeps move to their owner (a Vring for eventfds; memory fds are
closed once mapped); every other fd is closed before :meth:`handle` returns.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field
from time import monotonic
from typing import Protocol

from vhost_user.device import VhostUserDevice
from vhost_user.endpoint import close_fds
from vhost_user.errors import DeviceError, MessageError, ProtocolError, VhostUserError
from vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigSpace,
    FrontendReq,
    MemRegionDesc,
    MemTable,
    Message,
    ProtocolFeature,
    SingleMemRegion,
    VringAddr,
    VringState,
    check_syntax,
    decode_u64,
    encode_u64,
    parse_request,
    reply_to,
)
from vhost_user.vring import Vring
from virtio.constants import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from virtio.errors import VirtioError
from virtio.memory import GuestMemory, MemoryRegion
from virtio.split import DeviceQueue

log = logging.getLogger(__name__)


def check_memory_fd(fd: int, desc: MemRegionDesc, *, require_seal: bool) -> None:
    """Refuse memory the front-end could pull from under us.

    Touching a shared mapping beyond the end of its file raises SIGBUS, which
    would kill the whole daemon. So the file must cover the region now, and
    (unless the operator allows unsealed memory, e.g. hugetlbfs files) must be
    a memfd sealed against shrinking, as QEMU's memory-backend-memfd is.
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError(f"memory fd for gpa {desc.gpa:#x}: fstat failed: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"memory fd for gpa {desc.gpa:#x} is not a regular file or memfd")
    if st.st_size < desc.mmap_offset + desc.size:
        raise ProtocolError(
            f"memory region gpa {desc.gpa:#x} size {desc.size:#x} at offset {desc.mmap_offset:#x} "
            f"extends past the end of its {st.st_size:#x}-byte file"
        )
    if require_seal:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ProtocolError(
                f"memory fd for gpa {desc.gpa:#x} is not sealed against shrinking (F_SEAL_SHRINK); "
                "start the back-end with unsealed memory allowed to accept it"
            )


def _not_an_eventfd(fd: int) -> str | None:
    """What ``fd`` is if it is not an eventfd (the only kind the spec passes for a
    ring's kick, call and error notifications), or None if it is one.

    Why it matters: a front-end could pass any fd, e.g. its own end of the vhost-user
    socket; held as a ring's call fd it keeps the connection open from the inside,
    so its EOF never arrives and the connection outlives the front-end. A regular
    file or /dev/null cannot even be watched by the event loop."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: tell the kinds fstat names (an eventfd is an anonymous inode)
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            return f"fstat failed: {e.strerror}"
        kind = stat.S_IFMT(mode)
        return None if kind == 0 else f"a file of type {kind:#o}"
    if target == "anon_inode:[eventfd]":
        return None
    return target


class Watcher(Protocol):
    """Event-loop services the dispatcher needs from its adapter."""

    def watch_kick(self, vring: Vring) -> None: ...  # start watching vring.kick_fd (or polling)

    def unwatch_kick(self, vring: Vring) -> None: ...  # stop watching / polling

    def call_soon(self, fn) -> None: ...  # run fn on the loop, after the current callback

    def call_later(self, delay: float, fn): ...  # run fn after delay seconds; returns a cancellable handle


@dataclass
class ConnectionMetrics:
    messages: int = 0
    replies: int = 0
    errors: int = 0
    kicks: int = 0
    budget_yields: int = 0  # a kick left work for a later loop iteration (device budget)
    by_request: dict = field(default_factory=dict)


class BackendConnection:
    """Protocol state of one front-end connection and its device instance."""

    def __init__(self, device: VhostUserDevice, watcher: Watcher, *, name: str = "conn",
                 require_sealed_memory: bool = True, poll_us: float = 0.0):
        self.device = device
        self.poll_s = poll_us * 1e-6
        self.require_sealed_memory = require_sealed_memory
        self.watcher = watcher
        self.name = name
        self.mem = GuestMemory()
        self.vrings = [Vring(i, device.max_queue_size) for i in range(device.num_queues)]
        self.offered_features = device.features() | VHOST_USER_F_PROTOCOL_FEATURES
        self.offered_protocol = ProtocolFeature(device.protocol_features)
        self.acked_features = 0
        self.protocol = ProtocolFeature(0)
        self.owner = False
        self.status = 0
        self.broken: VhostUserError | VirtioError | None = None
        self.closed = False
        self.metrics = ConnectionMetrics()
        #: rings the adapter's busy-poll loop serves (notifications off)
        self.spinning: set[int] = set()
        self._spin = getattr(watcher, "start_spin", None)
        self._device_poll = getattr(device, "poll", None)
        #: the device may leave buffers in a ring after one pass (a per-pass budget)
        self._budgeted = bool(getattr(device, "budgeted", False))
        device.attach(self)

    # ------------------------------------------------------------------
    def handle(self, msg: Message) -> list[Message]:
        """Handle one message; return the replies to send (possibly none).

        Raises VhostUserError/VirtioError when the connection must be closed;
        the replies that must still go out (a REPLY_ACK failure) are attached
        to the exception as ``.replies``.
        """
        fds = list(msg.fds)
        msg.fds = fds
        self.metrics.messages += 1
        try:
            if self.broken is not None:
                raise ProtocolError(f"connection is broken ({self.broken}); no further requests")
            if msg.is_reply:
                raise MessageError(f"front-end sent a message with the reply flag (request {msg.request})")
            request = parse_request(msg.request)
            self.metrics.by_request[request.name] = self.metrics.by_request.get(request.name, 0) + 1
            rule = check_syntax(request, len(msg.payload), len(fds))
            if rule.needs and not (self.protocol & rule.needs):
                raise ProtocolError(
                    f"{request.name} needs protocol feature {rule.needs.name}, which was not negotiated"
                )
        except (VhostUserError, VirtioError) as e:
            close_fds(fds)
            self._break(e)
            e.replies = []  # type: ignore[union-attr]  # what the adapter sends before it closes
            raise
        want_ack = msg.need_reply and bool(self.protocol & ProtocolFeature.REPLY_ACK) and not rule.replies
        handler = getattr(self, "_h_" + request.name.lower())
        try:
            reply_payload = handler(msg)
        except DeviceError as e:
            # The device refused; the protocol is intact, the connection lives.
            self.metrics.errors += 1
            log.warning("%s: %s refused: %s", self.name, request.name, e)
            if request is FrontendReq.GET_CONFIG:
                return [reply_to(request, ConfigSpace(0, 0, 0, b"").encode())]
            return [reply_to(request, encode_u64(e.errno or 1))] if want_ack else []
        except (VhostUserError, VirtioError) as e:
            self._break(e)
            status = getattr(e, "errno", errno.EINVAL) or 1
            e.replies = [reply_to(request, encode_u64(status))] if want_ack else []  # type: ignore[union-attr]
            raise
        finally:
            # Whatever a handler did not take stays ours to close (once).
            close_fds(fds)
            fds.clear()
        replies = []
        if reply_payload is not None:
            replies.append(reply_to(request, reply_payload))
        elif want_ack:
            replies.append(reply_to(request, encode_u64(0)))
        self.metrics.replies += len(replies)
        return replies

    def _break(self, e) -> None:
        self.metrics.errors += 1
        if self.broken is None:
            self.broken = e
        log.warning("%s: protocol error, closing: %s", self.name, e)

    def _take_fd(self, msg: Message, i: int = 0) -> int:
        """Move fd i of msg out of the message (the caller now owns it)."""
        fd = msg.fds[i]
        msg.fds[i] = -1
        return fd

    def _vring(self, index: int, what: str) -> Vring:
        if index >= len(self.vrings):
            raise ProtocolError(
                f"{what}: ring index {index} out of range (device has {len(self.vrings)} queues)")
        return self.vrings[index]

    # ------------------------------------------------------------------
    # queue processing, called by the adapter
    def kick(self, index: int) -> None:
        """A kick (or a poll tick) for ring ``index``: process it if allowed."""
        vring = self.vrings[index]
        self.metrics.kicks += 1
        if not vring.started:
            return
        if not vring.enabled:
            vring.pending_kick = True
            return
        vring.pending_kick = False
        q: DeviceQueue = vring.queue  # type: ignore[assignment]  # started: it has a queue
        mem = self.mem
        poll = self.poll_s
        try:
            while True:
                q.disable_notification(mem)
                before = q.last_avail_idx
                self.device.process_queue(vring, mem)
                vring.notify(mem)
                if q.last_avail_idx == before:
                    # No progress: the device keeps buffers on purpose (an
                    # event queue waiting for events). Do not spin on them.
                    q.enable_notification(mem)
                    self._poll_device()
                    break
                if self._budgeted and q.has_available(mem):
                    # The device served its per-pass budget: let the event loop
                    # serve other connections, then come back (notifications
                    # stay off meanwhile: the driver need not kick).
                    self.metrics.budget_yields += 1
                    self.watcher.call_soon(lambda: self.kick(index))
                    return
                if poll and self._spin is not None:
                    # The adapter busy-polls every spinning ring of every
                    # connection (and the device's own poll hook) in one
                    # loop; notifications stay off until it gives up.
                    self.spinning.add(index)
                    self._spin()
                    return
                if poll:
                    # Busy-poll for a bounded window (like vhost-net's
                    # busyloop_timeout): with notifications off, the driver
                    # skips its kick and we skip the wake-up.
                    end = monotonic() + poll
                    while not q.has_available(mem) and monotonic() < end:
                        pass
                    if q.has_available(mem):
                        continue
                if not q.enable_notification(mem):
                    # A driver that saw notifications off may have skipped its
                    # doorbell (doorbell records): look once more, after the fence.
                    self._poll_device()
                    break
        except (VhostUserError, VirtioError) as e:
            vring.signal_error()
            self._break(e)
            raise

    def join_spin(self) -> None:
        """Put this connection's pollable rings (the device's ``poll_queues``,
        default all) into the busy-poll loop, notifications off: a guest
        that has not kicked yet need not wake us either."""
        mem = self.mem
        wanted = getattr(self.device, "poll_queues", None)
        for index in range(len(self.vrings)) if wanted is None else wanted:
            vring = self.vrings[index]
            if index not in self.spinning and vring.started and vring.enabled:
                vring.queue.disable_notification(mem)  # type: ignore[union-attr]  # started
                self.spinning.add(index)

    def _poll_device(self) -> bool:
        return self._device_poll is not None and self._device_poll()

    def poll_once(self) -> bool:
        """One busy-poll pass over the spinning rings and the device's poll
        hook (doorbell records); True if anything was done."""
        mem = self.mem
        work = False
        for index in tuple(self.spinning):
            vring = self.vrings[index]
            if not vring.started or not vring.enabled:
                self.spinning.discard(index)
                continue
            q: DeviceQueue = vring.queue  # type: ignore[assignment]  # started
            try:
                if q.has_available(mem):
                    self.device.process_queue(vring, mem)
                    vring.notify(mem)
                    work = True
            except (VhostUserError, VirtioError) as e:
                vring.signal_error()
                self._break(e)
                raise
        if self.spinning and self._poll_device():
            work = True
        return work

    def end_spin(self) -> bool:
        """Leave busy-poll: turn notifications back on, then look once more
        (the fence in enable_notification pairs with the driver's before it
        decides to skip a kick). True: work arrived, keep spinning."""
        mem = self.mem
        pending = False
        for index in tuple(self.spinning):
            vring = self.vrings[index]
            if vring.started and vring.queue.enable_notification(mem):  # type: ignore[union-attr]
                pending = True
        if self.spinning and self._poll_device():
            pending = True
        if pending:
            for index in self.spinning:
                vring = self.vrings[index]
                if vring.started:
                    vring.queue.disable_notification(mem)  # type: ignore[union-attr]
        else:
            self.spinning.clear()
        return pending

    # ------------------------------------------------------------------
    # handlers: return the reply payload (bytes) or None
    def _h_get_features(self, msg):
        return encode_u64(self.offered_features)

    def _h_set_features(self, msg):
        features = decode_u64(msg.payload, "SET_FEATURES")
        extra = features & ~self.offered_features
        if extra:
            raise ProtocolError(f"SET_FEATURES acks features {extra:#x} that were not offered")
        self.acked_features = features
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            # Without protocol features, rings are enabled from the start.
            for v in self.vrings:
                v.enabled = True
        self.device.set_features(features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        return None

    def _h_get_protocol_features(self, msg):
        return encode_u64(int(self.offered_protocol))

    def _h_set_protocol_features(self, msg):
        value = decode_u64(msg.payload, "SET_PROTOCOL_FEATURES")
        extra = value & ~int(self.offered_protocol)
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES acks {extra:#x}, which were not offered")
        self.protocol = ProtocolFeature(value)
        return None

    def _h_set_owner(self, msg):
        if self.owner:
            raise ProtocolError("SET_OWNER sent twice on one connection")
        self.owner = True
        return None

    def _h_reset_owner(self, msg):
        self._reset()
        self.owner = False
        return None

    def _h_reset_device(self, msg):
        self._reset()
        return None

    def _reset(self) -> None:
        for v in self.vrings:
            self._stop_ring(v)
            v.close()
            v.size = 0
            v.addr = None
            v.base = 0
            v.enabled = False
        self.acked_features = 0
        self.status = 0
        self.device.reset()

    def _h_get_queue_num(self, msg):
        return encode_u64(self.device.num_queues)

    def _h_get_max_mem_slots(self, msg):
        return encode_u64(GuestMemory.MAX_REGIONS)

    def _map_region(self, desc: MemRegionDesc, fd: int) -> MemoryRegion:
        try:
            check_memory_fd(fd, desc, require_seal=self.require_sealed_memory)
            return MemoryRegion.from_fd(fd, gpa=desc.gpa, size=desc.size, uva=desc.uva,
                                        mmap_offset=desc.mmap_offset)
        finally:
            os.close(fd)  # the mapping stays valid; the fd is not needed

    def _h_set_mem_table(self, msg):
        table = MemTable.decode(msg.payload)
        if len(table.regions) != len(msg.fds):
            raise MessageError(
                f"SET_MEM_TABLE: {len(table.regions)} regions but {len(msg.fds)} file descriptors"
            )
        new: list[MemoryRegion] = []
        try:
            for i, desc in enumerate(table.regions):
                new.append(self._map_region(desc, self._take_fd(msg, i)))
            # Validate the whole new table before touching the old one.
            with GuestMemory() as probe:
                for r in new:
                    probe.add(r)
                for r in list(probe.regions()):
                    probe.remove(r.gpa, r.size, r.uva)
        except BaseException:
            for r in new:
                r.close()
            raise
        for r in list(self.mem.regions()):
            self.mem.remove(r.gpa, r.size, r.uva).close()
        for r in new:
            self.mem.add(r)
        return None

    def _h_add_mem_reg(self, msg):
        desc = SingleMemRegion.decode(msg.payload).region
        region = self._map_region(desc, self._take_fd(msg))
        try:
            self.mem.add(region)
        except BaseException:
            region.close()
            raise
        return None

    def _h_rem_mem_reg(self, msg):
        desc = SingleMemRegion.decode(msg.payload).region
        try:
            region = self.mem.remove(desc.gpa, desc.size, desc.uva)
        except VirtioError as e:
            raise ProtocolError(f"REM_MEM_REG: no region gpa {desc.gpa:#x} size {desc.size:#x}: {e}") from e
        region.close()
        return None

    def _h_set_vring_num(self, msg):
        s = VringState.decode(msg.payload)
        self._vring(s.index, "SET_VRING_NUM").set_size(s.num)
        return None

    def _h_set_vring_addr(self, msg):
        a = VringAddr.decode(msg.payload)
        self._vring(a.index, "SET_VRING_ADDR").set_addr(a)
        return None

    def _h_set_vring_base(self, msg):
        s = VringState.decode(msg.payload)
        self._vring(s.index, "SET_VRING_BASE").set_base(s.num)
        return None

    def _h_get_vring_base(self, msg):
        s = VringState.decode(msg.payload)
        v = self._vring(s.index, "GET_VRING_BASE")
        base = self._stop_ring(v)
        # The front-end re-sends KICK and CALL when it restarts the ring.
        v.set_kick(None)
        v.polling = False
        v.set_call(None)
        return VringState(s.index, base).encode()

    def _stop_ring(self, v: Vring) -> int:
        self.spinning.discard(v.index)
        if v.started:
            self.watcher.unwatch_kick(v)
            base = v.stop()
            self.device.queue_stopped(v)
            return base
        return v.base

    def _fd_request(self, msg, what: str) -> tuple[Vring, int | None]:
        value = decode_u64(msg.payload, what)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise MessageError(f"{what}: unknown bits in {value:#x}")
        v = self._vring(value & VRING_IDX_MASK, what)
        nofd = bool(value & VRING_NOFD_MASK)
        if nofd and msg.fds:
            raise MessageError(f"{what}: no-fd flag set but {len(msg.fds)} file descriptor(s) passed")
        if not nofd and len(msg.fds) != 1:
            raise MessageError(f"{what}: expected 1 file descriptor, got {len(msg.fds)}")
        if nofd:
            return v, None
        fd = self._take_fd(msg)
        if (kind := _not_an_eventfd(fd)) is not None:
            os.close(fd)
            raise ProtocolError(f"{what}: ring {v.index}: the fd is not an eventfd ({kind})")
        return v, fd

    def _h_set_vring_kick(self, msg):
        v, fd = self._fd_request(msg, "SET_VRING_KICK")
        if v.started:
            self.watcher.unwatch_kick(v)
        v.set_kick(fd)
        if not v.started:
            if not v.can_start():
                raise ProtocolError(f"SET_VRING_KICK: ring {v.index} has no size or addresses yet")
            if not len(self.mem):
                raise ProtocolError(f"SET_VRING_KICK: ring {v.index} started before any guest memory was set")
            v.start(self.mem, event_idx=bool(self.acked_features & (1 << VIRTIO_F_RING_EVENT_IDX)),
                    indirect=bool(self.acked_features & (1 << VIRTIO_F_RING_INDIRECT_DESC)))
            self.device.queue_started(v)
        self.watcher.watch_kick(v)
        return None

    def _h_set_vring_call(self, msg):
        v, fd = self._fd_request(msg, "SET_VRING_CALL")
        v.set_call(fd)
        return None

    def _h_set_vring_err(self, msg):
        v, fd = self._fd_request(msg, "SET_VRING_ERR")
        v.set_err(fd)
        return None

    def _h_set_vring_enable(self, msg):
        s = VringState.decode(msg.payload)
        v = self._vring(s.index, "SET_VRING_ENABLE")
        if s.num > 1:
            raise MessageError(f"SET_VRING_ENABLE: value {s.num} is neither 0 nor 1")
        v.enabled = bool(s.num)
        if v.enabled and v.started and v.pending_kick:
            self.kick(v.index)
        return None

    def _h_get_config(self, msg):
        req = ConfigSpace.decode(msg.payload)
        data = self.device.get_config(req.offset, req.size)
        return ConfigSpace(req.offset, req.size, req.flags, data).encode()

    def _h_set_config(self, msg):
        req = ConfigSpace.decode(msg.payload)
        self.device.set_config(req.offset, req.payload)
        return None

    def _h_set_status(self, msg):
        value = decode_u64(msg.payload, "SET_STATUS")
        if value > 0xFF:
            raise MessageError(f"SET_STATUS: status {value:#x} does not fit the 8-bit device status")
        self.status = value
        self.device.set_status(value)
        return None

    def _h_get_status(self, msg):
        return encode_u64(self.status)

    # ------------------------------------------------------------------
    def close(self) -> None:
        """Release everything: rings (and their eventfds), memory, device."""
        if self.closed:
            return
        self.closed = True
        for v in self.vrings:
            try:
                self._stop_ring(v)
            finally:
                v.close()
        try:
            self.device.close()
        finally:
            self.mem.close()
