"""The sans-I/O core of one virtio-rdma device instance (one guest).

Spec: docs/virtio-rdma.md. The vhost-user device (``virtio_rdma.device``)
feeds it the bytes of controlq requests, doorbellq buffers and the current
time, and delivers what :meth:`RdmaDeviceCore.process` returns to the eventq.
The core reads WQEs from and writes CQEs to guest memory through
``mem.translate`` (a :class:`virtio.memory.GuestMemory`) and reaches peer QPs
through a :class:`~fabric.base.Fabric`. It does no I/O, keeps no
clock (``now`` is a monotonic time in seconds, passed in) and never lets an
exception escape: a misbehaving guest gets error statuses, error completions,
async events and counters (:class:`~virtio_rdma.metrics.Metrics`).

Public API::

    core = RdmaDeviceCore(mem, fabric, limits=DeviceLimits())
    resp: bytes = core.handle_control(request_bytes, now)
    core.doorbell(doorbell_buffer_bytes, now)      # or a list of wire.Doorbell
    result = core.process(now)  # -> ProcessResult(events=[wire.Event...], next_deadline)
    core.config_bytes()         # struct virtio_rdma_config
    core.notify = callback      # called when a peer's request queued events here
    core.close()                # destroy every QP (detach from the fabric)

Tenant limits: ``RdmaDeviceCore(..., account=TenantAccount)`` charges every
PD, CQ, MR (and its bytes) and QP (and its ring entries) to the connection's
account (:mod:`vhost_user.tenancy`) when creating it and releases it when the
object goes or the core closes; a refused charge is the command's status
(ENOMEM: the connection's own cap; ENOSPC: its uid's host-wide budget).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from vhost_user.tenancy import LimitExceeded, Resource, TenantAccount, TenantPolicy
from virtio.errors import GuestMemoryError
from virtio.memory import le32_words
from virtio_rdma import datapath
from virtio_rdma.datapath import DbrecScanner
from verbs import (
    PSN_MASK,
    Access,
    AsyncEvent,
    AtomicCap,
    LinkLayer,
    Mtu,
    PortState,
    QpAttrMask as M,
    QpState,
    QpType,
)
from virtio_rdma.constants import OBJ_NUM_MASK, Cmd, CreateQpFlags, DoorbellKind, EventKind, Status
from virtio_rdma.cq import CompletionQueue, PushResult
from virtio_rdma.errors import CommandError, UnknownValueError, VirtioRdmaError
from fabric.base import Fabric
from virtio_rdma.metrics import Metrics
from virtio_rdma.mr import MrTable
from virtio_rdma.qp import QueuePair
from virtio_rdma.qp_state import check_transition
from virtio_rdma.wire import (
    CQE_SIZE,
    DBREC_SIZE,
    Completion,
    Doorbell,
    Event,
    decode_doorbells,
    decode_request,
    encode_config,
    encode_response,
    wq_layout,
)

log = logging.getLogger(__name__)
U32 = 1 << 32
_POLICY_DEFAULTS = TenantPolicy()  # the object caps are defined once, there


@dataclass(frozen=True)
class DeviceLimits:
    """What one device instance reports in QUERY_DEVICE and enforces. The
    object caps are the tenant policy's per-connection caps
    (``vhost_user.tenancy.TenantPolicy``, whose defaults they take): a connection filled
    to them costs the daemon about 5 MB (QP ~2.2 KiB, CQ ~0.5 KiB, MR ~0.6 KiB,
    PD ~0.3 KiB; measured, see bench/isolation_bench.py)."""

    max_qp: int = _POLICY_DEFAULTS.max_qp
    max_cq: int = _POLICY_DEFAULTS.max_cq
    max_mr: int = _POLICY_DEFAULTS.max_mr
    max_pd: int = _POLICY_DEFAULTS.max_pd
    max_qp_wr: int = 4096
    max_cqe: int = 65536
    max_sge: int = 16
    max_inline_data: int = 256
    max_mr_chunks: int = 65536
    max_mr_size: int = 1 << 40
    max_qp_rd_atom: int = 16
    max_msg_sz: int = 1 << 31
    active_mtu: Mtu = Mtu.MTU_4096
    max_pending_events: int = 1 << 16
    node_guid: int = 0x5652_444D_4100_0001


@dataclass
class ProcessResult:
    events: list[Event] = field(default_factory=list)
    next_deadline: float | None = None


def _cmd_error(msg: str, status: Status) -> CommandError:
    return CommandError(msg, status)


class RdmaDeviceCore:
    def __init__(self, mem, fabric: Fabric, *, limits: DeviceLimits | None = None,
                 poll_doorbell_records: bool = False, account: TenantAccount | None = None):
        self.mem = mem
        #: the connection's tenant account (None: no budgets beyond ``limits``)
        self.account = account
        self.fabric = fabric
        self.limits = limits or DeviceLimits()
        self.poll_doorbell_records = poll_doorbell_records
        self.metrics = Metrics()
        #: the guest's objects on a host RDMA device (verbs fabric; it may lower
        #: the limits to the device's), else None
        self.hw = fabric.bind(self)
        self.mrs = MrTable(self.limits.max_mr, self.limits.max_mr_chunks, self.limits.max_mr_size)
        self.pds: dict[int, int] = {}  # pdn -> QP reference count
        self.cqs: dict[int, CompletionQueue] = {}
        self.qps: dict[int, QueuePair] = {}
        self._next_pdn = 1
        self._next_cqn = 1
        self._events: deque[Event] = deque()
        self._timers: set[int] = set()  # QPNs with a possible deadline
        self._qp_epoch = 0  # bumped by every CREATE_QP: with len(qps), when to rebuild the scanner
        self._dbrecs = DbrecScanner() if DbrecScanner is not None else None
        self.notify = None
        self._in_call = 0
        self._handlers = {
            Cmd.QUERY_DEVICE: self._query_device,
            Cmd.QUERY_PORT: self._query_port,
            Cmd.QUERY_GID: self._query_gid,
            Cmd.ALLOC_PD: self._alloc_pd,
            Cmd.DEALLOC_PD: self._dealloc_pd,
            Cmd.CREATE_CQ: self._create_cq,
            Cmd.DESTROY_CQ: self._destroy_cq,
            Cmd.REQ_NOTIFY_CQ: self._req_notify_cq,
            Cmd.REG_MR: self._reg_mr,
            Cmd.DEREG_MR: self._dereg_mr,
            Cmd.CREATE_QP: self._create_qp,
            Cmd.MODIFY_QP: self._modify_qp,
            Cmd.QUERY_QP: self._query_qp,
            Cmd.DESTROY_QP: self._destroy_qp,
        }

    # ------------------------------------------------------------------
    # services used by the datapath
    # ------------------------------------------------------------------
    def complete(self, cq: CompletionQueue, c: Completion, solicited: bool = False) -> None:
        r = cq.push(self.mem, c, solicited)
        if r is PushResult.WRITTEN or r is PushResult.WRITTEN_NOTIFY:
            self.metrics.completions += 1
            if r is PushResult.WRITTEN_NOTIFY:
                self.metrics.completion_events += 1
                self._queue_event(Event(EventKind.COMPLETION, 0, cq.cqn))
            return
        if r is PushResult.DROPPED:
            self.metrics.completions_dropped += 1
            return
        if r is PushResult.OVERFLOW:
            self.metrics.cq_overflows += 1
        else:
            self.metrics.cq_faults += 1
        self.metrics.completions_dropped += 1
        self.async_event(AsyncEvent.CQ_ERR, cq.cqn)
        for qpn in sorted(cq.qps):
            qp = self.qps.get(qpn)
            if qp is not None:
                datapath.qp_error(self, qp, AsyncEvent.QP_FATAL)

    def async_event(self, event: AsyncEvent, number: int) -> None:
        self.metrics.async_events += 1
        self._queue_event(Event(EventKind.ASYNC, int(event), number))

    def _queue_event(self, ev: Event) -> None:
        if len(self._events) >= self.limits.max_pending_events:
            self.metrics.events_dropped += 1
            return
        self._events.append(ev)
        if not self._in_call and self.notify is not None:
            self.notify()

    # ------------------------------------------------------------------
    # controlq
    # ------------------------------------------------------------------
    def handle_control(self, request, now: float) -> bytes:
        """Execute one control request; return the response bytes (status + body)."""
        self.metrics.commands += 1
        self._in_call += 1
        try:
            try:
                cmd, body = decode_request(request)
            except UnknownValueError as e:
                self.metrics.malformed_commands += 1
                log.debug("control: %s", e)
                return encode_response(Cmd.QUERY_DEVICE, Status.EOPNOTSUPP)
            except VirtioRdmaError as e:
                self.metrics.malformed_commands += 1
                log.debug("control: %s", e)
                return encode_response(Cmd.QUERY_DEVICE, Status.EINVAL)
            try:
                fields = self._handlers[cmd](body, now) or {}
                return encode_response(cmd, Status.OK, **fields)
            except (VirtioRdmaError, UnknownValueError) as e:
                self.metrics.command_errors += 1
                log.debug("control %s: %s", cmd.name, e)
                return encode_response(cmd, Status.parse(e.status))
            except GuestMemoryError as e:
                self.metrics.command_errors += 1
                log.debug("control %s: %s", cmd.name, e)
                return encode_response(cmd, Status.EFAULT)
        except Exception:  # the daemon boundary: a bug here must not kill other guests
            self.metrics.internal_errors += 1
            log.exception("virtio-rdma: internal error in control command")
            return encode_response(Cmd.QUERY_DEVICE, Status.EIO)
        finally:
            self._in_call -= 1

    def _charge(self, *charges, check_only: bool = False) -> None:
        """Charge ``(Resource, amount)`` pairs to the account, all or none;
        ``check_only``: only raise if they would not fit."""
        if self.account is not None:
            try:
                self.account.charge_all(charges, check_only=check_only)
            except LimitExceeded as e:
                raise _cmd_error(str(e), Status(e.errno)) from None

    def _release(self, *charges) -> None:
        if self.account is not None:
            for r, n in charges:
                self.account.release(r, n)

    def _query_device(self, body, now):
        L = self.limits
        return dict(fw_ver=1, node_guid=L.node_guid, sys_image_guid=L.node_guid,
                    max_mr_size=L.max_mr_size, page_size_cap=0xFFFFF000, vendor_id=0x1AF4,
                    vendor_part_id=42, hw_ver=1, max_qp=L.max_qp, max_qp_wr=L.max_qp_wr,
                    device_cap_flags=0, max_sge=L.max_sge, max_cq=L.max_cq, max_cqe=L.max_cqe,
                    max_mr=L.max_mr, max_pd=L.max_pd, max_qp_rd_atom=L.max_qp_rd_atom,
                    max_qp_init_rd_atom=L.max_qp_rd_atom, max_inline_data=L.max_inline_data,
                    atomic_cap=AtomicCap.HCA, max_mr_chunks=L.max_mr_chunks, phys_port_cnt=1,
                    max_msg_sz=min(L.max_msg_sz, U32 - 1))

    def _check_port(self, port: int) -> None:
        if port != 1:
            raise _cmd_error(f"port_num {port} (the device has port 1)", Status.EINVAL)

    def _query_port(self, body, now):
        self._check_port(body["port_num"])
        return dict(state=PortState.ACTIVE, max_mtu=Mtu.MTU_4096, active_mtu=self.limits.active_mtu,
                    gid_tbl_len=1, port_cap_flags=0, max_msg_sz=min(self.limits.max_msg_sz, U32 - 1),
                    pkey_tbl_len=1, link_layer=LinkLayer.ETHERNET, active_speed=0, active_width=0,
                    phys_state=5)

    def _query_gid(self, body, now):
        self._check_port(body["port_num"])
        if body["index"] != 0:
            raise _cmd_error(f"GID index {body['index']} (the table has 1 entry)", Status.EINVAL)
        return dict(gid=self.fabric.gid)

    def _alloc_pd(self, body, now):
        self._charge((Resource.PD, 1), check_only=True)
        if len(self.pds) >= self.limits.max_pd:
            raise _cmd_error(f"max_pd {self.limits.max_pd} reached", Status.ENOMEM)
        while self._next_pdn in self.pds or self._next_pdn == 0:
            self._next_pdn = (self._next_pdn + 1) & OBJ_NUM_MASK
        pdn = self._next_pdn
        self._next_pdn = (pdn + 1) & OBJ_NUM_MASK
        self.pds[pdn] = 0
        self._charge((Resource.PD, 1))  # fits: checked above
        return dict(pdn=pdn)

    def _pd(self, pdn: int) -> int:
        if pdn not in self.pds:
            raise _cmd_error(f"no PD {pdn}", Status.ENOENT)
        return pdn

    def _dealloc_pd(self, body, now):
        pdn = self._pd(body["pdn"])
        if self.pds[pdn] or self.mrs.by_pd.get(pdn):
            raise _cmd_error(f"PD {pdn} is used by {self.pds[pdn]} QPs and "
                             f"{self.mrs.by_pd.get(pdn, 0)} MRs", Status.EBUSY)
        del self.pds[pdn]
        self._release((Resource.PD, 1))
        if self.hw is not None:
            self.hw.dealloc_pd(pdn)

    def _check_gpa(self, what: str, gpa: int, length: int) -> None:
        try:
            self.mem.translate(gpa, length).release()
        except GuestMemoryError as e:
            raise _cmd_error(f"{what} at gpa {gpa:#x} (+{length}) is not guest memory: {e}",
                             Status.EFAULT) from None

    def _create_cq(self, body, now):
        n = body["cqe"]
        if n < 1 or n > self.limits.max_cqe or n & (n - 1):
            raise _cmd_error(f"cqe {n} is not a power of two in 1..{self.limits.max_cqe}", Status.EINVAL)
        if body["comp_vector"] != 0:
            raise _cmd_error(f"comp_vector {body['comp_vector']} (the device has 1)", Status.EINVAL)
        self._charge((Resource.CQ, 1), check_only=True)
        if len(self.cqs) >= self.limits.max_cq:
            raise _cmd_error(f"max_cq {self.limits.max_cq} reached", Status.ENOMEM)
        self._check_gpa("CQ ring", body["ring_gpa"], n * CQE_SIZE)
        self._check_gpa("CQ doorbell record", body["dbrec_gpa"], DBREC_SIZE)
        while self._next_cqn in self.cqs or self._next_cqn == 0:
            self._next_cqn = (self._next_cqn + 1) & OBJ_NUM_MASK
        cqn = self._next_cqn
        self._next_cqn = (cqn + 1) & OBJ_NUM_MASK
        self.cqs[cqn] = CompletionQueue(cqn, n, body["ring_gpa"], body["dbrec_gpa"])
        self._charge((Resource.CQ, 1))  # fits: checked above
        return dict(cqn=cqn, cqe=n)

    def _cq(self, cqn: int) -> CompletionQueue:
        cq = self.cqs.get(cqn)
        if cq is None:
            raise _cmd_error(f"no CQ {cqn}", Status.ENOENT)
        return cq

    def _destroy_cq(self, body, now):
        cq = self._cq(body["cqn"])
        if cq.qps:
            raise _cmd_error(f"CQ {cq.cqn} is used by QPs {sorted(cq.qps)[:8]}", Status.EBUSY)
        del self.cqs[cq.cqn]
        self._release((Resource.CQ, 1))

    def _req_notify_cq(self, body, now):
        cq = self._cq(body["cqn"])
        cq.request_notify(body["flags"])

    def _reg_mr(self, body, now):
        pdn = self._pd(body["pdn"])
        chunks = [(c["gpa"], c["length"]) for c in body["chunks"]]
        backing = None
        if self.hw is not None:  # the HCA's keys become the guest's
            hw = self.hw
            backing = lambda access: hw.reg_mr(pdn, access, body["iova"], body["length"], chunks)  # noqa: E731
        charge = ((Resource.MR, 1), (Resource.PINNED_BYTES, body["length"]))
        self._charge(*charge, check_only=True)
        mr = self.mrs.register(self.mem, pdn, body["access"], body["iova"], body["length"],
                               chunks, backing=backing)
        self._charge(*charge)  # fits: checked above, nothing ran in between
        return dict(lkey=mr.lkey, rkey=mr.rkey)

    def _dereg_mr(self, body, now):
        mr = self.mrs.deregister(body["lkey"])
        self._release((Resource.MR, 1), (Resource.PINNED_BYTES, mr.length))

    def _create_qp(self, body, now):
        L = self.limits
        pdn = self._pd(body["pdn"])
        try:
            qpt = QpType.parse(body["qp_type"])
        except UnknownValueError:
            raise _cmd_error(f"qp_type {body['qp_type']}", Status.EINVAL) from None
        if qpt is not QpType.RC:
            raise _cmd_error(f"qp_type {qpt.name} is not supported (RC only)", Status.EOPNOTSUPP)
        scq, rcq = self._cq(body["send_cqn"]), self._cq(body["recv_cqn"])
        flags = CreateQpFlags.parse(body["flags"])
        for name, lim in (("max_send_wr", L.max_qp_wr), ("max_recv_wr", L.max_qp_wr),
                          ("max_send_sge", L.max_sge), ("max_recv_sge", L.max_sge),
                          ("max_inline_data", L.max_inline_data)):
            if body[name] > lim:
                raise _cmd_error(f"{name} {body[name]} exceeds {lim}", Status.EINVAL)
        self._charge((Resource.QP, 1), check_only=True)
        if len(self.qps) >= L.max_qp:
            raise _cmd_error(f"max_qp {L.max_qp} reached", Status.ENOMEM)
        lay = wq_layout(body["max_send_wr"], body["max_recv_wr"], body["max_send_sge"],
                        body["max_recv_sge"], body["max_inline_data"])
        self._check_gpa("SQ ring", body["sq_gpa"], lay.sq_bytes)
        self._check_gpa("RQ ring", body["rq_gpa"], lay.rq_bytes)
        self._check_gpa("QP doorbell record", body["dbrec_gpa"], DBREC_SIZE)
        charge = ((Resource.QP, 1), (Resource.WQES, lay.sq_depth + lay.rq_depth))
        self._charge(*charge, check_only=True)
        hwqp = None
        if self.hw is not None:  # the HCA's QP number is the guest's (it is on the wire)
            hwqp = self.hw.create_qp(pdn, lay)
            qpn = hwqp.qpn
        else:
            try:
                qpn = self.fabric.alloc_qpn()
            except VirtioRdmaError as e:
                raise _cmd_error(str(e), Status.ENOMEM) from None
        qp = QueuePair(self, qpn, pdn, scq, rcq, lay, body["sq_gpa"], body["rq_gpa"],
                       body["dbrec_gpa"], bool(flags & CreateQpFlags.SQ_SIG_ALL))
        qp.hw = hwqp
        try:
            self.fabric.attach(qpn, qp)
        except BaseException:
            if hwqp is not None:
                hwqp.close()
            raise
        self.qps[qpn] = qp
        self._charge(*charge)  # fits: checked above
        self._qp_epoch += 1
        self.pds[pdn] += 1
        scq.qps.add(qpn)
        rcq.qps.add(qpn)
        return dict(qpn=qpn, max_send_wr=lay.sq_depth, max_recv_wr=lay.rq_depth,
                    max_send_sge=min(lay.max_send_sge, L.max_sge),
                    max_recv_sge=min(lay.max_recv_sge, L.max_sge),
                    max_inline_data=min(lay.max_inline_data, L.max_inline_data),
                    sq_wqe_shift=lay.sq_wqe_shift, rq_wqe_shift=lay.rq_wqe_shift)

    def _qp(self, qpn: int) -> QueuePair:
        qp = self.qps.get(qpn)
        if qp is None:
            raise _cmd_error(f"no QP {qpn:#x}", Status.ENOENT)
        return qp

    def _validate_attr(self, mask: M, a: dict) -> None:
        L = self.limits

        def bad(name):
            raise _cmd_error(f"MODIFY_QP {name}={a[name]!r} is invalid", Status.EINVAL)

        if mask & M.PORT and a["port_num"] != 1:
            bad("port_num")
        if mask & M.PKEY_INDEX and a["pkey_index"] != 0:
            bad("pkey_index")
        if mask & M.ACCESS_FLAGS:
            try:
                acc = Access.parse(a["qp_access_flags"])
            except UnknownValueError:
                bad("qp_access_flags")
            if acc & ~(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC):
                bad("qp_access_flags")
        if mask & M.PATH_MTU and not 1 <= a["path_mtu"] <= self.limits.active_mtu:
            bad("path_mtu")
        if mask & M.TIMEOUT and a["timeout"] > 31:
            bad("timeout")
        if mask & M.MIN_RNR_TIMER and a["min_rnr_timer"] > 31:
            bad("min_rnr_timer")
        if mask & M.RETRY_CNT and a["retry_cnt"] > 7:
            bad("retry_cnt")
        if mask & M.RNR_RETRY and a["rnr_retry"] > 7:
            bad("rnr_retry")
        if mask & M.RQ_PSN and a["rq_psn"] > PSN_MASK:
            bad("rq_psn")
        if mask & M.SQ_PSN and a["sq_psn"] > PSN_MASK:
            bad("sq_psn")
        if mask & M.DEST_QPN and not 2 <= a["dest_qp_num"] <= OBJ_NUM_MASK:
            bad("dest_qp_num")
        if mask & M.MAX_QP_RD_ATOMIC and a["max_rd_atomic"] > L.max_qp_rd_atom:
            bad("max_rd_atomic")
        if mask & M.MAX_DEST_RD_ATOMIC and a["max_dest_rd_atomic"] > L.max_qp_rd_atom:
            bad("max_dest_rd_atomic")
        if mask & M.AV and a["sgid_index"] != 0:
            bad("sgid_index")

    _ATTR_FIELDS = {
        M.PORT: ("port_num",), M.PKEY_INDEX: ("pkey_index",), M.ACCESS_FLAGS: ("qp_access_flags",),
        M.PATH_MTU: ("path_mtu",), M.TIMEOUT: ("timeout",), M.MIN_RNR_TIMER: ("min_rnr_timer",),
        M.RETRY_CNT: ("retry_cnt",), M.RNR_RETRY: ("rnr_retry",), M.RQ_PSN: ("rq_psn",),
        M.SQ_PSN: ("sq_psn",), M.DEST_QPN: ("dest_qp_num",), M.MAX_QP_RD_ATOMIC: ("max_rd_atomic",),
        M.MAX_DEST_RD_ATOMIC: ("max_dest_rd_atomic",), M.QKEY: ("qkey",),
        M.AV: ("dgid", "sgid_index", "hop_limit", "traffic_class", "flow_label"),
        M.PATH_MIG_STATE: ("path_mig_state",), M.EN_SQD_ASYNC_NOTIFY: ("en_sqd_async_notify",),
    }

    def _modify_qp(self, body, now):
        qp = self._qp(body["qpn"])
        a = body["attr"]
        try:
            mask = M.parse(body["attr_mask"])
        except UnknownValueError as e:
            raise _cmd_error(str(e), Status.EINVAL) from None
        target = check_transition(qp.state, mask, a["qp_state"] if mask & M.STATE else None,
                                  a["cur_qp_state"])
        self._validate_attr(mask, a)
        prev = qp.state
        if target is QpState.RESET:
            self._close_net(qp)
            qp.reset()
            return
        for bit, names in self._ATTR_FIELDS.items():
            if mask & bit:
                for n in names:
                    qp.attr[n] = a[n]
        if mask & M.ACCESS_FLAGS:
            qp.access = Access(a["qp_access_flags"])
        if mask & M.RETRY_CNT:
            qp.retry_left = a["retry_cnt"]
        if mask & M.RNR_RETRY:
            qp.rnr_left = a["rnr_retry"]
        if mask & M.RQ_PSN:
            qp.epsn = a["rq_psn"]
        if mask & M.SQ_PSN:
            qp.sq_psn = a["sq_psn"]
        if target is QpState.ERR:
            datapath.qp_error(self, qp, None)
            return
        qp.state = target
        qp.attr["qp_state"] = int(target)
        opened = False
        if qp.net is None and target is QpState.RTR and prev is QpState.INIT:
            # a peer on another host gets a wire engine (None: same-host message path)
            qp.net = self.fabric.open_wire_qp(self, qp, now)
            opened = qp.net is not None
        if qp.net is not None:
            try:
                qp.net.modified(prev, target, now)
            except CommandError:  # the transport (an RDMA device) refused: stay in prev
                if opened:
                    self._close_net(qp)
                qp.state = prev
                qp.attr["qp_state"] = int(prev)
                raise
        if target is QpState.SQD and prev is not QpState.SQD and not qp.inflight \
                and qp.attr["en_sqd_async_notify"]:
            self.async_event(AsyncEvent.SQ_DRAINED, qp.qpn)
        if target is QpState.RTS:
            datapath.progress_sq(self, qp, now)
            self._timers.add(qp.qpn)

    def _query_qp(self, body, now):
        qp = self._qp(body["qpn"])
        attr = dict(qp.attr)
        attr.update(qp_state=int(qp.state), cur_qp_state=int(qp.state), port_num=attr["port_num"] or 1,
                    sq_draining=int(qp.state is QpState.SQD and bool(qp.inflight)),
                    qp_access_flags=int(qp.access), rq_psn=qp.epsn, sq_psn=qp.sq_psn,
                    max_send_wr=qp.layout.sq_depth, max_recv_wr=qp.layout.rq_depth,
                    max_send_sge=min(qp.layout.max_send_sge, self.limits.max_sge),
                    max_recv_sge=min(qp.layout.max_recv_sge, self.limits.max_sge),
                    max_inline_data=min(qp.layout.max_inline_data, self.limits.max_inline_data))
        return dict(attr=attr, pdn=qp.pdn, qp_type=int(QpType.RC), send_cqn=qp.send_cq.cqn,
                    recv_cqn=qp.recv_cq.cqn, flags=int(CreateQpFlags.SQ_SIG_ALL) if qp.sq_sig_all else 0,
                    qpn=qp.qpn)

    def _destroy_qp(self, body, now):
        qp = self._qp(body["qpn"])
        self._drop_qp(qp)

    def _close_net(self, qp: QueuePair) -> None:
        if qp.net is not None:
            net, qp.net = qp.net, None
            net.close()

    def _drop_qp(self, qp: QueuePair) -> None:
        self._close_net(qp)
        qp.destroyed = True
        qp.inflight.clear()
        self.fabric.detach(qp.qpn)
        if qp.hw is not None:
            hw, qp.hw = qp.hw, None
            hw.close()
        else:
            self.fabric.free_qpn(qp.qpn)
        del self.qps[qp.qpn]
        self._release((Resource.QP, 1), (Resource.WQES, qp.layout.sq_depth + qp.layout.rq_depth))
        self._timers.discard(qp.qpn)
        self.pds[qp.pdn] -= 1
        qp.send_cq.qps.discard(qp.qpn)
        qp.recv_cq.qps.discard(qp.qpn)

    # ------------------------------------------------------------------
    # doorbells
    # ------------------------------------------------------------------
    def doorbell(self, records, now: float) -> None:
        """Consume one doorbellq buffer (bytes) or a list of :class:`wire.Doorbell`."""
        self._in_call += 1
        try:
            if not isinstance(records, list):
                try:
                    records = decode_doorbells(records)
                except (VirtioRdmaError, UnknownValueError) as e:
                    self.metrics.malformed_doorbell_buffers += 1
                    log.debug("doorbell buffer dropped: %s", e)
                    return
            for db in records:
                self.metrics.doorbells += 1
                self._ring(db, now)
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("virtio-rdma: internal error in doorbell")
        finally:
            self._in_call -= 1
        self._flush_notify()

    def _ring(self, db: Doorbell, now: float) -> None:
        if db.kind is DoorbellKind.CQ_ARM:
            cq = self.cqs.get(db.num)
            if cq is None:
                self.metrics.bad_doorbells += 1
                return
            cq.request_notify(db.value)
            return
        qp = self.qps.get(db.num)
        if qp is None or qp.state is QpState.RESET:
            self.metrics.bad_doorbells += 1
            return
        if db.kind is DoorbellKind.SQ:
            if not self._advance(qp, "sq", db.value, qp.sq_ci, qp.sq_pi, qp.layout.sq_depth):
                return
            qp.sq_pi = db.value
            if qp.state is QpState.ERR:
                datapath.flush(self, qp)
            else:
                datapath.progress_sq(self, qp, now)
                if qp.inflight or qp.rnr_until is not None or qp.net is not None:
                    self._timers.add(qp.qpn)
        else:
            if not self._advance(qp, "rq", db.value, qp.rq_ci, qp.rq_pi, qp.layout.rq_depth):
                return
            qp.rq_pi = db.value
            if qp.state is QpState.ERR:
                datapath.flush(self, qp)
            elif qp.net is not None:  # a wire engine may hand receives to its transport now
                qp.net.rq_rung(now)

    def _advance(self, qp: QueuePair, which: str, pi: int, ci: int, old_pi: int, depth: int) -> bool:
        if self.poll_doorbell_records and pi != old_pi and (old_pi - pi) % U32 < U32 // 2:
            # DBREC_POLL: the record may already have carried us past this
            # doorbell (the driver writes the record first, and the WQEs may
            # even have completed): a value behind the current pi is stale,
            # no error, just no news.
            return False
        if (pi - ci) % U32 > depth or (pi - old_pi) % U32 > depth:
            self.metrics.bad_doorbells += 1
            log.debug("QP %#x %s producer index %d (ci %d, depth %d) is absurd", qp.qpn, which,
                      pi, ci, depth)
            datapath.qp_error(self, qp, AsyncEvent.QP_FATAL)
            return False
        return True

    def _poll_dbrecs(self, now: float) -> int:
        """Apply every QP doorbell record that changed (DBREC_POLL); returns
        how many QPs had a new record. A native scanner finds them; each is
        then read again and applied like a doorbell."""
        if self._dbrecs is None:
            qps = list(self.qps.values())
        else:
            key = (len(self.qps), self._qp_epoch)
            if self._dbrecs.key != key:
                self._dbrecs.rebuild(self.qps.values(), key)
            qps = self._dbrecs.scan(self.mem)
        n = 0
        for qp in qps:
            if qp.state is QpState.RESET or qp.destroyed:
                continue
            try:
                sq_pi, rq_pi = le32_words(self.mem.translate(qp.dbrec_gpa, DBREC_SIZE))  # each word whole
            except GuestMemoryError:
                continue
            if rq_pi != qp.rq_pi:
                n += 1
                self._ring(Doorbell(DoorbellKind.RQ, qp.qpn, rq_pi), now)
            if sq_pi != qp.sq_pi and qp.qpn in self.qps:
                n += 1
                self._ring(Doorbell(DoorbellKind.SQ, qp.qpn, sq_pi), now)
        return n

    def poll(self, now: float) -> int:
        """Busy-poll entry (the daemon's spin loop): apply changed doorbell
        records if DBREC_POLL is on; returns how many were applied."""
        if not self.poll_doorbell_records:
            return 0
        self._in_call += 1
        try:
            n = self._poll_dbrecs(now)
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("virtio-rdma: internal error polling doorbell records")
            n = 0
        finally:
            self._in_call -= 1
        self._flush_notify()
        return n

    # ------------------------------------------------------------------
    # timers and events
    # ------------------------------------------------------------------
    def process(self, now: float) -> ProcessResult:
        """Run due timers (retransmission, RNR retry) and return the events to
        deliver on the eventq plus the next time :meth:`process` must run."""
        self._in_call += 1
        try:
            if self.poll_doorbell_records:
                self._poll_dbrecs(now)
            nd = None
            for qpn in list(self._timers):
                qp = self.qps.get(qpn)
                if qp is None:
                    self._timers.discard(qpn)
                    continue
                d = datapath.deadline(qp)
                if d is not None and now >= d:
                    datapath.on_timer(self, qp, now)
                    d = datapath.deadline(qp)
                if d is None:
                    if not qp.inflight:
                        self._timers.discard(qpn)
                    continue
                nd = d if nd is None else min(nd, d)
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("virtio-rdma: internal error in process")
            nd = None
        finally:
            self._in_call -= 1
        events = list(self._events)
        self._events.clear()
        return ProcessResult(events, nd)

    def _flush_notify(self) -> None:
        if self._events and self.notify is not None:
            self.notify()

    @property
    def pending_events(self) -> int:
        return len(self._events)

    @property
    def has_timers(self) -> bool:
        """Some QP may have a deadline (process() must run to learn when)."""
        return bool(self._timers)

    def config_bytes(self) -> bytes:
        L = self.limits
        return encode_config(phys_port_cnt=1, max_qp=L.max_qp, max_cq=L.max_cq, max_mr=L.max_mr,
                             max_pd=L.max_pd, max_qp_wr=L.max_qp_wr, max_cqe=L.max_cqe,
                             max_sge=L.max_sge, max_inline_data=L.max_inline_data, reserved=0,
                             node_guid=L.node_guid, gid=self.fabric.gid)

    def close(self) -> None:
        """Destroy every QP (detaching them from the fabric) and forget all objects."""
        for qp in list(self.qps.values()):
            self._drop_qp(qp)
        self.mrs.clear()
        self.cqs.clear()
        self.pds.clear()
        self._events.clear()
        if self.account is not None:  # every object is gone: so is its charge
            self.account.release_all()
        if self.hw is not None:
            hw, self.hw = self.hw, None
            hw.close()
