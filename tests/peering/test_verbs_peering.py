"""Peer links over a real verbs device (RDMA CM), on kernel rxe (issue #14, item 4).

Two ``vrdma backend --fabric verbs`` daemons share one RDMA device, each on
its own address of the device's netdev (``VRDMA_VERBS_ADDRS=A,B``), and
ship accelerator jobs to each other over :class:`peering.verbs_link.VerbsPeerLink`:
RC QPs of the device connected by RDMA CM, the job descriptor a SEND, the
input and the output RDMA WRITEs into per-job MRs. Guests are this test
process over the daemons' unix sockets (guest_lib); results are compared
with accel_core called here (FFT byte-exact, Turbo bit-exact). Then a peer
daemon killed with jobs on it, and, in this process, two links on the
device whose peer uses a wrong, read-only or abandoned window's key.

These tests need an RDMA device and two addresses on it, and skip, saying
so, where there is none (this CI host's kernel has no RDMA):
``qemu_tests/test_verbs_peering.py`` runs them in a kernel-rxe guest.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

import accel_core
from fabric.hca import rdma_devices
from guest_lib import CQ, MR, PD, SGE, Context, accel
from guest_lib.aq import AQ, AccelWR
from verbs import Access, WcStatus
from vhost_user.testing import DaemonProcess
from virtio_rdma.constants import AccelOp, AccelStatus, AqFlags

DEVICES = rdma_devices()
DEV = os.environ.get("VRDMA_VERBS_DEVICE") or (DEVICES[0] if DEVICES else None)
ADDRS = [a for a in os.environ.get("VRDMA_VERBS_ADDRS", "").split(",") if a]
needs_device = pytest.mark.skipif(
    DEV is None or len(ADDRS) != 2,
    reason="needs an RDMA device (kernel rxe or an RDMA NIC; pyverbs lists none here) and two "
           "addresses on its netdev in VRDMA_VERBS_ADDRS=A,B; qemu_tests/test_verbs_peering.py "
           "runs these in a kernel-rxe guest")
C64 = np.dtype(np.complex64)
#: the links' defaults (peering.link.LinkConfig): 7 x 67 ms ACK timeouts, keepalive 0.25 s
RETRY_BUDGET = 7 * 4.096e-6 * 2**14
KEEPALIVE = 0.25


def test_connect_request_hello_round_trips_and_refuses_garbage():
    """The REQ's private data (pure codec; runs everywhere): it fits a REQ, round-trips
    both families, and names what is wrong with a forged or truncated one."""
    from peering.verbs_link import HELLO_SIZE, REQ_PRIVATE_DATA, ReqHello
    from peering.wire import PeerWireError

    assert HELLO_SIZE <= REQ_PRIVATE_DATA
    for addr in ("192.0.2.7", "2001:db8::5"):
        h = ReqHello(0x1234_5678_9ABC_DEF0, 7, addr)
        raw = h.encode()
        assert len(raw) == HELLO_SIZE
        assert ReqHello.decode(raw + bytes(REQ_PRIVATE_DATA - len(raw))) == h  # CM pads it
    raw = ReqHello(1, 1, "192.0.2.7").encode()
    cases = {"length": raw[:-1], "magic/reserved": b"XXXX" + raw[4:], "version": raw[:4] + b"\x09" + raw[5:],
             "family": raw[:5] + b"\x05" + raw[6:], "address": raw[:-1] + b"\x01"}
    for field, bad in cases.items():
        with pytest.raises(PeerWireError) as e:
            ReqHello.decode(bad)
        assert e.value.field == field


def test_keyed_handshake_tags_bind_key_address_and_challenge():
    """The authenticated handshake (pure; runs everywhere): each tag checks only with
    the same key, for the listener it was made for, over the exact bytes; the active
    side's last tag covers the passive side's challenge, so a recorded one does not
    answer a new challenge."""
    import secrets

    from peering.verbs_link import (
        CONNECT_SIZE,
        HELLO_SIZE,
        NONCE,
        REP_PRIVATE_DATA,
        REQ_PRIVATE_DATA,
        TAG,
        ReqHello,
        connect_tag,
        derive_link_key,
        open_hello,
        open_reply,
        sealed_hello,
        sealed_reply,
    )
    from peering.wire import PeerWireError

    key, other = derive_link_key(bytes(range(32))), derive_link_key(bytes(32))
    assert key != other and len(key) == 32
    hello = ReqHello(5, 2, "192.0.2.1").encode()
    req = sealed_hello(key, hello, "192.0.2.2")
    assert len(req) == HELLO_SIZE + TAG <= REQ_PRIVATE_DATA
    assert open_hello(key, req + bytes(REQ_PRIVATE_DATA - len(req)), "192.0.2.2") == hello  # CM pads it
    flipped = req[:20] + bytes([req[20] ^ 1]) + req[21:]
    for k, data, me in ((other, req, "192.0.2.2"),          # another cluster's key
                        (key, req, "192.0.2.3"),            # made for another listener
                        (key, flipped, "192.0.2.2"),        # a byte of the hello changed
                        (key, hello, "192.0.2.2"),          # no tag (an unkeyed daemon)
                        (key, hello + bytes(TAG), "192.0.2.2")):
        with pytest.raises(PeerWireError) as e:
            open_hello(k, data, me)
        assert e.value.field == "tag"
    reply, nonce = bytes(range(CONNECT_SIZE)), secrets.token_bytes(NONCE)
    rep = sealed_reply(key, hello, reply, nonce)
    assert len(rep) <= REP_PRIVATE_DATA
    assert open_reply(key, hello, rep + bytes(REP_PRIVATE_DATA - len(rep))) == (reply, nonce)
    for k, h in ((other, hello), (key, ReqHello(5, 3, "192.0.2.1").encode())):  # another attempt's
        with pytest.raises(PeerWireError):
            open_reply(k, h, rep)
    mine = bytes(CONNECT_SIZE)
    t = connect_tag(key, hello, reply, nonce, mine)
    assert len(t) == TAG
    assert t != connect_tag(key, hello, reply, secrets.token_bytes(NONCE), mine)   # a new challenge
    assert t != connect_tag(other, hello, reply, nonce, mine)
    assert t != connect_tag(key, hello, reply, nonce, b"\x01" + mine[1:])


def _c64(shape, seed):
    r = np.random.default_rng(seed)
    return (r.standard_normal(shape) + 1j * r.standard_normal(shape)).astype(C64)


def _daemon(addr: str, peer: str, accelerators: str, metrics: str, *extra: str) -> DaemonProcess:
    return DaemonProcess("--verbs-device", DEV, "--roce-addr", addr, "--peer", peer,
                         "--accelerators", accelerators, "--metrics-file", metrics, *extra, timeout=120)


def _wait_linked(sock: str, timeout: float = 30.0) -> None:
    """Until the daemon behind ``sock`` reaches its peer's FFT."""
    deadline = time.monotonic() + timeout
    with Context(sock, mem_size=1 << 20, timeout=30) as ctx:
        while True:
            fft = {i.op: i for i in ctx.query_accel()}[AccelOp.FFT]
            if fft.reachable_hosts - (1 if fft.local_units else 0) >= 1:  # the peer's, not ours
                return
            assert time.monotonic() < deadline, "the peer link did not come up"
            time.sleep(0.1)


def _poll(cq: CQ, n: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} completions"
        _, wcs = cq.poll(n - len(got))
        got += wcs
        if not wcs:
            time.sleep(0.0005)
    return got


def _rdma_res(kind: str, pid: int) -> list[dict]:
    out = subprocess.run(["rdma", "-j", "-d", "resource", "show", kind], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return [r for r in json.loads(out.stdout or "[]") if r.get("pid") == pid]


@pytest.fixture(scope="class")
def pair(tmp_path_factory):
    """host0 (ADDRS[0], the active side) without accelerators; host1 with FFT and Turbo."""
    d = tmp_path_factory.mktemp("verbs-peering")
    a, b = ADDRS
    with _daemon(b, a, "fft=1,turbo=1", str(d / "h1.json")) as h1, \
            _daemon(a, b, "none", str(d / "h0.json")) as h0:
        _wait_linked(h0.path)  # (host1 reaches no accelerator of host0's: it has none)
        yield h0, h1, d


@needs_device
class TestTwoDaemons:
    """One pair of daemons (class scope: its addresses are free again for the tests below)."""

    def test_a_host_without_accelerators_gets_every_job_done_over_the_device(self, pair):
        """Call-shaped and file-like layers on host0: every job runs on host1 through the
        verbs link, equal to accel_core; host1's own guest runs its jobs at home meanwhile."""
        h0, h1, _ = pair
        with Context(h0.path, mem_size=64 << 20, timeout=30) as ctx, \
                Context(h1.path, mem_size=16 << 20, timeout=30) as ctx1:
            info = {i.op: i for i in ctx.query_accel()}
            assert info[AccelOp.FFT].local_units == 0 and info[AccelOp.FFT].reachable_hosts == 1
            for n in (8, 60, 1024, 1536, 2048):  # power of two, mixed radix, Bluestein
                x = _c64((3, n), n)
                assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
                assert accel.ifft(ctx, x).tobytes() == accel_core.ifft(x).tobytes()
                assert accel.fft(ctx1, x).tobytes() == accel_core.fft(x).tobytes()
            rng = np.random.default_rng(1)
            for K in (40, 1024, 6144):
                bits = rng.integers(0, 2, (2, K), dtype=np.uint8)
                enc = accel.turbo_encode(ctx, bits)
                assert np.array_equal(enc, accel_core.turbo_encode(bits))
                noise = rng.standard_normal(enc.shape)
                llr = ((1 - 2 * enc.astype(np.float32)) * 2 + noise).astype(np.float32)
                got_bits, got_used = accel.turbo_decode(ctx, llr, iterations=6, scaling=0.75)
                want_bits, want_used = accel_core.turbo_decode(llr, iterations=6, scaling=0.75)
                assert np.array_equal(got_bits, want_bits) and np.array_equal(got_used, want_used)
            xs = [_c64((1, 2048), 50 + i) for i in range(6)]
            f = accel.open(ctx, "fft", n=2048, dtype="complex64")
            try:
                for x in xs:
                    f.write(x.tobytes())
                for x in xs:
                    assert f.read() == accel_core.fft(x).tobytes()
            finally:
                f.close()


    def test_verbs_layer_says_host1_ran_them_and_a_bad_output_key_is_refused(self, pair):
        """AQ + CQ.poll on host0: completions name host 1; a job whose output MR lacks
        LOCAL_WRITE is refused before anything goes on the link."""
        h0, _, _ = pair
        with Context(h0.path, mem_size=16 << 20, timeout=30) as ctx:
            pd, cq = PD(ctx), CQ(ctx, 64)
            x = _c64((4, 1024), 9)
            src = MR(pd, x.nbytes, Access.LOCAL_WRITE)
            src.write(x.tobytes())
            outs = [MR(pd, x.nbytes, Access.LOCAL_WRITE) for _ in range(4)]
            ro = MR(pd, x.nbytes, Access(0))
            q = AQ(pd, cq, AccelOp.FFT)
            for i, o in enumerate(outs):
                q.post(AccelWR(wr_id=i, size=1024, batch=4, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                               outputs=[SGE(o.buf, x.nbytes, o.lkey)]))
            q.post(AccelWR(wr_id=9, size=1024, batch=4, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                           outputs=[SGE(ro.buf, x.nbytes, ro.lkey)]))
            wcs = {w.wr_id: w for w in _poll(cq, 5)}
            want = accel_core.fft(x).tobytes()
            for i, o in enumerate(outs):
                assert wcs[i].accel_status is AccelStatus.SUCCESS and wcs[i].host == 1
                assert o.read(x.nbytes) == want
            assert wcs[9].accel_status is not AccelStatus.SUCCESS
            assert ro.read(x.nbytes) == bytes(x.nbytes)


    @pytest.mark.skipif(shutil.which("rdma") is None, reason="no `rdma` tool (iproute2)")
    def test_the_link_is_one_device_qp_each_way_and_job_mrs_are_released(self, pair):
        """``rdma resource show``: each daemon has one RC QP, connected to the other's; the
        MRs registered for jobs are gone once the jobs are."""
        h0, h1, _ = pair
        q0, q1 = _rdma_res("qp", h0.proc.pid), _rdma_res("qp", h1.proc.pid)
        rc0 = [q for q in q0 if q.get("type") == "RC"]
        rc1 = [q for q in q1 if q.get("type") == "RC"]
        assert len(rc0) == 1 and len(rc1) == 1, (q0, q1)
        assert rc0[0]["rqpn"] == rc1[0]["lqpn"] and rc1[0]["rqpn"] == rc0[0]["lqpn"]

        def mrs():
            return len(_rdma_res("mr", h0.proc.pid)), len(_rdma_res("mr", h1.proc.pid))

        before = mrs()
        with Context(h0.path, mem_size=16 << 20, timeout=30) as ctx:
            x = _c64((8, 2048), 4)
            for _ in range(6):
                assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
        deadline = time.monotonic() + 20  # the guest's own MRs go when its device does
        while mrs() != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mrs() == before


    def test_daemons_release_every_kernel_object_at_exit(self, pair):
        """Last of the class: the daemons stop; their links' counters (--metrics-file) say
        every MR registered was deregistered and no QP is left, and job windows were per job."""
        h0, h1, d = pair
        assert h0.close() == 0 and h1.close() == 0
        for name, served in (("h0", False), ("h1", True)):
            m = json.loads((d / f"{name}.json").read_text())
            (peer,) = m["peering"]["peers"].values()
            link = peer["link"]
            assert link["kind"] == "verbs" and link["connects"] == 1, link  # no reset all along
            assert link["live_mrs"] == 0 and link["live_qps"] == 0, link
            assert link["mrs_registered"] == link["mrs_deregistered"]
            if served:  # per job at least the output WRITE's source
                assert peer["jobs_served"] >= 30 and link["mrs_registered"] >= peer["jobs_served"]
            else:  # per job at least its output window and its input WRITE's source
                assert peer["jobs_done"] >= 30 and link["mrs_registered"] >= 2 * peer["jobs_done"]


@needs_device
@pytest.mark.parametrize("fallback", [False, True], ids=["remote-failed", "local-fallback"])
def test_peer_daemon_killed_mid_job(tmp_path, fallback):
    """host1 (slowed) holds host0's jobs and is SIGKILLed: each job completes exactly
    once, REMOTE_FAILED or re-run on host0 (the queue's choice), never a hang; host0's
    other queues keep working; a new host1 is linked again and runs jobs."""
    a, b = ADDRS
    h1 = _daemon(b, a, "fft=1", str(tmp_path / "h1.json"), "--accel-slowdown", "200")
    try:
        with _daemon(a, b, "fft=1", str(tmp_path / "h0.json")) as h0:
            _wait_linked(h0.path)
            with Context(h0.path, mem_size=16 << 20, timeout=30) as ctx:
                pd, cq = PD(ctx), CQ(ctx, 64)
                x = _c64((2, 256), 3)
                src = MR(pd, x.nbytes, Access.LOCAL_WRITE)
                src.write(x.tobytes())
                flags = AqFlags.FORCE_TARGET | (AqFlags.LOCAL_FALLBACK if fallback else 0)
                remote = AQ(pd, cq, AccelOp.FFT, flags=flags, target_host=1)
                pad = 256  # canaries either side of each output: nothing may land outside it
                outs = [MR(pd, x.nbytes + 2 * pad, Access.LOCAL_WRITE) for _ in range(4)]
                for o in outs:
                    o.write(b"\xab" * (x.nbytes + 2 * pad))

                def job(wr_id: int, out: MR, off: int, q: AQ = remote) -> None:
                    q.post(AccelWR(wr_id=wr_id, size=256, batch=2, inputs=[SGE(src.buf, x.nbytes, src.lkey)],
                                   outputs=[SGE(out.buf + off, x.nbytes, out.lkey)]))

                for i, o in enumerate(outs):
                    job(i, o, pad)
                first = _poll(cq, 1)  # host1 runs them slowly: one done, the rest in its hands
                t_kill = time.monotonic()
                h1.proc.kill()
                rest = _poll(cq, 3, timeout=20)
                took = time.monotonic() - t_kill
                wcs = {w.wr_id: w for w in first + rest}
                assert sorted(wcs) == list(range(4))  # each exactly once
                # not a hang: the CM (DISCONNECTED) or the QP (retries exhausted) says it went
                assert took < 2 * RETRY_BUDGET + KEEPALIVE + 5.0, took
                want = accel_core.fft(x).tobytes()
                for i, w in wcs.items():
                    whole = outs[i].read(x.nbytes + 2 * pad)
                    assert whole[:pad] == whole[-pad:] == b"\xab" * pad
                    if w.accel_status is AccelStatus.SUCCESS:
                        assert whole[pad:-pad] == want
                        assert w.host == 1 or (fallback and w.host == 0)
                    else:
                        assert not fallback and w.accel_status is AccelStatus.REMOTE_FAILED
                failed = sum(w.accel_status is AccelStatus.REMOTE_FAILED for w in wcs.values())
                assert (failed == 0 and any(w.host == 0 for w in wcs.values())) if fallback else failed >= 1
                time.sleep(2 * KEEPALIVE)
                assert cq.poll(8)[0] == 0  # nothing delivered twice
                job(100, outs[0], 0, AQ(pd, cq, AccelOp.FFT))  # the guest's other queues work
                (w,) = _poll(cq, 1)
                assert w.accel_status is AccelStatus.SUCCESS and w.host == 0
                if fallback:
                    return
                # host1 comes back (a new daemon): the link is made again, jobs go there
                h1.close()
                h1 = _daemon(b, a, "fft=1", str(tmp_path / "h1b.json"))
                _wait_linked(h0.path)
                job(200, outs[1], 0)
                (w,) = _poll(cq, 1)
                assert w.accel_status is AccelStatus.SUCCESS and w.host == 1
                assert outs[1].read(x.nbytes) == want
    finally:
        h1.close()


# --------------------------------------------------------------------------
# two links in this process: the peer's keys
# --------------------------------------------------------------------------
class _Recorder:
    """The links' owner here: what each reported, in order."""

    def __init__(self):
        self.ups = 0
        self.downs: list[str] = []
        self.done: dict[int, WcStatus] = {}

    def on_up(self, link) -> None:
        self.ups += 1

    def on_down(self, link, reason: str) -> None:
        self.downs.append(reason)

    def on_message(self, link, data: bytes) -> None:
        pass

    def on_send_done(self, link, wr_id: int, status: WcStatus) -> None:
        self.done[wr_id] = status


@needs_device
def test_bad_keys_read_only_and_abandoned_windows_are_refused_by_the_device():
    """A WRITE to a key never opened, a READ of a write-only window, a WRITE past a
    window's end and a WRITE into an abandoned (deregistered) window are each NAKed
    by the device: the writer's QP fails (a remote access error), the link goes down
    on both sides and is made again; the window's memory is never touched."""
    asyncio.run(_bad_keys())


async def _bad_keys() -> None:
    from fabric.hca import VerbsFabric, VerbsFabricService
    from peering.link import LinkConfig, LinkState
    from peering.verbs_link import CmListener, VerbsPeerLink, page_aligned

    a, b = ADDRS
    fa, fb = VerbsFabric(DEV, address=a), VerbsFabric(DEV, address=b)
    services = [VerbsFabricService(fa), VerbsFabricService(fb)]
    for s in services:
        await s.start()
    ra, rb = _Recorder(), _Recorder()
    cfg = LinkConfig(connect_interval=0.05)
    la = VerbsPeerLink(fa, b, ra, incarnation=11, active=True, credits=4, ops=tuple, config=cfg)
    lb = VerbsPeerLink(fb, a, rb, incarnation=22, active=False, credits=4, ops=tuple, config=cfg)
    listener = CmListener(fb, lambda addr: lb if addr == a else None, links=lambda: [lb])
    listener.start()
    links = (la, lb)

    async def until(cond, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, what
            now = time.monotonic()
            for link in links:
                d = link.deadline()
                if d is not None and d <= now:
                    link.on_timer(now)
            await asyncio.sleep(0.002)

    def both_up() -> bool:
        return la.state is LinkState.UP and lb.state is LinkState.UP

    try:
        la.start(time.monotonic())
        await until(both_up, "the link did not come up")
        assert ra.ups == rb.ups == 1 and la.peer_incarnation == 22 and lb.peer_incarnation == 11
        region = page_aligned(3 * 4096)  # the window: its middle page (a job's window is
        window = region[4096:8192]        # a bounce buffer unless its buffer starts on a page)
        key = la.table.open([window], Access.REMOTE_WRITE)
        lb.write(1, [memoryview(b"\x5a" * 100)], key, 10)
        lb.kick(time.monotonic())
        await until(lambda: 1 in rb.done, "the good WRITE did not complete")
        assert rb.done[1] is WcStatus.SUCCESS and region[4106:4206] == b"\x5a" * 100
        assert region[:4106] == bytes(4106) and region[4206:] == bytes(len(region) - 4206)
        assert la.metrics.bounced_windows == 0
        live = la.metrics.live_mrs
        ups = ra.ups
        bad = [("a key never opened", lambda k: lb.write(2, [memoryview(b"\x66" * 8)], k ^ 0x5A5A00, 0)),
               ("a READ of a write-only window", lambda k: lb.read(3, memoryview(bytearray(8)), k, 0)),
               ("a WRITE past the window's end", lambda k: lb.write(4, [memoryview(b"\x66" * 8)], k, 4092))]
        for what, post in bad:
            key = la.table.open([window], Access.REMOTE_WRITE)
            downs = len(rb.downs)
            snapshot = bytes(region)
            post(key)
            lb.kick(time.monotonic())
            await until(lambda d=downs: len(rb.downs) > d, f"{what} did not fail the writer's QP")
            assert "REM_ACCESS_ERR" in rb.downs[-1] or "REM_INV_REQ_ERR" in rb.downs[-1], rb.downs[-1]
            await until(lambda u=ups: both_up() and ra.ups > u, f"the link did not come back after {what}")
            ups = ra.ups
            assert bytes(region) == snapshot, what
        # an abandoned job's window: deregistered at once; the peer's late WRITE is NAKed
        key = la.table.open([window], Access.REMOTE_WRITE)
        la.sink_window(key)
        snapshot = bytes(region)
        downs = len(rb.downs)
        lb.write(5, [memoryview(b"\x77" * 64)], key, 0)
        lb.kick(time.monotonic())
        await until(lambda: len(rb.downs) > downs, "a WRITE into an abandoned window was not refused")
        assert "REM_ACCESS_ERR" in rb.downs[-1], rb.downs[-1]
        assert bytes(region) == snapshot
        await until(lambda: both_up() and ra.ups > ups, "the link did not come back")
        assert lb.metrics.access_naks >= 4
        # each new QP re-registers nothing of a job: only what is open now is live
        assert la.metrics.live_mrs <= live
    finally:
        la.close()
        lb.close()
        listener.close()
        for s in reversed(services):
            await s.aclose()
    for link in links:
        assert link.metrics.live_mrs == 0 and link.metrics.live_qps == 0, link.describe()
        assert link.metrics.mrs_registered == link.metrics.mrs_deregistered


@needs_device
def test_keyed_links_come_up_and_a_daemon_with_another_key_is_refused(tmp_path):
    """``--cluster-key`` on both daemons: the authenticated handshake links them and jobs
    run over the link. Then host0 restarted with another cluster's key never links:
    host1's listener refuses each of its requests before looking at the address the
    hello names (``auth_failures``), and host0 reaches no accelerator."""
    import sys

    a, b = ADDRS
    keys = [str(tmp_path / "k1"), str(tmp_path / "k2")]
    for k in keys:
        subprocess.run([sys.executable, "-m", "vrdma", "keygen", k], check=True, capture_output=True,
                       timeout=60)
    m1, m0, m0b = (str(tmp_path / f"{n}.json") for n in ("h1", "h0", "h0b"))
    with _daemon(b, a, "fft=1", m1, "--cluster-key", keys[0]) as h1:
        with _daemon(a, b, "none", m0, "--cluster-key", keys[0]) as h0:
            _wait_linked(h0.path)
            with Context(h0.path, mem_size=16 << 20, timeout=30) as ctx:
                x = _c64((2, 1024), 11)
                assert accel.fft(ctx, x).tobytes() == accel_core.fft(x).tobytes()
            assert h0.close() == 0
        with _daemon(a, b, "none", m0b, "--cluster-key", keys[1]) as h0b:
            with Context(h0b.path, mem_size=1 << 20, timeout=30) as ctx:
                end = time.monotonic() + 3.0  # its first request goes at once; a connect times out in 2 s
                while time.monotonic() < end:
                    assert {i.op: i for i in ctx.query_accel()}[AccelOp.FFT].reachable_hosts == 0
                    time.sleep(0.2)
            assert h0b.close() == 0
        assert h1.close() == 0
    def metrics(path: str) -> dict:
        with open(path) as f:
            return json.load(f)["peering"]

    listener = metrics(m1)["cm_listener"]
    assert listener["keyed"] and listener["auth_failures"] >= 1, listener
    link0 = next(iter(metrics(m0)["peers"].values()))["link"]
    assert link0["connects"] == 1 and link0["auth_failures"] == 0, link0
    link0b = next(iter(metrics(m0b)["peers"].values()))["link"]
    assert link0b["connects"] == 0 and link0b["reqs_sent"] >= 1, link0b
