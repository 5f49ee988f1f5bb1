"""libibverbs constants under their C names (IBV_WR_SEND, IBV_ACCESS_LOCAL_WRITE...),
as pyverbs.libibverbs_enums provides them, generated from the device ABI."""
from virtio_rdma import constants as _c

_PREFIXES = {
    _c.WrOpcode: "IBV_WR_",
    _c.WcOpcode: "IBV_WC_",
    _c.WcStatus: "IBV_WC_",
    _c.Access: "IBV_ACCESS_",
    _c.SendFlags: "IBV_SEND_",
    _c.QpState: "IBV_QPS_",
    _c.QpType: "IBV_QPT_",
    _c.QpAttrMask: "IBV_QP_",
    _c.AsyncEvent: "IBV_EVENT_",
}
for _enum, _prefix in _PREFIXES.items():
    for _m in _enum:
        globals()[_prefix + _m.name] = int(_m)
for _m in _c.WcFlags:
    globals()["IBV_WC_" + _m.name] = int(_m)

IBV_MTU_256, IBV_MTU_512, IBV_MTU_1024, IBV_MTU_2048, IBV_MTU_4096 = 1, 2, 3, 4, 5


def mtu_bytes(mtu_enum: int) -> int:
    return 128 << mtu_enum
