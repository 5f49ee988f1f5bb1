"""The verbs fabric on a real RDMA device: two back-end daemons, each with
its own context on the host's device, a guest on each, every verb going
through the device (kernel rxe loops it back, a NIC sends it on the wire).

These tests need an RDMA device and skip, saying so, where there is none
(this CI host's kernel has no RDMA). ``qemu_tests/test_verbs_transport.py``
runs this module for real inside a guest booted with Debian's kernel and
rdma_rxe. ``VRDMA_VERBS_DEVICE`` picks the device (default: the first).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from guest_lib import SGE, RecvWR, SendWR
from guest_lib.endpoint import ALL_ACCESS, RcEndpoint
from guest_lib.qp import QPCap
from vhost_user.testing import DaemonProcess
from verbs import SendFlags, WcFlags, WcOpcode, WcStatus, WrOpcode
from virtio_rdma.constants import Cmd
from fabric.hca import rdma_devices

from .verbs_exercise import send_write_read_atomics

DEVICES = rdma_devices()
DEV = os.environ.get("VRDMA_VERBS_DEVICE") or (DEVICES[0] if DEVICES else None)
needs_device = pytest.mark.skipif(
    DEV is None, reason="no RDMA device: pyverbs lists none (needs kernel rxe or an RDMA NIC; "
                        "qemu_tests/test_verbs_transport.py runs these in a kernel-rxe guest)")
MTU = 3  # IBV_MTU_1024: what rxe on a 1500-byte netdev offers
PAGE = 4096
SIG = SendFlags.SIGNALED


def test_backend_names_a_missing_device(tmp_path):
    name = "vrdma-nosuch0"
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "-s", str(tmp_path / "s"),
                        "--fabric", "verbs", "--verbs-device", name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"cannot open RDMA device {name!r}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "vrdma", "backend", "-s", str(tmp_path / "s"),
                        "--fabric", "verbs"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--fabric verbs needs --verbs-device" in r.stderr


@pytest.fixture(scope="module")
def hosts():
    with DaemonProcess("--verbs-device", DEV) as da, DaemonProcess("--verbs-device", DEV) as db:
        yield da, db


def _pair(hosts, hugetlb="auto", **attrs):
    da, db = hosts
    cap = QPCap(max_send_wr=64, max_recv_wr=64, max_send_sge=2, max_recv_sge=2, max_inline_data=64)
    a = RcEndpoint(da.path, buf_size=4 << 20, cap=cap)
    b = RcEndpoint(db.path, buf_size=4 << 20, cap=cap, hugetlb=hugetlb)
    a.connect(b.info(), sq_psn=0xFFFF00, rq_psn=77, path_mtu=MTU, **attrs)
    b.connect(a.info(), sq_psn=77, rq_psn=0xFFFF00, path_mtu=MTU, **attrs)
    return a, b


@pytest.fixture
def pair(hosts):
    a, b = _pair(hosts)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@needs_device
def test_guests_see_the_devices_gid_and_port(pair):
    a, b = pair
    assert a.gid.raw == b.gid.raw and a.gid.raw[:12] == bytes(10) + b"\xff\xff"
    assert a.ctx.query_port().active_mtu <= 5
    assert a.qp.qp_num != b.qp.qp_num


@needs_device
def test_send_write_read_atomics_through_the_device(pair):
    a, b = pair
    # the SEND is ten 1024-byte packets, PSNs wrapping past 2^24
    send_write_read_atomics(a, b, random.Random(5), write_timeout=120)


@needs_device
def test_immediate_inline_empty_and_unsignaled(pair):
    a, b = pair
    for i in range(4):
        b.qp.post_recv(RecvWR(10 + i, 1, [SGE(b.mr.buf + 4096 * i, 4096, b.mr.lkey)]))
    imm = struct.unpack("<I", struct.pack(">I", 0xC0FFEE01))[0]  # htonl, as libibverbs' __be32
    a.mr.write(b"hello", 5, 0)
    a.mr.write(b"inline!" * 5, 35, 100)
    a.qp.post_send(SendWR(20, WrOpcode.SEND_WITH_IMM, 1, [SGE(a.mr.buf, 5, a.mr.lkey)],
                          imm_data=imm))
    a.qp.post_send(SendWR(21, WrOpcode.SEND, 1, [SGE(a.mr.buf + 100, 35, 0)],
                          send_flags=SIG | SendFlags.INLINE))
    a.qp.post_send(SendWR(22, WrOpcode.RDMA_WRITE_WITH_IMM, 0, [], remote_addr=b.mr.buf,
                          rkey=b.mr.rkey, imm_data=imm + 1, send_flags=0))  # unsignaled, empty
    a.qp.post_send(SendWR(23, WrOpcode.SEND, 1, [SGE(a.mr.buf, 1, a.mr.lkey)]))
    got = b.poll(4, timeout=20)
    assert [(w.wr_id, w.status, w.byte_len) for w in got] == [(10, 0, 5), (11, 0, 35), (12, 0, 0),
                                                              (13, 0, 1)]
    assert got[0].wc_flags & WcFlags.WITH_IMM and got[0].imm_data == imm
    assert got[2].opcode == WcOpcode.RECV_RDMA_WITH_IMM and got[2].imm_data == imm + 1
    assert b.mr.read(5, 0) == b"hello" and b.mr.read(35, 4096) == b"inline!" * 5
    assert [w.wr_id for w in a.poll(3, timeout=20)] == [20, 21, 23]  # 22 retired silently
    assert not a.cq.poll(1)[1]


@needs_device
def test_bad_rkey_is_a_remote_access_error_then_flush(pair):
    a, b = pair
    a.qp.post_send(SendWR(30, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 16, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey ^ 0x5A00))
    a.qp.post_send(SendWR(31, WrOpcode.SEND, 1, [SGE(a.mr.buf, 16, a.mr.lkey)]))
    w1, w2 = a.poll(2, timeout=20)
    assert (w1.wr_id, w1.status) == (30, WcStatus.REM_ACCESS_ERR)
    assert (w2.wr_id, w2.status) == (31, WcStatus.WR_FLUSH_ERR)
    a.qp.post_send(SendWR(32, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 16, a.mr.lkey)],
                          remote_addr=b.mr.buf - 4096, rkey=b.mr.rkey))  # QP is in ERR now
    (w3,) = a.poll(1, timeout=20)
    assert (w3.wr_id, w3.status) == (32, WcStatus.WR_FLUSH_ERR)


@needs_device
def test_a_wqe_the_device_never_sees_fails_locally_and_flushes_those_before(pair):
    """An INLINE RDMA READ is refused before it reaches the device: the SEND
    before it (stuck in RNR: the peer has no receive) is flushed, the READ
    completes with LOC_QP_OP_ERR, and the QP is in ERR."""
    a, b = pair
    a.qp.post_send(SendWR(60, WrOpcode.SEND, 1, [SGE(a.mr.buf, 8, a.mr.lkey)]))
    a.qp.post_send(SendWR(61, WrOpcode.RDMA_READ, 1, [SGE(a.mr.buf, 8, a.mr.lkey)],
                          remote_addr=b.mr.buf, rkey=b.mr.rkey, send_flags=SIG | SendFlags.INLINE))
    w1, w2 = a.poll(2, timeout=20)
    assert (w1.wr_id, w1.status, w2.wr_id, w2.status) == (60, WcStatus.WR_FLUSH_ERR, 61,
                                                          WcStatus.LOC_QP_OP_ERR)
    assert a.qp.query()["attr"]["qp_state"] == 6  # ERR


@needs_device
def test_an_mr_of_scattered_pages_is_one_range_for_the_device(hosts):
    """REG_MR with two pages listed in reverse order: the daemon shows them to
    the device as one range (an alias window), so a peer's 8 KiB WRITE lands
    in the second page first, and a READ returns it in iova order."""
    a, b = _pair(hosts, hugetlb=False)
    try:
        gpa, view = b.ctx.alloc(2 * PAGE, PAGE)
        iova = b.ctx.uva_of(gpa)
        r = b.ctx.command(Cmd.REG_MR, pdn=b.pd.pdn, access=int(ALL_ACCESS), iova=iova,
                          length=2 * PAGE, nchunks=2, reserved=0,
                          chunks=[dict(gpa=gpa + PAGE, length=PAGE), dict(gpa=gpa, length=PAGE)])
        data = random.Random(9).randbytes(2 * PAGE)
        a.mr.write(data, len(data), 0)
        a.qp.post_send(SendWR(70, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 2 * PAGE, a.mr.lkey)],
                              remote_addr=iova, rkey=r["rkey"]))
        assert a.poll_one().wr_id == 70
        assert bytes(view[PAGE:]) == data[:PAGE] and bytes(view[:PAGE]) == data[PAGE:]
        a.qp.post_send(SendWR(71, WrOpcode.RDMA_READ, 1,
                              [SGE(a.mr.buf + (1 << 20), 2 * PAGE - 100, a.mr.lkey)],
                              remote_addr=iova + 100, rkey=r["rkey"]))
        assert a.poll_one().byte_len == 2 * PAGE - 100
        assert a.mr.read(2 * PAGE - 100, 1 << 20) == data[100:]
        b.ctx.command(Cmd.DEREG_MR, lkey=r["lkey"])
    finally:
        a.close()
        b.close()


@needs_device
def test_out_of_bounds_write_lands_nowhere(hosts):
    a, b = _pair(hosts)
    try:
        b.mr.write(b"\xAA" * 64, 64, 0)
        a.qp.post_send(SendWR(40, WrOpcode.RDMA_WRITE, 1, [SGE(a.mr.buf, 64, a.mr.lkey)],
                              remote_addr=b.mr.buf + b.mr.length - 32, rkey=b.mr.rkey))
        (wc,) = a.poll(1, timeout=20)
        assert wc.status == WcStatus.REM_ACCESS_ERR
        assert b.mr.read(32, b.mr.length - 32) == bytes(32)
    finally:
        a.close()
        b.close()


@needs_device
def test_no_receive_posted_is_rnr_retry_exceeded(hosts):
    a, b = _pair(hosts, rnr_retry=0, min_rnr_timer=1)
    try:
        a.qp.post_send(SendWR(50, WrOpcode.SEND, 1, [SGE(a.mr.buf, 8, a.mr.lkey)]))
        (wc,) = a.poll(1, timeout=20)
        assert (wc.wr_id, wc.status) == (50, WcStatus.RNR_RETRY_EXC_ERR)
    finally:
        a.close()
        b.close()


def _key(entry: dict, name: str) -> int:
    v = entry.get(name)  # the rdma tool prints keys as bare hex ("fa2")
    return v if isinstance(v, int) else int(str(v), 16)


def _rdma_res(kind: str) -> list[dict]:
    out = subprocess.run(["rdma", "-j", "-d", "resource", "show", kind], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout or "[]")


@needs_device
@pytest.mark.skipif(shutil.which("rdma") is None, reason="no `rdma` tool (iproute2)")
def test_the_device_holds_the_guests_keys_and_releases_them(hosts):
    da, db = hosts
    a, b = _pair(hosts)
    try:
        mrs = [m for m in _rdma_res("mr") if m.get("pid") == da.proc.pid]
        mine = [m for m in mrs if m.get("mrlen") == a.mr.length]
        assert mine, mrs
        assert any(_key(m, "rkey") == a.mr.rkey for m in mine), (mine, a.mr.rkey)
        assert any(_key(m, "lkey") == a.mr.lkey for m in mine), (mine, a.mr.lkey)
        qps = [q for q in _rdma_res("qp") if q.get("pid") == da.proc.pid]
        assert any(q.get("lqpn") == a.qp.qp_num and q.get("rqpn") == b.qp.qp_num for q in qps), qps
    finally:
        a.close()
        b.close()
    deadline = time.monotonic() + 20  # the daemon releases the guest's device objects
    while True:
        left = [m for m in _rdma_res("mr") if m.get("pid") in (da.proc.pid, db.proc.pid)
                and m.get("mrlen") == 4 << 20]
        left += [q for q in _rdma_res("qp") if q.get("pid") in (da.proc.pid, db.proc.pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_device
@pytest.mark.skipif(shutil.which("ibv_rc_pingpong") is None, reason="no ibv_rc_pingpong (ibverbs-utils)")
@pytest.mark.parametrize("ours", ["server", "client"])
def test_ibv_rc_pingpong_against_a_guest_on_the_verbs_fabric(hosts, ours):
    """An unmodified ibv_rc_pingpong on the device against ``vrdma rc-pingpong``
    behind a daemon whose QPs are the device's: the same device, two worlds."""
    from fabric.hca import VerbsFabric

    fab = VerbsFabric(DEV)
    gid_index = fab.gid_index
    fab.close()
    da, _ = hosts
    port = str(_free_port())
    size = "4096"
    ibv = ["ibv_rc_pingpong", "-d", DEV, "-g", str(gid_index), "-p", port, "-n", "50", "-s", size]
    vr = [sys.executable, "-m", "vrdma", "rc-pingpong", "--backend", da.path, "-g", "0",
          "-p", port, "-n", "50", "-s", size, "--timeout", "60"]
    server, client = (vr, ibv + ["127.0.0.1"]) if ours == "server" else (ibv, vr + ["127.0.0.1"])
    srv = subprocess.Popen(server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            cl = subprocess.run(client, capture_output=True, text=True, timeout=120)
            if cl.returncode == 0 or "Couldn't connect" not in cl.stdout + cl.stderr \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        out, _ = srv.communicate(timeout=120)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert cl.returncode == 0 and srv.returncode == 0, (cl.stdout, cl.stderr, out)
    for text in (out, cl.stdout + cl.stderr):
        assert re.search(r"^\d+ bytes in [\d.]+ seconds", text, re.M), text
        assert re.search(r"^50 iters in [\d.]+ seconds", text, re.M), text


@needs_device
def test_local_only_mrs_without_device_rkeys_coexist(pair):
    """rxe gives an MR without remote rights rkey 0; several such MRs must
    still register, and work as local SGEs."""
    from guest_lib import MR
    from verbs import Access

    a, b = pair
    mrs = [MR(a.pd, 4096, Access.LOCAL_WRITE) for _ in range(3)]
    assert len({m.lkey for m in mrs}) == 3
    src = mrs[2]
    src.write(b"local-only", 10, 0)
    b.qp.post_recv(RecvWR(80, 1, [SGE(b.mr.buf, 64, b.mr.lkey)]))
    a.qp.post_send(SendWR(81, WrOpcode.SEND, 1, [SGE(src.buf, 10, src.lkey)]))
    assert b.poll_one().byte_len == 10 and b.mr.read(10, 0) == b"local-only"
    assert a.poll_one().wr_id == 81
    for m in mrs:
        m.close()


def _event_fds(pid: int) -> int:
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[infinibandevent]"
        except OSError:
            pass
    return n


@needs_device
def test_a_guests_qps_share_completion_channels(hosts):
    """Device QPs of one guest share a few CQs and channels: 24 QPs cost the
    daemon one fd, not 24 (a guest must not exhaust the daemon's fds)."""
    from guest_lib import QP, QPInitAttr

    da, _ = hosts
    before = _event_fds(da.proc.pid)
    a = RcEndpoint(da.path, buf_size=1 << 20, cap=QPCap(max_send_wr=16, max_recv_wr=16))
    try:
        qps = [QP(a.pd, QPInitAttr(scq=a.cq, rcq=a.cq, cap=QPCap(max_send_wr=16, max_recv_wr=16)))
               for _ in range(23)]
        assert len({q.qp_num for q in qps}) == 23
        assert _event_fds(da.proc.pid) - before == 1
    finally:
        a.close()


@needs_device
def test_registration_budget_stops_a_guest_pinning_without_bound(pair):
    """REG_MR of the same 4 MiB again and again: the device pins pages per
    registration, so the daemon stops the guest at its budget (ENOMEM)."""
    from guest_lib.errors import RDMAError

    a, _ = pair
    keys = []
    try:
        with pytest.raises(RDMAError) as e:
            for _ in range(1000):
                r = a.ctx.command(Cmd.REG_MR, pdn=a.pd.pdn, access=int(ALL_ACCESS), iova=a.mr.buf,
                                  length=a.mr.length, nchunks=1, reserved=0,
                                  chunks=[dict(gpa=a.mr.gpa, length=a.mr.length)])
                keys.append(r["lkey"])
        assert e.value.errno == 12  # ENOMEM
        assert 16 <= len(keys) < 1000
    finally:
        for k in keys:
            a.ctx.command(Cmd.DEREG_MR, lkey=k)
    r = a.ctx.command(Cmd.REG_MR, pdn=a.pd.pdn, access=int(ALL_ACCESS), iova=a.mr.buf,
                      length=a.mr.length, nchunks=1, reserved=0,
                      chunks=[dict(gpa=a.mr.gpa, length=a.mr.length)])
    a.ctx.command(Cmd.DEREG_MR, lkey=r["lkey"])  # the budget came back
