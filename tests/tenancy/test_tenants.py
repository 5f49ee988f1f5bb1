"""Tenants: the configuration file's [[tenant]] entries (hostile values refused
with errors naming them), who a connection belongs to (socket, then uid),
tenant quotas over all its connections, the accelerator quotas (in-flight jobs,
a token bucket of accelerator-seconds per minute), reload and live changes
(vhost_user.tenancy, sans-I/O)."""
from __future__ import annotations

import errno

import pytest

from vhost_user.tenancy import (
    Class,
    ConnectionInfo,
    LimitExceeded,
    PolicyError,
    Resource,
    TenantConfig,
    TenantLedger,
    TokenBucket,
)

CONFIG = """
[tenants]
max_qp = 100

[fairness]
aging_seconds = 0.25

[[tenant]]
name = "job42"
socket = "/run/vrdma/job42.sock"
class = "high"
weight = 3
max_cq = 2
max_pinned_bytes = 8192

[[tenant]]
name = "alice"
uid = 1000
class = "low"
max_accel_jobs = 2
accel_seconds_per_minute = 6.0
"""


def info(uid=1000, path="/run/vrdma/shared.sock", conn=1):
    return ConnectionInfo(conn, 100 + conn, uid, uid, path)


def test_the_file_gives_classes_weights_quotas_and_aging():
    c = TenantConfig.from_toml(CONFIG)
    assert c.policy.max_qp == 100 and c.aging_seconds == 0.25
    job42, alice = c.tenants
    assert (job42.klass, job42.weight, job42.max_cq, job42.max_pinned_bytes) == (Class.HIGH, 3.0, 2, 8192)
    assert (alice.klass, alice.max_accel_jobs, alice.accel_seconds_per_minute) == (Class.LOW, 2, 6.0)
    assert alice.max_qp is None  # no quota


def test_a_connection_is_its_sockets_tenant_then_its_uids_then_uid_n():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    assert led.resolve(info(1000, "/run/vrdma/job42.sock")) == "job42"  # the socket wins
    assert led.resolve(info(1000)) == "alice"
    assert led.resolve(info(7)) == "uid:7"
    assert led.classify("uid:7") == (int(Class.NORMAL), 1.0)
    assert led.classify("job42") == (int(Class.HIGH), 3.0)


@pytest.mark.parametrize("entry, named", [
    ('name = "a"\nweight = 0', "weight=0"),
    ('name = "a"\nweight = -3', "weight=-3"),
    ('name = "a"\nweight = 1e9', "weight=1000000000.0"),
    ('name = "a"\nweight = nan', "weight=nan"),
    ('name = "a"\nweight = "3"', "weight='3'"),
    ('name = "a"\nclass = "urgent"', "'urgent'"),
    ('name = "a"\nmax_qp = -1', "max_qp=-1"),
    ('name = "a"\nmax_qp = 1.5', "max_qp=1.5"),
    ('name = "a"\nmax_qp = true', "max_qp=True"),
    ('name = "a"\nmax_pinned_bytes = 9223372036854775807', "max_pinned_bytes=9223372036854775807"),
    ('name = "a"\naccel_seconds_per_minute = inf', "accel_seconds_per_minute=inf"),
    ('name = "a"\naccel_seconds_per_minute = -1', "accel_seconds_per_minute=-1"),
    ('name = "a"\nuid = -1', "uid=-1"),
    ('name = "a"\nuid = 4294967295', "uid=4294967295"),
    ('name = "a"\nsocket = "relative.sock"', "'relative.sock'"),
    ('name = "a b"', "'a b'"),
    ('name = ""', "''"),
    ('name = 5', "5"),
    ('uid = 5', "no name"),
    ('name = "a"\nmax_qps = 3', "'max_qps'"),
])
def test_hostile_or_absurd_values_are_refused_naming_them(entry, named):
    with pytest.raises(PolicyError) as e:
        TenantConfig.from_toml("[[tenant]]\n" + entry)
    assert named in str(e.value)


@pytest.mark.parametrize("text, named", [
    ('[[tenant]]\nname = "a"\nuid = 1\n[[tenant]]\nname = "b"\nuid = 1', "uid 1"),
    ('[[tenant]]\nname = "a"\n[[tenant]]\nname = "a"', "name 'a'"),
    ('tenant = 3', "array of tables"),
    ('[fairness]\naging_seconds = -1', "aging_seconds=-1"),
    ('[fairness]\naging = 1', "'aging'"),
    ('[tenants]\nmax_qp = -5', "max_qp=-5"),
    ('[[tenant]\nname = "a"', "configuration file"),
])
def test_bad_files_are_refused_naming_the_value(text, named):
    with pytest.raises(PolicyError) as e:
        TenantConfig.from_toml(text)
    assert named in str(e.value)


def test_tenant_quotas_span_its_connections_and_spare_its_other_objects():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    a = led.account(info(5, "/run/vrdma/job42.sock", 1))
    b = led.account(info(6, "/run/vrdma/job42.sock", 2))
    a.charge(Resource.CQ)
    b.charge(Resource.CQ)
    with pytest.raises(LimitExceeded) as e:
        a.charge(Resource.CQ)
    assert e.value.errno == errno.ENOSPC and "tenant 'job42'" in str(e.value) and "max_cq 2" in str(e.value)
    a.charge(Resource.QP)  # the tenant's other objects keep working
    a.charge(Resource.PINNED_BYTES, 8192)
    with pytest.raises(LimitExceeded):
        b.charge(Resource.PINNED_BYTES, 1)
    assert led.tenants["job42"].quota_hits == {"max_cq": 1, "max_pinned_bytes": 1}
    a.close()
    b.charge(Resource.CQ)  # a's CQ went with it
    b.charge(Resource.PINNED_BYTES, 4096)
    assert led.tenants["job42"].used[Resource.CQ] == 2 and led.tenants["job42"].connections == 1


def test_reload_lowers_limits_without_taking_anything_back():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    a = led.account(info(5, "/run/vrdma/job42.sock"))
    a.charge(Resource.CQ, 2)
    led.reload(TenantConfig.from_toml(CONFIG.replace("max_cq = 2", "max_cq = 1")))
    assert a.used[Resource.CQ] == 2  # held objects stay
    with pytest.raises(LimitExceeded):
        a.charge(Resource.CQ)
    a.release(Resource.CQ, 2)
    a.charge(Resource.CQ)
    with pytest.raises(LimitExceeded):
        a.charge(Resource.CQ)
    led.reload(TenantConfig.from_toml(CONFIG.replace("max_cq = 2", "max_cq = 5")))
    a.charge(Resource.CQ, 4)
    assert led.reloads == 2


def test_set_tenant_overrides_survive_reloads_until_reset():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    seen = []
    led.on_change.append(lambda: seen.append(1))
    new = led.set_tenant("alice", klass="high", weight=5, max_accel_jobs=None, max_qp=3)
    assert (new.klass, new.weight, new.max_accel_jobs, new.max_qp, new.uid) == (Class.HIGH, 5.0, None, 3, 1000)
    assert led.classify("alice") == (2, 5.0)
    led.set_tenant("uid:7", klass="low")  # a tenant without an entry
    assert led.classify("uid:7") == (0, 1.0)
    with pytest.raises(PolicyError, match="weight=0"):
        led.set_tenant("alice", weight=0)
    with pytest.raises(PolicyError, match="'max_gpus'"):
        led.set_tenant("alice", max_gpus=1)
    assert led.overrides("alice") == ["class", "max_accel_jobs", "max_qp", "weight"]
    # a reload: the file's new values apply to the fields not set live; the live ones win
    led.reload(TenantConfig.from_toml(CONFIG.replace("max_accel_jobs = 2", "max_accel_jobs = 7")
                                      .replace('uid = 1000', 'uid = 1000\nmax_cq = 9')))
    s = led.spec("alice")
    assert (s.klass, s.weight, s.max_accel_jobs, s.max_qp, s.max_cq) == (Class.HIGH, 5.0, None, 3, 9)
    assert led.classify("uid:7") == (0, 1.0) and len(seen) == 3
    # persisted form, and restored into a fresh ledger (a restarted daemon)
    state = led.live_state()
    assert state == {"alice": {"class": "high", "weight": 5.0, "max_accel_jobs": None, "max_qp": 3},
                     "uid:7": {"class": "low"}}
    other = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    assert other.restore_live(state) == state and other.classify("alice") == (2, 5.0)
    # reset: one tenant, then all; the file's entry applies again
    assert led.reset_tenant("alice") == {"alice": ["class", "max_accel_jobs", "max_qp", "weight"]}
    s = led.spec("alice")
    assert (s.klass, s.weight, s.max_accel_jobs, s.max_qp) == (Class.LOW, 1.0, 7, None)
    assert led.reset_tenant("alice") == {} and led.overrides("alice") == []
    assert led.reset_tenant(None) == {"uid:7": ["class"]} and led.classify("uid:7") == (1, 1.0)
    assert led.live_state() == {}


@pytest.mark.parametrize("state, bad", [
    ([1, 2], "not a mapping of tenants"),
    ({"alice": 3}, "not a mapping of fields"),
    ({"alice": {"max_gpus": 1}}, "'max_gpus'"),
    ({"alice": {"class": "urgent"}}, "'urgent'"),
    ({"alice": {"max_qp": -1}}, "max_qp=-1"),
    ({"al ice": {"weight": 2}}, "'al ice'"),
    ({"bob": {"weight": 2}, "alice": {"weight": 1e9}}, "weight=1000000000.0"),
])
def test_restore_live_refuses_a_bad_state_whole(state, bad):
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    led.set_tenant("alice", weight=2)
    with pytest.raises(PolicyError, match=bad):
        led.restore_live(state)
    assert led.live_state() == {"alice": {"weight": 2.0}}  # nothing of it applied


def test_quota_hits_per_tenant():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    assert led.quota_hits() == {}
    led.accel_admit("alice", 0.0)
    led.accel_admit("alice", 0.0)
    assert led.accel_admit("alice", 0.0) == "max_accel_jobs"
    assert led.quota_hits() == {"alice": {"max_accel_jobs": 1}}


def test_in_flight_accelerator_jobs_quota():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))
    assert led.accel_admit("alice", 0.0) is None
    assert led.accel_admit("alice", 0.0) is None
    assert led.accel_admit("alice", 0.0) == "max_accel_jobs"
    led.accel_done("alice", 0.001, 0.0)
    assert led.accel_admit("alice", 0.0) is None
    assert led.tenants["alice"].quota_hits == {"max_accel_jobs": 1}
    assert led.accel_admit("uid:7", 0.0) is None  # no quota: always admitted


def test_accelerator_seconds_per_minute_is_a_token_bucket_of_service_time():
    led = TenantLedger(config=TenantConfig.from_toml(CONFIG))  # alice: 6 s per minute
    assert led.accel_admit("alice", 0.0) is None
    led.accel_done("alice", 7.0, 0.0)  # one long job: paid in full, the balance is -1 s
    assert led.accel_admit("alice", 5.0) == "accel_seconds_per_minute"  # +0.5 s: still -0.5
    assert led.accel_admit("alice", 10.5) is None  # +1.05 s: positive again
    assert led.tenants["alice"].quota_hits == {"accel_seconds_per_minute": 1}


def test_token_bucket_banks_at_most_one_minute():
    b = TokenBucket(6.0, 0.0)
    b.charge(1.0, 0.0)
    b._refill(3600.0)
    assert b.tokens == 6.0
    b.set_rate(2.0, 3600.0)
    assert b.tokens == 2.0
