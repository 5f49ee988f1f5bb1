"""Every libibverbs enumeration of :mod:`verbs`, the one definition the
device, the guests, the RoCE transport and the Cython kernels use, has
libibverbs' values, checked against rdma-core's own pyverbs.enums: the
backend passes them through unchanged, so one wrong value reaches guests as
another status (this has happened once: FATAL_ERR)."""
import enum

import pytest

import verbs
from verbs.enums import C_PREFIX, c_name

ibv = pytest.importorskip("pyverbs.enums", reason="pyverbs (rdma-core's Python bindings) is not installed")

def test_every_enum_of_the_package_is_checked():
    enums = {v for v in vars(verbs.enums).values()
             if isinstance(v, type) and issubclass(v, enum.Enum) and v.__module__ == "verbs.enums"}
    assert enums == set(C_PREFIX)


@pytest.mark.parametrize("cls", sorted(C_PREFIX, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_values_are_libibverbs(cls: type[enum.Enum]):
    checked, wrong, missing = 0, [], []
    for member in cls:
        theirs = getattr(ibv, c_name(member), None)
        if theirs is None:
            missing.append(c_name(member))
            continue
        checked += 1
        if int(member) != int(theirs):
            wrong.append(f"{cls.__name__}.{member.name} = {int(member)}, libibverbs {int(theirs)}")
    assert not wrong, wrong
    assert not missing, f"no libibverbs name (a typo?): {missing}"
    assert checked >= 2


def test_pyverbs_members_we_lack_are_not_ones_we_mean():
    """The other direction, for the enums defined in full: every WC status,
    QP state and MTU libibverbs has is ours too (one added upstream shows up here)."""
    for cls in (verbs.WcStatus, verbs.QpState, verbs.Mtu):
        prefix = C_PREFIX[cls] if cls is not verbs.Mtu else "IBV_MTU_"
        ours = {c_name(m) for m in cls}
        theirs = {n for n in dir(ibv) if n.startswith(prefix)}
        if cls is verbs.WcStatus:  # IBV_WC_* also names WC opcodes and flags
            theirs = {n for n in theirs if n.endswith("_ERR") or n in ("IBV_WC_SUCCESS", "IBV_WC_TM_RNDV_INCOMPLETE")}
        if cls is verbs.QpState:
            theirs.discard("IBV_QPS_UNKNOWN")
        assert theirs <= ours, theirs - ours
