"""Sans-I/O RoCEv2 Reliable Connected transport with rxe semantics:
:class:`~roce.rc.qp.RcQp` (state machine + requester/completer + responder),
work requests and completions in :mod:`roce.rc.verbs` (their numbers are
:mod:`verbs`'), the memory interface in :mod:`roce.rc.memory`."""
from .config import QpConfig  # noqa: F401
from .memory import MemoryTable, RemoteMemory  # noqa: F401
from .qp import RcQp  # noqa: F401
from .verbs import Completion, RecvWR, SendWR  # noqa: F401
