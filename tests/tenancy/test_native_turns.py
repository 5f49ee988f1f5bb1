"""Tenant classes, weights and aging on the native accelerator path (issue #18).

Small FFT jobs of tenants that neither accounting nor quotas need to see run
natively in the daemon's loop, a slice at a time, never through the
accelerator's fair queue (virtio_rdma/accel.py). Their turns follow the
tenants as the fair queue does: the highest class first, weighted turns
within a class, aging lifting a waiting tenant. One job a turn here
(NATIVE_SLICE_SECONDS ~ 0), so the order is exact: it is asserted from the
CQEs' order and the router's counters.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from accel_core import AcceleratorService, AcceleratorSpec, Op
from fabric.local import LocalFabric
from tests.virtio_rdma.driver import Guest
from verbs import Access
from vhost_user.tenancy import TenantAccount, TenantConfig, TenantLedger
from virtio_rdma import accel
from virtio_rdma.accel import AccelRouter
from virtio_rdma.constants import AccelOp, AccelStatus

N = 256

CONFIG = """
[fairness]
aging_seconds = {aging}
[[tenant]]
name = "H"
uid = 1001
class = "high"
[[tenant]]
name = "L"
uid = 1002
class = "low"
[[tenant]]
name = "A"
uid = 1003
weight = 3
[[tenant]]
name = "B"
uid = 1004
weight = 1
"""


def _router(aging: float) -> tuple[AccelRouter, TenantLedger]:
    if accel.NativeJobs is None:
        pytest.skip("virtio_rdma._accel is not built: no native path")
    svc = AcceleratorService([AcceleratorSpec("fft", ops=frozenset({Op.FFT}))])
    router = AccelRouter(svc)
    ledger = TenantLedger(config=TenantConfig.from_toml(CONFIG.format(aging=aging)))
    router.set_tenancy(ledger)  # no accounting, no quotas: the native path stays on
    return router, ledger


def _tenant_guest(router, ledger, name: str, uid: int, gpa: int, jobs: int):
    g = Guest(LocalFabric(), size=8 << 20, gpa=gpa, accel=router, account=TenantAccount(ledger, uid, name))
    pd, cq = g.alloc_pd(), g.create_cq(256)
    src = g.reg_mr(pd, N * 8, access=Access.LOCAL_WRITE)
    g.write(src.gpa, np.ones(N, np.complex64).tobytes())
    dst = g.reg_mr(pd, N * 8, access=Access.LOCAL_WRITE)
    q = g.create_aq(pd, cq, AccelOp.FFT, depth=64)
    for i in range(jobs):
        g.write_aq_job(q, i, AccelOp.FFT, size=N, inputs=[(src.addr, N * 8, src.lkey)],
                       outputs=[(dst.addr, N * 8, dst.lkey)])
    return g, q, cq


async def _race(router, first, second, until):
    """Ring ``first``'s queue, then ``second``'s; poll both CQs between the loop's
    callbacks until ``until(done1, done2)``; returns their completions."""
    (g1, q1, c1), (g2, q2, c2) = first, second
    g1.ring_aq(q1)
    g2.ring_aq(q2)
    d1: list = []
    d2: list = []
    for _ in range(100000):
        if until(d1, d2):
            break
        await asyncio.sleep(0)
        d1 += g1.poll(c1)
        d2 += g2.poll(c2)
    else:
        raise AssertionError(f"native turns stalled at {len(d1)} + {len(d2)} jobs")
    from virtio_rdma import wire

    for c in d1 + d2:
        assert wire.decode_accel_cqe(c).status is AccelStatus.SUCCESS
    return d1, d2


def test_native_turns_serve_the_higher_class_first_and_weights_3_to_1(monkeypatch):
    monkeypatch.setattr(accel, "NATIVE_SLICE_SECONDS", 1e-9)

    async def main():
        router, ledger = _router(aging=0.0)
        try:
            router.attach_loop(asyncio.get_running_loop())
            # L (low) rang first; H (high) behind it: all H's jobs go before L's second
            low = _tenant_guest(router, ledger, "L", 1002, 0x1000_0000, 16)
            high = _tenant_guest(router, ledger, "H", 1001, 0x4000_0000, 16)
            dl, _ = await _race(router, low, high, lambda a, b: len(b) == 16)
            assert len(dl) == 1, len(dl)  # only the job its own doorbell ran
            assert router.native_class_overtakes >= 15
            for _ in range(100000):  # L finishes alone
                if len(dl) == 16:
                    break
                await asyncio.sleep(0)
                dl += low[0].poll(low[2])
            assert len(dl) == 16
            # A (weight 3) and B (weight 1), one class: three turns of A per turn of B
            a = _tenant_guest(router, ledger, "A", 1003, 0x7000_0000, 60)
            b = _tenant_guest(router, ledger, "B", 1004, 0xA000_0000, 20)
            da, db = await _race(router, a, b, lambda x, y: len(y) == 12)
            assert 3 * 12 - 4 <= len(da) <= 3 * 12 + 4, (len(da), len(db))
            assert router.native.jobs >= 16 + 16 + len(da) + len(db)
            # every job ran natively: the accelerator's fair queue dispatched none
            assert router.local.service.accelerators[0].metrics_snapshot()["class_dispatches"] == {}
        finally:
            router.close()

    asyncio.run(main())


def test_native_turns_age_a_waiting_low_tenant(monkeypatch):
    """With aging (a period shorter than any turn), L competes as high at once:
    the turns alternate, and L finishes before H has done half of its jobs."""
    monkeypatch.setattr(accel, "NATIVE_SLICE_SECONDS", 1e-9)

    async def main():
        router, ledger = _router(aging=1e-6)
        try:
            router.attach_loop(asyncio.get_running_loop())
            high = _tenant_guest(router, ledger, "H", 1001, 0x1000_0000, 40)
            low = _tenant_guest(router, ledger, "L", 1002, 0x4000_0000, 8)
            dh, _ = await _race(router, high, low, lambda a, b: len(b) == 8)
            assert len(dh) < 20, len(dh)
            assert router.native_aged >= 1
        finally:
            router.close()

    asyncio.run(main())


def test_a_live_class_change_applies_to_the_next_native_turns(monkeypatch):
    """``ledger.set_tenant`` (the admin socket's ``tenant set``) lifts L to high while
    both keep jobs waiting: from then on the turns alternate (L no longer waits for
    all of H's jobs)."""
    monkeypatch.setattr(accel, "NATIVE_SLICE_SECONDS", 1e-9)

    async def main():
        router, ledger = _router(aging=0.0)
        try:
            router.attach_loop(asyncio.get_running_loop())
            low = _tenant_guest(router, ledger, "L", 1002, 0x1000_0000, 20)
            high = _tenant_guest(router, ledger, "H", 1001, 0x4000_0000, 40)
            dl, dh = await _race(router, low, high, lambda a, b: len(b) >= 10)
            assert len(dl) == 1, len(dl)  # low: only its doorbell's job so far
            ledger.set_tenant("L", klass="high")
            for _ in range(100000):
                if len(dl) == 20:
                    break
                await asyncio.sleep(0)
                dl += low[0].poll(low[2])
                dh += high[0].poll(high[2])
            assert len(dl) == 20 and len(dh) < 40, (len(dl), len(dh))  # L done before H
        finally:
            router.close()

    asyncio.run(main())
