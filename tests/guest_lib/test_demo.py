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
