"""The Hopper wgmma mainloop of the QUICK kernel (kernels/quick_wgmma.cu) without a GPU: config names and
rules, the shared-memory carve-up, the sm_90a build through NVRTC, its PTX, validation and dispatch."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from quick_lab.build import nvrtc
from quick_lab.core import configs, dispatch, registry, validation, variants

WGMMA = configs.QUICK_WGMMA_VARIANTS
# A valid wgmma config the rule tests below break one field at a time.
BASE = configs.TileConfig(64, 128, 64, 1, 4, 4, wgmma=True)


def _require_nvrtc():
    try:
        nvrtc.nvrtc_version()
    except nvrtc.NvrtcError as exc:
        pytest.skip(f"NVRTC is unavailable: {exc}")


# ---------------------------------------------------------------- names, templates, targets

@pytest.mark.parametrize("cfg", WGMMA, ids=lambda c: c.name)
def test_wgmma_names_round_trip(cfg):
    stem = cfg.name.removesuffix("_fz")
    assert cfg.wgmma and stem.endswith("_wg")
    assert cfg.name.endswith("_fz") == cfg.folded_zeros
    assert stem.endswith("_cp_wg") == cfg.async_weights
    assert configs.TileConfig.parse(cfg.name) == cfg


def test_staged_wgmma_name_parses_both_suffixes():
    cfg = configs.TileConfig.parse("64x256x64_w1x8_s5_cp_wg")
    assert cfg == configs.TileConfig(64, 256, 64, 1, 8, 5, async_weights=True, wgmma=True)
    assert cfg.name == "64x256x64_w1x8_s5_cp_wg"
    # without _wg the same string is the mma.sync kernel's config
    assert not configs.TileConfig.parse("64x256x64_w1x8_s5_cp").wgmma


def test_registered_wgmma_names_are_unique_and_distinct_from_mma_sync_ones():
    names = [c.name for c in WGMMA]
    assert len(set(names)) == len(names)
    assert not set(names) & {c.name for c in configs.QUICK_VARIANTS}


@pytest.mark.parametrize("name", [
    "64x256x64_w1x4_s4_wg_cp",   # suffixes in the wrong order
    "64x256x64_w1x4_s4_xx",
    "64x256x64_w1x4_s4_wg_wg",
    "64x256x64_w1x4_s4_cp_cp",
    "64x256x64_w1x4_s4_cp_wg_x",
    "64x256x64_w1x4_s4_",
    "64x256x64_w1x4_wg",
])
def test_parse_rejects_bad_suffixes(name):
    with pytest.raises(ValueError, match="16x128x32_w1x2_s1"):
        configs.TileConfig.parse(name)


@pytest.mark.parametrize("cfg,expected", [
    (configs.TileConfig(64, 256, 64, 1, 8, 5, True, True), "quick_wgmma<64,256,64,1,8,5,1,0>"),
    (configs.TileConfig(128, 64, 64, 1, 4, 4, wgmma=True), "quick_wgmma<128,64,64,1,4,4,0,0>"),
    (configs.TileConfig(16, 128, 128, 1, 4, 6, True, True, True), "quick_wgmma<16,128,128,1,4,6,1,1>"),
    (configs.TileConfig(64, 256, 64, 1, 8, 5, True), "quick_gemm<64,256,64,1,8,5,1>"),
])
def test_template_name_and_source_file(cfg, expected):
    assert registry.template_name("quick", cfg) == expected
    assert registry.family("quick", cfg).source == ("quick_wgmma.cu" if cfg.wgmma else "quick_gemm.cu")


def test_every_wgmma_template_names_its_config():
    for cfg in WGMMA:
        args = re.fullmatch(r"quick_wgmma<([\d,]+)>", registry.template_name("quick", cfg)).group(1)
        assert tuple(int(a) for a in args.split(",")) == (
            cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.warps_m, cfg.warps_n, cfg.stages, int(cfg.async_weights),
            int(cfg.folded_zeros))


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_target_arch_is_sm_90a_only_for_wgmma(arch):
    assert registry.family("quick", BASE).target_arch(arch) == "sm_90a"
    assert registry.family("quick", configs.QUICK_DEFAULT).target_arch(arch) == arch
    assert registry.family("awq", configs.AWQ_DEFAULT).target_arch(arch) == arch


# ---------------------------------------------------------------- rules

@pytest.mark.parametrize("cfg,rule", [
    (replace(BASE, tile_k=32), "tile_k = 64 or 128"),
    (replace(BASE, warps_m=2), "warps 1x4 or 1x8"),
    (replace(BASE, tile_n=768, warps_n=12), "warps 1x4 or 1x8"),
    (replace(BASE, tile_m=48), "tile_m must be 16, 32, 64, 128 or 256"),
    (replace(BASE, stages=2), "stages >= 3"),
    (replace(BASE, tile_n=192), "each warpgroup spans 64, 128 or 256 columns"),
    (configs.TileConfig(256, 256, 64, 1, 4, 4, wgmma=True), "512 accumulators per thread"),
    (configs.TileConfig(128, 64, 128, 1, 4, 8, wgmma=True), "bytes of shared memory"),
], ids=["tile_k32", "warps2x4", "warps_n12", "tile_m48", "stages2", "tile_n192", "accumulators", "smem"])
def test_wgmma_rules_name_the_broken_rule(cfg, rule):
    assert registry.violations("quick", BASE) == []  # the field changed is what breaks it
    bad = registry.violations("quick", cfg)
    assert any(rule in v for v in bad), bad
    with pytest.raises(ValueError, match=re.escape(rule)):
        registry.check("quick", cfg)


def test_accumulator_limit_is_exactly_128_per_thread():
    # 4 words per lane (one warpgroup over 256 columns) x tile_m / 2: 64 rows fit (128), 128 do not (256)
    assert registry.violations("quick", configs.TileConfig(64, 256, 64, 1, 4, 4, wgmma=True)) == []
    bad = registry.violations("quick", configs.TileConfig(128, 256, 64, 1, 4, 4, wgmma=True))
    assert bad == ["256 accumulators per thread (at most 128)"]


def test_only_quick_has_a_wgmma_mainloop():
    assert registry.violations("awq", BASE) == ["only the QUICK kernel has a wgmma mainloop"]


def test_wgmma_rules_do_not_leak_into_the_mma_sync_kernel():
    # the same shape without wgmma is judged by the mma.sync rules (warp tile 64 x 32: not whole n64 blocks)
    assert registry.violations("quick", replace(BASE, wgmma=False)) != []


@pytest.mark.parametrize("cfg", WGMMA, ids=lambda c: c.name)
def test_every_registered_wgmma_variant_is_valid(cfg):
    assert registry.violations("quick", cfg) == []
    assert registry.shared_bytes("quick", cfg) <= registry.SMEM_PER_BLOCK_LIMIT


def test_wgmma_variants_only_with_hopper():
    plain = registry.variants("quick")
    assert plain == configs.QUICK_VARIANTS + configs.QUICK_DECODE_VARIANTS
    assert not any(c.wgmma for c in plain)
    hopper = registry.variants("quick", hopper=True)
    assert hopper == configs.QUICK_VARIANTS + WGMMA + configs.QUICK_DECODE_VARIANTS
    assert {c for c in hopper if c.wgmma} == set(WGMMA) and len(WGMMA) > 0
    assert registry.variants("awq", hopper=True) == configs.AWQ_VARIANTS


# ---------------------------------------------------------------- shared memory

@pytest.mark.parametrize("cfg,expected", [
    # 4 stages of 64 rows x 128 bytes = 8192 (already 1024-aligned), + 1024 bytes of alignment slack
    (configs.TileConfig(64, 128, 64, 1, 4, 4, wgmma=True), 4 * 8192 + 1024),
    # 16 x 128 x 2 = 4096 activations + 128 x 256 / 2 = 16384 weights + 4 x 128 scales + 4 x 32 zeros
    # = 21120 -> 21504 per stage
    (configs.TileConfig(16, 256, 128, 1, 4, 5, True, True), 5 * 21504 + 1024),
    # 16384 + 2048 + 128 + 32 = 18592 -> 19456 per stage
    (configs.TileConfig(128, 64, 64, 1, 4, 6, True, True), 6 * 19456 + 1024),
    # 2048 + 16384 + 8 x 128 + 8 x 32 = 19712 -> 20480: without the zeros it would fit 19456
    (configs.TileConfig(16, 512, 64, 1, 8, 4, True, True), 4 * 20480 + 1024),
])
def test_wgmma_shared_bytes_hand_computed(cfg, expected):
    assert registry.shared_bytes("quick", cfg) == expected


@pytest.mark.parametrize("cfg", WGMMA, ids=lambda c: c.name)
def test_wgmma_shared_bytes_follow_the_kernels_stage_layout(cfg):
    # kernels/quick_wgmma.cu: kAtoms swizzle atoms of TILE_M x 128 bytes, then with ASYNC_W the packed
    # weights (kSteps x kTileBlocks x 512), scales (kTileBlocks x 128) and zeros (kTileBlocks x 32); each
    # stage rounded up to 1024 bytes; 1024 bytes of slack to align the base.
    atoms, steps, blocks = cfg.tile_k // 64, cfg.tile_k // 16, cfg.tile_n // 64
    stage = atoms * cfg.tile_m * 128
    if cfg.async_weights:
        stage += steps * blocks * 512 + blocks * 128 + blocks * 32
    stage = (stage + 1023) // 1024 * 1024
    assert registry.shared_bytes("quick", cfg) == cfg.stages * stage + 1024
    assert registry.shared_bytes("quick", cfg) % 1024 == 0


def test_staged_weights_cost_shared_memory_only_on_the_cp_path():
    direct = configs.TileConfig(64, 256, 64, 1, 8, 5, wgmma=True)
    staged = replace(direct, async_weights=True)
    # per stage: 64 x 256 / 2 weights + 4 x (128 + 32) scales and zeros -> 8192 + 8832 = 17024 -> 17408
    assert registry.shared_bytes("quick", direct) == 5 * 8192 + 1024
    assert registry.shared_bytes("quick", staged) == 5 * 17408 + 1024


# ---------------------------------------------------------------- NVRTC build for sm_90a

@pytest.fixture(scope="module")
def wgmma_build():
    """Every wgmma variant compiled once, in one NVRTC program: (names, lowered, log, usage)."""
    _require_nvrtc()
    names = tuple(registry.template_name("quick", c) for c in WGMMA)
    lowered, log = nvrtc.compile_source("quick_wgmma.cu", names, "sm_90a")
    return names, lowered, log, nvrtc.parse_ptxas_log(log)


def test_every_wgmma_variant_compiles_for_sm_90a(wgmma_build):
    names, lowered, log, usage = wgmma_build
    targets = dict(re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'", log))
    for name in names:
        assert lowered[name] in usage, f"no ptxas report for {name}"
        assert targets[lowered[name]] == "sm_90a", name
        assert usage[lowered[name]]["registers"] > 0


def test_no_wgmma_variant_spills_or_uses_a_stack(wgmma_build):
    names, lowered, _, usage = wgmma_build
    bad = {n: usage[lowered[n]] for n in names
           if usage[lowered[n]]["spill_st"] or usage[lowered[n]]["spill_ld"] or usage[lowered[n]]["stack"]}
    assert not bad, bad


def test_ptxas_keeps_the_wgmma_chain_asynchronous(wgmma_build):
    # ptxas says "Potential Performance Loss: wgmma.mma_async instructions are serialized ..." when an
    # accumulator use forces it to wait after every wgmma (what the kernel's loop structure avoids)
    _, _, log, _ = wgmma_build
    bad = [line for line in log.splitlines()
           if "potential performance loss" in line.lower() or "serialized" in line.lower()]
    assert not bad, "\n".join(bad)


def test_compile_variants_builds_wgmma_configs_for_sm_90a_beside_the_others():
    _require_nvrtc()
    wg = configs.TileConfig(16, 128, 64, 1, 4, 8, True, True)
    reports = variants.compile_variants("quick", [configs.QUICK_DEFAULT, wg], "sm_90")
    by_config = {r.config: r for r in reports}
    assert set(by_config) == {configs.QUICK_DEFAULT.name, wg.name}
    assert by_config[configs.QUICK_DEFAULT.name].arch == "sm_90"
    assert by_config[configs.QUICK_DEFAULT.name].kernel.startswith("quick_gemm<")
    assert by_config[wg.name].arch == "sm_90a"
    assert by_config[wg.name].kernel == registry.template_name("quick", wg)
    assert by_config[wg.name].dynamic_smem_bytes == registry.shared_bytes("quick", wg)
    assert not by_config[wg.name].spills and by_config[wg.name].stack_bytes == 0


@pytest.fixture(scope="module", params=[configs.TileConfig(64, 128, 64, 1, 4, 4, wgmma=True),
                                        configs.TileConfig(64, 256, 64, 1, 8, 5, True, True),
                                        configs.TileConfig(16, 128, 128, 1, 4, 6, True, True, True)],
                ids=lambda c: c.name)
def wgmma_counts(request):
    _require_nvrtc()
    return request.param, variants.ptx_counts("quick", request.param)


def test_wgmma_ptx_uses_warpgroup_mma_and_no_weight_write_back(wgmma_counts):
    cfg, counts = wgmma_counts
    # per k-tile: tile_k / 16 steps x words per lane x wgmma instructions per tile_m (N <= 128 each),
    # with folded zero points one more per step and tile_m block (the activation row sums)
    words = cfg.tile_n // (cfg.warps_n // 4) // 64
    per_m = max(1, cfg.tile_m // 128)
    assert counts["wgmma.mma_async"] == (cfg.tile_k // 16) * (words + cfg.folded_zeros) * per_m
    assert counts["mma.sync"] == 0
    assert counts["ldmatrix"] == 0          # A comes from registers, B through the smem descriptor
    assert counts["st.shared.v4"] == 0      # weights are never written back as fp16
    assert counts["st.shared"] == 1         # the stream-K fix-up's "last block" flag, nothing else


# ---------------------------------------------------------------- validation, defaults, dispatch

M, K, N, G = 16, 1024, 512, 128


def test_split_k_zero_is_stream_k_only_for_wgmma():
    assert configs.STREAM_K == 0
    with pytest.raises(ValueError, match="split_k must be between 1 and K / tile_k = 32, got 0"):
        validation.check_problem("quick", configs.QUICK_DEFAULT, M, K, N, G, 0)
    assert validation.check_problem("quick", BASE, M, K, N, G, configs.STREAM_K) is None


@pytest.mark.parametrize("cfg", [configs.QUICK_DEFAULT, BASE], ids=lambda c: c.name)
def test_split_k_beyond_the_k_tiles_is_rejected(cfg):
    k_tiles = K // cfg.tile_k
    validation.check_problem("quick", cfg, M, K, N, G, k_tiles)  # the largest split is fine
    with pytest.raises(ValueError, match=f"K / tile_k = {k_tiles}"):
        validation.check_problem("quick", cfg, M, K, N, G, k_tiles + 1)
    with pytest.raises(ValueError, match="split_k must be between"):
        validation.check_problem("quick", cfg, M, K, N, G, -1)


def test_wgmma_split_k_message_mentions_stream_k():
    with pytest.raises(ValueError, match=r"\(or 0 for stream-K\)"):
        validation.check_problem("quick", BASE, M, K, N, G, K // BASE.tile_k + 1)


def test_wgmma_problem_rules_still_apply():
    with pytest.raises(ValueError, match="tile_k = 128 must divide group_size = 64"):
        validation.check_problem("quick", configs.TileConfig(16, 256, 128, 1, 4, 5, True, True), M, K, N, 64, 0)
    with pytest.raises(ValueError, match="multiple of tile_n = 128"):
        validation.check_problem("quick", BASE, M, K, 64 * 3, G, 0)
    with pytest.raises(ValueError, match="invalid quick config"):
        validation.check_problem("quick", replace(BASE, stages=2), M, K, N, G, 0)


@pytest.mark.parametrize("cfg", WGMMA, ids=lambda c: c.name)
def test_default_split_of_a_wgmma_config_fills_the_resident_blocks(cfg):
    fam = registry.family("quick", cfg)
    slots = 132 * registry.resident_blocks(fam, cfg, dispatch.WGMMA_REGISTERS_ASSUMED, 0)
    wide = slots * cfg.tile_n  # one row of tiles fills every resident block: stream-K
    assert dispatch.default_split_k("quick", cfg, 7, 4096, wide, num_sms=132) == configs.STREAM_K
    split = dispatch.default_split_k("quick", cfg, 7, 4096, 4096, num_sms=132)
    tiles, k_tiles = 4096 // cfg.tile_n, 4096 // cfg.tile_k
    assert split >= 1 and split & (split - 1) == 0 and tiles * split <= slots
    assert split == 1 or k_tiles >= dispatch.MIN_K_TILES_PER_BLOCK * split
    # the largest such split: doubling it would break one of the two limits
    assert tiles * split * 2 > slots or k_tiles < dispatch.MIN_K_TILES_PER_BLOCK * split * 2


def _row(M, config, split_k, kernel="quick"):
    return dict(K=4096, N=4096, M=M, kernel=kernel, config=config, split_k=split_k, time_us=1.0, ratio_to_fp16=0.5, group_size=128)


def test_dispatch_keeps_stream_k_for_wgmma_rows():
    wg = configs.TileConfig(64, 256, 64, 1, 8, 5, True, True)
    table = [_row(16, wg.name, configs.STREAM_K), _row(64, wg.name, 1000), _row(256, configs.QUICK_DEFAULT.name, 0)]
    assert dispatch.lookup(table, 16, 4096, 4096, 128) == ("quick", wg, configs.STREAM_K)
    # a split-K row of a wgmma config is clamped to the k-tiles like any other
    assert dispatch.lookup(table, 64, 4096, 4096, 128) == ("quick", wg, 4096 // 64)
    # 0 means stream-K only for wgmma configs: an mma.sync row with 0 becomes split 1
    assert dispatch.lookup(table, 256, 4096, 4096, 128) == ("quick", configs.QUICK_DEFAULT, 1)


def test_dispatch_table_from_a_sweep_keeps_a_stream_k_winner():
    import pandas as pd

    wg = configs.TileConfig(16, 256, 64, 1, 4, 8, True, True)
    tiles = pd.DataFrame([
        _row(1, "dequant+cublas", 1, kernel="fallback") | dict(time_us=50.0),
        _row(1, wg.name, configs.STREAM_K) | dict(time_us=8.0),
        _row(1, wg.name, 2) | dict(time_us=9.0),
        _row(1, configs.QUICK_DEFAULT.name, 4) | dict(time_us=12.0),
    ])
    table = dispatch.build_table(tiles)
    assert [(r["config"], r["split_k"]) for r in table] == [(wg.name, configs.STREAM_K)]
    assert dispatch.lookup(table, 1, 4096, 4096, 128) == ("quick", wg, configs.STREAM_K)
    assert dispatch.lookup(table, 1, 4096, 4096 + 128, 128) is None  # tile_n 256 does not divide N


# ---------------------------------------------------------------- loading off Hopper

def test_wgmma_kernel_is_refused_before_compiling_on_a_non_hopper_gpu(monkeypatch):
    cupy = pytest.importorskip("cupy")

    class Ampere:
        compute_capability = "80"

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled for sm_90a although the GPU is not a compute capability 9.0 one")

    monkeypatch.setattr(cupy.cuda, "Device", Ampere)
    monkeypatch.setattr(nvrtc, "compile_cubin", no_compile)
    with pytest.raises(ValueError, match="compute capability 9.0 GPU, this one is 80"):
        variants.gemm_kernel.__wrapped__("quick", BASE)  # past the cache: a GPU session may have built it


# ---------------------------------------------------------------- folded zero points

FOLDED = [c for c in WGMMA if c.folded_zeros]


def test_folded_zero_points_need_wgmma_and_one_group_per_k_tile():
    assert FOLDED, "no folded-zero-point variant registered"
    assert "needs _wg" in registry.violations("quick", configs.TileConfig(16, 128, 128, 1, 2, 3, folded_zeros=True))[0]
    bad = configs.TileConfig(16, 256, 64, 1, 4, 4, True, True, True)
    assert any("tile_k = 128" in v for v in registry.violations("quick", bad))
    for cfg in FOLDED:
        assert registry.fits(cfg, 4 * cfg.tile_n, 128)
        assert not registry.fits(cfg, 4 * cfg.tile_n, 256)   # two k-tiles per group: not folded per k-tile
        assert not registry.fits(cfg, 4 * cfg.tile_n, 64)    # tile_k does not divide the group
        with pytest.raises(ValueError, match="group_size must equal tile_k"):
            validation.check_problem("quick", cfg, 16, 1024, 4 * cfg.tile_n, 256, 1)


def test_dispatch_skips_a_folded_choice_for_another_group_size():
    cfg = FOLDED[0]
    table = [dict(K=1024, N=4 * cfg.tile_n, M=16, kernel="quick", config=cfg.name, split_k=0,
                  time_us=1.0, ratio_to_fp16=0.5)]
    assert dispatch.lookup(table, 16, 1024, 4 * cfg.tile_n, 128) == ("quick", cfg, 0)
    assert dispatch.lookup(table, 16, 1024, 4 * cfg.tile_n, 256) is None
