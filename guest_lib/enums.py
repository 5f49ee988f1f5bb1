"""libibverbs constants under their C names (IBV_WR_SEND, IBV_ACCESS_LOCAL_WRITE,
IBV_MTU_1024...), as pyverbs.libibverbs_enums provides them, generated from
the one definition in :mod:`verbs`."""
from verbs import Mtu
from verbs.enums import C_PREFIX as _C_PREFIX, c_name as _c_name

for _enum in _C_PREFIX:
    for _m in _enum:
        globals()[_c_name(_m)] = int(_m)
del _enum, _m


def mtu_bytes(mtu_enum: int) -> int:
    """Bytes of an ``ibv_mtu`` value (IBV_MTU_1024 -> 1024)."""
    return Mtu.parse(mtu_enum).bytes
