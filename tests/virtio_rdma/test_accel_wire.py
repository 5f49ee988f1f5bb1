"""Codec of the accelerator queues (docs/virtio-rdma.md "Accelerator queues"):
job entries, accelerator CQEs and the AQ commands, with byte fixtures and
Hypothesis round trips; syntax errors are typed and name the bad value."""
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verbs import WcStatus
from virtio_rdma import wire
from virtio_rdma.constants import (
    ACCEL_CQE_OPCODE_BASE,
    AQ_SLOT_SIZE,
    MAX_ACCEL_SGE,
    AccelDtype,
    AccelEarlyStop,
    AccelOp,
    AccelStatus,
    Cmd,
    DoorbellKind,
    Status,
)
from virtio_rdma.errors import UnknownValueError, WireError

sge = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


def test_job_entry_byte_fixture():
    b = wire.encode_accel_job(0x1122334455667788, AccelOp.TURBO_DECODE, size=6144, batch=2, iterations=8,
                              early_stop=AccelEarlyStop.CRC24B, scaling=0.75,
                              inputs=[(0x10000, 0x9060, 7)], outputs=[(0x20000, 0x3002, 7)])
    assert len(b) == AQ_SLOT_SIZE
    assert b[:28] == (bytes.fromhex("8877665544332211") + bytes([4, 0, 1, 1])
                      + struct.pack("<IIHBBf", 6144, 2, 8, 2, 1, 0.75))
    assert b[28:64] == bytes(36)
    assert b[64:96] == struct.pack("<QII", 0x10000, 0x9060, 7) + struct.pack("<QII", 0x20000, 0x3002, 7)
    assert b[96:] == bytes(AQ_SLOT_SIZE - 96)


@given(wr_id=st.integers(0, 2**64 - 1), op=st.sampled_from(list(AccelOp)),
       dtype=st.sampled_from(list(AccelDtype)), size=st.integers(0, 2**32 - 1),
       batch=st.integers(0, 2**32 - 1), iterations=st.integers(0, 2**16 - 1),
       stop=st.sampled_from(list(AccelEarlyStop)),
       scaling=st.one_of(st.none(), st.floats(0.0, 1.0, width=32)),
       ins=st.lists(sge, min_size=1, max_size=6), outs=st.lists(sge, min_size=1, max_size=6))
def test_job_entry_round_trip(wr_id, op, dtype, size, batch, iterations, stop, scaling, ins, outs):
    b = wire.encode_accel_job(wr_id, op, size=size, batch=batch, dtype=dtype, iterations=iterations,
                              early_stop=stop, scaling=scaling, inputs=ins, outputs=outs)
    j = wire.decode_accel_job(b)
    assert (j.wr_id, j.op, j.dtype, j.size, j.batch, j.iterations, j.early_stop) == \
        (wr_id, op, dtype, size, batch, iterations, stop)
    assert j.scaling == scaling
    assert [(s.addr, s.length, s.lkey) for s in j.inputs] == ins
    assert [(s.addr, s.length, s.lkey) for s in j.outputs] == outs
    assert j.in_length == sum(n for _, n, _ in ins) and j.out_length == sum(n for _, n, _ in outs)
    assert wire.AccelJobHeader.parse(b)["size"] == size  # the construct layout agrees


def _job(**kw):
    return bytearray(wire.encode_accel_job(1, AccelOp.FFT, size=64, inputs=[(0, 512, 1)],
                                           outputs=[(512, 512, 1)], **kw))


@pytest.mark.parametrize("offset,value,error", [
    (8, 9, UnknownValueError),       # op
    (9, 2, UnknownValueError),       # dtype
    (10, 0, WireError),              # no input SGE
    (11, 0, WireError),              # no output SGE
    (11, MAX_ACCEL_SGE, WireError),  # too many SGEs
    (22, 3, UnknownValueError),      # early stop
    (23, 2, UnknownValueError),      # unknown flag bit
    (40, 1, WireError),              # reserved byte
])
def test_malformed_job_entries_are_typed_errors(offset, value, error):
    b = _job()
    b[offset] = value
    with pytest.raises(error):
        wire.decode_accel_job(b)


def test_short_slot_and_too_many_sges():
    with pytest.raises(WireError, match="shorter"):
        wire.decode_accel_job(bytes(AQ_SLOT_SIZE - 1))
    with pytest.raises(WireError, match="exceed"):
        wire.encode_accel_job(1, AccelOp.FFT, size=8, inputs=[(0, 8, 1)] * 7, outputs=[(0, 8, 1)] * 6)


@given(op=st.sampled_from(list(AccelOp)), status=st.sampled_from(list(AccelStatus)),
       aqn=st.integers(0, 2**24 - 1), blen=st.integers(0, 2**32 - 1), host=st.integers(0, 2**32 - 1),
       wait=st.integers(0, 2**32 - 1), service=st.integers(0, 2**24 - 1), its=st.integers(0, 255))
def test_accel_cqe_round_trip(op, status, aqn, blen, host, wait, service, its):
    c = wire.AccelCompletion(5, op, status, aqn, blen, host, wait, service, its)
    d, owner = wire.decode_cqe(wire.encode_cqe(c.to_cqe(), 1))
    assert owner == 1 and wire.is_accel_cqe(d)
    assert d.opcode == ACCEL_CQE_OPCODE_BASE | op and d.status is wire.ACCEL_WC_STATUS[status]
    assert wire.decode_accel_cqe(d) == c


def test_accel_cqe_saturates_and_is_not_a_verbs_cqe():
    c = wire.AccelCompletion(1, AccelOp.FFT, AccelStatus.SUCCESS, 1, wait_us=2**40, service_us=2**30,
                             iterations=999)
    d = wire.decode_accel_cqe(wire.decode_cqe(wire.encode_cqe(c.to_cqe(), 0))[0])
    assert (d.wait_us, d.service_us, d.iterations) == (2**32 - 1, 2**24 - 1, 255)
    verbs_cqe = wire.Completion(1, WcStatus.SUCCESS, 0, 1)
    assert not wire.is_accel_cqe(verbs_cqe)
    with pytest.raises(UnknownValueError):
        wire.decode_accel_cqe(verbs_cqe)
    bad = bytearray(wire.encode_cqe(c.to_cqe(), 0))
    bad[9] = ACCEL_CQE_OPCODE_BASE | 9  # no such AccelOp
    with pytest.raises(UnknownValueError):
        wire.decode_cqe(bad)


def test_aq_commands_fixtures():
    req = wire.encode_request(Cmd.CREATE_AQ, pdn=1, cqn=2, op=AccelOp.IFFT, priority=3, flags=2, reserved0=0,
                              depth=64, ring_gpa=0x1000, dbrec_gpa=0x2000, target_host=5, reserved1=0)
    assert req == struct.pack("<HHI", Cmd.CREATE_AQ, 0, 40) + struct.pack("<IIBBBBIQQII", 1, 2, 2, 3, 2, 0, 64,
                                                                           0x1000, 0x2000, 5, 0)
    cmd, body = wire.decode_request(req)
    assert cmd is Cmd.CREATE_AQ and body == wire.CreateAqReq(1, 2, 2, 3, 2, 0, 64, 0x1000, 0x2000, 5, 0)
    cmd, body = wire.decode_request(wire.encode_request(Cmd.CANCEL_AQ_JOB, aqn=9, reserved=0, wr_id=2**63))
    assert body == wire.CancelAqJobReq(9, 0, 2**63)
    info = wire.AccelOpInfo(AccelOp.FFT, 1, 3, 1, 65536, 1024, 500, 1200)
    resp = wire.QueryAccelResp(1, 0, (info,) + (wire.AccelOpInfo(0, 0, 0, 0, 0, 0, 0, 0),) * 7)
    raw = wire.encode_response(Cmd.QUERY_ACCEL, Status.OK, resp)
    assert len(raw) == 4 + 8 + 8 * 24
    status, fields = wire.decode_response(Cmd.QUERY_ACCEL, raw)
    assert status == Status.OK and fields["num_ops"] == 1 and fields["ops"][0]["max_size"] == 65536


def test_aq_doorbell_kind():
    db = wire.decode_doorbells(wire.encode_doorbell(DoorbellKind.AQ, 7, 3))
    assert db == [wire.Doorbell(DoorbellKind.AQ, 7, 3)]


def test_a_device_without_accelerators_refuses_aq_commands_and_doorbells():
    """Until a device offers VIRTIO_RDMA_F_ACCEL: EOPNOTSUPP, and an AQ doorbell is counted, not
    taken for a QP's."""
    from fabric.local import LocalFabric

    from .driver import DriverError, pair

    a, *_ , qa, qb = pair(LocalFabric())
    for cmd, fields in ((Cmd.QUERY_ACCEL, {}), (Cmd.DESTROY_AQ, {"aqn": 1}),
                        (Cmd.CANCEL_AQ_JOB, {"aqn": 1, "reserved": 0, "wr_id": 1})):
        with pytest.raises(DriverError) as e:
            a.cmd(cmd, **fields)
        assert e.value.status == Status.EOPNOTSUPP
    before = a.core.metrics.bad_doorbells
    a.core.doorbell(wire.encode_doorbell(DoorbellKind.AQ, qa.qpn, 1), a.now)
    assert a.core.metrics.bad_doorbells == before + 1
    assert a.core.qps[qa.qpn].rq_pi == 0 and a.core.qps[qa.qpn].sq_pi == 0
