"""Kernel selection, all of it: for a problem (kind, M, K, N, group size) which path runs — a kernel
variant and its split-K, or dequantize + cuBLAS — and why.

Three sources, in order:

1. The caller's pin: a config and/or split-K passed to the op (:func:`pinned_config` and
   :func:`default_split_k` fill in what is left).
2. The per-GPU dispatch table (QUICK only): the fastest measured path per (K, N, M) of the tile sweep
   (``tiles.csv``), stored as ``results/<gpu>/dispatch.json`` and shipped in the wheel.
   Lookup: the measured shape nearest in log(K), log(N), then the smallest measured batch >= M (the
   largest one beyond the table). A row that does not fit the problem (tile_n must divide N, tile_k
   the group size) is skipped in favour of the heuristic.
3. The heuristic: AutoAWQ's configuration for the baseline; for QUICK the listed mma.sync variant whose
   tile_m is nearest the batch, with enough split-K for ~2 blocks per SM.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from quick_lab.build import device
from quick_lab.build.paths import dispatch_table_path
from quick_lab.core import configs, registry
from quick_lab.core.configs import STREAM_K, TileConfig

FALLBACK = "fallback"


class Choice(NamedTuple):
    """``kernel`` is the weight kind of the kernel that runs ("awq" / "quick") or FALLBACK (dequantize +
    cuBLAS; config None, split 1)."""

    kernel: str
    config: TileConfig | None
    split_k: int


# ---------------------------------------------------------------- the heuristic


def default_config(kind: str, M: int, N: int, group_size: int) -> TileConfig:
    """AutoAWQ's shape for the baseline (by N, as AutoAWQ picks); for QUICK a listed mma.sync variant
    whose tile_n divides N and tile_k the group size, with tile_m as close as possible to the smallest
    of 16..128 covering M (ties: tile_n 128, then the deeper tile_k and pipeline)."""
    if kind == "awq":
        return configs.AWQ_DEFAULT if N % configs.AWQ_DEFAULT.tile_n == 0 else configs.AWQ_DEFAULT_N64
    tile_m = next((t for t in (16, 32, 64, 128) if M <= t), 128)
    fitting = [c for c in configs.QUICK_VARIANTS if N % c.tile_n == 0 and group_size % c.tile_k == 0]
    if not fitting:
        return configs.QUICK_DEFAULT  # N not a multiple of 64: validation names the rule
    return min(fitting, key=lambda c: (abs(c.tile_m - tile_m), c.tile_n != 128, -c.tile_k, -c.stages))


def default_split_k(kind: str, cfg: TileConfig, M: int, K: int, N: int, num_sms: int | None = None) -> int:
    """AutoAWQ's split-K 8 for the baseline in its own configuration; stream-K for a family that has it
    (the wgmma mainloop); otherwise enough splits for ~2 blocks per SM."""
    if registry.family(kind, cfg).stream_k:
        return STREAM_K
    k_tiles = K // cfg.tile_k
    if kind == "awq" and cfg in (configs.AWQ_DEFAULT, configs.AWQ_DEFAULT_N64):
        return min(configs.AWQ_DEFAULT_SPLIT_K, k_tiles)
    sms = num_sms if num_sms is not None else device.num_sms(device.current_device())
    blocks = (N // cfg.tile_n) * -(-M // cfg.tile_m)
    split = 1
    while blocks * split < 2 * sms and split * 2 <= min(16, k_tiles // 4):
        split *= 2
    return split


def pinned_config(kind: str, config, M: int, N: int, group_size: int):
    """A caller's pinned config: a TileConfig as given, its name parsed, None the heuristic's."""
    if config is None:
        return default_config(kind, max(M, 1), N, group_size)
    return TileConfig.parse(config) if isinstance(config, str) else config


# ---------------------------------------------------------------- the measured table


def build_table(tiles: pd.DataFrame) -> list[dict]:
    """Fastest QUICK-path row per (K, N, M) of a tile sweep (cuBLAS-only and baseline rows ignored)."""
    rows = tiles[tiles.kernel.isin(["quick", FALLBACK])]
    best = rows.loc[rows.groupby(["K", "N", "M"]).time_us.idxmin()]
    return [dict(K=int(r.K), N=int(r.N), M=int(r.M), kernel=r.kernel, config=r.config, split_k=int(r.split_k),
                 time_us=round(float(r.time_us), 2), ratio_to_fp16=round(float(r.ratio_to_fp16), 4))
            for r in best.itertuples()]


def write_table(tiles: pd.DataFrame, path: Path) -> list[dict]:
    table = build_table(tiles)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


@functools.lru_cache(maxsize=None)
def load_table(gpu_slug: str) -> tuple:
    path = dispatch_table_path(gpu_slug)
    return tuple(json.loads(path.read_text())) if path is not None else ()


def lookup(table, M: int, K: int, N: int, group_size: int) -> Choice | None:
    """The table's choice for this problem, or None when the table is empty or its row does not fit."""
    if not table:
        return None
    shapes = {(r["K"], r["N"]) for r in table}
    K0, N0 = min(shapes, key=lambda s: (math.log(s[0] / K)) ** 2 + (math.log(s[1] / N)) ** 2)
    rows = sorted((r for r in table if (r["K"], r["N"]) == (K0, N0)), key=lambda r: r["M"])
    row = next((r for r in rows if r["M"] >= M), rows[-1])
    if row["kernel"] == FALLBACK:
        return Choice(FALLBACK, None, 1)
    cfg = TileConfig.parse(row["config"])
    if not registry.fits(cfg, N, group_size, K=K, M=M):
        return None
    if registry.family("quick", cfg).stream_k and row["split_k"] == STREAM_K:
        return Choice("quick", cfg, STREAM_K)
    k_tiles = K // cfg.tile_k
    return Choice("quick", cfg, max(1, min(row["split_k"], k_tiles)))


# ---------------------------------------------------------------- the public op's choice


@functools.lru_cache(maxsize=None)
def choose(kind: str, M: int, K: int, N: int, group_size: int, device_id: int = 0,
           allow_fallback: bool = True) -> Choice:
    """What the public op runs for this problem on GPU ``device_id``: for QUICK the table's choice (if
    it has a fitting one), else the heuristic. ``allow_fallback=False`` (a caller that handles large
    batch itself) turns a dequantize + cuBLAS choice into the heuristic kernel."""
    M = max(M, 1)
    if kind == "quick":
        choice = lookup(load_table(device.gpu_slug(device.gpu_name(device_id))), M, K, N, group_size)
        if choice is not None and (allow_fallback or choice.kernel != FALLBACK):
            return choice
    cfg = default_config(kind, M, N, group_size)
    return Choice(kind, cfg, default_split_k(kind, cfg, M, K, N, device.num_sms(device_id)))
