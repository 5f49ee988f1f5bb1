"""The verbs QP state machine for RC QPs, as a transition table.

Follows ``ibv_modify_qp(3)`` and the IBTA QP state diagram (Vol. 1, 10.3.1),
with the required/optional attribute masks of the kernel's
``qp_state_table`` (drivers/infiniband/core/verbs.c) for IB_QPT_RC. The device
checks every MODIFY_QP against :data:`TRANSITIONS` (spec 5.x.6.1, MODIFY_QP).
Illegal transitions raise :class:`QpTransitionError` (status EINVAL).
"""
from __future__ import annotations

from dataclasses import dataclass

from verbs import QpAttrMask as M, QpState as S
from virtio_rdma.constants import Status
from virtio_rdma.errors import VirtioRdmaError


class QpTransitionError(VirtioRdmaError):
    """MODIFY_QP asked for an illegal transition or a wrong attribute mask."""

    status = Status.EINVAL


@dataclass(frozen=True, slots=True)
class Transition:
    required: M
    optional: M


_NONE = M(0)
_PATH_OPT = M.CUR_STATE | M.ALT_PATH | M.ACCESS_FLAGS | M.MIN_RNR_TIMER | M.PATH_MIG_STATE

#: (current, next) -> required/optional attribute masks. Absent pairs are illegal.
TRANSITIONS: dict[tuple[S, S], Transition] = {
    (S.RESET, S.INIT): Transition(M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS, _NONE),
    (S.INIT, S.INIT): Transition(_NONE, M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS),
    (S.INIT, S.RTR): Transition(
        M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER,
        M.ALT_PATH | M.ACCESS_FLAGS | M.PKEY_INDEX),
    (S.RTR, S.RTS): Transition(
        M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY | M.MAX_QP_RD_ATOMIC, _PATH_OPT),
    (S.RTS, S.RTS): Transition(_NONE, _PATH_OPT),
    (S.RTS, S.SQD): Transition(_NONE, M.EN_SQD_ASYNC_NOTIFY),
    (S.SQD, S.RTS): Transition(_NONE, _PATH_OPT),
    (S.SQD, S.SQD): Transition(_NONE, M.AV | M.ALT_PATH | M.ACCESS_FLAGS | M.PKEY_INDEX
                               | M.MIN_RNR_TIMER | M.PATH_MIG_STATE | M.TIMEOUT | M.RETRY_CNT
                               | M.RNR_RETRY | M.MAX_QP_RD_ATOMIC | M.MAX_DEST_RD_ATOMIC),
    (S.SQE, S.RTS): Transition(_NONE, M.CUR_STATE | M.ACCESS_FLAGS),
}
for _s in S:
    TRANSITIONS[(_s, S.RESET)] = Transition(_NONE, _NONE)
    TRANSITIONS[(_s, S.ERR)] = Transition(_NONE, _NONE)
del _s


def check_transition(cur: S, attr_mask: int, next_state: int | None,
                     cur_state_attr: int | None = None) -> S:
    """Validate a MODIFY_QP request; return the state the QP moves to.

    ``attr_mask`` is the raw IBV_QP_* mask. If it contains STATE,
    ``next_state`` is the target; otherwise the QP stays in ``cur``. If it
    contains CUR_STATE, ``cur_state_attr`` must equal ``cur``.
    """
    mask = M.parse(attr_mask)
    cur = S.parse(cur)
    if mask & M.CUR_STATE and (cur_state_attr is None or int(cur_state_attr) != cur):
        raise QpTransitionError(
            f"cur_qp_state {cur_state_attr} does not match the QP state {cur.name}")
    target = S.parse(next_state) if mask & M.STATE else cur
    t = TRANSITIONS.get((cur, target))
    if t is None:
        raise QpTransitionError(f"illegal QP transition {cur.name} -> {target.name}")
    attrs = mask & ~(M.STATE)
    missing = t.required & ~attrs
    if missing:
        raise QpTransitionError(
            f"{cur.name} -> {target.name} requires attributes {missing!r} (mask {int(mask):#x})")
    # CUR_STATE was verified above to name the current state: harmless anywhere.
    extra = attrs & ~(t.required | t.optional | M.CUR_STATE)
    if extra:
        raise QpTransitionError(
            f"{cur.name} -> {target.name} does not accept attributes {extra!r}")
    return target
