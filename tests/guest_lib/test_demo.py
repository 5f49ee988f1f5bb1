"""The main job runs with one command and verifies its data."""
import subprocess
import sys


def test_vrdma_demo_runs_and_verifies():
    r = subprocess.run([sys.executable, "-m", "vrdma", "demo", "--no-perf"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all data verified" in r.stdout
    assert "FETCH_AND_ADD(+5) saw 1000" in r.stdout and "verified 256 KiB" in r.stdout
    # accelerator jobs through the device, checked against accel_core in the guests
    assert "device FFT + inverse FFT of 16 x 2048 complex64" in r.stdout
    assert "bit-exact with accel_core" in r.stdout


def test_vrdma_demo_with_its_perftest_summary():
    """The default run also prints the perftest-style summary against floors."""
    r = subprocess.run([sys.executable, "-m", "vrdma", "demo", "--iters", "50"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all data verified" in r.stdout
    assert "#bytes" in r.stdout and "ratio" in r.stdout and "memcpy" in r.stdout


def test_vrdma_demo_three_hosts_prints_where_each_job_ran():
    """``vrdma demo --hosts 3``: host0 has no accelerators, so every one of its jobs ran on a
    peer and no job ran on it; the jobs forced to a peer ran there; the others went where
    the daemons' scheduler put them; all verified, and each daemon's decisions printed."""
    import re

    import pytest

    from vrdma import lab

    why = lab.available()
    if why:
        pytest.skip(why)
    r = subprocess.run([sys.executable, "-m", "vrdma", "demo", "--hosts", "3"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "24 jobs on 3 hosts, every result equal to accel_core's" in r.stdout
    sections = dict(re.findall(r"^(host\d) \(.*?\): its guest's jobs\n((?:  .*\n)+)", r.stdout, re.M))
    ran = {h: dict((int(j), where) for j, where in re.findall(r"^\s+(\d+)\s+\w+\s+(host\d) ", body, re.M))
           for h, body in sections.items()}
    assert set(ran) == {"host0", "host1", "host2"} and all(len(v) == 8 for v in ran.values())
    assert all("host0" not in v.values() for v in ran.values())   # a host without accelerators
    assert ran["host1"][6] == ran["host1"][7] == "host2"           # the 2 forced to a peer
    assert ran["host2"][6] == ran["host2"][7] == "host1"
    # the daemons' schedulers: host0 decided every one of its jobs (the board's holder)
    assert re.search(r"host0: policy board: 6 decisions \(0 here, 6 remote", r.stdout), r.stdout
