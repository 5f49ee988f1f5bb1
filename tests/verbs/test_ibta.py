"""IBTA numbers of :mod:`verbs.ibta`: PSN arithmetic in rxe's convention
(``psn_compare``: ``(s32)((a - b) << 8)``), the RNR NAK timer table and the
ACK timeout (IBTA 9.7.5.2.8 table 45, 11.2.4.2), AETH NAK codes."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from verbs import (
    PSN_MASK,
    QPN_MASK,
    RNR_RETRY_INFINITE,
    AethType,
    NakCode,
    UnknownValueError,
    VerbsNumberError,
    ack_timeout_seconds,
    psn_add,
    psn_diff,
    rnr_timer_seconds,
)

psn = st.integers(0, PSN_MASK)


def test_psn_arithmetic():
    assert PSN_MASK == QPN_MASK == 0xFFFFFF
    assert psn_add(0xFFFFFF, 1) == 0
    assert psn_add(0, -1) == 0xFFFFFF
    assert psn_diff(0, 0xFFFFFF) == 1
    assert psn_diff(0xFFFFFF, 0) == -1
    assert psn_diff(5, 5) == 0
    # the boundary: exactly 2^23 apart is behind, as in rxe
    assert psn_diff(1 << 23, 0) == -(1 << 23)
    assert psn_diff(0, 1 << 23) == -(1 << 23)
    assert psn_diff((1 << 23) - 1, 0) == (1 << 23) - 1
    assert psn_diff((1 << 23) + 1, 0) < 0


def _rxe_psn_compare(a: int, b: int) -> int:
    """rxe's psn_compare: the difference shifted into the top 24 bits of an s32."""
    d = ((a - b) << 8) & 0xFFFFFFFF
    return (d - (1 << 32) if d & (1 << 31) else d) >> 8


@given(psn, psn)
def test_psn_diff_is_rxe_psn_compare(a, b):
    assert psn_diff(a, b) == _rxe_psn_compare(a, b)
    assert psn_add(b, psn_diff(a, b)) == a


def test_rnr_timer_table():
    assert rnr_timer_seconds(0) == pytest.approx(0.65536)
    assert rnr_timer_seconds(1) == pytest.approx(10e-6)
    assert rnr_timer_seconds(12) == pytest.approx(0.64e-3)
    assert rnr_timer_seconds(31) == pytest.approx(0.49152)
    for bad in (-1, 32):
        with pytest.raises(UnknownValueError, match=str(bad)):
            rnr_timer_seconds(bad)


def test_ack_timeout():
    assert ack_timeout_seconds(0) is None
    assert ack_timeout_seconds(14) == pytest.approx(4.096e-6 * 16384)
    with pytest.raises(UnknownValueError, match="32"):
        ack_timeout_seconds(32)
    assert RNR_RETRY_INFINITE == 7


def test_nak_codes():
    assert [int(c) for c in NakCode] == [0, 1, 2, 3, 4, 0x20]
    assert NakCode.RNR == AethType.RNR_NAK << 5
    assert NakCode.parse(2) is NakCode.REM_ACCESS
    with pytest.raises(UnknownValueError) as e:
        NakCode.parse(5)
    assert isinstance(e.value, VerbsNumberError) and isinstance(e.value, ValueError) and e.value.status == 22
