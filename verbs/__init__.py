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
from verbs.enums import *  # noqa: F401,F403
from verbs.enums import __all__ as _enums_all
from verbs.errors import UnknownValueError, VerbsError
from verbs.ibta import *  # noqa: F401,F403
from verbs.ibta import __all__ as _ibta_all
from verbs.parse import ParseIntEnum, ParseIntFlag, parse

__all__ = [*_enums_all, *_ibta_all, "UnknownValueError", "VerbsError",
           "ParseIntEnum", "ParseIntFlag", "parse"]
