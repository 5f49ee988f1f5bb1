"""The main job runs with one command and verifies its data."""
import subprocess
import sys


def test_vrdma_demo_runs_and_verifies():
    r = subprocess.run([sys.executable, "-m", "vrdma", "demo", "--no-perf"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all data verified" in r.stdout
    assert "FETCH_AND_ADD(+5) saw 1000" in r.stdout and "verified 256 KiB" in r.stdout
