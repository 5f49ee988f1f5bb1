"""The fuzz harness itself can fail: the canary sees one changed byte, the
watchdog stops an input that runs too long, a report with a finding is not
ok and names the seed and index to replay."""
import shutil
import socket
import time

import pytest

from bench.fuzz.common import Canary, Hang, Report, Watchdog
from bench.fuzz.vhost import Daemon


def test_canary_sees_one_byte_outside_allowed_ranges():
    buf = bytearray(64 * 1024)
    v = memoryview(buf)
    c = Canary(v, [(4096, 4096), (10000, 10)])
    assert c.bytes_watched == 64 * 1024 - 4096 - 10
    buf[5000] = 1          # inside an allowed range
    buf[10005] = 1
    assert c.check() == (0, -1)
    buf[4095] = 7          # the guard byte just before the first range
    buf[8192] = 7          # and just after it
    assert c.check() == (2, 4095)


def test_watchdog_bounds_an_input():
    rep = Report("t", seed=7)
    # a bound a loaded machine cannot stall the empty input 4 past (at 0.05 s it could: a
    # Hang there, or input 4 the slowest), and a sleep only a watchdog that never fires sees out
    with Watchdog(0.5, rep) as wd:
        wd.arm()
        with pytest.raises(Hang):
            time.sleep(60)
        wd.disarm(3)
        wd.arm()
        wd.disarm(4)
    assert rep.slowest_input_index == 3 and 0.45 < rep.slowest_input_s < 60


def test_report_names_the_replay():
    rep = Report("control", seed=99)
    assert rep.ok
    rep.fail(1234, "something")
    assert not rep.ok
    assert "--seed 99, input index 1234" in rep.failures[0]
    assert "RESULT FAILED" in rep.summary()
    assert rep.as_dict()["ok"] is False


@pytest.mark.skipif(shutil.which("ss") is None, reason="no ss (iproute2) on this machine")
def test_daemon_diagnose_names_the_epoll_set_and_the_peer(tmp_path):
    """A leaked-fd finding shows whether the fd is in the daemon's epoll set and
    the socket's ss line, whose peer reads ``* 0`` once the peer closed."""
    d = Daemon(str(tmp_path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        before = d.fd_targets()
        s.connect(d.path)
        deadline = time.monotonic() + 30
        new: list[int] = []
        while not new and time.monotonic() < deadline:
            new = [fd for fd, t in d.fd_targets().items() if t.startswith("socket:") and before.get(fd) != t]
            time.sleep(0.01)
        assert len(new) == 1, d.fd_targets()
        while "registered: tfd" not in (text := d.diagnose(new)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f"fd {new[0]} registered: tfd" in text and "ss: u_str ESTAB" in text, text
        assert d.diagnose([9999]).startswith("epoll fd") and "fd 9999 NOT registered" in d.diagnose([9999])
    finally:
        s.close()
        d.close()
