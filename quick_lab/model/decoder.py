"""The Llama-architecture decoder on the GPU (CuPy, fp16): :class:`Linear`, :class:`KVCache`,
:class:`Model` and the elementwise pieces (RMSNorm, SiLU-gate, RoPE). Model code only; decoding is in
:mod:`quick_lab.model.generate`, timing in :mod:`quick_lab.model.sweep`.

Every linear layer runs on one of three backends over the *same* int4 weights: ``fp16`` (cuBLAS on the
dequantized weight), ``awq`` (the AutoAWQ-style kernel) or ``quick`` (the QUICK kernel on the
interleaved weight). Attention, norms and RoPE are plain CuPy, identical for all backends. Matmuls go
through :func:`quick_lab.model.cublas.matmul` so a forward can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from quick_lab.core.format import AWQWeight
from quick_lab.model.config import BACKENDS, ModelConfig
from quick_lab.model.cublas import matmul
from quick_lab.model.reference import rope_tables
from quick_lab.model.weights import ModelWeights

__all__ = ["FP16_FALLBACK_M", "KVCache", "Linear", "Model", "rms_norm"]

# AutoAWQ's WQLinear_GEMM switches to dequantize + fp16 matmul when batch*seq >= 1024; both quantized
# backends do the same here, so only prefill of large batches is affected (decode M = batch <= 256).
FP16_FALLBACK_M = 1024


@functools.cache
def _kernels():
    import cupy

    silu_mul = cupy.ElementwiseKernel(
        "T g, T u", "T y", "const float a = (float)g; y = (T)(a / (1.0f + expf(-a)) * (float)u);",
        "quick_lab_silu_mul")
    # x [B, T, H, D] (any strides; raw arrays index logically), cos/sin [T, D/2]; y contiguous.
    rope = cupy.ElementwiseKernel(
        "raw T x, raw float32 cos, raw float32 sin, int32 seq, int32 heads, int32 dim", "T y",
        """
        const int half = dim / 2;
        const int d = i % dim, j = d % half, t = (i / ((ptrdiff_t)dim * heads)) % seq;
        const float c = cos[t * half + j], s = sin[t * half + j], a = (float)x[i];
        y = d < half ? (T)(a * c - (float)x[i + half] * s) : (T)(a * c + (float)x[i - half] * s);
        """, "quick_lab_rope")
    return silu_mul, rope


def rms_norm(x, weight, eps: float):
    import cupy

    xf = x.astype(cupy.float32)
    inv = cupy.reciprocal(cupy.sqrt(cupy.mean(xf * xf, axis=-1, keepdims=True) + eps))
    return (xf * inv).astype(cupy.float16) * weight


@functools.cache
def _launch(kind: str, M: int, K: int, N: int, G: int) -> dict:
    """Tile config and split-K per shape, resolved once: AutoAWQ's configuration for the baseline, the
    per-GPU dispatch table's kernel choice for QUICK (this model handles large M itself, so a
    dequantize + cuBLAS choice falls back to the heuristic kernel config: ``allow_fallback=False``)."""
    import cupy

    from quick_lab.core import dispatch

    choice = dispatch.choose(kind, M, K, N, G, cupy.cuda.Device().id, allow_fallback=False)
    return {"config": choice.config, "split_k": choice.split_k}


class Linear:
    """One linear layer ``y = x @ W`` held in the forms its backends need (W from one AWQWeight)."""

    def __init__(self, awq: AWQWeight, backends=BACKENDS, quick=None):
        from quick_lab.core import ops
        from quick_lab.core.interleave import interleave

        self.K, self.N = awq.K, awq.N
        self.awq = ops.to_device(awq)
        self.quick = ops.to_device(quick if quick is not None else interleave(awq)) if "quick" in backends else None
        self.fp16 = ops.dequantize(self.awq) if "fp16" in backends else None

    def __call__(self, x, backend: str):
        from quick_lab.core import ops

        if backend == "fp16" and self.fp16 is not None:
            return matmul(x, self.fp16)
        if backend in ("awq", "quick") and x.shape[0] >= FP16_FALLBACK_M:
            return matmul(x, ops.dequantize(self.awq))
        if backend == "awq":
            return ops.awq_gemm(x, self.awq, **_launch(backend, x.shape[0], self.K, self.N, self.awq.group_size))
        if backend == "quick" and self.quick is not None:
            return ops.quick_gemm(x, self.quick, **_launch(backend, x.shape[0], self.K, self.N, self.awq.group_size))
        raise ValueError(f"backend {backend!r} not available; this Linear was built for {self.backends}")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b, w in (("fp16", self.fp16), ("awq", self.awq), ("quick", self.quick)) if w is not None)


@dataclass
class _Layer:
    attn_norm: object
    qkv: Linear
    o: Linear
    mlp_norm: object
    gate_up: Linear
    down: Linear


class KVCache:
    """Preallocated K and V, ``[batch, n_kv_heads, max_seq, head_dim]`` fp16 per layer, plus RoPE tables."""

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int):
        import cupy

        shape = (batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.batch, self.max_seq = batch, max_seq
        self.k = [cupy.zeros(shape, dtype=cupy.float16) for _ in range(cfg.n_layers)]
        self.v = [cupy.zeros(shape, dtype=cupy.float16) for _ in range(cfg.n_layers)]
        self.cos, self.sin = (cupy.asarray(t) for t in rope_tables(cfg, max_seq))


class Model:
    """The decoder on the GPU. ``forward`` returns logits (or the final normed hidden without LM head)."""

    def __init__(self, weights: ModelWeights, backends=BACKENDS, lm_head: bool = True):
        import cupy

        from quick_lab.core.interleave import interleave

        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
        self.cfg, self.backends = weights.cfg, tuple(backends)
        interleaved: dict[int, object] = {}  # layers sharing host arrays are interleaved once
        if "quick" in backends:
            unique = {id(a): a for w in weights.layers for a in (w.qkv, w.o, w.gate_up, w.down)}
            with ThreadPoolExecutor(max_workers=4) as pool:  # NumPy releases the GIL; ~2x on 70B layers
                interleaved = dict(zip(unique, pool.map(interleave, unique.values())))

        def linear(awq: AWQWeight) -> Linear:
            return Linear(awq, backends, interleaved.get(id(awq)))

        self.layers = [_Layer(cupy.asarray(w.attn_norm), linear(w.qkv), linear(w.o), cupy.asarray(w.mlp_norm),
                              linear(w.gate_up), linear(w.down)) for w in weights.layers]
        self.embed = cupy.asarray(weights.embed)
        self.norm = cupy.asarray(weights.norm)
        self.lm_head = cupy.asarray(weights.lm_head) if lm_head and weights.lm_head is not None else None

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        return KVCache(self.cfg, batch, max_seq)

    def forward(self, tokens, cache: KVCache, pos: int, backend: str, last_only: bool = True):
        """``tokens`` int32 [B, T] at positions ``pos .. pos+T-1`` (the cache holds 0 .. pos-1)."""
        import cupy

        B, T = tokens.shape
        if B != cache.batch or pos + T > cache.max_seq:
            raise ValueError(f"tokens {tokens.shape} at pos {pos} do not fit the cache "
                             f"(batch {cache.batch}, max_seq {cache.max_seq})")
        eps = self.cfg.rms_eps
        silu_mul, _ = _kernels()
        h = self.embed.take(tokens.reshape(-1), axis=0)  # [B*T, hidden]
        cos, sin = cache.cos[pos:pos + T], cache.sin[pos:pos + T]
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x = rms_norm(h, layer.attn_norm, eps)
            h = h + self._attention(layer, x, k_cache, v_cache, pos, B, T, cos, sin, backend)
            gate_up = layer.gate_up(rms_norm(h, layer.mlp_norm, eps), backend)
            inter = self.cfg.intermediate
            h = h + layer.down(silu_mul(gate_up[:, :inter], gate_up[:, inter:]), backend)
        h = h.reshape(B, T, -1)
        x = rms_norm(cupy.ascontiguousarray(h[:, -1] if last_only else h), self.norm, eps)
        return self.logits(x)

    def logits(self, x):
        """LM head: ``x[..., hidden] @ lm_head`` (identity when the model has none)."""
        if self.lm_head is None:
            return x
        return matmul(x.reshape(-1, x.shape[-1]), self.lm_head).reshape(*x.shape[:-1], -1)

    def _attention(self, layer, x, k_cache, v_cache, pos, B, T, cos, sin, backend):
        import cupy

        cfg = self.cfg
        D, Hq, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        g, L = Hq // Hkv, pos + T
        _, rope = _kernels()
        qkv = layer.qkv(x, backend)
        q = cupy.empty((B, T, Hq, D), dtype=cupy.float16)
        k = cupy.empty((B, T, Hkv, D), dtype=cupy.float16)
        rope(qkv[:, : Hq * D].reshape(B, T, Hq, D), cos, sin, np.int32(T), np.int32(Hq), np.int32(D), q)
        rope(qkv[:, Hq * D:(Hq + Hkv) * D].reshape(B, T, Hkv, D), cos, sin, np.int32(T), np.int32(Hkv),
             np.int32(D), k)
        k_cache[:, :, pos:L] = k.transpose(0, 2, 1, 3)
        v_cache[:, :, pos:L] = qkv[:, (Hq + Hkv) * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)

        # The g query heads sharing a kv head are stacked as rows: [B, Hkv, g*T, D] @ [B, Hkv, D, L].
        q = q.reshape(B, T, Hkv, g, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, D)
        s = matmul(q, k_cache[:, :, :L], transpose_b=True, out_dtype=cupy.float32)
        s *= 1.0 / math.sqrt(D)
        if T > 1:  # causal: the query at pos + t sees keys 0 .. pos + t
            allowed = cupy.arange(L)[None, :] <= (pos + cupy.arange(T))[:, None]
            s = s.reshape(B, Hkv, g, T, L)
            s = cupy.where(allowed, s, -cupy.inf).reshape(B, Hkv, g * T, L)
        s -= s.max(axis=-1, keepdims=True)
        p = cupy.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = matmul(p.astype(cupy.float16), v_cache[:, :, :L])  # [B, Hkv, g*T, D]
        o = cupy.ascontiguousarray(o.reshape(B, Hkv, g, T, D).transpose(0, 3, 1, 2, 4)).reshape(B * T, Hq * D)
        return layer.o(o, backend)
