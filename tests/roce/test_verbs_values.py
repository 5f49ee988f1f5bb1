"""The verbs enums we carry (roce.rc.verbs for the transport,
virtio_rdma.constants for the device and guests) have libibverbs' values,
checked against rdma-core's own pyverbs.enums: the backend passes them
through unchanged, so one wrong value reaches guests as another status."""
import enum

import pytest

import roce.rc.verbs as rc_verbs
import virtio_rdma.constants as device

ibv = pytest.importorskip("pyverbs.enums", reason="pyverbs (rdma-core's Python bindings) is not installed")

PREFIX = {"WrOpcode": "IBV_WR_", "WcStatus": "IBV_WC_", "WcOpcode": "IBV_WC_", "WcFlags": "IBV_WC_",
          "Access": "IBV_ACCESS_"}


@pytest.mark.parametrize("module", [rc_verbs, device], ids=["roce.rc.verbs", "virtio_rdma.constants"])
@pytest.mark.parametrize("enum_name", sorted(PREFIX))
def test_values_are_libibverbs(module, enum_name):
    cls: type[enum.Enum] = getattr(module, enum_name)
    checked, wrong = 0, []
    for name, member in cls.__members__.items():
        theirs = getattr(ibv, PREFIX[enum_name] + name, None)
        if theirs is None:
            assert int(member) == 0, f"{enum_name}.{name} has no libibverbs name"
            continue
        checked += 1
        if int(member) != int(theirs):
            wrong.append(f"{enum_name}.{name} = {int(member)}, libibverbs {int(theirs)}")
    assert not wrong, wrong
    assert checked >= 3
