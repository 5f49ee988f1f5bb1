"""QP attributes the RC transport needs (the subset of ibv_qp_attr that
matters on the wire), validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

from verbs import Access, Mtu

from ..errors import FieldRange

#: rxe's RXE_MAX_UNACKED_PSNS: requests in flight without an ACK
MAX_UNACKED_PSNS = 128
#: rxe's RXE_MAX_PKT_PER_ACK: AckReq at least every this many packets
MAX_PKT_PER_ACK = 64
#: IBTA: an RDMA message is at most 2^31 bytes
MAX_MSG_SIZE = 1 << 31
#: path MTUs in bytes (enum ibv_mtu)
PATH_MTUS = tuple(m.bytes for m in Mtu)


@dataclass(slots=True)
class QpConfig:
    qp_num: int
    dest_qp_num: int = 0
    path_mtu: int = 1024
    sq_psn: int = 0
    rq_psn: int = 0
    timeout: int = 14           # verbs.ack_timeout_seconds: 4.096 us * 2^14 = 67 ms
    retry_cnt: int = 7          # 7 = retry forever
    rnr_retry: int = 7          # 7 = retry forever
    min_rnr_timer: int = 12     # 0.64 ms (verbs.RNR_TIMER_USEC[12])
    max_rd_atomic: int = 16     # initiator depth
    max_dest_rd_atomic: int = 16  # responder resources (replay cache)
    access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC
    pkey: int = 0xFFFF

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, bits in (("qp_num", 24), ("dest_qp_num", 24), ("sq_psn", 24), ("rq_psn", 24),
                           ("timeout", 5), ("retry_cnt", 3), ("rnr_retry", 3),
                           ("min_rnr_timer", 5), ("pkey", 16)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v >> bits:
                raise FieldRange(f"QpConfig.{name}", v, bits)
        if self.path_mtu not in PATH_MTUS:
            raise FieldRange("QpConfig.path_mtu", self.path_mtu, 13)
        for name in ("max_rd_atomic", "max_dest_rd_atomic"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= 255:
                raise FieldRange(f"QpConfig.{name}", v, 8)
