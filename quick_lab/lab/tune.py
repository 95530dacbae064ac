"""Tuning the dispatch table on the GPU at hand within a time budget (``quick-lab tune``, and the lazy
tuning of a first call), and the offline evaluation of the heuristic against a tile sweep.

Per cell (K, N, group size, batch bucket M; :func:`quick_lab.core.dispatch.batch_bucket`):

1. Candidates (:func:`candidates`): every registered QUICK variant its family's problem rules accept
   (``registry.fits``) and whose own rules hold (``registry.violations``: static_asserts, shared memory
   per block), the wgmma family only on compute capability 9.0; at each split-K of :data:`SPLITS` up to
   its k-tiles and, for the wgmma family, stream-K; a split is dropped once half of it already gives
   more blocks than the GPU can hold (``registry.resident_blocks`` by shared memory and warps:
   more splits then add only reduction work); plus dequantize + cuBLAS.
2. Order (:func:`ordered_candidates`): the shortlist first (:func:`shortlist`: the heuristic's pick,
   its split-K neighbours, the heuristic's wgmma variants of every batch range and every wgmma variant
   of the tile_m covering M and the next, each at its heuristic split and its neighbours; the decode
   variants at every split up to their largest tile_m (32); dequantize + cuBLAS from M = 128; the mma.sync default), then
   the rest, tile_m nearest M first.
3. Timing (:func:`run`, ``lab.timing``: device events, L2 flushed before every launch, the median): the
   heuristic's pick of every cell first, whatever the budget (a table always has a timed row per cell);
   then one candidate per cell in turn, skipping any whose expected cost (its launches at the cell's
   slowest time so far, plus a compile when its variant is not loaded yet) would pass the deadline.
4. The winner per cell as a ``dispatch.json`` row plus its group size (:meth:`Cell.row`), merged into
   the user's tuned table (:func:`store`, :mod:`quick_lab.core.tables`).

Importing this module registers :func:`lazy_tune` as the dispatcher's tuner
(:func:`quick_lab.core.dispatch.register_tuner`; core cannot import lab, see dispatch's docstring).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from quick_lab.core import configs, dispatch, ops, registry, tables
from quick_lab.core.configs import STREAM_K, TileConfig
from quick_lab.core.format import VALID_GROUP_SIZES
from quick_lab.core.interleave import QuickWeight
from quick_lab.lab.timing import Timer

SPLITS = (1, 2, 4, 8, 16)                # the split-K values of the committed tile sweep
BATCHES = tuple(2**i for i in range(13))  # 1 .. 4096: the batch buckets `quick-lab tune` fills
REPS, WARMUP = 15, 3                       # the committed tile sweep's repetitions
LAZY_REPS, LAZY_WARMUP = 10, 2
FALLBACK_FROM_M = 128                      # dequantize + cuBLAS joins the shortlist from this batch
FALLBACK_CONFIG = "dequant+cublas"         # its name in sweeps and tables
FIRST_LOAD_S = 1.0     # expected cost of a variant's first load until one is seen (NVRTC: ~0.8 s cold)
FLUSH_S = 3e-4         # one L2 flush (256 MB written at ~3 TB/s) plus the host's per-launch work
MIN_REGISTERS = 32     # a lower bound on registers per thread: residency from it is an upper bound


# ---------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A path to time: a QUICK variant and its split-K, or dequantize + cuBLAS (``config`` None)."""

    config: TileConfig | None
    split_k: int = 1

    @property
    def kernel(self) -> str:
        return dispatch.FALLBACK if self.config is None else "quick"

    @property
    def name(self) -> str:
        return FALLBACK_CONFIG if self.config is None else self.config.name

    def __str__(self) -> str:
        return f"{self.name}/{self.split_k}"


def _max_resident(fam: registry.KernelFamily, cfg: TileConfig, num_sms: int) -> int:
    """Blocks the whole GPU could hold at most (registers not known before compiling)."""
    return num_sms * registry.resident_blocks(fam, cfg, MIN_REGISTERS, 0)


def _splits(fam: registry.KernelFamily, cfg: TileConfig, M: int, K: int, N: int, num_sms: int) -> list[int]:
    k_tiles = K // cfg.tile_k
    tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
    most = _max_resident(fam, cfg, num_sms)
    out = [STREAM_K] if fam.stream_k else []
    return out + [s for s in SPLITS if s <= k_tiles and (s == 1 or tiles * (s // 2) < most)]


def candidates(M: int, K: int, N: int, group_size: int, *, num_sms: int,
               compute_capability: str | None) -> list[Candidate]:
    """Every path that can run this problem on this GPU, pruned as the module docstring says."""
    out = []
    for fam in registry.families("quick", hopper=compute_capability == "90"):
        for cfg in fam.variants:
            if registry.violations("quick", cfg) or K % cfg.tile_k:
                continue
            if not registry.fits(cfg, N, group_size, K=K, M=M):
                continue
            out += [Candidate(cfg, s) for s in _splits(fam, cfg, M, K, N, num_sms)]
    return out + [Candidate(None)]


def shortlist(M: int, K: int, N: int, group_size: int, *, num_sms: int,
              compute_capability: str | None) -> list[Candidate]:
    """The candidates worth timing first; the heuristic's pick is the first."""
    pool = set(candidates(M, K, N, group_size, num_sms=num_sms, compute_capability=compute_capability))
    pick = dispatch.heuristic("quick", M, K, N, group_size, num_sms=num_sms, compute_capability=compute_capability)
    out = [Candidate(pick.config, pick.split_k)]

    def add(cfg: TileConfig | None, split: int | None = None, neighbours: bool = True) -> None:
        """``cfg`` at ``split`` (None: the heuristic's split for it) and, with ``neighbours``, at half
        and twice that split and stream-K (split 1 when that split is stream-K)."""
        splits = [1]
        if cfg is not None:
            if not registry.fits(cfg, N, group_size, K=K, M=M):
                return
            split = dispatch.default_split_k("quick", cfg, M, K, N, num_sms) if split is None else split
            splits = [split]
            if neighbours:
                splits += [split * 2, split // 2, STREAM_K] if split != STREAM_K else [1]
        for s in splits:
            cand = Candidate(cfg, s)
            if cand in pool and cand not in out:
                out.append(cand)

    if pick.config is not None:
        add(pick.config, pick.split_k)
    if compute_capability == "90":
        for _, wide, narrow in dispatch.HOPPER_TILES:
            for name in dict.fromkeys(wide + narrow):
                add(TileConfig.parse(name))
        # every wgmma variant of the tile_m that covers M and of the next one up
        tile_m = min(max(dispatch.batch_bucket(M), 16), 256)
        for cfg in configs.QUICK_WGMMA_VARIANTS:
            if cfg.tile_m in (tile_m, 2 * tile_m):
                add(cfg)
    if M <= max(c.tile_m for c in configs.QUICK_DECODE_VARIANTS):  # every split: they are quick to time
        for cfg in configs.QUICK_DECODE_VARIANTS:  # add() skips those whose tile_m is below M
            for split in SPLITS:
                add(cfg, split, neighbours=False)
    if M >= FALLBACK_FROM_M:
        add(None)
    add(dispatch.default_config("quick", M, N, group_size), neighbours=False)
    return out


def ordered_candidates(M: int, K: int, N: int, group_size: int, *, num_sms: int,
                       compute_capability: str | None) -> list[Candidate]:
    """The shortlist, then every other candidate, tile_m nearest M first (dequantize + cuBLAS last)."""
    first = shortlist(M, K, N, group_size, num_sms=num_sms, compute_capability=compute_capability)
    rest = [c for c in candidates(M, K, N, group_size, num_sms=num_sms, compute_capability=compute_capability)
            if c not in first]
    rest.sort(key=lambda c: (c.config is None,
                             abs(math.log2(c.config.tile_m / M)) if c.config is not None else 0.0,
                             c.name, c.split_k))
    return first + rest


# ---------------------------------------------------------------- the budgeted timing loop


@dataclass
class Cell:
    """One (K, N, group size, batch bucket) to tune, its candidates in order and what was timed."""

    K: int
    N: int
    M: int
    group_size: int
    queue: list[Candidate]
    times: dict = field(default_factory=dict)    # Candidate -> median time in us
    failed: dict = field(default_factory=dict)   # Candidate -> error text
    fp16_us: float | None = None                 # cuBLAS fp16 on the same problem (None: not timed)

    @property
    def label(self) -> str:
        return f"K={self.K} N={self.N} M={self.M}"

    def best(self) -> tuple[Candidate, float] | None:
        return min(self.times.items(), key=lambda kv: kv[1]) if self.times else None

    def row(self) -> dict | None:
        """The winner as a dispatch.json row plus its group size (None: nothing ran)."""
        best = self.best()
        if best is None:
            return None
        cand, t = best
        ratio = round(t / self.fp16_us, 4) if self.fp16_us else None
        return dict(K=self.K, N=self.N, M=self.M, kernel=cand.kernel, config=cand.name, split_k=int(cand.split_k),
                    time_us=round(float(t), 2), ratio_to_fp16=ratio, group_size=self.group_size)


@dataclass
class TuneResult:
    cells: list[Cell]
    timed: int          # timings run
    skipped: int        # candidates left out to keep the budget
    elapsed_s: float
    budget_s: float

    @property
    def rows(self) -> list[dict]:
        return [r for r in (c.row() for c in self.cells) if r is not None]


def run(cells: list[Cell], measurer, budget_s: float, *, clock=time.monotonic, progress=None) -> TuneResult:
    """Times the cells' candidates until ``budget_s`` seconds are spent: every cell's first candidate
    (the heuristic's pick) unconditionally, then one candidate per cell in turn, skipping any that
    ``measurer.estimate_s(cell, cand)`` says would end past the deadline. ``measurer.measure(cell,
    cand)`` returns a median time in us (an exception marks the candidate failed);
    ``measurer.baseline(cell)`` cuBLAS fp16's, or None. ``progress(seconds, budget, label)``."""
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds, got {budget_s}")
    start = clock()
    deadline = start + budget_s
    timed = skipped = 0
    total = max(1, math.ceil(budget_s))

    def one(cell: Cell, cand: Candidate) -> None:
        nonlocal timed
        try:
            cell.times[cand] = float(measurer.measure(cell, cand))
        except Exception as exc:  # a variant that fails to compile or launch loses, the tuning goes on
            cell.failed[cand] = f"{type(exc).__name__}: {exc}"
        timed += 1
        if progress:
            best = cell.best()
            progress(min(total - 1, int(clock() - start)), total,
                     f"{cell.label} {best[0] if best else '-'}")

    for cell in cells:
        if cell.fp16_us is None:
            cell.fp16_us = measurer.baseline(cell)
        if cell.queue:
            one(cell, cell.queue[0])
    position = {id(c): 1 for c in cells}
    active = [c for c in cells if len(c.queue) > 1]
    while active and clock() < deadline:
        still = []
        for cell in active:
            i = position[id(cell)]
            while i < len(cell.queue) and clock() + measurer.estimate_s(cell, cell.queue[i]) > deadline:
                skipped += 1
                i += 1
            if i < len(cell.queue):
                one(cell, cell.queue[i])
                i += 1
            position[id(cell)] = i
            if i < len(cell.queue):
                still.append(cell)
        active = still
    skipped += sum(len(c.queue) - position[id(c)] for c in active)
    if progress:
        progress(total, total, f"{timed} timings in {clock() - start:.1f} s")
    return TuneResult(cells, timed, skipped, clock() - start, budget_s)


# ---------------------------------------------------------------- timing on the GPU


def device_problem(K: int, N: int, group_size: int, seed: int = 0) -> QuickWeight:
    """Random QUICK-layout weights made on the GPU (a kernel's time does not depend on the values;
    building them on the host would cost seconds of the budget for the large shapes)."""
    import cupy

    rs = cupy.random.RandomState(seed)
    qweight = rs.randint(0, 2**31 - 1, size=(K // 16, 2 * N), dtype=cupy.int32)
    qzeros = rs.randint(0, 2**31 - 1, size=(K // group_size, N // 8), dtype=cupy.int32)
    scales = (rs.random_sample((K // group_size, N), dtype=cupy.float32) * 0.01 + 0.001).astype(cupy.float16)
    return QuickWeight(qweight, qzeros, scales, group_size)


class GpuMeasurer:
    """Times candidates on the current GPU with lab.timing (L2 flushed, median of ``reps``); keeps one
    random problem per shape and one activation per (M, K) for the whole run."""

    def __init__(self, reps: int = REPS, warmup: int = WARMUP, fp16: bool = True, seed: int = 0):
        if reps < 1 or warmup < 0:
            raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
        self.reps, self.warmup, self.fp16, self.seed = reps, warmup, fp16, seed
        self.timer = Timer()
        self._weights: dict = {}
        self._fp16: dict = {}
        self._x: dict = {}
        self._loaded: set = set()
        self._first_load_s: float | None = None
        self._slowest_us: dict = {}

    def _weight(self, cell: Cell) -> QuickWeight:
        key = (cell.K, cell.N, cell.group_size)
        if key not in self._weights:
            self._weights[key] = device_problem(*key, seed=self.seed)
        return self._weights[key]

    def _activations(self, cell: Cell):
        import cupy

        key = (cell.M, cell.K)
        if key not in self._x:
            rs = cupy.random.RandomState(self.seed + cell.M)
            self._x[key] = rs.standard_normal((cell.M, cell.K), dtype=cupy.float32).astype(cupy.float16)
        return self._x[key]

    def _median_us(self, fn) -> float:
        return float(np.median(self.timer.times_ms(fn, reps=self.reps, warmup=self.warmup))) * 1e3

    def baseline(self, cell: Cell) -> float | None:
        if not self.fp16:
            return None
        import cupy

        key = (cell.K, cell.N)
        if key not in self._fp16:
            rs = cupy.random.RandomState(self.seed + 1)
            self._fp16[key] = (rs.standard_normal((cell.K, cell.N), dtype=cupy.float32) * 0.02).astype(cupy.float16)
        x, w = self._activations(cell), self._fp16[key]
        y = cupy.empty((cell.M, cell.N), dtype=cupy.float16)
        t = self._median_us(lambda: cupy.matmul(x, w, out=y))
        self._note(cell, t)
        return t

    def measure(self, cell: Cell, cand: Candidate) -> float:
        x, w = self._activations(cell), self._weight(cell)
        new = cand.config not in self._loaded
        t0 = time.perf_counter()
        try:
            plan = (ops.plan_fallback(x, w) if cand.config is None
                    else ops.plan_quick_gemm(x, w, config=cand.config, split_k=cand.split_k))
        finally:
            if new:  # the first plan of a variant compiles or loads it
                self._loaded.add(cand.config)
                seen = time.perf_counter() - t0
                self._first_load_s = seen if self._first_load_s is None else max(self._first_load_s, seen)
        t = self._median_us(plan.run)
        self._note(cell, t)
        return t

    def _note(self, cell: Cell, t_us: float) -> None:
        key = (cell.K, cell.N, cell.M, cell.group_size)
        self._slowest_us[key] = max(self._slowest_us.get(key, 0.0), t_us)

    def estimate_s(self, cell: Cell, cand: Candidate) -> float:
        """Expected seconds to time ``cand``: its launches at the cell's slowest time so far (twice
        that until anything ran), plus a first load for a variant not loaded yet."""
        slowest = self._slowest_us.get((cell.K, cell.N, cell.M, cell.group_size))
        per_launch = (slowest if slowest is not None else 2e3) * 1e-6 + FLUSH_S
        load = 0.0 if cand.config in self._loaded else (self._first_load_s or FIRST_LOAD_S)
        return (self.reps + self.warmup) * per_launch + load


# ---------------------------------------------------------------- tune, store, lazy tuning


def _check_problem(K: int, N: int, group_size: int) -> None:
    if group_size not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {group_size}")
    if K < group_size or K % group_size:
        raise ValueError(f"shape K x N = {K}x{N}: K must be a positive multiple of group_size = {group_size}")
    if N < 64 or N % 64:
        raise ValueError(f"shape K x N = {K}x{N}: N must be a positive multiple of 64 (the QUICK layout)")


def plan_cells(shapes, batches, group_size: int, *, num_sms: int, compute_capability: str | None) -> list[Cell]:
    """One cell per shape x batch bucket (batches are rounded up to their bucket, duplicates dropped)."""
    if not shapes or not batches:
        raise ValueError("shapes and batches must not be empty")
    cells = []
    for K, N in shapes:
        _check_problem(K, N, group_size)
        for M in sorted({dispatch.batch_bucket(M) for M in batches}):
            cells.append(Cell(K, N, M, group_size, ordered_candidates(
                M, K, N, group_size, num_sms=num_sms, compute_capability=compute_capability)))
    return cells


def tune(shapes, batches=BATCHES, *, group_size: int = 128, budget_s: float, reps: int = REPS,
         device_id: int | None = None, progress=None, measurer=None) -> TuneResult:
    """Tune every shape x batch bucket on GPU ``device_id`` (the current one when None) within
    ``budget_s`` seconds; rows carry the ratio to cuBLAS fp16 timed in the same run."""
    import cupy

    device_id = cupy.cuda.Device().id if device_id is None else device_id
    with cupy.cuda.Device(device_id):
        facts = dispatch.gpu(device_id)
        cells = plan_cells(shapes, batches, group_size, num_sms=facts.sm_count,
                           compute_capability=facts.compute_capability)
        return run(cells, measurer or GpuMeasurer(reps=reps), budget_s, progress=progress)


def store(rows, device_id: int | None = None):
    """Merge tuned rows into the tuned table of GPU ``device_id`` (the current one when None) in the
    user cache; returns its path."""
    if device_id is None:
        import cupy

        device_id = cupy.cuda.Device().id
    key = dispatch.table_key(device_id)
    path = tables.table_path(key)
    tables.merge_rows(path, rows, key)
    dispatch.invalidate()
    return path


def lazy_tune(K: int, N: int, group_size: int, M: int, device_id: int, budget_s: float) -> dict | None:
    """The dispatcher's tuner: one cell, within ``budget_s`` seconds, no cuBLAS baseline (its row's
    ratio_to_fp16 is None)."""
    import cupy

    with cupy.cuda.Device(device_id):
        facts = dispatch.gpu(device_id)
        cell = Cell(K, N, M, group_size, ordered_candidates(M, K, N, group_size, num_sms=facts.sm_count,
                                                            compute_capability=facts.compute_capability))
        run([cell], GpuMeasurer(reps=LAZY_REPS, warmup=LAZY_WARMUP, fp16=False), budget_s)
    return cell.row()


dispatch.register_tuner(lazy_tune)


# ---------------------------------------------------------------- offline: the heuristic, table agreement


def _nearest_split(timed, split: int) -> int:
    """The timed split nearest ``split`` in log2 (stream-K, if it was not timed, counts as split 1)."""
    def position(s):
        return -1.0 if s == STREAM_K else math.log2(s)

    if split in timed:
        return split
    target = position(split) if split != STREAM_K else 0.0
    return min(timed, key=lambda s: (abs(position(s) - target), s))


def heuristic_regret(tiles: pd.DataFrame, *, num_sms: int = 132, compute_capability: str | None = "90") -> pd.DataFrame:
    """For every (K, N, group size, M) cell of a tile sweep (``tiles*.csv`` rows; QUICK and fallback
    rows count), the heuristic's pick among the timed rows (same config; its split-K, or the nearest
    timed one) against the cell's fastest row: one row per cell with ``ratio`` = pick / best (NaN when
    the pick's config was not timed in that cell)."""
    rows = tiles[tiles.kernel.isin(["quick", dispatch.FALLBACK])]
    out = []
    for (K, N, G, M), cell in rows.groupby(["K", "N", "group_size", "M"]):
        pick = dispatch.heuristic("quick", int(M), int(K), int(N), int(G), num_sms=num_sms,
                                  compute_capability=compute_capability)
        name = FALLBACK_CONFIG if pick.config is None else pick.config.name
        best = cell.loc[cell.time_us.idxmin()]
        same = cell[(cell.kernel == pick.kernel) & (cell.config == name)]
        timed_split, t = None, float("nan")
        if not same.empty:
            timed_split = _nearest_split(set(int(s) for s in same.split_k), pick.split_k)
            t = float(same[same.split_k == timed_split].time_us.min())
        out.append(dict(K=int(K), N=int(N), group_size=int(G), M=int(M), config=name, split_k=pick.split_k,
                        timed_split=timed_split, time_us=t, best_config=best.config, best_split=int(best.split_k),
                        best_us=float(best.time_us), ratio=t / float(best.time_us)))
    return pd.DataFrame(out)


def shortlist_regret(tiles: pd.DataFrame, *, num_sms: int = 132, compute_capability: str | None = "90") -> pd.DataFrame:
    """For every cell of a tile sweep, what a tuner that timed only the shortlist would lose: one row
    per cell with ``ratio`` = the fastest shortlisted row / the fastest row (``listed``: shortlisted
    candidates the sweep timed)."""
    rows = tiles[tiles.kernel.isin(["quick", dispatch.FALLBACK])]
    out = []
    for (K, N, G, M), cell in rows.groupby(["K", "N", "group_size", "M"]):
        listed = {(c.name, c.split_k) for c in shortlist(int(M), int(K), int(N), int(G), num_sms=num_sms,
                                                         compute_capability=compute_capability)}
        hit = cell[[(c, int(s)) in listed for c, s in zip(cell.config, cell.split_k)]]
        best = cell.loc[cell.time_us.idxmin()]
        out.append(dict(K=int(K), N=int(N), group_size=int(G), M=int(M), shortlisted=len(listed), listed=len(hit),
                        best_config=best.config, best_split=int(best.split_k),
                        ratio=float(hit.time_us.min()) / float(best.time_us) if len(hit) else float("nan")))
    return pd.DataFrame(out)


def table_agreement(tuned, reference) -> pd.DataFrame:
    """Per cell in both tables (K, N, M): the two choices and ``ratio`` = tuned / reference, of
    ratio_to_fp16 where both have one (each against cuBLAS of its own run), else of time_us."""
    t, r = pd.DataFrame(list(tuned)), pd.DataFrame(list(reference))
    if t.empty or r.empty:
        return pd.DataFrame(columns=["K", "N", "M", "config", "split_k", "reference_config",
                                     "reference_split_k", "ratio"])
    cols = ["K", "N", "M", "config", "split_k", "time_us", "ratio_to_fp16"]
    both = t[cols].merge(r[cols], on=["K", "N", "M"], suffixes=("", "_reference"))
    by_fp16 = pd.to_numeric(both.ratio_to_fp16) / pd.to_numeric(both.ratio_to_fp16_reference)
    both["ratio"] = by_fp16.where(by_fp16.notna(), both.time_us / both.time_us_reference)
    return both.rename(columns={"config_reference": "reference_config", "split_k_reference": "reference_split_k"})
