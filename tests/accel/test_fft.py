"""accel_core.dft (fft, ifft, FFTPlan) against numpy.fft: every supported size, both dtypes, batching,
out=/in-place, non-contiguous input, plans, and every kind of bad input.

Every test runs on every SIMD path of the kernel (scalar, avx2, avx512; accel_core.simd) that this
CPU has, with the same tolerances; a path the CPU lacks is skipped, saying which features it lacks.
"""
import threading

import numpy as np
import pytest

from accel_core import dft, simd
from accel_core.errors import DtypeError, LayoutError, ShapeError, UnsupportedSize
from accel_core.dft import FFTPlan, fft, ifft, is_supported, radices_for, supported_sizes
from tests.accel.typed import raises_exactly

TOL = {np.complex64: 1e-5, np.complex128: 1e-12}
DTYPES = [np.complex64, np.complex128]
LTE_NR = (128, 256, 512, 1024, 1536, 2048, 3072, 4096)


@pytest.fixture(autouse=True, params=simd.PATHS)
def simd_path(request):
    """Run the test with the kernels forced to one SIMD path."""
    if request.param not in simd.available_paths():
        pytest.skip(f"this CPU cannot run the {request.param} path (available: {simd.available_paths()})")
    with simd.forced(request.param):
        yield request.param


def _rand(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def _relerr(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------ sizes

def test_supported_sizes_cover_lte_nr_and_powers_of_two():
    sizes = supported_sizes()
    assert list(sizes) == sorted(set(sizes))
    for n in LTE_NR:
        assert n in sizes and is_supported(n)
    for k in range(1, 17):
        assert is_supported(2 ** k)
    assert max(sizes) == 65536
    assert not is_supported(65536 * 2)
    assert not is_supported(7) and not is_supported(1001) and not is_supported(0)
    assert not is_supported(-8) and not is_supported(8.0) and not is_supported(True)
    assert is_supported(np.int64(2048))


@pytest.mark.parametrize("n, radices", [
    (2048, (8, 8, 8, 4)), (1536, (8, 8, 8, 3)), (3072, (8, 8, 4, 4, 3)),
    (4096, (8, 8, 8, 8)), (16, (4, 4)), (2, (2,)), (1, ()), (1200, (4, 4, 5, 5, 3)),
])
def test_radix_schedule(n, radices):
    assert radices_for(n) == radices
    assert int(np.prod(radices)) == n


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_supported_size_matches_numpy(dtype):
    """Forward against numpy.fft.fft (in complex128) and the round trip, all 284 sizes."""
    tol = TOL[dtype]
    for n in supported_sizes():
        rows = 2 if n <= 4096 else 1
        x = _rand((rows, n), dtype, seed=n)
        ref = np.fft.fft(x.astype(np.complex128), axis=-1)
        y = fft(x)
        assert y.dtype == np.dtype(dtype) and y.shape == x.shape
        assert _relerr(y, ref) <= tol, (n, _relerr(y, ref))
        back = ifft(y)
        assert back.dtype == np.dtype(dtype)
        assert _relerr(back, x) <= tol, (n, _relerr(back, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", LTE_NR + (5, 9, 25, 60, 65536))
def test_ifft_matches_numpy(dtype, n):
    x = _rand((2, n), dtype, seed=7)
    ref = np.fft.ifft(x.astype(np.complex128), axis=-1)
    assert _relerr(ifft(x), ref) <= TOL[dtype]


def test_known_transforms():
    n = 2048
    d = np.zeros(n, np.complex128)
    d[0] = 1
    np.testing.assert_allclose(fft(d), np.ones(n), atol=1e-12)
    k0 = 3
    tone = np.exp(2j * np.pi * k0 * np.arange(n) / n)
    spec = fft(tone)
    expect = np.zeros(n, np.complex128)
    expect[k0] = n
    np.testing.assert_allclose(spec, expect, atol=1e-9)
    # ifft of the flat spectrum is the delta (1/n scaling)
    np.testing.assert_allclose(ifft(np.ones(n, np.complex128)), d, atol=1e-15)


def test_size_one_is_identity():
    x = _rand((3, 1), np.complex64)
    np.testing.assert_array_equal(fft(x), x)
    np.testing.assert_array_equal(ifft(x), x)


# ------------------------------------------------------------------ layout

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_batched_1d_2d_3d(dtype):
    x3 = _rand((3, 4, 1536), dtype, seed=1)
    ref = np.fft.fft(x3.astype(np.complex128), axis=-1)
    y3 = fft(x3)
    assert y3.shape == x3.shape
    assert _relerr(y3, ref) <= TOL[dtype]
    y2 = fft(x3.reshape(12, 1536))
    np.testing.assert_array_equal(y2.reshape(3, 4, 1536), y3)
    y1 = fft(x3[1, 2])
    np.testing.assert_array_equal(y1, y3[1, 2])


def test_empty_batch():
    x = np.zeros((0, 256), np.complex64)
    y = fft(x)
    assert y.shape == (0, 256) and y.dtype == np.complex64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_out_and_in_place(dtype):
    x = _rand((4, 2048), dtype, seed=2)
    expect = fft(x)
    out = np.empty_like(x)
    res = fft(x, out=out)
    assert res is out
    np.testing.assert_array_equal(out, expect)
    y = x.copy()
    res = fft(y, out=y)
    assert res is y
    np.testing.assert_array_equal(y, expect)
    res = ifft(y, out=y)
    assert _relerr(y, x) <= TOL[dtype]


def test_out_is_a_view_of_same_memory():
    x = _rand((2, 512), np.complex64)
    expect = fft(x)
    y = x.copy()
    fft(y, out=y[:])  # different object, same memory and strides: in-place
    np.testing.assert_array_equal(y, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_non_contiguous_input_is_copied(dtype):
    big = _rand((6, 2 * 1024), dtype, seed=3)
    x = big[::2, ::2]  # strided rows and columns
    assert not x.flags.c_contiguous
    ref = np.fft.fft(x.astype(np.complex128), axis=-1)
    assert _relerr(fft(x), ref) <= TOL[dtype]
    xt = _rand((1024, 3), dtype).T  # transposed: last axis not contiguous
    assert _relerr(fft(xt), np.fft.fft(xt.astype(np.complex128))) <= TOL[dtype]
    before = big.copy()
    fft(x)
    np.testing.assert_array_equal(big, before)  # input untouched


def test_input_not_modified():
    x = _rand((3, 3072), np.complex128)
    keep = x.copy()
    fft(x)
    ifft(x)
    np.testing.assert_array_equal(x, keep)


def test_list_input_of_complex_is_accepted():
    y = fft([1 + 0j, 2 + 0j, 3 + 0j, 4 + 0j])
    assert y.dtype == np.complex128
    np.testing.assert_allclose(y, np.fft.fft([1, 2, 3, 4]), atol=1e-12)


@pytest.mark.parametrize("n, double, path, radices", [
    (2048, False, "scalar", (8, 4, 4, 4, 4)), (2048, True, "avx512", (4, 8, 4, 4, 4)),
    (2048, True, "avx2", (4, 4, 4, 4, 4, 2)), (2048, True, "scalar", (4, 4, 8, 4, 4)),
    (128, True, "scalar", (4, 4, 4, 2)),
    (4096, False, "avx2", (4, 4, 4, 16, 4)), (4096, False, "avx512", (8, 8, 4, 4, 4)),
    (4096, False, "scalar", (4, 4, 4, 4, 4, 4)), (512, True, "avx2", (4, 4, 4, 8)),
    (512, False, "avx512", (8, 4, 16)), (2048, False, "avx2", (8, 16, 16)),
    (512, True, "scalar", (4, 4, 8, 4)), (256, False, "avx512", (8, 4, 8)), (256, False, "avx2", (4, 4, 16)),
    (768, False, "avx512", (4, 4, 4, 4, 3)), (128, False, "avx2", (8, 4, 4)),
    (4096, True, "scalar", (4, 4, 4, 4, 4, 4)),
    (1536, True, "scalar", (4, 4, 4, 4, 2, 3)), (1536, False, "avx2", (8, 4, 4, 4, 3)),
    (1536, True, "avx2", (8, 4, 4, 4, 3)), (1536, True, "avx512", (4, 8, 4, 4, 3)),
    (3072, False, "avx2", (4, 4, 4, 4, 4, 3)), (3072, False, "avx512", (8, 8, 4, 4, 3)),
    (3072, True, "avx2", (4, 4, 4, 4, 4, 3)),
    (1200, False, "scalar", (4, 4, 5, 5, 3)),
    (16, True, "avx2", (4, 4)), (32, False, "scalar", (8, 4)), (32, True, "scalar", (4, 4, 2)),
    (24, True, "avx512", (8, 3)), (12, False, "scalar", (4, 3)), (6, True, "scalar", (3, 2)),
    (2, True, "scalar", (2,)), (1, False, "avx2", ()),
    (128, False, "avx512", (8, 16)), (1024, False, "avx512", (8, 8, 16)), (1024, True, "avx512", (8, 8, 16)),
    (2048, False, "avx512", (8, 16, 16)), (128, True, "avx512", (8, 16)),
    (1024, True, "avx2", (4, 4, 4, 16)), (1024, False, "avx2", (4, 4, 4, 16)),
    (128, True, "avx2", (4, 4, 8)), (256, True, "avx2", (4, 4, 16)), (256, True, "avx512", (4, 4, 16)),
    (512, False, "avx2", (8, 4, 16)), (512, True, "avx512", (8, 4, 16)), (256, True, "scalar", (4, 4, 4, 4)),
])
def test_kernel_schedule(n, double, path, radices):
    assert dft.schedule_for(n, double, path) == radices


def test_kernel_schedules_factor_every_size():
    for n in supported_sizes():
        for double in (False, True):
            for path in simd.PATHS:
                sched = dft.schedule_for(n, double, path)
                assert int(np.prod(sched)) == n, (n, sched)
                assert sorted(r for r in sched if r % 2) == sorted(r for r in radices_for(n) if r % 2)
                strides = np.cumprod((1, *sched))[:-1]
                # a radix-8 stage only where it has its own loops (s = 1, 4, 8, 16; a last
                # one on the wide paths: the explicit loop, s a multiple of the vector width)
                eights = [s for r, s in zip(sched, strides, strict=True) if r == 8]
                if path != "scalar" and len(sched) >= 2 and sched[-1] == 8:
                    assert strides[-1] % (4 if double else 8) == 0, (n, sched)
                    eights.pop()
                assert len(sched) < 2 or all(s in (1, 4, 8, 16) for s in eights), sched
                # a radix-16 stage never first; a middle one only where it runs in registers
                # (csrc/fft_mid16.h: the wide paths, s = 8 ... 128 and whole vectors)
                assert sched[:1] != (16,), sched
                # or, named in dft._BLOCKED16, as the blocked radix-4 pair
                for r, s in zip(sched[1:-1], strides[1:-1], strict=True):
                    assert r != 16 or (path != "scalar" and s in (8, 16, 32, 64, 128)) or \
                        (path, n, double) in dft._BLOCKED16, (n, sched)


#: schedules that run every stage variant of the kernel: each radix fused first (s = 1) and
#: fused last, at s = 4, 8, 16 (the compile-time loops) and in the generic loop; a last
#: radix-8 stage (split + join); single stages; both directions, both precisions
STAGE_VARIANTS = [
    (2048, (8, 8, 8, 4)), (2048, (4, 8, 4, 4, 4)), (2048, (4, 4, 8, 4, 4)), (2048, (8, 4, 4, 4, 4)),
    (2048, (4, 4, 4, 4, 4, 2)), (2048, (2, 4, 4, 8, 8)), (1024, (4, 4, 4, 4, 4)), (128, (4, 4, 8)),
    (960, (2, 3, 5, 8, 4)), (960, (5, 3, 4, 4, 2, 2)), (960, (3, 5, 4, 4, 4)), (600, (4, 2, 3, 5, 5)),
    (240, (4, 4, 5, 3)), (96, (8, 4, 3)), (8, (8,)), (5, (5,)), (3, (3,)), (4, (4,)), (2, (2,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_stage_variant_matches_numpy(dtype, simd_path):
    for n, radices in STAGE_VARIANTS:
        x = _rand((3, n), dtype, seed=n)
        ref = np.fft.fft(x.astype(np.complex128), axis=-1)
        double = dtype == np.complex128
        fwd = dft._build_core(n, double, False, simd_path, radices)
        inv = dft._build_core(n, double, True, simd_path, radices)
        assert fwd.radices == radices
        y = fwd.execute(x, np.empty_like(x))
        assert _relerr(y, ref) <= TOL[dtype], (n, radices)
        assert _relerr(inv.execute(y, np.empty_like(y)), x) <= TOL[dtype], (n, radices)


#: first stages (radix 4 and 8, s = 1) whose m = n / r is below the explicit vector loop's
#: lanes (accel_core/csrc/fft_first.h: 8 complex64 / 4 complex128 per vector), not a
#: multiple of them (the Cython loop does the tail), or a few vectors long
FIRST_STAGE_VARIANTS = [
    (8, (4, 2)), (24, (4, 3, 2)), (60, (4, 5, 3)), (80, (4, 4, 5)), (128, (4, 4, 8)),
    (16, (8, 2)), (72, (8, 3, 3)), (96, (8, 4, 3)), (320, (8, 8, 5)), (512, (8, 8, 8)),
]


def test_first_stage_vector_loops_on_the_wide_paths(simd_path):
    """The AVX2 and AVX-512 builds run the first radix-4 / radix-8 stage as explicit 256-bit
    loops (32 vector registers on AVX-512: measured faster than 512-bit shuffles on Zen 4)."""
    assert simd.kernel_module("fft", simd_path).FIRST_STAGE_BITS == (0 if simd_path == "scalar" else 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_first_stage_tails_match_numpy(dtype, simd_path):
    _check_schedules(FIRST_STAGE_VARIANTS, dtype, simd_path, seed=1)


#: a last radix-2 stage (m == 1, writing the interleaved row) whose stride s = n / 2 is
#: below the explicit loop's lanes (8 complex64 / 4 complex128 per 256-bit vector: the
#: Cython loop does it all), a multiple of them, or whole vectors and a tail
LAST2_VARIANTS = [
    (4, (2, 2)), (6, (3, 2)), (12, (3, 2, 2)), (16, (8, 2)), (24, (4, 3, 2)), (30, (5, 3, 2)),
    (40, (4, 5, 2)), (128, (4, 4, 4, 2)), (160, (4, 4, 5, 2)), (2048, (4, 4, 4, 4, 4, 2)),
]


#: a last radix-8 stage: the explicit loop writes the interleaved row when s is a multiple
#: of the lanes (4 complex128, 8 complex64), else (and on the scalar build) the split
#: stage and a join pass do
LAST8_VARIANTS = [
    (16, (2, 8)), (24, (3, 8)), (32, (4, 8)), (40, (5, 8)), (64, (8, 8)), (96, (3, 4, 8)),
    (128, (4, 4, 8)), (192, (4, 2, 3, 8)), (512, (4, 4, 4, 8)), (2048, (4, 4, 4, 4, 8)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_last_radix8_stage_matches_numpy(dtype, simd_path):
    _check_schedules(LAST8_VARIANTS, dtype, simd_path)


#: a last radix-16 stage (csrc/fft_last16.h, 4 x 4 in registers, writing the interleaved
#: row): s = n / 16 below the 256-bit lanes (the one-q-at-a-time instance does it all),
#: a multiple of them, whole vectors and a tail (8 complex64 / 4 complex128 per vector);
#: after every kind of earlier stage (fused first radix 2/3/4/5/8, split stages at
#: s = 4, 8, 16 and generic ones); on the scalar build the scalar instance does every q
LAST16_VARIANTS = [
    (32, (2, 16)), (48, (3, 16)), (64, (4, 16)), (80, (5, 16)), (128, (8, 16)), (96, (2, 3, 16)),
    (192, (4, 3, 16)), (256, (4, 4, 16)), (384, (8, 3, 16)), (512, (8, 4, 16)), (960, (4, 5, 3, 16)),
    (1024, (8, 8, 16)), (2048, (4, 4, 8, 16)), (4096, (4, 4, 4, 4, 16)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_last_radix16_stage_matches_numpy(dtype, simd_path):
    _check_schedules(LAST16_VARIANTS, dtype, simd_path)


#: a middle radix-16 stage: in registers (csrc/fft_mid16.h) on the AVX2 / AVX-512 builds
#: where s is 8 ... 128 (the compile-time strides, whole 256-bit vectors), else (s = 2, 4,
#: 6, 12, 96, 256, the scalar build, or regs16=False) the two radix-4 stages blocked
#: through the L1 buffer (_stage44: q chunks of 64 complex64 / 32 complex128 values, a
#: tail chunk at s = 96 for complex64); two middle ones in a row, one before the last
#: radix-16 / radix-8 (split + join on the scalar build) / radix-4 / radix-2 stage; after
#: a fused first radix 2/3/4/5/8
MID16_VARIANTS = [
    (64, (2, 16, 2)), (128, (4, 16, 2)), (384, (2, 3, 16, 4)), (1536, (8, 16, 4, 3)),
    (512, (2, 16, 16)), (2048, (8, 16, 16)), (4096, (8, 16, 8, 4)), (4096, (8, 16, 16, 2)),
    (2048, (4, 8, 16, 4)), (4096, (4, 4, 4, 16, 4)), (4096, (8, 16, 4, 8)), (3072, (4, 8, 3, 16, 2)),
    (4096, (4, 16, 16, 4)), (4096, (4, 4, 16, 16)), (8192, (8, 4, 4, 16, 4)), (960, (5, 3, 16, 4)),
    (8192, (4, 4, 4, 4, 16, 2)), (1280, (5, 16, 16)),
]


@pytest.mark.parametrize("regs16", [True, False], ids=["regs", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_middle_radix16_stage_matches_numpy(dtype, regs16, simd_path):
    """A middle radix 16, in registers or as the blocked radix-4 pair, forward and inverse
    (in place too) within the issue-5 tolerances on every build."""
    for n, radices in MID16_VARIANTS:
        x = _rand((3, n), dtype, seed=n + 3)
        ref = np.fft.fft(x.astype(np.complex128), axis=-1)
        double = dtype == np.complex128
        fwd = dft._build_core(n, double, False, simd_path, radices, regs16)
        inv = dft._build_core(n, double, True, simd_path, radices, regs16)
        assert fwd.radices == radices and fwd.regs16 == regs16
        y = fwd.execute(x, np.empty_like(x))
        assert _relerr(y, ref) <= TOL[dtype], (n, radices)
        z = y.copy()
        assert inv.execute(z, z) is z
        assert _relerr(z, x) <= TOL[dtype], (n, radices)


def test_plans_run_the_middle_radix16_form_measured_faster(simd_path):
    """Plans take the in-register middle radix 16 except where dft._BLOCKED16 names the
    blocked radix-4 pair (complex64 4096 on AVX2); either way within the tolerances."""
    for n, double in ((2048, False), (4096, False), (2048, True)):
        core = dft._plan(n, double, False, simd_path)
        assert core.regs16 == ((simd_path, n, double) not in dft._BLOCKED16), (n, double)
    assert ("avx2", 4096, False) in dft._BLOCKED16
    x = _rand((2, 4096), np.complex64, seed=7)
    y = dft._plan(4096, False, False, simd_path).execute(x, np.empty_like(x))
    assert _relerr(y, np.fft.fft(x.astype(np.complex128), axis=-1)) <= TOL[np.complex64]


def test_schedule_that_does_not_factor_n_is_refused(simd_path):
    """A stage schedule whose product is not n is a ValueError naming it (not a division by
    zero while the twiddle tables are built)."""
    with pytest.raises(ValueError, match=r"\(8, 16, 4, 4, 3\)"):
        dft._build_core(3072, False, False, simd_path, (8, 16, 4, 4, 3))


@pytest.mark.parametrize("radices", [(16,), (16, 4), (16, 16), (16, 4, 4)])
def test_radix16_never_first(radices, simd_path):
    """A radix-16 stage is a middle (in registers or a blocked radix-4 pair) or a fused
    last stage, never a first one or alone: such a plan is refused (ValueError naming the
    schedule)."""
    n = int(np.prod(radices))
    with pytest.raises(ValueError, match="radix 16"):
        dft._build_core(n, False, False, simd_path, radices)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_last_radix2_stage_matches_numpy(dtype, simd_path):
    """The AVX2 / AVX-512 builds write a last radix-2 stage with an explicit 256-bit loop
    (csrc/fft_first.h), the inverse's 1/n scale folded in; the tails and the scalar
    build run the Cython loop."""
    _check_schedules(LAST2_VARIANTS, dtype, simd_path)


def _check_schedules(variants, dtype, simd_path, seed=2):
    """Each (n, radices) of ``variants`` forward against numpy, and inverse back to the
    input out of place and in place (each row is read into scratch first)."""
    for n, radices in variants:
        x = _rand((3, n), dtype, seed=n + seed)
        ref = np.fft.fft(x.astype(np.complex128), axis=-1)
        double = dtype == np.complex128
        fwd = dft._build_core(n, double, False, simd_path, radices)
        inv = dft._build_core(n, double, True, simd_path, radices)
        y = fwd.execute(x, np.empty_like(x))
        assert _relerr(y, ref) <= TOL[dtype], (n, radices)
        np.testing.assert_allclose(inv.execute(y, np.empty_like(y)), x, rtol=0,
                                   atol=TOL[dtype] * float(np.abs(x).max()) * 4, err_msg=str((n, radices)))
        z = y.copy()
        assert inv.execute(z, z) is z
        assert _relerr(z, x) <= TOL[dtype], (n, radices)


# ------------------------------------------------------------------ plans

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_explicit_plan(dtype, simd_path):
    plan = FFTPlan(3072, dtype)
    assert plan.n == 3072 and plan.dtype == np.dtype(dtype)
    assert plan.radices == dft.schedule_for(3072, dtype == np.complex128, simd_path)
    x = _rand((2, 3072), dtype, seed=4)
    out = np.empty_like(x)
    assert plan.forward(x, out) is out
    np.testing.assert_array_equal(out, fft(x))
    assert _relerr(plan.inverse(out), x) <= TOL[dtype]
    assert "3072" in repr(plan)


def test_plan_cache_reuses_cores():
    dft._plan.cache_clear()
    fft(_rand((1, 1024), np.complex64))
    fft(_rand((1, 1024), np.complex64))
    info = dft._plan.cache_info()
    assert info.misses == 1 and info.hits == 1
    ifft(_rand((1, 1024), np.complex64))
    fft(_rand((1, 1024), np.complex128))
    assert dft._plan.cache_info().misses == 3
    assert FFTPlan(1024, np.complex64)._fwd is dft._core(1024, False, False)
    assert dft._core(1024, False, False).__class__.__module__ == f"accel_core._fft{'' if simd.simd_path() == 'scalar' else '_' + simd.simd_path()}"


def test_plan_rejects_mismatch():
    plan = FFTPlan(256, np.complex64)
    with raises_exactly(ShapeError, match="n=256"):
        plan.forward(_rand((2, 512), np.complex64))
    with raises_exactly(DtypeError, match="complex128") as info:
        plan.forward(_rand((2, 256), np.complex128))
    assert isinstance(info.value, ValueError)  # a ValueError before the typed errors, still one
    with raises_exactly(UnsupportedSize, match="1000", value=1001):
        FFTPlan(1000 + 1)
    with raises_exactly(DtypeError, match="float32"):
        FFTPlan(256, np.float32)
    with raises_exactly(DtypeError, match="not a numpy dtype"):
        FFTPlan(256, "no-such-dtype")


def test_threads_share_a_plan():
    plan = FFTPlan(2048, np.complex64)
    xs = [_rand((8, 2048), np.complex64, seed=s) for s in range(4)]
    expect = [fft(x) for x in xs]
    got = [None] * 4

    def work(i):
        for _ in range(20):
            got[i] = plan.forward(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("bad_dtype", [np.float64, np.float32, np.int32, np.int64, np.bool_])
def test_real_and_integer_dtypes_rejected(bad_dtype):
    with raises_exactly(DtypeError, match=np.dtype(bad_dtype).name, argument="fft input",
                        value=np.dtype(bad_dtype)) as info:
        fft(np.zeros(256, bad_dtype))
    assert isinstance(info.value, TypeError)


@pytest.mark.skipif(not hasattr(np, "complex256"), reason="no complex256 on this platform")
def test_complex256_rejected():
    with raises_exactly(DtypeError, match="complex256"):
        ifft(np.zeros(256, np.complex256))


def test_non_array_inputs_rejected():
    with raises_exactly(DtypeError, match="str"):
        fft("abc")
    with raises_exactly(DtypeError, match="NoneType"):
        fft(None)
    with raises_exactly(DtypeError, match="object"):
        fft(np.array([object()] * 4))


def test_zero_d_rejected():
    with raises_exactly(ShapeError, match="0-d", value=()):
        fft(np.complex64(1 + 1j))
    with raises_exactly(ShapeError, match="0-d"):
        ifft(np.array(1j))


@pytest.mark.parametrize("n", [0, 7, 1000 + 1, 2 ** 17, 11 * 128])
def test_unsupported_sizes_rejected(n):
    with raises_exactly(UnsupportedSize, match=f"fft size {n} is not supported", argument="n", value=n):
        fft(np.zeros((2, n), np.complex64))


def test_size_error_names_neighbours():
    with raises_exactly(UnsupportedSize, match=r"nearest: 1000, 1024"):
        fft(np.zeros(1001, np.complex128))


def test_out_wrong_shape_dtype_layout():
    x = _rand((4, 256), np.complex64)
    with raises_exactly(ShapeError, match="shape", argument="out", value=(4, 128)):
        fft(x, out=np.empty((4, 128), np.complex64))
    with raises_exactly(ShapeError, match="shape"):
        fft(x, out=np.empty((2, 2, 256), np.complex64))
    with raises_exactly(DtypeError, match="complex128", argument="out"):
        fft(x, out=np.empty((4, 256), np.complex128))
    with raises_exactly(DtypeError, match="list"):
        fft(x, out=[0] * 1024)
    with raises_exactly(LayoutError, match="C-contiguous"):
        fft(x, out=np.empty((256, 4), np.complex64).T)
    ro = np.empty((4, 256), np.complex64)
    ro.flags.writeable = False
    with raises_exactly(LayoutError, match="read-only"):
        fft(x, out=ro)


def test_out_partial_overlap_rejected():
    buf = _rand((5, 256), np.complex64)
    keep = buf.copy()
    with raises_exactly(LayoutError, match="overlaps", argument="out"):
        fft(buf[:4], out=buf[1:])
    flat = _rand(1024 + 16, np.complex64)
    with raises_exactly(LayoutError, match="overlaps"):
        ifft(flat[:1024].reshape(4, 256), out=flat[16:].reshape(4, 256))
    np.testing.assert_array_equal(buf, keep)


def test_byte_swapped_input_and_out_rejected():
    # the same type number as complex64 / complex128, but not their dtype: the checks refuse
    x = _rand((2, 256), np.complex64)
    with raises_exactly(DtypeError, match=">c8"):
        fft(x.astype(">c8"))
    with raises_exactly(DtypeError, match="out dtype", argument="out"):
        fft(x, out=np.empty((2, 256), ">c8"))
    with raises_exactly(DtypeError, match="out dtype", argument="out"):
        ifft(x.astype(np.complex128), out=np.empty((2, 256), ">c16"))


def _checks_pass_unchanged(x, out) -> bool:
    """dft's own checks accept (x, out) as they are (no conversion, no error)."""
    try:
        xc, _n, _d = dft.check_input(x)
        if out is not None:
            dft.check_out(xc, out)
    except (DtypeError, ShapeError, LayoutError, UnsupportedSize):
        return False
    return xc is x


def test_fast_checks_answer_yes_only_where_the_checks_pass():
    """fft()/ifft() skip dft's checks when accel_core._fft.fast_args (one C call) says the
    arrays pass them as they are: it must never say yes where they would convert or raise."""
    from accel_core import _fft

    class Sub(np.ndarray):
        pass

    x = _rand((4, 256), np.complex64)
    xd = x.astype(np.complex128)
    buf = _rand((5, 256), np.complex64)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    cases = [
        (x, None), (x, np.empty_like(x)), (x, x), (x, x[:]), (xd, None), (xd, np.empty_like(xd)),
        (x.view(Sub), np.empty_like(x).view(Sub)), (np.zeros((0, 256), np.complex64), None),
        (x[0], np.empty(256, np.complex64)), (x.reshape(2, 2, 256), np.empty((2, 2, 256), np.complex64)),
        # each of these must go to the checks (which convert or raise)
        (x, np.empty((4, 128), np.complex64)), (x, np.empty((2, 2, 256), np.complex64)),
        (x, np.empty_like(xd)), (x, ro), (x, np.empty((256, 4), np.complex64).T),
        (x.astype(">c8"), None), (x, np.empty((4, 256), ">c8")), (x[:, ::2], None),
        (buf[:4], buf[1:]), (x.real.copy(), None), (x.astype(np.complex64)[..., :7].copy(), None),
        (np.complex64(1), None), ([1j, 2j], None), (x, [0] * 1024), (x, x.tolist()),
        (np.zeros((3, 0), np.complex64), None),
    ]
    for i, (a, out) in enumerate(cases):
        k = _fft.fast_args(a, out)
        fast = k >= 0 and (k >> 1) in dft._SIZE_SET
        assert fast == _checks_pass_unchanged(a, out), (i, k)
        if fast:
            assert (k >> 1, bool(k & 1)) == (a.shape[-1], a.dtype == np.complex128)
    assert sum(_fft.fast_args(a, o) >= 0 for a, o in cases) >= 10  # the fast path is taken
