"""Input checks for the GPU ops: every rule is enforced before a launch, with a message that names the
argument and the rule (a bad launch would crash, hang or silently compute garbage)."""
from __future__ import annotations

import numpy as np

from quick_lab.core import configs, registry
from quick_lab.core.format import VALID_GROUP_SIZES, AWQWeight
from quick_lab.core.interleave import QuickWeight

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
    wanted = AWQWeight if kind == "awq" else QuickWeight
    if not isinstance(weight, wanted):
        hint = " (interleave an AWQWeight first)" if kind == "quick" else " (deinterleave a QuickWeight first)"
        raise TypeError(f"weight must be a {wanted.__name__} for the {kind} kernel{hint}, "
                        f"got {type(weight).__name__}")
    G = weight.group_size
    if isinstance(G, bool) or not isinstance(G, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {type(G).__name__}")
    if G not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {G}")
    scales = check_device_array(weight.scales, "scales", np.float16)
    qweight = check_device_array(weight.qweight, "qweight", np.int32)
    qzeros = check_device_array(weight.qzeros, "qzeros", np.int32)
    # K as the packed weight sees it: AutoAWQ keeps one row per k, QUICK one row per k16 block.
    k_rows = qweight.shape[0] if kind == "awq" else qweight.shape[0] * 16
    if k_rows % G:
        rule = "qweight.shape[0]" if kind == "awq" else "16 * qweight.shape[0]"
        raise ValueError(f"K = {rule} = {k_rows} must be a multiple of group_size = {G} "
                         f"(every group of G rows shares one scale and zero)")
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
    """Raises ValueError when ``scales`` (a CuPy or NumPy array) hold NaN or Inf.

    Opt-in, on purpose: the GEMM ops do not call it, because scanning the scales is a full extra pass
    over ``K/G x N`` fp16 values plus a device-to-host sync on every call (for M = 1 that is more than
    the GEMM's own cost per weight byte). Call it once when weights are loaded (``ops.to_device``
    output or a checkpoint), not per launch. A NaN/Inf scale otherwise shows up as NaN/Inf outputs in
    the columns of its group.
    """
    if isinstance(scales, np.ndarray):
        finite = bool(np.isfinite(scales).all())
    else:
        finite = bool(_cupy().isfinite(scales).all())
    if not finite:
        raise ValueError("scales contain NaN or Inf; every scale must be finite")


def check_activations(x, K: int) -> int:
    x = check_device_array(x, "x", np.float16)
    M, k = x.shape
    if k != K:
        raise ValueError(f"x must have shape [M, K] with K = {K} (from the weight), got {x.shape}")
    return M


def check_config(cfg) -> configs.TileConfig:
    """A TileConfig whose fields are positive ints (``registry.check`` divides by them)."""
    if not isinstance(cfg, configs.TileConfig):
        raise TypeError(f"config must be a TileConfig or its name, got {type(cfg).__name__}")
    for field in ("tile_m", "tile_n", "tile_k", "warps_m", "warps_n", "stages"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"config {field} must be a positive int, got {value!r}")
    return cfg


def check_variant(kind: str, cfg) -> configs.TileConfig:
    """A well-formed config that a registered kernel family of ``kind`` can instantiate."""
    check_config(cfg)
    registry.check(kind, cfg)
    return cfg


def check_problem(kind: str, cfg: configs.TileConfig, M: int, K: int, N: int, G: int, split: int, *,
                  variant_checked: bool = False) -> None:
    """Every rule a launch of ``cfg`` on this problem must meet (``variant_checked``: the caller ran
    :func:`check_variant` already)."""
    if not variant_checked:
        check_variant(kind, cfg)
    broken = registry.family(kind, cfg).problem_violations(cfg, M, K, N, G)
    if broken:
        raise ValueError("; ".join(broken))
    if N // cfg.tile_n > MAX_GRID_Y:
        raise ValueError(f"N = {N} needs more than {MAX_GRID_Y} column tiles of {cfg.tile_n}")
    if M * K > INT32_MAX * 8 or M * N > INT32_MAX * 8:
        raise ValueError(f"M = {M} with K = {K}, N = {N} is beyond the supported size")
    k_tiles = K // cfg.tile_k
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise TypeError(f"split_k must be an int, got {type(split).__name__}")
    stream_k = registry.family(kind, cfg).stream_k
    if stream_k:
        units = -(-M // cfg.tile_m) * (N // cfg.tile_n) * k_tiles  # the stream-K schedule counts in int32
        if units > INT32_MAX:
            raise ValueError(f"M = {M}, K = {K}, N = {N} makes {units} tile x k-tile units for config "
                             f"{cfg.name}; at most {INT32_MAX}")
        if split == configs.STREAM_K:
            return
    if not 1 <= split <= k_tiles:
        stream = f" (or {configs.STREAM_K} for stream-K)" if stream_k else ""
        raise ValueError(f"split_k must be between 1 and K / tile_k = {k_tiles}{stream}, got {split}")
