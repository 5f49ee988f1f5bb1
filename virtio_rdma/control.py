"""The controlq of a virtio-rdma device: one handler per command (spec 5.3,
docs/virtio-rdma.md "Control commands").

:func:`handle_control` decodes a request once into its dataclass
(:func:`virtio_rdma.wire.decode_request`), calls the command's handler from
:data:`HANDLERS` and encodes the response dataclass it returns (or the
status of the error it raised). Handlers take the device core
(:class:`~virtio_rdma.core.RdmaDeviceCore`, whose state they change), the
request and ``now``; they check semantics (does the PD exist, do the limits
allow it) and raise :class:`CommandError` with the status the guest gets.

Resource charging: every PD, CQ, MR (and its bytes) and QP (and its ring
entries) is charged to the connection's tenant account
(:mod:`vhost_user.tenancy`) when created and released when it goes; a
refused charge is the command's status (ENOMEM: the connection's own cap;
ENOSPC: its uid's host-wide budget).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

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
from vhost_user.tenancy import LimitExceeded, Resource
from virtio.errors import GuestMemoryError
from virtio_rdma import accel, datapath, rings
from virtio_rdma.constants import OBJ_NUM_MASK, Cmd, CreateQpFlags, Feature, Status
from virtio_rdma.cq import CompletionQueue
from virtio_rdma.errors import CommandError, UnknownValueError, VirtioRdmaError
from virtio_rdma.events import async_event
from virtio_rdma.qp import QueuePair
from virtio_rdma.qp_state import check_transition
from virtio_rdma.wire import (
    CQE_SIZE,
    DBREC_SIZE,
    AckFeatures,
    AllocPdResp,
    CreateCqReq,
    CreateCqResp,
    CreateQpReq,
    CreateQpResp,
    DeallocPdReq,
    DeregMrReq,
    DestroyCqReq,
    DestroyQpReq,
    Empty,
    ModifyQpReq,
    QpAttr,
    QueryDeviceResp,
    QueryGidReq,
    QueryGidResp,
    QueryPortReq,
    QueryPortResp,
    QueryQpReq,
    QueryQpResp,
    RegMrReq,
    RegMrResp,
    ReqNotifyCqReq,
    decode_request,
    encode_response,
    wq_layout,
)

if TYPE_CHECKING:
    from virtio_rdma.core import RdmaDeviceCore

log = logging.getLogger(__name__)
U32 = 1 << 32


def handle_control(core: RdmaDeviceCore, request, now: float) -> bytes:
    """Execute one control request; return the response bytes (status + body).
    Never raises: a bad request is a status and a counter."""
    core.metrics.commands += 1
    core.in_call += 1
    try:
        try:
            cmd, req = decode_request(request)
        except UnknownValueError as e:
            core.metrics.malformed_commands += 1
            log.debug("control: %s", e)
            return encode_response(Cmd.QUERY_DEVICE, Status.EOPNOTSUPP)
        except VirtioRdmaError as e:
            core.metrics.malformed_commands += 1
            log.debug("control: %s", e)
            return encode_response(Cmd.QUERY_DEVICE, Status.EINVAL)
        try:
            resp = HANDLERS[cmd](core, req, now)
            return encode_response(cmd, Status.OK, resp)
        except (VirtioRdmaError, UnknownValueError) as e:
            core.metrics.command_errors += 1
            log.debug("control %s: %s", cmd.name, e)
            return encode_response(cmd, Status.parse(e.status))
        except GuestMemoryError as e:
            core.metrics.command_errors += 1
            log.debug("control %s: %s", cmd.name, e)
            return encode_response(cmd, Status.EFAULT)
    except Exception:  # the daemon boundary: a bug here must not kill other guests
        core.metrics.internal_errors += 1
        log.exception("virtio-rdma: internal error in control command")
        return encode_response(Cmd.QUERY_DEVICE, Status.EIO)
    finally:
        core.in_call -= 1


# ---- resource charging --------------------------------------------------------------------
def charge(core: RdmaDeviceCore, *charges, check_only: bool = False) -> None:
    """Charge ``(Resource, amount)`` pairs to the account, all or none;
    ``check_only``: only raise if they would not fit."""
    if core.account is not None:
        try:
            core.account.charge_all(charges, check_only=check_only)
        except LimitExceeded as e:
            raise CommandError(str(e), Status(e.errno)) from None


def release(core: RdmaDeviceCore, *charges) -> None:
    if core.account is not None:
        for r, n in charges:
            core.account.release(r, n)


# ---- lookups and checks -------------------------------------------------------------------
def _check_port(port: int) -> None:
    if port != 1:
        raise CommandError(f"port_num {port} (the device has port 1)", Status.EINVAL)


def _pd(core: RdmaDeviceCore, pdn: int) -> int:
    if pdn not in core.pds:
        raise CommandError(f"no PD {pdn}", Status.ENOENT)
    return pdn


def _cq(core: RdmaDeviceCore, cqn: int) -> CompletionQueue:
    cq = core.cqs.get(cqn)
    if cq is None:
        raise CommandError(f"no CQ {cqn}", Status.ENOENT)
    return cq


def _qp(core: RdmaDeviceCore, qpn: int) -> QueuePair:
    qp = core.qps.get(qpn)
    if qp is None:
        raise CommandError(f"no QP {qpn:#x}", Status.ENOENT)
    return qp


def _check_gpa(core: RdmaDeviceCore, what: str, gpa: int, length: int) -> None:
    try:
        core.mem.translate(gpa, length).release()
    except GuestMemoryError as e:
        raise CommandError(f"{what} at gpa {gpa:#x} (+{length}) is not guest memory: {e}",
                           Status.EFAULT) from None


# ---- the commands -------------------------------------------------------------------------
def query_device(core: RdmaDeviceCore, req: Empty, now: float) -> QueryDeviceResp:
    L = core.limits
    return QueryDeviceResp(
        fw_ver=1, node_guid=L.node_guid, sys_image_guid=L.node_guid, max_mr_size=L.max_mr_size,
        page_size_cap=0xFFFFF000, vendor_id=0x1AF4, vendor_part_id=42, hw_ver=1, max_qp=L.max_qp,
        max_qp_wr=L.max_qp_wr, device_cap_flags=0, max_sge=L.max_sge, max_cq=L.max_cq,
        max_cqe=L.max_cqe, max_mr=L.max_mr, max_pd=L.max_pd, max_qp_rd_atom=L.max_qp_rd_atom,
        max_qp_init_rd_atom=L.max_qp_rd_atom, max_inline_data=L.max_inline_data,
        atomic_cap=AtomicCap.HCA, max_mr_chunks=L.max_mr_chunks, phys_port_cnt=1,
        max_msg_sz=min(L.max_msg_sz, U32 - 1))


def query_port(core: RdmaDeviceCore, req: QueryPortReq, now: float) -> QueryPortResp:
    _check_port(req.port_num)
    return QueryPortResp(
        state=PortState.ACTIVE, max_mtu=Mtu.MTU_4096, active_mtu=core.limits.active_mtu,
        gid_tbl_len=1, port_cap_flags=0, max_msg_sz=min(core.limits.max_msg_sz, U32 - 1),
        pkey_tbl_len=1, link_layer=LinkLayer.ETHERNET, active_speed=0, active_width=0, phys_state=5)


def query_gid(core: RdmaDeviceCore, req: QueryGidReq, now: float) -> QueryGidResp:
    _check_port(req.port_num)
    if req.index != 0:
        raise CommandError(f"GID index {req.index} (the table has 1 entry)", Status.EINVAL)
    return QueryGidResp(gid=core.fabric.gid)


def alloc_pd(core: RdmaDeviceCore, req: Empty, now: float) -> AllocPdResp:
    charge(core, (Resource.PD, 1), check_only=True)
    if len(core.pds) >= core.limits.max_pd:
        raise CommandError(f"max_pd {core.limits.max_pd} reached", Status.ENOMEM)
    while core.next_pdn in core.pds or core.next_pdn == 0:
        core.next_pdn = (core.next_pdn + 1) & OBJ_NUM_MASK
    pdn = core.next_pdn
    core.next_pdn = (pdn + 1) & OBJ_NUM_MASK
    core.pds[pdn] = 0
    charge(core, (Resource.PD, 1))  # fits: checked above
    return AllocPdResp(pdn=pdn)


def dealloc_pd(core: RdmaDeviceCore, req: DeallocPdReq, now: float) -> None:
    pdn = _pd(core, req.pdn)
    if core.pds[pdn] or core.mrs.by_pd.get(pdn):
        raise CommandError(f"PD {pdn} is used by {core.pds[pdn]} QPs/AQs and "
                           f"{core.mrs.by_pd.get(pdn, 0)} MRs", Status.EBUSY)
    del core.pds[pdn]
    release(core, (Resource.PD, 1))
    if core.hw is not None:
        core.hw.dealloc_pd(pdn)


def create_cq(core: RdmaDeviceCore, req: CreateCqReq, now: float) -> CreateCqResp:
    n = req.cqe
    if n < 1 or n > core.limits.max_cqe or n & (n - 1):
        raise CommandError(f"cqe {n} is not a power of two in 1..{core.limits.max_cqe}", Status.EINVAL)
    if req.comp_vector != 0:
        raise CommandError(f"comp_vector {req.comp_vector} (the device has 1)", Status.EINVAL)
    charge(core, (Resource.CQ, 1), check_only=True)
    if len(core.cqs) >= core.limits.max_cq:
        raise CommandError(f"max_cq {core.limits.max_cq} reached", Status.ENOMEM)
    _check_gpa(core, "CQ ring", req.ring_gpa, n * CQE_SIZE)
    _check_gpa(core, "CQ doorbell record", req.dbrec_gpa, DBREC_SIZE)
    while core.next_cqn in core.cqs or core.next_cqn == 0:
        core.next_cqn = (core.next_cqn + 1) & OBJ_NUM_MASK
    cqn = core.next_cqn
    core.next_cqn = (cqn + 1) & OBJ_NUM_MASK
    core.cqs[cqn] = CompletionQueue(cqn, n, req.ring_gpa, req.dbrec_gpa)
    charge(core, (Resource.CQ, 1))  # fits: checked above
    return CreateCqResp(cqn=cqn, cqe=n)


def destroy_cq(core: RdmaDeviceCore, req: DestroyCqReq, now: float) -> None:
    cq = _cq(core, req.cqn)
    if cq.qps or cq.aqs:
        raise CommandError(f"CQ {cq.cqn} is used by QPs {sorted(cq.qps)[:8]} and AQs "
                           f"{sorted(cq.aqs)[:8]}", Status.EBUSY)
    del core.cqs[cq.cqn]
    release(core, (Resource.CQ, 1))


def req_notify_cq(core: RdmaDeviceCore, req: ReqNotifyCqReq, now: float) -> None:
    _cq(core, req.cqn).request_notify(req.flags)


def reg_mr(core: RdmaDeviceCore, req: RegMrReq, now: float) -> RegMrResp:
    pdn = _pd(core, req.pdn)
    chunks = [(c.gpa, c.length) for c in req.chunks]
    backing = None
    if core.hw is not None:  # the HCA's keys become the guest's
        hw = core.hw
        backing = lambda access: hw.reg_mr(pdn, access, req.iova, req.length, chunks)  # noqa: E731
    charges = ((Resource.MR, 1), (Resource.PINNED_BYTES, req.length))
    charge(core, *charges, check_only=True)
    mr = core.mrs.register(core.mem, pdn, req.access, req.iova, req.length, chunks, backing=backing)
    charge(core, *charges)  # fits: checked above, nothing ran in between
    return RegMrResp(lkey=mr.lkey, rkey=mr.rkey)


def dereg_mr(core: RdmaDeviceCore, req: DeregMrReq, now: float) -> None:
    mr = core.mrs.deregister(req.lkey)
    release(core, (Resource.MR, 1), (Resource.PINNED_BYTES, mr.length))


def create_qp(core: RdmaDeviceCore, req: CreateQpReq, now: float) -> CreateQpResp:
    L = core.limits
    pdn = _pd(core, req.pdn)
    try:
        qpt = QpType.parse(req.qp_type)
    except UnknownValueError:
        raise CommandError(f"qp_type {req.qp_type}", Status.EINVAL) from None
    if qpt is not QpType.RC:
        raise CommandError(f"qp_type {qpt.name} is not supported (RC only)", Status.EOPNOTSUPP)
    scq, rcq = _cq(core, req.send_cqn), _cq(core, req.recv_cqn)
    flags = CreateQpFlags.parse(req.flags)
    for name, value, lim in (("max_send_wr", req.max_send_wr, L.max_qp_wr),
                             ("max_recv_wr", req.max_recv_wr, L.max_qp_wr),
                             ("max_send_sge", req.max_send_sge, L.max_sge),
                             ("max_recv_sge", req.max_recv_sge, L.max_sge),
                             ("max_inline_data", req.max_inline_data, L.max_inline_data)):
        if value > lim:
            raise CommandError(f"{name} {value} exceeds {lim}", Status.EINVAL)
    charge(core, (Resource.QP, 1), check_only=True)
    if len(core.qps) >= L.max_qp:
        raise CommandError(f"max_qp {L.max_qp} reached", Status.ENOMEM)
    lay = wq_layout(req.max_send_wr, req.max_recv_wr, req.max_send_sge, req.max_recv_sge,
                    req.max_inline_data)
    _check_gpa(core, "SQ ring", req.sq_gpa, lay.sq_bytes)
    _check_gpa(core, "RQ ring", req.rq_gpa, lay.rq_bytes)
    _check_gpa(core, "QP doorbell record", req.dbrec_gpa, DBREC_SIZE)
    charges = ((Resource.QP, 1), (Resource.WQES, lay.sq_depth + lay.rq_depth))
    charge(core, *charges, check_only=True)
    hwqp = None
    if core.hw is not None:  # the HCA's QP number is the guest's (it is on the wire)
        hwqp = core.hw.create_qp(pdn, lay)
        qpn = hwqp.qpn
    else:
        try:
            qpn = core.fabric.alloc_qpn()
        except VirtioRdmaError as e:
            raise CommandError(str(e), Status.ENOMEM) from None
    qp = QueuePair(core, qpn, pdn, scq, rcq, lay, req.sq_gpa, req.rq_gpa, req.dbrec_gpa,
                   bool(flags & CreateQpFlags.SQ_SIG_ALL), engine=datapath)
    qp.hw = hwqp
    try:
        core.fabric.attach(qpn, qp)
    except BaseException:
        if hwqp is not None:
            hwqp.close()
        raise
    core.qps[qpn] = qp
    charge(core, *charges)  # fits: checked above
    core.qp_epoch += 1
    core.pds[pdn] += 1
    scq.qps.add(qpn)
    rcq.qps.add(qpn)
    return CreateQpResp(qpn=qpn, max_send_wr=lay.sq_depth, max_recv_wr=lay.rq_depth,
                        max_send_sge=min(lay.max_send_sge, L.max_sge),
                        max_recv_sge=min(lay.max_recv_sge, L.max_sge),
                        max_inline_data=min(lay.max_inline_data, L.max_inline_data),
                        sq_wqe_shift=lay.sq_wqe_shift, rq_wqe_shift=lay.rq_wqe_shift)


def _validate_attr(core: RdmaDeviceCore, mask: M, a: QpAttr) -> None:
    L = core.limits

    def bad(name):
        raise CommandError(f"MODIFY_QP {name}={getattr(a, name)!r} is invalid", Status.EINVAL)

    if mask & M.PORT and a.port_num != 1:
        bad("port_num")
    if mask & M.PKEY_INDEX and a.pkey_index != 0:
        bad("pkey_index")
    if mask & M.ACCESS_FLAGS:
        try:
            acc = Access.parse(a.qp_access_flags)
        except UnknownValueError:
            bad("qp_access_flags")
        if acc & ~(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC):
            bad("qp_access_flags")
    if mask & M.PATH_MTU and not 1 <= a.path_mtu <= L.active_mtu:
        bad("path_mtu")
    if mask & M.TIMEOUT and a.timeout > 31:
        bad("timeout")
    if mask & M.MIN_RNR_TIMER and a.min_rnr_timer > 31:
        bad("min_rnr_timer")
    if mask & M.RETRY_CNT and a.retry_cnt > 7:
        bad("retry_cnt")
    if mask & M.RNR_RETRY and a.rnr_retry > 7:
        bad("rnr_retry")
    if mask & M.RQ_PSN and a.rq_psn > PSN_MASK:
        bad("rq_psn")
    if mask & M.SQ_PSN and a.sq_psn > PSN_MASK:
        bad("sq_psn")
    if mask & M.DEST_QPN and not 2 <= a.dest_qp_num <= OBJ_NUM_MASK:
        bad("dest_qp_num")
    if mask & M.MAX_QP_RD_ATOMIC and a.max_rd_atomic > L.max_qp_rd_atom:
        bad("max_rd_atomic")
    if mask & M.MAX_DEST_RD_ATOMIC and a.max_dest_rd_atomic > L.max_qp_rd_atom:
        bad("max_dest_rd_atomic")
    if mask & M.AV and a.sgid_index != 0:
        bad("sgid_index")


#: the QpAttr fields each attr_mask bit sets
_ATTR_FIELDS = {
    M.PORT: ("port_num",), M.PKEY_INDEX: ("pkey_index",), M.ACCESS_FLAGS: ("qp_access_flags",),
    M.PATH_MTU: ("path_mtu",), M.TIMEOUT: ("timeout",), M.MIN_RNR_TIMER: ("min_rnr_timer",),
    M.RETRY_CNT: ("retry_cnt",), M.RNR_RETRY: ("rnr_retry",), M.RQ_PSN: ("rq_psn",),
    M.SQ_PSN: ("sq_psn",), M.DEST_QPN: ("dest_qp_num",), M.MAX_QP_RD_ATOMIC: ("max_rd_atomic",),
    M.MAX_DEST_RD_ATOMIC: ("max_dest_rd_atomic",), M.QKEY: ("qkey",),
    M.AV: ("dgid", "sgid_index", "hop_limit", "traffic_class", "flow_label"),
    M.PATH_MIG_STATE: ("path_mig_state",), M.EN_SQD_ASYNC_NOTIFY: ("en_sqd_async_notify",),
}


def modify_qp(core: RdmaDeviceCore, req: ModifyQpReq, now: float) -> None:
    qp = _qp(core, req.qpn)
    a = req.attr
    try:
        mask = M.parse(req.attr_mask)
    except UnknownValueError as e:
        raise CommandError(str(e), Status.EINVAL) from None
    target = check_transition(qp.state, mask, a.qp_state if mask & M.STATE else None, a.cur_qp_state)
    _validate_attr(core, mask, a)
    prev = qp.state
    if target is QpState.RESET:
        close_net(qp)
        qp.reset()
        return
    attr = qp.attr
    for bit, names in _ATTR_FIELDS.items():
        if mask & bit:
            for n in names:
                setattr(attr, n, getattr(a, n))
    if mask & M.ACCESS_FLAGS:
        qp.access = Access(a.qp_access_flags)
    if mask & M.RETRY_CNT:
        qp.retry_left = a.retry_cnt
    if mask & M.RNR_RETRY:
        qp.rnr_left = a.rnr_retry
    if mask & M.RQ_PSN:
        qp.epsn = a.rq_psn
    if mask & M.SQ_PSN:
        qp.sq_psn = a.sq_psn
    if target is QpState.ERR:
        rings.qp_error(core, qp, None)
        return
    qp.state = target
    attr.qp_state = int(target)
    opened = False
    if qp.net is None and target is QpState.RTR and prev is QpState.INIT:
        # a peer on another host gets a wire engine (None: same-host message path)
        qp.net = core.fabric.open_wire_qp(core, qp, now)
        opened = qp.net is not None
    if qp.net is not None:
        try:
            qp.net.modified(prev, target, now)
        except CommandError:  # the transport (an RDMA device) refused: stay in prev
            if opened:
                close_net(qp)
            qp.state = prev
            attr.qp_state = int(prev)
            raise
    if target is QpState.SQD and prev is not QpState.SQD and not qp.inflight \
            and attr.en_sqd_async_notify:
        async_event(core, AsyncEvent.SQ_DRAINED, qp.qpn)
    if target is QpState.RTS:
        datapath.progress_sq(core, qp, now)
        core.timer_qps.add(qp.qpn)


def query_qp(core: RdmaDeviceCore, req: QueryQpReq, now: float) -> QueryQpResp:
    qp = _qp(core, req.qpn)
    L, lay = core.limits, qp.layout
    attr = qp.attr.copy()
    attr.qp_state = attr.cur_qp_state = int(qp.state)
    attr.port_num = attr.port_num or 1
    attr.sq_draining = int(qp.state is QpState.SQD and bool(qp.inflight))
    attr.qp_access_flags = int(qp.access)
    attr.rq_psn, attr.sq_psn = qp.epsn, qp.sq_psn
    attr.max_send_wr, attr.max_recv_wr = lay.sq_depth, lay.rq_depth
    attr.max_send_sge = min(lay.max_send_sge, L.max_sge)
    attr.max_recv_sge = min(lay.max_recv_sge, L.max_sge)
    attr.max_inline_data = min(lay.max_inline_data, L.max_inline_data)
    return QueryQpResp(attr=attr, pdn=qp.pdn, qp_type=int(QpType.RC), send_cqn=qp.send_cq.cqn,
                       recv_cqn=qp.recv_cq.cqn,
                       flags=int(CreateQpFlags.SQ_SIG_ALL) if qp.sq_sig_all else 0, qpn=qp.qpn)


def destroy_qp(core: RdmaDeviceCore, req: DestroyQpReq, now: float) -> None:
    drop_qp(core, _qp(core, req.qpn))


def close_net(qp: QueuePair) -> None:
    """Close the QP's wire engine, if it has one."""
    if qp.net is not None:
        net, qp.net = qp.net, None
        net.close()


def drop_qp(core: RdmaDeviceCore, qp: QueuePair) -> None:
    """Destroy a QP: detach it from the fabric, release its charges and references."""
    close_net(qp)
    qp.destroyed = True
    qp.inflight.clear()
    core.fabric.detach(qp.qpn)
    if qp.hw is not None:
        hw, qp.hw = qp.hw, None
        hw.close()
    else:
        core.fabric.free_qpn(qp.qpn)
    del core.qps[qp.qpn]
    release(core, (Resource.QP, 1), (Resource.WQES, qp.layout.sq_depth + qp.layout.rq_depth))
    core.timer_qps.discard(qp.qpn)
    core.pds[qp.pdn] -= 1
    qp.send_cq.qps.discard(qp.qpn)
    qp.recv_cq.qps.discard(qp.qpn)


def ack_features(core: RdmaDeviceCore, req: AckFeatures, now: float) -> AckFeatures:
    """The driver's device feature bits, for a transport that could not carry
    them (spec "Carriers"): before any object exists, else EBUSY. Accepts the
    bits the device offers and applies them as the transport's feature
    negotiation would (DBREC_POLL)."""
    if core.pds or core.cqs or core.qps or core.aqs or core.mrs.count:
        raise CommandError("ACK_FEATURES after objects were created", Status.EBUSY)
    accepted = req.features & core.offered_features
    core.acked_by_command = accepted
    core.poll_doorbell_records = bool(accepted & (1 << Feature.DBREC_POLL))
    return AckFeatures(features=accepted)


#: the dispatch table: one handler per command; each takes (core, request
#: dataclass, now) and returns the response dataclass (None: no body)
HANDLERS: dict[Cmd, Callable] = {
    Cmd.QUERY_DEVICE: query_device,
    Cmd.QUERY_PORT: query_port,
    Cmd.QUERY_GID: query_gid,
    Cmd.ALLOC_PD: alloc_pd,
    Cmd.DEALLOC_PD: dealloc_pd,
    Cmd.CREATE_CQ: create_cq,
    Cmd.DESTROY_CQ: destroy_cq,
    Cmd.REQ_NOTIFY_CQ: req_notify_cq,
    Cmd.REG_MR: reg_mr,
    Cmd.DEREG_MR: dereg_mr,
    Cmd.CREATE_QP: create_qp,
    Cmd.MODIFY_QP: modify_qp,
    Cmd.QUERY_QP: query_qp,
    Cmd.DESTROY_QP: destroy_qp,
    # accelerator queues (virtio_rdma.accel; EOPNOTSUPP on a device without them)
    Cmd.QUERY_ACCEL: accel.query_accel,
    Cmd.CREATE_AQ: accel.create_aq,
    Cmd.DESTROY_AQ: accel.destroy_aq,
    Cmd.CANCEL_AQ_JOB: accel.cancel_aq_job,
    Cmd.ACK_FEATURES: ack_features,
}
assert set(HANDLERS) == set(Cmd), "a command without a handler"
