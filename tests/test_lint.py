"""The habits that keep the codebase in shape (issue 13): ruff and mypy pass
on the product packages, and the .pyi stubs of our Cython modules match the
compiled modules (mypy's stubtest).

The configuration is in pyproject.toml ([tool.ruff], [tool.mypy]); the
product packages are the ones [tool.mypy] ``packages`` names, those that
exist. The tools come with the ``test`` extras (install.sh); a machine
without them skips these tests and says so.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Our Cython modules and their stubs; accel_core's kernels are checked with their own allowlist.
STUBBED = ("virtio._memory", "virtio._split", "roce._auth", "roce._codec", "roce._icrc",
           "roce._udpio", "roce.rc._fastrx", "virtio_rdma._datapath", "verbs._check")
ACCEL_STUBBED = ("accel_core._fft", "accel_core._turbo", "accel_core._crc")
ACCEL_ALLOWLIST = ROOT / "tests" / "accel" / "stubtest_allowlist.txt"

# What stubtest reports about a Cython module that no stub should repeat.
STUBTEST_ALLOWLIST = """\
.*\\.__reduce_cython__
.*\\.__setstate_cython__
.*\\.__test__
.*\\.__pyx_capi__
# Mapping implements the buffer protocol in C (__getbuffer__); the stub says so with __buffer__.
virtio\\._memory\\.Mapping\\.__buffer__
# imported into the module for its own use, not part of its interface
roce\\._codec\\.OPCODE_TABLE
"""


def _product_packages() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        names = tomllib.load(f)["tool"]["mypy"]["packages"]
    return [n for n in names if (ROOT / n / "__init__.py").exists()]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it comes with the test extras: pip install -e '.[test]')")


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _report(cp: subprocess.CompletedProcess) -> str:
    return f"exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"


def test_product_packages_are_configured():
    names = _product_packages()
    assert {"vrdma", "virtio", "vhost_user", "virtio_rdma", "roce", "guest_lib"} <= set(names), names


def test_ruff():
    _need("ruff")
    cp = _run("ruff", "check", "--no-cache", *_product_packages())
    assert cp.returncode == 0, _report(cp)


def test_mypy():
    _need("mypy")
    args = []
    for name in _product_packages():
        args += ["-p", name]
    cp = _run("mypy", *args)
    assert cp.returncode == 0, _report(cp)


def test_stubs_match_extensions(tmp_path):
    _need("mypy")
    allow = tmp_path / "stubtest-allowlist.txt"
    allow.write_text(STUBTEST_ALLOWLIST)
    cp = _run("mypy.stubtest", "--concise", "--ignore-disjoint-bases", "--allowlist", str(allow), *STUBBED)
    assert cp.returncode == 0, _report(cp)


def test_accel_core_stubs_match_extensions():
    _need("mypy")
    cp = _run("mypy.stubtest", "--concise", "--ignore-disjoint-bases", "--allowlist", str(ACCEL_ALLOWLIST),
              *ACCEL_STUBBED)
    assert cp.returncode == 0, _report(cp)
