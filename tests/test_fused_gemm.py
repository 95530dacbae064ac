"""The decode GEMMs with the decoder's neighbouring ops fused in (kernels/quick_decode.cu
quick_decode_fused, quick_lab.model.fused_gemm): each form against the unfused kernels it replaces on the
same config and split (bit for bit where the arithmetic is the same, within fp32 reordering where only the
row statistics' summation order differs) and against a float64 reference; a fused model against the
unfused one and the NumPy reference. CPU: the prebuilt instantiations and the launch rules."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_helpers import REL_TOL, relative_error, weights
from quick_lab.build.sources import SUPPORT_TEMPLATES
from quick_lab.core import dispatch
from quick_lab.core.configs import TileConfig
from quick_lab.model import fused_gemm
from quick_lab.model.fused_gemm import LOAD_PLAIN, LOAD_RMS_NORM, LOAD_SILU_MUL, STORE_PLAIN, STORE_RESIDUAL

FORMS = ((LOAD_RMS_NORM, STORE_PLAIN), (LOAD_PLAIN, STORE_RESIDUAL), (LOAD_SILU_MUL, STORE_RESIDUAL))


# ---------------------------------------------------------------- CPU


def test_the_heuristics_decode_tiles_are_prebuilt_in_every_form_a_layer_uses():
    built = set(SUPPORT_TEMPLATES["quick_decode.cu"])
    want = {fused_gemm.fused_kernel_name(TileConfig.parse(name), load, store)
            for name in dispatch.DECODE_TILES for load, store in FORMS}
    assert built == want


def test_only_decode_configs_have_fused_forms():
    assert fused_gemm.is_decode_config(TileConfig.parse("8x64x256_w1x4_s1_dc"))
    assert not fused_gemm.is_decode_config(TileConfig.parse("16x128x32_w1x2_s2"))
    assert not fused_gemm.is_decode_config(None)
    assert fused_gemm.fused_kernel_name(TileConfig.parse("16x64x512_w1x8_s1_dc"), 2, 1) == \
        "quick_decode_fused<16,512,8,2,1>"


def test_fused_instantiations_build_without_spills():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from quick_lab.build import nvrtc

    names = tuple(SUPPORT_TEMPLATES["quick_decode.cu"][:3])
    lowered, log = nvrtc.compile_source("quick_decode.cu", names, "sm_90")
    usage = nvrtc.parse_ptxas_log(log)
    for name in names:
        u = usage[lowered[name]]
        assert u["spill_st"] == u["spill_ld"] == 0 and u["registers"] <= 255, (name, u)


# ---------------------------------------------------------------- GPU

CASES = [("8x64x256_w1x4_s1_dc", 1, 1, 128), ("8x64x256_w1x4_s1_dc", 7, 3, 32),
         ("16x64x512_w1x8_s1_dc", 16, 2, 128), ("32x64x128_w1x4_s1_dc", 29, 4, 64)]
K, N = 1024, 448  # 7 strips


def _rng(seed):
    return np.random.default_rng(seed)


def _fp16(cupy, a):
    return cupy.asarray(np.asarray(a, dtype=np.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("name,M,split,G", CASES)
def test_norm_in_load_is_add_rms_norm_then_the_gemm(name, M, split, G):
    import cupy

    from quick_lab.core import ops
    from quick_lab.core.format import reference_gemm
    from quick_lab.model import fused

    cfg = TileConfig.parse(name)
    host, _, quick = weights(K, N, G)
    rng = _rng(M)
    h = _fp16(cupy, rng.standard_normal((M, K)) * 3)
    gamma = _fp16(cupy, 1 + 0.1 * rng.standard_normal(K))
    eps = 1e-5
    sum_sq = (h.astype(cupy.float32) ** 2).sum(axis=1)
    fused_out = fused_gemm.decode_gemm(h, quick, cfg, split, load=LOAD_RMS_NORM, norm_weight=gamma, sum_sq=sum_sq,
                                       eps=eps)
    x = fused.add_rms_norm(h.copy(), gamma, eps)
    unfused = ops.quick_gemm(x, quick, config=cfg, split_k=split)
    got, want = cupy.asnumpy(fused_out), cupy.asnumpy(unfused)
    assert np.isfinite(got).all()
    assert relative_error(got, want.astype(np.float64)) < 1e-3  # the row sums differ only in summation order
    h64 = cupy.asnumpy(h).astype(np.float64)
    x64 = h64 / np.sqrt((h64 ** 2).mean(axis=1, keepdims=True) + eps) * cupy.asnumpy(gamma).astype(np.float64)
    assert relative_error(got, reference_gemm(x64, host)) < REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name,M,split,G", CASES)
def test_residual_out_adds_as_add_rms_norm_rounds_and_leaves_the_row_sums(name, M, split, G):
    import cupy

    from quick_lab.core import ops

    cfg = TileConfig.parse(name)
    _, _, quick = weights(K, N, G)
    rng = _rng(100 + M)
    x = _fp16(cupy, rng.standard_normal((M, K)))
    h0 = _fp16(cupy, rng.standard_normal((M, N)) * 4)
    h = h0.copy()
    sum_sq_out = cupy.zeros(M, dtype=cupy.float32)
    clear = cupy.full(M, 7.0, dtype=cupy.float32)
    back = fused_gemm.decode_gemm(x, quick, cfg, split, store=STORE_RESIDUAL, residual=h, sum_sq_out=sum_sq_out,
                                  sum_sq_clear=clear)
    assert back is h
    y = ops.quick_gemm(x, quick, config=cfg, split_k=split)
    want = (h0.astype(cupy.float32) + y.astype(cupy.float32)).astype(cupy.float16)
    np.testing.assert_array_equal(cupy.asnumpy(h), cupy.asnumpy(want))
    np.testing.assert_allclose(cupy.asnumpy(sum_sq_out), cupy.asnumpy((h.astype(cupy.float32) ** 2).sum(axis=1)),
                               rtol=1e-5)
    assert not cupy.asnumpy(clear).any()


@pytest.mark.gpu
@pytest.mark.parametrize("name,M,split,G", CASES)
def test_silu_in_load_with_residual_out_is_silu_mul_then_the_gemm_then_the_add(name, M, split, G):
    import cupy

    from quick_lab.core import ops
    from quick_lab.model import fused

    cfg = TileConfig.parse(name)
    _, _, quick = weights(K, N, G)
    rng = _rng(200 + M)
    gate_up = _fp16(cupy, rng.standard_normal((M, 2 * K)) * 2)
    h0 = _fp16(cupy, rng.standard_normal((M, N)))
    plain = fused_gemm.decode_gemm(gate_up, quick, cfg, split, load=LOAD_SILU_MUL)
    unfused = ops.quick_gemm(fused.silu_mul(gate_up), quick, config=cfg, split_k=split)
    np.testing.assert_array_equal(cupy.asnumpy(plain), cupy.asnumpy(unfused))  # the same B, the same sums
    h = h0.copy()
    fused_gemm.decode_gemm(gate_up, quick, cfg, split, load=LOAD_SILU_MUL, store=STORE_RESIDUAL, residual=h,
                           sum_sq_out=cupy.zeros(M, cupy.float32), sum_sq_clear=cupy.zeros(M, cupy.float32))
    want = (h0.astype(cupy.float32) + unfused.astype(cupy.float32)).astype(cupy.float16)
    np.testing.assert_array_equal(cupy.asnumpy(h), cupy.asnumpy(want))


@pytest.mark.gpu
def test_decode_gemm_rejects_bad_arguments():
    import cupy

    _, _, quick = weights(K, N, 128)
    cfg = TileConfig.parse("8x64x256_w1x4_s1_dc")
    x = cupy.zeros((2, K), dtype=cupy.float16)
    with pytest.raises(TypeError, match="weight must be a QuickWeight"):
        fused_gemm.decode_gemm(x, object(), cfg, 1)
    with pytest.raises(ValueError, match="decode-kernel config"):
        fused_gemm.decode_gemm(x, quick, TileConfig.parse("16x128x32_w1x2_s2"), 1)
    with pytest.raises(ValueError, match="load must be"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, load=5)
    with pytest.raises(ValueError, match=r"x must be .* shape \(2, 2048\)"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, load=LOAD_SILU_MUL)
    with pytest.raises(ValueError, match="M must be at most tile_m = 8"):
        fused_gemm.decode_gemm(cupy.zeros((9, K), dtype=cupy.float16), quick, cfg, 1)
    with pytest.raises(ValueError, match="norm_weight"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, load=LOAD_RMS_NORM, sum_sq=cupy.zeros(2, cupy.float32))
    with pytest.raises(ValueError, match="sum_sq must be"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, load=LOAD_RMS_NORM, norm_weight=cupy.zeros(K, cupy.float16),
                               sum_sq=cupy.zeros(1, cupy.float32))
    with pytest.raises(ValueError, match="residual"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=STORE_RESIDUAL, residual=cupy.zeros((2, 64), cupy.float16))
    with pytest.raises(ValueError, match="sum_sq_clear"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=STORE_RESIDUAL, residual=cupy.zeros((2, N), cupy.float16),
                               sum_sq_out=cupy.zeros(2, cupy.float32))


@pytest.mark.gpu
def test_a_fused_model_matches_the_unfused_one_and_the_reference():
    """Tiny Llama (GQA), QUICK backend: prefill then cached decode steps, fused (every layer's GEMMs on the
    decode kernel: asserted) and unfused, against each other and the float64 NumPy reference."""
    import cupy

    from quick_lab.model.config import ModelConfig
    from quick_lab.model.decoder import Model
    from quick_lab.model.reference import reference_forward
    from quick_lab.model.weights import random_weights

    cfg = ModelConfig(hidden=512, intermediate=1024, n_heads=8, n_kv_heads=2, n_layers=3, vocab=320,
                      rope_theta=1e4, name="tiny-fused")
    w = random_weights(cfg, seed=21)
    fused_model, plain_model = Model(w, backends=("quick",)), Model(w, backends=("quick",), fuse=False)
    assert all(fused_model.fused_launches(i, 3, "quick") is not None for i in range(cfg.n_layers))
    assert plain_model.fused_launches(1, 3, "quick") is None and fused_model.fused_launches(1, 3, "fp16") is None
    tokens = np.random.default_rng(22).integers(0, cfg.vocab, (3, 14), dtype=np.int32)
    ref = reference_forward(w, tokens)
    caches = {m: m.new_cache(3, 16) for m in (fused_model, plain_model)}
    for m, cache in caches.items():  # prefill 10 tokens (30 rows: the 32-row decode tile, fused too)
        m.last = cupy.asnumpy(m.forward(cupy.asarray(tokens[:, :10]), cache, 0, "quick"))
    assert relative_error(fused_model.last, plain_model.last.astype(np.float64)) < 2e-3
    for t in range(10, 14):
        steps = {m: cupy.asnumpy(m.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, "quick"))
                 for m, cache in caches.items()}
        assert np.isfinite(steps[fused_model]).all()
        assert relative_error(steps[fused_model], steps[plain_model].astype(np.float64)) < 2e-3, t
        assert relative_error(steps[fused_model], ref[:, t]) < 2e-2, t
