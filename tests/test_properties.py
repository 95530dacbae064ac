"""Property tests (hypothesis): format and layout invariants on random shapes (CPU), and both GEMM
kernels against a float64 reference on random shapes, configs and split-K (GPU).

Examples are random on every run (derandomize=False); a failure prints the falsifying example and the
``@reproduce_failure`` / ``--hypothesis-seed`` needed to replay it.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quick_lab.core import configs, registry
from quick_lab.core.format import (
    dequantize,
    dequantize_fp16,
    pack_int4,
    quantize,
    quantize_awq,
    random_awq,
    unpack_int4,
)
from quick_lab.core.interleave import K_BLOCK, N_BLOCK, deinterleave, interleave, lane_fragments

CPU = settings(max_examples=40, deadline=None, derandomize=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GROUPS = st.sampled_from((32, 64, 128))
SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def awq_shapes(draw, max_groups: int = 8, max_n64: int = 8):
    """(K, N, G): K a multiple of G (hence of 16), N a multiple of 64."""
    G = draw(GROUPS)
    K = G * draw(st.integers(1, max_groups))
    N = N_BLOCK * draw(st.integers(1, max_n64))
    return K, N, G


# ---------------------------------------------------------------- packing


@CPU
@given(rows=st.integers(1, 64), words=st.integers(1, 32), seed=SEEDS)
def test_unpack_inverts_pack(rows, words, seed):
    q = np.random.default_rng(seed).integers(0, 16, size=(rows, 8 * words), dtype=np.uint8)
    packed = pack_int4(q)
    assert packed.dtype == np.int32 and packed.shape == (rows, words)
    np.testing.assert_array_equal(unpack_int4(packed), q)


@CPU
@given(rows=st.integers(1, 64), words=st.integers(1, 32), seed=SEEDS)
def test_pack_inverts_unpack(rows, words, seed):
    w = np.random.default_rng(seed).integers(-(2**31), 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    np.testing.assert_array_equal(pack_int4(unpack_int4(w)), w)


# ---------------------------------------------------------------- quantization


@CPU
@given(shape=awq_shapes(), seed=SEEDS, scale=st.floats(1e-3, 1e2), offset=st.floats(-10.0, 10.0))
def test_quantize_dequantize_error_is_at_most_half_a_step(shape, seed, scale, offset):
    K, N, G = shape
    w = (np.random.default_rng(seed).standard_normal((K, N)) * scale + offset).astype(np.float32)
    q, z, s = quantize(w, G)
    assert q.max() <= 15 and z.max() <= 15 and np.all(np.isfinite(s)) and np.all(s > 0)
    awq = quantize_awq(w, G)
    step = np.repeat(awq.scales.astype(np.float32), G, axis=0)
    err = np.abs(w - dequantize(awq))
    # half a quantization step, plus float32 rounding of w itself and of (q - z) * s
    assert np.all(err <= step / 2 * (1 + 1e-3) + 1e-6 * np.abs(w) + 1e-6), float((err / step).max())


# ---------------------------------------------------------------- the QUICK layout


@CPU
@given(shape=awq_shapes(), seed=SEEDS)
def test_deinterleave_inverts_interleave(shape, seed):
    K, N, G = shape
    awq = random_awq(K, N, G, seed=seed)
    quick = interleave(awq)
    assert quick.qweight.shape == (K // K_BLOCK, 2 * N) and quick.qweight.dtype == np.int32
    back = deinterleave(quick)
    for name in ("qweight", "qzeros", "scales"):
        np.testing.assert_array_equal(getattr(back, name), getattr(awq, name), err_msg=name)
    assert back.group_size == G


@CPU
@given(shape=awq_shapes(), seed=SEEDS)
def test_interleave_inverts_deinterleave(shape, seed):
    K, N, G = shape
    quick = interleave(random_awq(K, N, G, seed=seed))
    rng = np.random.default_rng(seed ^ 0x5A5A)
    scrambled = type(quick)(
        rng.integers(-(2**31), 2**31, size=quick.qweight.shape, dtype=np.int64).astype(np.int32),
        rng.integers(-(2**31), 2**31, size=quick.qzeros.shape, dtype=np.int64).astype(np.int32),
        quick.scales[:, rng.permutation(N)], G)
    again = interleave(deinterleave(scrambled))
    for name in ("qweight", "qzeros", "scales"):
        np.testing.assert_array_equal(getattr(again, name), getattr(scrambled, name), err_msg=name)


@CPU
@given(shape=awq_shapes(), seed=SEEDS, data=st.data())
def test_lane_fragments_are_the_weights(shape, seed, data):
    K, N, G = shape
    awq = random_awq(K, N, G, seed=seed)
    W = dequantize_fp16(awq)
    quick = interleave(awq)
    kb = data.draw(st.integers(0, K // K_BLOCK - 1), label="kb")
    nb = data.draw(st.integers(0, N // N_BLOCK - 1), label="nb")
    frag = lane_fragments(quick, kb, nb)
    k, n, value = frag["k"], frag["n"], frag["value"]
    assert value.shape == (32, 8, 2, 2)
    # every slot of the block exactly once
    assert len({(a, b) for a, b in zip(k.ravel(), n.ravel())}) == K_BLOCK * N_BLOCK
    assert k.min() == kb * K_BLOCK and n.min() == nb * N_BLOCK
    np.testing.assert_array_equal(value.view(np.uint16), W[k, n].view(np.uint16))


# ---------------------------------------------------------------- GPU: both kernels vs float64

GPU = settings(max_examples=25, deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
REL_TOL = 2e-3  # tests/gpu_helpers.REL_TOL: relative Frobenius error vs the float64 reference


@st.composite
def gemm_problems(draw):
    """M in 1..2048, K a multiple of 128 up to 4096, N a multiple of 128 up to 2048, G in {32, 64, 128}."""
    M = draw(st.integers(1, 2048), label="M")
    K = 128 * draw(st.integers(1, 32), label="K/128")
    N = 128 * draw(st.integers(1, 16), label="N/128")
    G = draw(GROUPS, label="G")
    return M, K, N, G


def _valid_variants(kind: str, K: int, N: int, G: int):
    return [c for c in registry.variants(kind) if N % c.tile_n == 0 and G % c.tile_k == 0 and K % c.tile_k == 0]


def _check_kernel(kind: str, problem, data):
    import cupy
    import quick_lab.core.ops as ops

    M, K, N, G = problem
    seed = data.draw(SEEDS, label="seed")
    host = random_awq(K, N, G, seed=seed)
    weight = ops.to_device(host if kind == "awq" else interleave(host))
    gemm = ops.awq_gemm if kind == "awq" else ops.quick_gemm
    x_host = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    # float64 reference on the GPU (same definition as format.reference_gemm: x @ dequantize_fp16(W))
    ref = cupy.asarray(x_host).astype(cupy.float64) @ cupy.asarray(dequantize_fp16(host)).astype(cupy.float64)
    ref_norm = float(cupy.linalg.norm(ref))

    variants = _valid_variants(kind, K, N, G)
    cfg = data.draw(st.sampled_from(variants), label="config")
    k_tiles = K // cfg.tile_k
    split = data.draw(st.integers(1, min(k_tiles, 16)), label="split_k")
    for label, kwargs in (("default", {}), (f"{cfg.name} split {split}", dict(config=cfg, split_k=split))):
        out = cupy.full((M, N), np.nan, dtype=cupy.float16)
        y = gemm(x, weight, out=out, **kwargs)
        assert y.shape == (M, N)
        assert bool(cupy.isfinite(y).all()), f"{kind} {label} M={M} K={K} N={N} G={G}: NaN/Inf (unwritten?)"
        err = float(cupy.linalg.norm(y.astype(cupy.float64) - ref)) / ref_norm
        assert err < REL_TOL, f"{kind} {label} M={M} K={K} N={N} G={G}: relative error {err:.2e}"


@pytest.mark.gpu
@GPU
@given(problem=gemm_problems(), data=st.data())
def test_awq_kernel_matches_float64_on_random_shapes(problem, data):
    _check_kernel("awq", problem, data)


@pytest.mark.gpu
@GPU
@given(problem=gemm_problems(), data=st.data())
def test_quick_kernel_matches_float64_on_random_shapes(problem, data):
    _check_kernel("quick", problem, data)


def test_every_drawn_problem_has_a_variant():
    # the GPU properties draw a variant from this list: it must never be empty
    for kind in configs.KINDS:
        for G in (32, 64, 128):
            assert _valid_variants(kind, 128, 128, G), (kind, G)
