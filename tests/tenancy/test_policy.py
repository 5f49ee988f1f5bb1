"""TenantPolicy parsing and the ledger's bookkeeping (sans-I/O)."""
import errno

import pytest

from vhost_user.tenancy import (
    ConnectionInfo,
    LimitExceeded,
    PolicyError,
    Resource,
    TenantLedger,
    TenantPolicy,
)


def test_defaults_are_finite_and_documented_values():
    p = TenantPolicy()
    assert (p.max_connections, p.max_connections_per_uid, p.handshake_timeout) == (256, 64, 10.0)
    assert (p.max_qp, p.max_cq, p.max_mr, p.max_pd) == (1536, 1536, 2048, 256)


def test_toml_sets_options_and_names_unknown_ones():
    p = TenantPolicy.from_toml("[tenants]\nmax_connections_per_uid = 8\nhandshake-timeout = 2.5\n"
                               "max_pinned_bytes = 1048576\n")
    assert (p.max_connections_per_uid, p.handshake_timeout, p.max_pinned_bytes) == (8, 2.5, 1 << 20)
    assert p.max_qp == TenantPolicy().max_qp
    with pytest.raises(PolicyError, match="max_qps"):
        TenantPolicy.from_toml("[tenants]\nmax_qps = 3\n")
    with pytest.raises(PolicyError, match="max_qp=-1"):
        TenantPolicy.from_toml("[tenants]\nmax_qp = -1\n")
    with pytest.raises(PolicyError, match="max_qp='x'"):
        TenantPolicy.from_mapping({"max_qp": "x"})
    with pytest.raises(PolicyError, match="configuration file"):
        TenantPolicy.from_toml("[tenants\n")


def _info(uid, n=1):
    return ConnectionInfo(n, 1000 + n, uid, uid, "/x.sock")


def test_account_caps_budgets_release_and_counters():
    ledger = TenantLedger(TenantPolicy(max_qp=2, max_pd=5, uid_max_objects=4, max_pinned_bytes=100,
                                       uid_max_pinned_bytes=150))
    a, b = ledger.account(_info(7, 1)), ledger.account(_info(7, 2))
    a.charge(Resource.QP)
    a.charge(Resource.QP)
    with pytest.raises(LimitExceeded) as e:
        a.charge(Resource.QP)
    assert e.value.errno == errno.ENOMEM and "max_qp 2" in str(e.value)
    b.charge(Resource.PD)
    b.charge(Resource.PD)
    with pytest.raises(LimitExceeded) as e:  # uid 7 holds 4 objects over two connections
        b.charge(Resource.PD)
    assert e.value.errno == errno.ENOSPC and "uid 7" in str(e.value)
    other = ledger.account(_info(8, 3))
    other.charge(Resource.PD)  # another uid: its own budget
    a.charge(Resource.PINNED_BYTES, 100)
    a.release(Resource.QP)  # uid 7 holds 3 objects: an MR would fit, its bytes do not
    with pytest.raises(LimitExceeded) as e:  # all or nothing: the MR is not taken either
        b.charge_all(((Resource.MR, 1), (Resource.PINNED_BYTES, 60)))
    assert e.value.errno == errno.ENOSPC
    assert ledger.totals(7)[Resource.MR] == 0
    assert a.counters.cap_hits == {Resource.QP: 1}
    assert b.counters.budget_hits == {Resource.PD: 1, Resource.PINNED_BYTES: 1}
    assert ledger.uids[7].counters.total() == 3
    b.charge(Resource.PD)  # the MR was not taken: room for one object
    a.close()
    a.close()  # idempotent
    assert ledger.totals(7)[Resource.QP] == 0 and ledger.totals(7)[Resource.PINNED_BYTES] == 0
    b.close()
    other.close()
    assert all(v == 0 for uid in (7, 8) for v in ledger.totals(uid).values())


def test_check_only_takes_nothing():
    ledger = TenantLedger(TenantPolicy(max_cq=1))
    acc = ledger.account(None)
    acc.charge_all(((Resource.CQ, 1),), check_only=True)
    assert ledger.totals(-1)[Resource.CQ] == 0
    acc.charge(Resource.CQ)
    with pytest.raises(LimitExceeded):
        acc.charge_all(((Resource.CQ, 1),), check_only=True)
