"""Per-QP counters of the RC transport (every dropped, NAKed or retried
packet is counted; tests assert on them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RcMetrics:
    tx_packets: int = 0
    rx_packets: int = 0
    # requester / completer
    retransmitted_packets: int = 0
    retry_events: int = 0
    timeouts: int = 0
    rnr_naks_received: int = 0
    seq_naks_received: int = 0
    fatal_naks_received: int = 0
    responses_dropped: int = 0       # stale, duplicate or unexpected responses
    # responder
    duplicate_requests: int = 0
    out_of_sequence: int = 0         # dropped, PSN ahead of expected
    seq_naks_sent: int = 0
    rnr_naks_sent: int = 0
    invalid_request_naks: int = 0    # bad opcode sequence, length, QP access
    remote_access_naks: int = 0
    remote_op_naks: int = 0
    dropped_qp_state: int = 0
    dropped_other: int = 0           # e.g. duplicate READ with no matching resource

    def as_dict(self) -> dict:
        return asdict(self)
