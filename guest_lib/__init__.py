"""guest_lib: what guest applications import to use the virtio-rdma device.

Shaped like pyverbs: :class:`Context` (opened by the back-end's socket path),
:class:`PD`, :class:`MR`, :class:`CQ`, :class:`QP` with :class:`QPInitAttr` /
:class:`QPCap` / :class:`QPAttr`, work requests :class:`SendWR` /
:class:`RecvWR` / :class:`SGE`, completions :class:`WC`; accelerator queues
:class:`AQ` with :class:`AccelWR` and completions :class:`AccelWC`
(:mod:`guest_lib.accel` has accel_core's call shapes and the file-like
device, docs/accel-api.md); and errors that carry
errno (:class:`RDMAError`) apart from misuse (:class:`UserError`).
"""
from guest_lib.aq import AQ, AccelWR
from guest_lib.context import GID, Context
from guest_lib.cq import CQ, WC, AccelWC
from guest_lib.errors import (
           PyverbsError,
           PyverbsRDMAError,
           PyverbsUserError,
           RDMAError,
           UserError,
           VerbsError,
)
from guest_lib.mr import MR
from guest_lib.pd import PD
from guest_lib.qp import QP, AHAttr, QPAttr, QPCap, QPInitAttr
from guest_lib.wr import SGE, RecvWR, SendWR

__all__ = ["Context", "GID", "PD", "MR", "CQ", "WC", "AQ", "AccelWR", "AccelWC",
           "QP", "QPInitAttr", "QPCap", "QPAttr", "AHAttr",
           "SendWR", "RecvWR", "SGE", "VerbsError", "RDMAError", "UserError",
           "PyverbsError", "PyverbsRDMAError", "PyverbsUserError"]
