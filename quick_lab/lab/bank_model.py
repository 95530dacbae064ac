"""Analytic shared-memory bank model of the two GEMM kernels (NumPy, CPU only).

Hardware rules (CUDA C++ Programming Guide, "Compute Capability 8.x" / "Compute Capability 9.0",
section "Shared Memory"; Nsight Compute Kernel Profiling Guide for the wavefront vocabulary):

* Shared memory has 32 banks, each 4 bytes wide; successive 4-byte words go to successive banks,
  so word ``w`` (byte address ``4w .. 4w+3``) lives in bank ``w % 32``.
* A warp-wide shared-memory instruction is served in *wavefronts* (one pass through the banks each).
  32-bit (and narrower) accesses: the 32 lanes form one request. 64-bit accesses: the warp is
  processed in 2 half-warp phases (lanes 0-15, 16-31). 128-bit accesses: 4 quarter-warp phases of 8
  lanes each. Within a phase the number of wavefronts is the largest number of *distinct* 4-byte
  words any single bank must deliver (several lanes reading the same word are served by one
  broadcast / multicast, no conflict), and at least 1.
* Phase merging (inferred from measurement, not from the Guide): on an H100 (ncu 2025.3.1) an
  LDS.128 whose 32 lanes read 8 distinct, contiguous 16-byte chunks (lanes 4g..4g+3 share chunk g:
  QUICK's scale loads) took 2 wavefronts with 0 conflicts, not the 4 of the quarter-warp rule, while
  STS.128 / LDGSTS rows that conflict inside a quarter cost what the quarter rule says. Modelled
  as: the two quarter phases of each half warp (the two half-warp phases of a 64-bit access, by
  analogy, unverified) are served together in ONE wavefront when their union asks no bank for more
  than one distinct word; otherwise each phase costs its own wavefronts.
* ``ldmatrix.x4`` (LDSM): 4 phases, one per 8x8 b16 matrix; matrix ``i`` takes its 8 row addresses
  (16 bytes each) from lanes ``8i .. 8i+7`` (PTX ISA, "ldmatrix"): the quarter-warp rule without
  merging (``ldmatrix=True``). Measured: 4 wavefronts per conflict-free LDSM.x4.
* ``cp.async`` 16-byte copies (LDGSTS) are modelled like 128-bit stores. Measured on the H100 this
  does NOT describe ncu's LDGSTS counters (0 LDGSTS bank conflicts; about 15 shared wavefronts per
  LDGSTS of the 16 x 32 activation tile, where the rule gives 8): cp.async data is written as it
  returns from L2, so the ``ldgsts_*`` model keys are a bank-only figure, not an ncu prediction.

The *ideal* number of wavefronts of a phase (or merged pair) is ``ceil(distinct words / 32)`` (at
least 1): what the data volume alone needs. Bank conflicts = wavefronts - ideal, the quantity Nsight
Compute reports as ``l1tex__data_bank_conflicts_pipe_lsu_mem_shared_*`` (which on the GPU also counts
arbitration conflicts between concurrent instructions, e.g. cp.async data landing during the
baseline's write-back: measured >= model).

Per-kernel access patterns reproduce the address arithmetic of ``kernels/common.cuh``
(``ActivationTile::load_async`` / ``load_fragment``), ``kernels/awq_gemm.cu`` (weight write-back
STS.128 and ``ldmatrix.x4.trans``) and ``kernels/quick_gemm.cu`` (activations only, ``STAGES``
buffers) for one block and one k-tile; :func:`predict_counts` scales them to a whole launch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from quick_lab.core import registry
from quick_lab.core.configs import TileConfig

NUM_BANKS = 32
BANK_BYTES = 4
WARP = 32
# Lanes served together in one phase, by access width (bytes per lane).
LANES_PER_PHASE = {1: 32, 2: 32, 4: 32, 8: 16, 16: 8}

# Instruction kinds: 'ldgsts' = cp.async global -> shared (16 B per lane), 'ldsm' = ldmatrix.x4[.trans],
# 'sts' / 'lds' = plain shared stores / loads. Operands: 'A' activations, 'B' weights (dequantized fp16
# in the baseline, still-packed int4 in QUICK's staged '_cp' path), 'SZ' scales + zero points ('_cp'
# path), 'C' the split-K ticket flag of the epilogue (once per block, split_k > 1 only).
OPS = ("ldgsts", "ldsm", "sts", "lds")
# Every per-k-tile instruction class the kernels can issue, in a fixed order (rows of tile_traffic).
CLASSES = (("ldgsts", "A"), ("ldgsts", "B"), ("ldgsts", "SZ"), ("ldsm", "A"), ("sts", "B"), ("ldsm", "B"),
           ("lds", "B"), ("lds", "SZ"))
EPILOGUE_CLASSES = (("sts", "C"), ("lds", "C"))

# Nsight Compute metric names predicted by predict_counts (quick_lab.lab.conflicts measures them).
ST_WAVEFRONTS = "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"
LD_WAVEFRONTS = "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"
ST_CONFLICTS = "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
LD_CONFLICTS = "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"
ST_INSTRUCTIONS = "smsp__sass_inst_executed_op_shared_st.sum"
LD_INSTRUCTIONS = "smsp__sass_inst_executed_op_shared_ld.sum"
LDSM_INSTRUCTIONS = "smsp__sass_inst_executed_op_ldsm.sum"
NCU_METRICS = (ST_WAVEFRONTS, LD_WAVEFRONTS, ST_CONFLICTS, LD_CONFLICTS, ST_INSTRUCTIONS, LD_INSTRUCTIONS,
               LDSM_INSTRUCTIONS)
# Model-only keys: the cp.async (LDGSTS) shared-memory writes under the bank rule. quick_lab.lab.conflicts
# sets them beside ncu's own LDGSTS counters, which the bank rule does NOT describe (module docstring).
LDGSTS_WAVEFRONTS = "ldgsts_wavefronts"
LDGSTS_CONFLICTS = "ldgsts_conflicts"
LDGSTS_INSTRUCTIONS = "ldgsts_instructions"
MODEL_ONLY = (LDGSTS_WAVEFRONTS, LDGSTS_CONFLICTS, LDGSTS_INSTRUCTIONS)


# ---------------------------------------------------------------- the hardware rule


def _phases(addresses, width_bytes: int) -> np.ndarray:
    """Addresses as [phases, lanes] int64 (-1 = inactive lane), validated."""
    if width_bytes not in LANES_PER_PHASE:
        raise ValueError(f"width_bytes must be one of {sorted(LANES_PER_PHASE)}, got {width_bytes}")
    arr = np.asarray(addresses)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"addresses must be integers (byte offsets; -1 = inactive lane), got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim == 1:
        if arr.size != WARP:
            raise ValueError(f"a warp access needs {WARP} lane addresses, got {arr.size}")
        arr = arr.reshape(-1, LANES_PER_PHASE[width_bytes])
    elif arr.ndim != 2:
        raise ValueError(f"addresses must be [32] or [phases, lanes], got shape {arr.shape}")
    active = arr >= 0
    if np.any(arr < -1):
        raise ValueError("negative addresses other than -1 (inactive lane) are not byte offsets")
    misaligned = arr[active][arr[active] % width_bytes != 0]
    if misaligned.size:
        bad = misaligned[:4]
        raise ValueError(f"{width_bytes}-byte accesses must be {width_bytes}-byte aligned, got {bad.tolist()}")
    return arr


def _phase_words(lane_addresses: np.ndarray, width_bytes: int) -> np.ndarray:
    """Distinct 4-byte word indices touched by the active lanes of one phase."""
    a = lane_addresses[lane_addresses >= 0]
    if a.size == 0:
        return a
    words_per_lane = max(1, width_bytes // BANK_BYTES)
    words = (a // BANK_BYTES)[:, None] + np.arange(words_per_lane)[None, :]
    return np.unique(words)


def _bank_depth(words: np.ndarray) -> int:
    """Largest number of distinct words any one bank must deliver."""
    return int(np.bincount(words % NUM_BANKS, minlength=NUM_BANKS).max())


def wavefronts(addresses, width_bytes: int, ldmatrix: bool = False) -> tuple[int, int]:
    """``(wavefronts, ideal_wavefronts)`` of one warp-wide shared-memory access.

    ``addresses``: the 32 lanes' byte addresses (``[32]``, split into phases by ``width_bytes``: 32
    lanes for <= 4 bytes, half warps for 8, quarter warps for 16), or explicit ``[phases, lanes]``
    (served phase by phase, never merged). ``ldmatrix=True``: LDSM, one phase per 8x8 matrix, no
    merging. -1 marks an inactive lane; a phase with no active lane costs nothing.
    Bank conflicts = wavefronts - ideal_wavefronts.
    """
    explicit = np.asarray(addresses).ndim == 2
    phases = _phases(addresses, width_bytes)
    words = [_phase_words(p, width_bytes) for p in phases]
    if explicit or ldmatrix or len(words) == 1:
        groups = [[w] for w in words]
    else:  # half-warp halves of a 64-bit access; quarter pairs (0, 1), (2, 3) of a 128-bit one
        groups = [words[i:i + 2] for i in range(0, len(words), 2)]
    total = ideal = 0
    for group in groups:
        active = [w for w in group if w.size]
        if not active:
            continue
        union = np.unique(np.concatenate(active))
        if len(active) > 1 and _bank_depth(union) <= 1:
            total, ideal = total + 1, ideal + 1  # served together in one wavefront
            continue
        for w in active:
            total += max(1, _bank_depth(w))
            ideal += max(1, -(-w.size // NUM_BANKS))
    return total, ideal


def conflicts(addresses, width_bytes: int, ldmatrix: bool = False) -> int:
    w, ideal = wavefronts(addresses, width_bytes, ldmatrix)
    return w - ideal


def bank_map(addresses, width_bytes: int = 16, distinct: bool = True) -> np.ndarray:
    """``[phases, 32]`` per-bank load of each phase of one warp access (for heatmaps).

    ``distinct=True`` counts distinct 4-byte words requested from each bank (row maximum = the
    phase's wavefronts, unless the phase is merged with its neighbour: see :func:`wavefronts`);
    ``distinct=False`` counts every lane-word request (broadcasts included).
    ``addresses`` may also be an :class:`Access`, whose own width is then used.
    """
    if isinstance(addresses, Access):
        addresses, width_bytes = addresses.addresses, addresses.width_bytes
    phases = _phases(addresses, width_bytes)
    out = np.zeros((phases.shape[0], NUM_BANKS), dtype=np.int64)
    words_per_lane = max(1, width_bytes // BANK_BYTES)
    for p, phase in enumerate(phases):
        if distinct:
            words = _phase_words(phase, width_bytes)
        else:
            a = phase[phase >= 0]
            words = ((a // BANK_BYTES)[:, None] + np.arange(words_per_lane)[None, :]).ravel()
        out[p] = np.bincount(words % NUM_BANKS, minlength=NUM_BANKS)
    return out


def plot_warp_access(ax, addresses, title: str = "", width_bytes: int = 16, ldmatrix: bool = False):
    """Heatmap of :func:`bank_map` (phases x 32 banks) on a matplotlib ``ax``; returns ``ax``.

    Each cell is the number of distinct words a bank serves in that phase; a row whose maximum is
    above 1 is a bank conflict. The title gets the wavefront count (:func:`wavefronts`) appended.
    ``addresses`` may be an :class:`Access` (its width and op are then used).
    """
    import seaborn as sns

    if isinstance(addresses, Access):
        addresses, width_bytes, ldmatrix = addresses.addresses, addresses.width_bytes, addresses.op == "ldsm"
    m = bank_map(addresses, width_bytes)
    w, ideal = wavefronts(addresses, width_bytes, ldmatrix)
    lanes = LANES_PER_PHASE[width_bytes] if np.asarray(addresses).ndim == 1 else np.asarray(addresses).shape[1]
    ylabels = [f"lanes {p * lanes}-{p * lanes + lanes - 1}" for p in range(m.shape[0])]
    sns.heatmap(m, ax=ax, cmap="rocket_r", vmin=0, vmax=max(2, int(m.max())), annot=True, fmt="d",
                cbar=False, linewidths=0.5, xticklabels=list(range(NUM_BANKS)), yticklabels=ylabels)
    ax.set_xlabel("bank")
    ax.set_ylabel("phase")
    suffix = f"{w} wavefronts (ideal {ideal}, {w - ideal} conflicts)"
    ax.set_title(f"{title}: {suffix}" if title else suffix)
    return ax


# ---------------------------------------------------------------- the kernels' access patterns


@dataclass(frozen=True)
class Access:
    """One warp-level shared-memory instruction of one block in one k-tile."""

    op: str            # 'ldgsts' (cp.async), 'ldsm' (ldmatrix[.trans]), 'sts' / 'lds' (plain store / load)
    operand: str       # 'A' (activations), 'B' (weights), 'SZ' (scales + zeros), 'C' (split-K flag)
    warp: int
    label: str         # which instance, e.g. 'ks=0 i=0'
    addresses: tuple   # 32 lane byte offsets into the block's dynamic shared memory (-1: inactive)
    width_bytes: int = 16

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.addresses, dtype=np.int64)

    @property
    def bytes(self) -> int:
        return int((self.array >= 0).sum()) * self.width_bytes

    def cost(self) -> tuple[int, int]:
        return wavefronts(self.array, self.width_bytes, ldmatrix=self.op == "ldsm")


_LANE = np.arange(WARP)


def _access(op, operand, warp, label, addr, active=None, width=16) -> Access | None:
    addr = np.broadcast_to(np.asarray(addr, dtype=np.int64), (WARP,))
    if active is not None:
        if not np.any(active):
            return None  # the whole warp skips the instruction: nothing issued
        addr = np.where(active, addr, -1)
    return Access(op, operand, int(warp), label, tuple(int(a) for a in addr), width)


def activation_bytes(cfg: TileConfig) -> int:
    """Bytes of one activation buffer: TILE_M rows of (TILE_K + 8) halves (ActivationTile::kHalves)."""
    return registry.padded_activation_bytes(cfg)


def _staged_parts(cfg: TileConfig) -> tuple[int, int, int, int]:
    """One mma.sync stage in uint4, from the family's carve-up (registry): activations, packed weights,
    scales, zeros (the last three only on QUICK's '_cp' path)."""
    layout = registry.QUICK_MMA.layout(cfg)
    return layout.activations // 16, layout.weights // 16, layout.scales // 16, layout.zeros // 16


def stage_bytes(cfg: TileConfig) -> int:
    """Bytes between consecutive pipeline stages (the carve-up's stride): activations, plus the staged
    weights, scales and zeros on the '_cp' path; the baseline's single activation tile."""
    return registry.QUICK_MMA.layout(cfg).stride


def activation_load(cfg: TileConfig, stage: int = 0) -> list[Access]:
    """``ActivationTile::load_async<THREADS>``: cp.async 16 B per chunk c = tid + i * THREADS,
    row c / (TILE_K/8), column (c % (TILE_K/8)) * 8 halves; rows padded to TILE_K + 8 halves."""
    stride = cfg.tile_k + 8
    per_row = cfg.tile_k // 8
    chunks = cfg.tile_m * per_row
    base = stage * stage_bytes(cfg)
    out = []
    for i in range(-(-chunks // cfg.threads)):
        for warp in range(cfg.threads // WARP):
            c = WARP * warp + _LANE + i * cfg.threads
            r, col = c // per_row, (c % per_row) * 8
            a = _access("ldgsts", "A", warp, f"i={i}", base + (r * stride + col) * 2, active=c < chunks)
            if a is not None:
                out.append(a)
    return out


def activation_ldmatrix(cfg: TileConfig, stage: int = 0) -> list[Access]:
    """``ActivationTile::load_fragment`` per warp, k16 step ks and m16 tile i: lanes 0-15 address rows
    0-15 at column 16 ks, lanes 16-31 the same rows at column 16 ks + 8 (ldmatrix.x4)."""
    stride = cfg.tile_k + 8
    base = stage * stage_bytes(cfg)
    out = []
    for warp in range(cfg.threads // WARP):
        warp_m = warp // cfg.warps_n
        for ks in range(cfg.tile_k // 16):
            for i in range(cfg.warp_m // 16):
                row = warp_m * cfg.warp_m + 16 * i + (_LANE & 15)
                addr = base + (row * stride + 16 * ks + (_LANE >> 4) * 8) * 2
                out.append(_access("ldsm", "A", warp, f"ks={ks} i={i}", addr))
    return out


def weight_offset(cfg: TileConfig) -> int:
    """Byte offset of the baseline's weight tile: b_smem = smem + ActivationTile::kHalves."""
    return activation_bytes(cfg)


def weight_writeback(cfg: TileConfig) -> list[Access]:
    """Baseline write-back (awq_gemm.cu): thread tid owns chunk tid % (TILE_N/8) and row
    tid / (TILE_N/8) of each pass; one 16-byte STS per pass into rows of TILE_N + 8 halves."""
    words_per_row = cfg.tile_n // 8
    rows_per_pass = cfg.threads // words_per_row
    stride = cfg.tile_n + 8
    out = []
    for warp in range(cfg.threads // WARP):
        tid = WARP * warp + _LANE
        chunk, row_in_pass = tid % words_per_row, tid // words_per_row
        for p in range(cfg.tile_k // rows_per_pass):
            k = p * rows_per_pass + row_in_pass
            addr = weight_offset(cfg) + (k * stride + chunk * 8) * 2
            out.append(_access("sts", "B", warp, f"pass={p}", addr))
    return out


def weight_ldmatrix(cfg: TileConfig) -> list[Access]:
    """Baseline ``ldmatrix.x4.trans`` per warp, ks and pair of n8 tiles j: lanes 0-15 address k rows
    16 ks + 0..15 at column warp_n * WARP_N + 16 j, lanes 16-31 the same rows 8 columns on."""
    stride = cfg.tile_n + 8
    out = []
    for warp in range(cfg.threads // WARP):
        warp_n = warp % cfg.warps_n
        for ks in range(cfg.tile_k // 16):
            for j in range(cfg.warp_n // 16):
                row = 16 * ks + (_LANE & 15)
                col = warp_n * cfg.warp_n + 16 * j + (_LANE >> 4) * 8
                out.append(_access("ldsm", "B", warp, f"ks={ks} j={j}", weight_offset(cfg) + (row * stride + col) * 2))
    return out


def staged_weight_copy(cfg: TileConfig, stage: int = 0) -> list[Access]:
    """QUICK '_cp' path, ``issue_tile``: cp.async of the packed weights (uint4 c = tid + i * THREADS
    at stage + kAUint4 + c), then of scales and zeros (c = tid, tid + THREADS, ... < kS + kZ at
    stage + kAUint4 + kWUint4 + c)."""
    a, w, s, z = _staged_parts(cfg)
    base = stage * stage_bytes(cfg)
    out = []
    for i in range(-(-w // cfg.threads)):
        for warp in range(cfg.threads // WARP):
            c = WARP * warp + _LANE + i * cfg.threads
            acc = _access("ldgsts", "B", warp, f"weights i={i}", base + (a + c) * 16, active=c < w)
            if acc is not None:
                out.append(acc)
    for i in range(-(-(s + z) // cfg.threads)):
        for warp in range(cfg.threads // WARP):
            c = WARP * warp + _LANE + i * cfg.threads
            acc = _access("ldgsts", "SZ", warp, f"scales+zeros i={i}", base + (a + w + c) * 16, active=c < s + z)
            if acc is not None:
                out.append(acc)
    return out


def staged_weight_read(cfg: TileConfig, stage: int = 0) -> list[Access]:
    """QUICK '_cp' path, ``load_shared``: per warp and n64 block b, one LDS.128 per k16 step (lane L
    reads uint4 (ks * kTileBlocks + warp_block0 + b) * 32 + L), one LDS.128 of scales (uint4
    (warp_block0 + b) * 8 + g, g = lane / 4) and one LDS.32 of zeros (u32 (warp_block0 + b) * 8 + g)."""
    a, w, s, z = _staged_parts(cfg)
    base = stage * stage_bytes(cfg)
    blocks, tile_blocks = cfg.warp_n // 64, cfg.tile_n // 64
    g = _LANE >> 2
    out = []
    for warp in range(cfg.threads // WARP):
        warp_block0 = (warp % cfg.warps_n) * blocks
        for b in range(blocks):
            for ks in range(cfg.tile_k // 16):
                addr = base + (a + (ks * tile_blocks + warp_block0 + b) * 32 + _LANE) * 16
                out.append(_access("lds", "B", warp, f"weights b={b} ks={ks}", addr))
            out.append(_access("lds", "SZ", warp, f"scales b={b}", base + (a + w + (warp_block0 + b) * 8 + g) * 16))
            out.append(_access("lds", "SZ", warp, f"zeros b={b}",
                               base + (a + w + s) * 16 + ((warp_block0 + b) * 8 + g) * 4, width=4))
    return out


def epilogue_accesses(cfg: TileConfig, split_k: int) -> list[Access]:
    """Split-K ticket of ``finish_block`` (common.cuh), once per block when split_k > 1: thread 0
    stores the ``__shared__ int last_block`` flag (STS.32, one lane), every warp reads it back after
    the barrier (LDS.32, one broadcast word). The flag is static shared memory: its address is
    unknown here (placed at 0) and irrelevant to the cost of a one-word access."""
    if split_k <= 1:
        return []
    lane0 = _LANE == 0
    out = [_access("sts", "C", 0, "split-K ticket flag", 0, active=lane0, width=4)]
    out += [_access("lds", "C", warp, "split-K ticket flag", 0, width=4) for warp in range(cfg.threads // WARP)]
    return out


def _check(kind: str, cfg: TileConfig, stage: int) -> None:
    registry.check(kind, cfg)
    if not 0 <= stage < cfg.stages:
        raise ValueError(f"stage must be in [0, {cfg.stages}) for {cfg.name}, got {stage}")


def tile_accesses(kind: str, cfg: TileConfig, stage: int = 0) -> list[Access]:
    """Every warp-level shared-memory instruction one block issues for one k-tile.

    ``stage``: the pipeline buffer the k-tile uses (QUICK: relative k-tile index % STAGES; the
    baseline has one buffer). The once-per-block split-K epilogue is :func:`epilogue_accesses`.
    """
    if isinstance(cfg, str):
        cfg = TileConfig.parse(cfg)
    _check(kind, cfg, stage)
    if kind == "awq":
        return activation_load(cfg) + weight_writeback(cfg) + activation_ldmatrix(cfg) + weight_ldmatrix(cfg)
    out = activation_load(cfg, stage)
    if cfg.async_weights:
        out += staged_weight_copy(cfg, stage) + staged_weight_read(cfg, stage)
    return out + activation_ldmatrix(cfg, stage)


def _aggregate(accesses, classes) -> tuple:
    acc = {c: [0, 0, 0, 0] for c in classes}  # instructions, wavefronts, ideal, bytes
    for a in accesses:
        w, ideal = a.cost()
        row = acc[(a.op, a.operand)]
        row[0] += 1
        row[1] += w
        row[2] += ideal
        row[3] += a.bytes
    return tuple((op, operand, *vals) for (op, operand), vals in acc.items())


@functools.lru_cache(maxsize=256)
def _traffic_rows(kind: str, cfg: TileConfig, stage: int) -> tuple:
    return _aggregate(tile_accesses(kind, cfg, stage), CLASSES)


def _frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=["op", "operand", "instructions", "wavefronts", "ideal_wavefronts",
                                           "bytes"])
    df.insert(5, "conflicts", df["wavefronts"] - df["ideal_wavefronts"])
    return df


def tile_traffic(kind: str, cfg: TileConfig, stage: int = 0) -> pd.DataFrame:
    """Per block per k-tile, one row per instruction class (op, operand) in :data:`CLASSES` order
    (classes a kernel never issues have zeros): warp-level ``instructions``, ``wavefronts``,
    ``ideal_wavefronts``, ``conflicts`` (= wavefronts - ideal) and shared-memory ``bytes``."""
    if isinstance(cfg, str):
        cfg = TileConfig.parse(cfg)
    _check(kind, cfg, stage)
    return _frame(_traffic_rows(kind, cfg, stage))


def epilogue_traffic(cfg: TileConfig, split_k: int) -> pd.DataFrame:
    """Per block, once per launch: the split-K ticket flag (:func:`epilogue_accesses`), as tile_traffic."""
    if isinstance(cfg, str):
        cfg = TileConfig.parse(cfg)
    return _frame(_aggregate(epilogue_accesses(cfg, split_k), EPILOGUE_CLASSES))


# ---------------------------------------------------------------- whole launches


def split_k_tiles(k_tiles: int, split: int) -> list[int]:
    """k-tiles of each split blockIdx.z, exactly as ``split_k_range`` (common.cuh): per =
    ceil(k_tiles / split), split z covers [z * per, min(k_tiles, z * per + per)) (possibly empty)."""
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    per = -(-k_tiles // split)
    return [max(0, min(k_tiles, z * per + per) - z * per) for z in range(split)]


def predict_counts(kind: str, cfg: TileConfig, M: int, K: int, N: int, split_k: int = 1) -> dict:
    """Model prediction for one launch of the GEMM kernel.

    Grid = ceil(M / tile_m) x (N / tile_n) x split_k blocks; block z runs the k-tiles of
    :func:`split_k_tiles`; a QUICK block's j-th k-tile uses pipeline stage j % STAGES. Rows past M
    are zero-filled by cp.async but still issued, so the counts depend on M only through the grid.
    With split_k > 1 every launched block (even one with no k-tile) adds the epilogue's ticket flag.

    Keys are Nsight Compute metric names (:data:`NCU_METRICS`) plus model-only keys. Assumptions to
    confirm against ``ncu`` (``quick-lab conflicts``):

    * ``..._op_st`` wavefronts / conflicts and ``smsp__sass_inst_executed_op_shared_st`` count only
      plain stores (STS: the baseline's weight write-back, the split-K flag). cp.async (LDGSTS)
      writes to shared memory are NOT counted there; they are reported separately as
      ``ldgsts_wavefronts``, ``ldgsts_conflicts`` and ``ldgsts_instructions`` (model only: no ncu
      metric of that name is collected).
    * ``ldmatrix`` (LDSM) wavefronts / conflicts are counted in ``..._op_ld`` together with plain
      loads (LDS: QUICK '_cp' weights / scales / zeros, the split-K flag); LDSM instructions are
      counted in ``smsp__sass_inst_executed_op_ldsm`` and NOT in ``smsp__sass_inst_executed_op_shared_ld``
      (plain LDS only).
    * The 128-bit phase-merging rule of the module docstring (QUICK's scale LDS.128: 2 wavefronts).
    * One SASS instruction per source-level access (no merging or splitting by the compiler).
    * Only address-determined conflicts: ncu's conflict counters also count arbitration between
      concurrent instructions, so measured conflicts may exceed the model.

    Checked on an H100 (ncu 2025.3.1, 4096 x 4096, M = 16 and 256, split_k = 1, this module's
    defaults): every instruction count and every ld wavefront count equal to the model; the
    baseline's st wavefronts / conflicts 0.05% (M = 16) and 5% (M = 256) above it, its ld conflicts
    31k (0.6% of ld wavefronts) at M = 256: concurrency, not addresses. ncu's LDGSTS counters are
    not modelled (see the module docstring): ``smsp__sass_inst_executed_op_ldgsts`` matched
    ``ldgsts_instructions``; LDGSTS bank conflicts were 0.

    Also returned: ``blocks`` (launched), ``active_blocks`` (with at least one k-tile),
    ``k_tiles_by_split`` and ``block_k_tiles`` (k-tiles summed over all blocks).
    """
    if isinstance(cfg, str):
        cfg = TileConfig.parse(cfg)
    registry.check(kind, cfg)
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    if N % cfg.tile_n or K % cfg.tile_k:
        raise ValueError(f"K={K}, N={N} must be multiples of tile_k={cfg.tile_k}, tile_n={cfg.tile_n}")
    k_tiles = K // cfg.tile_k
    if split_k > k_tiles:
        raise ValueError(f"split_k={split_k} exceeds the {k_tiles} k-tiles")
    by_split = split_k_tiles(k_tiles, split_k)
    blocks_mn = (N // cfg.tile_n) * -(-M // cfg.tile_m)
    stages = cfg.stages if kind == "quick" else 1
    per_stage = np.zeros(stages, dtype=np.int64)  # k-tiles using each stage, over one block column
    for n in by_split:
        for s in range(stages):
            per_stage[s] += len(range(s, n, stages))
    tot = {c: np.zeros(4, dtype=np.int64) for c in CLASSES + EPILOGUE_CLASSES}
    for s in range(stages):
        if per_stage[s]:
            for op, operand, *vals in _traffic_rows(kind, cfg, s):
                tot[(op, operand)] += per_stage[s] * blocks_mn * np.array(vals, dtype=np.int64)
    for op, operand, *vals in _aggregate(epilogue_accesses(cfg, split_k), EPILOGUE_CLASSES):
        tot[(op, operand)] += blocks_mn * split_k * np.array(vals, dtype=np.int64)

    def total(ops, field):
        return int(sum(v[field] for (op, _), v in tot.items() if op in ops))

    ld = ("ldsm", "lds")
    return {
        ST_WAVEFRONTS: total(("sts",), 1),
        LD_WAVEFRONTS: total(ld, 1),
        ST_CONFLICTS: total(("sts",), 1) - total(("sts",), 2),
        LD_CONFLICTS: total(ld, 1) - total(ld, 2),
        ST_INSTRUCTIONS: total(("sts",), 0),
        LD_INSTRUCTIONS: total(("lds",), 0),
        LDSM_INSTRUCTIONS: total(("ldsm",), 0),
        LDGSTS_WAVEFRONTS: total(("ldgsts",), 1),
        LDGSTS_CONFLICTS: total(("ldgsts",), 1) - total(("ldgsts",), 2),
        LDGSTS_INSTRUCTIONS: total(("ldgsts",), 0),
        "blocks": blocks_mn * split_k,
        "active_blocks": blocks_mn * sum(1 for n in by_split if n > 0),
        "k_tiles_by_split": by_split,
        "block_k_tiles": blocks_mn * k_tiles,
    }
