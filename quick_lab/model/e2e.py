"""End-to-end decode throughput (paper Fig. 4): a Llama-architecture decoder in CuPy, fp16.

Every linear layer runs on one of three backends over the *same* int4 weights: ``fp16`` (cuBLAS on the
dequantized weight), ``awq`` (the AutoAWQ-style kernel) or ``quick`` (the QUICK kernel on the
interleaved weight). Attention, norms and RoPE are plain CuPy, identical for all backends.

Measurement: prefill ``batch x prefill`` random tokens, then ``decode`` greedy steps of one token each
(KV cache preallocated for ``prefill + decode`` positions). Each phase runs once untimed, then
``reps`` timed runs (best reported); the LM head alone is timed the same way. By default each phase
is captured once into a CUDA graph and the graph launch is timed with CUDA events, so Python launch
overhead is not measured (vLLM, which the paper used, also replays CUDA graphs for decode);
``graph=False`` times the eager loop instead. CuPy refuses any cuBLAS call while a
stream is being captured, so the model's matmuls go through a small ctypes binding of the same cuBLAS
routine ``cupy.matmul`` uses (``cublasGemmEx``, fp16 in, fp32 accumulate); cuBLAS itself supports capture.

Depth: 70B fp16 weights do not fit on one GPU, so a run may build fewer layers than the model has
(``n_layers``). ``tokens_per_s`` is what was measured for the layers built. The per-layer work is
identical in every layer, so ``full_depth_tokens_per_s_estimate`` scales the measured per-layer time
to the full depth: ``(decode - lm_head) * full_layers / layers + lm_head``. It is an estimate and is
labeled as one.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from quick_lab.argtypes import choice_list, int_list
from quick_lab.core.format import AWQWeight, dequantize_fp16, random_awq

BACKENDS = ("fp16", "awq", "quick")
GROUP_SIZE = 128
# AutoAWQ's WQLinear_GEMM switches to dequantize + fp16 matmul when batch*seq >= 1024; both quantized
# backends do the same here, so only prefill of large batches is affected (decode M = batch <= 256).
FP16_FALLBACK_M = 1024
# rms of (q - z) for q, z independent uniform on 0..15: sqrt(2 * (16**2 - 1) / 12)
_RMS_Q_MINUS_Z = math.sqrt(2 * 255 / 12)


# ---------------------------------------------------------------- configuration (no GPU needed)


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab: int = 32000
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: hidden must divide into n_heads and n_heads into n_kv_heads, got "
                             f"hidden={self.hidden}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")
        if self.n_layers < 1:
            raise ValueError(f"{self.name}: n_layers must be >= 1, got {self.n_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(K, N) of the four linears of a layer; q|k|v and gate|up are fused along N."""
        D = self.head_dim
        return {"qkv": (self.hidden, (self.n_heads + 2 * self.n_kv_heads) * D),
                "o": (self.n_heads * D, self.hidden),
                "gate_up": (self.hidden, 2 * self.intermediate),
                "down": (self.intermediate, self.hidden)}

    def params_per_layer(self) -> int:
        return sum(K * N for K, N in self.linear_shapes().values())


# From the models' Hugging Face config.json files.
MISTRAL_7B = ModelConfig(4096, 14336, 32, 8, 32, 32000, 1e6, 1e-5, "mistral-7b")
LLAMA2_13B = ModelConfig(5120, 13824, 40, 40, 40, 32000, 1e4, 1e-5, "llama2-13b")
LLAMA2_70B = ModelConfig(8192, 28672, 64, 8, 80, 32000, 1e4, 1e-5, "llama2-70b")
PRESETS = {c.name: c for c in (MISTRAL_7B, LLAMA2_13B, LLAMA2_70B)}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; have {', '.join(PRESETS)}") from None


def _int4_bytes(K: int, N: int, G: int) -> int:
    return K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2


def memory_estimate(cfg: ModelConfig, batch: int = 1, max_seq: int = 256, backends=BACKENDS,
                    group_size: int = GROUP_SIZE, lm_head: bool = True) -> dict[str, int]:
    """GPU bytes a :class:`Model` holds (weights for the requested backends, KV cache, embedding,
    LM head); activations and workspaces come on top."""
    shapes = cfg.linear_shapes().values()
    int4 = sum(_int4_bytes(K, N, group_size) for K, N in shapes)
    per_layer = int4 * (1 + ("quick" in backends)) + (2 * cfg.params_per_layer() if "fp16" in backends else 0)
    est = {"weights": per_layer * cfg.n_layers,
           "kv_cache": 2 * batch * cfg.n_kv_heads * max_seq * cfg.head_dim * 2 * cfg.n_layers,
           "embed_head": cfg.vocab * cfg.hidden * 2 * (1 + lm_head)}
    est["total"] = sum(est.values())
    return est


# ---------------------------------------------------------------- host weights (NumPy)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # fp16 [hidden]
    qkv: AWQWeight         # [hidden, (n_heads + 2 n_kv_heads) head_dim], columns q | k | v
    o: AWQWeight
    mlp_norm: np.ndarray
    gate_up: AWQWeight     # [hidden, 2 intermediate], columns gate | up
    down: AWQWeight


@dataclass
class ModelWeights:
    cfg: ModelConfig
    embed: np.ndarray            # fp16 [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray             # fp16 [hidden]
    lm_head: np.ndarray | None   # fp16 [hidden, vocab] (x @ lm_head), None when absent


def random_quantized_linear(K: int, N: int, seed: int = 0, group_size: int = GROUP_SIZE,
                            std: float = 0.02) -> AWQWeight:
    """Random AutoAWQ weight (uniform nibbles and zeros in 0..15) whose dequantized values have rms
    ~ ``std``, like a trained linear; far faster than quantizing a random fp16 matrix."""
    awq = random_awq(K, N, group_size, seed)
    rng = np.random.default_rng([seed, 1])
    scales = rng.uniform(0.5, 1.5, size=awq.scales.shape) * (std / _RMS_Q_MINUS_Z)
    return dataclasses.replace(awq, scales=scales.astype(np.float16))


def _random_fp16(rng, shape, scale: float) -> np.ndarray:
    """Random sign, magnitude uniform in [scale, 2 scale) (scale a power of two), made from random bits:
    several times faster than normal samples for a 70B-size embedding."""
    n = math.prod(shape)
    bits = rng.integers(0, 1 << 32, size=(n + 1) // 2, dtype=np.uint32).view(np.uint16)[:n].reshape(shape)
    bits &= np.uint16(0x83FF)  # keep the sign and mantissa bits, then set the exponent of `scale`
    bits |= np.float16(scale).view(np.uint16)
    return bits.view(np.float16)


def random_weights(cfg: ModelConfig, seed: int = 0, group_size: int = GROUP_SIZE,
                   distinct_layers: bool = True) -> ModelWeights:
    """Random weights for ``cfg``. ``distinct_layers=False`` makes every layer the same host arrays
    (the model still copies them to separate GPU memory, so nothing is shared in L2): generating and
    interleaving a 70B layer takes ~20 s of CPU, and throughput does not depend on the values."""
    rng = np.random.default_rng([seed, 0])
    shapes = cfg.linear_shapes()

    def norm_weight() -> np.ndarray:
        return rng.uniform(0.8, 1.2, cfg.hidden).astype(np.float16)

    def layer(i: int) -> LayerWeights:
        lin = {name: random_quantized_linear(K, N, seed=seed * 100003 + 4 * i + j, group_size=group_size)
               for j, (name, (K, N)) in enumerate(shapes.items())}
        return LayerWeights(norm_weight(), lin["qkv"], lin["o"], norm_weight(), lin["gate_up"], lin["down"])

    if distinct_layers:
        layers = [layer(i) for i in range(cfg.n_layers)]
    else:
        layers = [layer(0)] * cfg.n_layers
    embed = _random_fp16(rng, (cfg.vocab, cfg.hidden), 1.0)
    lm_head = _random_fp16(rng, (cfg.hidden, cfg.vocab), 2.0 ** -6)
    return ModelWeights(cfg, embed, layers, norm_weight(), lm_head)


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
        gate, up = np.split(linear(norm(h, layer.mlp_norm), layer.gate_up), 2, axis=-1)
        h = h + linear(gate / (1 + np.exp(-gate)) * up, layer.down)
        if stats is not None:
            stats["max_abs_residual"] = max(stats.get("max_abs_residual", 0.0), float(np.abs(h).max()))
    x = norm(h, weights.norm)
    return x @ weights.lm_head.astype(np.float32) if lm_head else x


# ---------------------------------------------------------------- cuBLAS through ctypes

_CUDA_R_16F, _CUDA_R_32F, _COMPUTE_32F, _GEMM_DEFAULT = 2, 0, 68, -1
_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 << 20  # cuBLAS's own default on Hopper; a user workspace keeps capture allocation-free


def _cublas_library() -> ctypes.CDLL:
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load libcublas; use that very file
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("cannot find libcublas")


class _Cublas:
    """One cuBLAS handle with a fixed workspace, bound to the current CuPy stream at each call."""

    def __init__(self):
        import cupy

        self.lib = lib = _cublas_library()
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll,
                                                   i, i, i]
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.cuda.memory.Memory(_WORKSPACE_BYTES)  # outside any (graph-private) pool
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.stream = None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _bind(self) -> None:
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        if ptr != self.stream:  # setting the stream resets the workspace, so set both
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(ptr)), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.ptr),
                                                       ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
            self.stream = ptr

    def gemm(self, op_b, m, n, k, b, ldb, stride_b, a, lda, stride_a, c, c_type, stride_c, batch):
        """Row-major ``C[m, n] = A[m, k] @ B`` (B stored [k, n], or [n, k] with op_b = T), as the
        column-major ``C^T = B^T A^T`` cuBLAS computes."""
        self._bind()
        one, zero = ctypes.addressof(self.one), ctypes.addressof(self.zero)
        if batch == 1:
            status = self.lib.cublasGemmEx(self.handle, op_b, _OP_N, n, m, k, one, b, _CUDA_R_16F, ldb, a,
                                           _CUDA_R_16F, lda, zero, c, c_type, n, _COMPUTE_32F, _GEMM_DEFAULT)
        else:
            status = self.lib.cublasGemmStridedBatchedEx(
                self.handle, op_b, _OP_N, n, m, k, one, b, _CUDA_R_16F, ldb, stride_b, a, _CUDA_R_16F, lda,
                stride_a, zero, c, c_type, n, stride_c, batch, _COMPUTE_32F, _GEMM_DEFAULT)
        self._check(status, "cublasGemmEx")


@functools.cache
def _cublas(device_id: int) -> _Cublas:
    return _Cublas()


def _matrices(x):
    """(pointer, leading dimension, batch stride, batch count, array) for the matrices ``x[..., r, c]``:
    read in place when columns are unit-stride and the batch dimensions merge into one stride, else
    from a contiguous copy (the returned array, to be kept alive until the call)."""
    import cupy

    item = x.itemsize
    *batch, rows, cols = x.shape
    count = math.prod(batch)
    dims = [(n, st // item) for n, st in zip(x.shape[:-2], x.strides[:-2]) if n > 1]
    mergeable = all(dims[j][1] == dims[j + 1][1] * dims[j + 1][0] for j in range(len(dims) - 1))
    if x.strides[-1] != item or (rows > 1 and x.strides[-2] < cols * item) or not mergeable:
        x = cupy.ascontiguousarray(x)
        return _matrices(x)
    ld = x.strides[-2] // item if rows > 1 else cols
    return x.data.ptr, ld, dims[-1][1] if dims else rows * ld, count, x


def matmul(a, b, transpose_b: bool = False, out_dtype=np.float16):
    """``a @ b`` (``a @ b^T`` with ``transpose_b``) on fp16 operands with fp32 accumulation, through
    cuBLAS, capturable in a CUDA graph. Shapes ``[..., m, k]`` and ``[..., k, n]`` (or ``[..., n, k]``)
    with equal batch dimensions; strided views such as KV-cache slices are read in place."""
    import cupy

    m, k = a.shape[-2:]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    if a.shape[:-2] != b.shape[:-2] or (b.shape[-1] if transpose_b else b.shape[-2]) != k:
        raise ValueError(f"matmul shapes do not match: {a.shape} @ {b.shape} (transpose_b={transpose_b})")
    if a.dtype != np.float16 or b.dtype != np.float16:
        raise TypeError(f"matmul takes fp16 operands, got {a.dtype} and {b.dtype}")
    c = cupy.empty((*a.shape[:-2], m, n), dtype=out_dtype)
    if c.size == 0:
        return c
    a_ptr, lda, stride_a, batch, a = _matrices(a)
    b_ptr, ldb, stride_b, _, b = _matrices(b)
    c_type = _CUDA_R_16F if c.dtype == np.float16 else _CUDA_R_32F
    _cublas(cupy.cuda.Device().id).gemm(_OP_T if transpose_b else _OP_N, m, n, k, b_ptr, ldb, stride_b,
                                        a_ptr, lda, stride_a, c.data.ptr, c_type, m * n, batch)
    return c


# ---------------------------------------------------------------- GPU model (CuPy)


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
    dequantize + cuBLAS choice falls back to the heuristic kernel config)."""
    import cupy

    from quick_lab.core import ops

    if kind == "quick":
        kernel, cfg, split = ops.quick_choice(M, K, N, G, cupy.cuda.Device().id)
        if kernel == "quick":
            return {"config": cfg, "split_k": split}
    cfg = ops.default_config(kind, M, N, G)
    return {"config": cfg, "split_k": ops.default_split_k(kind, cfg, M, K, N)}


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


def greedy(logits):
    """Next token ids int32 [B, 1] from logits [B, vocab], on the GPU (no host sync)."""
    import cupy

    return cupy.argmax(logits, axis=-1).astype(cupy.int32).reshape(-1, 1)


def decode(model: Model, cache: KVCache, tokens, pos: int, steps: int, backend: str):
    """``steps`` greedy decode steps from ``tokens`` [B, 1] at ``pos``; without an LM head the same
    tokens are fed every step. Returns the last tokens."""
    for i in range(steps):
        out = model.forward(tokens, cache, pos + i, backend)
        if model.lm_head is not None:
            tokens = greedy(out)
    return tokens


# ---------------------------------------------------------------- measurement


def capture(fn, stream):
    """Run ``fn()`` once under CUDA-graph capture on ``stream``: returns ``(graph, fn's result)``.
    Warm ``fn`` up first (kernel compilation and module loads are not captured)."""
    with stream:
        stream.begin_capture()
        try:
            result = fn()
        finally:
            graph = stream.end_capture()
    graph.upload(stream)
    return graph, result


def _time_ms(run, warm, stream, graph: bool, reps: int) -> float:
    """Best of ``reps`` CUDA-event times of ``run()`` (captured into a CUDA graph when ``graph``)."""
    import cupy

    pool = cupy.cuda.MemoryPool()  # graph-private: nothing else can get the graph's scratch memory
    g = None
    try:
        with cupy.cuda.using_allocator(pool.malloc), stream:
            warm()  # compiles kernels and fills the pool
            if graph:
                g, _ = capture(run, stream)
                launch = functools.partial(g.launch, stream)
            else:
                launch = run
            launch()
            times = []
            for _ in range(reps):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(stream)
                launch()
                end.record(stream)
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end))
        return min(times)
    finally:
        del g
        stream.synchronize()
        pool.free_all_blocks()


def decode_throughput(cfg: ModelConfig, batch: int, backend: str, prefill: int = 128, decode_steps: int = 128,
                      n_layers: int | None = None, *, model: Model | None = None, graph: bool = True,
                      reps: int = 1, seed: int = 0) -> dict:
    """Prefill ``batch x prefill`` random tokens, then ``decode_steps`` greedy steps; times both.

    ``cfg`` is the full model; ``n_layers`` (default: all) is how many layers to build, or pass a
    prebuilt ``model`` (its depth is then used). Returns one result row (a dict).
    """
    import cupy

    if model is None:
        run_cfg = dataclasses.replace(cfg, n_layers=n_layers or cfg.n_layers)
        model = Model(random_weights(run_cfg, seed=seed, distinct_layers=False), backends=(backend,))
    layers = len(model.layers)
    rng = np.random.default_rng(seed)
    prompt = cupy.asarray(rng.integers(0, cfg.vocab, size=(batch, prefill), dtype=np.int32))
    cache = model.new_cache(batch, prefill + decode_steps)
    stream = cupy.cuda.Stream(non_blocking=True)

    def run_prefill():
        return model.forward(prompt, cache, 0, backend)

    prefill_ms = _time_ms(run_prefill, run_prefill, stream, graph, reps)
    first = prompt[:, -1:].copy()  # the cache now holds the prompt; decode starts from any token
    decode_ms = _time_ms(lambda: decode(model, cache, first, prefill, decode_steps, backend),
                         lambda: decode(model, cache, first, prefill, 1, backend), stream, graph, reps)

    head_ms = 0.0
    if model.lm_head is not None:
        x = cupy.ones((batch, cfg.hidden), dtype=cupy.float16)
        head_ms = _time_ms(lambda: [greedy(model.logits(x)) for _ in range(decode_steps)],
                           lambda: greedy(model.logits(x)), stream, graph, reps)
    stream.synchronize()
    tokens = batch * decode_steps
    full_ms = max(decode_ms - head_ms, 0.0) * cfg.n_layers / layers + head_ms
    return dict(model=cfg.name, layers=layers, full_layers=cfg.n_layers, batch=batch, backend=backend,
                prefill=prefill, decode=decode_steps, cuda_graph=graph, lm_head=model.lm_head is not None,
                prefill_ms=prefill_ms, decode_ms=decode_ms, lm_head_ms=head_ms,
                tokens_per_s=tokens / (decode_ms * 1e-3),
                full_depth_tokens_per_s_estimate=tokens / (full_ms * 1e-3))


def e2e_sweep(models=tuple(PRESETS), batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), backends=BACKENDS,
              n_layers: int | None = 4, prefill: int = 128, decode_steps: int = 128, graph: bool = True,
              lm_head: bool = True, reps: int = 1, progress=None):
    """One row per (model, batch, backend); each model is built once (all backends on the same weights).
    A case that runs out of GPU memory gets NaN timings and an ``error``."""
    import cupy
    import pandas as pd

    rows = []
    total = len(models) * len(batches) * len(backends)
    for name in models:
        cfg = preset(name) if isinstance(name, str) else name
        run_cfg = dataclasses.replace(cfg, n_layers=min(n_layers or cfg.n_layers, cfg.n_layers))
        model = Model(random_weights(run_cfg, distinct_layers=False), backends=backends, lm_head=lm_head)
        for batch in batches:
            for backend in backends:
                if progress:
                    progress(len(rows), total, f"{cfg.name} M={batch} {backend}")
                try:
                    rows.append(decode_throughput(cfg, batch, backend, prefill, decode_steps, model=model,
                                                  graph=graph, reps=reps))
                except cupy.cuda.memory.OutOfMemoryError as exc:
                    rows.append(dict(model=cfg.name, layers=run_cfg.n_layers, full_layers=cfg.n_layers,
                                     batch=batch, backend=backend, prefill=prefill, decode=decode_steps,
                                     error=" ".join(str(exc).split())))
                cupy.get_default_memory_pool().free_all_blocks()
        del model
        cupy.get_default_memory_pool().free_all_blocks()
    if progress:
        progress(total, total, "done")
    return pd.DataFrame(rows)


def summary_table(df):
    """tokens/s per (model, layers, batch) x backend, with the QUICK / AWQ ratio."""
    table = df.pivot_table(index=["model", "layers", "batch"], columns="backend", values="tokens_per_s")
    if {"awq", "quick"} <= set(table.columns):
        table["quick/awq"] = table["quick"] / table["awq"]
    if {"fp16", "quick"} <= set(table.columns):
        table["quick/fp16"] = table["quick"] / table["fp16"]
    return table


# ---------------------------------------------------------------- command line


_models = choice_list(PRESETS, "model")
_backends = choice_list(BACKENDS, "backend")


def cmd_e2e(args) -> int:
    from quick_lab.build.device import cuda_device_status

    ok, reason = cuda_device_status()
    if not ok:
        print(f"quick-lab: e2e measures on a GPU and none is usable: {reason}", file=sys.stderr)
        return 2
    from quick_lab.lab.metadata import results_dir, write_metadata

    out_dir = results_dir(args.out)

    def progress(done, total, label):
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    df = e2e_sweep(args.models, args.batches, args.backends, n_layers=args.layers, prefill=args.prefill,
                   decode_steps=args.decode, graph=not args.no_graph, lm_head=not args.no_lm_head,
                   reps=args.reps, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "e2e.csv", index=False)
    write_metadata(out_dir / "e2e.meta.json", command=" ".join(sys.argv[1:]), layers=args.layers,
                   prefill=args.prefill, decode=args.decode, cuda_graph=not args.no_graph,
                   lm_head=not args.no_lm_head, reps=args.reps, weights="random int4, group size 128",
                   note="tokens_per_s is measured for `layers` layers; full_depth_tokens_per_s_estimate "
                        "scales the per-layer time to `full_layers` (an estimate, not a measurement)")
    if "tokens_per_s" in df:
        print(summary_table(df).round(2).to_string())
    if "error" in df and df["error"].notna().any():
        print(f"{int(df['error'].notna().sum())} case(s) failed (see the error column)", file=sys.stderr)
    print(f"wrote {out_dir / 'e2e.csv'}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``quick-lab e2e``."""
    p = subparsers.add_parser("e2e", help="end-to-end decode throughput vs batch: fp16, AWQ, QUICK")
    p.add_argument("--models", type=_models, default=tuple(PRESETS), help="comma-separated, from " + ",".join(PRESETS))
    p.add_argument("--batches", type=int_list, default=(1, 2, 4, 8, 16, 32, 64, 128, 256), help="e.g. 1,16,256")
    p.add_argument("--backends", type=_backends, default=BACKENDS, help="comma-separated, from fp16,awq,quick")
    p.add_argument("--layers", type=int, default=4,
                   help="decoder layers built per model (default 4; full-depth tokens/s is then estimated)")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--reps", type=int, default=1,
                   help="timed runs per phase after one untimed run (best reported)")
    p.add_argument("--no-graph", action="store_true", help="time the eager loop instead of a CUDA graph replay")
    p.add_argument("--no-lm-head", action="store_true", help="skip the fp16 LM head (tokens fed, not sampled)")
    p.add_argument("--out", help="results directory (default results/<gpu>/)")
    p.set_defaults(func=cmd_e2e)
    return p
