"""LTE turbo code (TS 36.212 §5.1.3.2): QPP table, encoder, max-log-MAP decoder, BER, bad inputs.

Every test runs on every SIMD path of the kernels (scalar, avx2, avx512; accel_core.simd) that
this CPU has; a path the CPU lacks is skipped, saying which features are missing.
"""
import numpy as np
import pytest

from accel_core import qpp, simd
from accel_core.crc import attach_crc24a, attach_crc24b
from accel_core.errors import (BlockSizeError, DtypeError, ElementError, ParameterError, ParameterTypeError,
                               ShapeError)
from accel_core.turbo import LLR_LIMIT, MAX_ITERATIONS, turbo_decode, turbo_encode
from tests.accel.typed import raises_exactly

# ------------------------------------------------------------------------------------------
# QPP interleaver
# ------------------------------------------------------------------------------------------

# Table 5.1.3-3 transcribed column by column (i = 1..188): f1 and f2 in row order.
F1 = (3, 7, 19, 7, 7, 11, 5, 11, 7, 41, 103, 15, 9, 17, 9, 21, 101, 21, 57, 23, 13, 27, 11, 27,
      85, 29, 33, 15, 17, 33, 103, 19, 19, 37, 19, 21, 21, 115, 193, 21, 133, 81, 45, 23, 243,
      151, 155, 25, 51, 47, 91, 29, 29, 247, 29, 89, 91, 157, 55, 31, 17, 35, 227, 65, 19, 37,
      41, 39, 185, 43, 21, 155, 79, 139, 23, 217, 25, 17, 127, 25, 239, 17, 137, 215, 29, 15,
      147, 29, 59, 65, 55, 31, 17, 171, 67, 35, 19, 39, 19, 199, 21, 211, 21, 43, 149, 45, 49,
      71, 13, 17, 25, 183, 55, 127, 27, 29, 29, 57, 45, 31, 59, 185, 113, 31, 17, 171, 209, 253,
      367, 265, 181, 39, 27, 127, 143, 43, 29, 45, 157, 47, 13, 111, 443, 51, 51, 451, 257, 57,
      313, 271, 179, 331, 363, 375, 127, 31, 33, 43, 33, 477, 35, 233, 357, 337, 37, 71, 71, 37,
      39, 127, 39, 39, 31, 113, 41, 251, 43, 21, 43, 45, 45, 161, 89, 323, 47, 23, 47, 263)
F2 = (10, 12, 42, 16, 18, 20, 22, 24, 26, 84, 90, 32, 34, 108, 38, 120, 84, 44, 46, 48, 50, 52,
      36, 56, 58, 60, 62, 32, 198, 68, 210, 36, 74, 76, 78, 120, 82, 84, 86, 44, 90, 46, 94, 48,
      98, 40, 102, 52, 106, 72, 110, 168, 114, 58, 118, 180, 122, 62, 84, 64, 66, 68, 420, 96,
      74, 76, 234, 80, 82, 252, 86, 44, 120, 92, 94, 48, 98, 80, 102, 52, 106, 48, 110, 112, 114,
      58, 118, 60, 122, 124, 84, 64, 66, 204, 140, 72, 74, 76, 78, 240, 82, 252, 86, 88, 60, 92,
      846, 48, 28, 80, 102, 104, 954, 96, 110, 112, 114, 116, 354, 120, 610, 124, 420, 64, 66,
      136, 420, 216, 444, 456, 468, 80, 164, 504, 172, 88, 300, 92, 188, 96, 28, 240, 204, 104,
      212, 192, 220, 336, 228, 232, 236, 120, 244, 248, 168, 64, 130, 264, 134, 408, 138, 280,
      142, 480, 146, 444, 120, 152, 462, 234, 158, 80, 96, 902, 166, 336, 170, 86, 174, 176, 178,
      120, 182, 184, 186, 94, 190, 480)


@pytest.fixture(autouse=True, params=simd.PATHS)
def simd_path(request):
    """Run the test with the kernels forced to one SIMD path."""
    if request.param not in simd.available_paths():
        pytest.skip(f"this CPU cannot run the {request.param} path (available: {simd.available_paths()})")
    with simd.forced(request.param):
        yield request.param


def kernel():
    """The compiled turbo module of the path in use."""
    return simd.kernel_module("turbo")


def standard_block_sizes():
    return ([40 + 8 * i for i in range(60)] + [528 + 16 * i for i in range(32)]
            + [1056 + 32 * i for i in range(32)] + [2112 + 64 * i for i in range(64)])


def test_block_sizes_follow_the_standard_rule():
    assert list(qpp.BLOCK_SIZES) == standard_block_sizes()
    assert len(qpp.BLOCK_SIZES) == 188


def test_qpp_params_match_table_5_1_3_3_for_all_sizes():
    assert len(F1) == len(F2) == 188
    for K, f1, f2 in zip(standard_block_sizes(), F1, F2):
        assert qpp.qpp_params(K) == (f1, f2), K
    assert qpp.qpp_params(40) == (3, 10)
    assert qpp.qpp_params(6144) == (263, 480)


@pytest.mark.parametrize("K", qpp.BLOCK_SIZES)
def test_every_interleaver_is_the_qpp_permutation(K):
    pi = qpp.qpp_interleaver(K)
    assert pi.dtype == np.int32 and pi.shape == (K,)
    assert np.array_equal(np.sort(pi), np.arange(K))
    f1, f2 = qpp.qpp_params(K)
    for i in (0, 1, K // 3, K - 2, K - 1):   # Python ints: exact, no overflow
        assert pi[i] == (f1 * i + f2 * i * i) % K


def test_interleaver_returns_a_private_copy():
    pi = qpp.qpp_interleaver(40)
    pi[0] = 7
    assert qpp.qpp_interleaver(40)[0] == 0


@pytest.mark.parametrize("K", [0, 39, 41, 520, 6145, 6208, -40])
def test_unsupported_block_size(K):
    with raises_exactly(BlockSizeError, match=rf"K={K}.*Table 5.1.3-3", argument="K", value=K):
        qpp.qpp_params(K)
    with raises_exactly(BlockSizeError, match=rf"K={K}"):
        qpp.qpp_interleaver(K)


def test_block_size_type():
    with raises_exactly(ParameterTypeError, match="float", argument="K", value=40.0) as info:
        qpp.qpp_params(40.0)
    assert isinstance(info.value, TypeError)
    with raises_exactly(ParameterTypeError, match="bool"):
        qpp.qpp_params(True)

# ------------------------------------------------------------------------------------------
# Encoder against an independent bit-level reference
# ------------------------------------------------------------------------------------------


def reference_rsc(bits):
    """RSC with g0 = 1 + D^2 + D^3, g1 = 1 + D + D^3 as a shift-register list; + termination."""
    reg = [0, 0, 0]                       # D^1, D^2, D^3
    parity = []
    for c in bits:
        w = c ^ reg[1] ^ reg[2]           # feedback taps D^2, D^3
        parity.append(w ^ reg[0] ^ reg[2])   # feedforward taps 1, D, D^3
        reg = [w, reg[0], reg[1]]
    tail_x, tail_z = [], []
    for _ in range(3):                    # switch up: input = feedback, register fills with 0
        x = reg[1] ^ reg[2]
        tail_x.append(x)
        tail_z.append(reg[0] ^ reg[2])    # w = 0 on the tail
        reg = [0, reg[0], reg[1]]
    assert reg == [0, 0, 0]
    return parity, tail_x, tail_z


def reference_turbo_encode(bits):
    K = len(bits)
    f1, f2 = qpp.qpp_params(K)
    c = [int(b) for b in bits]
    c_int = [c[(f1 * i + f2 * i * i) % K] for i in range(K)]
    z, x_t, z_t = reference_rsc(c)
    z2, x2_t, z2_t = reference_rsc(c_int)
    d0, d1, d2 = c + [0] * 4, z + [0] * 4, z2 + [0] * 4
    # §5.1.3.2.2 written out
    d0[K], d0[K + 1], d0[K + 2], d0[K + 3] = x_t[0], z_t[1], x2_t[0], z2_t[1]
    d1[K], d1[K + 1], d1[K + 2], d1[K + 3] = z_t[0], x_t[2], z2_t[0], x2_t[2]
    d2[K], d2[K + 1], d2[K + 2], d2[K + 3] = x_t[1], z_t[2], x2_t[1], z2_t[2]
    return np.array([d0, d1, d2], dtype=np.uint8)


@pytest.mark.parametrize("K", [40, 48, 512, 1056, 3200, 6144])
def test_encoder_matches_reference(K):
    rng = np.random.default_rng(K)
    for _ in range(3):
        bits = rng.integers(0, 2, K, dtype=np.uint8)
        out = turbo_encode(bits)
        assert out.dtype == np.uint8 and out.shape == (3, K + 4)
        assert np.array_equal(out, reference_turbo_encode(bits))


def test_encoder_all_zero_and_batch():
    assert not turbo_encode(np.zeros(40, np.uint8)).any()
    bits = np.random.default_rng(5).integers(0, 2, (4, 104), dtype=np.uint8)
    out = turbo_encode(bits)
    assert out.shape == (4, 3, 108)
    for b in range(4):
        assert np.array_equal(out[b], turbo_encode(bits[b]))


def test_encoder_bad_inputs():
    with raises_exactly(BlockSizeError, match="K=41", value=41):
        turbo_encode(np.zeros(41, np.uint8))
    with raises_exactly(ElementError, match=r"bits\[2\] = 3", argument="bits", value=3):
        turbo_encode(np.array([0, 1, 3] + [0] * 37, np.uint8))
    with raises_exactly(DtypeError, match="dtype float32"):
        turbo_encode(np.zeros(40, np.float32))
    with raises_exactly(ShapeError, match="shape"):
        turbo_encode(np.zeros((1, 1, 40), np.uint8))

# ------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------


def bpsk_llr(coded, magnitude=4.0):
    return ((1.0 - 2.0 * coded.astype(np.float32)) * magnitude).astype(np.float32)


@pytest.mark.parametrize("K", qpp.BLOCK_SIZES)
def test_noiseless_decode_is_exact(K):
    bits = np.random.default_rng(K).integers(0, 2, (2, K), dtype=np.uint8)
    out, iters = turbo_decode(bpsk_llr(turbo_encode(bits)), iterations=1)
    assert out.dtype == np.uint8 and out.shape == (2, K)
    assert np.array_equal(out, bits)
    assert iters.tolist() == [1, 1]


def awgn_llr(coded, ebn0_db, rng):
    """BPSK 0 -> +1 over AWGN at Eb/N0 (code rate 1/3, tail ignored); LLR = 2y/sigma^2."""
    rate = 1.0 / 3.0
    sigma2 = 1.0 / (2.0 * rate * 10.0 ** (ebn0_db / 10.0))
    y = 1.0 - 2.0 * coded.astype(np.float32)
    y += rng.standard_normal(coded.shape, dtype=np.float32) * np.float32(np.sqrt(sigma2))
    return y * np.float32(2.0 / sigma2)


def test_single_block_api_and_moderate_noise():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2, 1024, dtype=np.uint8)
    out, iters = turbo_decode(awgn_llr(turbo_encode(bits), 2.0, rng), iterations=6, scaling=0.75)
    assert isinstance(iters, int) and iters == 6
    assert out.shape == (1024,) and np.array_equal(out, bits)


def test_batch_lanes_are_independent():
    rng = np.random.default_rng(12)
    bits = rng.integers(0, 2, (21, 256), dtype=np.uint8)   # crosses a lane-group boundary
    llr = awgn_llr(turbo_encode(bits), 0.5, rng)
    batch, _ = turbo_decode(llr, iterations=4, scaling=0.7)
    for b in range(21):
        single, _ = turbo_decode(llr[b], iterations=4, scaling=0.7)
        assert np.array_equal(batch[b], single), b


def test_float64_input_is_converted_and_huge_llrs_saturate():
    rng = np.random.default_rng(13)
    bits = rng.integers(0, 2, (3, 512), dtype=np.uint8)
    llr = awgn_llr(turbo_encode(bits), 1.5, rng)
    a, _ = turbo_decode(llr, iterations=3)
    b, _ = turbo_decode(llr.astype(np.float64), iterations=3)
    assert np.array_equal(a, b)
    huge = bpsk_llr(turbo_encode(bits), 1e30)
    out, _ = turbo_decode(huge, iterations=MAX_ITERATIONS)
    assert np.array_equal(out, bits)
    assert LLR_LIMIT < 1e30


@pytest.mark.parametrize("crc", ["crc24a", "crc24b"])
def test_early_stop_per_block(crc):
    attach = attach_crc24a if crc == "crc24a" else attach_crc24b
    rng = np.random.default_rng(14)
    info = rng.integers(0, 2, (5, 1056 - 24), dtype=np.uint8)
    blocks = attach(info)
    llr = bpsk_llr(turbo_encode(blocks), 3.0)
    llr[2] = rng.choice(np.float32([-1.0, 1.0]), size=llr[2].shape)   # hopeless block
    out, iters = turbo_decode(llr, iterations=5, early_stop=crc)
    assert iters.tolist() == [1, 1, 5, 1, 1]
    for b in (0, 1, 3, 4):
        assert np.array_equal(out[b], blocks[b])
    single, n = turbo_decode(llr[0], iterations=5, early_stop=crc)
    assert n == 1 and np.array_equal(single, blocks[0])


def test_early_stop_needs_the_matching_crc():
    blocks = attach_crc24a(np.random.default_rng(15).integers(0, 2, (1, 40 - 24), dtype=np.uint8))
    _, iters = turbo_decode(bpsk_llr(turbo_encode(blocks)), iterations=3, early_stop="crc24b")
    assert iters.tolist() == [3]

# ------------------------------------------------------------------------------------------
# BER over AWGN, K = 6144, 8 iterations (seeded, cheap; the full sweep is bench/turbo_ber_sweep.py)
# ------------------------------------------------------------------------------------------

K_BER = 6144


def frame_errors(ebn0_db, frames, scaling, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (frames, K_BER), dtype=np.uint8)
    out, _ = turbo_decode(awgn_llr(turbo_encode(bits), ebn0_db, rng), iterations=8,
                          scaling=scaling)
    err = out != bits
    return int(err.sum()), int(err.any(axis=1).sum())


@pytest.mark.parametrize("scaling", [None, 0.75])
def test_ber_above_the_waterfall_is_near_zero(scaling):
    bit_err, frame_err = frame_errors(1.2, 192, scaling, seed=21)
    assert frame_err <= 1 and bit_err <= 20


@pytest.mark.parametrize("scaling", [None, 0.75])
def test_ber_below_the_waterfall_is_clearly_nonzero(scaling):
    bit_err, frame_err = frame_errors(0.0, 16, scaling, seed=22)
    assert frame_err == 16
    assert bit_err / (16 * K_BER) > 0.05


def test_scaled_extrinsic_beats_plain_max_log_map_near_0_6_db():
    _, fer_plain = frame_errors(0.6, 192, None, seed=23)
    _, fer_scaled = frame_errors(0.6, 192, 0.75, seed=23)
    assert fer_plain >= 10            # plain max-log-MAP is still in its waterfall here
    assert fer_scaled <= 2            # the scaled decoder is already past it
    assert fer_scaled < fer_plain

# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


def good_llr(K=40, B=None):
    shape = (3, K + 4) if B is None else (B, 3, K + 4)
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("llr,exc,typed,msg", [
    (np.zeros((3, 44), np.int16), TypeError, DtypeError, "dtype int16"),
    (np.zeros((3, 44), np.complex64), TypeError, DtypeError, "dtype complex64"),
    (np.zeros(44, np.float32), ValueError, ShapeError, r"shape \(44,\)"),
    (np.zeros((2, 44), np.float32), ValueError, ShapeError, r"shape \(2, 44\)"),
    (np.zeros((1, 1, 3, 44), np.float32), ValueError, ShapeError, "shape"),
    (np.zeros((3, 45), np.float32), ValueError, BlockSizeError, "K = 41"),
    (np.zeros((2, 3, 4), np.float32), ValueError, BlockSizeError, "K = 0"),
])
def test_decoder_rejects_bad_llr_arrays(llr, exc, typed, msg):
    with raises_exactly(typed, match=msg) as info:
        turbo_decode(llr)
    assert isinstance(info.value, exc)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decoder_rejects_non_finite_llrs_naming_the_position(bad):
    llr = good_llr(B=2)
    llr[1, 2, 17] = bad
    with raises_exactly(ElementError, match=r"llr\[1, 2, 17\] = .*not finite", argument="llr"):
        turbo_decode(llr)


def test_decoder_rejects_float64_that_overflows_float32():
    llr = good_llr().astype(np.float64)
    llr[0, 3] = 1e300
    with raises_exactly(ElementError, match=r"llr\[0, 3\].*not finite", value=1e300):
        turbo_decode(llr)


@pytest.mark.parametrize("kwargs,exc,typed,msg", [
    ({"iterations": 0}, ValueError, ParameterError, "iterations=0"),
    ({"iterations": MAX_ITERATIONS + 1}, ValueError, ParameterError, f"iterations={MAX_ITERATIONS + 1}"),
    ({"iterations": 2.0}, TypeError, ParameterTypeError, "iterations"),
    ({"iterations": True}, TypeError, ParameterTypeError, "iterations"),
    ({"scaling": 0.0}, ValueError, ParameterError, "scaling=0.0"),
    ({"scaling": 1.5}, ValueError, ParameterError, "scaling=1.5"),
    ({"scaling": float("nan")}, ValueError, ParameterError, "scaling=nan"),
    ({"scaling": "0.7"}, TypeError, ParameterTypeError, "scaling"),
    ({"early_stop": "crc16"}, ValueError, ParameterError, "early_stop='crc16'"),
    ({"early_stop": True}, ValueError, ParameterError, "early_stop=True"),
    ({"early_stop": ["crc24a"]}, ValueError, ParameterError, r"early_stop=\['crc24a'\]"),
])
def test_decoder_rejects_bad_parameters(kwargs, exc, typed, msg):
    (name, value), = kwargs.items()
    with raises_exactly(typed, match=msg, argument=name) as info:
        turbo_decode(good_llr(), **kwargs)
    assert isinstance(info.value, exc)
    assert info.value.value is value


def test_empty_batch():
    out, iters = turbo_decode(good_llr(B=0))
    assert out.shape == (0, 40) and iters.shape == (0,)

# ------------------------------------------------------------------------------------------
# Kernel geometry: trellis segments per block
# ------------------------------------------------------------------------------------------


def test_segments_for_block_sizes():
    _turbo = kernel()
    lanes = _turbo.BATCH_LANES
    assert _turbo.MAX_SEGMENTS == 16 and lanes % _turbo.MAX_SEGMENTS == 0
    assert _turbo.segments_for(40, 256) == 1
    assert _turbo.segments_for(6144, 256) == 16
    assert _turbo.segments_for(1024, 256) == 4
    for K in qpp.BLOCK_SIZES:
        P = _turbo.segments_for(K, 256)
        assert lanes % P == 0 and K % P == 0 and (P == 1 or K // P >= 256)


@pytest.mark.parametrize("K", [512, 1056, 6144])
def test_every_segment_count_decodes_noiseless_blocks(K):
    _turbo = kernel()
    bits = np.random.default_rng(K).integers(0, 2, (3, K), dtype=np.uint8)
    llr = bpsk_llr(turbo_encode(bits), 2.0)
    P = 1
    while P <= _turbo.MAX_SEGMENTS:
        out = np.empty_like(bits)
        used = np.empty(3, np.int32)
        _turbo.decode_batch(llr, qpp.qpp_table(K), 2, 1.0, -1, out, used, P)
        assert np.array_equal(out, bits), P
        P *= 2
    with pytest.raises(ValueError, match="segments=3"):
        _turbo.decode_batch(llr, qpp.qpp_table(K), 2, 1.0, -1, out, used, 3)


def test_kernel_early_stop_ids_are_the_crc_kernel_ids():
    from accel_core import _crc
    _turbo = kernel()
    from accel_core.turbo import EARLY_STOP_CRCS
    assert EARLY_STOP_CRCS == {"crc24a": _crc.CRC24A_ID, "crc24b": _crc.CRC24B_ID}
    llr = good_llr()[None]
    out, used = np.empty((1, 40), np.uint8), np.empty(1, np.int32)
    for kind in (-1, _crc.CRC24A_ID, _crc.CRC24B_ID):
        _turbo.decode_batch(llr, qpp.qpp_table(40), 2, 1.0, kind, out, used)
    for kind in (-2, max(_crc.CRC24A_ID, _crc.CRC24B_ID) + 1):
        with pytest.raises(ValueError, match="crc_kind"):
            _turbo.decode_batch(llr, qpp.qpp_table(40), 2, 1.0, kind, out, used)


def test_segmented_blocks_decode_the_same_alone_or_in_a_batch():
    rng = np.random.default_rng(16)
    bits = rng.integers(0, 2, (5, 1024), dtype=np.uint8)      # several segments per block
    llr = awgn_llr(turbo_encode(bits), 0.6, rng)
    batch, _ = turbo_decode(llr, iterations=5, scaling=0.75)
    for b in range(5):
        single, _ = turbo_decode(llr[b], iterations=5, scaling=0.75)
        assert np.array_equal(batch[b], single), b

# ------------------------------------------------------------------------------------------
# Benchmark and sweep entry points (smoke, tiny sizes)
# ------------------------------------------------------------------------------------------


def test_bench_and_sweep_smoke():
    from bench.turbo_ber_sweep import crossing, sweep
    from vrdma.accel_bench.turbo_bench import run_turbo_bench
    rows = run_turbo_bench(K=40, iterations=1, frames=4, batch=2, commpy_frames=0, repeat=1,
                           ebn0_db=6.0)
    assert [r["batch"] for r in rows] == [2, 1]
    assert all(r["mbit_s"] > 0 and r["bit_errors"] == 0 for r in rows)
    pts = sweep([-2.0, 4.0], K=40, iterations=2, max_frames=64, min_frame_errors=4, chunk=16)
    assert len(pts) == 4
    assert crossing(pts, "max-log-MAP", target=1e-2) is not None
    assert crossing(pts, "max-log-MAP", target=0.9) is None


def test_kernels_refuse_an_index_that_is_not_a_permutation():
    _turbo = kernel()
    K = 40
    pi = qpp.qpp_interleaver(K)
    pi[3] = pi[4]
    with pytest.raises(ValueError, match=r"pi\[4\]"):
        _turbo.decode_batch(good_llr(B=1), pi, 1, 1.0, -1, np.empty((1, K), np.uint8),
                            np.empty(1, np.int32))
    pi[3] = K
    with pytest.raises(ValueError, match=rf"pi\[3\] = {K}"):
        _turbo.encode_batch(np.zeros((1, K), np.uint8), pi, np.empty((1, 3, K + 4), np.uint8))
