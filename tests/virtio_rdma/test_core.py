"""Two guests (two RdmaDeviceCore instances over real virtio.memory.GuestMemory)
on one LocalFabric, driven through their rings and doorbells by the test
driver (tests/virtio_rdma/driver.py): control plane, every RC verb, every
completion status, events, misbehaving guests, and 1024 QPs + 1024 CQs."""
import struct
import sys

import pytest

from virtio_rdma import wire
from verbs import (
    Access,
    AsyncEvent,
    QpAttrMask as M,
    QpState,
    SendFlags,
    WcFlags,
    WcOpcode,
    WcStatus,
    WrOpcode,
)
from virtio_rdma.constants import CONFIG_MAGIC, Cmd, DoorbellKind, EventKind, Feature, Status
from virtio_rdma.core import DeviceLimits
from fabric.local import LocalFabric

from .driver import Guest, connect_pair, pair

ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC
SIG = SendFlags.SIGNALED


@pytest.fixture
def fab():
    return LocalFabric()


@pytest.fixture
def env(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb)
    ma, mb = a.reg_mr(pa, 64 * 1024), b.reg_mr(pb, 64 * 1024)
    return dict(a=a, b=b, pa=pa, pb=pb, ca=ca, cb=cb, qa=qa, qb=qb, ma=ma, mb=mb, fab=fab)


def one(g, cq):
    got = g.poll(cq)
    assert len(got) == 1, got
    return got[0]


def no_internal_errors(*guests):
    for g in guests:
        assert g.core.metrics.internal_errors == 0


# --------------------------------------------------------------------------
# control plane
# --------------------------------------------------------------------------
def test_query_commands(fab):
    g = Guest(fab)
    d = g.cmd(Cmd.QUERY_DEVICE)
    assert d["max_qp"] >= 1024 and d["max_cq"] >= 1024 and d["phys_port_cnt"] == 1
    p = g.cmd(Cmd.QUERY_PORT, port_num=1)
    assert p["state"] == 4 and p["link_layer"] == 2
    assert g.cmd(Cmd.QUERY_GID, port_num=1, index=0)["gid"] == fab.gid
    assert g.status_of(Cmd.QUERY_GID, port_num=1, index=1) == Status.EINVAL
    assert g.status_of(Cmd.QUERY_PORT, port_num=2) == Status.EINVAL
    cfg = wire.decode_config(g.core.config_bytes())
    assert cfg["max_qp"] == d["max_qp"] and cfg["magic"] == CONFIG_MAGIC


def test_ack_features_for_carriers(fab):
    """ACK_FEATURES (spec "Carriers"): the device accepts what it offers,
    applies DBREC_POLL, and refuses once objects exist."""
    g = Guest(fab)
    g.core.offered_features = (1 << Feature.DBREC_POLL) | (1 << Feature.ATOMIC)
    assert wire.decode_config(g.core.config_bytes())["device_features"] == g.core.offered_features
    assert g.core.acked_by_command is None and not g.core.poll_doorbell_records
    r = g.cmd(Cmd.ACK_FEATURES, features=(1 << Feature.DBREC_POLL) | (1 << Feature.ACCEL) | (1 << 40))
    assert r["features"] == 1 << Feature.DBREC_POLL == g.core.acked_by_command
    assert g.core.poll_doorbell_records
    g.alloc_pd()
    assert g.status_of(Cmd.ACK_FEATURES, features=0) == Status.EBUSY
    assert g.core.poll_doorbell_records


def test_object_lifecycle_and_busy(fab):
    g = Guest(fab)
    pd = g.alloc_pd()
    mr = g.reg_mr(pd, 4096)
    cq = g.create_cq(16)
    qp = g.create_qp(pd, cq)
    assert g.status_of(Cmd.DEALLOC_PD, pdn=pd) == Status.EBUSY
    assert g.status_of(Cmd.DESTROY_CQ, cqn=cq.cqn) == Status.EBUSY
    assert g.status_of(Cmd.DESTROY_QP, qpn=qp.qpn) == Status.OK
    assert g.status_of(Cmd.DESTROY_QP, qpn=qp.qpn) == Status.ENOENT
    assert g.status_of(Cmd.DESTROY_CQ, cqn=cq.cqn) == Status.OK
    assert g.status_of(Cmd.DEALLOC_PD, pdn=pd) == Status.EBUSY  # the MR
    assert g.status_of(Cmd.DEREG_MR, lkey=mr.lkey) == Status.OK
    assert g.status_of(Cmd.DEREG_MR, lkey=mr.lkey) == Status.ENOENT
    assert g.status_of(Cmd.DEALLOC_PD, pdn=pd) == Status.OK
    assert g.status_of(Cmd.DEALLOC_PD, pdn=pd) == Status.ENOENT
    assert g.core.metrics.command_errors == 6
    no_internal_errors(g)


def test_keys_are_random_so_stale_and_guessed_keys_fail(fab):
    """Spec 5.x.6.1 "Keys": 32 random bits, a new key at every registration."""
    g = Guest(fab)
    pd = g.alloc_pd()
    m1 = g.reg_mr(pd, 4096)
    g.cmd(Cmd.DEREG_MR, lkey=m1.lkey)
    m2 = g.reg_mr(pd, 4096)
    assert m2.lkey != m1.lkey and m2.lkey == m2.rkey
    assert g.core.mrs.lookup(m1.lkey) is None and g.core.mrs.lookup(m2.lkey) is not None
    keys = [g.reg_mr(pd, 64).lkey for _ in range(256)]
    assert len(set(keys)) == 256 and 0 not in keys
    # no index in the low or high bits: every bit position takes both values
    # (a sequential or index << 8 scheme leaves the high bits constant)
    for bit in range(32):
        assert 0 < sum(k >> bit & 1 for k in keys) < 256, bit
    # the next guest's keys are not its neighbour's plus a constant
    h = Guest(fab)
    hk = h.reg_mr(h.alloc_pd(), 64).lkey
    assert hk not in keys and keys[0] not in (1, 0x100, 0x101)


@pytest.mark.parametrize("access,chunks_delta,gpa,status", [
    (Access.REMOTE_WRITE, 0, None, Status.EINVAL),          # REMOTE_WRITE without LOCAL_WRITE
    (Access.REMOTE_ATOMIC | Access.REMOTE_READ, 0, None, Status.EINVAL),
    (Access.LOCAL_WRITE, 16, None, Status.EINVAL),           # chunk sum != length
    (Access.LOCAL_WRITE, 0, 0xDEAD_0000_0000, Status.EFAULT),  # not guest memory
    (1 << 29, 0, None, Status.EINVAL),                       # unknown access bit
])
def test_reg_mr_errors(fab, access, chunks_delta, gpa, status):
    g = Guest(fab)
    pd = g.alloc_pd()
    base = gpa if gpa is not None else g.alloc(4096)
    st = g.status_of(Cmd.REG_MR, pdn=pd, access=int(access), iova=base, length=4096, reserved=0,
                     chunks=[dict(gpa=base, length=4096 + chunks_delta)])
    assert st == status
    assert g.status_of(Cmd.REG_MR, pdn=pd + 7, access=1, iova=0, length=0, reserved=0, chunks=[]) == Status.ENOENT


def test_create_errors(fab):
    g = Guest(fab, limits=DeviceLimits(max_qp=2, max_cq=2))
    pd = g.alloc_pd()
    assert g.status_of(Cmd.CREATE_CQ, cqe=3, comp_vector=0, ring_gpa=g.alloc(96), dbrec_gpa=g.alloc(8)) == Status.EINVAL
    assert g.status_of(Cmd.CREATE_CQ, cqe=4, comp_vector=0, ring_gpa=1 << 50, dbrec_gpa=g.alloc(8)) == Status.EFAULT
    cq = g.create_cq(4)
    base = dict(pdn=pd, qp_type=2, send_cqn=cq.cqn, recv_cqn=cq.cqn, max_send_wr=4, max_recv_wr=4,
                max_send_sge=1, max_recv_sge=1, max_inline_data=0, flags=0, sq_gpa=g.alloc(4096),
                rq_gpa=g.alloc(4096), dbrec_gpa=g.alloc(8))
    assert g.status_of(Cmd.CREATE_QP, **{**base, "qp_type": 4}) == Status.EOPNOTSUPP
    assert g.status_of(Cmd.CREATE_QP, **{**base, "qp_type": 77}) == Status.EINVAL
    assert g.status_of(Cmd.CREATE_QP, **{**base, "send_cqn": 99}) == Status.ENOENT
    assert g.status_of(Cmd.CREATE_QP, **{**base, "max_send_sge": 1000}) == Status.EINVAL
    assert g.status_of(Cmd.CREATE_QP, **{**base, "sq_gpa": g.base + g.size - 64}) == Status.EFAULT
    assert g.status_of(Cmd.CREATE_QP, **{**base, "flags": 2}) == Status.EINVAL
    g.create_qp(pd, cq)
    g.create_qp(pd, cq)
    assert g.status_of(Cmd.CREATE_QP, **base) == Status.ENOMEM
    no_internal_errors(g)


def test_malformed_commands(fab):
    g = Guest(fab)
    assert g.raw(b"\x01")[0] == Status.EINVAL
    assert g.raw(struct.pack("<HHI", 200, 0, 0))[0] == Status.EOPNOTSUPP
    assert g.raw(struct.pack("<HHI", 4, 0, 100))[0] == Status.EINVAL
    assert g.raw(bytes(8 + 80))[0] == Status.EOPNOTSUPP  # cmd 0
    req = struct.pack("<HHI", 9, 0, 32) + struct.pack("<IIQQII", 1, 1, 0, 16, 0xFFFFFFFF, 0)
    assert g.raw(req)[0] == Status.EINVAL
    assert g.core.metrics.malformed_commands == 5
    no_internal_errors(g)


def test_modify_qp_checks(fab):
    g = Guest(fab)
    pd = g.alloc_pd()
    cq = g.create_cq(4)
    qp = g.create_qp(pd, cq)
    assert g.modify(qp, M.STATE, qp_state=QpState.RTS) == Status.EINVAL
    assert g.modify(qp, M.STATE | M.PKEY_INDEX | M.PORT, qp_state=QpState.INIT, port_num=1) == Status.EINVAL
    assert g.modify(qp, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS, qp_state=QpState.INIT,
                    port_num=2) == Status.EINVAL
    assert g.modify(qp, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS, qp_state=QpState.INIT,
                    port_num=1, qp_access_flags=1 << 20) == Status.EINVAL
    assert g.modify(qp, 1 << 25, qp_state=1) == Status.EINVAL
    g.connect(qp, 0x1234, gid=fab.gid, timeout=17, retry_cnt=5)
    q = g.cmd(Cmd.QUERY_QP, qpn=qp.qpn, attr_mask=0)
    assert q["attr"]["qp_state"] == QpState.RTS and q["attr"]["dest_qp_num"] == 0x1234
    assert q["attr"]["timeout"] == 17 and q["attr"]["retry_cnt"] == 5 and q["qpn"] == qp.qpn
    assert q["attr"]["dgid"] == fab.gid and q["send_cqn"] == cq.cqn
    assert g.modify(qp, M.STATE, qp_state=QpState.SQD) == Status.OK
    assert g.modify(qp, M.STATE, qp_state=QpState.RTS) == Status.OK
    assert g.modify(qp, M.STATE, qp_state=QpState.RESET) == Status.OK
    assert g.cmd(Cmd.QUERY_QP, qpn=qp.qpn, attr_mask=0)["attr"]["qp_state"] == QpState.RESET


# --------------------------------------------------------------------------
# every verb
# --------------------------------------------------------------------------
def test_send_recv_multi_sge(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    a.write(ma.gpa, b"AAAA")
    a.write(ma.gpa + 100, b"BBBBBB")
    b.post_recv(env["qb"], 11, [(mb, 0, 3), (mb, 1000, 20)])
    a.post_send(env["qa"], 1, WrOpcode.SEND, [(ma, 0, 4), (ma, 100, 6)], flags=SIG | SendFlags.SOLICITED)
    c = one(a, env["ca"])
    assert (c.wr_id, c.status, c.opcode, c.qp_num) == (1, WcStatus.SUCCESS, WcOpcode.SEND, env["qa"].qpn)
    r = one(b, env["cb"])
    assert (r.wr_id, r.status, r.opcode, r.byte_len, r.src_qp, r.wc_flags) == (
        11, WcStatus.SUCCESS, WcOpcode.RECV, 10, env["qa"].qpn, 0)
    assert b.read(mb.gpa, 3) == b"AAA" and b.read(mb.gpa + 1000, 7) == b"ABBBBBB"


def test_send_with_imm_and_inline(env):
    a, b, mb = env["a"], env["b"], env["mb"]
    b.post_recv(env["qb"], 1, [(mb, 0, 64)])
    b.post_recv(env["qb"], 2, [(mb, 64, 64)])
    a.post_send(env["qa"], 5, WrOpcode.SEND_WITH_IMM, inline=b"inline!", imm_data=0xCAFEBABE)
    a.post_send(env["qa"], 6, WrOpcode.SEND, inline=b"x" * 64)
    assert [c.status for c in a.poll(env["ca"])] == [WcStatus.SUCCESS] * 2
    r1, r2 = b.poll(env["cb"])
    assert r1.wc_flags == WcFlags.WITH_IMM and r1.imm_data == 0xCAFEBABE and r1.byte_len == 7
    assert r2.wc_flags == 0 and r2.byte_len == 64
    assert b.read(mb.gpa, 7) == b"inline!" and b.read(mb.gpa + 64, 64) == b"x" * 64


def test_rdma_write_and_write_with_imm(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    a.write(ma.gpa, bytes(range(256)) * 20)
    a.post_send(env["qa"], 1, WrOpcode.RDMA_WRITE, [(ma, 0, 5000)], remote_addr=mb.addr + 7, rkey=mb.rkey)
    assert one(a, env["ca"]).opcode == WcOpcode.RDMA_WRITE
    assert b.read(mb.gpa + 7, 5000) == (bytes(range(256)) * 20)[:5000]
    assert b.poll(env["cb"]) == []  # plain WRITE consumes no receive
    b.post_recv(env["qb"], 9, [])
    a.post_send(env["qa"], 2, WrOpcode.RDMA_WRITE_WITH_IMM, [(ma, 0, 16)], remote_addr=mb.addr + 9000,
                rkey=mb.rkey, imm_data=77)
    assert one(a, env["ca"]).status == WcStatus.SUCCESS
    r = one(b, env["cb"])
    assert (r.wr_id, r.opcode, r.imm_data, r.byte_len, r.wc_flags) == (
        9, WcOpcode.RECV_RDMA_WITH_IMM, 77, 16, WcFlags.WITH_IMM)


def test_rdma_read_multi_sge(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    b.write(mb.gpa + 500, b"0123456789" * 300)
    a.post_send(env["qa"], 3, WrOpcode.RDMA_READ, [(ma, 0, 1000), (ma, 4096, 2000)],
                remote_addr=mb.addr + 500, rkey=mb.rkey)
    c = one(a, env["ca"])
    assert (c.status, c.opcode, c.byte_len) == (WcStatus.SUCCESS, WcOpcode.RDMA_READ, 3000)
    data = b"0123456789" * 300
    assert a.read(ma.gpa, 1000) == data[:1000] and a.read(ma.gpa + 4096, 2000) == data[1000:]


def test_atomics(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    b.write(mb.gpa + 64, (40).to_bytes(8, sys.byteorder))
    a.post_send(env["qa"], 1, WrOpcode.ATOMIC_FETCH_AND_ADD, [(ma, 0, 8)], remote_addr=mb.addr + 64,
                rkey=mb.rkey, compare_add=2)
    a.post_send(env["qa"], 2, WrOpcode.ATOMIC_CMP_AND_SWP, [(ma, 8, 8)], remote_addr=mb.addr + 64,
                rkey=mb.rkey, compare_add=42, swap=2**64 - 1)
    a.post_send(env["qa"], 3, WrOpcode.ATOMIC_CMP_AND_SWP, [(ma, 16, 8)], remote_addr=mb.addr + 64,
                rkey=mb.rkey, compare_add=1, swap=5)
    a.post_send(env["qa"], 4, WrOpcode.ATOMIC_FETCH_AND_ADD, [(ma, 24, 8)], remote_addr=mb.addr + 64,
                rkey=mb.rkey, compare_add=3)  # wraps around
    cs = a.poll(env["ca"])
    assert [c.opcode for c in cs] == [WcOpcode.FETCH_ADD, WcOpcode.COMP_SWAP, WcOpcode.COMP_SWAP,
                                      WcOpcode.FETCH_ADD]
    assert all(c.status == WcStatus.SUCCESS for c in cs)
    orig = [int.from_bytes(a.read(ma.gpa + 8 * i, 8), sys.byteorder) for i in range(4)]
    assert orig == [40, 42, 2**64 - 1, 2**64 - 1]
    assert int.from_bytes(b.read(mb.gpa + 64, 8), sys.byteorder) == 2


def test_unsignaled_and_sq_sig_all(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    qa2 = a.create_qp(pa, ca, sq_sig_all=True)
    qb2 = b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa, qb)
    connect_pair(fab, a, b, qa2, qb2)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    for i in range(3):
        a.post_send(qa, i, WrOpcode.RDMA_WRITE, [(ma, 0, 8)], remote_addr=mb.addr, rkey=mb.rkey, flags=0)
    assert a.poll(ca) == []
    a.post_send(qa, 3, WrOpcode.RDMA_WRITE, [(ma, 0, 8)], remote_addr=mb.addr, rkey=mb.rkey)
    assert [c.wr_id for c in a.poll(ca)] == [3]
    a.post_send(qa2, 4, WrOpcode.RDMA_WRITE, [(ma, 0, 8)], remote_addr=mb.addr, rkey=mb.rkey, flags=0)
    assert [c.wr_id for c in a.poll(ca)] == [4]


def test_mr_spanning_chunks_and_iova(fab):
    """An MR backed by three discontiguous chunks, registered at an unrelated iova."""
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb)
    ma = a.reg_mr(pa, 4096)
    chunks = [(b.alloc(1004, 8), 1004), (b.alloc(20, 8), 20), (b.alloc(3072, 8), 3072)]
    mb = b.reg_mr(pb, 4096, chunks=chunks, iova=0x7F00_0000_0000)
    payload = bytes((i * 7) & 0xFF for i in range(3000))
    a.write(ma.gpa, payload)
    a.post_send(qa, 1, WrOpcode.RDMA_WRITE, [(ma, 0, 3000)], remote_addr=mb.addr + 500, rkey=mb.rkey)
    assert one(a, ca).status == WcStatus.SUCCESS
    flat = b.read(chunks[0][0], 1004) + b.read(chunks[1][0], 20) + b.read(chunks[2][0], 3072)
    assert flat[500:3500] == payload
    # an aligned atomic word that straddles chunk 0 / chunk 1 (bytes 1000..1008)
    word = int.from_bytes(flat[1000:1008], sys.byteorder)
    a.post_send(qa, 2, WrOpcode.ATOMIC_FETCH_AND_ADD, [(ma, 0, 8)], remote_addr=mb.addr + 1000, rkey=mb.rkey,
                compare_add=1)
    assert one(a, ca).status == WcStatus.SUCCESS
    assert int.from_bytes(a.read(ma.gpa, 8), sys.byteorder) == word
    flat = b.read(chunks[0][0], 1004) + b.read(chunks[1][0], 20) + b.read(chunks[2][0], 3072)
    assert int.from_bytes(flat[1000:1008], sys.byteorder) == (word + 1) % 2**64
    # READ back across all three chunks
    a.post_send(qa, 3, WrOpcode.RDMA_READ, [(ma, 0, 4096)], remote_addr=mb.addr, rkey=mb.rkey)
    assert one(a, ca).byte_len == 4096
    assert a.read(ma.gpa, 4096) == flat


# --------------------------------------------------------------------------
# completion statuses
# --------------------------------------------------------------------------
def test_loc_len_err_receive_too_small(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    b.post_recv(env["qb"], 1, [(mb, 0, 4)])
    b.post_recv(env["qb"], 2, [(mb, 0, 4)])
    a.post_send(env["qa"], 7, WrOpcode.SEND, [(ma, 0, 5)])
    a.post_send(env["qa"], 8, WrOpcode.SEND, [(ma, 0, 1)])
    sa = a.poll(env["ca"])
    assert [(c.wr_id, c.status) for c in sa] == [(7, WcStatus.REM_INV_REQ_ERR), (8, WcStatus.WR_FLUSH_ERR)]
    sb = b.poll(env["cb"])
    assert [(c.wr_id, c.status) for c in sb] == [(1, WcStatus.LOC_LEN_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert b.core.metrics.local_len_errors == 1
    assert b.core.qps[env["qb"].qpn].state is QpState.ERR
    assert a.core.qps[env["qa"].qpn].state is QpState.ERR
    b.process()
    assert wire.Event(EventKind.ASYNC, AsyncEvent.QP_REQ_ERR, env["qb"].qpn) in b.events


@pytest.mark.parametrize("case", ["bad_lkey", "outside_mr", "read_needs_local_write", "other_pd"])
def test_loc_prot_err(fab, case):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    ro = a.reg_mr(pa, 4096, access=Access(0))
    other = a.reg_mr(a.alloc_pd(), 4096)
    if case == "bad_lkey":
        a.post_send(qa, 1, WrOpcode.RDMA_WRITE, [(ma.addr, 8, ma.lkey ^ 0x5500)], remote_addr=mb.addr, rkey=mb.rkey)
    elif case == "outside_mr":
        a.post_send(qa, 1, WrOpcode.RDMA_WRITE, [(ma, 4000, 200)], remote_addr=mb.addr, rkey=mb.rkey)
    elif case == "read_needs_local_write":
        a.post_send(qa, 1, WrOpcode.RDMA_READ, [(ro, 0, 8)], remote_addr=mb.addr, rkey=mb.rkey)
    else:
        a.post_send(qa, 1, WrOpcode.SEND, [(other, 0, 8)])
    assert [(c.wr_id, c.status) for c in a.poll(ca)] == [(1, WcStatus.LOC_PROT_ERR)]
    assert a.core.metrics.local_prot_errors == 1
    assert a.core.qps[qa.qpn].state is QpState.ERR
    assert b.core.metrics.bytes_received == 0


@pytest.mark.parametrize("case", ["bad_rkey", "no_remote_write", "out_of_bounds", "qp_access", "stale_rkey"])
def test_rem_access_err(fab, case):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    a.connect(qa, qb.qpn, gid=fab.gid)
    b.connect(qb, qa.qpn, gid=fab.gid, access=Access.LOCAL_WRITE | (0 if case == "qp_access" else ALL))
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    ro = b.reg_mr(pb, 4096, access=Access.LOCAL_WRITE | Access.REMOTE_READ)
    before = b.read(mb.gpa, 4096)
    rkey, addr = mb.rkey, mb.addr
    if case == "bad_rkey":
        rkey ^= 0x100
    elif case == "no_remote_write":
        rkey, addr = ro.rkey, ro.addr
    elif case == "out_of_bounds":
        addr += 4090
    elif case == "stale_rkey":
        b.cmd(Cmd.DEREG_MR, lkey=mb.lkey)
    a.write(ma.gpa, b"Z" * 64)
    a.post_send(qa, 1, WrOpcode.RDMA_WRITE, [(ma, 0, 64)], remote_addr=addr, rkey=rkey)
    assert [(c.wr_id, c.status) for c in a.poll(ca)] == [(1, WcStatus.REM_ACCESS_ERR)]
    assert b.core.metrics.remote_access_errors == 1 and a.core.metrics.remote_errors == 1
    assert b.read(mb.gpa, 4096) == before
    b.process()
    assert wire.Event(EventKind.ASYNC, AsyncEvent.QP_ACCESS_ERR, qb.qpn) in b.events


def test_rem_inv_req_misaligned_atomic(env):
    a, ma, mb = env["a"], env["ma"], env["mb"]
    a.post_send(env["qa"], 1, WrOpcode.ATOMIC_FETCH_AND_ADD, [(ma, 0, 8)], remote_addr=mb.addr + 4,
                rkey=mb.rkey, compare_add=1)
    assert one(a, env["ca"]).status == WcStatus.REM_INV_REQ_ERR
    assert env["b"].core.metrics.remote_inv_req_errors == 1


def test_atomic_local_sge_too_short_is_loc_len_err(env):
    a, ma, mb = env["a"], env["ma"], env["mb"]
    a.post_send(env["qa"], 1, WrOpcode.ATOMIC_CMP_AND_SWP, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert one(a, env["ca"]).status == WcStatus.LOC_LEN_ERR


def test_rnr_retry_then_success(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, rnr_retry=3, min_rnr_timer=14)  # 1.28 ms
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    a.write(ma.gpa, b"late")
    a.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 4)])
    assert a.poll(ca) == [] and b.core.metrics.rnr_naks_sent == 1
    r = a.process()
    assert r.next_deadline == pytest.approx(1.28e-3)
    a.clock[0] = 1.0e-3
    assert a.process().next_deadline == pytest.approx(1.28e-3)  # not yet due: nothing resent
    assert b.core.metrics.rnr_naks_sent == 1
    b.post_recv(qb, 5, [(mb, 0, 16)])
    a.clock[0] = 1.3e-3
    a.process()
    assert one(a, ca).status == WcStatus.SUCCESS
    assert one(b, cb).byte_len == 4 and b.read(mb.gpa, 4) == b"late"
    assert a.core.metrics.rnr_retries == 1


def test_rnr_retry_exceeded(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, rnr_retry=2, min_rnr_timer=1)  # 10 us
    ma = a.reg_mr(pa, 4096)
    a.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 4)])
    a.post_send(qa, 2, WrOpcode.SEND, [(ma, 0, 4)])
    for _ in range(5):
        d = a.process().next_deadline
        if d is None:
            break
        a.clock[0] = d
    assert [(c.wr_id, c.status) for c in a.poll(ca)] == [(1, WcStatus.RNR_RETRY_EXC_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert b.core.metrics.rnr_naks_sent == 3 and a.core.metrics.rnr_retry_exceeded == 1
    assert a.clock[0] == pytest.approx(2e-5)


def test_rnr_retry_infinite(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, rnr_retry=7, min_rnr_timer=1)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    a.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 4)])
    for _ in range(50):
        a.clock[0] = a.process().next_deadline
    assert a.poll(ca) == [] and b.core.metrics.rnr_naks_sent == 50  # first process() at t=0 is not yet due
    b.post_recv(qb, 1, [(mb, 0, 4)])
    a.clock[0] = a.process().next_deadline
    a.process()
    assert one(a, ca).status == WcStatus.SUCCESS


def test_retry_exceeded_when_peer_absent(fab):
    a = Guest(fab)
    pd, cq = a.alloc_pd(), a.create_cq(8)
    qp = a.create_qp(pd, cq)
    a.connect(qp, 0xABCDE, gid=fab.gid, timeout=1, retry_cnt=2)  # 8.192 us
    m = a.reg_mr(pd, 4096)
    a.post_send(qp, 1, WrOpcode.RDMA_WRITE, [(m, 0, 8)], remote_addr=0, rkey=0)
    a.post_send(qp, 2, WrOpcode.SEND, [(m, 0, 8)])
    steps = 0
    while (d := a.process().next_deadline) is not None:
        a.clock[0] = d
        steps += 1
    assert [(c.wr_id, c.status) for c in a.poll(cq)] == [(1, WcStatus.RETRY_EXC_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert a.core.metrics.retransmits == 2 and a.core.metrics.retry_exceeded == 1
    assert fab.dropped == 6 and steps == 3


def test_flush_after_error_and_posts_in_err(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    b.post_recv(env["qb"], 1, [(mb, 0, 64)])
    b.post_recv(env["qb"], 2, [(mb, 0, 64)])
    assert a.modify(env["qa"], M.STATE, qp_state=QpState.ERR) == Status.OK
    a.post_send(env["qa"], 10, WrOpcode.SEND, [(ma, 0, 4)])
    a.post_recv(env["qa"], 11, [(ma, 0, 4)])
    got = a.poll(env["ca"])
    assert sorted((c.wr_id, c.status, c.opcode) for c in got) == [
        (10, WcStatus.WR_FLUSH_ERR, WcOpcode.SEND), (11, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV)]
    assert b.modify(env["qb"], M.STATE, qp_state=QpState.ERR) == Status.OK
    assert [(c.wr_id, c.status) for c in b.poll(env["cb"])] == [(1, WcStatus.WR_FLUSH_ERR), (2, WcStatus.WR_FLUSH_ERR)]
    assert a.core.metrics.flushed_wrs == 2 and b.core.metrics.flushed_wrs == 2
    # RESET -> usable again after reconnecting
    for g, q in ((a, env["qa"]), (b, env["qb"])):
        assert g.modify(q, M.STATE, qp_state=QpState.RESET) == Status.OK
        q.sq_pi = q.rq_pi = 0
    connect_pair(env["fab"], a, b, env["qa"], env["qb"])
    b.post_recv(env["qb"], 3, [(mb, 0, 64)])
    a.post_send(env["qa"], 12, WrOpcode.SEND, [(ma, 0, 4)])
    assert one(a, env["ca"]).status == WcStatus.SUCCESS and one(b, env["cb"]).wr_id == 3


# --------------------------------------------------------------------------
# events and CQ overflow
# --------------------------------------------------------------------------
def test_cq_arm_next_and_solicited(env):
    a, b, ma, mb = env["a"], env["b"], env["ma"], env["mb"]
    notified = []
    b.core.notify = lambda: notified.append(1)
    b.arm(env["cb"], solicited_only=True)
    for i in range(3):
        b.post_recv(env["qb"], i, [(mb, 0, 64)])
    a.post_send(env["qa"], 1, WrOpcode.SEND, [(ma, 0, 4)])
    assert b.process().events == [] and not notified  # not solicited
    a.post_send(env["qa"], 2, WrOpcode.SEND, [(ma, 0, 4)], flags=SIG | SendFlags.SOLICITED)
    assert notified
    assert b.process().events == [wire.Event(EventKind.COMPLETION, 0, env["cb"].cqn)]
    a.post_send(env["qa"], 3, WrOpcode.SEND, [(ma, 0, 4)], flags=SIG | SendFlags.SOLICITED)
    assert b.process().events == []  # one event per arm
    a.arm(env["ca"])  # through REQ_NOTIFY_CQ-equivalent doorbell
    a.post_send(env["qa"], 4, WrOpcode.RDMA_WRITE, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert a.process().events == [wire.Event(EventKind.COMPLETION, 0, env["ca"].cqn)]
    a.cmd(Cmd.REQ_NOTIFY_CQ, cqn=env["ca"].cqn, flags=0)
    a.post_send(env["qa"], 5, WrOpcode.RDMA_WRITE, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert len(a.process().events) == 1
    assert b.core.metrics.completion_events == 1 and a.core.metrics.completion_events == 2


def test_pending_events_are_bounded_and_counted(fab):
    """The event queue holds at most max_pending_events records; the rest are
    dropped and counted (events.queue_event), and process() hands over the
    kept ones in order and empties the queue."""
    a, b, pa, pb, ca, cb, qa, qb = pair(fab, limits=DeviceLimits(max_pending_events=2))
    connect_pair(fab, a, b, qa, qb)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    for i in range(3):
        b.arm(cb)
        b.post_recv(qb, i, [(mb, 0, 64)])
        a.post_send(qa, i, WrOpcode.SEND, [(ma, 0, 4)])
    assert b.core.pending_events == 2 and b.core.metrics.events_dropped == 1
    assert b.core.metrics.completion_events == 3 and len(b.poll(cb)) == 3
    assert b.process().events == [wire.Event(EventKind.COMPLETION, 0, cb.cqn)] * 2
    assert b.core.pending_events == 0 and b.process().events == []


def test_notify_only_outside_a_call(env):
    """Events queued while the guest's own call runs are left for that call's
    end (one notification per doorbell); a peer's request queuing events here
    notifies at once."""
    a, b = env["a"], env["b"]
    calls = []
    a.core.notify = lambda: calls.append(a.core.pending_events)
    a.arm(env["ca"])
    assert calls == []
    a.post_send(env["qa"], 1, WrOpcode.RDMA_WRITE, [(env["ma"], 0, 4)], remote_addr=env["mb"].addr,
                rkey=env["mb"].rkey)
    assert calls == [1]  # one completion event, notified once at the doorbell's end
    b.core.notify = lambda: calls.append(("b", b.core.pending_events))
    b.arm(env["cb"])
    b.post_recv(env["qb"], 7, [(env["mb"], 0, 64)])
    a.post_send(env["qa"], 2, WrOpcode.SEND, [(env["ma"], 0, 4)])
    assert ("b", 1) in calls  # queued by a's request, during no call into b


def test_cq_overflow(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    small = a.create_cq(4)
    qa2 = a.create_qp(pa, small)
    qb2 = b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa2, qb2)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    for i in range(4):
        a.post_send(qa2, i, WrOpcode.RDMA_WRITE, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert len(a.poll(small, 2)) == 2  # consume two, ci published in the doorbell record
    for i in range(4, 7):
        a.post_send(qa2, i, WrOpcode.RDMA_WRITE, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert a.core.metrics.cq_overflows == 1
    assert a.core.qps[qa2.qpn].state is QpState.ERR
    ev = a.process().events
    assert wire.Event(EventKind.ASYNC, AsyncEvent.CQ_ERR, small.cqn) in ev
    assert wire.Event(EventKind.ASYNC, AsyncEvent.QP_FATAL, qa2.qpn) in ev
    got = a.poll(small)
    assert [c.wr_id for c in got] == [2, 3, 4, 5]  # nothing overwritten
    # the other CQ / QP of the same guest are unaffected
    connect_pair(fab, a, b, qa, qb)
    a.post_send(qa, 99, WrOpcode.RDMA_WRITE, [(ma, 0, 4)], remote_addr=mb.addr, rkey=mb.rkey)
    assert one(a, ca).status == WcStatus.SUCCESS


def test_cq_phase_bit_wraps(env):
    a, ma, mb = env["a"], env["ma"], env["mb"]
    for i in range(64 * 3 + 5):
        a.post_send(env["qa"], i, WrOpcode.RDMA_WRITE, [(ma, 0, 1)], remote_addr=mb.addr, rkey=mb.rkey)
        assert one(a, env["ca"]).wr_id == i
    assert a.core.metrics.cq_overflows == 0


# --------------------------------------------------------------------------
# misbehaving guest: the other guest keeps working, its data intact
# --------------------------------------------------------------------------
def test_misbehaving_guest(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    c = Guest(fab, gpa=0x8000_0000, clock=a.clock)  # a well-behaved third guest
    pc, cc = c.alloc_pd(), c.create_cq(64)
    qc = c.create_qp(pc, cc)
    qb2 = b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa, qb)
    c.connect(qc, qb2.qpn, gid=fab.gid)
    b.connect(qb2, qc.qpn, gid=fab.gid)
    ma, mb, mc = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096), c.reg_mr(pc, 4096)
    c.write(mc.gpa, b"precious" * 16)
    b.write(mb.gpa + 2048, b"b-private" * 8)
    snap_c = c.read(mc.gpa, 4096)

    # 1. absurd num_sge in a WQE slot -> LOC_QP_OP_ERR, QP to ERR
    raw = bytearray(wire.encode_send_wqe(1, WrOpcode.SEND, SIG, sges=[(ma.addr, 1, ma.lkey)],
                                         slot_size=1 << qa.layout.sq_wqe_shift))
    raw[10:12] = struct.pack("<H", 60000)
    a.post_send(qa, 1, WrOpcode.SEND, raw=bytes(raw))
    assert [(x.wr_id, x.status) for x in a.poll(ca)] == [(1, WcStatus.LOC_QP_OP_ERR)]
    assert a.core.metrics.bad_wqes == 1
    # 2. doorbells for unknown/destroyed QPs, absurd producer index, garbage buffers
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, 0x777777, 1), a.now)
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.CQ_ARM, 4242, 0), a.now)
    a.core.doorbell(b"\xff" * 13, a.now)
    a.core.doorbell(b"\x00" * 8, a.now)
    qa3 = a.create_qp(pa, ca)
    a.connect(qa3, qc.qpn, gid=fab.gid)
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qa3.qpn, 100000), a.now)
    assert a.core.qps[qa3.qpn].state is QpState.ERR
    a.cmd(Cmd.DESTROY_QP, qpn=qa3.qpn)
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qa3.qpn, 1), a.now)
    assert a.core.metrics.bad_doorbells == 4 and a.core.metrics.malformed_doorbell_buffers == 2
    # 3. RDMA with guesses at c's keys through b's QP: b is a different QP/PD -> REM_ACCESS_ERR
    qa4, qb4 = a.create_qp(pa, ca), b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa4, qb4)
    for guess in (mc.rkey, mb.rkey + 1, 0, 0xFFFFFFFF):
        q = a.create_qp(pa, ca)
        p = b.create_qp(pb, cb)
        connect_pair(fab, a, b, q, p)
        a.post_send(q, guess, WrOpcode.RDMA_WRITE, [(ma, 0, 64)], remote_addr=mc.addr, rkey=guess)
    assert [x.status for x in a.poll(ca)] == [WcStatus.REM_ACCESS_ERR] * 4
    # 4. WQE pointing at an SGE outside guest memory with a valid lkey but bad address
    a.post_send(qa4, 5, WrOpcode.SEND, [(ma.addr + 4096 * 1000, 8, ma.lkey)])
    assert one(a, ca).status == WcStatus.LOC_PROT_ERR
    # 5. an SQ ring whose memory disappears: remove a's region -> QP fatal, no crash
    qa5, qb5 = a.create_qp(pa, ca), b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa5, qb5)
    a.write_send_wqe(qa5, 6, WrOpcode.SEND, [(ma, 0, 8)])
    saved = a.mem.remove(a.region.gpa, a.region.size)
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qa5.qpn, 1), a.now)
    assert a.core.metrics.wqe_fetch_faults == 1
    assert a.core.qps[qa5.qpn].state is QpState.ERR
    assert a.core.metrics.cq_faults == 1  # and its CQ could not be written either
    a.core.process(a.now)
    assert saved is not None
    # c <-> b traffic is unaffected and c's memory is intact
    b.post_recv(qb2, 1, [(mb, 0, 128)])
    c.post_send(qc, 1, WrOpcode.SEND, [(mc, 0, 128)])
    assert one(c, cc).status == WcStatus.SUCCESS
    assert b.read(mb.gpa, 128) == b"precious" * 16
    c.post_send(qc, 2, WrOpcode.RDMA_READ, [(mc, 1024, 72)], remote_addr=mb.addr + 2048, rkey=mb.rkey)
    assert one(c, cc).status == WcStatus.SUCCESS
    assert c.read(mc.gpa + 1024, 72) == b"b-private" * 8
    assert c.read(mc.gpa, 1024) == snap_c[:1024]
    no_internal_errors(a, b, c)


def test_destroyed_peer_and_closed_core(fab):
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, timeout=1, retry_cnt=0)
    ma = a.reg_mr(pa, 4096)
    b.core.close()
    a.post_send(qa, 1, WrOpcode.SEND, [(ma, 0, 4)])
    a.clock[0] = a.process().next_deadline
    a.process()
    assert one(a, ca).status == WcStatus.RETRY_EXC_ERR


# --------------------------------------------------------------------------
# scale: 1024 QPs and 1024 CQs in one guest
# --------------------------------------------------------------------------
def test_1024_qps_and_1024_cqs(fab):
    n = 1024
    clock = [0.0]
    a = Guest(fab, size=16 << 20, clock=clock)
    b = Guest(fab, size=16 << 20, gpa=0x4000_0000, clock=clock)
    pa, pb = a.alloc_pd(), b.alloc_pd()
    ma, mb = a.reg_mr(pa, n * 16), b.reg_mr(pb, n * 16)
    cb = b.create_cq(4096)
    cqs = [a.create_cq(4) for _ in range(n)]
    qas = [a.create_qp(pa, cqs[i], max_send_wr=2, max_recv_wr=2, max_send_sge=1, max_recv_sge=1,
                       max_inline_data=0) for i in range(n)]
    qbs = [b.create_qp(pb, cb, max_send_wr=2, max_recv_wr=2, max_send_sge=1, max_recv_sge=1,
                       max_inline_data=0) for _ in range(n)]
    assert len({q.qpn for q in qas + qbs}) == 2 * n  # host-unique QPNs
    for qa, qb in zip(qas, qbs):
        connect_pair(fab, a, b, qa, qb)
    for i, (qa, qb) in enumerate(zip(qas, qbs)):
        a.write(ma.gpa + 16 * i, i.to_bytes(16, "little"))
        b.post_recv(qb, i, [(mb, 16 * i, 16)])
        a.post_send(qa, i, WrOpcode.SEND, [(ma, 16 * i, 16)])
    for i, cq in enumerate(cqs):
        c = one(a, cq)
        assert (c.wr_id, c.status, c.qp_num) == (i, WcStatus.SUCCESS, qas[i].qpn)
    got = b.poll(cb)
    assert sorted(c.wr_id for c in got) == list(range(n))
    assert all(b.read(mb.gpa + 16 * i, 16) == i.to_bytes(16, "little") for i in range(n))
    assert len(a.core.qps) == n and len(a.core.cqs) == n
    no_internal_errors(a, b)


# --------------------------------------------------------------------------
# an asynchronous, lossy fabric (network-shaped): go-back-N, PSN NAKs, duplicates
# --------------------------------------------------------------------------
from fabric.base import Fabric  # noqa: E402


class QueuedFabric(Fabric):
    """Holds requests until deliver() (as a network would), serialising payloads
    at send time; can drop chosen requests and duplicate others."""

    def __init__(self):
        self._local = LocalFabric()
        self.eps = {}
        self.queue = []

    @property
    def gid(self):
        return self._local.gid

    def alloc_qpn(self):
        return self._local.alloc_qpn()

    def free_qpn(self, qpn):
        self._local.free_qpn(qpn)

    def attach(self, qpn, ep):
        self.eps[qpn] = ep

    def detach(self, qpn):
        self.eps.pop(qpn, None)

    def send(self, req, now):
        req.payload = [memoryview(b"".join(bytes(v) for v in req.payload))]
        self.queue.append(req)
        return None

    def deliver(self, now, drop=(), dup=()):
        batch, self.queue = self.queue, []
        for i, req in enumerate(batch):
            if i in drop:
                continue
            for _ in range(2 if i in dup else 1):
                ep = self.eps.get(req.dst_qpn)
                resp = ep.on_request(req, now) if ep else None
                if resp is not None:
                    resp.data = [memoryview(b"".join(bytes(v) for v in resp.data))]
                    self.eps[resp.dst_qpn].on_response(resp, now)
        return len(batch)


def test_async_fabric_loss_go_back_n_and_duplicates():
    fab = QueuedFabric()
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb, timeout=10, retry_cnt=3)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    for i in range(3):
        a.write(ma.gpa + 8 * i, bytes([65 + i]) * 8)
        a.post_send(qa, i, WrOpcode.RDMA_WRITE, [(ma, 8 * i, 8)], remote_addr=mb.addr + 8 * i, rkey=mb.rkey)
    assert a.poll(ca) == [] and len(fab.queue) == 3
    fab.deliver(0.0, drop={0})  # first lost: the responder NAKs the second once, drops the third
    assert b.core.metrics.psn_seq_errors == 2 and a.core.metrics.psn_seq_naks == 1
    assert len(fab.queue) == 3  # go-back-N resent all three
    fab.deliver(0.0, dup={1})   # one duplicate on the way
    assert [(c.wr_id, c.status) for c in a.poll(ca)] == [(i, WcStatus.SUCCESS) for i in range(3)]
    assert b.read(mb.gpa, 24) == b"A" * 8 + b"B" * 8 + b"C" * 8
    assert b.core.metrics.duplicate_requests == 1 and a.core.metrics.stale_responses == 0
    # READ answered asynchronously; a lost response is recovered by the ACK timer
    b.write(mb.gpa + 100, b"remote!!")
    a.post_send(qa, 9, WrOpcode.RDMA_READ, [(ma, 100, 8)], remote_addr=mb.addr + 100, rkey=mb.rkey)
    fab.deliver(0.0, drop={0})
    d = a.process().next_deadline
    assert d == pytest.approx(4.096e-6 * 2**10)
    a.clock[0] = d
    a.process()
    assert a.core.metrics.retransmits == 1
    fab.deliver(d)
    assert one(a, ca).byte_len == 8 and a.read(ma.gpa + 100, 8) == b"remote!!"
    no_internal_errors(a, b)


def test_dbrec_poll(fab):
    clock = [0.0]
    a = Guest(fab, clock=clock)
    b = Guest(fab, gpa=0x4000_0000, clock=clock)
    a.core.poll_doorbell_records = True
    b.core.poll_doorbell_records = True
    pa, pb = a.alloc_pd(), b.alloc_pd()
    ca, cb = a.create_cq(), b.create_cq()
    qa, qb = a.create_qp(pa, ca), b.create_qp(pb, cb)
    connect_pair(fab, a, b, qa, qb)
    ma, mb = a.reg_mr(pa, 4096), b.reg_mr(pb, 4096)
    # post without ringing doorbells: only the doorbell records are updated
    b.write(qb.rq + 0, wire.encode_recv_wqe(1, [(mb.addr, 64, mb.lkey)], slot_size=1 << qb.layout.rq_wqe_shift))
    qb.rq_pi = 1
    b.write(qb.dbrec, struct.pack("<II", 0, 1))
    a.write_send_wqe(qa, 2, WrOpcode.SEND, [(ma, 0, 16)])
    a.write(qa.dbrec, struct.pack("<II", 1, 0))
    b.process()
    a.process()
    assert one(a, ca).status == WcStatus.SUCCESS and one(b, cb).byte_len == 16


def test_dbrec_poll_stale_doorbell_is_no_error(fab):
    """With DBREC_POLL the record can run ahead of a doorbell still queued on
    the doorbellq: the older value is ignored, the QP stays usable."""
    a, b, pa, pb, ca, cb, qa, qb = pair(fab)
    connect_pair(fab, a, b, qa, qb)
    b.core.poll_doorbell_records = True
    mb = b.reg_mr(pb, 4096)
    for i in range(3):
        b.write(qb.rq + i * (1 << qb.layout.rq_wqe_shift),
                wire.encode_recv_wqe(i, [(mb.addr, 64, mb.lkey)], slot_size=1 << qb.layout.rq_wqe_shift))
    b.write(qb.dbrec, struct.pack("<II", 0, 3))
    b.process()  # the record: rq_pi 3
    qp = b.core.qps[qb.qpn]
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 1), b.now)  # a stale doorbell
    qp.rq_ci = 3  # even behind what the device consumed already
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 2), b.now)
    assert (qp.state, qp.rq_pi, b.core.metrics.bad_doorbells) == (QpState.RTS, 3, 0)
    b.core.doorbell(wire.encode_doorbell(DoorbellKind.RQ, qb.qpn, 3 + 100), b.now)  # absurd: still fatal
    assert qp.state is QpState.ERR and b.core.metrics.bad_doorbells == 1
