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
        assert registry.template_name("quick", cfg) == f"quick_decode<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},0>"
        assert registry.QUICK_DECODE.template_name(cfg, "silu_mul") == \
            f"quick_decode<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},1>"
        assert registry.QUICK_DECODE.template_name(cfg, "partials") == \
            f"quick_decode<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},2>"
    with pytest.raises(ValueError, match="no epilogue 'silu_mul'"):
        registry.QUICK_MMA.template_name(configs.QUICK_DEFAULT, "silu_mul")
    with pytest.raises(ValueError, match="no epilogue 'gelu'"):
        registry.QUICK_DECODE.template_name(DECODE[0], "gelu")
    assert set(DECODE) <= set(registry.variants("quick"))


@pytest.mark.parametrize("cfg,rule", [
    (TileConfig(64, 64, 512, 1, 4, 1, decode=True), "8, 16 or 32 x 64"),
    (TileConfig(16, 128, 512, 1, 4, 1, decode=True), "8, 16 or 32 x 64"),
    (TileConfig(32, 64, 256, 1, 8, 1, decode=True), "at most 48 KB"),
    (TileConfig(16, 64, 512, 1, 3, 1, decode=True), "2, 4 or 8 warps"),
    (TileConfig(16, 64, 96, 1, 4, 1, decode=True), "whole k16 steps"),
    (TileConfig(8, 64, 1024, 1, 4, 1, decode=True), "at most 8"),
    (TileConfig(16, 64, 512, 1, 4, 2, decode=True), "stages = 1"),
    (TileConfig(16, 64, 512, 1, 4, 1, async_weights=True, decode=True), "no _cp"),
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
        # + take_ticket's flag, except in the writer that leaves the split slices to their reader
        partials = report.kernel == registry.QUICK_DECODE.template_name(cfg, "partials")
        assert report.static_smem_bytes == registry.decode_reduction_bytes(cfg) + (0 if partials else 4)


@pytest.mark.parametrize("name,batch_tiles", [("16x64x256_w1x4_s1_dc", 2), ("8x64x256_w1x4_s1_dc", 1)])
def test_ptx_feeds_mma_straight_from_registers(name, batch_tiles):
    """Weights as the A operand (rows of N), activations as B: 4 mma per k16 step per 8 batch rows, both
    operands loaded from global memory into registers: no shared memory, ldmatrix or cp.async in the loop.
    The chunk appears twice: a block's first (peeled: it waits for the kernel before) and the loop's."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    cfg = TileConfig.parse(name)
    counts = variants.ptx_counts("quick", cfg)
    steps = cfg.tile_k // 16 // cfg.warps_n
    assert counts["mma.sync"] == 2 * 4 * batch_tiles * steps
    assert counts["ldmatrix"] == counts["cp.async"] == counts["st.shared.v4"] == 0


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


# ---------------------------------------------------------------- the SiLU x up writer


def test_only_the_decode_family_has_writer_epilogues():
    # the order is the kernel's (quick_decode.cu kStore, kSiluMul, kPartials)
    assert registry.EPILOGUES == ("store", "silu_mul", "partials")
    assert registry.QUICK_DECODE.epilogues == registry.EPILOGUES
    assert all(f.epilogues == ("store",) for f in registry.FAMILIES if f is not registry.QUICK_DECODE)


def _silu_cases():
    out = []
    for v, cfg in enumerate(DECODE):
        K = cfg.tile_k * 4
        for i, (M, split, G) in enumerate([(1, 1, 128), (7, 3, 32), (cfg.tile_m, 4, 64)]):
            out.append((cfg, M, K, 64 * (3 + 2 * ((v + i) % 3)), G, split))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,M,K,N,G,split", _silu_cases(),
                         ids=[f"{c.name}-M{m}-K{k}-N{n}-G{g}-s{s}" for c, m, k, n, g, s in _silu_cases()])
def test_silu_mul_writer_matches_float64_and_the_unfused_pair(cfg, M, K, N, G, split):
    """epilogue='silu_mul' on a (gate, up)-paired weight: silu(gate) * up against float64, and bit for bit the
    stored product followed by the model's silu_mul kernel (the same fp16 rounding of each half)."""
    import cupy

    from quick_lab.core import ops
    from quick_lab.core.format import reference_gemm, split_gate_up
    from quick_lab.model import fused

    host, _, quick = weights(K, N, G)
    x_host = np.random.default_rng(M * 31 + split).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    out = cupy.full((M, N // 2), np.nan, dtype=cupy.float16)
    got = ops.quick_gemm(x, quick, config=cfg, split_k=split, out=out, epilogue="silu_mul")
    assert got is out
    got = cupy.asnumpy(got)
    assert np.isfinite(got).all(), "NaN/Inf: an output the writer never stored"
    g, u = split_gate_up(reference_gemm(x_host, host))
    ref = g / (1 + np.exp(-g)) * u
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3
    unfused = fused.silu_mul(ops.quick_gemm(x, quick, config=cfg, split_k=split))
    assert cupy.array_equal(cupy.asarray(got), unfused)
    assert int(ops.tile_counters(N // 64).max()) == 0


@pytest.mark.gpu
def test_writer_epilogues_reject_what_they_cannot_run():
    import cupy

    from quick_lab.core import ops

    _, _, quick = weights(2048, 1024, 128)
    x = cupy.ones((3, 2048), dtype=cupy.float16)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        ops.quick_gemm(x, quick, config=BASE, split_k=1, epilogue="gelu")
    with pytest.raises(TypeError, match="epilogue must be a str"):
        ops.quick_gemm(x, quick, config=BASE, split_k=1, epilogue=1)
    with pytest.raises(ValueError, match="quick_gemm, which only stores y"):
        ops.quick_gemm(x, quick, config="16x128x32_w1x2_s2", split_k=1, epilogue="silu_mul")
    with pytest.raises(ValueError, match=r"out must have shape \[M, N / 2\]"):
        ops.quick_gemm(x, quick, config=BASE, split_k=1, epilogue="silu_mul", out=cupy.empty((3, 1024), cupy.float16))
    assert ops.applies_epilogue("quick", BASE, "silu_mul") and not ops.applies_epilogue("quick", "16x128x32_w1x2_s2",
                                                                                          "silu_mul")
    # the split slices: only the decode kernel, an out of [split_k, M, N] fp32
    with pytest.raises(ValueError, match="quick_gemm, which only stores y"):
        ops.quick_gemm(x, quick, config="16x128x32_w1x2_s2", split_k=2, epilogue="partials")
    with pytest.raises(ValueError, match=r"out must have shape \[split_k, M, N\]"):
        ops.quick_gemm(x, quick, config=BASE, split_k=2, epilogue="partials", out=cupy.empty((1, 3, 1024), cupy.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        ops.quick_gemm(x, quick, config=BASE, split_k=2, epilogue="partials", out=cupy.empty((2, 3, 1024), cupy.float16))
    with pytest.raises(ValueError, match="partials must be 3-D"):
        ops.sum_partials(cupy.ones((3, 1024), cupy.float32))


# ---------------------------------------------------------------- the split slices left to the reader


def _partials_cases():
    out = []
    for v, cfg in enumerate(DECODE):
        K = cfg.tile_k * 8
        for i, (M, split, G) in enumerate([(1, 1, 128), (7, 3, 32), (cfg.tile_m, 4, 64), (5, 8, 128)]):
            out.append((cfg, M, K, 64 * (2 + (v + i) % 4), G, split))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,M,K,N,G,split", _partials_cases(),
                         ids=[f"{c.name}-M{m}-K{k}-N{n}-G{g}-s{s}" for c, m, k, n, g, s in _partials_cases()])
def test_partials_writer_sums_to_the_stored_y_bit_for_bit(cfg, M, K, N, G, split):
    """epilogue='partials': every slice written (a NaN-poisoned out), their sum near float64, and summed in
    split order (ops.sum_partials) exactly the y the same launch stores with its fix-up; no ticket left
    taken. Split 3 of 8 k-tiles: uneven k ranges."""
    import cupy

    from quick_lab.core import ops
    from quick_lab.core.format import reference_gemm

    host, _, quick = weights(K, N, G)
    x_host = np.random.default_rng(M * 17 + split).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    out = cupy.full((split, M, N), np.nan, dtype=cupy.float32)
    got = ops.quick_gemm(x, quick, config=cfg, split_k=split, out=out, epilogue="partials")
    assert got is out and bool(cupy.isfinite(got).all()), "NaN: a slice element the writer never stored"
    y = ops.sum_partials(got)
    ref = reference_gemm(x_host, host)
    assert np.linalg.norm(cupy.asnumpy(y).astype(np.float64) - ref) / np.linalg.norm(ref) < 2e-3
    assert cupy.array_equal(y, ops.quick_gemm(x, quick, config=cfg, split_k=split))
    assert int(ops.tile_counters(N // 64).max()) == 0
