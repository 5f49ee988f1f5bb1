"""perftest's side-channel messages (vrdma.perftest_compat.exchange) against
byte strings perftest's own formats produce, round trips, hostile input, and
the order of exchanges each test's main() makes."""
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrdma.perftest_compat import exchange as X
from vrdma.perftest_compat.errors import ExchangeError

# sprintf(KEY_PRINT_FMT_GID, ...) into char[108], written whole (ethernet_write_keys):
# ib_read_lat's address on rxe0 (LID 0, 128 outstanding reads, QPN 0x11, PSN 0xb86ac,
# rkey 0x47d, vaddr 0x560bd3494000, GID ::ffff:203.0.113.2, SRQN 0)
PERFTEST_GID_MSG = (b"0000:0080:000011:0b86ac:0000047d:0000560bd3494000:00:00:00:00:00:00:00:00:00:00:"
                    b"ff:ff:cb:00:71:02:00000000:\x00")
# sprintf(KEY_PRINT_FMT, ...) into char[59] (no GID index)
PERFTEST_MSG = b"0000:0001:d7d677:c6aa54:deadbeef:00007fdcbab28000:00000000\x00"
GID = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 2])


def test_decode_perftest_messages():
    d = X.decode_dest(PERFTEST_GID_MSG)
    assert d == X.Dest(lid=0, out_reads=0x80, qpn=0x11, psn=0xB86AC, rkey=0x47D, vaddr=0x560BD3494000,
                       gid=GID, srqn=0)
    assert X.encode_dest(d) == PERFTEST_GID_MSG
    n = X.decode_dest(PERFTEST_MSG, with_gid=False)
    assert (n.out_reads, n.qpn, n.psn, n.rkey, n.vaddr, n.gid) == (1, 0xD7D677, 0xC6AA54, 0xDEADBEEF,
                                                                   0x7FDCBAB28000, None)
    assert X.encode_dest(n) == PERFTEST_MSG
    assert len(PERFTEST_GID_MSG) == X.KEY_MSG_SIZE_GID and len(PERFTEST_MSG) == X.KEY_MSG_SIZE


@given(lid=st.integers(0, 0xFFFF), reads=st.integers(0, 0xFFFF), qpn=st.integers(0, 0xFFFFFF),
       psn=st.integers(0, 0xFFFFFF), rkey=st.integers(0, 0xFFFFFFFF), vaddr=st.integers(0, 2**64 - 1),
       gid=st.one_of(st.none(), st.binary(min_size=16, max_size=16)), srqn=st.integers(0, 0xFFFFFFFF))
def test_dest_round_trip(lid, reads, qpn, psn, rkey, vaddr, gid, srqn):
    d = X.Dest(lid, reads, qpn, psn, rkey, vaddr, gid, srqn)
    msg = X.encode_dest(d)
    assert len(msg) == d.message_size and msg.endswith(b"\0")
    assert X.decode_dest(msg, with_gid=gid is not None) == d


@pytest.mark.parametrize("msg, what", [
    (PERFTEST_GID_MSG[:-1], "107 bytes"),                                     # truncated
    (PERFTEST_GID_MSG + b"\0", "109 bytes"),                                  # too long
    (bytes(108), "cannot parse"),                                             # all NUL
    (PERFTEST_GID_MSG.replace(b"0b86ac", b"zb86ac"), "cannot parse"),        # not hex
    (PERFTEST_GID_MSG.replace(b":000011:", b":1000011"), "cannot parse"),    # a field lost
    (b"\xff" * 107 + b"\0", "not text"),
    (PERFTEST_GID_MSG.replace(b"0000:0080:000011", b"00000:080:000011"), "lid"),  # wider than its field
    (PERFTEST_GID_MSG.replace(b":cb:00:", b":c:000:"), "GID byte"),
])
def test_hostile_address_messages_raise_naming_the_problem(msg, what):
    with pytest.raises(ExchangeError, match=what):
        X.decode_dest(msg)


@pytest.mark.parametrize("field, value", [("qpn", 1 << 24), ("psn", -1), ("rkey", 1 << 32), ("lid", 1 << 16)])
def test_dest_out_of_range_is_refused(field, value):
    kw = dict(lid=0, out_reads=1, qpn=1, psn=1, rkey=1, vaddr=1, gid=GID)
    kw[field] = value
    with pytest.raises(ExchangeError, match=field):
        X.Dest(**kw)


def test_version_exchange():
    # strncpy(version, "6.06", 16) sends 16 bytes, NUL padded
    assert X.encode_version() == b"6.06" + bytes(12)
    assert X.decode_version(b"6.06" + bytes(12)) == "6.06"
    assert X.check_peer_version("6.06") == pytest.approx(6.06)
    assert X.check_peer_version("5.70") == pytest.approx(5.70)
    for old in ("5.60", "", "garbage", "4.6"):
        with pytest.raises(ExchangeError, match="older than 5.70"):
            X.check_peer_version(old)
    with pytest.raises(ExchangeError, match="15 bytes"):
        X.decode_version(bytes(15))
    with pytest.raises(ExchangeError, match="not text"):
        X.decode_version(b"\xff" * 16)


def test_sys_data_and_mtu_messages():
    assert X.encode_int(4096) == b"\x00\x00\x10\x00"  # hton_int(page size)
    assert X.decode_int(b"\x00\x00\x00\x40") == 64
    with pytest.raises(ExchangeError):
        X.decode_int(b"\x00\x40")
    # sprintf(cur, "%d", IBV_MTU_1024) and 2 bytes of it
    assert X.encode_mtu(3) == b"3\x00"
    assert X.decode_mtu(b"3\x00") == 3 and X.decode_mtu(b"5\x00") == 5
    assert X.decode_mtu(b"9\x00") is None and X.decode_mtu(b"\xff\xff") is None  # perftest keeps its own
    assert X.mtu_bytes(3) == 1024 and X.mtu_enum(4096) == 5
    with pytest.raises(ExchangeError, match="1500"):
        X.mtu_enum(1500)


def test_bw_report_messages():
    rep = X.BwReport(size=65536, iters=200, bw_peak=20.89, bw_avg=15.43, msg_rate=0.000247)
    parts = X.encode_bw_report(rep, 6.06)
    # hton_long(size), hton_long(iters) (peers from 5.33), hton_double x 3
    assert parts[0] == b"\x00\x00\x00\x00\x00\x01\x00\x00"
    assert parts[1] == b"\x00\x00\x00\x00\x00\x00\x00\xc8"
    assert parts[2] == struct.pack(">d", 20.89)
    assert X.decode_bw_report(parts, 6.06) == rep
    old = X.encode_bw_report(rep, 5.0)
    assert old[1] == b"\x00\x00\x00\xc8" and X.decode_bw_report(old, 5.0) == rep
    with pytest.raises(ExchangeError, match="report messages"):
        X.decode_bw_report(parts[:4] + [b"\0"], 6.06)


def _names(test, client, sizes=1, run_all=False):
    return [s.value for s, _ in X.flow(test, client, sizes, run_all)]


PRE = ["version", "sys_data", "mtu"]


def test_flow_follows_each_main():
    T = X.Test
    # send_lat.c: keys, ctx_connect, barrier, remote print, per size (post receives, barrier, run), close
    assert _names(T.SEND_LAT, True) == PRE + ["hand_shake", "connect", "hand_shake", "hand_shake",
                                             "post_recv", "hand_shake", "run", "done"]
    # write_lat.c: two hand shakes before ctx_connect, two after, no closing exchange
    assert _names(T.WRITE_LAT, False) == PRE + ["hand_shake", "hand_shake", "connect", "hand_shake",
                                               "hand_shake", "run"]
    # read_lat.c: the server closes right after the barrier; only the client runs
    assert _names(T.READ_LAT, False) == PRE + ["hand_shake", "hand_shake", "connect", "hand_shake",
                                              "hand_shake", "done"]
    assert _names(T.READ_LAT, True, 2, True).count("run") == 2
    # write_bw.c / read_bw.c: the server waits for the client's hand shake and report
    for t in (T.WRITE_BW, T.READ_BW):
        assert _names(t, False) == PRE + ["hand_shake", "connect", "hand_shake", "hand_shake",
                                          "hand_shake", "reports", "done"]
        assert _names(t, True, 3, True) == PRE + ["hand_shake", "connect", "hand_shake", "hand_shake",
                                                  "run", "run", "run", "hand_shake", "reports", "done"]
    # send_bw.c: only the server posts receives; -a adds a barrier after each size
    assert _names(T.SEND_BW, True) == PRE + ["hand_shake", "connect", "hand_shake", "hand_shake",
                                            "hand_shake", "run", "done"]
    assert _names(T.SEND_BW, False, 2, True)[7:] == ["post_recv", "hand_shake", "run", "hand_shake",
                                                     "post_recv", "hand_shake", "run", "hand_shake", "done"]
    # both roles make the same exchanges in the same order
    for t in T:
        for n, run_all in ((1, False), (3, True)):
            ex = {"version", "sys_data", "mtu", "hand_shake", "reports", "done"}
            a = [s for s in _names(t, True, n, run_all) if s in ex]
            b = [s for s in _names(t, False, n, run_all) if s in ex]
            assert a == b, t


@given(st.binary(max_size=130), st.booleans())
def test_any_bytes_decode_or_raise_exchange_error(data, with_gid):
    """Whatever a peer sends, the decoders answer with a value or ExchangeError."""
    for call in (lambda: X.decode_dest(data, with_gid), lambda: X.decode_version(data),
                 lambda: X.decode_int(data), lambda: X.decode_mtu(data),
                 lambda: X.decode_bw_report([data[:8], data[8:16], data[16:24], data[24:32], data[32:40]], 6.06)):
        try:
            call()
        except ExchangeError:
            pass


@given(st.text(alphabet="0123456789abcdef:", min_size=107, max_size=107))
def test_hex_and_colons_decode_or_raise_exchange_error(text):
    try:
        d = X.decode_dest(text.encode() + b"\0")
    except ExchangeError:
        return
    assert X.decode_dest(X.encode_dest(d)) == d
