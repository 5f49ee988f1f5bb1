"""netlab.relay: the impairment policy on its own (sans I/O), then the relay
process between two namespaces: sequence-numbered datagrams arrive byte for
byte, with exactly the reordering, duplication and loss its counters report."""
import hashlib
import struct
import time

import pytest

from netlab.errors import NetlabError
from netlab.ns import two_hosts_via_relay
from netlab.relay import Counters, Impairment, Policy, PolicyError, impaired_frame, parse_args

from .conftest import drain, udp_socket

N = 3000


# ----------------------------------------------------------------- sans I/O
def run_policy(policy, n, stream=0):
    imp = Impairment(policy, stream)
    out = []
    for i in range(n):
        out += imp.frame(bytes([i % 256, i // 256]), now=float(i))
    out += imp.flush()
    return [f[0] + 256 * f[1] for f in out], imp.counters


def late(seqs):
    """Sequence numbers that arrive after a higher one (first copies only)."""
    out, top, seen = [], -1, set()
    for s in seqs:
        if s in seen:
            continue
        seen.add(s)
        if s < top:
            out.append(s)
        top = max(top, s)
    return out


def test_no_impairment_is_identity():
    seqs, c = run_policy(Policy(), 500)
    assert seqs == list(range(500)) and c == Counters(impaired=500)


def test_reorder_releases_after_depth_frames():
    seqs, c = run_policy(Policy(seed=7, reorder=0.2, reorder_depth=3), 2000)
    assert sorted(seqs) == list(range(2000))
    assert c.held > 300 and c.held - 3 <= len(late(seqs)) <= c.held
    # a frame held alone comes right after the next 3
    lone = [i for i in range(2000 - 4) if seqs[i:i + 4] == [seqs[i] + k for k in (0, 1, 2, -1)]]
    assert len(lone) > 50                                    # 99 with this seed


def test_reorder_timeout_releases_held_frames():
    imp = Impairment(Policy(reorder=1.0, hold_timeout=0.5), 0)
    assert imp.frame(b"a", now=10.0) == [] and imp.frame(b"b", now=10.2) == []
    assert imp.deadline() == 10.5
    assert imp.expire(10.49) == []
    assert imp.expire(10.5) == [b"a"] and imp.deadline() == pytest.approx(10.7)
    assert imp.expire(11.0) == [b"b"] and imp.deadline() is None
    assert imp.counters.released_by_timeout == 2


def test_duplicate_and_loss_counts():
    seqs, c = run_policy(Policy(seed=1, duplicate=0.1, loss=0.1), 4000)
    assert len(seqs) == 4000 - c.dropped + c.duplicated
    assert 250 < c.dropped < 550 and 200 < c.duplicated < 550
    assert seqs == sorted(seqs)                              # no reordering asked for
    dups = [s for s, t in zip(seqs, seqs[1:]) if s == t]
    assert len(dups) == c.duplicated


def test_seed_makes_runs_reproducible_and_directions_independent():
    p = Policy(seed=3, reorder=0.1, duplicate=0.1, loss=0.05)
    assert run_policy(p, 1000) == run_policy(p, 1000)
    assert run_policy(p, 1000)[0] != run_policy(p, 1000, stream=1)[0]
    assert run_policy(p, 1000)[0] != run_policy(Policy(seed=4, reorder=0.1), 1000)[0]


def frame(ethertype=0x0800, proto=17, dport=4791, ihl=5):
    ip = bytes([0x40 | ihl, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]) + bytes(8) + bytes((ihl - 5) * 4)
    return bytes(12) + struct.pack("!H", ethertype) + ip + struct.pack("!HHHH", 999, dport, 8, 0) + bytes(8)


def test_which_frames_are_impaired():
    assert impaired_frame(frame(), None) and impaired_frame(frame(), 4791)
    assert impaired_frame(frame(ihl=6), 4791)                 # IP options shift the UDP header
    assert not impaired_frame(frame(dport=4792), 4791) and impaired_frame(frame(dport=4792), None)
    assert not impaired_frame(frame(ethertype=0x0806), None)  # ARP passes straight
    assert not impaired_frame(frame(proto=6), None)           # so does TCP
    assert not impaired_frame(frame()[:30], None)


def test_policy_validation_and_command_line():
    for kw in ({"loss": 1.5}, {"duplicate": -0.1}, {"reorder_depth": 0}, {"hold_timeout": 0},
               {"udp_port": 70000}):
        with pytest.raises(PolicyError, match=next(iter(kw))):
            Policy(**kw)
    assert issubclass(PolicyError, NetlabError)
    p = Policy(seed=5, loss=0.1, duplicate=0.2, reorder=0.3, reorder_depth=4, hold_timeout=0.01,
               udp_port=4791)
    assert parse_args(["ra", "rb", *p.argv()])[1] == p
    assert parse_args(["ra", "rb"])[1] == Policy()


# ------------------------------------------------------------- the process
def payload(i: int, size: int = 200) -> bytes:
    head = struct.pack("!I", i)
    return head + (hashlib.sha256(head).digest() * (size // 32 + 1))[:size - 4]


def seq_of(d: bytes) -> int:
    i = struct.unpack_from("!I", d)[0]
    assert d == payload(i, len(d)), f"datagram {i} corrupted"
    return i


def send_through(h, n, port=4791, size=200):
    h.resolve()
    rx = udp_socket(h.b, h.ip_b, port)
    tx = udp_socket(h.a, h.ip_a)
    for i in range(n):
        tx.sendto(payload(i, size), (h.ip_b, port))
    return rx, tx


def relayed(relay, n, timeout=10.0):
    """The relay's a->b counters once it has taken ``n`` impaired frames."""
    end = time.monotonic() + timeout
    while (st := relay.stats()["a_to_b"])["impaired"] < n and time.monotonic() < end:
        time.sleep(0.01)
    return st


@pytest.mark.netns
def test_forwards_byte_for_byte_without_loss(netns):
    with two_hosts_via_relay(Policy()) as h:
        h.resolve()
        st0 = h.relay.stats()
        assert st0["a_to_b"]["passed"] >= 1 and st0["b_to_a"]["passed"] >= 1   # ARP went through
        rx, tx = send_through(h, N, size=1400)
        got = [seq_of(d) for d in drain(rx, N)]
        assert got == list(range(N))
        ab = {k: v - st0["a_to_b"][k] for k, v in h.relay.stats()["a_to_b"].items()}
        assert ab["impaired"] == ab["rx"] == ab["tx"] == N and ab["kernel_drops"] == 0
        rx.close(), tx.close()
        assert h.relay.stop()["a_to_b"]["tx"] == st0["a_to_b"]["tx"] + N


@pytest.mark.netns
def test_reorders_and_duplicates_as_counted(netns):
    policy = Policy(seed=11, reorder=0.05, duplicate=0.03, reorder_depth=3, udp_port=4791)
    with two_hosts_via_relay(policy) as h:
        rx, tx = send_through(h, N)
        # every copy the relay will send: waiting for N (of which some duplicates) and then 0.2 s
        # of quiet let a relay stalled past 0.2 s keep a held frame, which then counted as lost
        st = relayed(h.relay, N)
        got = [seq_of(d) for d in drain(rx, N + st["duplicated"], quiet=0.2)]
        other = udp_socket(h.b, h.ip_b, 5000)                  # a port the policy leaves alone
        for i in range(300):
            tx.sendto(payload(i), (h.ip_b, 5000))
        assert [seq_of(d) for d in drain(other, 300)] == list(range(300))
        ab = h.relay.stop()["a_to_b"]
        rx.close(), tx.close(), other.close()
    assert ab["kernel_drops"] == 0 and ab["dropped"] == 0 and ab["impaired"] == N
    assert sorted(set(got)) == list(range(N))                 # nothing lost
    assert len(got) == N + ab["duplicated"] and ab["duplicated"] > 0
    assert ab["held"] > 0
    assert ab["held"] - ab["released_by_timeout"] <= len(late(got)) <= ab["held"]


@pytest.mark.netns
def test_relay_loss(netns):
    with two_hosts_via_relay(Policy(seed=2, loss=0.2, udp_port=4791)) as h:
        rx, tx = send_through(h, 2000)
        st = relayed(h.relay, 2000)
        got = [seq_of(d) for d in drain(rx, 2000 - st["dropped"])]
        rx.close(), tx.close()
    assert 250 <= st["dropped"] <= 550 and st["kernel_drops"] == 0
    assert len(got) == 2000 - st["dropped"] and got == sorted(got)
