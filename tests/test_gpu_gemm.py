"""GPU correctness of both W4A16 kernels against a float64 NumPy reference (marked gpu)."""
from __future__ import annotations

import numpy as np
import pytest

from quick_lab.core import configs, registry, variants
from gpu_helpers import run_and_check, weights

pytestmark = pytest.mark.gpu

BATCHES = (1, 2, 7, 16, 33, 64, 100, 128, 257, 1024)
SPLITS = (1, 3, 8)


@pytest.mark.parametrize("kind", configs.KINDS)
@pytest.mark.parametrize("M", BATCHES)
def test_every_batch_size_default_config(kind, M):
    run_and_check(kind, M, 1024, 512, 128)


@pytest.mark.parametrize("cfg", configs.AWQ_VARIANTS, ids=lambda c: c.name)
@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("M", (1, 33, 130))
def test_awq_every_variant_and_split(cfg, split_k, M):
    run_and_check("awq", M, 512, 256, 128, config=cfg, split_k=split_k)


@pytest.mark.parametrize("cfg", configs.QUICK_VARIANTS, ids=lambda c: c.name)
@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("M", (1, 33, 130))
def test_quick_every_variant_and_split(cfg, split_k, M):
    run_and_check("quick", M, 1024, 512, 128, config=cfg, split_k=split_k)


@pytest.mark.parametrize("kind", configs.KINDS)
@pytest.mark.parametrize("G", (32, 64, 128))
@pytest.mark.parametrize("M", (1, 33))
def test_group_sizes(kind, G, M):
    run_and_check(kind, M, 768, 384, G)


@pytest.mark.parametrize("kind", configs.KINDS)
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("M", (1, 16, 128))
def test_llm_shapes(kind, K, N, M):
    run_and_check(kind, M, K, N, 128)


@pytest.mark.parametrize("M", (1, 7, 100, 257))
def test_quick_matches_baseline_within_fp16_rounding(M):
    y_awq, _ = run_and_check("awq", M, 2048, 1024, 128, split_k=1, seed=5)
    y_quick, _ = run_and_check("quick", M, 2048, 1024, 128, split_k=1, seed=5)
    # Same weights, same fp16 dequantization, fp32 accumulation in another order: the outputs differ
    # by a few fp16 ulps at most.
    scale = np.abs(y_awq.astype(np.float32)).max()
    assert np.max(np.abs(y_awq.astype(np.float32) - y_quick.astype(np.float32))) <= 4e-3 * scale


def test_dequantize_kernel_is_bit_exact():
    import cupy
    import quick_lab.core.ops as ops
    from quick_lab.core.format import dequantize_fp16

    host, dev, _ = weights(768, 384, 64)
    w = cupy.asnumpy(ops.dequantize(dev))
    assert np.array_equal(w.view(np.uint16), dequantize_fp16(host).view(np.uint16))


def test_empty_batch_returns_empty():
    import cupy
    import quick_lab.core.ops as ops

    _, dev, _ = weights(512, 256, 128)
    y = ops.awq_gemm(cupy.empty((0, 512), dtype=cupy.float16), dev)
    assert y.shape == (0, 256)


def test_dequantize_quick_transposed_is_bit_exact():
    import cupy
    import quick_lab.core.ops as ops
    from quick_lab.core.format import dequantize_fp16

    host, _, quick = weights(832, 384, 64)  # K = 832: a partial last block of 128 rows
    w_t = cupy.asnumpy(ops.dequantize_quick_t(quick))
    assert np.array_equal(w_t.T.view(np.uint16), dequantize_fp16(host).view(np.uint16))


@pytest.mark.parametrize("M", (1, 33, 300))
def test_fallback_plan_matches_reference(M):
    import cupy
    import quick_lab.core.ops as ops
    from quick_lab.core.format import reference_gemm
    from gpu_helpers import relative_error

    host, _, quick = weights(1024, 512, 128)
    x_host = np.random.default_rng(M).standard_normal((M, 1024)).astype(np.float16)
    out = cupy.full((M, 512), np.nan, dtype=cupy.float16)
    y = cupy.asnumpy(ops.plan_fallback(cupy.asarray(x_host), quick, out=out).run())
    assert np.isfinite(y).all()
    assert relative_error(y, reference_gemm(x_host, host)) < 2e-3


@pytest.mark.parametrize("M", (1, 16, 100, 1024))
def test_public_quick_op_uses_dispatcher_and_is_correct(M):
    # config=None goes through the per-GPU dispatch table (or the heuristic without one)
    run_and_check("quick", M, 4096, 4096, 128)


def test_split_k_is_deterministic_and_leaves_counters_zero():
    import cupy
    import quick_lab.core.ops as ops

    _, _, quick = weights(2048, 1024, 128)
    x = cupy.asarray(np.random.default_rng(3).standard_normal((5, 2048)).astype(np.float16))
    cfg = configs.TileConfig(16, 128, 64, 1, 2, 4, True)
    first = ops.quick_gemm(x, quick, config=cfg, split_k=7)
    for _ in range(5):
        again = ops.quick_gemm(x, quick, config=cfg, split_k=7)
        assert np.array_equal(cupy.asnumpy(again).view(np.uint16), cupy.asnumpy(first).view(np.uint16))
    assert int(ops.tile_counters(1).max()) == 0 and int(ops.tile_counters(1).min()) == 0


def test_plan_reports_the_compiled_variants_resources():
    import cupy
    import quick_lab.core.ops as ops

    _, _, quick = weights(1024, 512, 128)
    cfg = configs.TileConfig(64, 256, 64, 1, 4, 4, True)
    plan = ops.plan_quick_gemm(cupy.zeros((3, 1024), dtype=cupy.float16) + 1, quick, config=cfg, split_k=1)
    res = plan.resources
    assert res["threads"] == 128
    assert 64 <= res["registers"] <= 255
    assert res["smem_bytes"] >= registry.shared_bytes("quick", cfg)


def test_compile_error_names_the_kernel_and_shows_the_log(tmp_path, monkeypatch):
    from quick_lab.build import loader, sources

    (tmp_path / "broken.cu").write_text('extern "C" __global__ void broken() { this_is_not_cuda; }\n')
    monkeypatch.setattr(sources, "KERNEL_DIR", tmp_path)
    with pytest.raises(loader.KernelCompileError, match=r"(?s)compiling broken from kernels/broken\.cu failed.*this_is_not_cuda"):
        loader._compile("broken.cu", (), "broken")


@pytest.mark.parametrize("kind", configs.KINDS)
@pytest.mark.parametrize("M", (1, 40))
def test_default_configs_cover_n_not_a_multiple_of_128(kind, M):
    run_and_check(kind, M, 256, 192, 32)


# ---------------------------------------------------------------- Hopper wgmma mainloop (sm_90a)

@pytest.fixture
def hopper():
    """Skips unless the current GPU is compute capability 9.0: the wgmma kernel is built for sm_90a."""
    import cupy

    cc = cupy.cuda.Device().compute_capability
    if cc != "90":
        pytest.skip(f"the wgmma mainloop needs a compute capability 9.0 GPU (sm_90a); this one is {cc}")


def _wgmma_cases(cfg):
    """(M, K, N, G, split_k) per wgmma config: batch 1 / 7 / 33 / 1000, stream-K (0), split-K 1 and 3,
    odd multiples of tile_n, a tile shared by many stream-K blocks (few tiles, 64 k-tiles), and G = 64."""
    tn, S = cfg.tile_n, configs.STREAM_K
    return [
        (1, 512, 3 * tn, 128, S),
        (7, 1024, tn, 128, 1),        # one block per tile: no workspace, no fix-up
        (33, 1024, 5 * tn, 128, 3),   # split-K 3 of 16 (or 8) k-tiles: blocks straddle tile boundaries
        (33, 4096, 3 * tn, 128, S),   # few tiles, many resident blocks: each tile summed from many partials
        (1000, 512, 4096, 128, 3),
        (7, 768, 3 * tn, 64, S),
        (33, 768, 5 * tn, 64, 3),
    ]


_WGMMA_CASES = [(cfg, *case) for cfg in configs.QUICK_WGMMA_VARIANTS for case in _wgmma_cases(cfg)]


@pytest.mark.parametrize("cfg,M,K,N,G,split_k", _WGMMA_CASES,
                         ids=[f"{c.name}-M{m}-K{k}-N{n}-G{g}-s{s}" for c, m, k, n, g, s in _WGMMA_CASES])
def test_wgmma_every_variant(hopper, cfg, M, K, N, G, split_k):
    if not registry.fits(cfg, N, G):
        pytest.skip(f"{cfg.name} does not run group size {G} (registry.fits)")
    run_and_check("quick", M, K, N, G, config=cfg, split_k=split_k)


def _many_tiles_n(cfg, M: int, tiles: int = 1024) -> int:
    """An N (a multiple of tile_n, at least 4096) that gives the M x N output at least ``tiles`` tiles."""
    tiles_m = -(-M // cfg.tile_m)
    return max(4096, cfg.tile_n * -(-tiles // tiles_m))


@pytest.mark.parametrize("cfg", configs.QUICK_WGMMA_VARIANTS, ids=lambda c: c.name)
def test_wgmma_stream_k_blocks_span_several_tiles(hopper, cfg):
    import cupy
    import quick_lab.core.ops as ops

    M, K = 1000, 512
    N = _many_tiles_n(cfg, M)
    _, _, quick = weights(K, N, 128)
    plan = ops.plan_quick_gemm(cupy.zeros((M, K), dtype=cupy.float16), quick, config=cfg,
                               split_k=configs.STREAM_K)
    tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
    assert plan._grid[0] < tiles, f"{plan._grid[0]} blocks for {tiles} tiles: the case does not test the span"
    run_and_check("quick", M, K, N, 128, config=cfg, split_k=configs.STREAM_K)


@pytest.mark.parametrize("cfg,M,K,N", [
    (configs.TileConfig(16, 256, 64, 1, 4, 8, True, True), 5, 4096, 1024),   # 4 tiles over many blocks
    (configs.TileConfig(64, 128, 64, 1, 4, 4, wgmma=True), 1000, 512, 4096),  # blocks cross tiles
], ids=lambda v: v.name if isinstance(v, configs.TileConfig) else str(v))
def test_wgmma_stream_k_is_deterministic_and_leaves_counters_zero(hopper, cfg, M, K, N):
    import cupy
    import quick_lab.core.ops as ops
    from quick_lab.core.format import reference_gemm
    from gpu_helpers import REL_TOL, relative_error

    host, _, quick = weights(K, N, 128)
    x_host = np.random.default_rng(M).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    plan = ops.plan_quick_gemm(x, quick, config=cfg, split_k=configs.STREAM_K)
    tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
    # the schedule must share tiles between blocks, or the fix-up and its counters are not exercised
    assert plan._grid[0] not in (1, tiles) and plan._args[6] is not None
    first = cupy.asnumpy(ops.quick_gemm(x, quick, config=cfg, split_k=configs.STREAM_K))
    assert relative_error(first, reference_gemm(x_host, host)) < REL_TOL
    for _ in range(3):
        out = cupy.full((M, N), np.nan, dtype=cupy.float16)
        again = cupy.asnumpy(ops.quick_gemm(x, quick, config=cfg, split_k=configs.STREAM_K, out=out))
        assert np.array_equal(again.view(np.uint16), first.view(np.uint16))
    counters = ops.tile_counters(tiles)
    assert counters.size >= tiles and not bool(counters.any()), "a stream-K tile counter was left nonzero"


def test_wgmma_config_is_refused_off_hopper():
    import cupy

    cc = cupy.cuda.Device().compute_capability
    if cc == "90":
        pytest.skip("a compute capability 9.0 GPU runs the wgmma kernel")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        variants.gemm_kernel("quick", configs.QUICK_WGMMA_VARIANTS[0])
