"""Tile configurations of the two GEMM kernels: names, template arguments, validity and resources.

Tile levels follow CUTLASS: a block tile ``tile_m x tile_n x tile_k`` is split over
``warps_m x warps_n`` warps, each owning a warp tile of m16n8k16 instruction tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("awq", "quick")
# split_k of a wgmma variant: s >= 1 is split-K by s (P = tiles x s blocks of its stream-K schedule);
# STREAM_K launches one block per resident slot and splits the k-tiles of all tiles evenly among them.
STREAM_K = 0

# Register budget: a warp tile of warp_m x warp_n fp32 accumulators costs warp_m*warp_n/32 registers
# per lane; above 64x64 (128 registers) the 255-register limit forces spills.
MAX_WARP_TILE_AREA = 64 * 64
SMEM_PER_BLOCK_LIMIT = 227 * 1024  # opt-in dynamic shared memory per block on sm_80 / sm_90


@dataclass(frozen=True, order=True)
class TileConfig:
    """Block tile shape, warp grid and (QUICK only) the cp.async pipeline depth and weight path:
    ``async_weights`` False is the paper's (each lane loads its packed weights straight into registers),
    True stages the still-packed weights through the cp.async pipeline (name suffix ``_cp``).
    ``wgmma`` (suffix ``_wg``, Hopper only) selects the warpgroup-MMA mainloop (kernels/quick_wgmma.cu):
    dequantized weights as wgmma's register A operand; warps_n is 4 per warpgroup. ``folded_zeros``
    (suffix ``_fz``, wgmma only) feeds the raw 1024 + q into wgmma and applies zero points and scales
    once per group (needs group_size == tile_k == 128)."""

    tile_m: int
    tile_n: int
    tile_k: int
    warps_m: int
    warps_n: int
    stages: int = 1
    async_weights: bool = False
    wgmma: bool = False
    folded_zeros: bool = False

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def warp_m(self) -> int:
        return self.tile_m // self.warps_m

    @property
    def warp_n(self) -> int:
        return self.tile_n // self.warps_n

    @property
    def name(self) -> str:
        return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}"
                f"_w{self.warps_m}x{self.warps_n}_s{self.stages}" + ("_cp" if self.async_weights else "")
                + ("_wg" if self.wgmma else "") + ("_fz" if self.folded_zeros else ""))

    @classmethod
    def parse(cls, name: str) -> "TileConfig":
        """Inverse of :attr:`name`, e.g. ``"16x128x32_w1x2_s1"``, ``"64x256x64_w1x4_s4_cp"`` or
        ``"64x256x64_w1x4_s4_wg"``."""
        try:
            tile, warps, stages, *suffixes = name.split("_")
            order = ("cp", "wg", "fz")  # each at most once, in this order
            if [x for x in order if x in suffixes] != suffixes:
                raise ValueError(name)
            tm, tn, tk = (int(v) for v in tile.split("x"))
            wm, wn = (int(v) for v in warps.lstrip("w").split("x"))
            return cls(tm, tn, tk, wm, wn, int(stages.lstrip("s")), "cp" in suffixes, "wg" in suffixes,
                       "fz" in suffixes)
        except ValueError as exc:
            raise ValueError(
                f"config must look like '16x128x32_w1x2_s1' (tile_m x tile_n x tile_k, warps, stages), "
                f"got {name!r}") from exc


def template_name(kind: str, cfg: TileConfig) -> str:
    """The C++ name expression NVRTC instantiates for this kernel variant."""
    args = [cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.warps_m, cfg.warps_n]
    if kind == "quick" and cfg.wgmma:
        extra = [cfg.stages, int(cfg.async_weights), int(cfg.folded_zeros)]
        return f"quick_wgmma<{','.join(str(a) for a in args + extra)}>"
    if kind == "quick":
        args += [cfg.stages, int(cfg.async_weights)]
    elif kind != "awq":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"{kind}_gemm<{','.join(str(a) for a in args)}>"


def source_file(kind: str, cfg: TileConfig) -> str:
    """The kernels/ file that defines this variant."""
    if kind == "quick" and cfg.wgmma:
        return "quick_wgmma.cu"
    return {"awq": "awq_gemm.cu", "quick": "quick_gemm.cu"}[kind]


def target_arch(cfg: TileConfig, arch: str) -> str:
    """The NVRTC arch a variant compiles for: wgmma exists only in the arch-specific sm_90a target."""
    return "sm_90a" if cfg.wgmma else arch


def shared_bytes(kind: str, cfg: TileConfig) -> int:
    """Dynamic shared memory of one block, mirroring the kernels' carve-up (common.cuh)."""
    activation_stage = cfg.tile_m * (cfg.tile_k + 8) * 2
    if cfg.wgmma:  # per stage 128-byte activation rows (+ staged weights), 1024-aligned; + alignment slack
        n64 = cfg.tile_n // 64
        stage = cfg.tile_m * cfg.tile_k * 2
        if cfg.async_weights:
            stage += cfg.tile_k * cfg.tile_n // 2 + n64 * 128 + n64 * 32
        return cfg.stages * (-(-stage // 1024) * 1024) + 1024
    if kind == "awq":  # one activation tile + the dequantized weight tile written back
        return activation_stage + cfg.tile_k * (cfg.tile_n + 8) * 2
    if not cfg.async_weights:  # the paper's QUICK: weights never touch shared memory
        return cfg.stages * activation_stage
    # staged QUICK: packed int4 weights, scales (8 fp16 per lane group) and zeros per stage
    n64 = cfg.tile_n // 64
    return cfg.stages * (activation_stage + cfg.tile_k * cfg.tile_n // 2 + n64 * 128 + n64 * 32)


def violations(kind: str, cfg: TileConfig) -> list[str]:
    """Every rule the kernel template's static_asserts and register budget impose; empty when valid."""
    out = []
    if kind not in KINDS:
        return [f"kind must be one of {KINDS}"]
    if cfg.folded_zeros and not cfg.wgmma:
        return ["folded zero points exist only in the wgmma mainloop (_fz needs _wg)"]
    if cfg.wgmma:
        return _wgmma_violations(kind, cfg)
    if cfg.tile_k % 32:
        out.append("tile_k must be a multiple of 32")
    if cfg.warp_m * cfg.warps_m != cfg.tile_m or cfg.warp_m % 16:
        out.append("tile_m / warps_m must be a multiple of 16")
    if cfg.warp_m * cfg.warp_n > MAX_WARP_TILE_AREA:
        out.append(f"warp tile {cfg.warp_m}x{cfg.warp_n} exceeds {MAX_WARP_TILE_AREA} accumulators")
    if cfg.threads > 1024:
        out.append("at most 32 warps per block")
    if kind == "awq":
        if cfg.warp_n * cfg.warps_n != cfg.tile_n or cfg.warp_n % 16:
            out.append("tile_n / warps_n must be a multiple of 16")
        words_per_row = cfg.tile_n // 8
        if cfg.threads % words_per_row or cfg.tile_k % (cfg.threads // words_per_row):
            out.append("threads must cover whole rows of the write-back tile")
        if cfg.stages != 1:
            out.append("the AutoAWQ-style kernel is single-stage (stages=1)")
        if cfg.async_weights:
            out.append("the AutoAWQ-style kernel writes dequantized weights back (no async_weights)")
    else:
        if cfg.warp_n * cfg.warps_n != cfg.tile_n or cfg.warp_n % 64:
            out.append("tile_n / warps_n must be a multiple of 64 (whole interleaved n64 blocks)")
        if cfg.stages < 2:
            out.append("QUICK pipelines activations: stages >= 2")
    if shared_bytes(kind, cfg) > SMEM_PER_BLOCK_LIMIT:
        out.append(f"needs {shared_bytes(kind, cfg)} bytes of shared memory")
    return out


def _wgmma_violations(kind: str, cfg: TileConfig) -> list[str]:
    """The rules of kernels/quick_wgmma.cu's static_asserts and register budget."""
    out = []
    if kind != "quick":
        return ["only the QUICK kernel has a wgmma mainloop"]
    if cfg.tile_k not in (64, 128):
        out.append("wgmma tiles have tile_k = 64 or 128 (one or two 128-byte swizzled activation rows)")
    if cfg.warps_m != 1 or cfg.warps_n not in (4, 8):
        out.append("wgmma tiles use warps 1x4 or 1x8 (one or two warpgroups along N)")
    else:
        words = cfg.tile_n // (cfg.warps_n // 4) // 64
        if words not in (1, 2, 4) or words * 64 * (cfg.warps_n // 4) != cfg.tile_n:
            out.append("each warpgroup spans 64, 128 or 256 columns")
        elif words * cfg.tile_m // 2 > 128:
            out.append(f"{words * cfg.tile_m // 2} accumulators per thread (at most 128)")
        elif cfg.folded_zeros and words * cfg.tile_m + cfg.tile_m // 2 > 160:
            out.append("folded zero points double the accumulators: at most 160 per thread")
    if cfg.folded_zeros and cfg.tile_k != 128:
        out.append("folded zero points need tile_k = 128 (one k-tile per group of 128)")
    if cfg.tile_m not in (16, 32, 64, 128, 256):
        out.append("tile_m must be 16, 32, 64, 128 or 256 (wgmma's N, up to 128 per instruction)")
    if cfg.stages < 3:
        out.append("a stage is refilled two k-tiles after use: stages >= 3")
    if shared_bytes(kind, cfg) > SMEM_PER_BLOCK_LIMIT:
        out.append(f"needs {shared_bytes(kind, cfg)} bytes of shared memory")
    return out


def fits(cfg: TileConfig, N: int, group_size: int) -> bool:
    """Whether a variant can run a problem with N columns and this group size."""
    if N % cfg.tile_n or group_size % cfg.tile_k:
        return False
    return not cfg.folded_zeros or group_size == cfg.tile_k


def check(kind: str, cfg: TileConfig) -> None:
    bad = violations(kind, cfg)
    if bad:
        raise ValueError(f"invalid {kind} config {cfg.name}: " + "; ".join(bad))


def _awq_variants() -> tuple[TileConfig, ...]:
    out = []
    for tm in (16, 32, 64, 128):
        for tn in (64, 128):
            for wm in (1, 2):
                cfg = TileConfig(tm, tn, 32, wm, tn // 64, 1)
                if not violations("awq", cfg):
                    out.append(cfg)
    return tuple(out)


# The AutoAWQ kernel's own shape: 16 x 128 x 32 block tile, 2 warps of 16 x 64, split-K 8; like
# AutoAWQ, 16 x 64 x 32 with one warp when N is not a multiple of 128.
AWQ_DEFAULT = TileConfig(16, 128, 32, 1, 2, 1)
AWQ_DEFAULT_N64 = TileConfig(16, 64, 32, 1, 1, 1)
AWQ_DEFAULT_SPLIT_K = 8
AWQ_VARIANTS = _awq_variants()

# QUICK variants: the freed shared memory buys deeper activation pipelines and larger tiles.
# First the paper's weight path (registers), then the staged one (_cp).
QUICK_VARIANTS = tuple(TileConfig(*v) for v in (
    (16, 64, 32, 1, 1, 3),  # N not a multiple of 128 with group size 32: the one variant that fits
    (16, 64, 64, 1, 1, 4),
    (16, 128, 32, 1, 2, 2),
    (16, 128, 64, 1, 2, 3),
    (16, 256, 64, 1, 4, 3),
    # tile_k 128 (G = 128 only): twice the weight bytes in flight per lane at small batch, where
    # the kernel waits on DRAM latency (Nsight Compute: long-scoreboard stalls dominate at M = 1)
    (16, 128, 128, 1, 2, 3),
    (16, 256, 128, 1, 4, 3),
    (32, 128, 64, 1, 2, 3),
    (32, 256, 32, 1, 4, 3),
    (64, 128, 32, 1, 2, 3),
    (64, 128, 64, 1, 2, 3),
    (64, 256, 32, 1, 4, 3),
    (128, 128, 32, 2, 2, 3),
    (128, 128, 64, 2, 2, 3),
    (128, 256, 32, 2, 4, 3),
    (16, 128, 64, 1, 2, 4, True),
    (16, 128, 128, 1, 2, 4, True),
    (16, 256, 64, 1, 4, 4, True),
    (32, 128, 64, 1, 2, 4, True),
    (32, 256, 64, 1, 4, 4, True),
    (64, 128, 64, 1, 2, 4, True),
    (64, 256, 64, 1, 4, 4, True),
    (128, 128, 64, 2, 2, 4, True),
    (128, 256, 32, 2, 4, 4, True),
    (128, 256, 64, 2, 4, 3, True),
    # 32 x 64 warp tiles: half the accumulators, so more resident warps to hide latency (the 64 x 64
    # tiles above leave 2 warps per scheduler on an H100; Nsight Compute: ~60% of cycles with no
    # eligible warp), at the price of dequantizing each weight twice per block.
    (64, 128, 64, 2, 2, 4, True),
    (64, 256, 64, 2, 4, 4, True),
    (128, 128, 64, 4, 2, 4, True),
))
# Hopper wgmma mainloop (sm_90a only): the batch is wgmma's N, so one instruction covers up to 128
# rows of M against 64 columns; words per lane (tile_n / warpgroups / 64) x tile_m / 2 accumulators.
QUICK_WGMMA_VARIANTS = tuple(TileConfig(*v, wgmma=True) for v in (
    (16, 256, 64, 1, 4, 4),
    (32, 256, 64, 1, 4, 4),
    (64, 128, 64, 1, 4, 4),
    (128, 64, 64, 1, 4, 4),
    (64, 256, 64, 1, 8, 4),
    (128, 128, 64, 1, 8, 4),
    (256, 64, 64, 1, 4, 3),
    # staged weights: more k-tiles in flight per SM for the DRAM latency
    (16, 256, 64, 1, 4, 8, True),
    (16, 256, 128, 1, 4, 5, True),
    (16, 128, 64, 1, 4, 8, True),
    (32, 256, 64, 1, 4, 6, True),
    (64, 256, 64, 1, 4, 5, True),
    (64, 256, 64, 1, 8, 5, True),
    (64, 256, 128, 1, 8, 4, True),
    (64, 128, 64, 1, 4, 6, True),
    (128, 128, 64, 1, 8, 5, True),
    (128, 128, 128, 1, 8, 4, True),
    (128, 64, 64, 1, 4, 6, True),
    (256, 128, 64, 1, 8, 4, True),
)) + tuple(TileConfig(*v, wgmma=True, folded_zeros=True) for v in (
    # folded zero points (group size 128): fewer instructions per weight at small batch
    (16, 256, 128, 1, 4, 5, True),
    (16, 128, 128, 1, 4, 6, True),
    (16, 256, 128, 1, 4, 4),
    (32, 128, 128, 1, 4, 5, True),
))

# The paper-reproduction configuration: the AutoAWQ block tile with the QUICK weight path, so that
# the comparison isolates the write-back; the dispatcher picks larger tiles for speed.
QUICK_DEFAULT = TileConfig(16, 128, 32, 1, 2, 2)


def variants(kind: str, *, hopper: bool = False) -> tuple[TileConfig, ...]:
    """The registered variants; ``hopper`` adds the sm_90a-only wgmma ones to QUICK's."""
    if kind == "awq":
        return AWQ_VARIANTS
    if kind == "quick":
        return QUICK_VARIANTS + (QUICK_WGMMA_VARIANTS if hopper else ())
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
