"""Tile configurations: the :class:`TileConfig` value (its name and parse rule) and the instantiated
variants of each kernel family. What a config means to a kernel (template arguments, validity rules,
shared memory, launch geometry) is the family's business: :mod:`quick_lab.core.registry`.

Tile levels follow CUTLASS: a block tile ``tile_m x tile_n x tile_k`` is split over
``warps_m x warps_n`` warps, each owning a warp tile of m16n8k16 instruction tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("awq", "quick")  # weight formats: AutoAWQ GEMM format, interleaved QUICK layout
# split_k of a wgmma variant: s >= 1 is split-K by s (P = tiles x s blocks of its stream-K schedule);
# STREAM_K launches one block per resident slot and splits the k-tiles of all tiles evenly among them.
STREAM_K = 0


@dataclass(frozen=True, order=True)
class TileConfig:
    """Block tile shape, warp grid and (QUICK only) the cp.async pipeline depth and weight path:
    ``async_weights`` False is the paper's (each lane loads its packed weights straight into registers),
    True stages the still-packed weights through the cp.async pipeline (name suffix ``_cp``).
    ``wgmma`` (suffix ``_wg``, Hopper only) selects the warpgroup-MMA mainloop (kernels/quick_wgmma.cu):
    dequantized weights as wgmma's register A operand; warps_n is 4 per warpgroup. ``folded_zeros``
    (suffix ``_fz``, wgmma only) feeds the raw 1024 + q into wgmma and applies zero points and scales
    once per group (needs group_size == tile_k == 128). ``decode`` (suffix ``_dc``) selects the decode
    kernel (kernels/quick_decode.cu, M <= tile_m <= 32): a tile_m x 64 output strip per block whose
    warps_n warps split each k-tile of tile_k along K."""

    tile_m: int
    tile_n: int
    tile_k: int
    warps_m: int
    warps_n: int
    stages: int = 1
    async_weights: bool = False
    wgmma: bool = False
    folded_zeros: bool = False
    decode: bool = False

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
    def marker(self) -> str:
        """The name suffix that selects a kernel family (quick_lab.core.registry): "wg" for the wgmma
        mainloop, "dc" for the decode kernel, "" for the tiled mma.sync kernels."""
        return "wg" if self.wgmma else "dc" if self.decode else ""

    @property
    def name(self) -> str:
        return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}"
                f"_w{self.warps_m}x{self.warps_n}_s{self.stages}" + ("_cp" if self.async_weights else "")
                + ("_wg" if self.wgmma else "") + ("_fz" if self.folded_zeros else "")
                + ("_dc" if self.decode else ""))

    @classmethod
    def parse(cls, name: str) -> "TileConfig":
        """Inverse of :attr:`name`, e.g. ``"16x128x32_w1x2_s1"``, ``"64x256x64_w1x4_s4_cp"`` or
        ``"64x256x64_w1x4_s4_wg"``."""
        try:
            tile, warps, stages, *suffixes = name.split("_")
            order = ("cp", "wg", "fz", "dc")  # each at most once, in this order
            if [x for x in order if x in suffixes] != suffixes:
                raise ValueError(name)
            tm, tn, tk = (int(v) for v in tile.split("x"))
            wm, wn = (int(v) for v in warps.lstrip("w").split("x"))
            return cls(tm, tn, tk, wm, wn, int(stages.lstrip("s")), "cp" in suffixes, "wg" in suffixes,
                       "fz" in suffixes, "dc" in suffixes)
        except ValueError as exc:
            raise ValueError(
                f"config must look like '16x128x32_w1x2_s1' (tile_m x tile_n x tile_k, warps, stages), "
                f"got {name!r}") from exc


# The AutoAWQ kernel's own shape: 16 x 128 x 32 block tile, 2 warps of 16 x 64, split-K 8; like
# AutoAWQ, 16 x 64 x 32 with one warp when N is not a multiple of 128.
AWQ_DEFAULT = TileConfig(16, 128, 32, 1, 2, 1)
AWQ_DEFAULT_N64 = TileConfig(16, 64, 32, 1, 1, 1)
AWQ_DEFAULT_SPLIT_K = 8
# Every block tile of 16..128 x 64/128 x 32 on 1 or 2 warps along M that the kernel's rules admit.
AWQ_VARIANTS = tuple(TileConfig(*v) for v in (
    (16, 64, 32, 1, 1, 1), (16, 128, 32, 1, 2, 1), (32, 64, 32, 1, 1, 1), (32, 64, 32, 2, 1, 1),
    (32, 128, 32, 1, 2, 1), (32, 128, 32, 2, 2, 1), (64, 64, 32, 1, 1, 1), (64, 64, 32, 2, 1, 1),
    (64, 128, 32, 1, 2, 1), (64, 128, 32, 2, 2, 1), (128, 64, 32, 2, 1, 1), (128, 128, 32, 2, 2, 1),
))

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

# Decode kernel (M <= tile_m, 8, 16 or 32): block k-tile x warps splitting it along K; each warp streams
# tile_k / 16 / warps k16 fragments (16 bytes per lane each) per k-tile before it waits. The 32-row tile
# holds four batch tiles of accumulators and activations, so only its shallower chunks fit the registers.
QUICK_DECODE_VARIANTS = tuple(TileConfig(tm, 64, tk, 1, w, 1, decode=True) for tm in (8, 16) for tk, w in (
    (256, 2), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8),
)) + tuple(TileConfig(32, 64, tk, 1, 4, 1, decode=True) for tk in (128, 256))

# The paper-reproduction configuration: the AutoAWQ block tile with the QUICK weight path, so that
# the comparison isolates the write-back; the dispatcher picks larger tiles for speed.
QUICK_DEFAULT = TileConfig(16, 128, 32, 1, 2, 2)

