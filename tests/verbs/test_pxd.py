"""verbs/_verbs.pxd, the numbers Cython code cimports, equals the Python
definition in :mod:`verbs`: every constant, and every member of each
enumeration it mirrors (a member added in Python and not in the .pxd fails)."""
import pytest

import verbs
from verbs.enums import C_PREFIX, c_name

_check = pytest.importorskip("verbs._check", reason="Cython extensions not built (setup.py build_ext --inplace)")

#: the enumerations the .pxd mirrors in full
MIRRORED = (verbs.WrOpcode, verbs.WcOpcode, verbs.WcStatus, verbs.WcFlags, verbs.SendFlags,
            verbs.Access, verbs.QpState, verbs.Mtu)
IBTA = {"PSN_MASK": verbs.PSN_MASK, "MSN_MASK": verbs.MSN_MASK, "QPN_MASK": verbs.QPN_MASK}


def _python_values() -> dict[str, int]:
    out = dict(IBTA)
    for cls in MIRRORED:
        for m in cls:
            out[c_name(m)] = int(m)
    return out


def test_pxd_equals_python():
    ours = _python_values()
    compiled = dict(_check.VALUES)
    assert {k: v for k, v in compiled.items() if ours.get(k) != v} == {}
    assert set(ours) - set(compiled) == set(), "members missing from verbs/_verbs.pxd"


def test_pxd_mtu_bytes_is_mtu_bytes():
    assert _check.MTU_BYTES == {int(m): m.bytes for m in verbs.Mtu}


def test_pxd_names_are_c_names():
    prefixes = tuple(C_PREFIX[c] for c in MIRRORED)
    assert all(n.startswith(prefixes) or n in IBTA for n in _check.VALUES)
