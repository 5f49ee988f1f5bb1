"""Sans-I/O RoCEv2 Reliable Connected transport with rxe semantics:
:class:`~roce.rc.qp.RcQp` (state machine + requester/completer + responder),
verbs objects in :mod:`roce.rc.verbs`, the memory interface in
:mod:`roce.rc.memory`."""
from .config import QpConfig, retransmit_timeout  # noqa: F401
from .memory import MemoryTable, RemoteMemory  # noqa: F401
from .qp import QpState, RcQp  # noqa: F401
from .verbs import Access, Completion, RecvWR, SendWR, WcOpcode, WcStatus, WrOpcode  # noqa: F401
