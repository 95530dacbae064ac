"""Per-GPU dispatch table: for each (K, N, M) the fastest measured QUICK path (a tile config and
split-K of the QUICK kernel, or dequantize + cuBLAS). Built from the tile sweep (``tiles.csv``) and
stored as ``results/<gpu>/dispatch.json``; the public op ``ops.quick_gemm`` uses it when no config
is given.

Lookup: the measured shape nearest in log(K), log(N), then the smallest measured batch >= M (the
largest one beyond the table). A choice that does not fit the problem (tile_n must divide N, tile_k
the group size) falls back to :func:`quick_lab.core.ops.default_config`.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pandas as pd

from quick_lab.core import configs
from quick_lab.build.paths import dispatch_table_path

FALLBACK = "fallback"


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


def choose(table, M: int, K: int, N: int, group_size: int):
    """(kernel, TileConfig or None, split_k) from the table, or None when the table has no fitting row."""
    if not table:
        return None
    shapes = {(r["K"], r["N"]) for r in table}
    K0, N0 = min(shapes, key=lambda s: (math.log(s[0] / K)) ** 2 + (math.log(s[1] / N)) ** 2)
    rows = sorted((r for r in table if (r["K"], r["N"]) == (K0, N0)), key=lambda r: r["M"])
    row = next((r for r in rows if r["M"] >= M), rows[-1])
    if row["kernel"] == FALLBACK:
        return FALLBACK, None, 1
    cfg = configs.TileConfig.parse(row["config"])
    if not configs.fits(cfg, N, group_size):
        return None
    if cfg.wgmma and row["split_k"] == configs.STREAM_K:
        return "quick", cfg, configs.STREAM_K
    k_tiles = K // cfg.tile_k
    return "quick", cfg, max(1, min(row["split_k"], k_tiles))
