"""Tests of the NumPy AutoAWQ format helpers (no GPU needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quick_lab.core.format import (
    AWQ_ORDER,
    AWQWeight,
    dequantize,
    dequantize_fp16,
    pack_int4,
    quantize,
    quantize_awq,
    random_awq,
    reference_gemm,
    unpack_int4,
    validate_awq,
)

# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("shape, seed", [((1, 8), 11), ((7, 64), 12), ((128, 4096), 13), ((3, 1000), 14)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_pack_unpack_roundtrip(shape, seed, dtype):
    q = np.random.default_rng(seed).integers(0, 16, size=shape).astype(dtype)
    packed = pack_int4(q)
    assert packed.dtype == np.int32
    assert packed.shape == (shape[0], shape[1] // 8)
    out = unpack_int4(packed)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, q)


def test_unpack_pack_roundtrip_on_random_words():
    words = np.random.default_rng(21).integers(-(2**31), 2**31, size=(33, 17), dtype=np.int64).astype(np.int32)
    np.testing.assert_array_equal(pack_int4(unpack_int4(words)), words)


def test_pack_hand_computed_word():
    # Columns 0..7 hold 1..8. Nibble i holds column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]:
    #   nibble: 7  6  5  4  3  2  1  0
    #   column: 7  5  3  1  6  4  2  0
    #   value : 8  6  4  2  7  5  3  1   -> 0x86427531 = 2252502321 unsigned.
    # Nibble 7 is 8 >= 8, so the sign bit is set: as int32 it is 2252502321 - 2**32 = -2042464975.
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.uint8)
    word = pack_int4(q)
    assert word.shape == (1, 1)
    assert int(word[0, 0]) == -2042464975
    assert int(word.view(np.uint32)[0, 0]) == 0x86427531
    np.testing.assert_array_equal(unpack_int4(np.array([[-2042464975]], dtype=np.int32)), q)


def test_pack_hand_computed_word_positive():
    # Columns 0..7 hold 15, 0, 1, 2, 3, 4, 5, 6. Nibbles 7..0 hold columns 7,5,3,1,6,4,2,0:
    #   values 6, 4, 2, 0, 5, 3, 1, 15 -> 0x6420531F = 1679840031 (top nibble 6 < 8: positive).
    q = np.array([[15, 0, 1, 2, 3, 4, 5, 6]], dtype=np.uint8)
    assert int(pack_int4(q)[0, 0]) == 0x6420531F == 1679840031


@pytest.mark.parametrize(
    "col, shift",
    # Bit offset of column c is 4 * AWQ_ORDER.index(c), written out by hand.
    [(0, 0), (1, 16), (2, 4), (3, 20), (4, 8), (5, 24), (6, 12), (7, 28)],
)
def test_pack_single_column_position(col, shift):
    value = 9  # >= 8 so the top nibble case exercises the int32 sign bit
    q = np.zeros((2, 16), dtype=np.uint8)
    q[1, 8 + col] = value
    packed = pack_int4(q)
    assert packed.view(np.uint32)[1, 1] == value << shift
    assert packed[0].tolist() == [0, 0] and packed[1, 0] == 0


def test_awq_order_pairs_are_adjacent_columns():
    # The lop3 dequantizer emits nibble pairs (0,4), (1,5), (2,6), (3,7) as fp16x2.
    pairs = [(AWQ_ORDER[i], AWQ_ORDER[i + 4]) for i in range(4)]
    assert pairs == [(0, 1), (2, 3), (4, 5), (6, 7)]


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("seed, scale, offset", [(101, 1.0, 0.0), (202, 0.02, 0.0), (303, 0.05, 0.3), (404, 3.0, -7.0)])
def test_quantization_error_bound(group_size, seed, scale, offset):
    K, N = 512, 256
    w = (np.random.default_rng(seed).standard_normal((K, N)) * scale + offset).astype(np.float32)
    q, z, s = quantize(w, group_size)
    assert q.dtype == np.uint8 and q.shape == (K, N) and q.max() <= 15
    assert z.dtype == np.uint8 and z.shape == (K // group_size, N) and z.max() <= 15
    assert s.dtype == np.float16 and s.shape == (K // group_size, N)
    assert np.all(np.isfinite(s)) and np.all(s > 0)

    awq = quantize_awq(w, group_size)
    deq = dequantize(awq)
    s_full = np.repeat(s.astype(np.float32), group_size, axis=0)
    err = np.abs(w - deq)
    assert np.all(err <= s_full / 2 * (1 + 1e-3) + 1e-6), float((err / s_full).max())
    # The grid is not wasted: the worst error is close to half a step somewhere.
    assert (err / s_full).max() > 0.4


def test_quantize_degenerate_groups_stay_finite():
    rng = np.random.default_rng(505)
    K, N, G = 128, 16, 32
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[0:G, 0] = 0.731  # constant positive group
    w[G : 2 * G, 1] = -2.5  # constant negative group
    w[2 * G : 3 * G, 2] = rng.uniform(1e-9, 2e-9, size=G)  # range below fp16 resolution
    w[3 * G :, 3] = rng.uniform(5.0, 6.0, size=G)  # one-sided group far from zero
    q, z, s = quantize(w, G)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    deq = dequantize(quantize_awq(w, G))
    s_full = np.repeat(s.astype(np.float32), G, axis=0)
    assert np.all(np.abs(w - deq) <= s_full / 2 * (1 + 1e-3) + 1e-6)


def test_quantize_accepts_fp16_and_float64():
    w64 = np.random.default_rng(606).standard_normal((64, 32))
    for w in (w64, w64.astype(np.float16)):
        awq = quantize_awq(w, 32)
        s_full = np.repeat(awq.scales.astype(np.float32), 32, axis=0)
        assert np.all(np.abs(w.astype(np.float32) - dequantize(awq)) <= s_full / 2 * (1 + 1e-3) + 1e-6)


def test_quantize_awq_packs_quantize_outputs():
    w = np.random.default_rng(707).standard_normal((256, 64)).astype(np.float32)
    q, z, s = quantize(w, 64)
    awq = quantize_awq(w, 64)
    assert (awq.K, awq.N, awq.num_groups, awq.group_size) == (256, 64, 4, 64)
    np.testing.assert_array_equal(unpack_int4(awq.qweight), q)
    np.testing.assert_array_equal(unpack_int4(awq.qzeros), z)
    np.testing.assert_array_equal(awq.scales, s)


# ---------------------------------------------------------------- dequantize / reference GEMM


def _slow_dequant(awq: AWQWeight) -> np.ndarray:
    q, z, s = unpack_int4(awq.qweight), unpack_int4(awq.qzeros), awq.scales
    out = np.empty((awq.K, awq.N), dtype=np.float64)
    for k in range(awq.K):
        for n in range(awq.N):
            g = k // awq.group_size
            out[k, n] = (int(q[k, n]) - int(z[g, n])) * float(s[g, n])
    return out


def test_dequantize_matches_explicit_loop():
    awq = random_awq(96, 24, group_size=32, seed=808)
    expected = _slow_dequant(awq)
    deq = dequantize(awq)
    assert deq.dtype == np.float32 and deq.shape == (96, 24)
    np.testing.assert_array_equal(deq.astype(np.float64), expected)  # exact: small int x fp16
    deq16 = dequantize_fp16(awq)
    assert deq16.dtype == np.float16
    np.testing.assert_array_equal(deq16, expected.astype(np.float16))
    # Same as fp16 arithmetic: exact (q - z) in fp16 times s, rounded once.
    q = np.repeat(unpack_int4(awq.qzeros), 32, axis=0)
    qz = (unpack_int4(awq.qweight).astype(np.float16) - q.astype(np.float16)).astype(np.float16)
    np.testing.assert_array_equal(deq16, qz * np.repeat(awq.scales, 32, axis=0))


def test_reference_gemm_matches_explicit_float64():
    rng = np.random.default_rng(909)
    awq = random_awq(128, 16, group_size=64, seed=910)
    x = rng.standard_normal((3, 128)).astype(np.float16)
    w16 = _slow_dequant(awq).astype(np.float16)
    expected = np.zeros((3, 16))
    for m in range(3):
        for n in range(16):
            expected[m, n] = sum(float(x[m, k]) * float(w16[k, n]) for k in range(128))
    y = reference_gemm(x, awq)
    assert y.dtype == np.float64 and y.shape == (3, 16)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_random_awq_properties():
    a = random_awq(256, 512, group_size=128, seed=1)
    b = random_awq(256, 512, group_size=128, seed=1)
    c = random_awq(256, 512, group_size=128, seed=2)
    validate_awq(a)
    np.testing.assert_array_equal(a.qweight, b.qweight)
    assert not np.array_equal(a.qweight, c.qweight)
    assert a.scales.dtype == np.float16
    assert a.scales.min() >= np.float16(0.000999) and a.scales.max() <= np.float16(0.01)
    counts = np.bincount(unpack_int4(a.qweight).ravel(), minlength=16)
    assert counts.size == 16 and counts.min() > 0.9 * counts.mean()
    assert np.unique(unpack_int4(a.qzeros)).size == 16


def test_awq_weight_is_frozen():
    a = random_awq(64, 8, group_size=32, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.group_size = 64  # type: ignore[misc]


# ---------------------------------------------------------------- validation


def _rand_w(K: int, N: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: quantize(_rand_w(64, 16, 1).astype(np.int32), 32), TypeError, ["weight", "floating"]),
        (lambda: quantize(_rand_w(96, 16, 2), 64), ValueError, ["K = 96", "group_size"]),
        (lambda: quantize(_rand_w(128, 16, 3), 16), ValueError, ["group_size", "(32, 64, 128)"]),
        (lambda: quantize(_rand_w(64, 12, 4), 32), ValueError, ["N = 12", "multiple of 8"]),
        (lambda: quantize(_rand_w(64, 16, 5)[0], 32), ValueError, ["weight", "2-D"]),
        (lambda: quantize(np.full((32, 8), np.nan, np.float32), 32), ValueError, ["weight", "finite"]),
        (lambda: pack_int4(np.random.default_rng(6).random((2, 8))), TypeError, ["q", "integer"]),
        (lambda: pack_int4(np.full((2, 8), 16)), ValueError, ["q values", "0..15"]),
        (lambda: pack_int4(np.full((2, 8), -1)), ValueError, ["q values", "0..15"]),
        (lambda: pack_int4(np.ones((2, 12), np.uint8)), ValueError, ["q", "C = 12", "multiple of 8"]),
        (lambda: unpack_int4(np.ones((2, 2), np.float32)), TypeError, ["packed", "int32"]),
        (lambda: unpack_int4(np.ones((2, 2), np.int16)), TypeError, ["packed", "int32"]),
        (lambda: random_awq(100, 64, 32), ValueError, ["K = 100", "group_size"]),
        (lambda: random_awq(128, 60, 32), ValueError, ["N = 60"]),
        (lambda: random_awq(128, 64, 256), ValueError, ["group_size"]),
        (lambda: reference_gemm(_rand_w(2, 64, 7), random_awq(128, 64, 32)), ValueError, ["x", "K = 128"]),
    ],
)
def test_validation_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


def _parts(seed: int = 8):
    a = random_awq(128, 64, group_size=32, seed=seed)
    return a.qweight, a.qzeros, a.scales


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda qw, qz, s: AWQWeight(qw.view(np.uint32), qz, s, 32), TypeError, ["qweight", "int32"]),
        (lambda qw, qz, s: AWQWeight(qw, qz.astype(np.int64), s, 32), TypeError, ["qzeros", "int32"]),
        (lambda qw, qz, s: AWQWeight(qw, qz, s.astype(np.float32), 32), TypeError, ["scales", "float16"]),
        (lambda qw, qz, s: AWQWeight(qw.tolist(), qz, s, 32), TypeError, ["qweight", "array"]),
        (lambda qw, qz, s: AWQWeight(qw, qz[:-1], s, 32), ValueError, ["qzeros", "(K/G, N/8) = (4, 8)", "(3, 8)"]),
        (lambda qw, qz, s: AWQWeight(qw[:, :-1], qz, s, 32), ValueError, ["qweight", "(K, N/8) = (128, 8)"]),
        (lambda qw, qz, s: AWQWeight(qw, qz, s[:, :-8], 32), ValueError, ["qweight", "(K, N/8) = (128, 7)"]),
        (lambda qw, qz, s: AWQWeight(qw, qz, s, 64), ValueError, ["scales", "(K/G, N) = (2, 64)", "(4, 64)"]),
        (lambda qw, qz, s: AWQWeight(qw, qz, s, 48), ValueError, ["group_size", "48"]),
        (lambda qw, qz, s: AWQWeight(qw[:-32], qz, s, 64), ValueError, ["K = qweight.shape[0] = 96", "group_size"]),
        (lambda qw, qz, s: AWQWeight(qw, qz, s[:, :-4], 32), ValueError, ["N = scales.shape[1] = 60"]),
        (lambda qw, qz, s: AWQWeight(qw[0], qz, s, 32), ValueError, ["qweight", "2-D"]),
    ],
)
def test_awq_weight_validation(make, exc, words):
    with pytest.raises(exc) as info:
        make(*_parts())
    for word in words:
        assert word in str(info.value)


def test_validate_awq_rejects_non_awq():
    with pytest.raises(TypeError, match="awq"):
        validate_awq((1, 2, 3))  # type: ignore[arg-type]
