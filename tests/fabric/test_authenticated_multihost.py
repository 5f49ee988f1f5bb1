"""test_multihost's traffic with the authenticated fabric: two daemons started
as ``vrdma backend --cluster-key FILE`` (the command line, key file made by
``vrdma keygen``) in two namespaces; every verb across the veth, then
through the L2 relay with reordering, duplication and loss, where the replay
window must take every reordered datagram and drop every duplicate (which RC
would have dropped as a duplicate PSN anyway). A key file with group access
is refused at start with a message naming it.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tests.fabric.test_multihost import A_IP, B_IP, RELAY_IDS, RELAY_POLICIES, connect, exchange_all_verbs, \
    through_relay

netlab = pytest.importorskip("netlab.ns")
from netlab.relay import Policy, RelayProcess  # noqa: E402

pytestmark = pytest.mark.netns


class Host:
    def __init__(self, ns, ip, sock, key):
        self.ns, self.ip, self.sock = ns, ip, sock
        self.proc = ns.popen([sys.executable, "-m", "vrdma", "backend", "--socket", sock,
                              "--roce-addr", ip, "--cluster-key", key])
        self.proc.expect("(authenticated)", timeout=20)
        self.proc.expect("listening", timeout=20)


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("key") / "cluster.key")
    subprocess.run([sys.executable, "-m", "vrdma", "keygen", path], check=True,
                   capture_output=True)
    return path


@pytest.fixture(scope="module")
def relayed(tmp_path_factory, key):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    d = tmp_path_factory.mktemp("amh")
    with netlab.Namespace() as na, netlab.Namespace() as nr, netlab.Namespace() as nb:
        netlab.veth_pair(na, nr, f"{A_IP}/24", None, if_b="ra", tx_checksum=False)
        netlab.veth_pair(nb, nr, f"{B_IP}/24", None, if_b="rb", tx_checksum=False)
        yield Host(na, A_IP, str(d / "a.sock"), key), Host(nb, B_IP, str(d / "b.sock"), key), nr


@pytest.mark.parametrize("mtu,size", [(5, 1), (5, 1 << 20), (3, 1 << 20), (5, 8 << 20)],
                         ids=["mtu4096-1B", "mtu4096-1MiB", "mtu1024-1MiB", "mtu4096-8MiB"])
def test_all_verbs_authenticated(relayed, mtu, size):
    ha, hb, nr = relayed
    with RelayProcess(nr, "ra", "rb", Policy(seed=0, udp_port=4791)):
        a, b = connect(ha, hb, mtu=mtu)
        try:
            exchange_all_verbs(a, b, size, random.Random(size + mtu))
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize("policy", RELAY_POLICIES, ids=RELAY_IDS)
def test_reorder_duplicate_loss_authenticated(relayed, policy):
    through_relay(relayed, policy)


def test_key_file_readable_by_group_is_refused(tmp_path, key):
    bad = tmp_path / "group.key"
    bad.write_bytes(open(key, "rb").read())
    os.chmod(bad, 0o640)
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "--socket",
                        str(tmp_path / "x.sock"), "--roce-addr", "127.0.0.1", "--cluster-key",
                        str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"cluster key file {bad} has mode 0640" in r.stderr
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.parametrize("extra,message", [
    (["--cluster-key", "/nonexistent/cluster.key"],
     "cluster key file /nonexistent/cluster.key: No such file or directory"),
    (["--plaintext-peer", "192.0.2.9"], "--plaintext-peer needs --cluster-key"),
    (["--peer-port-check", "192.0.2.9=sometimes"], "'sometimes' is not one of daemon, rxe"),
], ids=["missing-key", "plaintext-without-key", "bad-mode"])
def test_bad_auth_options_are_refused(tmp_path, extra, message):
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "--socket",
                        str(tmp_path / "x.sock"), "--roce-addr", "127.0.0.1", *extra],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and message in r.stderr


def test_auth_options_without_the_roce_fabric_are_refused(tmp_path, key):
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "--socket",
                        str(tmp_path / "x.sock"), "--cluster-key", key],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "to the RoCE fabric (--roce-addr)" in r.stderr
