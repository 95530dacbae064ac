"""Public W4A16 GEMM ops on CuPy arrays: ``y[M, N] = x[M, K] @ W[K, N]`` in fp16.

``awq_gemm`` runs the AutoAWQ-style baseline on AutoAWQ-format weights, ``quick_gemm`` the QUICK
kernel on interleaved weights (:func:`quick_lab.core.interleave.interleave`, once, offline). Both accept
any M >= 1: rows past M are zero-filled on load and masked on store. ``plan_*`` returns a prepared
launch (validation and argument packing done once) for timing loops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from quick_lab.build import device, loader
from quick_lab.core import configs, validation
from quick_lab.core.format import AWQWeight
from quick_lab.core.interleave import QuickWeight


def to_device(weight):
    """Copy an AWQWeight / QuickWeight of NumPy arrays to the current GPU."""
    import cupy

    return replace(weight, qweight=cupy.asarray(weight.qweight), qzeros=cupy.asarray(weight.qzeros),
                   scales=cupy.asarray(weight.scales))


def _num_sms() -> int:
    return device.num_sms(device.current_device())


def default_config(kind: str, M: int, N: int, group_size: int) -> configs.TileConfig:
    """AutoAWQ's shape for the baseline (by N, as AutoAWQ picks); for QUICK a listed variant whose tile_n divides N and tile_k
    the group size, with tile_m as close as possible to the smallest of 16..128 covering M (ties: tile_n
    128, then the deeper tile_k and pipeline)."""
    if kind == "awq":
        return configs.AWQ_DEFAULT if N % configs.AWQ_DEFAULT.tile_n == 0 else configs.AWQ_DEFAULT_N64
    tile_m = next((t for t in (16, 32, 64, 128) if M <= t), 128)
    fitting = [c for c in configs.QUICK_VARIANTS if N % c.tile_n == 0 and group_size % c.tile_k == 0]
    if not fitting:
        return configs.QUICK_DEFAULT  # N not a multiple of 64: validation names the rule
    return min(fitting, key=lambda c: (abs(c.tile_m - tile_m), c.tile_n != 128, -c.tile_k, -c.stages))


def default_split_k(kind: str, cfg: configs.TileConfig, M: int, K: int, N: int) -> int:
    """AutoAWQ's split-K 8 for the baseline; stream-K for the wgmma mainloop; for QUICK enough splits
    for ~2 blocks per SM."""
    if cfg.wgmma:
        return configs.STREAM_K
    k_tiles = K // cfg.tile_k
    if kind == "awq" and cfg in (configs.AWQ_DEFAULT, configs.AWQ_DEFAULT_N64):
        return min(configs.AWQ_DEFAULT_SPLIT_K, k_tiles)
    blocks = (N // cfg.tile_n) * -(-M // cfg.tile_m)
    split = 1
    while blocks * split < 2 * _num_sms() and split * 2 <= min(16, k_tiles // 4):
        split *= 2
    return split


_tile_counters: dict = {}


def tile_counters(tiles: int):
    """Split-K ticket counters for ``tiles`` output tiles on the current device and stream.

    The kernels leave every counter at zero when they finish (the last block of a tile resets it), so
    one zero-initialized buffer serves every launch on a stream; launches on one stream never overlap.
    """
    import cupy

    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    buf = _tile_counters.get(key)
    if buf is None or buf.size < tiles:
        buf = cupy.zeros(max(tiles, 4096), dtype=cupy.int32)
        _tile_counters[key] = buf
    return buf


@dataclass
class GemmPlan:
    """A validated, argument-packed launch; ``run()`` does only the kernel launch (one, split-K
    included: the last block of each output tile reduces the partials)."""

    kind: str
    config: configs.TileConfig
    split_k: int
    M: int
    K: int
    N: int
    _kernel: object
    _grid: tuple
    _args: tuple
    _out: object

    def run(self):
        self._kernel(self._grid, (self.config.threads,), self._args,
                     shared_mem=configs.shared_bytes(self.kind, self.config))
        return self._out

    @property
    def out(self):
        return self._out

    @property
    def resources(self) -> dict:
        """What the compiled variant occupies per thread / block (registers, shared memory)."""
        return {"registers": self._kernel.num_regs,
                "smem_bytes": self._kernel.shared_size_bytes + configs.shared_bytes(self.kind, self.config),
                "threads": self.config.threads}


def _plan(kind: str, x, weight, config, split_k, out) -> GemmPlan:
    import cupy

    K, N, G = validation.check_weight(weight, kind)
    M = validation.check_activations(x, K)
    cfg = config if config is not None else default_config(kind, M, N, G)
    if isinstance(cfg, str):
        cfg = configs.TileConfig.parse(cfg)
    validation.check_config(cfg)
    configs.check(kind, cfg)
    split = split_k if split_k is not None else default_split_k(kind, cfg, max(M, 1), K, N)
    validation.check_problem(kind, cfg, max(M, 1), K, N, G, split)
    out = _output(out, M, N)
    kernel = loader.gemm_kernel(kind, cfg)
    tiles = -(-M // cfg.tile_m) * (N // cfg.tile_n)
    if cfg.wgmma:  # stream-K schedule over P blocks (kernels/quick_wgmma.cu)
        units = tiles * (K // cfg.tile_k)
        blocks = min(units, resident_blocks(kernel, cfg) * _num_sms() if split == configs.STREAM_K else tiles * split)
        grid = (max(blocks, 1), 1, 1)
        shared = blocks not in (1, tiles)  # else every tile is one block's whole k range
        workspace = cupy.empty((blocks, 2, cfg.tile_m * cfg.tile_n), dtype=cupy.float32) if shared else None
        counters = tile_counters(tiles) if shared else None
        launch_split = blocks
    else:
        grid = (-(-M // cfg.tile_m), N // cfg.tile_n, split)
        if split > 1 and M > 0:
            workspace = cupy.empty((split, M, N), dtype=cupy.float32)
            counters = tile_counters(grid[0] * grid[1])
        else:
            workspace = counters = None
        launch_split = split
    args = (x, weight.qweight, weight.qzeros, weight.scales, out, workspace, counters,
            np.int32(M), np.int32(K), np.int32(N), np.int32(G), np.int32(launch_split))
    return GemmPlan(kind, cfg, split, M, K, N, kernel, grid, args, out)


def _output(out, M: int, N: int):
    """The caller's ``out`` once checked (fp16 device array of shape [M, N]), or a new one."""
    import cupy

    if out is None:
        return cupy.empty((M, N), dtype=cupy.float16)
    validation.check_device_array(out, "out", np.float16)
    if out.shape != (M, N):
        raise ValueError(f"out must have shape [M, N] = {(M, N)}, got {out.shape}")
    return out


def resident_blocks(kernel, cfg: configs.TileConfig) -> int:
    """Blocks of a compiled variant one SM holds at once (registers, shared memory, warps), from the
    sm_90 limits: 64 K registers allocated per warp in units of 256, 228 KB shared memory with 1 KB
    reserved per block, 64 warps, 32 blocks (CUDA C++ Programming Guide, compute capabilities)."""
    warps = cfg.threads // 32
    regs_per_warp = -(-kernel.num_regs * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_smem = (228 * 1024) // (configs.shared_bytes("quick", cfg) + kernel.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 64 // warps, 32))


def plan_awq_gemm(x, weight: AWQWeight, *, config=None, split_k=None, out=None) -> GemmPlan:
    if not isinstance(weight, AWQWeight):
        raise TypeError(f"weight must be an AWQWeight (AutoAWQ GEMM format), got {type(weight).__name__}")
    return _plan("awq", x, weight, config, split_k, out)


def plan_quick_gemm(x, weight: QuickWeight, *, config=None, split_k=None, out=None) -> GemmPlan:
    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight (interleave an AWQWeight first), got {type(weight).__name__}")
    return _plan("quick", x, weight, config, split_k, out)


def _execute(plan: GemmPlan):
    return plan.run() if plan.M > 0 else plan.out


def awq_gemm(x, weight: AWQWeight, *, config=None, split_k=None, out=None):
    """Baseline (AutoAWQ-style) W4A16 GEMM. ``config``: a TileConfig or its name; default AutoAWQ's."""
    return _execute(plan_awq_gemm(x, weight, config=config, split_k=split_k, out=out))


@functools.lru_cache(maxsize=None)
def quick_choice(M: int, K: int, N: int, group_size: int, device_id: int = 0):
    """``("quick", TileConfig, split_k)`` or ``("fallback", None, 1)``: the fastest measured QUICK path
    for this problem on this GPU (``quick_lab.core.dispatch``), else the heuristic default config."""
    from quick_lab.core import dispatch

    choice = dispatch.choose(dispatch.load_table(device.gpu_slug(device.gpu_name(device_id))), max(M, 1), K, N,
                             group_size)
    if choice is None:
        cfg = default_config("quick", max(M, 1), N, group_size)
        return "quick", cfg, default_split_k("quick", cfg, max(M, 1), K, N)
    return choice


def plan_dispatch(x, weight: QuickWeight, *, out=None):
    """The public op's path: a QUICK kernel config and split-K, or dequantize + cuBLAS at large batch,
    as :func:`quick_choice` picks."""
    import cupy

    K, N, G = validation.check_weight(weight, "quick")
    M = validation.check_activations(x, K)
    kernel, cfg, split = quick_choice(M, K, N, G, cupy.cuda.Device().id)
    if kernel == "fallback":
        return plan_fallback(x, weight, out=out)
    return plan_quick_gemm(x, weight, config=cfg, split_k=split, out=out)


def quick_gemm(x, weight: QuickWeight, *, config=None, split_k=None, out=None):
    """QUICK W4A16 GEMM on interleaved weights. With no ``config`` (a TileConfig or its name) the
    per-GPU dispatch table picks the kernel config and split-K, or dequantize + cuBLAS."""
    if config is None and split_k is None:
        return _execute(plan_dispatch(x, weight, out=out))
    return _execute(plan_quick_gemm(x, weight, config=config, split_k=split_k, out=out))


@dataclass
class FallbackPlan:
    """Dequantize + cuBLAS: the QUICK-layout weight is expanded to fp16 W^T [N, K] every call (the
    model keeps only int4 in memory) and ``cupy.matmul`` runs on it. Wins at large batch, where the
    GEMM is compute-bound and cuBLAS's Hopper kernels outrun mma.sync."""

    kind = "fallback"
    config = "dequant+cublas"
    split_k = 1
    M: int
    K: int
    N: int
    _x: object
    _weight: object
    _w_t: object
    _out: object

    def run(self):
        _launch_dequantize_quick_t(self._weight, self._w_t)
        import cupy

        return cupy.matmul(self._x, self._w_t.T, out=self._out)

    @property
    def out(self):
        return self._out


def plan_fallback(x, weight: QuickWeight, *, out=None) -> FallbackPlan:
    import cupy

    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight, got {type(weight).__name__}")
    K, N, _ = validation.check_weight(weight, "quick")
    M = validation.check_activations(x, K)
    return FallbackPlan(M, K, N, x, weight, cupy.empty((N, K), dtype=cupy.float16), _output(out, M, N))


def _launch_dequantize_quick_t(weight: QuickWeight, out_t) -> None:
    K, N = weight.K, weight.N
    grid = (N // 64, -(-K // 128))  # one block per n64 block x 128 rows of k (kernels/dequant.cu)
    loader.support_kernel("dequantize_quick_t")(grid, (256,),
                                                 (weight.qweight, weight.qzeros, weight.scales, out_t,
                                                  np.int32(K), np.int32(N), np.int32(weight.group_size)))


def dequantize_quick_t(weight: QuickWeight):
    """QUICK-layout weight -> fp16 ``W^T [N, K]`` on the GPU (same arithmetic as the kernels)."""
    import cupy

    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight, got {type(weight).__name__}")
    K, N, _ = validation.check_weight(weight, "quick")
    out_t = cupy.empty((N, K), dtype=cupy.float16)
    _launch_dequantize_quick_t(weight, out_t)
    return out_t


def dequantize(weight: AWQWeight):
    """AutoAWQ-format weight -> fp16 ``W[K, N]`` on the GPU (same arithmetic as the GEMM kernels)."""
    import cupy

    if not isinstance(weight, AWQWeight):
        raise TypeError(f"weight must be an AWQWeight, got {type(weight).__name__}")
    K, N, G = validation.check_weight(weight, "awq")
    out = cupy.empty((K, N), dtype=cupy.float16)
    words = K * N // 8
    threads = 256
    loader.support_kernel("dequantize_awq")((-(-words // threads),), (threads,),
                                             (weight.qweight, weight.qzeros, weight.scales, out,
                                              np.int32(K), np.int32(N), np.int32(G)))
    return out
