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


def test_a_forwarded_driver_reset_drops_the_guests_objects(backend):
    with Context(backend.path) as ctx:
        dev = backend.devices[0]
        pd = PD(ctx)  # noqa: F841  held: it must exist
        assert backend.call(lambda: len(dev.core.pds)) == 1
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        fe.set_status(0)  # QEMU's vhost stop after the guest wrote device_status = 0
        fe.get_features()
        assert backend.call(lambda: (dev.resets, len(dev.core.pds))) == (1, 0)
        with pytest.raises(RDMAError) as e:  # the device forgot it
            pd.close()
        assert e.value.errno == errno.ENOENT


def test_every_ring_stopped_is_a_driver_reset(backend):
    """QEMU 11.1's vhost-user-base forwards a guest driver's reset as
    SET_VRING_ENABLE 0 + GET_VRING_BASE on every ring, with no SET_STATUS."""
    with Context(backend.path, timeout=2.0) as ctx:
        dev = backend.devices[0]
        pd = PD(ctx)
        fe = ctx.transport.device.frontend  # type: ignore[attr-defined]
        n = backend.call(lambda: len(dev.conn.vrings))
        fe.get_vring_base(0)
        assert backend.call(lambda: (dev.resets, len(dev.core.pds))) == (0, 1)  # one ring: no reset
        for i in range(1, n):
            fe.get_vring_base(i)
        assert backend.call(lambda: (dev.resets, len(dev.core.pds))) == (1, 0)
        with pytest.raises(RDMAError) as e:  # the rings stay stopped: nobody answers
            pd.close()
        assert e.value.errno == errno.ETIMEDOUT
