"""rc_pingpong's work-request bookkeeping and C-isms, without a device:
the Schedule state machine driven through a model of one RC link, strtol
against this host's libc, and the summary arithmetic."""
import ctypes
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verbs import WcStatus
from vrdma.commands.rc_pingpong import c_int, c_strtol, c_uint, result_lines
from vrdma.rc_pingpong.errors import CompletionError
from vrdma.rc_pingpong.pingpong import PINGPONG_RECV_WRID, PINGPONG_SEND_WRID, Schedule, mtu_to_enum

libc = ctypes.CDLL(None)
libc.strtol.restype = ctypes.c_long
libc.strtol.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]


class Side:
    """One peer: its Schedule, its CQ, receives posted, SENDs not yet completed."""

    def __init__(self, iters, rx_depth, client):
        self.sched = Schedule(iters, rx_depth, rx_depth, client)
        self.rx_depth = rx_depth
        self.cq: list[int] = []
        self.acks = 0  # SENDs delivered whose completion the sender has not seen yet
        self.recvs = rx_depth
        self.sends_out = 0
        self.sent = 0


def post_send(src: Side, dst: Side) -> None:
    """The peer's RECV completes at once; the SEND's own completion (the ACK)
    may come to the sender before or after the peer's answer."""
    assert src.sends_out == 0, "max_send_wr is 1"
    assert dst.recvs > 0, "a SEND found no receive (RNR)"
    src.sends_out += 1
    src.sent += 1
    src.acks += 1
    dst.recvs -= 1
    dst.cq.append(PINGPONG_RECV_WRID)


def drive(side: Side, peer: Side, n: int) -> None:
    """Poll up to ``n`` completions of ``side`` as rc_pingpong's loop does."""
    wcs, side.cq = side.cq[:n], side.cq[n:]
    for wr_id in wcs:
        if wr_id == PINGPONG_SEND_WRID:
            side.sends_out -= 1
        refill, send = side.sched.on_completion(wr_id, WcStatus.SUCCESS)
        if refill:
            assert side.recvs + refill <= side.rx_depth
            side.recvs += refill
            side.sched.receives_posted(refill)
        if send:
            post_send(side, peer)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 40), st.integers(2, 9), st.randoms(use_true_random=False))
def test_two_schedules_ping_pong_to_the_end_in_any_interleaving(iters, rx_depth, rnd):
    client, server = Side(iters, rx_depth, True), Side(iters, rx_depth, False)
    post_send(client, server)  # main() posts the client's first SEND
    while not (client.sched.done and server.sched.done):
        moves = [(drive, s, p) for s, p in ((client, server), (server, client)) if s.cq and not s.sched.done]
        moves += [(None, s, p) for s, p in ((client, server), (server, client)) if s.acks]
        assert moves, "both sides wait: deadlock"
        move, side, peer = rnd.choice(moves)
        if move is None:
            side.acks -= 1
            side.cq.append(PINGPONG_SEND_WRID)
        else:
            drive(side, peer, rnd.choice((1, 2)))
    # The client's first SEND is posted even for 0 iterations, as in rc_pingpong.
    assert client.sent == max(iters, 1) and server.sent == iters
    assert client.sched.rcnt == server.sched.rcnt == iters


def test_receives_are_topped_up_when_one_is_left():
    s = Schedule(iters=10, rx_depth=4, routs=4, client=False)
    for _ in range(2):  # each RECV answers with a SEND once the last SEND completed
        assert s.on_completion(PINGPONG_RECV_WRID, 0) == (0, True)
        assert s.on_completion(PINGPONG_SEND_WRID, 0) == (0, False)
    assert s.on_completion(PINGPONG_RECV_WRID, 0) == (3, True)  # routs 1: top up rx_depth - 1
    with pytest.raises(CompletionError, match=r"^Couldn't post receive \(3\)$"):
        s.receives_posted(2)


def test_failed_and_unknown_completions():
    s = Schedule(iters=1, rx_depth=2, routs=2, client=True)
    with pytest.raises(CompletionError) as ei:
        s.on_completion(PINGPONG_SEND_WRID, WcStatus.RETRY_EXC_ERR)
    assert str(ei.value) == "Failed status transport retry counter exceeded (12) for wr_id 2"
    with pytest.raises(CompletionError, match="^Completion for unknown wr_id 7$"):
        s.on_completion(7, 0)




@given(st.text(alphabet=" \t+-0123456789abcdefxXgG", max_size=12))
def test_c_strtol_is_libc_strtol(text):
    assert c_strtol(text) == libc.strtol(text.encode(), None, 0)


def test_c_integer_conversions():
    assert c_uint(-1) == 0xFFFFFFFF and c_uint(5) == 5
    assert c_int(0xFFFFFFFF) == -1 and c_int(-3) == -3


def test_mtu_to_enum():
    assert [mtu_to_enum(m) for m in (256, 512, 1024, 2048, 4096)] == [1, 2, 3, 4, 5]
    assert mtu_to_enum(1000) == mtu_to_enum(8192) == mtu_to_enum(0) == 0


def test_result_lines():
    assert result_lines(4096, 1000, 125910.0) == [
        "8192000 bytes in 0.13 seconds = 520.50 Mbit/sec",
        "1000 iters in 0.13 seconds = 125.91 usec/iter",
    ]
    zero = result_lines(1, 10, 0.0)
    assert zero[0].endswith("= inf Mbit/sec") and zero[1].endswith("= 0.00 usec/iter")
    assert math.isnan(float(result_lines(1, 0, 0.0)[1].split("= ")[1].split()[0]))
