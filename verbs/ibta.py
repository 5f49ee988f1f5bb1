"""IBTA transport numbers (InfiniBand Architecture Specification vol. 1,
chapter 9, the base transport RoCEv2 carries): 24-bit PSN arithmetic
(9.7.1), QP numbers (9.2), the AETH syndrome types and NAK codes (9.7.5.2.8, table 43), the
encoded RNR NAK timer (table 45) and the local ACK timeout (11.2.4.2,
``ibv_qp_attr.timeout``), and the ``rnr_retry`` value meaning "forever".

PSN convention, as rxe's ``psn_compare`` (``(s32)((a - b) << 8)``):
:func:`psn_diff` is the signed distance a - b in [-2^23, 2^23 - 1]; a PSN
exactly 2^23 away counts as *behind* (negative).
"""
from __future__ import annotations

from verbs.errors import UnknownValueError
from verbs.parse import ParseIntEnum

__all__ = [
    "PSN_BITS", "PSN_MASK", "PSN_MOD", "PSN_HALF", "psn_add", "psn_diff", "MSN_MASK", "QPN_MASK",
    "GSI_QPN", "GSI_QKEY",
    "AethType", "NakCode", "RNR_TIMER_USEC", "RNR_TIMER_SECONDS", "rnr_timer_seconds",
    "ack_timeout_seconds", "RNR_RETRY_INFINITE",
]

#: PSNs are 24-bit (BTH.PSN, IBTA 9.2) and wrap.
PSN_BITS = 24
PSN_MOD = 1 << PSN_BITS
PSN_MASK = PSN_MOD - 1
#: Half the PSN space: the window in which two PSNs compare.
PSN_HALF = 1 << (PSN_BITS - 1)

#: MSNs are 24-bit (AETH.MSN, IBTA 9.7.5.1.1) and wrap.
MSN_MASK = (1 << 24) - 1

#: QP numbers are 24-bit (BTH.DestQP, IBTA 9.2); 0xFFFFFF is the multicast QPN.
QPN_MASK = (1 << 24) - 1
#: the General Services Interface QP (IBTA 3.5.10: QP1; connection management MADs go there)
GSI_QPN = 1
#: its well-known Q_Key (IBTA 13.5.3.1; rdma-core IB_QP1_QKEY)
GSI_QKEY = 0x80010000


def psn_add(psn: int, n: int) -> int:
    """``psn + n`` modulo 2^24 (``n`` may be negative)."""
    return (psn + n) & PSN_MASK


def psn_diff(a: int, b: int) -> int:
    """Signed distance a - b in 24-bit PSN space, in [-2^23, 2^23 - 1]
    (rxe's ``psn_compare``): > 0 means a is after b."""
    d = (a - b) & PSN_MASK
    return d - PSN_MOD if d >= PSN_HALF else d


class AethType(ParseIntEnum):
    """Bits 6..5 of the AETH syndrome (IBTA 9.7.5.2.8, table 43)."""

    ACK = 0
    RNR_NAK = 1
    RESERVED = 2
    NAK = 3


class NakCode(ParseIntEnum):
    """AETH NAK codes (IBTA 9.7.5.2.8, table 43: the low 5 syndrome bits
    when the syndrome type is NAK), plus :attr:`RNR`: the syndrome type bits
    of an RNR NAK (``AethType.RNR_NAK << 5``; its low 5 bits carry the timer)."""

    PSN_SEQ_ERR = 0
    INV_REQ = 1
    REM_ACCESS = 2
    REM_OP = 3
    INV_RD_REQ = 4
    RNR = AethType.RNR_NAK << 5


#: IBTA 9.7.5.2.8 table 45: encoded min_rnr_timer (5 bits) -> microseconds.
RNR_TIMER_USEC = (
    655360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920,
    2560, 3840, 5120, 7680, 10240, 15360, 20480, 30720, 40960, 61440, 81920, 122880,
    163840, 245760, 327680, 491520,
)
#: The same table in seconds (``us / 1e6``: the double nearest each value).
RNR_TIMER_SECONDS = tuple(us / 1_000_000 for us in RNR_TIMER_USEC)


def rnr_timer_seconds(code: int) -> float:
    """Delay for an encoded min_rnr_timer value (0..31)."""
    if not 0 <= code <= 31:
        raise UnknownValueError(f"min_rnr_timer {code} is not in 0..31")
    return RNR_TIMER_SECONDS[code]


def ack_timeout_seconds(code: int) -> float | None:
    """Local ACK timeout 4.096 us * 2**code (IBTA 11.2.4.2); code 0 means
    infinite (None)."""
    if not 0 <= code <= 31:
        raise UnknownValueError(f"timeout {code} is not in 0..31")
    if code == 0:
        return None
    return 4.096e-6 * (1 << code)


#: ``ibv_qp_attr.rnr_retry`` value meaning "retry forever" (IBTA 9.7.5.2.8).
RNR_RETRY_INFINITE = 7
