"""The float32 NumPy reference forward of the decoder (CPU only): the ground truth the GPU model is
tested against, and the RoPE tables both share."""
from __future__ import annotations

import numpy as np

from quick_lab.core.format import dequantize_fp16, split_gate_up
from quick_lab.model.config import ModelConfig
from quick_lab.model.weights import ModelWeights

__all__ = ["reference_forward", "rope_tables"]


def rope_tables(cfg: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [positions, head_dim / 2] for rotate-half RoPE."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def reference_forward(weights: ModelWeights, tokens: np.ndarray, lm_head: bool = True,
                      stats: dict | None = None) -> np.ndarray:
    """Float32 NumPy forward over the whole sequence (causal, no cache), weights dequantized exactly
    as the kernels do: logits ``[B, T, vocab]``, or the final normed hidden ``[B, T, hidden]``.
    ``stats``, if given, receives ``max_abs_residual`` (largest residual-stream value, for fp16 range)."""
    cfg = weights.cfg
    B, T = tokens.shape
    D, Hq, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    dense: dict[int, np.ndarray] = {}

    def linear(x, awq):
        if id(awq) not in dense:
            dense[id(awq)] = dequantize_fp16(awq).astype(np.float32)
        return x @ dense[id(awq)]

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_eps) * w.astype(np.float32)

    cos, sin = (t[None, :, None, :] for t in rope_tables(cfg, T))

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    h = weights.embed.astype(np.float32)[tokens]
    for layer in weights.layers:
        qkv = linear(norm(h, layer.attn_norm), layer.qkv)
        q = rope(qkv[..., : Hq * D].reshape(B, T, Hq, D))
        k = rope(qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, T, Hkv, D))
        v = qkv[..., (Hq + Hkv) * D:].reshape(B, T, Hkv, D)
        k, v = (np.repeat(a, Hq // Hkv, axis=2) for a in (k, v))  # query head j uses kv head j // group
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = h + linear(np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, Hq * D), layer.o)
        gate, up = split_gate_up(linear(norm(h, layer.mlp_norm), layer.gate_up))
        h = h + linear(gate / (1 + np.exp(-gate)) * up, layer.down)
        if stats is not None:
            stats["max_abs_residual"] = max(stats.get("max_abs_residual", 0.0), float(np.abs(h).max()))
    x = norm(h, weights.norm)
    return x @ weights.lm_head.astype(np.float32) if lm_head else x
