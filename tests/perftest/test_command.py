"""``vrdma perftest`` end to end: one real back-end daemon (its local fabric),
a server process and a client process, two guests of one host, for each of
the six tests; a ``-a`` sweep with ``--plot``; and peers that break the
exchange (a hostile address message, an old version, a silent peer), which
must end the run with exit status 1 and a message naming the problem,
never a hang."""
import dataclasses
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.rc_pingpong.conftest import free_port, wait_listening
from vhost_user.testing import DaemonProcess
from vrdma.perftest_compat import exchange as X

CMD = [sys.executable, "-m", "vrdma", "perftest"]
LAT_ROW = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                     re.M)
BW_ROW = re.compile(r"^ (\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)
ADDR = re.compile(r"^ (local|remote) address: LID (\S+) QPN (\S+) PSN (\S+)(?: OUT \S+)?"
                  r"(?: RKey (\S+) VAddr (\S+))?\n GID: (\S+)$", re.M)


@pytest.fixture(scope="module")
def backend():
    with DaemonProcess() as d:
        yield d.path


def run_pair(backend, test, args, timeout=120):
    port = free_port()
    base = CMD + [test, "-d", backend, "-p", str(port), "--timeout", "60"] + args
    srv = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        cli = subprocess.run(base + ["127.0.0.1"], capture_output=True, text=True, timeout=timeout)
        so, se = srv.communicate(timeout=timeout)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    return (srv.returncode, so, se), (cli.returncode, cli.stdout, cli.stderr)


def rows(test, text):
    return [(int(r[0]), int(r[1]), [float(v) for v in r[2:]])
            for r in (BW_ROW if test.endswith("_bw") else LAT_ROW).findall(text)]


@pytest.mark.parametrize("test, args, size, iters", [
    ("send_lat", ["-n", "60"], 2, 60),
    ("write_lat", ["-n", "60", "-s", "300"], 300, 60),       # above the inline size
    ("read_lat", ["-n", "40", "-s", "8192"], 8192, 40),
    ("send_bw", ["-n", "300", "-s", "1000"], 1000, 300),     # 1000 B steps through the cycle buffer
    ("write_bw", ["-n", "256", "-s", "2048", "-l", "4"], 2048, 256),  # post lists
    ("write_bw", ["-n", "200", "-s", "1000", "--report_gbits"], 1000, 200),
    ("read_bw", ["-n", "100", "-s", "65536", "-m", "1024"], 65536, 100),
])
def test_six_tests_between_two_guests(backend, test, args, size, iters):
    (src, sout, serr), (crc, cout, cerr) = run_pair(backend, test, args + ["--check", "pattern"])
    report = f"server rc={src}\n{sout}{serr}\nclient rc={crc}\n{cout}{cerr}"
    assert src == 0 and crc == 0, report
    # every check passed, and there were some (pattern: every byte compared)
    checks = re.findall(r"^# check (\w+): (.*)$", sout + cout, re.M)
    assert checks and all(ok == "ok" for ok, _ in checks), report
    # each side's remote address is the other's local one
    s, c = ({m[0]: m[1:] for m in ADDR.findall(t)} for t in (sout, cout))
    assert s["remote"] == c["local"] and c["remote"] == s["local"], report
    assert "Mtu             : 1024[B]" in sout if "-m" in args else "Mtu" in sout
    # the client's row; the bw servers' row (their own for send_bw, the client's report otherwise)
    (cs, ci, cv), = rows(test, cout)
    assert (cs, ci) == (size, iters) and all(v > 0 for v in cv), report
    if test != "read_lat":
        (ss, si, sv), = rows(test, sout)
        assert (ss, si) == (size, iters), report
        if test in ("write_bw", "read_bw"):
            assert sv == cv, report  # the report crossed the side channel intact
    if "--report_gbits" in args:
        assert "BW average[Gb/sec]" in cout and "BW average[Gb/sec]" in sout
    if test.startswith("send"):
        assert f"{iters} messages received, 0 of another length" in (sout if test == "send_bw" else cout)
    # the side channel carried exactly the messages perftest's main() exchanges; the
    # verbs counters match the test's work
    for out, client in ((sout, False), (cout, True)):
        steps = [st for st, _ in X.flow(X.Test(test), client, 1, False)]
        n = {st: steps.count(st) for st in X.Step}
        xchg = n[X.Step.VERSION] + 2 * n[X.Step.SYS_DATA] + n[X.Step.MTU] + n[X.Step.HAND_SHAKE] \
            + 5 * n[X.Step.REPORTS] + n[X.Step.DONE]
        sent = xchg + n[X.Step.DONE]  # "done\0" is never answered
        m = re.search(r"^# counters: side-channel messages sent (\d+), received (\d+); receives completed (\d+); "
                      r"send-queue WRs completed (\d+)$", out, re.M)
        assert m and (int(m[1]), int(m[2])) == (sent, xchg), out
        receives = iters if test == "send_lat" or (test == "send_bw" and not client) else 0
        sq = iters if client or test in ("send_lat", "write_lat") else 0
        assert (int(m[3]), int(m[4])) == (receives, sq), out


def test_all_sizes_with_plot(backend, tmp_path):
    png = tmp_path / "write_lat.png"
    (src, sout, serr), (crc, cout, cerr) = run_pair(backend, "write_lat", ["-a", "-n", "5", "--check", "pattern"])
    assert src == 0 and crc == 0, (sout, serr, cout, cerr)
    assert [r[0] for r in rows("write_lat", cout)] == [1 << i for i in range(1, 24)]
    checks = re.findall(r"^# check (\w+): ", cout, re.M)
    assert len(checks) == 2 * 23 and set(checks) == {"ok"}
    # the plot, from a bandwidth sweep of a few sizes' worth of output
    (src, sout, serr), (crc, cout, cerr) = run_pair(backend, "send_bw", ["-a", "-n", "5", "--plot", str(png)])
    assert src == 0 and crc == 0, (sout, serr, cout, cerr)
    assert len(rows("send_bw", cout)) == 23
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def fake_peer(port, script):
    """A perftest client that follows ``script``: (bytes to send, bytes to read) pairs."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for out, n in script:
            if out:
                s.sendall(out)
            got = b""
            while len(got) < n:
                chunk = s.recv(n - len(got))
                if not chunk:
                    return
                got += chunk


def serve(backend, test, script, extra=()):
    port = free_port()
    srv = subprocess.Popen(CMD + [test, "-d", backend, "-p", str(port), "--timeout", "20", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        fake_peer(port, script)
        so, se = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    return srv.returncode, so, se


PRE = [(X.encode_version(), 16), (X.encode_int(4096), 4), (X.encode_int(64), 4), (b"3\0", 2)]


@pytest.mark.parametrize("script, message", [
    ([(X.encode_version("5.60"), 16)], "older than 5.70"),
    (PRE[:1] + [(X.encode_int(3000), 4), (X.encode_int(64), 4)], "cycle buffer 3000"),
    (PRE + [(b"0000:0080:0000zz" + bytes(92), 108)], "cannot parse address message"),
    (PRE + [(bytes(50), 0)], "closed the channel after 50 of 108 bytes"),
    (PRE[:2], "closed the channel after 0 of 4 bytes"),
])
def test_broken_peer_ends_the_run_naming_the_problem(backend, script, message):
    rc, so, se = serve(backend, "write_bw", script)
    assert rc == 1 and message in se, (so, se)


def test_silent_peer_times_out(backend):
    port = free_port()
    srv = subprocess.Popen(CMD + ["send_lat", "-d", backend, "-p", str(port), "--timeout", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        with socket.create_connection(("127.0.0.1", port), timeout=30):  # connects, then says nothing
            so, se = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert srv.returncode == 1 and "no 16-byte message from the peer within 1 s" in se, (so, se)


def test_client_without_server(backend):
    r = subprocess.run(CMD + ["send_lat", "-d", backend, "-p", str(free_port()), "127.0.0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Couldn't connect to 127.0.0.1" in r.stderr


def test_bad_options(backend):
    r = subprocess.run(CMD + ["write_bw", "-d", backend, "-n", "10", "-l", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "multiple of the post list 3" in r.stderr
    r = subprocess.run(CMD + ["write_bw", "-d", backend, "-m", "1500"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "MTU 1500" in r.stderr
    # the device is opened first, as perftest does: a wrong socket fails before any listening
    r = subprocess.run(CMD + ["write_bw", "-d", backend + ".nowhere", "-p", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Couldn't get context for the device" in r.stderr
    assert "Waiting for client" not in r.stdout
    # a GID index the port does not have
    r = subprocess.run(CMD + ["write_bw", "-d", backend, "-x", "7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "GID index 7" in r.stderr


class _Rogue:
    """A client that follows perftest's exchange but aims its WRITEs ``shift``
    bytes from the start of the window the server published."""

    def __init__(self, shift):
        self.shift = shift

    def __call__(self, session_cls):
        shift = self.shift

        class Rogue(session_cls):
            def _hand_shake(self, n):
                super()._hand_shake(n)
                self.rem = dataclasses.replace(self.rem, vaddr=self.rem.vaddr + shift)

        return Rogue


@pytest.mark.parametrize("shift", [-4096, 65536])
def test_writes_outside_the_published_window_fail(backend, shift):
    """The rkey we publish reaches the window only: a peer writing before it
    (where our send buffer is) or past it gets a remote access error, and our
    server ends the run with exit status 1 when that peer goes away."""
    from vrdma.perftest_compat import oob
    from vrdma.perftest_compat.engine import Params, Resources, Session
    from vrdma.perftest_compat.errors import CompletionError

    port = free_port()
    srv = subprocess.Popen(CMD + ["write_bw", "-d", backend, "-p", str(port), "--timeout", "30", "-n", "8",
                                  "-s", "65536", "--check", "basic"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        params = Params(test=X.Test.WRITE_BW, backend=backend, server="127.0.0.1", iters=8, size=65536,
                        timeout=30)
        res = Resources(params)
        chan = oob.connect("127.0.0.1", port, timeout=30, io_timeout=30)
        rogue = _Rogue(shift)(Session)(params, chan, res, out=open(os.devnull, "w"))
        with pytest.raises(CompletionError, match="REM_ACCESS_ERR"):
            rogue.run()
        so, se = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert srv.returncode == 1 and "closed the channel" in se, (so, se)
