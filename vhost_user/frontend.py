"""The vhost-user front-end: the role QEMU plays, for process guests.

:class:`Frontend` is the message layer: one method per front-end request,
blocking, over a connected unix socket. When REPLY_ACK is negotiated every
request without a reply of its own asks for an ack, so a back-end's refusal
surfaces as :class:`ReplyError` at the call that caused it.

:class:`VirtioUserDevice` is the virtio-user pattern on top: it owns the
guest memory (a memfd, hugetlb when the machine has free huge pages),
negotiates features, lays out split rings in guest memory, creates the kick
and call eventfds and drives the device status, so a plain process can use a
vhost-user device the way a VM's driver would.

Back-end death: the back-end never writes to the front-end's socket between
requests (the spec's back-end-initiated messages travel on their own
channel), so the socket turning readable, hung up or in error while no
request is in flight means the daemon is gone. Every wait of
:class:`VirtioUserDevice` sleeps in ``poll(2)`` on the call eventfd *and*
the socket, so a daemon that dies (even by SIGKILL: the kernel closes its
end) wakes the waiter at once with :class:`BackendGone` (errno
``ENOTCONN``); :meth:`VirtioUserDevice.check_alive` is the same test without
sleeping, for callers that busy-poll. ``poll`` rather than ``select``: fd
numbers above 1024 work.
"""
from __future__ import annotations

import bisect
import errno
import fcntl
import os
import select
import socket
from time import monotonic, perf_counter
from typing import NoReturn

from vhost_user.endpoint import recv_message, send_message
from vhost_user.errors import ProtocolError, ReplyError, TransportError
from vhost_user.messages import (
    FLAG_NEED_REPLY,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
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
    decode_u64,
    encode_u64,
)
from virtio.constants import DeviceStatus, FeatureBit, split_ring_layout
from virtio.memory import GuestMemory, MemoryRegion
from virtio.split import DriverQueue

R = FrontendReq
PF = ProtocolFeature


class BackendGone(TransportError):
    """The back-end daemon went away (EOF, hang-up or an error on the socket,
    or bytes nobody asked for). The device is unusable from then on: every
    later call fails the same way, with errno ``ENOTCONN``."""

    def __init__(self, message: str):
        super().__init__(message, errno.ENOTCONN)


#: what poll(2) reports on the vhost-user socket when the back-end is gone
_SOCK_EVENTS = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0x2000)


class Frontend:
    """Blocking vhost-user front-end connection (message layer)."""

    def __init__(self, path: str, *, timeout: float | None = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise TransportError(f"cannot connect to {path}: {e.strerror}",
                                 e.errno or errno.ECONNREFUSED) from e
        self.protocol = PF(0)

    # --- plumbing ---------------------------------------------------------
    def _send(self, req: R, payload: bytes = b"", fds=(), *, ack: bool | None = None) -> None:
        flags = VERSION
        if ack is None:
            ack = bool(self.protocol & PF.REPLY_ACK)
        if ack:
            flags |= FLAG_NEED_REPLY
        send_message(self.sock, Message(req, flags, payload, list(fds)))
        if ack:
            code = decode_u64(self._reply(req).payload, f"{req.name} ack")
            if code:
                raise ReplyError(req.name, code)

    def _reply(self, req: R) -> Message:
        try:
            msg = recv_message(self.sock)
        except TimeoutError as e:
            raise TransportError(f"no reply to {req.name}", errno.ETIMEDOUT) from e
        if msg.fds:
            for fd in msg.fds:
                os.close(fd)
            raise ProtocolError(f"reply to {req.name} carried file descriptors")
        if msg.request != req or not msg.is_reply:
            raise ProtocolError(
                f"expected reply to {req.name}, got request {msg.request} flags {msg.flags:#x}")
        return msg

    def _call(self, req: R, payload: bytes = b"") -> bytes:
        send_message(self.sock, Message(req, VERSION, payload))
        return self._reply(req).payload

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests -----------------------------------------------------------
    def get_features(self) -> int:
        return decode_u64(self._call(R.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self._send(R.SET_FEATURES, encode_u64(features))

    def get_protocol_features(self) -> PF:
        return PF(decode_u64(self._call(R.GET_PROTOCOL_FEATURES)))

    def set_protocol_features(self, features: PF) -> None:
        # The ack for this very message depends on what it negotiates.
        self._send(R.SET_PROTOCOL_FEATURES, encode_u64(int(features)), ack=False)
        self.protocol = PF(features)

    def set_owner(self) -> None:
        self._send(R.SET_OWNER)

    def reset_device(self) -> None:
        self._send(R.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return decode_u64(self._call(R.GET_QUEUE_NUM))

    def get_max_mem_slots(self) -> int:
        return decode_u64(self._call(R.GET_MAX_MEM_SLOTS))

    def set_mem_table(self, regions: list[MemoryRegion]) -> None:
        table = MemTable(tuple(MemRegionDesc(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions))
        self._send(R.SET_MEM_TABLE, table.encode(), [r.fd for r in regions])

    def add_mem_reg(self, region: MemoryRegion) -> None:
        desc = MemRegionDesc(region.gpa, region.size, region.uva, region.mmap_offset)
        self._send(R.ADD_MEM_REG, SingleMemRegion(desc).encode(), [region.fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        desc = MemRegionDesc(region.gpa, region.size, region.uva, region.mmap_offset)
        self._send(R.REM_MEM_REG, SingleMemRegion(desc).encode())

    def set_vring_num(self, index: int, num: int) -> None:
        self._send(R.SET_VRING_NUM, VringState(index, num).encode())

    def set_vring_base(self, index: int, base: int) -> None:
        self._send(R.SET_VRING_BASE, VringState(index, base).encode())

    def get_vring_base(self, index: int) -> int:
        return VringState.decode(self._call(R.GET_VRING_BASE, VringState(index, 0).encode())).num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0,
                       log: int = 0) -> None:
        self._send(R.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log).encode())

    def _set_vring_fd(self, req: R, index: int, fd: int | None) -> None:
        if fd is None:
            self._send(req, encode_u64(index | VRING_NOFD_MASK))
        else:
            self._send(req, encode_u64(index), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(R.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._send(R.SET_VRING_ENABLE, VringState(index, int(enable)).encode())

    def get_config(self, offset: int, size: int) -> bytes:
        reply = ConfigSpace.decode(self._call(R.GET_CONFIG, ConfigSpace(offset, size, 0, b"").encode()))
        if reply.size != size:
            raise ReplyError("GET_CONFIG", errno.EIO)
        return reply.payload

    def set_config(self, offset: int, data: bytes) -> None:
        self._send(R.SET_CONFIG, ConfigSpace(offset, len(data), 0, data).encode())

    def set_status(self, status: int) -> None:
        self._send(R.SET_STATUS, encode_u64(status))

    def get_status(self) -> int:
        return decode_u64(self._call(R.GET_STATUS))


class GpaAllocator:
    """First-fit allocation of guest-physical address ranges: rings, request
    buffers, and (through guest_lib) MRs and work/completion queues."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self._free: list[tuple[int, int]] = [(start, end)]  # sorted, coalesced (start, end)
        self._used: dict[int, int] = {}

    def alloc(self, size: int, align: int = 64) -> int:
        if size <= 0:
            raise ValueError(f"allocation size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        for i, (s, e) in enumerate(self._free):
            a = (s + align - 1) & ~(align - 1)
            if a + size <= e:
                del self._free[i]
                if a + size < e:
                    self._free.insert(i, (a + size, e))
                if a > s:
                    self._free.insert(i, (s, a))
                self._used[a] = size
                return a
        raise MemoryError(f"guest memory exhausted: no {size}-byte block (align {align}) left")

    def free(self, addr: int) -> None:
        size = self._used.pop(addr, None)
        if size is None:
            raise ValueError(f"guest address {addr:#x} was not allocated")
        s, e = addr, addr + size
        i = bisect.bisect_left(self._free, (s, e))
        if i > 0 and self._free[i - 1][1] == s:
            i -= 1
            s = self._free.pop(i)[0]
        if i < len(self._free) and self._free[i][0] == e:
            e = self._free.pop(i)[1]
        self._free.insert(i, (s, e))

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())


class VirtioUserDevice:
    """A process guest's virtio device reached over vhost-user.

    Owns: the Frontend connection, the guest memory (memfd), the driver-side
    queues, and the kick/call eventfds. :meth:`close` releases all of them.
    """

    WANTED_TRANSPORT = ((1 << FeatureBit.VIRTIO_F_VERSION_1) | (1 << FeatureBit.VIRTIO_F_RING_INDIRECT_DESC)
                        | (1 << FeatureBit.VIRTIO_F_RING_EVENT_IDX))
    WANTED_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.RESET_DEVICE

    def __init__(self, path: str, *, mem_size: int = 16 << 20, num_queues: int = 1, queue_size: int = 256,
                 device_features: int = 0, event_idx: bool = True, use_add_mem_reg: bool = False,
                 hugetlb="auto", timeout: float | None = 10.0, spin_us: float = 0.0):
        self.spin_us = spin_us
        self.kicks_sent = 0  # kick eventfd writes
        self.sleeps = 0  # waits that needed an interrupt
        #: why the back-end is known to be gone (None while it is not): every
        #: wait or check raises BackendGone with it from then on
        self.dead: str | None = None
        self._pollers: dict[int, tuple] = {}  # queue -> ((call fd, socket fd), poll object) of its waits
        self.frontend = Frontend(path, timeout=timeout)
        self.mem = GuestMemory()
        self.queues: list[DriverQueue] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        try:
            region = MemoryRegion.memfd(mem_size, gpa=0, hugetlb=hugetlb)
            self.mem.add(region)
            # Like QEMU's memory-backend-memfd: the back-end may rely on the
            # size never changing under its mapping.
            fcntl.fcntl(region.fd, fcntl.F_ADD_SEALS,  # type: ignore[arg-type]  # a memfd region has an fd
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._setup(num_queues, queue_size, device_features, event_idx, use_add_mem_reg)
        except BaseException:
            self.close()
            raise

    def _setup(self, num_queues, queue_size, device_features, event_idx, use_add_mem_reg) -> None:
        fe = self.frontend
        offered = fe.get_features()
        if not offered & VHOST_USER_F_PROTOCOL_FEATURES:
            raise ProtocolError("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        wanted = self.WANTED_TRANSPORT | device_features
        if not event_idx:
            wanted &= ~(1 << FeatureBit.VIRTIO_F_RING_EVENT_IDX)
        self.features = offered & wanted
        if not self.features & (1 << FeatureBit.VIRTIO_F_VERSION_1):
            raise ProtocolError("back-end does not offer VIRTIO_F_VERSION_1")
        self.protocol = fe.get_protocol_features() & self.WANTED_PROTOCOL
        fe.set_protocol_features(self.protocol)
        fe.set_owner()
        if self.protocol & PF.MQ:
            self.max_queues = fe.get_queue_num()
            if num_queues > self.max_queues:
                raise ProtocolError(f"{num_queues} queues wanted, back-end has {self.max_queues}")
        self._status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        fe.set_features(self.features | VHOST_USER_F_PROTOCOL_FEATURES)
        self._status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        if use_add_mem_reg:
            if not self.protocol & PF.CONFIGURE_MEM_SLOTS:
                raise ProtocolError("back-end does not offer CONFIGURE_MEM_SLOTS")
            self.max_mem_slots = fe.get_max_mem_slots()
            for r in self.mem.regions():
                fe.add_mem_reg(r)
        else:
            fe.set_mem_table(self.mem.regions())
        region = self.mem.regions()[0]
        self.allocator = GpaAllocator(region.gpa, region.gpa + region.size)
        self.alloc, self.free = self.allocator.alloc, self.allocator.free
        ev = bool(self.features & (1 << FeatureBit.VIRTIO_F_RING_EVENT_IDX))
        indirect = bool(self.features & (1 << FeatureBit.VIRTIO_F_RING_INDIRECT_DESC))
        for i in range(num_queues):
            base = self.alloc(split_ring_layout(queue_size, 0)[3], 4096)
            q = DriverQueue(self.mem, i, queue_size, base, event_idx=ev, indirect=indirect)
            self.queues.append(q)
            kick = os.eventfd(0, os.EFD_CLOEXEC)
            self.kick_fds.append(kick)
            call = os.eventfd(0, os.EFD_CLOEXEC)
            self.call_fds.append(call)
            fe.set_vring_num(i, queue_size)
            fe.set_vring_base(i, 0)
            fe.set_vring_addr(i, desc=self.uva_of(q.desc_gpa), used=self.uva_of(q.used_gpa),
                              avail=self.uva_of(q.avail_gpa))
            fe.set_vring_call(i, call)
            fe.set_vring_kick(i, kick)
            fe.set_vring_enable(i, True)
        self._status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                     | DeviceStatus.DRIVER_OK)

    def _status(self, status: int) -> None:
        if self.protocol & PF.STATUS:
            self.frontend.set_status(int(status))

    def uva_of(self, gpa: int) -> int:
        """This process's virtual address of guest address ``gpa``."""
        r = self.mem.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    # --- data path ------------------------------------------------------
    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    def kick_if_needed(self, index: int) -> bool:
        if self.queues[index].kick_needed():
            os.eventfd_write(self.kick_fds[index], 1)
            self.kicks_sent += 1
            return True
        return False

    def wait_used(self, index: int, timeout: float | None = 10.0, *, spin_us: float | None = None):
        """Block until the device returns a used buffer on queue ``index``;
        return (token, written length).

        First spins on the used ring for ``spin_us`` (default: the device's
        ``spin_us``) with notifications off, so a fast device answers without
        an eventfd write or a wake-up; then arms notifications and sleeps.
        """
        q = self.queues[index]
        item = q.get_used()
        if item is not None:
            return item
        spin = (self.spin_us if spin_us is None else spin_us) * 1e-6
        if spin > 0:
            q.disable_cb()
            try:
                end = perf_counter() + spin
                while perf_counter() < end:
                    if q.has_used():
                        return q.get_used()
            finally:
                q.enable_cb()
            item = q.get_used()
            if item is not None:
                return item
        fd = self.call_fds[index]
        sock = self.frontend.sock.fileno()
        cached = self._pollers.get(index)
        if cached is not None and cached[0] == (fd, sock):
            poller = cached[1]
        else:  # first wait on this queue, or its call fd was replaced
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(sock, _SOCK_EVENTS)
            self._pollers[index] = ((fd, sock), poller)
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if self.dead is not None:
                raise BackendGone(self.dead)
            if deadline is None:
                ms = -1
            else:
                left = deadline - monotonic()
                if left <= 0:
                    raise TransportError(f"queue {index}: no used buffer within {timeout} s", errno.ETIMEDOUT)
                ms = max(1, int(left * 1000 + 0.999))
            try:
                ready = poller.poll(ms)
            except InterruptedError:  # PEP 475 retries, but a signal handler may raise
                continue
            woke = False
            for rfd, ev in ready:
                if rfd == sock:
                    self._socket_event(ev)
                else:
                    woke = True
            if not woke:
                continue
            os.eventfd_read(fd)
            self.sleeps += 1
            item = q.get_used()
            if item is not None:
                return item

    # --- back-end liveness --------------------------------------------------
    def check_alive(self) -> None:
        """Raise :class:`BackendGone` if the back-end is gone; one poll(2)
        with zero timeout (no syscall once death was seen)."""
        if self.dead is not None:
            raise BackendGone(self.dead)
        if self.frontend.sock.fileno() < 0:
            self._mark_dead("the vhost-user connection is closed")
        p = select.poll()
        p.register(self.frontend.sock, _SOCK_EVENTS)
        for _fd, ev in p.poll(0):
            self._socket_event(ev)

    def _socket_event(self, ev: int) -> None:
        """poll(2) reported ``ev`` on the socket: find out why. Raises
        BackendGone unless it was spurious."""
        if ev & select.POLLNVAL:
            self._mark_dead("the vhost-user connection is closed")
        if ev & (select.POLLHUP | select.POLLERR):
            self._mark_dead("the back-end hung up the vhost-user connection "
                            "(it exited, was killed or dropped this guest)")
        sock = self.frontend.sock
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # spurious (e.g. POLLPRI without data): nothing to see
        except OSError as e:
            self._mark_dead(f"vhost-user socket error: {e.strerror or e}")
        if not data:
            self._mark_dead("the back-end closed the vhost-user connection "
                            "(it exited, was killed or dropped this guest)")
        self._mark_dead("the back-end sent an unsolicited message on the vhost-user socket")

    def _mark_dead(self, why: str) -> NoReturn:
        self.dead = f"{self.frontend.path}: {why}"
        raise BackendGone(self.dead)

    def translate(self, gpa: int, length: int) -> memoryview:
        return self.mem.translate(gpa, length)

    def get_config(self, offset: int, size: int) -> bytes:
        if self.dead is not None:
            raise BackendGone(self.dead)
        return self.frontend.get_config(offset, size)

    def close(self) -> None:
        """Close the connection first (the back-end then stops using our
        memory and eventfds), then release them. Never fails because the
        back-end is gone."""
        self.frontend.close()
        if self.dead is None:
            self.dead = f"{self.frontend.path}: the device is closed"
        self._pollers.clear()
        fds, self.kick_fds, self.call_fds = self.kick_fds + self.call_fds, [], []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.queues = []
        self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

