"""The handshake timeout serves QEMU and drops silent or half-open clients.

QEMU connects when it realizes a vhost-user device (VM start) and sends
GET_FEATURES, the protocol features, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES and
(vhost-user-blk) GET_CONFIG; the memory table and the rings follow only when the
guest's driver sets DRIVER_OK. A client replaying that sequence and then going
quiet must be kept past the timeout; a client that stays silent, sends half a
header, or reads the features without SET_OWNER is closed and counted. The real
QEMU 7.2 case (a stopped VM, no guest driver) is in qemu_tests/test_pci_guest.py.
"""
from __future__ import annotations

import socket
import struct
import time

from vhost_user.frontend import Frontend
from vhost_user.messages import ProtocolFeature as PF
from vhost_user.tenancy import TenantPolicy
from vhost_user.testing import BackendThread

from .conftest import ram_blk_factory

#: the QEMU-like client's whole handshake (connect and six round trips to a daemon thread of
#: this process) must fit in it: ~5 ms idle, but a loaded 2-vCPU machine can stall a process
#: for hundreds of ms, so not 0.5 s
TIMEOUT = 1.0


def _realize_like_qemu(path: str) -> Frontend:
    fe = Frontend(path)
    fe.get_features()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & (PF.CONFIG | PF.REPLY_ACK | PF.MQ))
    fe.get_queue_num()
    fe.set_owner()
    fe.get_features()
    assert len(fe.get_config(0, 60)) == 60
    return fe


def test_qemu_realize_sequence_is_a_finished_handshake(sock_path):
    with BackendThread(sock_path, ram_blk_factory(), policy=TenantPolicy(handshake_timeout=TIMEOUT)) as b:
        qemu = _realize_like_qemu(sock_path)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(sock_path)
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.connect(sock_path)
        half.sendall(struct.pack("<I", 3)[:3])  # three bytes of a SET_OWNER header
        no_owner = Frontend(sock_path)
        no_owner.get_features()
        no_owner.get_protocol_features()  # ... but never SET_OWNER
        try:
            assert b.wait_for(lambda s: s.metrics.handshake_timeouts == 3, timeout=20)
            time.sleep(2 * TIMEOUT)  # the QEMU-like client idles well past the timeout
            for s in (silent, half, no_owner.sock):
                s.settimeout(10)
                assert s.recv(64) == b""  # the daemon hung up
            assert b.connection_count() == 1
            qemu.get_features()  # ... and still serves the one that did its handshake
            m = b.metrics()
            assert (m.handshake_timeouts, m.protocol_errors, m.transport_errors) == (3, 0, 0)
        finally:
            for s in (silent, half):
                s.close()
            no_owner.close()
            qemu.close()
        assert b.wait_for(lambda s: not s.connections)
        assert b.metrics().handshake_timeouts == 3  # the QEMU-like client's close is no timeout


def test_timeout_zero_keeps_a_silent_client(sock_path):
    with BackendThread(sock_path, ram_blk_factory(), policy=TenantPolicy(handshake_timeout=0)) as b:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(sock_path)
        try:
            assert b.wait_for(lambda s: len(s.connections) == 1)
            time.sleep(2 * TIMEOUT)
            assert b.connection_count() == 1 and b.metrics().handshake_timeouts == 0
        finally:
            silent.close()
        assert b.wait_for(lambda s: not s.connections)
