"""Kernel selection, all of it: for a problem (kind, M, K, N, group size) which path runs — a kernel
variant and its split-K, or dequantize + cuBLAS — and why.

Sources, in order:

1. The caller's pin: a config and/or split-K passed to the op (:func:`pinned_config` and
   :func:`default_split_k` fill in what is left).
2. The committed dispatch table of this GPU (QUICK only): the fastest measured path per (K, N, M) of
   the tile sweep (``tiles.csv``), stored as ``results/<gpu>/dispatch.json`` and shipped in the wheel.
   Lookup: the measured shape nearest in log(K), log(N), then the smallest measured batch >= M (the
   largest one beyond the table). A row that does not fit the problem (tile_n must divide N, tile_k
   the group size) is skipped in favour of the next source.
3. The user's tuned table (:mod:`quick_lab.core.tables`: the cache directory, keyed by GPU, driver,
   quick_lab version and kernel sources): the row of exactly this (K, N, group size, batch bucket),
   written by ``quick-lab tune`` or by
4. lazy tuning: on the first call of a (K, N, group size, batch bucket) that neither table covers, the
   registered tuner times a shortlist within :data:`AUTOTUNE_BUDGET_S` seconds and its winner is
   merged into the tuned table. ``QUICK_LAB_AUTOTUNE=0`` or :func:`set_autotune` (False) turns it off.
5. The heuristic (:func:`heuristic`), designed from the H100 tile sweep: dequantize + cuBLAS above
   :data:`LARGE_BATCH` rows; the decode kernel up to 16 rows; on Hopper (compute capability 9.0) the
   wgmma variant of the batch's range; otherwise the listed mma.sync variant whose tile_m is nearest
   the batch; split-K to fill the GPU's resident blocks (stream-K once the tiles alone fill them).

Why a hook for the tuner: timing (events, the L2 flush, the sweep's candidates) is ``quick_lab.lab``,
which sits above core, and core must not import lab (tests/test_import_order.py). Moving the timing
path into core would give core two jobs and the project two timing paths, so the tuner stays in
``quick_lab.lab.tune`` and registers itself here (:func:`register_tuner`) when imported. So that
the public op alone tunes lazily, the first lazy-tuning need imports that module by name
(:data:`DEFAULT_TUNER_MODULE`, a plugin lookup: core holds no import of lab). ``quick-lab info`` and
:func:`table_status` say which source is in use and whether a tuner is registered.

:func:`choose` is memoized, and so are the tables and the tuned table's key (a second call, or a
batch in a bucket already tuned, reads nothing); a table written outside this module (``quick-lab
tune`` in this process: ``quick_lab.lab.tune.store``) calls :func:`invalidate`.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd

from quick_lab.build import device, paths
from quick_lab.build.paths import dispatch_table_path
from quick_lab.core import configs, registry, tables
from quick_lab.core.configs import STREAM_K, TileConfig

FALLBACK = "fallback"

# The heuristic's thresholds, from the H100 tile sweep (results/h100-80gb-hbm3/tiles*.csv; the
# evaluation is quick_lab.lab.tune.heuristic_regret):
LARGE_BATCH = 256   # above: dequantize + cuBLAS (within 7% of the best at M = 512, the best from 1024)
DECODE_MAX_M = 16   # up to: the heuristic picks the decode kernel (its 32-row tiles are left to the tables)
NARROW_N = 4096     # up to: the next smaller wgmma tile (too few column tiles to fill 132 SMs otherwise)
# Split-K: each block keeps at least this many k-tiles (shorter ranges left the 4-5 stage pipelines
# idle: 128x128x128 on 4096 x 4096 at M = 128 was 1.19x the best with 8 per block, 1.09x with 16).
MIN_K_TILES_PER_BLOCK = 16
# The decode kernel's split: the smallest power of two that gives at least DECODE_BLOCKS_PER_SM[tile_m]
# blocks per SM, each keeping DECODE_MIN_K_TILES k-tiles (fitted to the H100 decode sweep over the 15
# bench and model shapes, group sizes 128 and 32; the 16- and 32-row tiles hold more registers, so
# fewer of their blocks fit an SM).
DECODE_BLOCKS_PER_SM = {8: 3, 16: 1, 32: 1}
DECODE_MIN_K_TILES = {8: 4, 16: 1, 32: 1}
# Group sizes below 64 fit no wgmma variant; there, from M = 33, dequantize + cuBLAS beat every fused
# kernel on N up to this (the H100 sweep at G = 32: 4096-6144 columns), the mma.sync tiles of
# SMALL_GROUP_TILES beyond it.
FALLBACK_NARROW_N = 6144
# (largest M, largest N, config, split-K) for group sizes no wgmma tile fits, from M = 33: the H100
# sweep's winners at G = 32 (N 8192-57344; 32 x 256 tiles at split 2 up to 10240 columns).
SMALL_GROUP_TILES = (
    (64, 16384, "32x256x32_w1x4_s3", 2), (64, None, "64x256x32_w1x4_s3", 2),
    (128, 10240, "32x256x32_w1x4_s3", 2), (128, 16384, "128x256x32_w2x4_s4_cp", 2),
    (None, None, "128x256x32_w2x4_s4_cp", 1),
)
# M = 33-64 on N from NARROW_N up to WIDE_N_64 and K below DEEP_K_64: the next range's 128 x 128 tile
# (the H100 sweep: every such cell of the bench and model shapes), else the 64 x 256 one.
WIDE_N_64 = 10240
DEEP_K_64 = 16384
# wgmma variants use most of the 255-register budget (ptxas: 130-255, results/NOTES.md), so registers,
# not shared memory, often cap their residency; the heuristic assumes the whole budget.
WGMMA_REGISTERS_ASSUMED = 255

# Per batch range (largest M; None: the rest), the wgmma variants in order of preference for wide N and
# for N <= NARROW_N: the first fits group size 128 (the H100 sweep's winners), the second, tile_k 64,
# group size 64 (by analogy: unmeasured). Group size 32 leaves no wgmma variant: mma.sync.
HOPPER_TILES: tuple[tuple[int | None, tuple[str, ...], tuple[str, ...]], ...] = (
    (32, ("32x128x128_w1x4_s5_cp_wg_fz", "32x256x64_w1x4_s6_cp_wg"),
     ("16x128x128_w1x4_s6_cp_wg_fz", "16x128x64_w1x4_s8_cp_wg")),
    (64, ("64x256x128_w1x8_s4_cp_wg", "64x256x64_w1x8_s5_cp_wg"),
     ("32x128x128_w1x4_s5_cp_wg_fz", "64x128x64_w1x4_s6_cp_wg")),
    (None, ("128x128x128_w1x8_s4_cp_wg", "128x128x64_w1x8_s5_cp_wg"),
     ("128x128x128_w1x8_s4_cp_wg", "128x128x64_w1x8_s5_cp_wg")),
)
# The decode variants in order of preference (the first whose tile_m covers M and tile_k divides K).
DECODE_TILES = ("8x64x256_w1x4_s1_dc", "16x64x512_w1x8_s1_dc", "16x64x256_w1x4_s1_dc", "32x64x256_w1x4_s1_dc",
                "32x64x128_w1x4_s1_dc")

AUTOTUNE_ENV = "QUICK_LAB_AUTOTUNE"
AUTOTUNE_BUDGET_S = 2.0  # seconds a first call may spend tuning its (shape, batch bucket)


class Choice(NamedTuple):
    """``kernel`` is the weight kind of the kernel that runs ("awq" / "quick") or FALLBACK (dequantize +
    cuBLAS; config None, split 1)."""

    kernel: str
    config: TileConfig | None
    split_k: int


# ---------------------------------------------------------------- the heuristic


def default_config(kind: str, M: int, N: int, group_size: int, *, K: int | None = None,
                   compute_capability: str | None = None) -> TileConfig:
    """AutoAWQ's shape for the baseline (by N, as AutoAWQ picks). For QUICK, the first that fits:
    with K known and M <= 16 a decode variant (:data:`DECODE_TILES`); on compute capability 9.0 the
    wgmma variant of the batch's range (:data:`HOPPER_TILES`; M = 33-64 on mid N: the next range's),
    or, where none fits the group size, a decode variant up to its tile_m (32); else a listed mma.sync variant whose
    tile_n divides N and tile_k the group size, with tile_m as close as possible to the smallest of
    16..128 covering M (ties: tile_n 128, then the deeper tile_k and pipeline)."""
    if kind == "awq":
        return configs.AWQ_DEFAULT if N % configs.AWQ_DEFAULT.tile_n == 0 else configs.AWQ_DEFAULT_N64
    def decode_tile():
        return next((cfg for name in DECODE_TILES
                     if registry.fits(cfg := TileConfig.parse(name), N, group_size, K=K, M=M)), None)

    if K is not None and M <= DECODE_MAX_M and (cfg := decode_tile()) is not None:
        return cfg
    if compute_capability == "90":
        max_m, wide, narrow = next(r for r in HOPPER_TILES if r[0] is None or M <= r[0])
        if max_m == 64 and NARROW_N < N < WIDE_N_64 and (K is None or K < DEEP_K_64):
            wide = HOPPER_TILES[-1][1]
        for name in narrow if N <= NARROW_N else wide:
            if registry.fits(cfg := TileConfig.parse(name), N, group_size, K=K, M=M):
                return cfg
        # no wgmma tile fits this group size: the decode kernel's 32-row tiles still stream it at M <= 32
        if K is not None and (cfg := decode_tile()) is not None:
            return cfg
    tile_m = next((t for t in (16, 32, 64, 128) if M <= t), 128)
    fitting = [c for c in configs.QUICK_VARIANTS if N % c.tile_n == 0 and group_size % c.tile_k == 0]
    if not fitting:
        return configs.QUICK_DEFAULT  # N not a multiple of 64: validation names the rule
    return min(fitting, key=lambda c: (abs(c.tile_m - tile_m), c.tile_n != 128, -c.tile_k, -c.stages))


def default_split_k(kind: str, cfg: TileConfig, M: int, K: int, N: int, num_sms: int | None = None) -> int:
    """AutoAWQ's split-K 8 for the baseline in its own configuration. The wgmma family: stream-K once
    its output tiles alone fill the resident blocks (registers assumed at the budget), else the
    largest power-of-two split that still fits them, each block keeping at least
    :data:`MIN_K_TILES_PER_BLOCK` k-tiles. The decode kernel: the smallest power-of-two split giving
    :data:`DECODE_BLOCKS_PER_SM` (by tile_m) blocks per SM, at most 16 and keeping :data:`DECODE_MIN_K_TILES`
    k-tiles per block. Otherwise
    enough splits for ~2 blocks per SM."""
    fam = registry.family(kind, cfg)
    k_tiles = K // cfg.tile_k
    if kind == "awq" and cfg in (configs.AWQ_DEFAULT, configs.AWQ_DEFAULT_N64):
        return min(configs.AWQ_DEFAULT_SPLIT_K, k_tiles)
    sms = num_sms if num_sms is not None else device.num_sms(device.current_device())
    if fam.stream_k:
        tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
        slots = sms * registry.resident_blocks(fam, cfg, WGMMA_REGISTERS_ASSUMED, 0)
        if tiles >= slots:
            return STREAM_K
        split = 1
        while tiles * split * 2 <= slots and k_tiles >= MIN_K_TILES_PER_BLOCK * split * 2:
            split *= 2
        return split
    if cfg.decode:
        strips = N // cfg.tile_n
        split = 1
        while (strips * split < DECODE_BLOCKS_PER_SM[cfg.tile_m] * sms
               and split * 2 <= min(16, k_tiles // DECODE_MIN_K_TILES[cfg.tile_m])):
            split *= 2
        return split
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


def heuristic(kind: str, M: int, K: int, N: int, group_size: int, *, num_sms: int,
              compute_capability: str | None, allow_fallback: bool = True) -> Choice:
    """The choice without a table, from the problem and two facts about the GPU: dequantize + cuBLAS
    for QUICK above :data:`LARGE_BATCH` rows (on every GPU: cuBLAS's large-batch kernels outrun the
    fused ones there), else :func:`default_config` with :func:`default_split_k`. Needs no GPU."""
    M = max(M, 1)
    if kind == "quick" and allow_fallback and M > LARGE_BATCH:
        return Choice(FALLBACK, None, 1)
    if (kind == "quick" and compute_capability == "90" and M > 32
            and not any(registry.fits(c, N, group_size, K=K, M=M) for c in configs.QUICK_WGMMA_VARIANTS)):
        if allow_fallback and N <= FALLBACK_NARROW_N:
            return Choice(FALLBACK, None, 1)
        for max_m, max_n, name, split in SMALL_GROUP_TILES:
            if (max_m is None or M <= max_m) and (max_n is None or N <= max_n):
                if registry.fits(cfg := TileConfig.parse(name), N, group_size, K=K, M=M):
                    return Choice(kind, cfg, max(1, min(split, K // cfg.tile_k)))
                break
    cfg = default_config(kind, M, N, group_size, K=K, compute_capability=compute_capability)
    return Choice(kind, cfg, default_split_k(kind, cfg, M, K, N, num_sms))


# ---------------------------------------------------------------- the measured table


def build_table(tiles: pd.DataFrame) -> list[dict]:
    """Fastest QUICK-path row per (K, N, group size, M) of a tile sweep (cuBLAS-only and baseline rows
    ignored)."""
    rows = tiles[tiles.kernel.isin(["quick", FALLBACK])].reset_index(drop=True)  # concatenated sweeps repeat labels
    best = rows.loc[rows.groupby(["K", "N", "group_size", "M"]).time_us.idxmin()]
    return [dict(K=int(r.K), N=int(r.N), M=int(r.M), group_size=int(r.group_size), kernel=r.kernel,
                 config=r.config, split_k=int(r.split_k), time_us=round(float(r.time_us), 2),
                 ratio_to_fp16=round(float(r.ratio_to_fp16), 4))
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
    """The table's choice for this problem: among the rows of this group size when the table has any
    (else all rows), the nearest measured shape whose rows reach this batch (else the nearest of those
    reaching furthest), and of its rows the first whose M covers the batch (else its last); None when the table is empty or that row does
    not fit. (A shape swept only at decode batches does not answer a large batch for its neighbours.)"""
    if not table:
        return None
    same_group = [r for r in table if r.get("group_size") == group_size]
    table = same_group or table
    reach = max(min(M, r["M"]) for r in table)  # M itself when some row covers the batch
    shapes = {(r["K"], r["N"]) for r in table if r["M"] >= reach}
    K0, N0 = min(shapes, key=lambda s: (math.log(s[0] / K)) ** 2 + (math.log(s[1] / N)) ** 2)
    rows = sorted((r for r in table if (r["K"], r["N"]) == (K0, N0)), key=lambda r: r["M"])
    return _row_choice(next((r for r in rows if r["M"] >= M), rows[-1]), M, K, N, group_size)


def batch_bucket(M: int) -> int:
    """The batch a tuned row stands for: the smallest power of two >= M (M = 5..8 share the row of 8)."""
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    return 1 << (M - 1).bit_length()


def lookup_cell(table, M: int, K: int, N: int, group_size: int) -> Choice | None:
    """A tuned table's choice: the row of exactly this K, N, group size and batch bucket (no nearest
    shape: a shape it lacks is tuned, not guessed), or None (no such row, or it does not fit)."""
    bucket = batch_bucket(M)
    row = next((r for r in table if (r["K"], r["N"], r["M"], r.get("group_size")) == (K, N, bucket, group_size)),
               None)
    return None if row is None else _row_choice(row, M, K, N, group_size)


def _row_choice(row: dict, M: int, K: int, N: int, group_size: int) -> Choice | None:
    """A table row as a Choice for this problem, or None when its variant does not fit the problem."""
    if row["kernel"] == FALLBACK:
        return Choice(FALLBACK, None, 1)
    cfg = TileConfig.parse(row["config"])
    if not registry.fits(cfg, N, group_size, K=K, M=M):
        return None
    if registry.family("quick", cfg).stream_k and row["split_k"] == STREAM_K:
        return Choice("quick", cfg, STREAM_K)
    k_tiles = K // cfg.tile_k
    return Choice("quick", cfg, max(1, min(row["split_k"], k_tiles)))


# ---------------------------------------------------------------- the GPU, the tuned table, the tuner hook


class Gpu(NamedTuple):
    """What selection needs to know about a GPU."""

    name: str
    sm_count: int
    compute_capability: str
    driver: int


def gpu(device_id: int) -> Gpu:
    return Gpu(device.gpu_name(device_id), device.num_sms(device_id), device.compute_capability(device_id),
               device.driver_version())


def table_key(device_id: int) -> tables.TableKey:
    """The key of the tuned table for GPU ``device_id`` with this quick_lab and these kernel sources
    (hashed once per process and device: the kernels a process loaded do not change under it)."""
    if device_id not in _keys:
        facts = gpu(device_id)
        _keys[device_id] = tables.TableKey.current(facts.name, facts.sm_count, facts.driver)
    return _keys[device_id]


# (K, N, group size, batch bucket, device_id, budget_s) -> a table row (dispatch.json format plus
# group_size) or None; registered by quick_lab.lab.tune.
Tuner = Callable[[int, int, int, int, int, float], "dict | None"]
_tuner: Tuner | None = None
_autotune: bool | None = None           # set_autotune's override; None: QUICK_LAB_AUTOTUNE decides
_budget_s: float = AUTOTUNE_BUDGET_S
_attempted: set = set()                 # (table path, K, N, G, bucket) already tuned lazily (or tried)
_keys: dict = {}                        # device_id -> TableKey
_tuned: dict = {}                       # tuned table path -> its rows as last read or written


def register_tuner(tuner: Tuner | None) -> None:
    """Install (None: remove) the lazy tuner. ``quick_lab.lab.tune`` installs its own when imported."""
    global _tuner
    if tuner is not None and not callable(tuner):
        raise TypeError(f"tuner must be callable or None, got {type(tuner).__name__}")
    _tuner = tuner
    invalidate()


# The module that provides the default tuner, imported by name on the first lazy-tuning need (a
# plugin lookup, not an import of a higher layer: core never names lab's code, lab registers itself).
DEFAULT_TUNER_MODULE = "quick_lab.lab.tune"
_default_tuner_tried = False


def _load_default_tuner() -> None:
    """Import :data:`DEFAULT_TUNER_MODULE` once, so the public op on its own tunes lazily as documented;
    a failed import (an installation without it) leaves the heuristic in charge, with a warning."""
    global _default_tuner_tried
    if _default_tuner_tried:
        return
    _default_tuner_tried = True
    try:
        importlib.import_module(DEFAULT_TUNER_MODULE)
    except ImportError as exc:
        warnings.warn(f"lazy tuning unavailable ({DEFAULT_TUNER_MODULE}: {exc}); using the heuristic",
                      RuntimeWarning, stacklevel=3)


def tuner_registered() -> bool:
    return _tuner is not None


def set_autotune(enabled: bool | None, budget_s: float | None = None) -> None:
    """The switch for lazy tuning: False turns it off, True on, None hands it back to the environment
    (``QUICK_LAB_AUTOTUNE=0`` is off; unset or anything else is on). ``budget_s``: seconds a first
    call may spend tuning (default :data:`AUTOTUNE_BUDGET_S`)."""
    global _autotune, _budget_s
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    if budget_s is not None:
        if not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds, got {budget_s}")
        _budget_s = float(budget_s)
    _autotune = enabled
    invalidate()


def autotune_enabled() -> bool:
    """Whether a first call of an untabled problem may tune (the switch, then the environment)."""
    if _autotune is not None:
        return _autotune
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def invalidate() -> None:
    """Forget every memoized choice, table and key (after a table was written or a switch changed)."""
    choose.cache_clear()
    load_table.cache_clear()
    _keys.clear()
    _tuned.clear()


def _tuned_rows(path: Path) -> tuple:
    if path not in _tuned:
        _tuned[path] = tables.read_rows(path)
    return _tuned[path]


def _lazily_tuned(M: int, K: int, N: int, group_size: int, device_id: int, path: Path) -> Choice | None:
    """Tune this (K, N, group size, batch bucket) once per process and table, within the budget, and
    merge the winner into the tuned table; None when off, without a tuner, inside a CUDA-graph
    capture (timing cannot be captured: tried again on a later call), or when tuning failed."""
    if not autotune_enabled():
        return None
    if _tuner is None:
        _load_default_tuner()
        if _tuner is None:
            return None
    bucket = batch_bucket(M)
    cell = (str(path), K, N, group_size, bucket)
    if cell in _attempted or device.stream_is_capturing():
        return None
    _attempted.add(cell)
    rows = tables.read_rows(path)  # another process may have tuned it since this one read the table
    if (choice := lookup_cell(rows, M, K, N, group_size)) is None:
        try:
            row = _tuner(K, N, group_size, bucket, device_id, _budget_s)
        except Exception as exc:  # a failed tuning must not fail the op: the heuristic runs instead
            warnings.warn(f"lazy tuning of K={K} N={N} group_size={group_size} M<={bucket} failed, using the "
                          f"heuristic: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            return None
        if row is None:
            return None
        rows = tables.merge_rows(path, [row], table_key(device_id))
        choice = lookup_cell(rows, M, K, N, group_size)
    choose.cache_clear()  # choices made from the table before this row
    _tuned[path] = rows
    return choice


def table_status(device_id: int = 0) -> dict:
    """Which table GPU ``device_id`` dispatches from and where it came from: the committed one
    (``committed``: its path; ``committed_origin``: "shipped with the package" or "results
    directory"), the tuned one (``tuned``: its path in the cache, ``tuned_rows``), ``in_use``
    ("committed", "tuned", or "heuristic" when neither exists), and lazy tuning (``autotune``: the
    switch; ``tuner``: whether one is registered)."""
    facts = gpu(device_id)
    committed = dispatch_table_path(device.gpu_slug(facts.name))
    key = table_key(device_id)
    tuned = tables.table_path(key)
    tuned_rows = len(tables.read_rows(tuned))
    origin = None
    if committed is not None:
        origin = ("shipped with the package" if paths.PACKAGED_TABLES in committed.parents
                  else "results directory")
    in_use = "committed" if committed is not None else "tuned" if tuned_rows else "heuristic"
    return dict(gpu=facts.name, committed=committed, committed_origin=origin, tuned=tuned, tuned_rows=tuned_rows,
                key=key.digest, in_use=in_use, autotune=autotune_enabled(), tuner=tuner_registered(),
                budget_s=_budget_s)


# ---------------------------------------------------------------- the public op's choice


@functools.lru_cache(maxsize=None)
def choose(kind: str, M: int, K: int, N: int, group_size: int, device_id: int = 0,
           allow_fallback: bool = True) -> Choice:
    """What the public op runs for this problem on GPU ``device_id``: for QUICK the committed table's
    choice, else the tuned table's, else a lazily tuned one (each if it has a fitting one), else the
    heuristic. ``allow_fallback=False`` (a caller that handles large batch itself) turns a
    dequantize + cuBLAS choice into the heuristic kernel."""
    M = max(M, 1)
    facts = gpu(device_id)
    if kind == "quick":
        choice = _table_choice(M, K, N, group_size, device_id, facts)
        if choice is not None and (allow_fallback or choice.kernel != FALLBACK):
            return choice
    return heuristic(kind, M, K, N, group_size, num_sms=facts.sm_count, compute_capability=facts.compute_capability,
                     allow_fallback=allow_fallback)


def _table_choice(M: int, K: int, N: int, group_size: int, device_id: int, facts: Gpu) -> Choice | None:
    """The committed table, then the tuned one, then lazy tuning."""
    choice = lookup(load_table(device.gpu_slug(facts.name)), M, K, N, group_size)
    if choice is not None:
        return choice
    path = tables.table_path(table_key(device_id))
    choice = lookup_cell(_tuned_rows(path), M, K, N, group_size)
    if choice is not None:
        return choice
    return _lazily_tuned(M, K, N, group_size, device_id, path)
