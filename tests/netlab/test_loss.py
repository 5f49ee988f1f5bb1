"""netlab.loss: the iptables statistic rule drops about p of the UDP 4791
datagrams arriving in a namespace, nothing else, and goes away on close."""
import time

import pytest

from netlab.errors import IptablesUnavailable, NetlabError
from netlab.loss import RandomLoss, lossy_link
from netlab.ns import two_hosts

from .conftest import drain, udp_socket

pytestmark = pytest.mark.netns

N = 2000


def seq(i: int) -> bytes:
    return i.to_bytes(4, "big") * 16


def test_drops_about_p_of_port_4791_only(netns):
    with two_hosts() as h:
        roce = udp_socket(h.b, h.ip_b, 4791)
        other = udp_socket(h.b, h.ip_b, 4792)
        tx = udp_socket(h.a, h.ip_a)
        with RandomLoss(h.b, 0.2) as loss:
            backend = loss.backend
            assert loss.tag in h.b.run([backend, "-S"]).stdout
            for i in range(N):
                tx.sendto(seq(i), (h.ip_b, 4791))
                tx.sendto(seq(i), (h.ip_b, 4792))
            # the other port is complete once the 4791 datagrams sent before it are in
            assert drain(other, N) == [seq(i) for i in range(N)]
            got = drain(roce)
            dropped = loss.dropped()
        # Binomial(2000, 0.2): mean 400, sd 17.9; these bounds are > 8 sd away
        assert 250 <= dropped <= 550
        assert len(got) == N - dropped
        assert got == sorted(got) and len(set(got)) == len(got)     # survivors intact, in order
        assert all(g == g[:4] * 16 for g in got)
        assert loss.tag not in h.b.run([backend, "-S"]).stdout
        loss.close()                                                  # idempotent
        for i in range(100):
            tx.sendto(seq(i), (h.ip_b, 4791))
        assert len(drain(roce, 100)) == 100
        for s in (roce, other, tx):
            s.close()


def test_lossy_link_drops_both_directions(netns):
    with two_hosts() as h:
        rx_b = udp_socket(h.b, h.ip_b, 4791)
        rx_a = udp_socket(h.a, h.ip_a, 4791)
        with lossy_link(h.a, h.b, 1.0) as (la, lb):
            for _ in range(50):
                rx_a.sendto(b"a->b", (h.ip_b, 4791))
                rx_b.sendto(b"b->a", (h.ip_a, 4791))
            end = time.monotonic() + 10
            while (la.dropped(), lb.dropped()) != (50, 50) and time.monotonic() < end:
                time.sleep(0.01)
            assert (la.dropped(), lb.dropped()) == (50, 50)
            assert drain(rx_b) == [] and drain(rx_a) == []
        rx_a.sendto(b"a->b", (h.ip_b, 4791))
        assert drain(rx_b, 1) == [b"a->b"]
        rx_a.close()
        rx_b.close()


def test_bad_parameters(netns):
    with two_hosts() as h:
        for p in (-0.1, 1.5):
            with pytest.raises(NetlabError, match="probability"):
                RandomLoss(h.a, p)
        with pytest.raises(NetlabError, match="port"):
            RandomLoss(h.a, 0.1, port=70000)


def test_no_working_backend_is_a_clear_error(netns, monkeypatch):
    import netlab.loss
    monkeypatch.setattr(netlab.loss, "BACKENDS", ("iptables-absent", "iptables-missing"))
    with two_hosts() as h, pytest.raises(IptablesUnavailable) as e:
        RandomLoss(h.b, 0.1)
    assert "iptables-absent:" in str(e.value) and "iptables-missing:" in str(e.value)
    assert h.b.name in str(e.value)
