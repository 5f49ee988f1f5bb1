"""The RC QP state machine table (ibv_modify_qp / IBTA 10.3.1)."""
import itertools

import pytest

from verbs import QpAttrMask as M, QpState as S, UnknownValueError
from virtio_rdma.constants import Status
from virtio_rdma.qp_state import TRANSITIONS, QpTransitionError, check_transition

LEGAL = sorted(TRANSITIONS, key=lambda p: (p[0], p[1]))


@pytest.mark.parametrize("cur,nxt", LEGAL, ids=[f"{a.name}->{b.name}" for a, b in LEGAL])
def test_every_legal_transition(cur, nxt):
    t = TRANSITIONS[(cur, nxt)]
    mask = t.required | (M.STATE if nxt != cur else 0)
    if nxt == cur and not mask:
        mask = M(0)
    assert check_transition(cur, mask, nxt) is nxt
    # all optional attributes are accepted too
    assert check_transition(cur, mask | t.optional, nxt, cur) is nxt
    # each required attribute is really required
    for bit in t.required:
        with pytest.raises(QpTransitionError, match="requires"):
            check_transition(cur, mask & ~bit, nxt)


def test_required_masks_match_ibverbs():
    assert TRANSITIONS[(S.RESET, S.INIT)].required == M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS
    assert TRANSITIONS[(S.INIT, S.RTR)].required == (M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN
                                                     | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER)
    assert TRANSITIONS[(S.RTR, S.RTS)].required == (M.SQ_PSN | M.TIMEOUT | M.RETRY_CNT | M.RNR_RETRY
                                                    | M.MAX_QP_RD_ATOMIC)


ILLEGAL = [(a, b) for a, b in itertools.product(S, S) if (a, b) not in TRANSITIONS]


@pytest.mark.parametrize("cur,nxt", ILLEGAL, ids=[f"{a.name}->{b.name}" for a, b in ILLEGAL])
def test_illegal_transitions(cur, nxt):
    everything = M(M.all_bits())
    with pytest.raises(QpTransitionError) as ei:
        check_transition(cur, everything, nxt, cur)
    assert ei.value.status == Status.EINVAL


@pytest.mark.parametrize("cur,nxt,mask", [
    (S.RESET, S.INIT, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS | M.SQ_PSN),
    (S.RTS, S.RTS, M.SQ_PSN),
    (S.INIT, S.RTR, M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC
     | M.MIN_RNR_TIMER | M.TIMEOUT),
    (S.RTS, S.ERR, M.STATE | M.ACCESS_FLAGS),
])
def test_extra_attributes_rejected(cur, nxt, mask):
    with pytest.raises(QpTransitionError, match="does not accept"):
        check_transition(cur, mask, nxt)


def test_cur_state_must_match():
    with pytest.raises(QpTransitionError, match="cur_qp_state"):
        check_transition(S.RTS, M.STATE | M.CUR_STATE, S.RTS, S.RTR)
    assert check_transition(S.RTS, M.STATE | M.CUR_STATE, S.ERR, S.RTS) is S.ERR


def test_unknown_values():
    with pytest.raises(UnknownValueError, match="0x40000000"):
        check_transition(S.RESET, 1 << 30, S.INIT)
    with pytest.raises(UnknownValueError, match="9"):
        check_transition(S.RESET, M.STATE, 9)
