"""A daemon that dies (kill -9) is noticed at once by its guests (#12 item 6).

The real ``vrdma backend`` runs as a subprocess; guests use guest_lib in
threads of this process, each its own Context (own vhost-user connection,
memfd and eventfds). While guests block in a poll helper, loop on control
commands, wait for CQ or async events, or sit idle, the daemon gets SIGKILL:
every one of them must fail with RDMAError(ENOTCONN) within 1 s of the kill
(a bound on failure detection; the measured delays are printed). Then the
dead Contexts close without error, giving back every fd and mapping, and a
new Context on a daemon restarted at the same path does a loopback SEND.
"""
from __future__ import annotations

import errno
import gc
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from guest_lib import CQ, MR, PD, QP, SGE, Context, QPCap, QPInitAttr, RDMAError, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint, connect_pair, poll_cq
from virtio.memory import proc_maps_count
from verbs import SendFlags, WcStatus, WrOpcode

#: seconds from the kill to each guest's error: 30-60 ms measured with a load of 8 on the shared
#: 2 vCPUs (the liveness check runs every 20 ms); the wrong paths wait out a timeout (the 5 s
#: poll, the transport's 10 s) or for ever, so 3 s tells them apart with room for a stalled guest
BOUND = 3.0
MODES = [pytest.param((), id="kicked"), pytest.param(("--poll-us", "20000"), id="poll-us")]


class Daemon:
    """``vrdma backend`` at a fixed socket path, killable and restartable there."""

    def __init__(self, path: str, args=()):
        self.path, self.args, self.proc = path, tuple(args), None
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        if os.path.exists(self.path):  # a killed daemon leaves its socket file behind
            os.unlink(self.path)
        self.proc = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "--socket", self.path, *self.args],
                                     stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):  # the server renames its socket into place once it listens
            assert self.proc.poll() is None, f"vrdma backend exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "vrdma backend did not start listening"
            time.sleep(0.02)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time just before the signal."""
        t = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(params=MODES)
def daemon(request, tmp_path):
    d = Daemon(str(tmp_path / "vrdma.sock"), request.param)
    yield d
    d.stop()


class Guest(threading.Thread):
    """Runs ``body`` (which blocks until the daemon dies); records the
    exception and when it was raised. ``ready`` is set just before it blocks."""

    def __init__(self, name, body):
        super().__init__(name=name, daemon=True)
        self.body, self.ready = body, threading.Event()
        self.error: BaseException | None = None
        self.failed_at: float | None = None

    def run(self):
        try:
            self.body(self.ready)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.failed_at = time.monotonic()
            self.error = e


def _loopback_send(path: str) -> None:
    """Two guests of the daemon at ``path``: one RC SEND, checked byte for byte."""
    with RcEndpoint(path, 1 << 16, cap=QPCap(16, 16, 1, 1, 64), mem_size=16 << 20) as a, \
            RcEndpoint(path, 1 << 16, cap=QPCap(16, 16, 1, 1, 64), mem_size=16 << 20) as b:
        connect_pair(a, b)
        b.qp.post_recv(RecvWR(wr_id=9, sg=[SGE(b.mr.buf, 4096, b.mr.lkey)]))
        a.mr.write(b"after the restart")
        a.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[SGE(a.mr.buf, 17, a.mr.lkey)],
                              send_flags=SendFlags.SIGNALED))
        assert a.poll_one().wr_id == 1
        wc = b.poll_one()
        assert (wc.wr_id, wc.status, wc.byte_len) == (9, WcStatus.SUCCESS, 17)
        assert b.mr.read(17) == b"after the restart"


def _assert_gone(e: BaseException | None) -> None:
    assert isinstance(e, RDMAError), repr(e)
    assert e.errno == errno.ENOTCONN, e


def _baseline() -> None:
    """Before a baseline count: earlier tests' garbage must not close its fds
    in the middle of this test. (No collection before the final counts: what
    close() leaves to the garbage collector counts as a leak.)"""
    gc.collect()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_blocked_guests_fail_within_a_second_and_a_restarted_daemon_serves(daemon):
    _baseline()
    fds0, guest_maps0 = _fds(), proc_maps_count("vrdma-guest")
    # (a) a poll helper waiting for a receive that will never complete
    a, b = RcEndpoint(daemon.path, 1 << 16), RcEndpoint(daemon.path, 1 << 16)
    connect_pair(a, b)
    b.qp.post_recv(RecvWR(wr_id=1, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))
    # (b) a control command loop; (c) CQ event and async event waits
    ctx_b, ctx_c, ctx_d = Context(daemon.path), Context(daemon.path), Context(daemon.path)
    cq_c = CQ(ctx_c, 16)
    cq_c.req_notify()
    contexts = [a.ctx, b.ctx, ctx_b, ctx_c, ctx_d]

    def poll_helper(ready):
        ready.set()
        b.poll_one(timeout=120)

    def poll_cq_helper(ready):
        ready.set()
        poll_cq(a.cq, 1, timeout=120)

    def command_loop(ready):
        while True:
            ctx_b.query_device()
            ready.set()

    def cq_event(ready):
        ready.set()
        cq_c.get_event()  # no timeout: only the daemon's death can end it

    def async_event(ready):
        ready.set()
        ctx_d.get_async_event(timeout=120)

    guests = [Guest(n, f) for n, f in [("poll_one", poll_helper), ("poll_cq", poll_cq_helper),
                                       ("command loop", command_loop), ("get_event", cq_event),
                                       ("get_async_event", async_event)]]
    for g in guests:
        g.start()
    for g in guests:
        assert g.ready.wait(30), g.name
    time.sleep(0.2)  # let them reach their waits
    assert all(g.is_alive() for g in guests), [(g.name, g.error) for g in guests]
    t_kill = daemon.kill()
    for g in guests:
        g.join(30)
        assert not g.is_alive(), f"{g.name} still blocked after the daemon was killed"
    delays = {g.name: round((g.failed_at - t_kill) * 1000, 1) for g in guests}
    print(f"\n{daemon.args or 'kicked'}: kill -> RDMAError(ENOTCONN), ms: {delays}")
    for g in guests:
        _assert_gone(g.error)
        assert g.failed_at - t_kill < BOUND, (g.name, delays)
    # everything after that fails the same way, without waiting
    for call in (ctx_b.query_device, lambda: PD(ctx_b), lambda: CQ(ctx_b, 8), cq_c.req_notify,
                 lambda: cq_c.get_event(5), lambda: ctx_d.get_async_event(5), lambda: b.cq.poll(),
                 lambda: b.qp.post_recv(RecvWR(wr_id=2, sg=[SGE(b.mr.buf, 64, b.mr.lkey)]))):
        with pytest.raises(RDMAError) as ei:
            call()
        _assert_gone(ei.value)
    assert all(c.dead for c in contexts)
    # closing dead Contexts: no error, every fd and guest mapping back
    a.close(), b.close()
    for c in contexts:
        c.close()
        assert c.closed
    assert (_fds(), proc_maps_count("vrdma-guest")) == (fds0, guest_maps0)
    daemon.start()
    _loopback_send(daemon.path)


def test_idle_guest_fails_at_its_next_call_and_releases_everything(daemon):
    _loopback_send(daemon.path)  # warm up: imports, allocator arenas
    _baseline()
    fds0, maps0, guest_maps0 = _fds(), _maps(), proc_maps_count("vrdma-guest")
    ctx = Context(daemon.path)
    pd = PD(ctx)
    mr = MR(pd, 1 << 16)
    cq = CQ(ctx, 16)
    qp = QP(pd, QPInitAttr(scq=cq, rcq=cq, cap=QPCap(8, 8, 1, 1, 0)))
    gid = ctx.query_gid()
    from guest_lib.endpoint import connect_qp, new_psn
    psn = new_psn()
    connect_qp(qp, qp.qp_num, gid.raw, rq_psn=psn, sq_psn=psn)  # connected to itself: posts are legal
    assert _fds() > fds0 and proc_maps_count("vrdma-guest") > guest_maps0
    t_kill = daemon.kill()
    time.sleep(0.3)  # idle: nobody is looking at the socket
    calls = {
        "query_device": ctx.query_device,
        "PD": lambda: PD(ctx),
        "MR": lambda: MR(pd, 4096),
        "CQ": lambda: CQ(ctx, 8),
        "QP": lambda: QP(pd, QPInitAttr(scq=cq, rcq=cq)),
        "post_send": lambda: qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND,
                                                 sg=[SGE(mr.buf, 8, mr.lkey)])),
        "post_recv": lambda: qp.post_recv(RecvWR(wr_id=2, sg=[SGE(mr.buf, 8, mr.lkey)])),
        "get_event": lambda: cq.get_event(),
        "get_async_event": lambda: ctx.get_async_event(),
    }
    errors = []  # kept: their tracebacks keep the half-made objects alive until the close below
    for name, call in calls.items():
        with pytest.raises(RDMAError) as ei:
            call()
        _assert_gone(ei.value)
        errors.append(ei)
    # a busy-poll loop on the empty CQ ends too (the socket is looked at
    # once per LIVENESS_INTERVAL, not per poll)
    with pytest.raises(RDMAError) as ei:
        while True:
            cq.poll()
    _assert_gone(ei.value)
    assert time.monotonic() - t_kill < 0.3 + BOUND
    ctx.close()  # children and all: never raises on a dead daemon
    assert all(o.closed for o in (qp, cq, mr, pd, ctx))
    assert (_fds(), _maps(), proc_maps_count("vrdma-guest")) == (fds0, maps0, guest_maps0)
    daemon.start()
    _loopback_send(daemon.path)


def test_close_right_after_the_kill(daemon):
    """Nobody has looked yet: the first destroy command of close() is what
    finds the daemon gone; close() still completes, without an error."""
    _loopback_send(daemon.path)
    _baseline()
    fds0, guest_maps0 = _fds(), proc_maps_count("vrdma-guest")
    ep = RcEndpoint(daemon.path, 1 << 16)
    ep.connect(ep.info())  # looped back to itself
    daemon.kill()
    assert not ep.ctx.dead
    ep.close()
    assert ep.ctx.closed and ep.qp.closed and ep.mr.closed and ep.cq.closed and ep.pd.closed
    assert (_fds(), proc_maps_count("vrdma-guest")) == (fds0, guest_maps0)


def test_busy_poll_of_empty_cq_notices_the_kill(daemon):
    """A guest spinning on CQ.poll() itself (as rc-pingpong and perftest do)."""
    with RcEndpoint(daemon.path, 1 << 16) as ep:
        n = 0
        t_kill = None
        with pytest.raises(RDMAError) as ei:
            while True:
                ep.cq.poll()
                n += 1
                if n == 1000:
                    t_kill = daemon.kill()
        delay = time.monotonic() - t_kill
        _assert_gone(ei.value)
        print(f"\n{daemon.args or 'kicked'}: busy CQ.poll noticed the kill after {delay * 1000:.1f} ms, "
              f"{n - 1000} empty polls")
        assert delay < BOUND


@pytest.fixture
def many_fds():
    """~1100 open fds, so every fd the guest opens afterwards is above 1024
    (beyond what select() can watch)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        if hard != resource.RLIM_INFINITY and hard < 4096:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to open 1100 fds")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fds_above_1024(daemon, many_fds):
    assert max(many_fds) > 1024
    _loopback_send(daemon.path)
    with Context(daemon.path) as ctx:
        assert min(ctx.transport.device.call_fds + ctx.transport.device.kick_fds + [ctx.transport.device.frontend.sock.fileno()]) > 1024
        cq = CQ(ctx, 8)
        cq.req_notify()
        assert cq.get_event(0.05) is False  # a timed wait on fds select() cannot take
        assert ctx.get_async_event(0.05) is None
        ctx.query_device()

        def wait(ready):
            ready.set()
            cq.get_event()

        g = Guest("get_event", wait)
        g.start()
        assert g.ready.wait(30)
        time.sleep(0.2)
        t_kill = daemon.kill()
        g.join(30)
        assert not g.is_alive()
        _assert_gone(g.error)
        assert g.failed_at - t_kill < BOUND


@pytest.mark.parametrize("events", [False, True], ids=["poll", "events"])
def test_rc_pingpong_exits_cleanly_when_the_daemon_dies(daemon, events):
    """``vrdma rc-pingpong`` (no --timeout: it would wait for ever) mid-run:
    both sides exit 1 with rc_pingpong's message instead of hanging."""
    from tests.rc_pingpong.conftest import free_port, wait_listening

    port = free_port()
    cmd = [sys.executable, "-m", "vrdma", "rc-pingpong", "--backend", daemon.path, "-p", str(port),
           "-n", "100000000", "-s", "64"] + (["-e"] if events else [])
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [srv]
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        procs.append(subprocess.Popen(cmd + ["localhost"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        for p in procs:  # both printed both addresses: the ping-pong is running
            assert p.stdout.readline().startswith("  local address:")
            assert p.stdout.readline().startswith("  remote address:")
        time.sleep(0.3)
        daemon.kill()
        for p in procs:
            _, err = p.communicate(timeout=20)
            assert p.returncode == 1, err
            # whichever verb noticed first (the poll, the CQ event wait, the next post), as rc_pingpong says it
            assert err.splitlines()[-1].startswith(("poll CQ failed", "Failed to get cq_event", "parse WC failed",
                                                    "Couldn't post send", "Couldn't request CQ notification")), err
            assert "Errno: 107" in err and "Traceback" not in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_perftest_pair_reports_the_dead_daemon(tmp_path):
    """vrdma.perftest's two guest processes mid-run: the run ends with the
    device's error instead of waiting out its 300 s."""
    from vrdma.perftest import run_pair

    d = Daemon(str(tmp_path / "vrdma.sock"))

    def daemon_sockets() -> int:
        fd_dir = f"/proc/{d.proc.pid}/fd"
        return sum(1 for n in os.listdir(fd_dir) if os.readlink(os.path.join(fd_dir, n)).startswith("socket:"))

    try:
        idle = daemon_sockets()

        def body(ready):
            ready.set()
            run_pair(d.path, "send_lat", 64, 10 ** 9)

        g = Guest("perftest", body)
        g.start()
        assert g.ready.wait(30)
        deadline = time.monotonic() + 60
        while daemon_sockets() < idle + 2:  # both guests' connections accepted
            assert g.is_alive() and time.monotonic() < deadline, g.error
            time.sleep(0.05)
        time.sleep(0.5)  # their setup done: in the latency loop
        assert g.is_alive(), g.error
        t_kill = d.kill()
        g.join(30)
        assert not g.is_alive(), "run_pair still waiting after the daemon was killed"
        assert isinstance(g.error, RuntimeError) and "Errno: 107" in str(g.error), repr(g.error)
        print(f"\nperftest pair: kill -> RuntimeError after {(g.failed_at - t_kill) * 1000:.0f} ms")
    finally:
        d.stop()


class Relay(threading.Thread):
    """A vhost-user man in the middle: forwards bytes and SCM_RIGHTS fds
    between one guest connecting at ``path`` and the daemon at ``daemon_path``,
    chunk for chunk (a chunk that carries fds stays one sendmsg). The test can
    write to the guest behind the daemon's back, or hang up on the guest."""

    def __init__(self, path: str, daemon_path: str):
        super().__init__(daemon=True)
        import socket

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.daemon_path = daemon_path
        self.guest = None
        self.connected = threading.Event()
        self.stop_r, self.stop_w = os.pipe()

    def run(self):
        import array
        import selectors
        import socket

        self.guest, _ = self.listener.accept()
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(self.daemon_path)
        self.connected.set()
        peer = {self.guest.fileno(): back, back.fileno(): self.guest}
        with selectors.DefaultSelector() as sel:
            sel.register(self.guest, selectors.EVENT_READ)
            sel.register(back, selectors.EVENT_READ)
            sel.register(self.stop_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self.stop_r:
                        back.close()
                        return
                    try:
                        data, anc, _, _ = key.fileobj.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
                    except OSError:
                        data, anc = b"", []
                    if not data:
                        back.close()
                        return
                    fds = array.array("i")
                    for level, kind, raw in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                    try:
                        peer[key.fileobj.fileno()].sendmsg(
                            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())] if fds else [])
                    finally:
                        for fd in fds:
                            os.close(fd)

    def close(self):
        os.write(self.stop_w, b"x")
        self.join(10)
        for s in (self.guest, self.listener):
            if s is not None:
                s.close()
        os.close(self.stop_r), os.close(self.stop_w)


@pytest.mark.parametrize("how", ["unsolicited bytes", "hang-up, daemon alive"])
def test_a_broken_connection_is_a_dead_device_too(daemon, tmp_path, how):
    """Bytes nobody asked for on the vhost-user socket (the back-end sends
    nothing between requests), or a connection closed while the daemon lives
    on: the waiting guest fails with ENOTCONN at once, and the daemon serves
    a new Context."""
    _baseline()
    fds0 = _fds()
    relay = Relay(str(tmp_path / "relay.sock"), daemon.path)
    relay.start()
    try:
        ctx = Context(str(tmp_path / "relay.sock"))
        cq = CQ(ctx, 8)
        cq.req_notify()
        ctx.query_device()  # the relay carries the device

        def wait(ready):
            ready.set()
            cq.get_event()

        g = Guest("get_event", wait)
        g.start()
        assert g.ready.wait(30)
        time.sleep(0.2)
        t = time.monotonic()
        if how == "unsolicited bytes":
            relay.guest.send(b"\x01\x00\x00\x00")
        else:
            relay.guest.shutdown(2)
        g.join(30)
        assert not g.is_alive()
        _assert_gone(g.error)
        assert g.failed_at - t < BOUND
        said = str(g.error)
        assert ("unsolicited" in said) if how == "unsolicited bytes" else ("hung up" in said or "closed" in said), said
        ctx.close()
    finally:
        relay.close()
    assert _fds() == fds0  # the Context's and the relay's
    _loopback_send(daemon.path)
