"""Input checks for the GPU ops: every rule is enforced before a launch, with a message that names the
argument and the rule (a bad launch would crash, hang or silently compute garbage)."""
from __future__ import annotations

import numpy as np

from . import configs
from .format import VALID_GROUP_SIZES

MAX_GRID_Y = 65535
INT32_MAX = 2**31 - 1


def _cupy():
    import cupy
    return cupy


def check_device_array(arr, name: str, dtype, ndim: int = 2):
    cp = _cupy()
    if isinstance(arr, np.ndarray):
        raise TypeError(f"{name} is a host NumPy array; pass a CuPy array on the GPU (cupy.asarray({name}))")
    if not isinstance(arr, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (row-major, no strides); call cupy.ascontiguousarray({name})")
    if arr.data.ptr % 16:
        raise ValueError(f"{name} must be 16-byte aligned (kernels use 128-bit loads); got an offset view, "
                         f"copy it with cupy.ascontiguousarray")
    if arr.device.id != cp.cuda.Device().id:
        raise ValueError(f"{name} lives on GPU {arr.device.id} but the current device is GPU "
                         f"{cp.cuda.Device().id}; use `with cupy.cuda.Device({arr.device.id}):`")
    return arr


def check_weight(weight, kind: str) -> tuple[int, int, int]:
    """Checks the packed weight arrays of ``kind`` ('awq' or 'quick'); returns (K, N, group_size)."""
    G = weight.group_size
    if G not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {G}")
    scales = check_device_array(weight.scales, "scales", np.float16)
    qweight = check_device_array(weight.qweight, "qweight", np.int32)
    qzeros = check_device_array(weight.qzeros, "qzeros", np.int32)
    N = scales.shape[1]
    K = scales.shape[0] * G
    expected = (K, N // 8) if kind == "awq" else (K // 16, 2 * N)
    layout = "[K, N/8] (AutoAWQ GEMM format)" if kind == "awq" else "[K/16, 2N] (QUICK layout)"
    if qweight.shape != expected:
        raise ValueError(f"qweight must have shape {layout} = {expected} for scales of shape {scales.shape} "
                         f"and group_size {G}, got {qweight.shape}")
    if qzeros.shape != (K // G, N // 8):
        raise ValueError(f"qzeros must have shape [K/G, N/8] = {(K // G, N // 8)}, got {qzeros.shape}")
    if N % 64:
        raise ValueError(f"N must be a multiple of 64, got N = {N}")
    if K * N // 8 > INT32_MAX:
        raise ValueError(f"K * N / 8 = {K * N // 8} packed words exceed 32-bit indexing")
    return K, N, G


def check_scales_finite(scales) -> None:
    cp = _cupy()
    if not bool(cp.isfinite(scales).all()):
        raise ValueError("scales contain NaN or Inf; every scale must be finite")


def check_activations(x, K: int) -> int:
    x = check_device_array(x, "x", np.float16)
    M, k = x.shape
    if k != K:
        raise ValueError(f"x must have shape [M, K] with K = {K} (from the weight), got {x.shape}")
    return M


def check_problem(kind: str, cfg: configs.TileConfig, M: int, K: int, N: int, G: int, split: int) -> None:
    configs.check(kind, cfg)
    if N % cfg.tile_n:
        raise ValueError(f"N = {N} must be a multiple of tile_n = {cfg.tile_n} for config {cfg.name}")
    if G % cfg.tile_k:
        raise ValueError(f"tile_k = {cfg.tile_k} must divide group_size = {G} (one group per k-tile) "
                         f"for config {cfg.name}")
    if N // cfg.tile_n > MAX_GRID_Y:
        raise ValueError(f"N = {N} needs more than {MAX_GRID_Y} column tiles of {cfg.tile_n}")
    if M * K > INT32_MAX * 8 or M * N > INT32_MAX * 8:
        raise ValueError(f"M = {M} with K = {K}, N = {N} is beyond the supported size")
    k_tiles = K // cfg.tile_k
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise TypeError(f"split_k must be an int, got {type(split).__name__}")
    if not 1 <= split <= k_tiles:
        raise ValueError(f"split_k must be between 1 and K / tile_k = {k_tiles}, got {split}")
