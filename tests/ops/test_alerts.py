"""deploy/prometheus/alerts.yml: promtool checks the rules and runs their unit
tests (alerts_test.yml: series that should and should not fire for each rule);
a rule whose threshold is moved fails them (the tests can fail); the metric
names the rules use are the ones a real daemon exports."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ops.test_prometheus import _workload

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (install.sh installs prometheus)")


def _promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    out = _promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0 and "SUCCESS: 5 rules found" in out.stdout, out.stdout + out.stderr
    out = _promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


@needs_promtool
def test_a_moved_threshold_fails_the_unit_tests(tmp_path):
    rules = (RULES / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.05\n        for: 5m", "> 5\n        for: 5m", 1))
    (tmp_path / "alerts_test.yml").write_text((RULES / "alerts_test.yml").read_text())
    out = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "VrdmaAcceleratorWaitP99High" in out.stdout + out.stderr


def test_the_rules_use_metrics_a_daemon_exports(ops_daemon):
    _workload(ops_daemon.path)
    text = ops_daemon.scrape()
    exported = set(re.findall(r"^(vrdma_\w+?)(?:\{| )", text, re.MULTILINE))
    used = set(re.findall(r"\b(vrdma_\w+)", (RULES / "alerts.yml").read_text()))
    # series that exist only with peers (load table) or after a limit refused something
    conditional = {"vrdma_load_table_present", "vrdma_tenant_limit_rejections_total"}
    assert used - conditional <= exported, used - conditional - exported
    assert conditional <= used
