"""netlab.ns: namespaces come and go without leftovers, processes in them are
owned and reaped, veth links carry UDP at the MTU they were given."""
import errno
import os
import socket
import sys

import pytest

from netlab.errors import AddressNotAllowed, ProcessFailed
import subprocess

from netlab.ns import Namespace, reap_stale, run, tap_device, two_hosts, veth_pair

from .conftest import drain, our_namespaces, udp_socket

pytestmark = pytest.mark.netns

IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_namespace_removed_with_its_processes(netns):
    ns = Namespace()
    assert ns.name in our_namespaces()
    assert "lo" in ns.run(["ip", "-o", "link", "show", "up"]).stdout
    # a child we started and a grandchild it started in the background
    p = ns.popen(["sh", "-c", "sleep 60 & echo $!; exec sleep 60"])
    grandchild = int(p.expect("", timeout=5))
    assert sorted(ns.pids()) == sorted([p.pid, grandchild])
    ns.close()
    assert ns.closed and ns.name not in our_namespaces()
    assert p.returncode is not None
    assert not alive(p.pid) and not alive(grandchild)
    ns.close()                                   # idempotent
    with pytest.raises(ProcessFailed):
        ns.popen(["true"])


def test_stale_namespaces_of_dead_runs_are_reaped(netns):
    """A killed run's namespaces (its pid gone, nothing inside) are deleted; a live
    creator's, or one with a process inside, are kept."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, busy = f"vrdmatest-{dead.pid}-0-beef", f"vrdmatest-{dead.pid}-1-beef"
    live = f"vrdmatest-{os.getppid()}-0-beef"
    for name in (stale, busy, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    holder = subprocess.Popen(["ip", "netns", "exec", busy, "sleep", "60"])
    try:
        for _ in range(100):
            if subprocess.run(["ip", "netns", "pids", busy], capture_output=True, text=True).stdout:
                break
        assert reap_stale("vrdmatest") == [stale]
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listed and busy in listed and live in listed
    finally:
        holder.kill()
        holder.wait()
        for name in (stale, busy, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_expect_reports_exit_status_and_output(netns):
    with Namespace() as ns:
        p = ns.popen(["sh", "-c", "echo started; echo oops >&2; exit 3"])
        assert p.expect("started") == "started"
        with pytest.raises(ProcessFailed, match="exited 3: oops"):
            p.expect("never printed", timeout=5)
        q = ns.popen([sys.executable, "-c", "import time; time.sleep(30)"])
        with pytest.raises(ProcessFailed, match="timed out"):
            q.expect("ready", timeout=0.2)
        assert q.stop() == -15


def test_entered_switches_only_the_block(netns):
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with Namespace() as ns:
        with ns.entered():
            inside = os.stat("/proc/thread-self/ns/net").st_ino
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert os.stat("/proc/thread-self/ns/net").st_ino == home != inside
        with s:
            s.bind(("127.0.0.1", 0))             # the namespace's own loopback
            port = s.getsockname()[1]
            with ns.entered():
                t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with t:
                t.sendto(b"x", ("127.0.0.1", port))
                s.settimeout(2)
                assert s.recv(10) == b"x"


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_udp_across_veth_at_link_mtu(netns, mtu):
    with two_hosts(mtu=mtu) as h:
        assert f"mtu {mtu} " in h.a.run(["ip", "-o", "link", "show", "veth0"]).stdout
        rx = udp_socket(h.b, h.ip_b, 4000)
        tx = udp_socket(h.a, h.ip_a)
        tx.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)   # DF, as RoCE
        biggest = mtu - 28
        msgs = [os.urandom(n) for n in (1, 64, biggest)]
        for m in msgs:
            tx.sendto(m, (h.ip_b, 4000))
        with pytest.raises(OSError) as e:
            tx.sendto(bytes(biggest + 1), (h.ip_b, 4000))
        assert e.value.errno == errno.EMSGSIZE
        assert drain(rx, len(msgs)) == msgs
        # and back
        tx2 = udp_socket(h.b, h.ip_b)
        rx2 = udp_socket(h.a, h.ip_a, 4001)
        tx2.sendto(b"back", (h.ip_a, 4001))
        assert drain(rx2, 1) == [b"back"]
        for s in (rx, tx, tx2, rx2):
            s.close()


def test_only_lab_addresses(netns):
    with Namespace() as a, Namespace() as b:
        for bad in ("10.0.0.1/24", "192.0.3.1/24", "not-an-address"):
            with pytest.raises(AddressNotAllowed, match="not in 192.0.2.0/24"):
                veth_pair(a, b, bad, "192.0.2.2/24")
        assert "veth0" not in a.run(["ip", "link"]).stdout       # nothing was created
        link = veth_pair(a, b, "203.0.113.1/24", "203.0.113.2/24", mtu=4200)
        assert (link.if_a, link.if_b, link.mtu) == ("veth0", "veth0", 4200)
        assert "203.0.113.2/24" in b.run(["ip", "-o", "addr", "show", "veth0"]).stdout


def test_tap_device_lives_in_its_namespace(netns):
    with Namespace() as ns:
        assert tap_device(ns, "vrtap9", "203.0.113.5/24") == "vrtap9"
        shown = ns.ip("-d", "addr", "show", "dev", "vrtap9").stdout
        assert "203.0.113.5/24" in shown and "tun type tap" in shown
        assert "vrtap9" not in run(["ip", "link", "show"]).stdout      # not in the host's
        with pytest.raises(AddressNotAllowed):
            tap_device(ns, "vrtap8", "10.0.0.1/24")
