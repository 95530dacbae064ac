"""The kernel registry: one record per GEMM kernel family, and everything Python knows about a family.

A family is one CUDA template in ``kernels/``: the AutoAWQ-style baseline (``awq_gemm``), QUICK on
``mma.sync`` (``quick_gemm``) and QUICK on Hopper's ``wgmma`` (``quick_wgmma``). Its record holds the
source file, the template signature (which :class:`~quick_lab.core.configs.TileConfig` fields become
template arguments, in order), the name rule (which config names belong to it), the target arch, the
rules its ``static_assert``\\ s and register budget impose, its shared-memory carve-up and its launch
geometry (grid, split-K workspace and ticket counters). ``ops`` (launches), ``variants`` (offline builds),
the tile sweep, the sanitizer, the Nsight Compute runner and the bank model all read these records;
a new kernel family is one more record here.

``kind`` is the weight format a family reads (``"awq"``: AutoAWQ GEMM format; ``"quick"``: the
interleaved QUICK layout); two families read ``"quick"`` and a config's ``_wg`` suffix says which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from quick_lab.core import configs
from quick_lab.core.configs import STREAM_K, TileConfig

# Register budget: a warp tile of warp_m x warp_n fp32 accumulators costs warp_m*warp_n/32 registers
# per lane; above 64x64 (128 registers) the 255-register limit forces spills.
MAX_WARP_TILE_AREA = 64 * 64
MAX_DECODE_STEPS = 8  # k16 steps per warp per chunk of quick_decode.cu: ~13 registers each, all in flight
SMEM_PER_BLOCK_LIMIT = 227 * 1024  # opt-in dynamic shared memory per block on sm_80 / sm_90
SMEM_PER_SM = 228 * 1024           # sm_90: 228 KB per SM, 1 KB of it reserved per resident block
SMEM_RESERVED_PER_BLOCK = 1024
# What a GEMM's writer stores: "store" y itself; "silu_mul" silu(gate) * up [M, N / 2] of a weight whose
# columns come in (gate, up) pairs of 32 (quick_lab.core.format.pair_gate_up), the MLP activation;
# "partials" its fp32 split-K slices [split, M, N] with no fix-up, for a kernel that sums them in split
# order as it reads y (quick_lab.model.fused: the decoder's norm and decode attention).
EPILOGUES = ("store", "silu_mul", "partials")
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256     # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


# ---------------------------------------------------------------- shared-memory carve-up


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage of a block's dynamic shared memory, in bytes, as the kernel carves it.

    ``activations`` (TILE_M x TILE_K fp16, padded or swizzled), then, when the weights are staged
    (``_cp``), the still-packed weights ``[k16][n64][lane]`` (512 bytes per k16 x n64 block), the
    scales ``[n64][g]`` (128 bytes per n64 block) and the zero points ``[n64][g]`` (32 bytes per n64
    block): the global QUICK order copied verbatim. ``writeback`` is the baseline's dequantized weight
    tile (single stage). ``stride`` is the distance between stages (``stage_bytes``); ``total`` the
    dynamic shared memory the launch requests.
    """

    activations: int
    weights: int = 0
    scales: int = 0
    zeros: int = 0
    writeback: int = 0
    stride: int = 0
    stages: int = 1
    total: int = 0

    @property
    def weights_offset(self) -> int:
        return self.activations

    @property
    def scales_offset(self) -> int:
        return self.activations + self.weights

    @property
    def zeros_offset(self) -> int:
        return self.activations + self.weights + self.scales


def _staged_parts(cfg: TileConfig) -> tuple[int, int, int]:
    """Bytes of the packed weights, scales and zeros of one staged k-tile (kernels/quick_layout.cuh)."""
    if not cfg.async_weights:
        return 0, 0, 0
    n64 = cfg.tile_n // 64
    return (cfg.tile_k // 16) * n64 * 512, n64 * 128, n64 * 32


def padded_activation_bytes(cfg: TileConfig) -> int:
    """mma.sync kernels: TILE_M rows of TILE_K + 8 halves (common.cuh ActivationTile: the 16-byte pad
    keeps ldmatrix row addresses in distinct bank groups)."""
    return cfg.tile_m * (cfg.tile_k + 8) * 2


def _awq_layout(cfg: TileConfig) -> StageLayout:
    a = padded_activation_bytes(cfg)
    writeback = cfg.tile_k * (cfg.tile_n + 8) * 2  # [TILE_K][TILE_N + 8] fp16 (awq_gemm.cu)
    return StageLayout(a, writeback=writeback, stride=a, stages=1, total=a + writeback)


def _quick_mma_layout(cfg: TileConfig) -> StageLayout:
    a = padded_activation_bytes(cfg)
    w, s, z = _staged_parts(cfg)
    stride = a + w + s + z
    return StageLayout(a, w, s, z, stride=stride, stages=cfg.stages, total=cfg.stages * stride)


def _quick_wgmma_layout(cfg: TileConfig) -> StageLayout:
    # 128-byte-swizzled activation rows (TILE_M x 128 bytes per 64-half atom), the stage rounded up to
    # the 1024-byte swizzle-atom alignment, plus 1024 bytes of slack to align the base (quick_wgmma.cu).
    a = cfg.tile_m * cfg.tile_k * 2
    w, s, z = _staged_parts(cfg)
    stride = -(-(a + w + s + z) // 1024) * 1024
    return StageLayout(a, w, s, z, stride=stride, stages=cfg.stages, total=cfg.stages * stride + 1024)


def decode_steps(cfg: TileConfig) -> int:
    """k16 steps one warp of quick_decode.cu takes from each k-tile (its chunk)."""
    return cfg.tile_k // 16 // cfg.warps_n


def decode_reduction_bytes(cfg: TileConfig) -> int:
    """quick_decode.cu's static cross-warp reduction buffer: WARPS x TILE_M batch rows x (64 + 4) fp32."""
    return cfg.warps_n * cfg.tile_m * (64 + 4) * 4


def _quick_decode_layout(cfg: TileConfig) -> StageLayout:
    # Nothing staged (quick_decode.cu): weights and activations go straight from global memory into mma
    # fragments; the only shared memory is the static reduction buffer. Nothing dynamic.
    return StageLayout(0, stride=0, stages=1, total=0)


# ---------------------------------------------------------------- validity rules


def _mma_rules(cfg: TileConfig) -> list[str]:
    """What the mma.sync kernels' TileShape static_asserts and the register budget impose."""
    out = []
    if cfg.tile_k % 32:
        out.append("tile_k must be a multiple of 32")
    if cfg.warp_m * cfg.warps_m != cfg.tile_m or cfg.warp_m % 16:
        out.append("tile_m / warps_m must be a multiple of 16")
    if cfg.warp_m * cfg.warp_n > MAX_WARP_TILE_AREA:
        out.append(f"warp tile {cfg.warp_m}x{cfg.warp_n} exceeds {MAX_WARP_TILE_AREA} accumulators")
    if cfg.threads > 1024:
        out.append("at most 32 warps per block")
    return out


def _awq_rules(cfg: TileConfig) -> list[str]:
    out = _mma_rules(cfg)
    if cfg.warp_n * cfg.warps_n != cfg.tile_n or cfg.warp_n % 16:
        out.append("tile_n / warps_n must be a multiple of 16")
    words_per_row = cfg.tile_n // 8
    if cfg.threads % words_per_row or cfg.tile_k % (cfg.threads // words_per_row):
        out.append("threads must cover whole rows of the write-back tile")
    if cfg.stages != 1:
        out.append("the AutoAWQ-style kernel is single-stage (stages=1)")
    if cfg.async_weights:
        out.append("the AutoAWQ-style kernel writes dequantized weights back (no async_weights)")
    return out


def _quick_mma_rules(cfg: TileConfig) -> list[str]:
    out = _mma_rules(cfg)
    if cfg.warp_n * cfg.warps_n != cfg.tile_n or cfg.warp_n % 64:
        out.append("tile_n / warps_n must be a multiple of 64 (whole interleaved n64 blocks)")
    if cfg.stages < 2:
        out.append("QUICK pipelines activations: stages >= 2")
    return out


def _quick_wgmma_rules(cfg: TileConfig) -> list[str]:
    """The rules of kernels/quick_wgmma.cu's static_asserts and register budget."""
    out = []
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
    return out


def _quick_decode_rules(cfg: TileConfig) -> list[str]:
    """kernels/quick_decode.cu: a TILE_M x 64 output strip, warps splitting each k-tile along K."""
    out = []
    if cfg.tile_m not in (8, 16, 32) or (cfg.tile_n, cfg.warps_m) != (64, 1):
        out.append("decode tiles are 8, 16 or 32 x 64 (one n64 strip, 1, 2 or 4 n8 tiles of batch rows), "
                   "warps_m = 1")
    if cfg.warps_n not in (2, 4, 8):
        out.append("decode blocks have 2, 4 or 8 warps (they split the k-tile)")
    elif cfg.tile_k % (16 * cfg.warps_n) or decode_steps(cfg) > MAX_DECODE_STEPS:
        out.append(f"tile_k must give each warp whole k16 steps, at most {MAX_DECODE_STEPS} (a chunk's weight, "
                   "group and activation fragments are all held in registers)")
    if cfg.stages != 1 or cfg.async_weights:
        out.append("the decode kernel streams weights into registers: stages = 1, no _cp")
    if decode_reduction_bytes(cfg) > 48 * 1024:
        out.append("the reduction buffer is static shared memory: warps_n x tile_m x 68 floats, at most 48 KB")
    return out


# ---------------------------------------------------------------- fit rules: which problems a variant runs


def _tile_problem_rules(cfg: TileConfig, M: int, K: int, N: int, G: int) -> list[str]:
    """The tiled kernels: whole column tiles, one group per k-tile (tile_k divides G)."""
    out = []
    if N % cfg.tile_n:
        out.append(f"N = {N} must be a multiple of tile_n = {cfg.tile_n} for config {cfg.name}")
    if G % cfg.tile_k:
        out.append(f"tile_k = {cfg.tile_k} must divide group_size = {G} (one group per k-tile) "
                   f"for config {cfg.name}")
    if cfg.folded_zeros and G != cfg.tile_k:
        out.append(f"config {cfg.name} folds zero points per k-tile: group_size must equal "
                   f"tile_k = {cfg.tile_k}, got {G}")
    return out


def _decode_problem_rules(cfg: TileConfig, M: int, K: int, N: int, G: int) -> list[str]:
    """The decode kernel: at most tile_m rows, whole k-tiles (a k-tile may span several groups)."""
    out = []
    if M > cfg.tile_m:
        out.append(f"config {cfg.name} is a decode kernel: M must be at most tile_m = {cfg.tile_m}, got {M}")
    if N % 64:
        out.append(f"N = {N} must be a multiple of 64 for config {cfg.name}")
    if K % cfg.tile_k:
        out.append(f"K = {K} must be a multiple of tile_k = {cfg.tile_k} for config {cfg.name}")
    return out


# ---------------------------------------------------------------- launch geometry


@dataclass(frozen=True)
class Launch:
    """What one launch of a variant needs besides its arguments: the grid, the fp32 split-K workspace
    shape (None: none), how many ticket counters, and the value of the kernel's last argument
    (``split`` for tile-grid kernels, the block count P for stream-K)."""

    grid: tuple[int, int, int]
    workspace: tuple[int, ...] | None
    counters: int
    split_arg: int


def _tile_grid_launch(cfg: TileConfig, M: int, K: int, N: int, split: int, slots: int) -> Launch:
    """Grid = (row tiles, column tiles, split); split-K partials in workspace [split, M, N] reduced by
    the last block of each output tile (common.cuh ``finish_block``)."""
    grid = (-(-M // cfg.tile_m), N // cfg.tile_n, split)
    if split > 1 and M > 0:
        return Launch(grid, (split, M, N), grid[0] * grid[1], split)
    return Launch(grid, None, 0, split)


def _stream_k_launch(cfg: TileConfig, M: int, K: int, N: int, split: int, slots: int) -> Launch:
    """Stream-K over P blocks (quick_wgmma.cu): P = the resident slots (``split == STREAM_K``) or
    tiles x split (split-K); a tile shared by blocks is fixed up from workspace [P][2][TILE_M x TILE_N]
    (a block shares at most its first and its last tile)."""
    tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
    units = tiles * (K // cfg.tile_k)
    blocks = min(units, slots if split == STREAM_K else tiles * split)
    shared = blocks not in (1, tiles)  # else every tile is one block's whole k range
    return Launch((max(blocks, 1), 1, 1), (blocks, 2, cfg.tile_m * cfg.tile_n) if shared else None,
                  tiles if shared else 0, blocks)


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class KernelFamily:
    name: str                    # family name, also the C++ template name
    kind: str                    # weight format read: "awq" or "quick"
    source: str                  # file in kernels/
    params: tuple[str, ...]      # TileConfig fields passed as template arguments, in order (ints)
    variants: tuple[TileConfig, ...]
    marker: str                  # the config-name suffix that selects this family ("" = none; "wg" = wgmma)
    layout: Callable[[TileConfig], StageLayout]
    rules: Callable[[TileConfig], list[str]]
    launch_geometry: Callable[..., Launch]
    arch: str | None = None      # arch-specific NVRTC target (None: the arch asked for)
    compute_capability: str | None = None  # the only GPU it runs on (None: sm_80 and later)
    stream_k: bool = False       # split_k = STREAM_K is allowed (and the default)
    problem_rules: Callable[..., list[str]] = _tile_problem_rules  # (cfg, M, K, N, G) -> broken rules
    waits_on_prior_grid: bool = False  # starts with start_after_prior_grid (common.cuh): may launch as a
    #                                    programmatic dependent (quick_lab.build.launch)
    epilogues: tuple[str, ...] = ("store",)  # what the writer may store (EPILOGUES); with more than one,
    #                                    its index is the template's last argument (one instantiation each)
    doc: str = field(default="", compare=False)

    def accepts(self, cfg: TileConfig) -> bool:
        """The name rule: a config belongs to the family of its kind whose marker suffix it carries
        (``_wg``: the wgmma mainloop; no marker: the mma.sync kernels)."""
        return cfg.marker == self.marker

    def template_name(self, cfg: TileConfig, epilogue: str = "store") -> str:
        """The C++ name expression NVRTC instantiates for this variant (and writer epilogue)."""
        if epilogue not in self.epilogues:
            raise ValueError(f"{self.name} has no epilogue {epilogue!r} (it has {self.epilogues})")
        args = [str(int(getattr(cfg, p))) for p in self.params]
        if len(self.epilogues) > 1:
            args.append(str(self.epilogues.index(epilogue)))
        return f"{self.name}<{','.join(args)}>"

    def target_arch(self, arch: str) -> str:
        return self.arch or arch

    def shared_bytes(self, cfg: TileConfig) -> int:
        return self.layout(cfg).total

    def violations(self, cfg: TileConfig) -> list[str]:
        if not self.accepts(cfg):
            return [f"config {cfg.name} is not a {self.name} variant (its name marks family {cfg.marker!r})"]
        out = self.rules(cfg)
        if self.shared_bytes(cfg) > SMEM_PER_BLOCK_LIMIT:
            out.append(f"needs {self.shared_bytes(cfg)} bytes of shared memory")
        return out

    def problem_violations(self, cfg: TileConfig, M: int, K: int, N: int, G: int) -> list[str]:
        """The rules a problem must meet for this variant to run it (K = None: not known yet)."""
        return self.problem_rules(cfg, M, K if K is not None else cfg.tile_k, N, G)

    def launch(self, cfg: TileConfig, M: int, K: int, N: int, split: int, slots: int = 0) -> Launch:
        """Grid and split-K resources of one launch; ``slots`` = resident blocks on the whole GPU
        (used by the stream-K schedule)."""
        return self.launch_geometry(cfg, M, K, N, split, slots)


AWQ = KernelFamily(
    "awq_gemm", "awq", "awq_gemm.cu", ("tile_m", "tile_n", "tile_k", "warps_m", "warps_n"),
    configs.AWQ_VARIANTS, "", _awq_layout, _awq_rules, _tile_grid_launch,
    doc="AutoAWQ-style baseline: dequantized weights written back to shared memory, ldmatrix.trans")
QUICK_MMA = KernelFamily(
    "quick_gemm", "quick", "quick_gemm.cu",
    ("tile_m", "tile_n", "tile_k", "warps_m", "warps_n", "stages", "async_weights"),
    configs.QUICK_VARIANTS, "", _quick_mma_layout, _quick_mma_rules, _tile_grid_launch,
    doc="QUICK on mma.sync: dequantized registers are the B fragments (the paper's kernel)")
QUICK_WGMMA = KernelFamily(
    "quick_wgmma", "quick", "quick_wgmma.cu",
    ("tile_m", "tile_n", "tile_k", "warps_m", "warps_n", "stages", "async_weights", "folded_zeros"),
    configs.QUICK_WGMMA_VARIANTS, "wg", _quick_wgmma_layout, _quick_wgmma_rules,
    _stream_k_launch, arch="sm_90a", compute_capability="90", stream_k=True,
    doc="QUICK on Hopper wgmma: dequantized registers are the A operand; stream-K schedule")

QUICK_DECODE = KernelFamily(
    "quick_decode", "quick", "quick_decode.cu", ("tile_m", "tile_k", "warps_n"),
    configs.QUICK_DECODE_VARIANTS, "dc", _quick_decode_layout, _quick_decode_rules, _tile_grid_launch,
    problem_rules=_decode_problem_rules, waits_on_prior_grid=True, epilogues=EPILOGUES,
    doc="QUICK for decode (M <= 32): a split-K GEMV on mma.sync, the weights as the A operand")

FAMILIES = (AWQ, QUICK_MMA, QUICK_WGMMA, QUICK_DECODE)
KINDS = configs.KINDS


def family(kind: str, cfg: TileConfig) -> KernelFamily:
    """The family that runs ``cfg`` on weights of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for fam in FAMILIES:
        if fam.kind == kind and fam.accepts(cfg):
            return fam
    raise ValueError("only the QUICK kernel has a wgmma mainloop")


def families(kind: str | None = None, *, hopper: bool = True) -> tuple[KernelFamily, ...]:
    """The families reading ``kind`` (all when None); ``hopper=False`` leaves out sm_90a-only ones."""
    return tuple(f for f in FAMILIES if (kind is None or f.kind == kind)
                 and (hopper or f.compute_capability != "90"))


def variants(kind: str, *, hopper: bool = False) -> tuple[TileConfig, ...]:
    """The registered variants of ``kind``; ``hopper`` adds the sm_90a-only wgmma ones."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(c for f in families(kind, hopper=hopper) for c in f.variants)


def violations(kind: str, cfg: TileConfig) -> list[str]:
    """Every rule the kernel template's static_asserts and register budget impose; empty when valid."""
    if kind not in KINDS:
        return [f"kind must be one of {KINDS}"]
    if cfg.folded_zeros and not cfg.wgmma:
        return ["folded zero points exist only in the wgmma mainloop (_fz needs _wg)"]
    try:
        fam = family(kind, cfg)
    except ValueError as exc:
        return [str(exc)]
    return fam.violations(cfg)


def check(kind: str, cfg: TileConfig) -> None:
    bad = violations(kind, cfg)
    if bad:
        raise ValueError(f"invalid {kind} config {cfg.name}: " + "; ".join(bad))


def template_name(kind: str, cfg: TileConfig) -> str:
    return family(kind, cfg).template_name(cfg)


def shared_bytes(kind: str, cfg: TileConfig) -> int:
    """Dynamic shared memory of one block (the family's carve-up)."""
    return family(kind, cfg).shared_bytes(cfg)


def stage_layout(kind: str, cfg: TileConfig) -> StageLayout:
    return family(kind, cfg).layout(cfg)


def fits(cfg: TileConfig, N: int, group_size: int, K: int | None = None, M: int = 1) -> bool:
    """Whether a variant can run a problem with N columns and this group size (and K, M when given): its
    family's problem rules (tiled kernels: tile_n divides N, tile_k the group size, folded zero points one
    k-tile per group; the decode kernel: M <= tile_m, tile_k divides K)."""
    fam = next(f for f in FAMILIES if f.accepts(cfg))
    return not fam.problem_violations(cfg, M, K, N, group_size)


def resident_blocks(fam: KernelFamily, cfg: TileConfig, registers: int, static_smem: int) -> int:
    """Blocks of a compiled variant one SM holds at once (registers, shared memory, warps), from the
    sm_90 limits: 64 K registers allocated per warp in units of 256, 228 KB shared memory with 1 KB
    reserved per block, 64 warps, 32 blocks (CUDA C++ Programming Guide, compute capabilities)."""
    warps = cfg.threads // 32
    regs_per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_regs = (REGISTERS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (fam.shared_bytes(cfg) + static_smem + SMEM_RESERVED_PER_BLOCK)
    return max(1, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM))
