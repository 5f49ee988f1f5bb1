"""Which UDP source port a RoCEv2 peer sends a QP's packets from (pure).

RoCEv2 (IBTA annex A17.4) leaves the UDP source port to the sender, for
ECMP entropy; only the destination port is fixed (4791). What a receiver can
still check depends on who the peer is:

* ``daemon``: a vrdma daemon sends every packet of every QP from the port
  its socket is bound to (:mod:`roce.udp`; 4791 by default, the same as its
  destination port).
* ``rxe``: Linux soft-RoCE sends every packet of a QP from ``qp->src_port``:
  ``0xC000 + (hash_32(qpn, 14) & 0x3fff)`` when the QP is created
  (drivers/infiniband/sw/rxe/rxe_qp.c, ``rxe_qp_init_req``; ``hash_32`` is
  ``(val * GOLDEN_RATIO_32) >> (32 - bits)``, include/linux/hash.h), which
  since Linux 5.18 ``rxe_modify_qp`` replaces, whenever the address vector
  has a GRH (always, for RoCEv2), with ``rdma_get_udp_sport(flow_label, qpn,
  dest_qpn)`` (include/rdma/ib_verbs.h): the flow label, or
  ``rdma_calc_flow_label(qpn, dest_qpn)`` when it is 0, folded to 14 bits
  over 0xC000. Both are accepted (the sender's flow label is taken as 0:
  ibv_rc_pingpong, perftest and rdma_cm use 0). ``qpn`` is the *sending*
  QP's number: our QP's ``dest_qp_num``.
* ``auto`` (the default for peers without the cluster key): either of the above.
* ``any``: no port check (e.g. a NIC that picks its own entropy, or an rxe
  peer with a non-zero flow label).
"""
from __future__ import annotations

import enum

from .errors import RoceError

GOLDEN_RATIO_32 = 0x61C88647
RXE_ROCE_V2_SPORT = 0xC000


class PortCheck(str, enum.Enum):
    DAEMON = "daemon"
    RXE = "rxe"
    AUTO = "auto"
    ANY = "any"


class BadPortCheck(RoceError, ValueError):
    def __init__(self, value: str) -> None:
        super().__init__(f"source port check {value!r} is not one of "
                         f"{', '.join(m.value for m in PortCheck)}")
        self.value = value


def port_check(value: str | PortCheck) -> PortCheck:
    try:
        return PortCheck(value)
    except ValueError:
        raise BadPortCheck(str(value)) from None


def hash_32(val: int, bits: int) -> int:
    """include/linux/hash.h ``hash_32``."""
    return ((val * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


def calc_flow_label(lqpn: int, rqpn: int) -> int:
    """include/rdma/ib_verbs.h ``rdma_calc_flow_label``."""
    v = (lqpn * rqpn) & 0xFFFFFFFFFFFFFFFF
    v ^= v >> 20
    v ^= v >> 40
    return v & 0xFFFFF


def flow_label_to_udp_sport(fl: int) -> int:
    """include/rdma/ib_verbs.h ``rdma_flow_label_to_udp_sport``."""
    low, high = fl & 0x3FFF, fl & 0xFC000
    low ^= high >> 14
    return (low | 0xC000) & 0xFFFF


def rxe_source_ports(sender_qpn: int, receiver_qpn: int, flow_label: int = 0) -> frozenset[int]:
    """The ports kernel rxe may send QP ``sender_qpn``'s packets from, to a QP
    ``receiver_qpn`` (see module doc)."""
    fl = flow_label or calc_flow_label(sender_qpn, receiver_qpn)
    return frozenset({RXE_ROCE_V2_SPORT + (hash_32(sender_qpn, 14) & 0x3FFF),
                      flow_label_to_udp_sport(fl)})


def allowed_source_ports(mode: PortCheck, daemon_port: int, sender_qpn: int,
                         receiver_qpn: int) -> frozenset[int] | None:
    """The source ports accepted for a QP in ``mode`` (None: any)."""
    if mode is PortCheck.ANY:
        return None
    if mode is PortCheck.DAEMON:
        return frozenset({daemon_port})
    rxe = rxe_source_ports(sender_qpn, receiver_qpn)
    return rxe if mode is PortCheck.RXE else rxe | {daemon_port}
