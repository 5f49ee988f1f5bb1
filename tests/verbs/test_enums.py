"""The libibverbs enumerations of :mod:`verbs`: parse() of untrusted numbers,
C names, ibv_wc_status_str, and guest_lib.enums generated from them."""
import pytest

import guest_lib.enums as ibv_names
from verbs import Access, Mtu, UnknownValueError, WcStatus, WrOpcode, wc_status_str
from verbs.enums import C_PREFIX, c_name


def test_parse_known_and_unknown():
    assert WrOpcode.parse(2) is WrOpcode.SEND
    assert Access.parse(0x15) == Access.LOCAL_WRITE | Access.REMOTE_READ | Access.MW_BIND
    with pytest.raises(UnknownValueError, match="77"):
        WrOpcode.parse(77)
    with pytest.raises(UnknownValueError, match="0x80"):
        Access.parse(0x80)
    with pytest.raises(UnknownValueError):
        Mtu.parse(6)


def test_mtu_bytes():
    assert [m.bytes for m in Mtu] == [256, 512, 1024, 2048, 4096]
    assert ibv_names.mtu_bytes(ibv_names.IBV_MTU_1024) == 1024


def test_wc_status_strings():
    assert wc_status_str(WcStatus.WR_FLUSH_ERR) == "Work Request Flushed Error"
    assert wc_status_str(WcStatus.RNR_RETRY_EXC_ERR) == "RNR retry counter exceeded"
    assert wc_status_str(99) == "unknown"
    assert all(wc_status_str(s) != "unknown" for s in WcStatus)


def test_guest_lib_enums_are_generated_from_verbs():
    for cls in C_PREFIX:
        for m in cls:
            assert getattr(ibv_names, c_name(m)) == int(m)
    assert ibv_names.IBV_WR_SEND == 2 and ibv_names.IBV_WC_WITH_IMM == 2 and ibv_names.IBV_QPS_RTS == 3
