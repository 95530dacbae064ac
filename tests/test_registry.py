"""The kernel registry: one record per family, and what ops / sweeps / bank model read from it."""
from __future__ import annotations

import dataclasses
import re

import pytest

from quick_lab.build import sources
from quick_lab.core import configs, dispatch, registry
from quick_lab.core.configs import STREAM_K, TileConfig

ALL = [(f, c) for f in registry.FAMILIES for c in f.variants]


def test_one_family_per_template():
    assert [f.name for f in registry.FAMILIES] == ["awq_gemm", "quick_gemm", "quick_wgmma", "quick_decode"]
    for fam in registry.FAMILIES:
        text = sources.assemble(fam.source)
        signature = re.search(rf"template <([^>]*)>\s*__global__(?:(?!template).)*?\b{fam.name}\(", text, re.S)
        assert signature, f"{fam.source} defines no __global__ template {fam.name}"
        # the record's template signature has as many ints as the C++ template parameters (one more, the
        # writer epilogue's index, where the family has several)
        assert len(signature.group(1).split(",")) == len(fam.params) + (len(fam.epilogues) > 1)


@pytest.mark.parametrize("fam,cfg", ALL, ids=lambda v: getattr(v, "name", None))
def test_every_variant_belongs_to_exactly_its_family(fam, cfg):
    assert [f for f in registry.FAMILIES if f.kind == fam.kind and f.accepts(cfg)] == [fam]
    assert registry.family(fam.kind, cfg) is fam
    assert fam.violations(cfg) == []
    assert TileConfig.parse(cfg.name) == cfg


def test_variant_names_are_unique():
    names = [c.name for _, c in ALL]
    assert len(names) == len(set(names))


def test_awq_configs_have_no_wgmma_family():
    wg = configs.QUICK_WGMMA_VARIANTS[0]
    with pytest.raises(ValueError, match="only the QUICK kernel has a wgmma mainloop"):
        registry.family("awq", wg)
    assert registry.violations("awq", wg) == ["only the QUICK kernel has a wgmma mainloop"]
    assert registry.QUICK_MMA.violations(wg)  # a wgmma config is not an mma.sync variant


@pytest.mark.parametrize("fam,cfg", ALL, ids=lambda v: getattr(v, "name", None))
def test_stage_layout_adds_up(fam, cfg):
    lay = fam.layout(cfg)
    assert lay.total == fam.shared_bytes(cfg) <= registry.SMEM_PER_BLOCK_LIMIT
    parts = lay.activations + lay.weights + lay.scales + lay.zeros
    if cfg.async_weights:  # the packed k-tile: 4 bits per weight, fp16 scales and int4 zeros per n64 block
        assert lay.weights == cfg.tile_k * cfg.tile_n // 2
        assert lay.scales == cfg.tile_n * 2 and lay.zeros == cfg.tile_n // 2
    else:
        assert lay.weights == lay.scales == lay.zeros == 0
    if fam is registry.QUICK_WGMMA:  # swizzle atoms are 1024-byte aligned, plus 1 KB to align the base
        assert lay.stride % 1024 == 0 and lay.stride - 1024 < parts <= lay.stride
        assert lay.total == cfg.stages * lay.stride + 1024
    elif fam is registry.AWQ:
        assert lay.total == lay.activations + lay.writeback
    elif fam is registry.QUICK_DECODE:  # static shared memory only: the launch asks for no dynamic bytes
        assert lay.total == 0 and lay.activations == 0
    else:
        assert lay.stride == parts and lay.total == cfg.stages * parts
    assert lay.zeros_offset == lay.scales_offset + lay.scales == lay.weights_offset + lay.weights + lay.scales


def test_tile_grid_launch_geometry():
    cfg = configs.QUICK_DEFAULT
    one = registry.QUICK_MMA.launch(cfg, 33, 4096, 1024, 1)
    assert one == registry.Launch((3, 8, 1), None, 0, 1)
    four = registry.QUICK_MMA.launch(cfg, 33, 4096, 1024, 4)
    assert four.grid == (3, 8, 4) and four.workspace == (4, 33, 1024) and four.counters == 24 and four.split_arg == 4
    assert registry.QUICK_MMA.launch(cfg, 0, 4096, 1024, 4).workspace is None  # M = 0: nothing to reduce


def test_stream_k_launch_geometry():
    cfg = configs.QUICK_WGMMA_VARIANTS[0]  # 16 x 256 x 64
    M, K, N = 16, 4096, 4096
    tiles = N // cfg.tile_n
    sk = registry.QUICK_WGMMA.launch(cfg, M, K, N, STREAM_K, slots=132)
    assert sk.grid == (132, 1, 1) and sk.split_arg == 132
    assert sk.workspace == (132, 2, cfg.tile_m * cfg.tile_n) and sk.counters == tiles
    split = registry.QUICK_WGMMA.launch(cfg, M, K, N, 4)
    assert split.grid == (tiles * 4, 1, 1) and split.counters == tiles
    whole = registry.QUICK_WGMMA.launch(cfg, M, K, N, 1)  # one block per tile: no fix-up
    assert whole.workspace is None and whole.counters == 0
    tiny = registry.QUICK_WGMMA.launch(cfg, M, cfg.tile_k, cfg.tile_n, STREAM_K, slots=132)
    assert tiny.grid == (1, 1, 1)  # never more blocks than tile x k-tile units


def test_resident_blocks_reads_the_limits():
    fam, cfg = registry.QUICK_WGMMA, configs.QUICK_WGMMA_VARIANTS[0]
    smem = fam.shared_bytes(cfg)
    assert registry.resident_blocks(fam, cfg, registers=64, static_smem=0) == min(
        registry.SMEM_PER_SM // (smem + 1024), 65536 // (64 * 32) // (cfg.threads // 32), 64 // (cfg.threads // 32))
    # 255 registers: 8160 per warp, allocated as 8192, so 8 warps (two 4-warp blocks) per 64 K registers
    assert registry.resident_blocks(fam, cfg, registers=255, static_smem=0) == 2


def test_a_new_family_is_one_record(monkeypatch):
    """What the next kernel family costs: a record (and a marker suffix); variants, lookup, validation and
    launch geometry follow from it."""
    decode_cfg = dataclasses.replace(configs.QUICK_DEFAULT, tile_n=256, warps_n=4)
    fam = dataclasses.replace(registry.QUICK_MMA, name="quick_next", marker="nx", variants=(decode_cfg,))
    monkeypatch.setattr(TileConfig, "marker", property(lambda self: "nx" if self.tile_n == 256 else ""))
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES + (fam,))
    assert registry.family("quick", decode_cfg) is fam
    assert decode_cfg in registry.variants("quick")
    assert registry.template_name("quick", decode_cfg).startswith("quick_next<")
    assert registry.violations("quick", decode_cfg) == []


def test_dispatch_heuristic_uses_the_registry_for_stream_k():
    wg = configs.QUICK_WGMMA_VARIANTS[0]  # 16x256x64, 4 warps: 2 resident blocks per SM at 255 registers
    # stream-K once its column tiles fill the 264 resident blocks; 16 tiles: split-K, 16 k-tiles a block
    assert dispatch.default_split_k("quick", wg, 7, 4096, 264 * 256, num_sms=132) == STREAM_K
    assert dispatch.default_split_k("quick", wg, 7, 4096, 4096, num_sms=132) == 4
    assert dispatch.default_split_k("awq", configs.AWQ_DEFAULT, 7, 4096, 4096, num_sms=132) == 8
    # 32 column tiles: doubling until >= 2 blocks per SM (264) stops at 16 splits (512 blocks)
    assert dispatch.default_split_k("quick", configs.QUICK_DEFAULT, 1, 4096, 4096, num_sms=132) == 16
    assert dispatch.pinned_config("quick", "16x128x32_w1x2_s2", 1, 4096, 128) == configs.QUICK_DEFAULT
    assert dispatch.pinned_config("awq", None, 1, 4096, 128) == configs.AWQ_DEFAULT
