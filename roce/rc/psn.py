"""24-bit Packet Sequence Number arithmetic (IBTA vol. 1, 9.7.1).

PSNs wrap at 2^24; two PSNs compare within a window of 2^23, like rxe's
``psn_compare``: ``diff(a, b) > 0`` means a is after b.
"""
PSN_MASK = 0xFFFFFF
PSN_MOD = 1 << 24


def psn_add(psn: int, n: int) -> int:
    return (psn + n) & PSN_MASK


def psn_diff(a: int, b: int) -> int:
    """Signed distance a - b in (-2^23, 2^23]."""
    d = (a - b) & PSN_MASK
    return d - PSN_MOD if d > (1 << 23) else d
