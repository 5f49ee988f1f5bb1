"""Completion queues: a CQE ring in guest memory with an owner (phase) bit.

Spec 5.x.6.6. The device is the only producer: completion ``n`` goes to slot
``n mod depth`` with owner bit ``((n // depth) & 1) ^ 1``, body first, owner
byte last. The driver publishes its consumer index in the CQ doorbell record;
the device reads it before each write and refuses to overwrite an entry the
driver has not consumed (overflow -> the CQ enters ERROR, see core).
"""
from __future__ import annotations

import enum

from verbs import WcStatus
from virtio.errors import GuestMemoryError
from virtio.memory import le32_words
from virtio_rdma.constants import CqArm
from virtio_rdma.wire import CQE_SIZE, Completion, pack_cqe_into

U32 = 1 << 32


class CqState(enum.Enum):
    ACTIVE = "active"  # completions are written
    ERROR = "error"    # overflowed or ring unreachable: completions are dropped


class Arm(enum.Enum):
    NONE = 0
    NEXT = 1        # the next completion fires an event
    SOLICITED = 2   # the next solicited or error completion fires an event


class PushResult(enum.Enum):
    WRITTEN = 0
    WRITTEN_NOTIFY = 1  # written and the arm fired: queue a completion event
    OVERFLOW = 2        # the CQ just entered ERROR because it was full
    FAULT = 3           # the ring or doorbell record is not guest memory (CQ -> ERROR)
    DROPPED = 4         # the CQ was already in ERROR


class CompletionQueue:
    __slots__ = ("cqn", "depth", "ring_gpa", "dbrec_gpa", "comp_vector", "state", "arm", "pc",
                 "qps", "aqs", "written")

    def __init__(self, cqn: int, depth: int, ring_gpa: int, dbrec_gpa: int, comp_vector: int = 0):
        self.cqn = cqn
        self.depth = depth
        self.ring_gpa = ring_gpa
        self.dbrec_gpa = dbrec_gpa
        self.comp_vector = comp_vector
        self.state = CqState.ACTIVE
        self.arm = Arm.NONE
        self.pc = 0          # completions produced (mod 2^32)
        self.qps: set[int] = set()  # QPNs using this CQ (send or recv)
        self.aqs: set[int] = set()  # AQNs completing here (accelerator queues)
        self.written = 0

    def request_notify(self, flags: int) -> None:
        flags = CqArm.parse(flags)
        want = Arm.SOLICITED if flags & CqArm.SOLICITED_ONLY else Arm.NEXT
        # A pending NEXT arm is stronger than SOLICITED: keep it.
        if not (self.arm is Arm.NEXT and want is Arm.SOLICITED):
            self.arm = want

    def push(self, mem, c: Completion, solicited: bool = False) -> PushResult:
        if self.state is CqState.ERROR:
            return PushResult.DROPPED
        try:
            ci = le32_words(mem.translate(self.dbrec_gpa, 4))[0]  # whole: the driver stores it live
            if (self.pc - ci) % U32 >= self.depth:
                self.state = CqState.ERROR
                return PushResult.OVERFLOW
            slot = self.pc & (self.depth - 1)
            buf = mem.translate(self.ring_gpa + slot * CQE_SIZE, CQE_SIZE)
        except GuestMemoryError:
            self.state = CqState.ERROR
            return PushResult.FAULT
        owner = ((self.pc // self.depth) & 1) ^ 1
        pack_cqe_into(buf, c, owner)
        self.pc = (self.pc + 1) % U32
        self.written += 1
        if self.arm is Arm.NEXT or (
                self.arm is Arm.SOLICITED and (solicited or c.status != WcStatus.SUCCESS)):
            self.arm = Arm.NONE
            return PushResult.WRITTEN_NOTIFY
        return PushResult.WRITTEN
