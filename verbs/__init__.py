"""The one definition of every verbs and IBTA number.

- :mod:`verbs.enums`: the libibverbs enumerations (``<infiniband/verbs.h>``):
  QP types and states, QP attribute mask, access and send flags, WR and WC
  opcodes, WC statuses and flags, async events, MTU, port state, link layer,
  atomic capability.
- :mod:`verbs.ibta`: IBTA transport numbers: 24-bit PSN arithmetic, QPN mask,
  AETH NAK codes, RNR timer table, ACK timeout, infinite RNR retry.
- :mod:`verbs.parse`: the enum bases whose ``parse()`` turns an untrusted
  number into a member or raises :class:`UnknownValueError`.
- ``verbs/_verbs.pxd``: the numbers Cython code needs, as ``cdef enum``s
  (checked against this package by :mod:`verbs._check` and tests/verbs).

Everything in ``roce/``, ``fabric/``, ``virtio_rdma/``, ``guest_lib/`` and
the Cython kernels takes these numbers from here; nothing else defines them.
"""
from verbs.enums import (
    C_PREFIX,
    Access,
    AsyncEvent,
    AtomicCap,
    LinkLayer,
    Mtu,
    PortState,
    QpAttrMask,
    QpState,
    QpType,
    SendFlags,
    WcFlags,
    WcOpcode,
    WcStatus,
    WrOpcode,
    c_name,
    wc_status_str,
)
from verbs.errors import UnknownValueError, VerbsNumberError
from verbs.ibta import (
    GSI_QKEY,
    GSI_QPN,
    MSN_MASK,
    PSN_BITS,
    PSN_HALF,
    PSN_MASK,
    PSN_MOD,
    QPN_MASK,
    RNR_RETRY_INFINITE,
    RNR_TIMER_SECONDS,
    RNR_TIMER_USEC,
    AethType,
    NakCode,
    ack_timeout_seconds,
    psn_add,
    psn_diff,
    rnr_timer_seconds,
)
from verbs.parse import ParseIntEnum, ParseIntFlag, parse

__all__ = [
    "C_PREFIX",
    "MSN_MASK",
    "PSN_BITS",
    "PSN_HALF",
    "PSN_MASK",
    "PSN_MOD",
    "QPN_MASK",
    "GSI_QPN",
    "GSI_QKEY",
    "RNR_RETRY_INFINITE",
    "RNR_TIMER_SECONDS",
    "RNR_TIMER_USEC",
    "Access",
    "AethType",
    "AsyncEvent",
    "AtomicCap",
    "LinkLayer",
    "Mtu",
    "NakCode",
    "ParseIntEnum",
    "ParseIntFlag",
    "PortState",
    "QpAttrMask",
    "QpState",
    "QpType",
    "SendFlags",
    "UnknownValueError",
    "VerbsNumberError",
    "WcFlags",
    "WcOpcode",
    "WcStatus",
    "WrOpcode",
    "ack_timeout_seconds",
    "c_name",
    "parse",
    "psn_add",
    "psn_diff",
    "rnr_timer_seconds",
    "wc_status_str",
]
