"""The decode kernel family (kernels/quick_decode.cu, names ending in ``_dc``): M <= tile_m (8 or 16), a
split-K GEMV on mma.sync with the weights as the A operand, streaming the QUICK layout into registers.
Rules and builds on any machine; correctness on a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_helpers import run_and_check, weights
from quick_lab.core import configs, dispatch, registry, validation, variants
from quick_lab.core.configs import TileConfig

DECODE = configs.QUICK_DECODE_VARIANTS
BASE = TileConfig.parse("16x64x256_w1x4_s1_dc")


def test_names_round_trip_and_select_the_decode_family():
    for cfg in DECODE:
        assert cfg.name.endswith("_dc") and TileConfig.parse(cfg.name) == cfg
        assert registry.family("quick", cfg) is registry.QUICK_DECODE
        assert registry.template_name("quick", cfg) == (
            f"quick_decode<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},{cfg.stages}>")
    assert set(DECODE) <= set(registry.variants("quick"))


@pytest.mark.parametrize("cfg,rule", [
    (TileConfig(64, 64, 512, 1, 4, 1, decode=True), "8, 16 or 32 x 64"),
    (TileConfig(16, 128, 512, 1, 4, 1, decode=True), "8, 16 or 32 x 64"),
    (TileConfig(32, 64, 256, 1, 8, 1, decode=True), "at most 48 KB"),
    (TileConfig(16, 64, 512, 1, 3, 1, decode=True), "2, 4 or 8 warps"),
    (TileConfig(16, 64, 96, 1, 4, 1, decode=True), "whole k16 steps"),
    (TileConfig(8, 64, 1024, 1, 4, 1, decode=True), "at most 8"),
    (TileConfig(16, 64, 512, 1, 4, 4, decode=True), "stages 1, 2 or 3"),
])
def test_rules(cfg, rule):
    assert any(rule in v for v in registry.violations("quick", cfg)), registry.violations("quick", cfg)


def test_problem_rules_allow_a_k_tile_across_groups_but_not_more_rows_than_tile_m():
    assert registry.fits(BASE, 4096, 32, K=4096, M=16)  # tile_k 256 spans 8 groups of 32
    assert not registry.fits(BASE, 4096, 128, K=4096 + 128, M=1)  # K not a multiple of tile_k
    assert not registry.fits(BASE, 4096, 128, K=4096, M=17)
    narrow = TileConfig.parse("8x64x256_w1x4_s1_dc")
    assert registry.fits(narrow, 4096, 128, K=4096, M=8) and not registry.fits(narrow, 4096, 128, K=4096, M=9)
    with pytest.raises(ValueError, match="M must be at most tile_m = 16"):
        validation.check_problem("quick", BASE, 17, 4096, 4096, 128, 1)
    with pytest.raises(ValueError, match="multiple of tile_k"):
        validation.check_problem("quick", BASE, 1, 4096 + 128, 4096, 128, 1)
    with pytest.raises(ValueError, match="split_k must be between 1 and K / tile_k = 16"):
        validation.check_problem("quick", BASE, 1, 4096, 4096, 128, 17)


def test_launch_is_a_grid_of_n64_strips_by_split():
    launch = registry.QUICK_DECODE.launch(BASE, 7, 4096, 4096, 8)  # grid (1, N / 64, split)
    assert launch.grid == (1, 64, 8) and launch.workspace == (8, 7, 4096) and launch.counters == 64
    assert registry.QUICK_DECODE.launch(BASE, 7, 4096, 4096, 1).workspace is None


def test_a_decode_table_row_is_skipped_for_a_batch_it_cannot_run():
    table = [dict(K=4096, N=4096, M=16, kernel="quick", config=BASE.name, split_k=8, time_us=1.0,
                  ratio_to_fp16=0.1)]
    assert dispatch.lookup(table, 16, 4096, 4096, 128) == ("quick", BASE, 8)
    assert dispatch.lookup(table, 64, 4096, 4096, 128) is None  # its last row cannot run 64 rows: heuristic
    assert dispatch.lookup(table, 1, 4096 + 128, 4096, 128) is None  # tile_k does not divide K


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_decode_variant_builds_without_spills(arch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    for report in variants.compile_variants("quick", DECODE, arch):
        cfg = TileConfig.parse(report.config)
        assert not report.spills and report.dynamic_smem_bytes == 0
        assert report.static_smem_bytes == registry.decode_reduction_bytes(cfg) + 4  # + take_ticket's flag


@pytest.mark.parametrize("name,batch_tiles", [("16x64x256_w1x4_s1_dc", 2), ("8x64x256_w1x4_s1_dc", 1)])
def test_ptx_feeds_mma_straight_from_registers(name, batch_tiles):
    """Weights as the A operand (rows of N), activations as B: 4 mma per k16 step per 8 batch rows, both
    operands loaded from global memory into registers: no shared memory, ldmatrix or cp.async in the loop."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    cfg = TileConfig.parse(name)
    counts = variants.ptx_counts("quick", cfg)
    steps = cfg.tile_k // 16 // cfg.warps_n
    assert counts["mma.sync"] == 4 * batch_tiles * steps
    assert counts["ldmatrix"] == counts["cp.async"] == counts["st.shared.v4"] == 0


def test_prefetching_variants_prefetch_one_line_per_lane_per_k_tile():
    """stages 2 / 3: one prefetch.global.L2 per k-tile (the chunk STAGES - 1 k-tiles ahead); stages 1: none."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

    def prefetches(name):
        text = variants.ptx("quick", TileConfig.parse(name))
        return sum(line.strip().startswith("prefetch.global.L2") for line in text.splitlines())

    assert prefetches("8x64x256_w1x4_s1_dc") == 0
    assert prefetches("8x64x256_w1x4_s2_dc") == prefetches("8x64x256_w1x4_s3_dc") == 1


# ---------------------------------------------------------------- on the GPU


def _cases():
    out = []
    for v, cfg in enumerate(DECODE):
        k_tiles = 4
        K = cfg.tile_k * k_tiles
        for i, (M, split, G) in enumerate([(1, 1, 128), (7, 3, 32), (cfg.tile_m, k_tiles, 64), (3, 2, 128)]):
            N = 64 * (3 + 2 * ((v + i) % 3))  # odd numbers of n64 strips
            out.append((cfg, M, K, N, G, split))
        if cfg.tile_m > 8:
            out.append((cfg, cfg.tile_m - 7, K, 64 * 3, 32, 2))  # one row into the last n8 tile of batch rows
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,M,K,N,G,split", _cases(),
                         ids=[f"{c.name}-M{m}-K{k}-N{n}-G{g}-s{s}" for c, m, k, n, g, s in _cases()])
def test_decode_matches_float64(cfg, M, K, N, G, split):
    run_and_check("quick", M, K, N, G, config=cfg, split_k=split)


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 5, 16))
def test_decode_on_llm_shapes(M):
    for K, N in ((4096, 6144), (14336, 4096)):
        run_and_check("quick", M, K, N, 128, config=BASE, split_k=max(1, K // BASE.tile_k // 4))


@pytest.mark.gpu
def test_decode_split_is_deterministic_and_leaves_counters_zero():
    import cupy

    from quick_lab.core import ops

    _, _, quick = weights(2048, 1024, 128)
    x = cupy.asarray(np.random.default_rng(3).standard_normal((9, 2048)).astype(np.float16))
    first = ops.quick_gemm(x, quick, config=BASE, split_k=4)
    for _ in range(3):
        assert cupy.array_equal(ops.quick_gemm(x, quick, config=BASE, split_k=4), first)
    assert int(ops.tile_counters(1024 // 64).max()) == 0


# ---------------------------------------------------------------- the bulk-copy decode kernel (Hopper)

BULK = configs.QUICK_DECODE_BULK_VARIANTS


def test_bulk_names_select_the_hopper_family_with_a_producer_warp():
    for cfg in BULK:
        assert cfg.name.endswith("_cp_fz_dc" if cfg.folded_zeros else "_cp_dc") and TileConfig.parse(cfg.name) == cfg
        fam = registry.family("quick", cfg)
        assert fam is registry.QUICK_DECODE_BULK and fam.compute_capability == "90"
        assert fam.template_name(cfg) == (
            f"quick_decode_bulk<{cfg.tile_m},{cfg.tile_n},{cfg.tile_k},{cfg.warps_n},{cfg.stages},"
            f"{int(cfg.folded_zeros)}>")
        assert cfg.threads == 32 * (cfg.warps_n + 1)
        assert registry.violations("quick", cfg) == []
    assert not set(BULK) & set(registry.variants("quick"))  # Hopper only
    assert set(BULK) <= set(registry.variants("quick", hopper=True))


def test_bulk_ring_holds_each_k_tiles_rows_and_group_records():
    cfg = TileConfig.parse("8x64x256_w1x4_s4_cp_dc")
    layout = registry.stage_layout("quick", cfg)
    assert (layout.weights, layout.scales, layout.zeros) == (16 * 512, 8 * 128, 8 * 32)
    assert layout.stride % 128 == 0 and layout.total == 4 * layout.stride
    wide = registry.stage_layout("quick", TileConfig.parse("8x256x64_w1x4_s6_cp_dc"))  # 4 strips, 2 groups of 32
    assert (wide.weights, wide.scales, wide.zeros) == (4 * 4 * 512, 2 * 4 * 128, 2 * 4 * 32)
    assert wide.total == 6 * wide.stride


@pytest.mark.parametrize("cfg,rule", [
    (TileConfig(8, 64, 256, 1, 4, 1, async_weights=True, decode=True), "stages >= 2"),
    (TileConfig(8, 64, 256, 1, 3, 4, async_weights=True, decode=True), "2, 4 or 8 compute warps"),
    (TileConfig(64, 64, 256, 1, 4, 4, async_weights=True, decode=True), "8, 16 or 32 x 64"),
    (TileConfig(8, 192, 128, 1, 4, 4, async_weights=True, decode=True), "1, 2 or 4 n64 strips"),
    (TileConfig(8, 256, 128, 1, 2, 4, async_weights=True, decode=True), "the same number per strip"),
    (TileConfig(8, 64, 384, 1, 4, 4, async_weights=True, decode=True), "whole passes"),
])
def test_bulk_rules(cfg, rule):
    assert any(rule in v for v in registry.violations("quick", cfg)), registry.violations("quick", cfg)


def test_bulk_problem_rules_need_whole_group_records_per_stage():
    cfg = TileConfig.parse("8x64x256_w1x4_s4_cp_dc")
    for G in (32, 64, 128, 256):
        assert registry.fits(cfg, 4096, G, K=4096, M=8)
    for G in (48, 96, 16, 384):
        assert not registry.fits(cfg, 4096, G, K=4096, M=1)
    assert not registry.fits(cfg, 4096, 128, K=4096, M=9)
    assert not registry.fits(TileConfig.parse("8x256x128_w1x4_s4_cp_dc"), 4096 + 128, 128, K=4096, M=1)
    with pytest.raises(ValueError, match="a stage holds whole group records"):
        validation.check_problem("quick", cfg, 1, 4096, 4096, 96, 1)


def test_every_bulk_variant_builds_for_sm90_without_spills():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    for report in variants.compile_variants("quick", BULK, "sm_90"):
        cfg = TileConfig.parse(report.config)
        assert report.arch == "sm_90" and not report.spills
        assert report.dynamic_smem_bytes == registry.shared_bytes("quick", cfg)
        static = registry.decode_reduction_bytes(cfg) + 2 * 8 * cfg.stages + 4  # + mbarriers + ticket flag
        assert static <= report.static_smem_bytes < static + 128


def test_folded_zero_points_only_in_the_bulk_decode_kernel():
    assert "needs _wg or _cp_dc" in registry.violations("quick", TileConfig(8, 64, 256, 1, 4, 1, folded_zeros=True,
                                                                             decode=True))[0]
    assert any(c.folded_zeros for c in BULK) and any(not c.folded_zeros for c in BULK)


def _f16x2_arithmetic(cfg):
    text = variants.ptx("quick", cfg)
    return sum(line.strip().startswith(("sub.rn.f16x2", "mul.rn.f16x2", "fma.rn.f16x2")) for line in text.splitlines())


def test_folded_bulk_variant_leaves_zero_points_and_scales_out_of_the_weight_path():
    """_fz: one more mma per k16 step and batch tile (the activation row sums); of the f16x2 arithmetic
    only the 1/16 pre-scale of b1 (one per step and batch tile) and the zero word's two HFMA2 per group
    flush (at most one flush per step) remain, against 10 per packed word unfolded."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    folded = TileConfig.parse("8x128x128_w1x4_s4_cp_fz_dc")
    unfolded = TileConfig.parse("8x128x128_w1x4_s4_cp_dc")
    steps = folded.tile_k // 16 // (folded.warps_n // (folded.tile_n // 64))
    assert variants.ptx_counts("quick", folded)["mma.sync"] == 5 * steps
    assert variants.ptx_counts("quick", unfolded)["mma.sync"] == 4 * steps
    assert _f16x2_arithmetic(folded) <= 3 * steps
    assert _f16x2_arithmetic(unfolded) >= 4 * 10 * steps


def test_bulk_ptx_copies_with_cp_async_bulk_and_loads_words_from_shared():
    """One cp.async.bulk per 512-byte block or group record (issued in a loop), the compute warps'
    words from shared memory, 4 mma per k16 step per 8 batch rows, no per-lane cp.async."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    cfg = TileConfig.parse("16x128x128_w1x4_s4_cp_dc")
    text = variants.ptx("quick", cfg)
    ops = [line.strip().split(" ")[0].split("\t")[0] for line in text.splitlines()]
    assert sum(op.startswith("cp.async.bulk.shared") for op in ops) >= 1
    assert sum(op.startswith("mbarrier.try_wait.parity") for op in ops) >= 2
    counts = variants.ptx_counts("quick", cfg)
    steps = cfg.tile_k // 16 // (cfg.warps_n // (cfg.tile_n // 64))  # 2 strips: 2 warps per strip
    assert counts["mma.sync"] == 4 * 2 * steps and counts["ldmatrix"] == 0
    assert counts["ld.shared"] >= steps  # the words (and the group records) come from the ring
    assert not any(op.startswith("cp.async.cg") or op.startswith("cp.async.ca") for op in ops)


def _bulk_cases():
    out = []
    for v, cfg in enumerate(BULK):
        k_tiles = -(-(cfg.stages + 3) * cfg.tile_k // 128) * 128 // cfg.tile_k  # the ring wraps at split 1
        K = cfg.tile_k * k_tiles  # a multiple of every group size
        for i, (M, split, G) in enumerate([(1, 1, 128), (7, 3, 32), (cfg.tile_m, 2, 64), (3, 1, 32)]):
            N = cfg.tile_n * (3 + 2 * ((v + i) % 3))  # odd numbers of tiles
            out.append((cfg, M, K, N, G, split))
        if cfg.tile_m > 8:
            out.append((cfg, cfg.tile_m - 7, K, cfg.tile_n * 3, 32, k_tiles))  # one k-tile per split
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,M,K,N,G,split", _bulk_cases(),
                         ids=[f"{c.name}-M{m}-K{k}-N{n}-G{g}-s{s}" for c, m, k, n, g, s in _bulk_cases()])
def test_bulk_decode_matches_float64(hopper, cfg, M, K, N, G, split):
    run_and_check("quick", M, K, N, G, config=cfg, split_k=split)


@pytest.mark.gpu
def test_bulk_decode_on_llm_shapes(hopper):
    cfg = TileConfig.parse("8x256x128_w1x4_s4_cp_dc")
    for M in (1, 8):
        for K, N in ((4096, 6144), (14336, 4096)):
            run_and_check("quick", M, K, N, 128, config=cfg, split_k=max(1, K // cfg.tile_k // 8))


@pytest.mark.gpu
def test_bulk_split_is_deterministic_and_leaves_counters_zero(hopper):
    import cupy

    from quick_lab.core import ops

    cfg = TileConfig.parse("16x256x128_w1x4_s4_cp_dc")
    _, _, quick = weights(4096, 1024, 128)
    x = cupy.asarray(np.random.default_rng(4).standard_normal((13, 4096)).astype(np.float16))
    first = ops.quick_gemm(x, quick, config=cfg, split_k=4)
    for _ in range(3):
        assert cupy.array_equal(ops.quick_gemm(x, quick, config=cfg, split_k=4), first)
    assert int(ops.tile_counters(1024 // 64).max()) == 0
