"""The verbs fabric: guest QPs run on the host's own RDMA device (kernel rxe or a NIC).

Where the host has an RDMA device, the wire engine of a guest QP is an RC QP
of that device, driven through pyverbs; the device's kernel driver (or the
NIC) does segmentation, ACKs, retransmission and the responder, exactly as
for any local application, and data moves between the wire and the guest's
pages without a copy:

* **Keys and addresses.** Every guest MR is registered with the device under
  the guest's own iova (:class:`fabric.uverbs.KernelMr`), and the
  device's lkey and rkey become the guest's keys. A guest's SGEs and a
  peer's RETHs therefore go to the device unchanged, and the device checks
  them (bounds, rights, PD), not us.
* **QP numbers.** CREATE_QP creates the device QP at once (RESET), and its
  number is the guest's QPN: it is what peers see on the wire.
* **PDs.** Each guest PD that gets an MR or a QP gets a device PD.
* **Completions.** Each device QP has its own CQ and completion channel;
  the daemon's event loop watches the channel's fd
  (:class:`VerbsFabricService`), and each device completion becomes the
  guest's CQE (send WRs are all posted signaled so each retires its ring
  slot; the guest's own flag decides whether a CQE is written).

QPs whose peer is another guest of this daemon (same GID, QPN attached here)
stay on the synchronous message path of :class:`LocalFabric`, as with the
RoCE fabric.

Ownership: the fabric owns the device context; a :class:`VerbsBinding`
(one per guest device) owns that guest's device PDs; each
:class:`HcaQp` owns its QP, CQ, completion channel and bounce MR; each
guest MR owns its :class:`~fabric.uverbs.KernelMr`. The device core
releases QPs, then MRs, then the binding.

An MR whose chunks are scattered in the daemon's mapping of guest memory
is registered through an :class:`~virtio.alias.AliasWindow` that shows the
same pages as one range (chunks must tile pages; hugetlb-backed memory and
anything else mremap refuses gets EOPNOTSUPP).

Not covered yet: memory windows and remote invalidation (the guest device
refuses them anyway); the device's asynchronous events (a fatal device error shows up as error
completions). The device's GID table is read once, at start.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fabric.local import LocalFabric
from fabric.uverbs import KernelMr
from verbs import Access, Mtu, QpState, SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio.alias import PAGE, AliasWindow
from virtio.errors import GuestMemoryError
from virtio_rdma.constants import Status
from virtio_rdma.errors import CommandError, FabricError
from virtio_rdma.rings import ATOMICS, drive_rq, drive_sq, fail_send, qp_error, recv_done, send_done

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

RECV_BIT = 1 << 63          # device wr_id of a receive: RECV_BIT | ring index
_RIGHTS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC
_RDMA = frozenset({WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ})
_IMM = frozenset({WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM})
_EVENT_FD_LINK = "anon_inode:[infinibandevent]"
_STATUS_OF_ERRNO = {int(s) for s in Status}
_WC_WITH_IMM = int(WcFlags.WITH_IMM)  # plain ints: compared per completion
_WC_RECV_RDMA_WITH_IMM = int(WcOpcode.RECV_RDMA_WITH_IMM)


def rdma_devices() -> list[str]:
    """The names of this host's RDMA devices ([] without pyverbs or devices)."""
    try:
        from pyverbs.device import get_device_list
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError:
        return []
    try:
        return [d.name.decode() for d in get_device_list()]
    except PyverbsError:
        return []


def gid_text(gid: bytes) -> str:
    """pyverbs' GID notation: eight groups of four hex digits."""
    h = bytes(gid).hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


def gid_bytes(gid) -> bytes:
    raw = bytes.fromhex(str(gid).replace(":", ""))
    if len(raw) != 16:
        raise FabricError(f"GID {gid!s} is not 16 bytes")
    return raw


def _status_of(e: Exception) -> Status:
    err = getattr(e, "error_code", None) or getattr(e, "status", None) or getattr(e, "errno", None)
    return Status(err) if isinstance(err, int) and err in _STATUS_OF_ERRNO else Status.EIO


def _event_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _EVENT_FD_LINK:
                fds.add(int(name))
        except OSError:
            continue
    return fds


@dataclass(slots=True)
class VerbsFabricMetrics:
    wire_qps: int = 0             # guest QPs run by the device
    device_qps: int = 0           # device QPs alive
    device_mrs: int = 0           # guest MRs registered with the device
    alias_vmas: int = 0           # mappings of alias windows (scattered MRs)
    completions: int = 0          # device completions turned into guest CQEs
    error_completions: int = 0
    stale_completions: int = 0    # after the guest QP left for ERR/RESET: dropped
    events: int = 0               # completion-channel events
    internal_errors: int = 0      # exceptions at the daemon boundary (logged)

    def as_dict(self) -> dict:
        return asdict(self)


class VerbsFabric(LocalFabric):
    """The host RDMA device ``device`` (port ``port``) as the fabric.

    The port's GID is the one at ``gid_index``, or, by default, the one
    matching ``address`` (its IPv4-mapped form for IPv4), or else the first
    IPv4-mapped RoCE v2 GID in the table, as rxe and RoCE NICs list them.
    """

    def __init__(self, device: str, *, port: int = 1, gid_index: int | None = None,
                 address: str | None = None):
        try:
            from pyverbs.device import Context
            from pyverbs.pyverbs_error import PyverbsError
        except ImportError as e:
            raise FabricError(f"the verbs fabric needs pyverbs (python3-pyverbs): {e}") from None
        #: what a refusal of the device raises (pyverbs' errors)
        self.device_errors: tuple[type[Exception], ...] = (PyverbsError,)
        try:
            self.ctx = Context(name=device)
        except PyverbsError as e:
            raise FabricError(f"cannot open RDMA device {device!r}: {e}") from None
        try:
            self.device_attr = self.ctx.query_device()
            self.port_attr = self.ctx.query_port(port)
            self.gid_index = self._choose_gid(port, gid_index, address)
            gid = gid_bytes(self.ctx.query_gid(port, self.gid_index))
        except (PyverbsError, FabricError) as e:
            self.ctx.close()
            raise FabricError(f"RDMA device {device!r} port {port}: {e}") from None
        super().__init__(gid)
        self.device = device
        self.port = port
        self.address = address or _address_of(gid) or gid_text(gid)
        # watch(fd, callback) / unwatch(fd): set by VerbsFabricService
        self.watch: Callable[[int, Callable[[], None]], None] | None = None
        self.unwatch: Callable[[int], object] | None = None
        self.metrics = VerbsFabricMetrics()
        self.closed = False

    def _choose_gid(self, port: int, gid_index: int | None, address: str | None) -> int:
        import pyverbs.enums as e

        from fabric.roce import gid_of_address

        n = self.port_attr.gid_tbl_len
        if gid_index is not None:
            if not 0 <= gid_index < n:
                raise FabricError(f"GID index {gid_index} is outside the table (0..{n - 1})")
            return gid_index
        want = gid_of_address(address) if address else None
        for i in range(n):
            try:
                g = gid_bytes(self.ctx.query_gid(port, i))
                roce_v2 = self.ctx.query_gid_type(port, i) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
            except self.device_errors:
                continue
            if want is not None and g == want:
                return i
            if want is None and roce_v2 and g[:12] == bytes(10) + b"\xff\xff":
                return i
        if want is not None:
            raise FabricError(f"no GID for address {address} in the port's table")
        raise FabricError("no IPv4-mapped RoCE v2 GID in the port's table (is an IPv4 address "
                          "configured on the device's netdev?)")

    # ---- Fabric --------------------------------------------------------------
    def bind(self, dev) -> VerbsBinding:
        if self.closed:
            raise FabricError(f"verbs fabric on {self.device} is closed")
        a, L = self.device_attr, dev.limits
        dev.limits = dataclasses.replace(
            L, max_qp=min(L.max_qp, a.max_qp), max_qp_wr=min(L.max_qp_wr, a.max_qp_wr),
            max_sge=min(L.max_sge, a.max_sge), max_mr=min(L.max_mr, a.max_mr),
            max_mr_size=min(L.max_mr_size, a.max_mr_size),
            max_qp_rd_atom=min(L.max_qp_rd_atom, a.max_qp_rd_atom, a.max_qp_init_rd_atom),
            active_mtu=Mtu(min(int(L.active_mtu), int(self.port_attr.active_mtu))),
            max_msg_sz=min(L.max_msg_sz, self.port_attr.max_msg_sz or L.max_msg_sz))
        return VerbsBinding(self, dev)

    def describe(self) -> str:
        return f"verbs on {self.device} port {self.port} GID index {self.gid_index} ({self.address})"

    def open_wire_qp(self, dev, qp, now: float) -> VerbsQp | None:
        if qp.hw is None:
            return None
        if bytes(qp.attr.dgid) == self.gid and self.endpoint(qp.attr.dest_qp_num) is not None:
            return None  # another guest of this daemon: the message path
        self.metrics.wire_qps += 1
        return VerbsQp(self, dev, qp)

    def close(self) -> None:
        """Close the device context (every object on it is destroyed with it)."""
        if not self.closed:
            self.closed = True
            self.ctx.close()


def _address_of(gid: bytes) -> str | None:
    from fabric.roce import address_of_gid

    return address_of_gid(gid)


class VerbsBinding:
    """One guest device's objects on the host RDMA device (see module doc):
    its device PDs, the budgets that keep one guest from exhausting the
    daemon (registered bytes, alias mappings), and the completion queues its
    device QPs share (a few CQs, each with one completion channel: one fd
    per CQ, not per QP)."""

    def __init__(self, fabric: VerbsFabric, dev) -> None:
        self.fabric = fabric
        self.dev = dev
        self.pds: dict = {}                   # guest pdn -> pyverbs PD
        self.qps: dict[int, HcaQp] = {}       # device QPN -> HcaQp
        self.cqs: list[_SharedCq] = []
        self.registered_bytes = 0
        self.alias_vmas = 0

    def _pd(self, pdn: int):
        pd = self.pds.get(pdn)
        if pd is None:
            from pyverbs.pd import PD

            try:
                pd = PD(self.fabric.ctx)
            except self.fabric.device_errors as e:
                raise CommandError(f"device PD for PD {pdn}: {e}", _status_of(e)) from None
            self.pds[pdn] = pd
        return pd

    # ---- memory ----------------------------------------------------------------
    def reg_mr(self, pdn: int, access: Access, iova: int, length: int,
               chunks: list[tuple[int, int]]) -> _DeviceMr:
        """Register the guest pages of an MR with the device under ``iova``
        (through an alias window when they are not one range in the daemon's
        mapping; chunks must then tile pages, as a page list does)."""
        if length == 0:
            raise CommandError("REG_MR of 0 bytes: the RDMA device cannot register it",
                               Status.EINVAL)
        mem = self.dev.mem
        try:
            pieces = [(mem.host_address(gpa, n), n) for gpa, n in chunks]
        except GuestMemoryError as e:
            raise CommandError(f"REG_MR: {e}", Status.EFAULT) from None
        runs = [list(pieces[0])]  # host-contiguous chunks are one run
        for a, n in pieces[1:]:
            if runs[-1][0] + runs[-1][1] == a:
                runs[-1][1] += n
            else:
                runs.append([a, n])
        if (runs[0][0] ^ iova) % PAGE:
            raise CommandError(f"REG_MR iova {iova:#x} and its memory differ in their offset "
                               "within a page; the RDMA device needs them equal", Status.EINVAL)
        guest_ram = sum(r.size for r in mem.regions())
        budget = max(REGISTER_MIN_BUDGET, REGISTER_RAM_FACTOR * guest_ram)
        if self.registered_bytes + length > budget:
            raise CommandError(f"REG_MR of {length} bytes: this guest already has "
                               f"{self.registered_bytes} bytes registered with the RDMA device "
                               f"(budget {budget})", Status.ENOMEM)
        vmas = len(runs) if len(runs) > 1 else 0
        if vmas and (self.alias_vmas + vmas > ALIAS_VMAS_PER_GUEST
                     or self.fabric.metrics.alias_vmas + vmas > ALIAS_VMAS_PER_DAEMON):
            raise CommandError(f"REG_MR of {len(runs)} scattered pieces: the alias mapping "
                               f"budget is spent ({self.alias_vmas} in use by this guest)",
                               Status.ENOMEM)
        pd = self._pd(pdn)
        window = None
        start = runs[0][0]
        if vmas:  # scattered in the daemon's mapping: show them to the device as one range
            try:
                window = AliasWindow([tuple(r) for r in runs])
            except GuestMemoryError as e:
                raise CommandError(f"REG_MR: {len(runs)} pieces cannot be made one range for "
                                   f"the RDMA device: {e}", Status.EOPNOTSUPP) from None
            start = window.address
        try:
            mr = KernelMr(self.fabric.ctx.cmd_fd, pd.handle, start, length, iova,
                          int(access & (_RIGHTS | Access.RELAXED_ORDERING)))
        except FabricError as e:
            if window is not None:
                window.close()
            raise CommandError(str(e), Status(e.status) if e.status in _STATUS_OF_ERRNO
                               else Status.EIO) from None
        return _DeviceMr(self, mr, window, length, vmas)

    # ---- QPs and their completion queues -----------------------------------------
    def create_qp(self, pdn: int, layout) -> HcaQp:
        return HcaQp(self, self._pd(pdn), layout)

    def shared_cq(self, depth: int) -> _SharedCq:
        """A CQ of this guest with room for ``depth`` more completions (every
        WR of a device QP is signaled, so a QP needs sq + rq entries)."""
        max_cqe = self.fabric.device_attr.max_cqe
        if depth > max_cqe:
            raise CommandError(f"a QP of {depth} WRs exceeds the device's CQ size {max_cqe}",
                               Status.EINVAL)
        for c in self.cqs:
            if c.reserve(depth):
                return c
        if len(self.cqs) >= CQS_PER_GUEST:
            raise CommandError(f"this guest's {len(self.cqs)} device CQs are full", Status.ENOMEM)
        c = _SharedCq(self, min(max_cqe, max(depth, CQ_START)))
        self.cqs.append(c)
        if not c.reserve(depth):  # pragma: no cover - sized for it above
            raise CommandError("device CQ smaller than asked for", Status.ENOMEM)
        return c

    def on_event(self, c: _SharedCq) -> None:
        """A completion channel is readable: take the event, re-arm, poll."""
        if c.cq is None:
            return
        try:
            c.channel.get_cq_event(c.cq)
            c.cq.ack_events(1)
            self.fabric.metrics.events += 1
        except self.fabric.device_errors:
            pass  # no event after all (the fd is non-blocking)
        c.cq.req_notify()
        self.poll(c)

    def poll(self, c: _SharedCq | None = None) -> int:
        """Hand every completion of ``c`` (default: all this guest's CQs) to
        the engine of its QP; returns how many there were."""
        n = 0
        m = self.fabric.metrics
        for cq in ([c] if c is not None else list(self.cqs)):
            while cq.cq is not None:
                got, wcs = cq.cq.poll(64)
                if not got:
                    break
                for wc in wcs:
                    n += 1
                    hq = self.qps.get(wc.qp_num)
                    engine = hq.engine if hq is not None else None
                    if engine is None:
                        m.stale_completions += 1
                    else:
                        engine.complete(wc)
        return n

    def dealloc_pd(self, pdn: int) -> None:
        pd = self.pds.pop(pdn, None)
        if pd is not None:
            pd.close()

    def close(self) -> None:
        """Release the CQs and PDs (the core released QPs and MRs first)."""
        for hq in list(self.qps.values()):  # normally none left
            _quietly(hq.close, "device QP")
        cqs, self.cqs = self.cqs, []
        for c in cqs:
            _quietly(c.close, "device CQ")
        pds, self.pds = self.pds, {}
        for pd in pds.values():
            _quietly(pd.close, "device PD")


REGISTER_RAM_FACTOR = 4          # a guest may register up to 4x its memory with the device...
REGISTER_MIN_BUDGET = 256 << 20  # ...and at least this much
ALIAS_VMAS_PER_GUEST = 4096      # mappings of scattered MRs (vm.max_map_count is ~65530)
ALIAS_VMAS_PER_DAEMON = 16384
CQS_PER_GUEST = 16
CQ_START = 1024


def _quietly(close, what: str) -> None:
    try:
        close()
    except Exception as e:  # release the rest regardless
        log.warning("closing a %s: %s", what, e)


class _DeviceMr:
    """A guest MR's registration with the device: the :class:`KernelMr` and,
    for a scattered MR, the :class:`~virtio.alias.AliasWindow` it was
    registered through (unmapped after the MR is deregistered)."""

    __slots__ = ("binding", "mr", "window", "length", "vmas", "lkey", "rkey")

    def __init__(self, binding: VerbsBinding, mr: KernelMr, window: AliasWindow | None,
                 length: int, vmas: int):
        self.binding, self.window, self.length, self.vmas = binding, window, length, vmas
        self.mr: KernelMr | None = mr  # None once closed
        self.lkey, self.rkey = mr.lkey, mr.rkey
        m = binding.fabric.metrics
        binding.registered_bytes += length
        binding.alias_vmas += vmas
        m.device_mrs += 1
        m.alias_vmas += vmas

    def close(self) -> None:
        if self.mr is None:
            return
        mr, self.mr = self.mr, None
        b, m = self.binding, self.binding.fabric.metrics
        b.registered_bytes -= self.length
        b.alias_vmas -= self.vmas
        m.device_mrs -= 1
        m.alias_vmas -= self.vmas
        try:
            mr.close()
        finally:
            if self.window is not None:
                window, self.window = self.window, None
                window.close()


class _SharedCq:
    """A device CQ with its own completion channel, shared by several device
    QPs of one guest; the daemon's loop watches the channel's fd."""

    def __init__(self, binding: VerbsBinding, size: int) -> None:
        from pyverbs.cq import CQ, CompChannel

        fabric = binding.fabric
        self.binding = binding
        self.size = size
        self.used = 0
        # pyverbs' CQ and CompChannel (untyped): None until made and after close
        self.cq: Any = None
        self.channel: Any = None
        self.fd = -1
        self.watched = False
        errors: tuple[type[Exception], ...] = (*fabric.device_errors, FabricError)
        try:
            before = _event_fds()
            self.channel = CompChannel(fabric.ctx)
            fds = _event_fds() - before
            if len(fds) != 1:  # pyverbs 44 does not expose the channel's fd
                raise FabricError(f"cannot tell the completion channel's fd among {sorted(fds)}")
            self.fd = fds.pop()
            os.set_blocking(self.fd, False)
            self.cq = CQ(fabric.ctx, size, None, self.channel, 0)
            self.cq.req_notify()
        except errors as err:
            self.close()
            raise CommandError(f"device CQ: {err}", _status_of(err)) from None
        if fabric.watch is not None:
            fabric.watch(self.fd, lambda: binding.on_event(self))
            self.watched = True

    def reserve(self, depth: int) -> bool:
        if self.used + depth > self.size:
            return False
        self.used += depth
        return True

    def release(self, depth: int) -> None:
        self.used -= depth

    def close(self) -> None:
        fabric = self.binding.fabric
        if self.watched and fabric.unwatch is not None:
            fabric.unwatch(self.fd)
        self.watched = False
        cq, channel, self.cq, self.channel = self.cq, self.channel, None, None
        if cq is not None:
            cq.close()
        if channel is not None:
            channel.close()


class HcaQp:
    """A device RC QP made for one guest QP at CREATE_QP, on one of the
    guest's shared CQs, with a small registered buffer for inline data."""

    def __init__(self, binding: VerbsBinding, pd, layout) -> None:
        import pyverbs.enums as e
        from pyverbs.qp import QP, QPCap, QPInitAttr

        fabric = binding.fabric
        self.binding = binding
        self.fabric = fabric
        self.pd = pd
        # pyverbs' QP and the bounce MR (untyped): None until made and after close
        self.qp: Any = None
        self.bounce: Any = None
        self.engine: VerbsQp | None = None
        self.qpn = 0
        self.depth = layout.sq_depth + layout.rq_depth
        self.shared: _SharedCq | None = binding.shared_cq(self.depth)
        a = fabric.device_attr
        errors: tuple[type[Exception], ...] = (*fabric.device_errors, FabricError)
        try:
            cap = QPCap(max_send_wr=layout.sq_depth, max_recv_wr=layout.rq_depth,
                        max_send_sge=max(1, min(layout.max_send_sge, a.max_sge)),
                        max_recv_sge=max(1, min(layout.max_recv_sge, a.max_sge)),
                        max_inline_data=0)
            cq = self.shared.cq
            self.qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap,
                                        sq_sig_all=0))
            self.qpn = self.qp.qp_num
            fabric.adopt_qpn(self.qpn)
        except errors as err:
            self.qpn = 0  # not adopted: the number is not ours to free
            self._release()
            raise CommandError(f"device QP: {err}", _status_of(err)) from None
        binding.qps[self.qpn] = self
        self.inline_slot = max(1, min(layout.max_inline_data, binding.dev.limits.max_inline_data))
        self.sq_depth = layout.sq_depth
        fabric.metrics.device_qps += 1

    def bounce_buffer(self):
        """The registered buffer inline data and empty SGE lists use (made on first use)."""
        if self.bounce is None:
            import pyverbs.enums as e
            from pyverbs.mr import MR

            self.bounce = MR(self.pd, self.inline_slot * self.sq_depth, e.IBV_ACCESS_LOCAL_WRITE)
        return self.bounce

    def reset(self) -> None:
        """Back to RESET (the guest QP went there): the device QP can be used
        again; completions it left in the shared CQ are dropped (the engine is
        detached), the other QPs' are delivered."""
        import pyverbs.enums as e
        from pyverbs.qp import QPAttr

        self.engine = None
        self.qp.modify(QPAttr(qp_state=e.IBV_QPS_RESET), e.IBV_QP_STATE)
        self.binding.poll(self.shared)

    def _release(self) -> None:
        for name in ("qp", "bounce"):
            obj = getattr(self, name)
            if obj is not None:
                setattr(self, name, None)
                _quietly(obj.close, f"device {name}")
        if self.shared is not None:
            shared, self.shared = self.shared, None
            shared.release(self.depth)

    def close(self) -> None:
        if self.qp is None and self.shared is None:
            return
        self.engine = None
        qpn = self.qpn
        self._release()
        if qpn:
            self.binding.qps.pop(qpn, None)
            self.fabric.free_qpn(qpn)
            self.fabric.metrics.device_qps -= 1


class VerbsQp:
    """The wire engine of one guest QP on the device (``qp.hw``): the same
    calls as :class:`fabric.roce_qp.NetworkQp`."""

    def __init__(self, fabric: VerbsFabric, dev, qp) -> None:
        self.fabric = fabric
        self.dev = dev
        self.qp = qp
        self.hw: HcaQp = qp.hw
        self.posted: deque[tuple[int, int, bool, int]] = deque()  # (index, opcode, signaled, wr_id)
        self.recv_ids: deque[int] = deque()  # guest wr_ids of receives on the device, in order
        self.rq_posted = qp.rq_ci
        self.failed = False
        self.closed = False
        self._draining = False
        self.hw.engine = self

    # ------------------------------------------------------------------ state
    def modified(self, prev: QpState, target: QpState, now: float) -> None:
        """Apply the guest's MODIFY_QP to the device QP. A refusal raises
        CommandError with the device's errno: the core keeps the QP in
        ``prev`` and the guest's MODIFY_QP fails, as ibv_modify_qp does.
        Optional attributes a transition allows are always passed, with the
        guest's current values (unchanged ones are no-ops)."""
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        qp, a, hw = self.qp, self.qp.attr, self.hw
        if self.failed or target is QpState.SQE:
            return
        access = int(qp.access & _RIGHTS)
        try:
            if target is QpState.RTR and prev is QpState.INIT:
                init = QPAttr(qp_state=e.IBV_QPS_INIT, port_num=self.fabric.port)
                init.pkey_index = 0
                init.qp_access_flags = access
                hw.qp.modify(init, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT
                             | e.IBV_QP_ACCESS_FLAGS)
                mtu = min(a.path_mtu or int(Mtu.MTU_1024), int(self.fabric.port_attr.active_mtu))
                rtr = QPAttr(qp_state=e.IBV_QPS_RTR, path_mtu=mtu)
                rtr.dest_qp_num = a.dest_qp_num
                rtr.rq_psn = qp.epsn
                rtr.max_dest_rd_atomic = max(1, min(a.max_dest_rd_atomic,
                                                    self.fabric.device_attr.max_qp_rd_atom))
                rtr.min_rnr_timer = a.min_rnr_timer & 31
                rtr.qp_access_flags = access
                gr = GlobalRoute(dgid=GID(gid_text(bytes(a.dgid))), flow_label=a.flow_label,
                                 sgid_index=self.fabric.gid_index,
                                 hop_limit=a.hop_limit or 64, traffic_class=a.traffic_class)
                rtr.ah_attr = AHAttr(is_global=1, port_num=self.fabric.port, gr=gr)
                hw.qp.modify(rtr, e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU
                             | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN | e.IBV_QP_MAX_DEST_RD_ATOMIC
                             | e.IBV_QP_MIN_RNR_TIMER | e.IBV_QP_ACCESS_FLAGS)
                self.rq_rung(now)
            elif target is QpState.RTS and prev is QpState.RTR:
                rts = QPAttr(qp_state=e.IBV_QPS_RTS)
                rts.timeout = a.timeout & 31
                rts.retry_cnt = a.retry_cnt & 7
                rts.rnr_retry = a.rnr_retry & 7
                rts.sq_psn = qp.sq_psn
                rts.max_rd_atomic = max(1, min(a.max_rd_atomic,
                                               self.fabric.device_attr.max_qp_init_rd_atom))
                rts.qp_access_flags = access
                rts.min_rnr_timer = a.min_rnr_timer & 31
                hw.qp.modify(rts, e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT
                             | e.IBV_QP_RNR_RETRY | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC
                             | e.IBV_QP_ACCESS_FLAGS | e.IBV_QP_MIN_RNR_TIMER)
            elif target is QpState.RTS:  # RTS -> RTS, SQD -> RTS, SQE -> RTS
                attr = QPAttr(qp_state=e.IBV_QPS_RTS)
                attr.qp_access_flags = access
                attr.min_rnr_timer = a.min_rnr_timer & 31
                hw.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_ACCESS_FLAGS | e.IBV_QP_MIN_RNR_TIMER)
            else:
                state = {QpState.RTR: e.IBV_QPS_RTR, QpState.SQD: e.IBV_QPS_SQD}[target]
                attr = QPAttr(qp_state=state)
                attr.qp_access_flags = access
                mask = e.IBV_QP_STATE | (e.IBV_QP_ACCESS_FLAGS if target is not QpState.SQD else 0)
                hw.qp.modify(attr, mask)
        except self.fabric.device_errors as err:
            raise CommandError(f"QP {qp.qpn:#x}: the RDMA device refused {prev.name} -> "
                               f"{target.name}: {err}", _status_of(err)) from None
        if target is QpState.RTS:
            self.progress(now)

    def on_error(self) -> None:
        """The guest QP enters ERR (the core flushes its rings): first deliver
        what the device has already completed, then move the device QP to ERR
        and drop what it reports after that (flushes)."""
        if self.failed or self._draining:
            return
        self._draining = True
        try:
            self.hw.binding.poll(self.hw.shared)
        finally:
            self._draining = False
        self.failed = True
        self.posted.clear()
        self.recv_ids.clear()
        import pyverbs.enums as e
        from pyverbs.qp import QPAttr

        try:
            self.hw.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        except self.fabric.device_errors as err:
            log.warning("QP %#x: device QP to ERR: %s", self.qp.qpn, err)

    def close(self) -> None:
        """The guest QP went to RESET or is destroyed: reset the device QP."""
        if self.closed:
            return
        self.closed = True
        self.posted.clear()
        self.recv_ids.clear()
        if self.hw.qp is not None:
            try:
                self.hw.reset()
            except self.fabric.device_errors as err:
                log.warning("QP %#x: device QP to RESET: %s", self.qp.qpn, err)
        self.hw.engine = None

    def deadline(self) -> float | None:
        return None  # the device keeps its own timers

    def on_timer(self, now: float) -> None:
        self.poll()

    def poll(self) -> int:
        return self.hw.binding.poll(self.hw.shared)

    # ------------------------------------------------------------- send side
    def progress(self, now: float) -> None:
        drive_sq(self.dev, self.qp, self, now)

    # the ring consumer's SendEngine and RecvEngine (virtio_rdma.rings)
    @property
    def refusals(self) -> tuple:
        return self.fabric.device_errors

    def may_start(self, now: float) -> bool:
        return not self.failed

    def fence_pending(self) -> bool:
        return False  # IBV_SEND_FENCE: the device orders it

    def started(self, now: float) -> None:
        pass

    def start_send(self, idx: int, wqe, signaled: bool, now: float) -> bool:
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        hw, op = self.hw, wqe.opcode
        if wqe.inline is not None:
            buf = hw.bounce_buffer()
            off = (idx % hw.sq_depth) * hw.inline_slot
            data = bytes(wqe.inline)
            if data:
                buf.write(data, len(data), off)
            sges = [(buf.buf + off, len(data), buf.lkey)]
        elif wqe.sges:
            sges = [(s.addr, s.length, s.lkey) for s in wqe.sges]
        else:  # pyverbs needs one SGE: an empty one
            buf = hw.bounce_buffer()
            sges = [(buf.buf, 0, buf.lkey)]
        flags = e.IBV_SEND_SIGNALED
        if wqe.send_flags & SendFlags.SOLICITED:
            flags |= e.IBV_SEND_SOLICITED
        if wqe.send_flags & SendFlags.FENCE:
            flags |= e.IBV_SEND_FENCE
        # pyverbs 44 never frees an SGE's or WR's C memory (its destructor
        # is misspelled): close() each exactly once (later pyverbs: idempotent)
        sg = [SGE(*x) for x in sges]
        try:
            wr = SendWR(wr_id=idx, opcode=int(op), num_sge=len(sg), sg=sg, send_flags=flags,
                        imm_data=wqe.imm_data if op in _IMM else 0)
        finally:
            for x in sg:
                x.close()
        try:
            if op in _RDMA:
                wr.set_wr_rdma(wqe.rkey, wqe.remote_addr)
            elif op in ATOMICS:
                wr.set_wr_atomic(wqe.rkey, wqe.remote_addr, wqe.compare_add, wqe.swap)
            hw.qp.post_send(wr)
        finally:
            wr.close()
        self.posted.append((idx, int(op), signaled, wqe.wr_id))
        return True

    def fail_send(self, idx: int, wr_id: int, opcode: int, status: WcStatus) -> None:
        """A WQE failed before reaching the device (see rings.fail_send);
        what the device completed before is delivered first."""
        self.on_error()
        if self.qp.state is not QpState.ERR:  # else a device error completion got there first
            fail_send(self.dev, self.qp, idx, wr_id, opcode, status)

    # ---------------------------------------------------------- receive side
    def rq_rung(self, now: float) -> None:
        """Hand the device every receive WQE the guest posted since the last call."""
        if not (self.failed or self.closed):
            drive_rq(self.dev, self.qp, self)

    def post_recv(self, idx: int, wqe) -> None:
        from pyverbs.wr import SGE, RecvWR

        if wqe.sges:
            sges = [(s.addr, s.length, s.lkey) for s in wqe.sges]
        else:
            buf = self.hw.bounce_buffer()
            sges = [(buf.buf, 0, buf.lkey)]
        sg = [SGE(*x) for x in sges]
        try:
            wr = RecvWR(wr_id=RECV_BIT | idx, num_sge=len(sg), sg=sg)
        finally:
            for x in sg:
                x.close()
        try:
            self.hw.qp.post_recv(wr)
        finally:
            wr.close()
        self.recv_ids.append(wqe.wr_id)

    # ------------------------------------------------------------ completions
    def complete(self, wc) -> None:
        """One device completion of this QP (from the shared CQ)."""
        qp, m = self.qp, self.fabric.metrics
        if self.failed or self.closed or qp.state in (QpState.ERR, QpState.RESET):
            m.stale_completions += 1
            return
        m.completions += 1
        if wc.wr_id & RECV_BIT:
            self._recv_done(wc)
        else:
            self._send_done(wc)
        if wc.status != 0:  # the device QP is in ERR now: so is the guest's
            m.error_completions += 1
            qp_error(self.dev, qp, None)

    def _send_done(self, wc) -> None:
        qp = self.qp
        if not self.posted:
            log.warning("QP %#x: device send completion with nothing posted (wr_id %#x)",
                        qp.qpn, wc.wr_id)
            return
        idx, opcode, signaled, wr_id = self.posted.popleft()
        if idx != wc.wr_id:
            log.warning("QP %#x: device completed slot %d, expected %d", qp.qpn, wc.wr_id, idx)
        send_done(self.dev, qp, idx, wr_id, opcode, _wc_status(wc.status), wc.byte_len, signaled)

    def _recv_done(self, wc) -> None:
        if not self.recv_ids:
            log.warning("QP %#x: device receive completion with nothing posted", self.qp.qpn)
            return
        wr_id = self.recv_ids.popleft()
        status = _wc_status(wc.status)
        flags, imm, opcode = 0, 0, WcOpcode.RECV
        if status is WcStatus.SUCCESS:
            if wc.opcode == _WC_RECV_RDMA_WITH_IMM:
                opcode = WcOpcode.RECV_RDMA_WITH_IMM
            if wc.wc_flags & _WC_WITH_IMM:
                flags, imm = int(WcFlags.WITH_IMM), wc.imm_data  # __be32, as the guest expects
        # the device does not say whether a SEND was solicited: a solicited-only
        # arm fires on every receive (a spurious wake-up, never a lost one)
        recv_done(self.dev, self.qp, wr_id, status, opcode, wc.byte_len, imm, flags, wc.src_qp,
                  solicited=True)


def _wc_status(v: int) -> WcStatus:
    try:
        return WcStatus(v)
    except ValueError:
        return WcStatus.GENERAL_ERR


class VerbsFabricService:
    """The daemon side of a :class:`VerbsFabric`: watches completion channels
    in the running event loop and closes the device context at shutdown."""

    def __init__(self, fabric: VerbsFabric):
        self.fabric = fabric
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.fabric.watch = self._watch
        self.fabric.unwatch = self.loop.remove_reader
        log.info("verbs fabric on %s port %d, GID index %d (%s)", self.fabric.device,
                 self.fabric.port, self.fabric.gid_index, gid_text(self.fabric.gid))

    def _watch(self, fd: int, callback) -> None:
        def ready():
            try:
                callback()
            except Exception:  # the daemon boundary: one QP must not stop the others
                self.fabric.metrics.internal_errors += 1
                log.exception("verbs fabric: internal error on a completion")
        assert self.loop is not None  # start() sets it before it installs this watch
        self.loop.add_reader(fd, ready)

    async def aclose(self) -> None:
        self.fabric.watch = self.fabric.unwatch = None
        self.fabric.close()
