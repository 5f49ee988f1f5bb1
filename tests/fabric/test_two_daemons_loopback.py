"""Two real back-end daemons, each its own RoCEv2 host on a loopback address
(127.0.0.1 and 127.0.0.2), a guest on each: every verb crosses real UDP
sockets on port 4791 with ICRC, between two processes; plain, and
authenticated (both daemons started with the same --cluster-key)."""
from __future__ import annotations

import random

import pytest

from guest_lib import SGE, SendWR
from guest_lib.endpoint import RcEndpoint
from vhost_user.testing import DaemonProcess
from verbs import WcStatus, WrOpcode
from fabric.roce import gid_of_address

from .verbs_exercise import send_write_read_atomics


@pytest.fixture(scope="module", params=["plain", "authenticated"])
def hosts(request, tmp_path_factory):
    extra = []
    if request.param == "authenticated":
        from roce.auth import write_key_file

        key = str(tmp_path_factory.mktemp("key") / "cluster.key")
        write_key_file(key)
        extra = ["--cluster-key", key]
    with DaemonProcess("--roce-addr", "127.0.0.1", *extra) as da, \
            DaemonProcess("--roce-addr", "127.0.0.2", *extra) as db:
        yield da, db


@pytest.fixture
def pair(hosts):
    da, db = hosts
    a = RcEndpoint(da.path, buf_size=4 << 20)
    b = RcEndpoint(db.path, buf_size=4 << 20)
    try:
        assert a.gid.raw == gid_of_address("127.0.0.1") and b.gid.raw == gid_of_address("127.0.0.2")
        a.connect(b.info(), sq_psn=0xFFFF00, rq_psn=77, path_mtu=5)
        b.connect(a.info(), sq_psn=77, rq_psn=0xFFFF00, path_mtu=5)
        yield a, b
    finally:
        a.close()
        b.close()


def test_send_write_read_atomics_between_two_daemons(pair):
    a, b = pair
    # the SEND is three 4096-byte packets, PSNs wrapping
    send_write_read_atomics(a, b, random.Random(3))


def test_remote_access_error_across_hosts(pair):
    a, b = pair
    a.qp.post_send(SendWR(9, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 16, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey ^ 0x5A00))
    (wc,) = a.poll()
    assert wc.status == WcStatus.REM_ACCESS_ERR
