"""A short seeded run of every fuzz target (bench.fuzz), in the normal suite.

Each run is a few seconds; the long runs (10^6 inputs per target) are
``python -m bench.fuzz TARGET --count 1000000``. A run passes when it found
nothing: no crash, hang, canary byte changed, fd or mapping left behind, and
every fresh-guest round trip verified."""

from bench.fuzz import run_target


def _assert_clean(rep):
    assert rep.count > 0
    assert rep.crashes == 0, rep.summary()
    assert rep.hangs == 0, rep.summary()
    assert rep.canary_violations == 0, rep.summary()
    assert rep.liveness_checks >= 1, rep.summary()
    assert rep.rejected > 0, rep.summary()        # the inputs were hostile enough to be refused
    assert rep.ok, rep.summary()


def test_control_short_run():
    rep = run_target("control", 20000, seed=12, live_every=10000)
    _assert_clean(rep)
    assert rep.accepted > 0   # some commands were valid enough to create objects
    # every status the device answered is one the spec lists
    from virtio_rdma.constants import Status
    assert {int(s) for s in rep.counters["statuses"]} <= {int(s) for s in Status}


def test_rings_short_run():
    rep = run_target("rings", 20000, seed=12, live_every=10000, hijack=False)
    _assert_clean(rep)
    assert rep.counters["attacker"]["bad_doorbells"] > 0 and rep.counters["attacker"]["bad_wqes"] > 0


def test_rings_hijack_short_run():
    """An attacker QP connected to the victim's QPN, with the victim's PSN,
    rkeys and addresses, posting well-formed WRITE/READ/atomics among the
    garbage: every such request is dropped and counted at the victim's
    responder, whose QP stays in RTS and whose bytes stay as they were."""
    rep = run_target("rings", 20000, seed=5, live_every=10000, hijack=True)
    _assert_clean(rep)
    assert rep.counters["victim_qp_kills"] == 0
    assert rep.counters["victim2"].get("foreign_requests", 0) > 0


def test_roce_short_run():
    rep = run_target("roce", 15000, seed=12, live_every=7500)
    _assert_clean(rep)
    c = rep.counters
    assert c["udp"]["rx_icrc_errors"] > 0 and c["udp"]["rx_malformed"] > 0
    assert c["va_rc_totals"].get("rx_packets", 0) > 0        # packets reached the live QP's engine


def test_vhost_user_short_run():
    rep = run_target("vhost-user", 12000, seed=12, live_every=6000)
    assert rep.count > 0 and rep.crashes == 0 and rep.hangs == 0 and rep.canary_violations == 0, rep.summary()
    assert rep.liveness_checks >= 1 and rep.maps_delta == 0, rep.summary()
    assert rep.counters["ring_kicks"] > 0 and rep.counters["closed_by_daemon"] > 0
    assert rep.ok, rep.summary()
