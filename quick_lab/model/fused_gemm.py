"""The decode GEMMs with the decoder's neighbouring ops fused in (``kernels/quick_decode.cu``,
``quick_decode_fused``): launch code for the QUICK backend's decode steps. The decoder
(:mod:`quick_lab.model.decoder`) decides when a layer runs this way.

A decode step's non-GEMM launches cost ~2 µs of graph time each at batch 1, as much as the work in
them, so a layer runs its two RMSNorms, the two residual adds and SiLU x up inside its four GEMMs:

* ``load=LOAD_RMS_NORM``: x is the residual stream h; the kernel forms each activation pair as
  ``fp16(h * inv[m] * gamma[k])`` with ``inv[m] = rsqrt(sum_sq[m] / K + eps)`` (RMSNorm at load time,
  the row statistics left by the GEMM that last updated h).
* ``load=LOAD_SILU_MUL``: x is the gate_up output [M, 2K]; the pair is ``fp16(silu(gate) * up)``.
* ``store=STORE_RESIDUAL``: ``h = fp16(h + fp16(x @ W))`` in place and ``sum_sq_out[m] += sum_n h^2``
  (zeroed before by the GEMM that read it); the launch zeroes ``sum_sq_clear``, the other buffer.

The arithmetic is the unfused kernels' (``decoder.cu`` add_rms_norm and silu_mul) in the same order, so
the fused activations equal the unfused ones bit for bit given the same row sum; only that sum is
accumulated in another order (fp32 atomics over strips instead of one block's tree).
"""
from __future__ import annotations

import functools

import numpy as np

from quick_lab.build import loader
from quick_lab.core import registry
from quick_lab.core.configs import TileConfig
from quick_lab.core.interleave import QuickWeight

__all__ = ["LOAD_PLAIN", "LOAD_RMS_NORM", "LOAD_SILU_MUL", "STORE_PLAIN", "STORE_RESIDUAL", "decode_gemm",
           "fused_kernel_name", "is_decode_config"]

# kernels/quick_decode.cu DecodeLoad / DecodeStore
LOAD_PLAIN, LOAD_RMS_NORM, LOAD_SILU_MUL = 0, 1, 2
STORE_PLAIN, STORE_RESIDUAL = 0, 1
_NULL = np.uint64(0)


def is_decode_config(cfg: TileConfig | None) -> bool:
    """Whether ``cfg`` runs the decode kernel, the only one with the fused forms."""
    return cfg is not None and registry.family("quick", cfg) is registry.QUICK_DECODE


def fused_kernel_name(cfg: TileConfig, load: int, store: int) -> str:
    """The name expression of one fused instantiation."""
    return f"quick_decode_fused<{cfg.tile_m},{cfg.tile_k},{cfg.warps_n},{load},{store}>"


@functools.cache
def _kernel(name: str):
    return loader.load_function(registry.QUICK_DECODE.source, name)


def _check(arr, name: str, dtype, shape) -> None:
    import cupy

    if not isinstance(arr, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype or not arr.flags.c_contiguous or arr.shape[:len(shape)] != shape:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, got "
                         f"{arr.dtype} {arr.shape}{'' if arr.flags.c_contiguous else ' (non-contiguous)'}")


def decode_gemm(x, weight: QuickWeight, config: TileConfig, split_k: int, *, load: int = LOAD_PLAIN,
                store: int = STORE_PLAIN, norm_weight=None, sum_sq=None, eps: float = 0.0, residual=None,
                sum_sq_out=None, sum_sq_clear=None):
    """``x @ W`` on the decode kernel ``config`` at ``split_k`` with the fused forms above. Returns the
    fp16 [M, N] product (``STORE_PLAIN``) or ``residual`` (``STORE_RESIDUAL``, updated in place).
    x is [M, K] fp16, or [M, 2K] (gate | up) with ``LOAD_SILU_MUL``; M <= config.tile_m."""
    import cupy

    from quick_lab.core import ops, validation

    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight, got {type(weight).__name__}")
    if not is_decode_config(config):
        raise ValueError(f"config must be a decode-kernel config (name ending _dc), got {config}")
    if load not in (LOAD_PLAIN, LOAD_RMS_NORM, LOAD_SILU_MUL) or store not in (STORE_PLAIN, STORE_RESIDUAL):
        raise ValueError(f"load must be 0, 1 or 2 and store 0 or 1, got load={load}, store={store}")
    K, N, G = validation.check_weight(weight, "quick")
    if not isinstance(x, cupy.ndarray) or x.ndim != 2:
        raise TypeError(f"x must be a 2-D cupy.ndarray, got {type(x).__name__}")
    M = x.shape[0]
    _check(x, "x", cupy.float16, (M, 2 * K if load == LOAD_SILU_MUL else K))
    validation.check_problem("quick", config, max(M, 1), K, N, G, split_k, variant_checked=False)
    if load == LOAD_RMS_NORM:
        _check(norm_weight, "norm_weight", cupy.float16, (K,))
        if not isinstance(sum_sq, cupy.ndarray) or sum_sq.dtype != cupy.float32 or sum_sq.size < M:
            raise ValueError(f"sum_sq must be a float32 cupy.ndarray of at least M = {M} row sums")
    if store == STORE_RESIDUAL:
        _check(residual, "residual", cupy.float16, (M, N))
        for name, buf in (("sum_sq_out", sum_sq_out), ("sum_sq_clear", sum_sq_clear)):
            if not isinstance(buf, cupy.ndarray) or buf.dtype != cupy.float32 or buf.size < M:
                raise ValueError(f"{name} must be a float32 cupy.ndarray of at least M = {M} row sums")
        out = residual
    else:
        out = cupy.empty((M, N), dtype=cupy.float16)
    if M == 0:
        return out
    launch = registry.QUICK_DECODE.launch(config, M, K, N, split_k)
    workspace = cupy.empty(launch.workspace, dtype=cupy.float32) if launch.workspace else None
    counters = ops.tile_counters(launch.counters) if launch.counters else None
    args = (x, weight.qweight, weight.qzeros, weight.scales, out if store == STORE_PLAIN else _NULL,
            workspace if workspace is not None else _NULL, counters if counters is not None else _NULL,
            np.int32(M), np.int32(K), np.int32(N), np.int32(G), np.int32(launch.split_arg),
            norm_weight if load == LOAD_RMS_NORM else _NULL, sum_sq if load == LOAD_RMS_NORM else _NULL,
            np.float32(eps), residual if store == STORE_RESIDUAL else _NULL,
            sum_sq_out if store == STORE_RESIDUAL else _NULL, sum_sq_clear if store == STORE_RESIDUAL else _NULL)
    _kernel(fused_kernel_name(config, load, store))(launch.grid, (config.threads,), args)
    return out
