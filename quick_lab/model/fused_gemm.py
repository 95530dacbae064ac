"""The decode GEMMs with the decoder's neighbouring ops fused into their tails (``kernels/quick_decode.cu``,
``quick_decode_fused``): launch code for the QUICK backend's small-batch steps. The decoder
(:mod:`quick_lab.model.decoder`) decides when a layer runs this way.

A decode step's non-GEMM launches cost ~2 µs of graph time each at batch 1, as much as the work in
them, so a layer runs its residual adds, RMSNorms and SiLU x up at the end of the GEMMs before them:

* ``store=STORE_RESIDUAL_NORM`` (o, down): ``h = fp16(h + fp16(x @ W))`` in place, the rows' sums of
  squares gathered by atomics as the strips finish, and the last strip to finish writes
  ``norm_out = fp16(h * rsqrt(mean(h^2) + eps) * gamma)`` (the next RMSNorm) for every row.
* ``store=STORE_SILU_PAIR`` (gate_up, [gate | up] columns): the product as usual, and of each pair of
  strips holding gate columns j .. j + 63 and the matching up columns, the second to finish writes
  ``act[:, j ..] = fp16(silu(gate) * up)``.

Each element is computed once (a form that redid the norm and SiLU in every strip of the next GEMM's
activation load was slower than the launches it saved). The arithmetic is the unfused kernels'
(``decoder.cu`` add_rms_norm and silu_mul) in the same order: ``h`` and ``act`` equal the unfused ones
bit for bit, ``norm_out`` up to the summation order of the row statistics (fp32 atomics over strips
instead of one block's tree).
"""
from __future__ import annotations

import functools

import numpy as np

from quick_lab.build import loader
from quick_lab.core import registry
from quick_lab.core.configs import TileConfig
from quick_lab.core.interleave import QuickWeight

__all__ = ["STORE_RESIDUAL_NORM", "STORE_SILU_PAIR", "decode_gemm", "fused_kernel_name", "is_decode_config"]

# kernels/quick_decode.cu DecodeStore
STORE_RESIDUAL_NORM, STORE_SILU_PAIR = 1, 2
_NULL = np.uint64(0)


def is_decode_config(cfg: TileConfig | None) -> bool:
    """Whether ``cfg`` runs the decode kernel, the only one with the fused tails."""
    return cfg is not None and registry.family("quick", cfg) is registry.QUICK_DECODE


def fused_kernel_name(cfg: TileConfig, store: int) -> str:
    """The name expression of one fused instantiation."""
    return f"quick_decode_fused<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},{store}>"


@functools.cache
def _kernel(name: str):
    return loader.load_function(registry.QUICK_DECODE.source, name)


def _check(arr, name: str, dtype, shape) -> None:
    import cupy

    if not isinstance(arr, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype or not arr.flags.c_contiguous or arr.shape != shape:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, got "
                         f"{arr.dtype} {arr.shape}{'' if arr.flags.c_contiguous else ' (non-contiguous)'}")


def decode_gemm(x, weight: QuickWeight, config: TileConfig, split_k: int, *, store: int, residual=None,
                sum_sq=None, norm_weight=None, eps: float = 0.0):
    """``x`` [M, K] fp16 ``@ W`` on the decode kernel ``config`` at ``split_k`` with a fused tail.
    ``STORE_RESIDUAL_NORM``: updates ``residual`` [M, N] in place and returns the normed rows [M, N]
    (``sum_sq``: float32 [>= M], zero, left zero; ``norm_weight`` [N]). ``STORE_SILU_PAIR``: returns
    ``act`` [M, N / 2] = silu(gate) * up of the product's [gate | up] halves."""
    import cupy

    from quick_lab.core import ops, validation

    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight, got {type(weight).__name__}")
    if not is_decode_config(config):
        raise ValueError(f"config must be a decode-kernel config (name ending _dc), got {config}")
    if store not in (STORE_RESIDUAL_NORM, STORE_SILU_PAIR):
        raise ValueError(f"store must be STORE_RESIDUAL_NORM ({STORE_RESIDUAL_NORM}) or STORE_SILU_PAIR "
                         f"({STORE_SILU_PAIR}), got {store}")
    K, N, G = validation.check_weight(weight, "quick")
    if not isinstance(x, cupy.ndarray) or x.ndim != 2:
        raise TypeError(f"x must be a 2-D cupy.ndarray, got {type(x).__name__}")
    M = x.shape[0]
    _check(x, "x", cupy.float16, (M, K))
    validation.check_problem("quick", config, max(M, 1), K, N, G, split_k)
    launch = registry.QUICK_DECODE.launch(config, M, K, N, split_k)
    strips = N // 64
    if store == STORE_RESIDUAL_NORM:
        _check(residual, "residual", cupy.float16, (M, N))
        _check(norm_weight, "norm_weight", cupy.float16, (N,))
        if not isinstance(sum_sq, cupy.ndarray) or sum_sq.dtype != cupy.float32 or sum_sq.size < M:
            raise ValueError(f"sum_sq must be a float32 cupy.ndarray of at least M = {M} (zero) row sums")
        out, result, extra = _NULL, cupy.empty((M, N), dtype=cupy.float16), 1
    else:
        if N % 128:
            raise ValueError(f"STORE_SILU_PAIR needs [gate | up] halves of whole 64-column strips: N = {N} must be "
                             f"a multiple of 128")
        out = cupy.empty((M, N), dtype=cupy.float16)
        result, extra = cupy.empty((M, N // 2), dtype=cupy.float16), N // 128
    if M == 0:
        return result
    workspace = cupy.empty(launch.workspace, dtype=cupy.float32) if launch.workspace else None
    counters = ops.tile_counters(strips + extra)  # split-K tickets [0, strips), the tails' after them
    residual_norm = store == STORE_RESIDUAL_NORM
    args = (x, weight.qweight, weight.qzeros, weight.scales, out, workspace if workspace is not None else _NULL,
            counters, np.int32(M), np.int32(K), np.int32(N), np.int32(G), np.int32(launch.split_arg),
            residual if residual_norm else _NULL, sum_sq if residual_norm else _NULL,
            norm_weight if residual_norm else _NULL, result if residual_norm else _NULL, np.float32(eps),
            _NULL if residual_norm else result, counters[strips:])
    _kernel(fused_kernel_name(config, store))(launch.grid, (config.threads,), args)
    return result
