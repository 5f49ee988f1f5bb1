"""The SIMD paths of accel_core's kernels (accel_core.simd): which exist, how one is chosen and
forced, that the per-ISA builds contain the instructions they are named after and no wider ones,
and that every path gives the same answers (Turbo: the same bits; FFT: within the tolerances).

test_fft.py and test_turbo.py run all their tests on every path this CPU has; this file checks the
selection machinery and the cross-path agreement.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import accel_core
from accel_core import dft, simd
from accel_core.errors import ParameterError
from accel_core.turbo import turbo_decode, turbo_encode
from tests.accel.typed import raises_exactly

ROOT = Path(__file__).resolve().parents[2]


def _need(path):
    if path not in simd.available_paths():
        pytest.skip(f"this CPU cannot run the {path} path (available: {simd.available_paths()})")


def test_available_paths_follow_the_cpu_features():
    have = accel_core._fft.cpu_features()
    paths = simd.available_paths()
    assert paths[0] == "scalar" and set(paths) <= set(simd.PATHS)
    assert ("avx2" in paths) == ({"avx2", "fma"} <= have)
    assert ("avx512" in paths) == ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"):
        assert (f in have) <= (f in flags), f   # gcc's check never claims what the kernel hides


@pytest.mark.parametrize("path", simd.PATHS)
def test_each_module_says_what_it_was_built_for(path):
    _need(path)
    for kernel in ("fft", "turbo"):
        assert path == simd.kernel_module(kernel, path).SIMD_PATH
    with simd.forced(path):
        assert simd.simd_path() == path
        assert type(dft._core(64, False, False)).__module__ == simd.kernel_module("fft").__name__


def test_forcing_an_unknown_path_is_refused_naming_it():
    with raises_exactly(ParameterError, match="'sse9'", argument="path", value="sse9"):
        simd.use("sse9")
    with raises_exactly(ParameterError, match="kernel='ldpc'", argument="kernel"):
        simd.kernel_module("ldpc")
    assert simd.simd_path() in simd.available_paths()


@pytest.mark.parametrize("value, ok", [("scalar", True), ("avx2", None), ("avx512", None), ("neon", False)])
def test_environment_variable_forces_the_path(value, ok):
    """VRDMA_SIMD, read at first use in a fresh interpreter."""
    if ok is None:
        ok = value in simd.available_paths()
    code = ("from accel_core import simd, turbo, dft; import numpy as np; "
            "x = np.ones((2, 64), np.complex64); dft.fft(x); print(simd.simd_path())")
    env = dict(os.environ, VRDMA_SIMD=value, PYTHONPATH=str(ROOT))
    cp = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    if ok:
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.strip() == value
    else:
        assert cp.returncode != 0 and "VRDMA_SIMD" in cp.stderr and "ParameterError" in cp.stderr


def test_turbo_decodes_the_same_bits_on_every_path():
    """Fixed point, the same lane count and segments everywhere: bit-exact across paths, in any
    batch, with and without early stop, near the waterfall where decisions are fragile."""
    rng = np.random.default_rng(31)
    K = 6144
    bits = rng.integers(0, 2, (6, K), dtype=np.uint8)
    rate = 1.0 / 3.0
    sigma2 = 1.0 / (2.0 * rate * 10.0 ** (0.45 / 10.0))
    y = 1.0 - 2.0 * turbo_encode(bits).astype(np.float32)
    y += rng.standard_normal(y.shape, dtype=np.float32) * np.float32(np.sqrt(sigma2))
    llr = y * np.float32(2.0 / sigma2)
    small = rng.standard_normal((17, 3, 44)).astype(np.float32) * 2     # K = 40, 17 blocks
    results = {}
    for path in simd.available_paths():
        with simd.forced(path):
            results[path] = (turbo_decode(llr, iterations=6, scaling=0.75),
                             turbo_decode(llr[2], iterations=6, scaling=0.75),
                             turbo_decode(small, iterations=3),
                             turbo_decode(llr, iterations=8, early_stop="crc24b"))
    ref = results["scalar"]
    assert int((ref[0][0] != bits).sum()) > 0       # some frames fail: decisions are fragile here
    for path, got in results.items():
        for (b1, i1), (b2, i2) in zip(got, ref, strict=True):
            assert np.array_equal(b1, b2), path
            assert np.array_equal(np.asarray(i1), np.asarray(i2)), path
        assert np.array_equal(got[1][0], got[0][0][2]), path   # alone == in the batch


@pytest.mark.parametrize("dtype, tol", [(np.complex64, 1e-5), (np.complex128, 1e-12)])
def test_fft_agrees_across_paths(dtype, tol):
    rng = np.random.default_rng(32)
    for n in (12, 128, 1536, 2048, 3072, 4096, 1200, 65536):
        x = (rng.standard_normal((2, n)) + 1j * rng.standard_normal((2, n))).astype(dtype)
        ref = np.fft.fft(x.astype(np.complex128))
        for path in simd.available_paths():
            with simd.forced(path):
                got = dft.fft(x)
                back = dft.ifft(got)
            assert np.abs(got - ref).max() / np.abs(ref).max() <= tol, (path, n)
            assert np.abs(back - x).max() / np.abs(x).max() <= tol, (path, n)


def _disassembly(module) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", module.__file__], capture_output=True,
                          text=True, check=True, timeout=120).stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("kernel", ["fft", "turbo"])
def test_builds_use_their_instruction_sets_and_no_wider_one(kernel):
    """The scalar build runs on any x86-64 (no AVX at all), the AVX2 build has no AVX-512 (no zmm,
    no EVEX mask registers), and the wider builds really use their vectors."""
    scalar = _disassembly(simd.kernel_module(kernel, "scalar"))
    assert "%ymm" not in scalar and "%zmm" not in scalar
    assert not any(line.split("\t")[-1].startswith("v") for line in scalar.splitlines() if "\t" in line)
    if "avx2" in simd.available_paths():
        avx2 = _disassembly(simd.kernel_module(kernel, "avx2"))
        assert "%ymm" in avx2 and "%zmm" not in avx2 and "%k1" not in avx2
    if "avx512" in simd.available_paths():
        avx512 = _disassembly(simd.kernel_module(kernel, "avx512"))
        assert "%zmm" in avx512 or "%k1" in avx512


def test_benchmarks_run_every_path_and_say_which():
    from vrdma.accel_bench.fft_bench import format_table, run_fft_bench
    from vrdma.accel_bench.turbo_bench import run_turbo_bench
    paths = simd.available_paths()
    before = simd.simd_path()
    rows = run_fft_bench(sizes=(16,), dtypes=("complex64",), repeat=1, sample_s=0.001, overhead=False,
                         paths=paths)
    assert [r["simd_path"] for r in rows] == list(paths)
    assert all(r["max_rel_err"] < 1e-5 and r["ours_us"] > 0 for r in rows)
    assert all(f" {p} " in format_table(rows) for p in paths)
    # --against: another schedule's kernel as a same-run baseline, on every path
    rows = run_fft_bench(sizes=(16, 64), dtypes=("complex64",), repeat=1, sample_s=0.001, overhead=False,
                         paths=paths, against=(4, 4))
    assert [r["against"] for r in rows] == [[4, 4]] * len(paths) + [None] * len(paths)
    assert all(r["speedup_vs_against"] > 0 for r in rows[:len(paths)])
    assert "(against 4*4)" in format_table(rows)
    rows = run_turbo_bench(K=40, iterations=1, frames=4, batch=2, commpy_frames=0, repeat=1, ebn0_db=6.0,
                           paths=paths)
    assert [r["simd_path"] for r in rows] == [p for p in paths for _ in (0, 1)]
    assert all(r["bit_errors"] == 0 and r["mbit_s_cpu"] > 0 for r in rows)
    assert simd.simd_path() == before     # the benchmarks put the path back
