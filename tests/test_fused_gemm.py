"""The decode GEMMs with the decoder's neighbouring ops fused into their tails (kernels/quick_decode.cu
quick_decode_fused, quick_lab.model.fused_gemm): each tail against the unfused kernels it replaces on the
same config and split (bit for bit where the arithmetic is the same, within fp32 reordering where only the
row statistics' summation order differs) and against a float64 reference; a fused model against the
unfused one and the NumPy reference. CPU: the prebuilt instantiations and the names."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_helpers import REL_TOL, relative_error, weights
from quick_lab.build.sources import SUPPORT_TEMPLATES
from quick_lab.core import dispatch
from quick_lab.core.configs import TileConfig
from quick_lab.model import fused_gemm
from quick_lab.model.fused_gemm import STORE_RESIDUAL_NORM, STORE_SILU_PAIR


# ---------------------------------------------------------------- CPU


def test_the_heuristics_decode_tiles_are_prebuilt_with_both_tails():
    built = set(SUPPORT_TEMPLATES["quick_decode.cu"])
    want = {fused_gemm.fused_kernel_name(TileConfig.parse(name), store)
            for name in dispatch.DECODE_TILES for store in (STORE_RESIDUAL_NORM, STORE_SILU_PAIR)}
    assert built == want


def test_only_decode_configs_have_fused_tails():
    assert fused_gemm.is_decode_config(TileConfig.parse("8x64x256_w1x4_s1_dc"))
    assert not fused_gemm.is_decode_config(TileConfig.parse("16x128x32_w1x2_s2"))
    assert not fused_gemm.is_decode_config(None)
    assert fused_gemm.fused_kernel_name(TileConfig.parse("16x64x512_w1x8_s1_dc"), STORE_SILU_PAIR) == \
        "quick_decode_fused<16,512,8,2>"


def test_fused_tails_build_without_spills_or_extra_registers():
    """The tails run after the main loop: the same registers as the plain decode kernel."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from quick_lab.build import nvrtc
    from quick_lab.core import variants

    cfg = TileConfig.parse("8x64x256_w1x4_s1_dc")
    names = tuple(fused_gemm.fused_kernel_name(cfg, s) for s in (STORE_RESIDUAL_NORM, STORE_SILU_PAIR))
    lowered, log = nvrtc.compile_source("quick_decode.cu", names, "sm_90")
    usage = nvrtc.parse_ptxas_log(log)
    plain = variants.compile_variants("quick", (cfg,), "sm_90")[0]
    for name in names:
        u = usage[lowered[name]]
        assert u["spill_st"] == u["spill_ld"] == 0 and u["registers"] <= plain.registers + 8, (name, u)


# ---------------------------------------------------------------- GPU

CASES = [("8x64x256_w1x4_s1_dc", 1, 1, 128), ("8x64x256_w1x4_s1_dc", 7, 3, 32),
         ("16x64x512_w1x8_s1_dc", 16, 2, 128), ("32x64x128_w1x4_s1_dc", 29, 4, 64)]
K, N = 1024, 896  # 14 strips: 7 (gate, up) pairs


def _fp16(cupy, a):
    return cupy.asarray(np.asarray(a, dtype=np.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("name,M,split,G", CASES)
def test_residual_norm_tail_is_the_gemm_then_add_rms_norm(name, M, split, G):
    import cupy

    from quick_lab.core import ops
    from quick_lab.model import fused

    cfg = TileConfig.parse(name)
    _, _, quick = weights(K, N, G)
    rng = np.random.default_rng(100 + M)
    x = _fp16(cupy, rng.standard_normal((M, K)))
    h0 = _fp16(cupy, rng.standard_normal((M, N)) * 4)
    gamma = _fp16(cupy, 1 + 0.1 * rng.standard_normal(N))
    eps = 1e-5
    h = h0.copy()
    sum_sq = cupy.zeros(M + 3, dtype=cupy.float32)
    normed = fused_gemm.decode_gemm(x, quick, cfg, split, store=STORE_RESIDUAL_NORM, residual=h, sum_sq=sum_sq,
                                    norm_weight=gamma, eps=eps)
    y = ops.quick_gemm(x, quick, config=cfg, split_k=split)
    h_want = h0.copy()
    x_want = fused.add_rms_norm(h_want, gamma, eps, delta=y)  # h_want += y, then the norm
    np.testing.assert_array_equal(cupy.asnumpy(h), cupy.asnumpy(h_want))
    got = cupy.asnumpy(normed)
    assert np.isfinite(got).all()
    diff = np.abs(got.astype(np.float64) - cupy.asnumpy(x_want).astype(np.float64))
    assert diff.max() <= 2 * np.abs(cupy.asnumpy(x_want)).max() * 2.0 ** -10  # an ulp or two of the row sum's order
    h64 = cupy.asnumpy(h).astype(np.float64)
    ref = h64 / np.sqrt((h64 ** 2).mean(axis=1, keepdims=True) + eps) * cupy.asnumpy(gamma).astype(np.float64)
    assert relative_error(got, ref) < REL_TOL
    assert not cupy.asnumpy(sum_sq).any()  # left zero for the next launch
    assert int(ops.tile_counters(N // 64 + 1).max()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name,M,split,G", CASES)
def test_silu_pair_tail_is_the_gemm_then_silu_mul(name, M, split, G):
    import cupy

    from quick_lab.core import ops
    from quick_lab.core.format import reference_gemm
    from quick_lab.model import fused

    cfg = TileConfig.parse(name)
    host, _, quick = weights(K, N, G)
    rng = np.random.default_rng(200 + M)
    x_host = rng.standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    act = fused_gemm.decode_gemm(x, quick, cfg, split, store=STORE_SILU_PAIR)
    gate_up = ops.quick_gemm(x, quick, config=cfg, split_k=split)
    want = fused.silu_mul(gate_up)
    assert act.shape == (M, N // 2)
    np.testing.assert_array_equal(cupy.asnumpy(act), cupy.asnumpy(want))  # the same product, the same formula
    y = reference_gemm(x_host.astype(np.float64), host)
    g, u = y[:, :N // 2], y[:, N // 2:]
    assert relative_error(cupy.asnumpy(act), g / (1 + np.exp(-g)) * u) < 5e-3
    assert int(ops.tile_counters(N // 64 + N // 128).max()) == 0


@pytest.mark.gpu
def test_decode_gemm_rejects_bad_arguments():
    import cupy

    _, _, quick = weights(K, N, 128)
    cfg = TileConfig.parse("8x64x256_w1x4_s1_dc")
    x = cupy.zeros((2, K), dtype=cupy.float16)
    ok = dict(residual=cupy.zeros((2, N), cupy.float16), sum_sq=cupy.zeros(2, cupy.float32),
              norm_weight=cupy.ones(N, cupy.float16))
    with pytest.raises(TypeError, match="weight must be a QuickWeight"):
        fused_gemm.decode_gemm(x, object(), cfg, 1, store=STORE_SILU_PAIR)
    with pytest.raises(ValueError, match="decode-kernel config"):
        fused_gemm.decode_gemm(x, quick, TileConfig.parse("16x128x32_w1x2_s2"), 1, store=STORE_SILU_PAIR)
    with pytest.raises(ValueError, match="store must be"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=0)
    with pytest.raises(ValueError, match=r"x must be .* shape \(2, 1024\)"):
        fused_gemm.decode_gemm(cupy.zeros((2, 2 * K), cupy.float16), quick, cfg, 1, store=STORE_SILU_PAIR)
    with pytest.raises(ValueError, match="M must be at most tile_m = 8"):
        fused_gemm.decode_gemm(cupy.zeros((9, K), dtype=cupy.float16), quick, cfg, 1, store=STORE_SILU_PAIR)
    with pytest.raises(TypeError, match="norm_weight must be a cupy.ndarray"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=STORE_RESIDUAL_NORM, **{**ok, "norm_weight": None})
    with pytest.raises(ValueError, match="sum_sq must be"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=STORE_RESIDUAL_NORM, **{**ok, "sum_sq": cupy.zeros(1)})
    with pytest.raises(ValueError, match=r"residual must be .* shape \(2, 896\)"):
        fused_gemm.decode_gemm(x, quick, cfg, 1, store=STORE_RESIDUAL_NORM,
                               **{**ok, "residual": cupy.zeros((2, 64), cupy.float16)})
    _, _, odd = weights(K, 192, 128)  # 3 strips: no (gate, up) halves of whole strips
    with pytest.raises(ValueError, match="multiple of 128"):
        fused_gemm.decode_gemm(x, odd, cfg, 1, store=STORE_SILU_PAIR)


@pytest.mark.gpu
def test_a_fused_model_matches_the_unfused_one_and_the_reference():
    """Tiny Llama (GQA), QUICK backend: prefill then cached decode steps, fused (every layer's GEMMs on the
    decode kernel: asserted) and unfused, against each other and the float64 NumPy reference."""
    import cupy

    from quick_lab.model.config import ModelConfig
    from quick_lab.model.decoder import FUSE_MAX_ROWS, Model
    from quick_lab.model.reference import reference_forward
    from quick_lab.model.weights import random_weights

    cfg = ModelConfig(hidden=512, intermediate=1024, n_heads=8, n_kv_heads=2, n_layers=3, vocab=320,
                      rope_theta=1e4, name="tiny-fused")
    w = random_weights(cfg, seed=21)
    fused_model, plain_model = Model(w, backends=("quick",)), Model(w, backends=("quick",), fuse=False)
    assert all(fused_model.fused_launches(i, 3, "quick") is not None for i in range(cfg.n_layers))
    assert plain_model.fused_launches(1, 3, "quick") is None and fused_model.fused_launches(1, 3, "fp16") is None
    assert fused_model.fused_launches(1, FUSE_MAX_ROWS + 1, "quick") is None
    tokens = np.random.default_rng(22).integers(0, cfg.vocab, (3, 14), dtype=np.int32)
    ref = reference_forward(w, tokens)
    caches = {m: m.new_cache(3, 16) for m in (fused_model, plain_model)}
    first = {m: cupy.asnumpy(m.forward(cupy.asarray(tokens[:, :4]), cache, 0, "quick"))  # 12 rows: fused
             for m, cache in caches.items()}
    assert relative_error(first[fused_model], first[plain_model].astype(np.float64)) < 2e-3
    assert relative_error(first[fused_model], ref[:, 3]) < 2e-2
    for t in range(4, 9):
        steps = {m: cupy.asnumpy(m.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, "quick"))
                 for m, cache in caches.items()}
        assert np.isfinite(steps[fused_model]).all()
        assert relative_error(steps[fused_model], steps[plain_model].astype(np.float64)) < 2e-3, t
        assert relative_error(steps[fused_model], ref[:, t]) < 2e-2, t
    full = cupy.asnumpy(fused_model.forward(cupy.asarray(tokens[:, :5]), fused_model.new_cache(3, 16), 0, "quick",
                                            last_only=False))  # 15 rows fused, every position's logits
    assert relative_error(full, ref[:, :5]) < 2e-2
