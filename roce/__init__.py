"""RoCEv2 for vrdma: wire codecs (:mod:`roce.headers`, :mod:`roce.opcodes`,
:mod:`roce.packet`), the invariant CRC (:mod:`roce.icrc`) and the sans-I/O
RC transport (:mod:`roce.rc`)."""
from .errors import MalformedPacket, RoceError  # noqa: F401
