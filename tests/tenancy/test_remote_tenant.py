"""Remote jobs keep their tenant and class (peering.wire.JobMsg v4): the codec
(strict: a class past HIGH or a tenant name outside its characters is refused,
naming the field), and two daemons in network namespaces (vrdma.lab): a guest
of tenant "me" (class high) on a host without accelerators has its jobs run on
the peer, which runs them as ``me@peer:ADDR`` with the class capped by its own
entry for that peer, and accounts them on both hosts."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import accel_core
from peering.wire import JOB_SIZE, TENANT_BYTES, JobMsg, PeerWireError, decode_link
from virtio_rdma.constants import AccelDtype, AccelEarlyStop, AccelOp


def _job(**kw):
    return JobMsg(5, AccelOp.FFT, AccelDtype.COMPLEX64, 64, 1, 0, AccelEarlyStop.NONE, None, 0, 512, 0, 2, 512,
                  **kw)


def test_job_message_carries_tenant_and_class():
    j = _job(tenant="job42@x:1", klass=2)
    assert decode_link(j.encode()) == j and len(j.encode()) == JOB_SIZE
    assert decode_link(_job().encode()) == _job(tenant="", klass=1)


@pytest.mark.parametrize("offset, value, field", [
    (56, 3, "klass"), (56, 255, "klass"), (60, ord(" "), "tenant"), (61, 0xFF, "tenant"),
    (57, 1, "reserved")])
def test_forged_tenant_fields_are_refused_naming_them(offset, value, field):
    data = bytearray(_job(tenant="ab", klass=1).encode())
    data[offset] = value
    with pytest.raises(PeerWireError) as e:
        decode_link(bytes(data))
    assert field in e.value.field


def test_a_tenant_name_longer_than_the_field_is_not_encoded():
    with pytest.raises(PeerWireError):
        _job(tenant="x" * (TENANT_BYTES + 1)).encode()


def _accounting(db):
    r = subprocess.run([sys.executable, "-m", "vrdma", "accounting", "--db", str(db), "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.netns
def test_remote_jobs_keep_tenant_and_class_capped_by_the_peers_policy(tmp_path):
    from guest_lib import Context, accel
    from vrdma import lab

    why = lab.available()
    if why:
        pytest.skip(why)
    subnet = "203.0.113"
    a_ip = f"{subnet}.1"
    cfg_a = tmp_path / "a.toml"
    cfg_a.write_text('[[tenant]]\nname = "me"\nuid = 0\nclass = "high"\nweight = 2\n')
    cfg_b = tmp_path / "b.toml"
    cfg_b.write_text(f'[[tenant]]\nname = "peer:{a_ip}"\nclass = "normal"\nweight = 4\n')
    metrics_b = tmp_path / "b.json"
    specs = [lab.HostSpec("none", extra=("--config", str(cfg_a), "--state-dir", str(tmp_path / "sa"))),
             lab.HostSpec("fft=1", extra=("--config", str(cfg_b), "--state-dir", str(tmp_path / "sb"),
                                          "--metrics-file", str(metrics_b)))]
    n_jobs = 5
    with lab.LabCluster(specs, tmp_path / "lab", subnet=subnet) as c:
        c.wait_linked()
        with Context(c.hosts[0].sock, mem_size=16 << 20, timeout=30) as ctx:
            for i in range(n_jobs):
                x = np.full((2, 256), i + 1, np.complex64)
                assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
        assert c.hosts[0].stop() == 0 and c.hosts[1].stop() == 0
    tenants = json.loads(metrics_b.read_text())["accelerators"]["tenants"]
    mine = [t for t in tenants.values() if t["tenant"] == f"me@peer:{a_ip}"]
    assert mine == [{"tenant": f"me@peer:{a_ip}", "sent_class": 2, "class_weight": [1, 4.0]}]
    rows_a = _accounting(tmp_path / "sa" / "accounting.db")
    assert [(r["tenant"], r["op"], r["where"], r["jobs"], r["failed"]) for r in rows_a] == \
        [("me", "fft", "remote", n_jobs, 0)]
    rows_b = _accounting(tmp_path / "sb" / "accounting.db")
    assert [(r["tenant"], r["op"], r["where"], r["jobs"]) for r in rows_b] == \
        [(f"me@peer:{a_ip}", "fft", "served", n_jobs)]
    assert rows_b[0]["accel_seconds"] > 0
