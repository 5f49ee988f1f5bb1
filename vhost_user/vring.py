"""One virtqueue as the back-end sees it: its vhost-user state and eventfds.

States (spec "Ring states"): *stopped* until the ring has a size, addresses,
memory and a kick source (SET_VRING_KICK), then *started*; stopped again by
GET_VRING_BASE, RESET_DEVICE or the end of the connection. Orthogonally a
ring is *enabled* or *disabled* (SET_VRING_ENABLE); without
VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled from the start. A started
but disabled ring is not processed; kicks are remembered and served when it
is enabled.

The Vring owns its kick, call and err eventfds: setting a new one closes
the old one, and :meth:`close` closes all three.
"""
from __future__ import annotations

import enum
import os

from vhost_user.errors import ProtocolError
from vhost_user.messages import VringAddr
from virtio.split import DeviceQueue


class RingState(enum.Enum):
    STOPPED = "stopped"  # not processed at all
    STARTED = "started"  # has memory, addresses and a kick source


class Vring:
    def __init__(self, index: int, max_size: int):
        self.index = index
        self.max_size = max_size
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0  # last_avail_idx while stopped
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.polling = False  # SET_VRING_KICK with the no-fd flag
        self.enabled = False
        self.state = RingState.STOPPED
        self.queue: DeviceQueue | None = None
        self.pending_kick = False
        self.signals = 0  # call eventfd writes (metrics)
        self.errors = 0

    @property
    def started(self) -> bool:
        return self.state is RingState.STARTED

    # --- eventfds -----------------------------------------------------
    def _replace(self, attr: str, fd: int | None) -> None:
        old = getattr(self, attr)
        if old is not None and old != fd:
            os.close(old)
        setattr(self, attr, fd)

    def set_kick(self, fd: int | None) -> None:
        self._replace("kick_fd", fd)
        self.polling = fd is None

    def set_call(self, fd: int | None) -> None:
        self._replace("call_fd", fd)

    def set_err(self, fd: int | None) -> None:
        self._replace("err_fd", fd)

    # --- lifecycle ----------------------------------------------------
    def set_size(self, num: int) -> None:
        if self.started:
            raise ProtocolError(f"ring {self.index}: SET_VRING_NUM while the ring is started")
        if num == 0 or num > self.max_size or num & (num - 1):
            raise ProtocolError(
                f"ring {self.index}: size {num} is not a power of two in 1..{self.max_size}"
            )
        self.size = num

    def set_base(self, num: int) -> None:
        if self.started:
            raise ProtocolError(f"ring {self.index}: SET_VRING_BASE while the ring is started")
        if num > 0xFFFF:
            raise ProtocolError(f"ring {self.index}: base {num:#x} does not fit a split ring's 16-bit index")
        self.base = num

    def set_addr(self, addr: VringAddr) -> None:
        if self.started and self.addr is not None and (addr.desc, addr.used, addr.avail) != (
            self.addr.desc, self.addr.used, self.addr.avail):
            raise ProtocolError(f"ring {self.index}: ring addresses changed while the ring is started")
        self.addr = addr

    def can_start(self) -> bool:
        return self.size != 0 and self.addr is not None and (self.kick_fd is not None or self.polling)

    def start(self, mem, *, event_idx: bool, indirect: bool) -> None:
        """Translate the ring addresses (front-end virtual addresses) and
        create the device-side queue. Raises GuestMemoryError/VirtqueueError
        if the rings are not inside guest memory."""
        assert self.addr is not None
        desc = mem.uva_to_gpa(self.addr.desc, 16 * self.size)
        avail = mem.uva_to_gpa(self.addr.avail, 6 + 2 * self.size)
        used = mem.uva_to_gpa(self.addr.used, 6 + 8 * self.size)
        self.queue = DeviceQueue(
            self.index, self.size, desc, avail, used,
            event_idx=event_idx, indirect=indirect, last_avail_idx=self.base,
            # Linux guests may put more than `size` entries in an indirect
            # table; QEMU accepts up to 1024 (VIRTQUEUE_MAX_SIZE).
            max_chain_len=max(self.size, 1024),
        )
        self.state = RingState.STARTED

    def stop(self) -> int:
        """Stop processing; returns last_avail_idx (GET_VRING_BASE's answer)."""
        if self.queue is not None:
            self.base = self.queue.last_avail_idx
        self.queue = None
        self.state = RingState.STOPPED
        self.pending_kick = False
        return self.base

    # --- data path helpers for devices --------------------------------
    # (devices call these on a started ring only: it has a queue)
    def pop(self, mem):
        return self.queue.pop(mem)  # type: ignore[union-attr]

    def push(self, mem, chain, written: int) -> None:
        self.queue.push(mem, chain, written)  # type: ignore[union-attr]

    def notify(self, mem) -> None:
        """Signal the call eventfd if the driver wants an interrupt now."""
        if self.call_fd is not None and self.queue is not None and self.queue.should_notify(mem):
            os.eventfd_write(self.call_fd, 1)
            self.signals += 1

    def signal_error(self) -> None:
        self.errors += 1
        if self.err_fd is not None:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self._replace(attr, None)
        self.polling = False
