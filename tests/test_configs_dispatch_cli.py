"""Tile configurations, the dispatch table and the CLI's GPU-less behaviour (CPU)."""
from __future__ import annotations

import pandas as pd
import pytest

from quick_lab.core import configs, dispatch, registry
from quick_lab.cli import main


@pytest.mark.parametrize("cfg", configs.AWQ_VARIANTS + configs.QUICK_VARIANTS, ids=lambda c: c.name)
def test_config_names_round_trip(cfg):
    assert configs.TileConfig.parse(cfg.name) == cfg


@pytest.mark.parametrize("kind", configs.KINDS)
def test_registered_variants_are_valid(kind):
    for cfg in registry.variants(kind):
        assert registry.violations(kind, cfg) == []


@pytest.mark.parametrize("kind,cfg,rule", [
    ("quick", configs.TileConfig(16, 96, 32, 1, 1, 2), "multiple of 64"),
    ("quick", configs.TileConfig(16, 128, 32, 1, 2, 1), "stages >= 2"),
    ("awq", configs.TileConfig(16, 128, 32, 1, 2, 2), "single-stage"),
    ("quick", configs.TileConfig(128, 256, 32, 1, 2, 3), "exceeds"),
    ("quick", configs.TileConfig(16, 128, 48, 1, 2, 2), "tile_k"),
])
def test_invalid_configs_name_the_rule(kind, cfg, rule):
    with pytest.raises(ValueError, match=rule):
        registry.check(kind, cfg)


def test_bad_config_string_is_rejected():
    with pytest.raises(ValueError, match="16x128x32_w1x2_s1"):
        configs.TileConfig.parse("big")


def test_shared_memory_accounts_for_the_weight_path():
    base = configs.TileConfig(16, 128, 64, 1, 2, 4)
    staged = configs.TileConfig(16, 128, 64, 1, 2, 4, True)
    assert registry.shared_bytes("quick", base) == 4 * 16 * 72 * 2
    assert registry.shared_bytes("quick", staged) == 4 * (16 * 72 * 2 + 64 * 128 // 2 + 2 * 128 + 2 * 32)
    assert registry.shared_bytes("awq", configs.AWQ_DEFAULT) == 16 * 40 * 2 + 32 * 136 * 2


def _tiles(G: int = 128):
    rows = []
    for M, (kernel, config, split, t) in {1: ("quick", "16x256x64_w1x4_s3", 16, 10.0),
                                          256: ("quick", "64x256x64_w1x4_s4_cp", 2, 50.0),
                                          4096: ("fallback", "dequant+cublas", 1, 900.0)}.items():
        rows.append(dict(kernel="fp16", config="cublas", split_k=1, K=8192, N=8192, M=M, time_us=t, ratio_to_fp16=1))
        rows.append(dict(kernel=kernel, config=config, split_k=split, K=8192, N=8192, M=M, time_us=t * 0.9,
                         ratio_to_fp16=0.9))
        rows.append(dict(kernel="quick", config="16x128x32_w1x2_s2", split_k=1, K=8192, N=8192, M=M,
                         time_us=t * 2, ratio_to_fp16=2))
        rows.append(dict(kernel="awq", config="16x128x32_w1x2_s1", split_k=8, K=8192, N=8192, M=M,
                         time_us=t * 0.1, ratio_to_fp16=0.1))  # the baseline never enters the table
    return pd.DataFrame(rows).assign(group_size=G)


def test_dispatch_table_keeps_the_fastest_quick_path_per_problem():
    table = dispatch.build_table(_tiles())
    assert {(r["M"], r["kernel"], r["config"]) for r in table} == {
        (1, "quick", "16x256x64_w1x4_s3"), (256, "quick", "64x256x64_w1x4_s4_cp"),
        (4096, "fallback", "dequant+cublas")}


def test_dispatch_rounds_m_up_to_a_measured_batch_and_checks_fit():
    table = dispatch.build_table(_tiles())
    kernel, cfg, split = dispatch.lookup(table, 7, 8192, 8192, 128)
    assert (kernel, cfg.name, split) == ("quick", "64x256x64_w1x4_s4_cp", 2)
    assert dispatch.lookup(table, 1, 6144, 7936, 128)[1].name == "16x256x64_w1x4_s3"
    assert dispatch.lookup(table, 10**5, 8192, 8192, 128) == ("fallback", None, 1)
    assert dispatch.lookup(table, 1, 8192, 8192 + 64, 128) is None   # tile_n 256 does not divide N
    assert dispatch.lookup((), 1, 8192, 8192, 128) is None


def test_dispatch_answers_from_the_rows_of_the_problems_group_size():
    g32 = _tiles(32)
    g32.loc[(g32.M == 1) & (g32.config == "16x256x64_w1x4_s3"), "config"] = "16x128x32_w1x2_s3"
    table = dispatch.build_table(pd.concat([_tiles(128), g32]))
    assert len(table) == 6 and {r["group_size"] for r in table} == {32, 128}
    assert dispatch.lookup(table, 1, 8192, 8192, 128)[1].name == "16x256x64_w1x4_s3"
    assert dispatch.lookup(table, 1, 8192, 8192, 32)[1].name == "16x128x32_w1x2_s3"
    # a group size the table lacks: the nearest shape of any group size (here: tile_k 64 fits G = 64)
    assert dispatch.lookup(table, 1, 8192, 8192, 64)[1].name in ("16x256x64_w1x4_s3", "16x128x32_w1x2_s3")


def test_a_shape_swept_only_at_small_batch_leaves_large_batches_to_a_shape_that_reaches_them():
    small = _tiles()
    small = small[small.M == 1].assign(K=4096, N=6144)  # a model shape swept at M = 1 only
    table = dispatch.build_table(pd.concat([_tiles(), small]))
    assert dispatch.lookup(table, 1, 4096, 6144, 128)[1].name == "16x256x64_w1x4_s3"   # its own row
    assert dispatch.lookup(table, 256, 4096, 6144, 128)[1].name == "64x256x64_w1x4_s4_cp"  # 8192 x 8192's
    assert dispatch.lookup(table, 10**5, 4096, 6144, 128) == ("fallback", None, 1)


def test_group_sizes_argument_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["tiles", "--group-sizes", "128,40"])
    assert "multiples of 16, got 40" in capsys.readouterr().err


def test_info_without_gpu_exits_zero(capsys, monkeypatch):
    import quick_lab.cli as cli

    monkeypatch.setattr(cli, "cuda_device_status", lambda: (False, "no usable CUDA device: test"))
    assert main(["info"]) == 0
    assert "GPU: none (no usable CUDA device: test)" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["bench"], ["tiles", "--batches", "1,16"]])
def test_measuring_commands_without_gpu_say_so(command, capsys, monkeypatch):
    import quick_lab.cli as cli

    monkeypatch.setattr(cli, "cuda_device_status", lambda: (False, "no usable CUDA device: test"))
    assert main(command) == 2
    assert "none is usable" in capsys.readouterr().err


def test_bad_cli_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "8192by8192"])
    assert "8192x28672" in capsys.readouterr().err


@pytest.mark.parametrize("M,N,G", [(1, 4096, 128), (100, 64, 128), (7, 192, 32), (2000, 4096, 64)])
def test_default_quick_config_always_fits_the_problem(M, N, G):
    for kind in configs.KINDS:
        cfg = dispatch.default_config(kind, M, N, G)
        assert N % cfg.tile_n == 0 and G % cfg.tile_k == 0
        assert registry.violations(kind, cfg) == []


def test_results_dir_is_the_given_one_or_results_slash_gpu(tmp_path, monkeypatch):
    from quick_lab.build import paths
    from quick_lab.lab import metadata

    assert metadata.results_dir(tmp_path) == tmp_path
    monkeypatch.setattr(metadata, "gpu_info", lambda: {"gpu": "NVIDIA H100 80GB HBM3"})
    monkeypatch.delenv(paths.RESULTS_ROOT_ENV, raising=False)
    assert metadata.results_dir() == paths.results_root() / "h100-80gb-hbm3"
    # the dispatch table lives beside the sweeps: a table measured into the results root wins
    (tmp_path / "h100-80gb-hbm3").mkdir()
    (tmp_path / "h100-80gb-hbm3" / "dispatch.json").write_text("[]\n")
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path))
    assert metadata.results_dir() == tmp_path / "h100-80gb-hbm3"
    assert paths.dispatch_table_path("h100-80gb-hbm3") == tmp_path / "h100-80gb-hbm3" / "dispatch.json"
