"""CRC24A / CRC24B of TS 36.212 §5.1.1 against a bit-serial reference and known vectors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from accel_core.crc import (
    GCRC24A, GCRC24B, attach_crc24a, attach_crc24b, check_crc24a, check_crc24b, crc24a, crc24b,
)
from accel_core.errors import DtypeError, ElementError, ShapeError
from tests.accel.typed import raises_exactly

FUNCS = {"a": (crc24a, attach_crc24a, check_crc24a, GCRC24A),
         "b": (crc24b, attach_crc24b, check_crc24b, GCRC24B)}


def reference_crc(bits, generator):
    """Long division of a(D)·D^24 by g(D), one bit at a time, on Python ints."""
    reg = 0
    for bit in list(bits) + [0] * 24:
        reg = (reg << 1) | int(bit)
        if reg >> 24:
            reg ^= generator
    return [(reg >> (23 - i)) & 1 for i in range(24)]


def to_int(bits):
    return int("".join(str(int(b)) for b in bits), 2)


@pytest.mark.parametrize("kind", "ab")
def test_all_zero_block_has_zero_crc(kind):
    crc, _, check, _ = FUNCS[kind]
    assert not crc(np.zeros(6144, np.uint8)).any()
    assert check(np.zeros(64, np.uint8))


def test_catalogue_check_values():
    # CRC-24/LTE-A and CRC-24/LTE-B of the ASCII string "123456789" (init 0, no reflection).
    bits = np.unpackbits(np.frombuffer(b"123456789", np.uint8))
    assert to_int(crc24a(bits)) == 0xCDE703
    assert to_int(crc24b(bits)) == 0x23EF52


@pytest.mark.parametrize("kind", "ab")
@pytest.mark.parametrize("length", [0, 1, 7, 8, 13, 40, 100, 6120])
def test_matches_bit_serial_reference(kind, length):
    crc, _, _, gen = FUNCS[kind]
    bits = np.random.default_rng(length).integers(0, 2, length, dtype=np.uint8)
    out = crc(bits)
    assert out.dtype == np.uint8 and out.shape == (24,)
    assert out.tolist() == reference_crc(bits, gen)


@pytest.mark.parametrize("kind", "ab")
def test_attach_then_check_and_every_single_bit_error_detected(kind):
    _, attach, check, _ = FUNCS[kind]
    bits = np.random.default_rng(7).integers(0, 2, 200, dtype=np.uint8)
    coded = attach(bits)
    assert coded.shape == (224,) and (coded[:200] == bits).all()
    assert check(coded) is True
    for i in range(coded.size):
        bad = coded.copy()
        bad[i] ^= 1
        assert check(bad) is False, i


@pytest.mark.parametrize("kind", "ab")
def test_batched_forms_match_rows(kind):
    crc, attach, check, _ = FUNCS[kind]
    bits = np.random.default_rng(3).integers(0, 2, (5, 77), dtype=np.uint8)
    par = crc(bits)
    assert par.shape == (5, 24)
    for r in range(5):
        assert (par[r] == crc(bits[r])).all()
    coded = attach(bits)
    coded[2, 10] ^= 1
    assert check(coded).tolist() == [True, True, False, True, True]


def test_crc24a_and_crc24b_differ_and_accept_bool_and_int_dtypes():
    bits = np.random.default_rng(1).integers(0, 2, 96)
    assert (crc24a(bits) != crc24b(bits)).any()
    assert (crc24a(bits.astype(bool)) == crc24a(bits.astype(np.int64))).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=0, max_size=300), st.sampled_from("ab"))
def test_roundtrip_property(bits, kind):
    crc, attach, check, gen = FUNCS[kind]
    arr = np.array(bits, dtype=np.uint8)
    assert crc(arr).tolist() == reference_crc(bits, gen)
    assert check(attach(arr))


def test_bad_inputs():
    with raises_exactly(DtypeError, match="dtype float64", argument="bits", value=np.dtype(np.float64)):
        crc24a(np.zeros(10))
    with raises_exactly(ShapeError, match="shape", value=(2, 2, 2)):
        crc24a(np.zeros((2, 2, 2), np.uint8))
    with raises_exactly(ElementError, match=r"bits\[3\] = 2", value=2):
        crc24a(np.array([0, 1, 0, 2, 1], np.uint8))
    with raises_exactly(ElementError, match=r"bits\[1, 0\] = -1", value=-1):
        crc24b(np.array([[0, 1], [-1, 0]]))
    with raises_exactly(ShapeError, match="fewer than the 24", argument="bits_with_crc"):
        check_crc24a(np.zeros(23, np.uint8))
