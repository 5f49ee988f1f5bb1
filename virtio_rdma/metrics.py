"""Counters of one virtio-rdma device (one guest). Every error kind a guest or
a peer can cause has a counter; tests assert them."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Metrics:
    # control queue
    commands: int = 0
    command_errors: int = 0
    malformed_commands: int = 0
    internal_errors: int = 0
    # doorbells
    doorbells: int = 0
    bad_doorbells: int = 0           # unknown/destroyed object, wrong state, absurd index
    malformed_doorbell_buffers: int = 0
    doorbells_stale: int = 0         # an index the device already had, nothing to start (DBREC_POLL: the
                                     # record carried it first); applied without running the engine
    # work requests (requester side)
    requests_sent: int = 0
    responses_received: int = 0
    sends_completed: int = 0
    bad_wqes: int = 0
    wqe_fetch_faults: int = 0
    local_prot_errors: int = 0
    local_len_errors: int = 0
    remote_errors: int = 0           # NAKs other than RNR / PSN sequence received
    rnr_naks_received: int = 0
    rnr_retries: int = 0
    rnr_retry_exceeded: int = 0
    psn_seq_naks: int = 0
    retransmits: int = 0
    retry_exceeded: int = 0
    stale_responses: int = 0
    flushed_wrs: int = 0
    # responder side
    rnr_naks_sent: int = 0
    remote_access_errors: int = 0
    remote_inv_req_errors: int = 0
    psn_seq_errors: int = 0
    duplicate_requests: int = 0
    dropped_requests: int = 0
    foreign_requests: int = 0        # not from the connected peer (dest GID + QPN): dropped
    bytes_received: int = 0
    bytes_sent: int = 0
    # completion queues and events
    completions: int = 0
    cq_overflows: int = 0
    cq_faults: int = 0
    completions_dropped: int = 0
    completion_events: int = 0
    async_events: int = 0
    events_dropped: int = 0
    # accelerator queues (per-queue counters: virtio_rdma.accel.snapshot)
    aq_jobs: int = 0                 # jobs fetched from AQ rings
    aq_completions: int = 0          # accelerator CQEs produced (any status)
    aq_errors: int = 0               # ... of them with a status other than SUCCESS

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
