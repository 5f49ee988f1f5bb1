"""The device behind a carrier (docs/virtio-rdma.md 5.x.4.1), on the real
daemon (in a thread) over a real vhost-user connection: what QEMU 7.2's
vhost-user-blk does to it, done here by our own front-end.

* GET_CONFIG of the blk carrier's 57 bytes: the struct, then zeros.
* ACK_FEATURES negotiates the device bits; a later SET_FEATURES of the
  front-end (transport bits only) does not undo them.
* SET_STATUS 0 after DRIVER_OK (a guest driver's reset, forwarded): the
  guest's objects are gone, counted in the device's ``resets``.
"""
from __future__ import annotations

import errno

import pytest

from fabric.local import LocalFabric
from guest_lib import PD, Context, RDMAError
from vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES
from vhost_user.testing import BackendThread
from virtio_rdma import wire
from virtio_rdma.constants import CONFIG_MAGIC, CONFIG_SIZE, Cmd, Feature
from virtio_rdma.device import RdmaDevice


@pytest.fixture
def backend(tmp_path):
    fabric = LocalFabric()
    devices: list[RdmaDevice] = []

    def make(info):
        d = RdmaDevice(fabric)
        devices.append(d)
        return d

    with BackendThread(str(tmp_path / "rdma.sock"), make) as b:
        b.devices = devices
        yield b


def test_blk_carrier_config_window(backend):
    with Context(backend.path) as ctx:
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        raw = fe.get_config(0, 57)
        assert len(raw) == 57 and raw[:4] == b"RDMA" and raw[CONFIG_SIZE:] == b""
        assert wire.decode_config(raw)["magic"] == CONFIG_MAGIC
        assert fe.get_config(0, 256)[CONFIG_SIZE:] == bytes(256 - CONFIG_SIZE)
        assert ctx.config.device_features == RdmaDevice.device_features


def test_ack_features_outlives_the_front_ends_set_features(backend):
    with Context(backend.path) as ctx:
        dev = backend.devices[0]
        r = ctx.command(Cmd.ACK_FEATURES, features=1 << Feature.DBREC_POLL)
        assert r["features"] == 1 << Feature.DBREC_POLL
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        # what a carrier's front-end sends: transport bits only
        fe.set_features(ctx.features & ~0xFFFFFF | VHOST_USER_F_PROTOCOL_FEATURES)
        fe.get_features()  # a round trip: the SET_FEATURES was handled
        assert backend.call(lambda: dev.core.poll_doorbell_records)
        pd = PD(ctx)  # noqa: F841  held: it must exist
        with pytest.raises(Exception, match="ACK_FEATURES failed"):
            ctx.command(Cmd.ACK_FEATURES, features=0)


def _stop_rings(backend, dev, fe) -> list[int]:
    """QEMU's vhost stop: SET_VRING_ENABLE 0 and GET_VRING_BASE on every ring; the bases."""
    n = backend.call(lambda: len(dev.conn.vrings))
    for i in range(n):
        fe.set_vring_enable(i, False)
    return [fe.get_vring_base(i) for i in range(n)]


def _start_rings(ctx, fe, bases: list[int]) -> None:
    """QEMU's vhost start: each ring again (the same memory and addresses), at ``bases``."""
    dev = ctx.transport.device  # type: ignore[attr-defined]
    for i, q in enumerate(dev.queues):
        fe.set_vring_num(i, q.size)
        fe.set_vring_base(i, bases[i])
        fe.set_vring_addr(i, desc=dev.uva_of(q.desc_gpa), used=dev.uva_of(q.used_gpa),
                          avail=dev.uva_of(q.avail_gpa))
        fe.set_vring_call(i, dev.call_fds[i])
        fe.set_vring_kick(i, dev.kick_fds[i])
        fe.set_vring_enable(i, True)


@pytest.mark.parametrize("status0", [True, False], ids=["7.2", "11.1"])
def test_a_forwarded_driver_reset_drops_the_guests_objects(backend, status0):
    """A guest driver's reset as QEMU forwards it (7.2: SET_STATUS 0, then every ring
    stopped; 11.1's vhost-user-base: the rings stopped only), then the next driver's
    rings, which start from 0: the old driver's objects go when they do, counted."""
    ctx = Context(backend.path, timeout=20.0)
    try:
        dev = backend.devices[0]
        pd = PD(ctx)  # noqa: F841  held: it must exist
        assert backend.call(lambda: len(dev.core.pds)) == 1
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        if status0:
            fe.set_status(0)
        bases = _stop_rings(backend, dev, fe)
        assert bases[0] > 0                                   # the controlq ran
        # stopped: nothing dropped yet (a VM stop sends the same)
        assert backend.call(lambda: (dev.resets, len(dev.core.pds))) == (0, 1)
        dev_side = ctx.transport.device  # type: ignore[attr-defined]
        for q in dev_side.queues:                             # a new driver: fresh rings, from 0
            dev_side.translate(q.avail_gpa, 4)[:] = bytes(4)
            dev_side.translate(q.used_gpa, 4)[:] = bytes(4)
        _start_rings(ctx, fe, [0] * len(bases))
        assert backend.call(lambda: (dev.resets, dev.resumes, len(dev.core.pds))) == (1, 0, 0)
    finally:  # the driver side's rings were wiped under it: close the connection only
        ctx.transport.close()


@pytest.mark.parametrize("status0", [True, False], ids=["7.2", "11.1"])
def test_a_paused_and_continued_vm_keeps_the_guests_objects(backend, status0):
    """QMP stop / cont: the same messages as a driver's reset, but the rings start again
    where they stopped: nothing is dropped and the driver carries on with its objects."""
    with Context(backend.path, timeout=20.0) as ctx:
        dev = backend.devices[0]
        pd = PD(ctx)
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        if status0:
            fe.set_status(0)
        bases = _stop_rings(backend, dev, fe)
        _start_rings(ctx, fe, bases)
        assert backend.call(lambda: (dev.resets, dev.resumes, len(dev.core.pds))) == (0, 1, 1)
        pd2 = PD(ctx)        # the control queue works on, and the old PD is still there
        pd.close()
        pd2.close()
        assert backend.call(lambda: len(dev.core.pds)) == 0


def test_one_ring_stopped_is_no_reset(backend):
    with Context(backend.path, timeout=20.0) as ctx:
        dev = backend.devices[0]
        pd = PD(ctx)  # noqa: F841  held: it must exist
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        fe.get_vring_base(1)
        assert backend.call(lambda: (dev.resets, dev._stopped_at, len(dev.core.pds))) == (0, None, 1)
