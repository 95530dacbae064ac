"""AutoAWQ "GEMM" int4 weight format: quantize, pack, unpack, dequantize, and the fused MLP gate/up
weight's column pairing (NumPy only).

Meaning: ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]`` and ``y = x @ W`` with
``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/G, N/8]``, ``scales`` fp16 ``[K/G, N]``.
This module never imports cupy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Nibble i (bits 4i..4i+3) of packed word j holds column 8j + AWQ_ORDER[i].
# AutoAWQ chose this order for its lop3 dequantizer (0x64006400 magic number): one
# lop3 extracts nibbles (0, 4), the next (1, 5), then (2, 6), (3, 7), each as an fp16x2
# pair. With this order those pairs are the adjacent columns (0, 1), (2, 3), (4, 5), (6, 7),
# so the dequantized registers are already in column order and need no shuffle.
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)

VALID_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)

# A fused MLP gate/up weight holds (gate, up) pairs of GATE_UP_PAIR columns (pair_gate_up): one
# 64-column strip of the QUICK decode GEMM then holds both halves of 32 outputs, so its writer can
# apply SiLU x up (the "silu_mul" epilogue, quick_lab.core.registry.EPILOGUES).
GATE_UP_PAIR = 32

__all__ = [
    "AWQ_ORDER",
    "GATE_UP_PAIR",
    "VALID_GROUP_SIZES",
    "AWQWeight",
    "quantize",
    "pack_int4",
    "unpack_int4",
    "quantize_awq",
    "dequantize",
    "dequantize_fp16",
    "reference_gemm",
    "validate_awq",
    "random_awq",
    "pair_gate_up",
    "split_gate_up",
]


# ---------------------------------------------------------------- validation helpers


def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if int(group_size) not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {group_size}")
    return int(group_size)


def _check_dims(K: int, N: int, group_size: int, what: str) -> None:
    if K <= 0 or N <= 0:
        raise ValueError(f"{what}: K and N must be positive, got K={K}, N={N}")
    if K % group_size:
        raise ValueError(f"{what}: K = {K} must be a multiple of group_size = {group_size}")
    if N % 8:
        raise ValueError(f"{what}: N = {N} must be a multiple of 8 (eight int4 per int32 word)")


def _dtype_of(arr: Any, name: str) -> np.dtype:
    if not hasattr(arr, "dtype") or not hasattr(arr, "shape"):
        raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
    try:
        return np.dtype(arr.dtype)
    except TypeError:
        # A torch dtype is not a NumPy one, but its name is: torch.int32 -> int32, torch.float16 -> float16.
        try:
            return np.dtype(str(arr.dtype).rsplit(".", 1)[-1])
        except TypeError:
            raise TypeError(f"{name} has dtype {arr.dtype}, which has no NumPy equivalent") from None


def _check_array(arr: Any, name: str, dtype: Any) -> None:
    got = _dtype_of(arr, name)
    if got != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {got}")
    if len(arr.shape) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(arr.shape)}")


# ---------------------------------------------------------------- container


@dataclass(frozen=True, eq=False)
class AWQWeight:
    """Packed int4 weight in AutoAWQ GEMM format (arrays may be NumPy or any array with
    ``.shape``/``.dtype``; validation reads only those)."""

    qweight: Any  # int32 [K, N/8]
    qzeros: Any  # int32 [K/G, N/8]
    scales: Any  # float16 [K/G, N]
    group_size: int = 128

    def __post_init__(self) -> None:
        validate_awq(self)

    @property
    def K(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def N(self) -> int:
        return int(self.scales.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])


def validate_awq(awq: AWQWeight) -> None:
    """Check dtypes, shapes and group-size consistency; raise TypeError/ValueError naming the field."""
    if not isinstance(awq, AWQWeight):
        raise TypeError(f"awq must be an AWQWeight, got {type(awq).__name__}")
    G = _check_group_size(awq.group_size)
    _check_array(awq.qweight, "qweight", np.int32)
    _check_array(awq.qzeros, "qzeros", np.int32)
    _check_array(awq.scales, "scales", np.float16)
    K, N = int(awq.qweight.shape[0]), int(awq.scales.shape[1])
    if N % 8:
        raise ValueError(f"scales: N = scales.shape[1] = {N} must be a multiple of 8")
    if K % G:
        raise ValueError(f"qweight: K = qweight.shape[0] = {K} must be a multiple of group_size = {G}")
    rules = (
        ("qweight", awq.qweight, "(K, N/8)", (K, N // 8)),
        ("scales", awq.scales, "(K/G, N)", (K // G, N)),
        ("qzeros", awq.qzeros, "(K/G, N/8)", (K // G, N // 8)),
    )
    for name, arr, rule, want in rules:
        if tuple(arr.shape) != want:
            raise ValueError(f"{name} must have shape {rule} = {want}, got {tuple(arr.shape)}")


# ---------------------------------------------------------------- packing


def pack_int4(q: Any) -> np.ndarray:
    """Pack uint4 values ``[R, C]`` (0..15) into int32 words ``[R, C/8]`` in AWQ_ORDER."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"q must be an integer array, got dtype {q.dtype}")
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D [R, C], got shape {q.shape}")
    R, C = q.shape
    if C % 8:
        raise ValueError(f"q: number of columns C = {C} must be a multiple of 8")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"q values must be in 0..15, got range [{q.min()}, {q.max()}]")
    q3 = q.reshape(R, C // 8, 8)
    words = np.zeros((R, C // 8), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words |= q3[:, :, col].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_int4(packed: Any) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int32 ``[R, C/8]`` -> uint8 ``[R, C]`` with values 0..15."""
    packed = np.asarray(packed)
    if packed.dtype not in (np.dtype(np.int32), np.dtype(np.uint32)):
        raise TypeError(f"packed must have dtype int32 (or uint32), got {packed.dtype}")
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [R, C/8], got shape {packed.shape}")
    R, W = packed.shape
    u = packed.view(np.uint32)
    out = np.empty((R, W, 8), dtype=np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (u >> np.uint32(4 * i)) & np.uint32(0xF)
    return out.reshape(R, W * 8)


# ---------------------------------------------------------------- quantization


def quantize(weight: Any, group_size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group-wise asymmetric min/max int4 quantization along K.

    Returns ``(q uint8 [K, N], zeros uint8 [K/G, N], scales float16 [K/G, N])``. The group
    range is widened to include 0 (zero points are integers in 0..15, so 0 is always a
    level) and the fp16 scale is rounded *up*, so 15 * s covers the range and every element
    satisfies ``|W - (q - z) * s| <= s / 2`` up to float rounding.
    """
    G = _check_group_size(group_size)
    w = np.asarray(weight)
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"weight must be a floating-point array, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {w.shape}")
    K, N = w.shape
    _check_dims(K, N, G, "weight")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight must be finite (found NaN or inf)")

    wg = w.astype(np.float32, copy=False).reshape(K // G, G, N)
    wmin = np.minimum(wg.min(axis=1), 0.0)
    wmax = np.maximum(wg.max(axis=1), 0.0)
    span = wmax - wmin
    s32 = np.where(span > 0, span / np.float32(15), np.float32(1)).astype(np.float32)
    if np.any(s32 > np.finfo(np.float16).max):
        raise ValueError("weight: a group's range / 15 exceeds the fp16 maximum (65504)")
    s16 = s32.astype(np.float16)
    low = s16.astype(np.float32) < s32
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    s = s16.astype(np.float32)

    z = np.clip(np.round(-wmin / s), 0, 15)
    q = np.clip(np.round(wg / s[:, None, :]) + z[:, None, :], 0, 15)
    return q.reshape(K, N).astype(np.uint8), z.astype(np.uint8), s16


def quantize_awq(weight: Any, group_size: int = 128) -> AWQWeight:
    """:func:`quantize` then pack ``q`` and ``zeros`` into an :class:`AWQWeight`."""
    q, z, s = quantize(weight, group_size)
    return AWQWeight(pack_int4(q), pack_int4(z), s, int(group_size))


def _dequant_f32(awq: AWQWeight) -> np.ndarray:
    validate_awq(awq)
    G, K, N = awq.group_size, awq.K, awq.N
    q = unpack_int4(awq.qweight).reshape(K // G, G, N).astype(np.float32)
    z = unpack_int4(awq.qzeros).astype(np.float32)
    s = np.asarray(awq.scales).astype(np.float32)
    # (q - z) is an integer in [-15, 15] and s has an 11-bit significand, so this
    # float32 product is exact.
    return ((q - z[:, None, :]) * s[:, None, :]).reshape(K, N)


def dequantize(awq: AWQWeight) -> np.ndarray:
    """``W = (q - z) * s`` as float32 ``[K, N]`` (exact product of the fp16 values)."""
    return _dequant_f32(awq)


def dequantize_fp16(awq: AWQWeight) -> np.ndarray:
    """``W`` as float16 ``[K, N]``, bit-identical to fp16 arithmetic: ``q - z`` is exact in
    fp16 and the product with ``s`` is rounded once to nearest (what the GPU kernels do)."""
    return _dequant_f32(awq).astype(np.float16)


def reference_gemm(x: Any, awq: AWQWeight) -> np.ndarray:
    """``x @ W`` in float64 ``[M, N]``, with ``W = dequantize_fp16(awq)``."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != awq.K:
        raise ValueError(f"x must have shape (M, K) with K = {awq.K}, got {x.shape}")
    return x.astype(np.float64) @ dequantize_fp16(awq).astype(np.float64)


def random_awq(K: int, N: int, group_size: int = 128, seed: int = 0) -> AWQWeight:
    """Random AWQ weight: uniform nibbles and zeros in 0..15, fp16 scales from
    uniform [0.001, 0.01) (keeps ``x @ W`` in fp16 range for x ~ N(0, 1), K <= 28672)."""
    G = _check_group_size(group_size)
    _check_dims(int(K), int(N), G, "random_awq")
    rng = np.random.default_rng(seed)

    def words(rows: int) -> np.ndarray:
        # Uniform random 32-bit words are exactly eight independent uniform nibbles.
        w = rng.integers(0, 0xFFFFFFFF, size=(rows, N // 8), dtype=np.uint32, endpoint=True)
        return w.view(np.int32)

    qweight = words(K)
    qzeros = words(K // G)
    scales = rng.uniform(0.001, 0.01, size=(K // G, N)).astype(np.float16)
    return AWQWeight(qweight, qzeros, scales, G)


# ---------------------------------------------------------------- fused gate/up


def _pair_columns(gate: np.ndarray, up: np.ndarray, per_item: int) -> np.ndarray:
    """[..., n] arrays whose items hold ``per_item`` columns each -> [..., 2n] in pairs of blocks."""
    block = GATE_UP_PAIR // per_item
    a, b = (np.asarray(x).reshape(*x.shape[:-1], -1, block) for x in (gate, up))
    return np.stack([a, b], axis=-2).reshape(*a.shape[:-2], -1)


def pair_gate_up(gate: AWQWeight, up: AWQWeight) -> AWQWeight:
    """The MLP's gate and up projections fused into one AutoAWQ weight [K, 2 I] whose columns come in
    (gate, up) pairs of ``GATE_UP_PAIR``: gate 32j .. 32j + 31, then up 32j .. 32j + 31. Exact on the
    packed words (a pair is 4 whole words of 8 columns), and the layout that lets the QUICK decode GEMM
    apply SiLU x up in its writer (one strip of 64 columns holds both halves of 32 outputs)."""
    if (gate.K, gate.N, gate.group_size) != (up.K, up.N, up.group_size):
        raise ValueError(f"gate (K, N, group size) = {(gate.K, gate.N, gate.group_size)} and up "
                         f"{(up.K, up.N, up.group_size)} must match")
    if gate.N % GATE_UP_PAIR:
        raise ValueError(f"gate/up: N = {gate.N} must be a multiple of {GATE_UP_PAIR} to pair columns")
    return AWQWeight(_pair_columns(gate.qweight, up.qweight, 8), _pair_columns(gate.qzeros, up.qzeros, 8),
                     _pair_columns(gate.scales, up.scales, 1), gate.group_size)


def split_gate_up(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gate, up), each [..., I], of a gate_up product [..., 2 I] in :func:`pair_gate_up`'s layout."""
    pairs = y.reshape(*y.shape[:-1], -1, 2, GATE_UP_PAIR)
    return (pairs[..., 0, :].reshape(*y.shape[:-1], -1), pairs[..., 1, :].reshape(*y.shape[:-1], -1))
