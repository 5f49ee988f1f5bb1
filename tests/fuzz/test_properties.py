"""Hypothesis property tests for the codecs and the device core that the
fuzzers aim at: any bytes give a value or the package's own error, never
another exception; any control command or WQE from a guest leaves a
co-tenant's memory and objects untouched. Deterministic for CI
(``derandomize=True``)."""
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from bench.fuzz.guest import CoreGuest, setup_pair
from bench.fuzz.local import _QP_ATTR, encode_reg_mr
from bench.fuzz.common import Canary
from roce.errors import RoceError
from roce.icrc import IpContext
from roce.packet import decode as decode_roce
from vhost_user.errors import VhostUserError
from vhost_user.messages import FrontendReq, MemTable, SingleMemRegion, VringAddr, check_syntax, decode_header
from virtio_rdma import wire
from virtio_rdma.constants import Cmd, DoorbellKind
from virtio_rdma.errors import UnknownValueError, VirtioRdmaError
from fabric.local import LocalFabric

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
u32 = st.integers(0, 2 ** 32 - 1)
u64 = st.integers(0, 2 ** 64 - 1)


# ---- codecs: any bytes -> a value or the package's own error ------------------------------
@SETTINGS
@given(st.binary(max_size=300))
def test_control_request_decode_total(data):
    try:
        wire.decode_request(data)
    except (VirtioRdmaError, UnknownValueError):
        pass


@SETTINGS
@given(st.binary(max_size=200))
def test_doorbell_and_wqe_decode_total(data):
    for f in (wire.decode_doorbells, wire.decode_send_wqe, wire.decode_recv_wqe, wire.decode_cqe):
        try:
            f(data)
        except (VirtioRdmaError, UnknownValueError):
            pass


@SETTINGS
@given(st.binary(max_size=12), st.binary(max_size=300))
def test_vhost_user_decode_total(header, payload):
    try:
        decode_header(header)
    except VhostUserError:
        pass
    for cls in (MemTable, SingleMemRegion, VringAddr):
        try:
            cls.decode(payload)
        except VhostUserError:
            pass


@SETTINGS
@given(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 12))
def test_vhost_user_syntax_check_total(req, size, nfds):
    try:
        check_syntax(FrontendReq(req) if req in FrontendReq._value2member_map_ else FrontendReq(1), size, nfds)
    except VhostUserError:
        pass


CTX = IpContext("192.0.2.2", "192.0.2.1", sport=4791)


@SETTINGS
@given(st.binary(min_size=0, max_size=200), st.booleans())
def test_roce_decode_total(data, with_ctx):
    try:
        decode_roce(data, CTX if with_ctx else None, recover_ipv4_id=with_ctx)
    except RoceError:
        pass


# ---- the fuzzers' fast encoders agree with the codec ----------------------------------------
@SETTINGS
@given(u32, u32, u64, u64, st.lists(st.tuples(u64, u64), max_size=4))
def test_fast_reg_mr_encoder_matches_wire(pdn, access, iova, length, chunks):
    ref = wire.encode_request(Cmd.REG_MR, pdn=pdn, access=access, iova=iova, length=length, reserved=0,
                              chunks=[dict(gpa=g, length=n) for g, n in chunks])
    assert ref[8:] == encode_reg_mr(pdn, access, iova, length, chunks)


@SETTINGS
@given(st.lists(st.integers(0, 255), min_size=16, max_size=16), st.lists(u32, min_size=11, max_size=11),
       st.binary(min_size=16, max_size=16))
def test_fast_qp_attr_layout_matches_wire(u8s, u32s, gid):
    names = ["qp_state", "cur_qp_state", "path_mtu", "path_mig_state", "timeout", "retry_cnt", "rnr_retry",
             "min_rnr_timer", "max_rd_atomic", "max_dest_rd_atomic", "port_num", "sq_draining",
             "en_sqd_async_notify", "sgid_index", "hop_limit", "traffic_class"]
    d = dict(zip(names, u8s))
    d.update(pkey_index=u32s[0] & 0xFFFF, qkey=u32s[1], rq_psn=u32s[2], sq_psn=u32s[3], dest_qp_num=u32s[4],
             qp_access_flags=u32s[5], flow_label=u32s[6], dgid=gid, max_send_wr=u32s[7],
             max_recv_wr=u32s[8], max_send_sge=u32s[9], max_recv_sge=u32s[10], max_inline_data=0)
    ref = wire.QpAttrLayout.build(wire.body_fields(wire.qp_attr_defaults(**d)))
    mine = _QP_ATTR.pack(*u8s, d["pkey_index"], 0, d["qkey"], d["rq_psn"], d["sq_psn"], d["dest_qp_num"],
                         d["qp_access_flags"], d["flow_label"], gid, d["max_send_wr"], d["max_recv_wr"],
                         d["max_send_sge"], d["max_recv_sge"], 0)
    assert ref == mine


# ---- the device core: a hostile guest never touches a co-tenant ------------------------------
class Tenants:
    """An attacker device and a connected victim pair on one LocalFabric (built once)."""

    def __init__(self):
        self.fabric = LocalFabric()
        self.v1 = CoreGuest(self.fabric, gpa=0x4000_0000)
        self.v2 = CoreGuest(self.fabric, gpa=0x5000_0000)
        self.objs = setup_pair(self.v1, self.v2, psn_a=0x123456, psn_b=0x654321)
        # the attacker A, its QP connected to an accomplice B (so its WQEs reach a responder)
        self.a = CoreGuest(self.fabric, gpa=0x1000_0000)
        self.b = CoreGuest(self.fabric, gpa=0x2000_0000)
        self.ab = setup_pair(self.a, self.b)
        self.qp = self.ab[0][2]
        self.canaries = [Canary(self.v1.view), Canary(self.v2.view)]
        self.handles = sorted({self.objs[0][2].qpn, self.objs[1][2].qpn, self.objs[0][3].rkey,
                               self.objs[0][3].lkey, self.objs[0][0], self.objs[0][1].cqn})
        self.addrs = [self.objs[1][3].gpa, self.objs[0][3].gpa]

    def victim_intact(self):
        for c in self.canaries:
            assert c.check() == (0, -1)
        for g in (self.v1, self.v2):
            assert g.core.metrics.internal_errors == 0
            assert all(q.state.name == "RTS" for q in g.core.qps.values())
        assert self.a.core.metrics.internal_errors == 0


_T = None


def tenants() -> Tenants:
    global _T
    if _T is None:
        _T = Tenants()
    return _T


handle = st.one_of(st.sampled_from([0, 1, 2, 0xFFFFFF, 0xFFFFFFFF]), u32,
                   st.builds(lambda i: tenants().handles[i % len(tenants().handles)], st.integers(0, 100)))


@SETTINGS
@given(st.sampled_from(list(Cmd)), st.lists(handle, min_size=13, max_size=13), st.integers(0, 3))
def test_control_commands_never_reach_a_cotenant(cmd, words, tail):
    t = tenants()
    body = struct.pack("<13I", *words)[:4 * (len(words) - tail * 3)]
    req = struct.pack("<HHI", cmd, 0, len(body)) + body
    resp = t.a.raw(req)
    assert len(resp) >= 4
    t.victim_intact()


wqe = st.tuples(st.integers(0, 15), st.integers(0, 255), st.integers(0, 6), handle,
                st.one_of(u64, st.builds(lambda i: tenants().addrs[i % 2], st.integers(0, 1))),
                st.lists(st.tuples(u64, st.integers(0, 2 ** 32 - 1), handle), max_size=4))


@SETTINGS
@given(wqe, u32)
def test_wqes_never_reach_a_cotenant(w, pi):
    t = tenants()
    opcode, flags, nsge, rkey, raddr, sges = w
    qp = t.qp
    if t.a.core.qps[qp.qpn].state.name != "RTS":
        (_, _, qa, _), (_, _, qb, _) = t.ab
        t.a.connect(qa, qb.qpn, t.fabric.gid)
        t.b.connect(qb, qa.qpn, t.fabric.gid)
    slot = 1 << qp.layout.sq_wqe_shift
    b = bytearray(slot)
    struct.pack_into("<QBBHIQIIQQ16s", b, 0, 1, opcode, flags, nsge, 0, raddr, rkey, 0, 0, 0, bytes(16))
    for k, (addr, ln, key) in enumerate(sges[: (slot - 64) // 16]):
        struct.pack_into("<QII", b, 64 + 16 * k, addr, ln, key)
    t.a.write(qp.sq + (qp.sq_pi % qp.layout.sq_depth) * slot, b)
    qp.sq_pi = (qp.sq_pi + 1) & 0xFFFFFFFF
    t.a.write(qp.dbrec, struct.pack("<II", qp.sq_pi, 0))
    t.a.core.doorbell(wire.encode_doorbell(DoorbellKind.SQ, qp.qpn, pi if pi & 1 else qp.sq_pi), 0.0)
    t.a.core.process(0.0)
    t.b.core.process(0.0)
    t.victim_intact()
    assert t.b.core.metrics.internal_errors == 0
