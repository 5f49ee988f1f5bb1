"""A front-end that breaks the rules gets a clear error and a closed
connection; the daemon survives, another front-end on it keeps working, and
every fd and mapping of the bad connection is released."""
import fcntl
import os
import socket
import struct
import time

import pytest

from vhost_user.blk import SECTOR_SIZE
from vhost_user.blk_driver import BlkDriver
from vhost_user.errors import ReplyError, VhostUserError
from vhost_user.frontend import Frontend, VirtioUserDevice
from vhost_user.messages import (
    FLAG_NEED_REPLY,
    VERSION,
    FrontendReq,
    MemRegionDesc,
    Message,
    SingleMemRegion,
    encode_u64,
)
from vhost_user.endpoint import send_message
from vhost_user.testing import open_fds
from virtio.memory import proc_maps_count

R = FrontendReq


@pytest.fixture
def good(backend, sock_path):
    """A well-behaved front-end connected before the bad one."""
    blk = BlkDriver.connect(sock_path)
    blk.write(7, b"G" * SECTOR_SIZE)
    yield blk
    blk.close()


def _raw(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    return s


def _assert_closed_by_daemon(sock):
    sock.settimeout(5)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
    except ConnectionResetError:
        return


def _check_survivors(backend, good, errors_before, kind="protocol_errors"):
    assert backend.wait_for(lambda s: getattr(s.metrics, kind) > errors_before), backend.metrics()
    assert backend.wait_for(lambda s: len(s.connections) == 1)
    good.write(8, b"S" * SECTOR_SIZE)
    assert bytes(good.read(7)) == b"G" * SECTOR_SIZE
    assert bytes(good.read(8)) == b"S" * SECTOR_SIZE


def _errors(backend, kind="protocol_errors"):
    return getattr(backend.metrics(), kind)


@pytest.mark.parametrize("raw,kind,why", [
    (struct.pack("<III", 9999, 1, 0), "protocol_errors", "unknown request"),
    (struct.pack("<III", R.GET_FEATURES, 1, 1 << 20), "protocol_errors", "oversized payload"),
    (struct.pack("<III", R.SET_FEATURES, 1, 4) + b"\0" * 4, "protocol_errors", "u64 payload too short"),
    (struct.pack("<III", R.GET_FEATURES, 0x21, 0), "protocol_errors", "unknown flags"),
    (struct.pack("<III", R.GET_FEATURES, 5, 0), "protocol_errors", "reply flag from a front-end"),
    (struct.pack("<III", R.SET_LOG_BASE, 1, 16) + b"\0" * 16, "protocol_errors", "unsupported request"),
    (struct.pack("<III", R.GET_QUEUE_NUM, 1, 0), "protocol_errors", "MQ not negotiated"),
    (struct.pack("<III", R.SET_VRING_NUM, 1, 8) + struct.pack("<II", 5, 64), "protocol_errors", "ring index"),
    (struct.pack("<III", R.SET_VRING_NUM, 1, 8) + struct.pack("<II", 0, 100), "protocol_errors", "size not pow2"),
    (struct.pack("<III", R.SET_VRING_KICK, 1, 8) + encode_u64(0), "protocol_errors", "missing kick fd"),
])
def test_bad_messages_close_only_that_connection(backend, sock_path, good, raw, kind, why):
    before = _errors(backend, kind)
    s = _raw(sock_path)
    s.sendall(raw)
    _assert_closed_by_daemon(s)
    s.close()
    _check_survivors(backend, good, before, kind)


def test_truncated_header_then_close(backend, sock_path, good):
    before = _errors(backend, "transport_errors")
    s = _raw(sock_path)
    s.sendall(b"\x01\0\0\0\x01")
    time.sleep(0.05)
    good.write(9, b"x" * 512)  # a half message does not stall the daemon
    s.close()
    _check_survivors(backend, good, before, "transport_errors")


def test_truncated_payload_then_close(backend, sock_path, good):
    before = _errors(backend, "transport_errors")
    s = _raw(sock_path)
    s.sendall(struct.pack("<III", R.SET_FEATURES, 1, 8) + b"\0\0\0")
    time.sleep(0.05)
    assert bytes(good.read(7)) == b"G" * SECTOR_SIZE
    s.close()
    _check_survivors(backend, good, before, "transport_errors")


def test_wrong_fd_count_releases_fds(backend, sock_path, good):
    before = _errors(backend)
    fds_before = open_fds()
    with Frontend(sock_path) as fe:
        a, b = os.eventfd(0), os.eventfd(0)
        send_message(fe.sock, Message(R.SET_VRING_CALL, VERSION, encode_u64(0), [a, b]))
        os.close(a)
        os.close(b)
        _assert_closed_by_daemon(fe.sock)
    _check_survivors(backend, good, before)
    assert open_fds() == fds_before  # the daemon closed the two fds it received


def _negotiated(sock_path):
    fe = Frontend(sock_path)
    pf = fe.get_protocol_features()
    fe.set_protocol_features(pf)
    fe.set_owner()
    return fe


def _memfd(size, seal=True):
    fd = os.memfd_create("vrdma-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize("case", ["overlap", "past_end_of_file", "unsealed", "gpa_overflow"])
def test_bad_memory_regions(backend, sock_path, good, case):
    before = _errors(backend)
    maps_before = proc_maps_count("memfd:vrdma-test")
    fe = _negotiated(sock_path)
    fd = _memfd(1 << 20, seal=case != "unsealed")
    try:
        if case == "overlap":
            send = lambda d: fe._send(R.ADD_MEM_REG, SingleMemRegion(d).encode(), [fd])
            send(MemRegionDesc(0, 1 << 20, 0x10000000, 0))
            with pytest.raises(ReplyError):
                send(MemRegionDesc(0x80000, 1 << 20, 0x20000000, 0))
        elif case == "past_end_of_file":
            with pytest.raises(ReplyError):
                fe._send(R.ADD_MEM_REG, SingleMemRegion(MemRegionDesc(0, 2 << 20, 0x1000, 0)).encode(), [fd])
        elif case == "unsealed":
            with pytest.raises(ReplyError):
                fe._send(R.ADD_MEM_REG, SingleMemRegion(MemRegionDesc(0, 1 << 20, 0x1000, 0)).encode(), [fd])
        else:  # the codec rejects it: no ack, the connection just closes
            payload = struct.pack("<QQQQQ", 0, 2**64 - 4096, 1 << 20, 0, 0)
            send_message(fe.sock, Message(R.ADD_MEM_REG, VERSION | FLAG_NEED_REPLY, payload, [fd]))
        _assert_closed_by_daemon(fe.sock)
    finally:
        os.close(fd)
        fe.close()
    _check_survivors(backend, good, before)
    assert proc_maps_count("memfd:vrdma-test") == maps_before


def test_ring_outside_guest_memory(backend, sock_path, good):
    before = _errors(backend)
    fe = _negotiated(sock_path)
    fd = _memfd(1 << 20)
    kick = os.eventfd(0)
    try:
        fe._send(R.ADD_MEM_REG, SingleMemRegion(MemRegionDesc(0, 1 << 20, 0x40000000, 0)).encode(), [fd])
        fe.set_vring_num(0, 64)
        fe.set_vring_addr(0, desc=0x40000000 + (1 << 20) - 16, used=0x40001000, avail=0x40002000)
        with pytest.raises(ReplyError):
            fe.set_vring_kick(0, kick)
        _assert_closed_by_daemon(fe.sock)
    finally:
        os.close(fd)
        os.close(kick)
        fe.close()
    _check_survivors(backend, good, before)


# --- corrupt rings: set up properly, then write bad descriptors -----------

def _desc(dev, q, i, addr, length, flags=0, nxt=0):
    struct.pack_into("<QIHH", dev.translate(q.desc_gpa + 16 * i, 16), 0, addr, length, flags, nxt)


def _publish(dev, q, heads, idx=None):
    avail = dev.translate(q.avail_gpa, 4 + 2 * q.size)
    cur = struct.unpack_from("<H", avail, 2)[0]
    for k, h in enumerate(heads):
        struct.pack_into("<H", avail, 4 + 2 * ((cur + k) % q.size), h)
    struct.pack_into("<H", avail, 2, (cur + len(heads)) & 0xFFFF if idx is None else idx)


NEXT, WRITE, INDIRECT = 1, 2, 4


@pytest.mark.parametrize("case", ["addr_outside", "len_outside", "loop", "too_long_indirect",
                                  "avail_jump", "head_out_of_range", "read_after_write"])
def test_corrupt_ring_closes_connection(backend, sock_path, good, case):
    before = _errors(backend)
    dev = VirtioUserDevice(sock_path, queue_size=16, device_features=BlkDriver.FEATURES)
    try:
        q = dev.queues[0]
        buf = dev.alloc(4096)
        mem_end = 16 << 20
        if case == "addr_outside":
            _desc(dev, q, 0, 1 << 40, 16)
            _publish(dev, q, [0])
        elif case == "len_outside":
            _desc(dev, q, 0, mem_end - 8, 16)
            _publish(dev, q, [0])
        elif case == "loop":
            _desc(dev, q, 0, buf, 16, NEXT, 1)
            _desc(dev, q, 1, buf, 16, NEXT, 0)
            _publish(dev, q, [0])
        elif case == "too_long_indirect":
            n = 1100  # more than the 1024 entries a chain may have (QEMU's VIRTQUEUE_MAX_SIZE)
            table = dev.alloc(16 * n, 16)
            tv = dev.translate(table, 16 * n)
            for i in range(n):
                struct.pack_into("<QIHH", tv, 16 * i, buf, 16, NEXT if i < n - 1 else 0, i + 1)
            _desc(dev, q, 0, table, 16 * n, INDIRECT)
            _publish(dev, q, [0])
        elif case == "avail_jump":
            _desc(dev, q, 0, buf, 16)
            _publish(dev, q, [0], idx=q.size + 1)
        elif case == "head_out_of_range":
            _publish(dev, q, [q.size + 3])
        elif case == "read_after_write":
            _desc(dev, q, 0, buf, 16, NEXT | WRITE, 1)
            _desc(dev, q, 1, buf + 16, 16, 0)
            _publish(dev, q, [0])
        dev.kick(0)
        _assert_closed_by_daemon(dev.frontend.sock)
    finally:
        dev.close()
    _check_survivors(backend, good, before)
    errs = backend.metrics().last_errors
    assert any("VirtqueueError" in e or "GuestMemoryError" in e for e in errs), errs


def test_requests_after_close_fail_cleanly(backend, sock_path):
    fe = Frontend(sock_path)
    s = fe.sock
    s.sendall(struct.pack("<III", 9999, 1, 0))
    _assert_closed_by_daemon(s)
    with pytest.raises(VhostUserError):
        fe.get_features()
    fe.close()
