"""The Llama-architecture decoder on the GPU (CuPy, fp16): :class:`Linear`, :class:`KVCache`,
:class:`Model`. Model code only; decoding is in :mod:`quick_lab.model.generate`, timing in
:mod:`quick_lab.model.sweep`, the fused non-GEMM kernels in :mod:`quick_lab.model.fused`.

Every linear layer runs on one of three backends over the *same* int4 weights: ``fp16`` (cuBLAS on the
dequantized weight), ``awq`` (the AutoAWQ-style kernel) or ``quick`` (the QUICK kernel on the
interleaved weight); a Linear holds only the forms its backends need. Everything else is fused and
identical for all backends: per layer, residual add + RMSNorm, the qkv GEMM, RoPE writing k and v
into the cache, attention over the cache (one launch; in a decode step RoPE and the cache write are
inside it too), the o GEMM, add + RMSNorm, the gate_up GEMM, SiLU x up (inside the gate_up GEMM's
writer where that is the QUICK decode kernel: the weight's columns come in (gate, up) pairs of 32), the
down GEMM (whose output the next layer's norm adds to the residual): a QUICK decode step is 4 GEMMs and
3 other launches a layer. In a decode step the QUICK decode kernel leaves the qkv, o and down outputs as
fp32 split-K slices (:data:`DECODE_EPILOGUES`), which the attention and the norms sum as they read them:
no split-K fix-up at the end of those GEMMs. On
compute capability 9.0 those launches are programmatic dependents (:mod:`quick_lab.build.launch`): each
op's blocks are placed while the op before still runs, load what no earlier op writes (the GEMM's first
weights, the attention's past KV range) and then wait for its output. A layer is a
list of named ops (:meth:`Model.layer_ops`), which ``forward`` runs under NVTX ranges and
:mod:`quick_lab.model.breakdown` times one class at a time. Matmuls go through
:func:`quick_lab.model.cublas.matmul` and no op allocates outside CuPy's pool, so a forward can be
captured in a CUDA graph.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from quick_lab.build.launch import dependent_launches
from quick_lab.core.format import AWQWeight
from quick_lab.model import fused
from quick_lab.model.config import BACKENDS, ModelConfig
from quick_lab.model.cublas import matmul
from quick_lab.model.reference import rope_tables
from quick_lab.model.weights import ModelWeights

__all__ = ["DECODE_EPILOGUES", "FP16_FALLBACK_M", "GEMM_OPS", "MAX_ATTENTION_SPLITS", "KVCache", "Linear", "Model",
           "StepState", "writes_with"]

# AutoAWQ's WQLinear_GEMM switches to dequantize + fp16 matmul when batch*seq >= 1024; both quantized
# backends do the same here, so only prefill of large batches is affected (decode M = batch <= 256).
FP16_FALLBACK_M = 1024
# Most key-range splits one decode attention launch may use (sizes the cache's workspace).
MAX_ATTENTION_SPLITS = 32
# The op classes of a layer that are GEMMs (the rest is "everything else" in the breakdown).
GEMM_OPS = ("qkv", "o", "gate_up", "down")
# What each GEMM's writer stores in a decode step (one token a sequence) where its kernel has that
# epilogue (quick_lab.core.registry.EPILOGUES): the MLP activation from gate_up, and for the GEMMs whose
# reader sums split-K slices itself (the attention after qkv, the norms after o and down) the slices,
# so those GEMMs end without the fix-up block's fence, ticket and reload (results/NOTES.md entry 28).
DECODE_EPILOGUES = {"qkv": "partials", "o": "partials", "gate_up": "silu_mul", "down": "partials"}


def writes_with(kind: str, epilogue: str, config, split_k: int) -> bool:
    """Whether a launch of ``config`` at ``split_k`` writes with ``epilogue``: its kernel family has that
    writer, and "partials" leaves no more slices than the decoder's readers sum (fused.MAX_PARTIALS)."""
    from quick_lab.core import ops

    return (ops.applies_epilogue(kind, config, epilogue)
            and (epilogue != "partials" or split_k <= fused.MAX_PARTIALS))


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
    """One linear layer ``y = x @ W`` held in the forms its backends need, and only those (W from one
    AWQWeight): ``awq`` the AutoAWQ words, ``quick`` the interleaved words (interleaved on the GPU),
    ``fp16`` the dequantized matrix."""

    def __init__(self, awq: AWQWeight, backends=BACKENDS):
        from quick_lab.core import ops

        self.K, self.N, self.group_size = awq.K, awq.N, awq.group_size
        # batch -> {"config", "split_k"} for the quick backend, pinned by an in-graph tuning
        # (quick_lab.model.decode_tuning); a batch not in it follows the dispatch table.
        self.decode_launch: dict[int, dict] = {}
        on_device = ops.to_device(awq)
        self.quick = ops.interleave_gpu(on_device) if "quick" in backends else None
        self.fp16 = ops.dequantize(on_device) if "fp16" in backends else None
        self.awq = on_device if "awq" in backends else None

    def applies(self, epilogue: str, M: int, backend: str) -> bool:
        """Whether ``self(x, backend, epilogue=epilogue)`` runs for ``M`` rows: the QUICK kernel chosen
        (the decode GEMM) has that writer; for "partials" also at a split the readers take
        (:data:`quick_lab.model.fused.MAX_PARTIALS`)."""
        if not (backend == "quick" and self.quick is not None and 0 < M < FP16_FALLBACK_M):
            return False
        return writes_with("quick", epilogue, **self.quick_launch(M))

    def quick_launch(self, M: int) -> dict:
        """The quick backend's config and split-K for ``M`` rows: the tuned pin, else the dispatch's."""
        return self.decode_launch.get(M) or _launch("quick", M, self.K, self.N, self.group_size)

    def __call__(self, x, backend: str, epilogue: str = "store"):
        """``x @ W`` on ``backend``; where :meth:`applies` it, ``epilogue="silu_mul"`` returns
        ``silu(gate) * up`` [M, N / 2] of a paired gate_up weight and ``epilogue="partials"`` the fp32
        split-K slices [split, M, N] of y instead."""
        from quick_lab.core import ops

        M, G = x.shape[0], self.group_size
        if epilogue != "store":
            if not self.applies(epilogue, M, backend):
                raise ValueError(f"epilogue {epilogue!r} runs only in the QUICK decode GEMM; not on backend "
                                 f"{backend!r} at M = {M}")
            return ops.quick_gemm(x, self.quick, epilogue=epilogue, **self.quick_launch(M))
        if backend == "fp16" and self.fp16 is not None:
            return matmul(x, self.fp16)
        if backend == "awq" and self.awq is not None:
            if M >= FP16_FALLBACK_M:
                return matmul(x, ops.dequantize(self.awq))
            return ops.awq_gemm(x, self.awq, **_launch(backend, M, self.K, self.N, G))
        if backend == "quick" and self.quick is not None:
            if M >= FP16_FALLBACK_M:
                return matmul(x, ops.dequantize_quick_t(self.quick), transpose_b=True)
            return ops.quick_gemm(x, self.quick, **self.quick_launch(M))
        raise ValueError(f"backend {backend!r} not available; this Linear was built for {self.backends}")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b, w in (("fp16", self.fp16), ("awq", self.awq), ("quick", self.quick)) if w is not None)

    def nbytes(self) -> int:
        """GPU bytes of the weights held."""
        forms = [self.fp16] + [w for w in (self.awq, self.quick) if w is not None]
        return sum(a.nbytes for w in forms if w is not None
                   for a in ((w,) if not hasattr(w, "qweight") else (w.qweight, w.qzeros, w.scales)))


@dataclass
class _Layer:
    attn_norm: object
    qkv: Linear
    o: Linear
    mlp_norm: object
    gate_up: Linear
    down: Linear


class KVCache:
    """Preallocated K and V, ``[batch, n_kv_heads, max_seq, head_dim]`` fp16 per layer, the RoPE tables
    and the decode attention's split workspace."""

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int):
        import cupy

        if batch < 1 or max_seq < 1:
            raise ValueError(f"batch and max_seq must be >= 1, got batch={batch}, max_seq={max_seq}")
        shape = (batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.batch, self.max_seq = batch, max_seq
        self.k = [cupy.zeros(shape, dtype=cupy.float16) for _ in range(cfg.n_layers)]
        self.v = [cupy.zeros(shape, dtype=cupy.float16) for _ in range(cfg.n_layers)]
        self.cos, self.sin = (cupy.asarray(t) for t in rope_tables(cfg, max_seq))
        group = cfg.n_heads // cfg.n_kv_heads
        self.workspace = fused.AttentionWorkspace(batch * cfg.n_kv_heads, MAX_ATTENTION_SPLITS, group, cfg.head_dim)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))


class StepState:
    """The activations one forward passes between ops: ``h`` the residual stream [rows, hidden] and
    ``delta`` the branch output the next norm adds to it; the rest are each op's output."""

    def __init__(self, h, pos: int, T: int):
        self.h, self.delta, self.pos, self.T = h, None, pos, T
        self.x = self.qkv = self.q = self.attn = self.gate_up = self.act = None


class Model:
    """The decoder on the GPU. ``forward`` returns logits (or the final normed hidden without LM head)."""

    def __init__(self, weights: ModelWeights, backends=BACKENDS, lm_head: bool = True,
                 dependent_launch: bool = True):
        import cupy

        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
        if not isinstance(dependent_launch, bool):
            raise TypeError(f"dependent_launch must be a bool, got {type(dependent_launch).__name__}")
        # Launch the fused ops and the decode GEMMs as programmatic dependents (quick_lab.build.launch):
        # each one's blocks are placed while the op before runs and load what no earlier op writes (the
        # GEMM's first weights, the past KV cache) before they wait for its output. Compute capability 9.0+.
        self.dependent_launch = dependent_launch
        self.cfg, self.backends = weights.cfg, tuple(backends)
        # Layers built from the same host arrays (random_weights(distinct_layers=False)) still get
        # separate GPU copies, so no layer's weights are found in L2 from the previous layer.
        self.layers = [_Layer(cupy.asarray(w.attn_norm), Linear(w.qkv, backends), Linear(w.o, backends),
                              cupy.asarray(w.mlp_norm), Linear(w.gate_up, backends), Linear(w.down, backends))
                       for w in weights.layers]
        self.embed = cupy.asarray(weights.embed)
        self.norm = cupy.asarray(weights.norm)
        self.lm_head = cupy.asarray(weights.lm_head) if lm_head and weights.lm_head is not None else None

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        return KVCache(self.cfg, batch, max_seq)

    def weight_bytes(self) -> int:
        """GPU bytes of the linear layers' weights (every form held)."""
        return sum(lin.nbytes() for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def layer_ops(self, index: int, cache: KVCache, st: StepState, backend: str) -> list:
        """Layer ``index`` as ``(op class, fn)`` pairs; each ``fn()`` reads and writes ``st``."""
        cfg, layer = self.cfg, self.layers[index]
        k_cache, v_cache = cache.k[index], cache.v[index]
        eps, Hq, Hkv = cfg.rms_eps, cfg.n_heads, cfg.n_kv_heads
        ep = {name: self.decode_epilogue(layer, name, st, backend) for name in GEMM_OPS}

        def attn_norm():
            st.x = fused.add_rms_norm(st.h, layer.attn_norm, eps, delta=st.delta)

        def qkv():
            st.qkv = layer.qkv(st.x, backend, epilogue=ep["qkv"])

        def rope():
            st.q = fused.rope_kv(st.qkv, cache.cos, cache.sin, k_cache, v_cache, Hq, Hkv, st.pos, st.T)

        def attention():
            st.attn = fused.attention(st.q, k_cache, v_cache, Hq, st.pos, st.T, cache.workspace)

        def o():
            st.delta = layer.o(st.attn, backend, epilogue=ep["o"])

        def mlp_norm():
            st.x = fused.add_rms_norm(st.h, layer.mlp_norm, eps, delta=st.delta)

        def gate_up():
            st.gate_up = layer.gate_up(st.x, backend)

        def act():
            st.act = fused.silu_mul(st.gate_up)

        def gate_up_act():  # the decode GEMM's writer applies SiLU x up: one launch less
            st.act = layer.gate_up(st.x, backend, epilogue="silu_mul")

        def down():
            st.delta = layer.down(st.act, backend, epilogue=ep["down"])

        def rope_attention():  # decode: RoPE and the KV write inside the attention launch
            st.attn = fused.rope_attention(st.qkv, cache.cos, cache.sin, k_cache, v_cache, Hq, st.pos,
                                           cache.workspace)

        attn_ops = [("attention", rope_attention)] if st.T == 1 else [("rope_kv", rope), ("attention", attention)]
        mlp_ops = [("gate_up", gate_up_act)] if ep["gate_up"] == "silu_mul" else [("gate_up", gate_up), ("silu_mul", act)]
        ops = [("norm", attn_norm), ("qkv", qkv), *attn_ops, ("o", o), ("norm", mlp_norm), *mlp_ops, ("down", down)]
        return [(name, self._launched(fn)) for name, fn in ops]

    @staticmethod
    def decode_epilogue(layer, name: str, st: "StepState", backend: str) -> str:
        """The writer epilogue GEMM ``name`` of ``layer`` runs with for this step: SiLU x up in gate_up
        wherever its kernel has it, the split-K slices of qkv, o and down in a decode step (one token a
        sequence: the reader of qkv is then the decode attention) where theirs has it, else "store"."""
        epilogue = DECODE_EPILOGUES[name]
        if epilogue == "partials" and st.T != 1:
            return "store"
        return epilogue if getattr(layer, name).applies(epilogue, st.h.shape[0], backend) else "store"

    def _launched(self, fn):
        """``fn`` run with this model's launch mode."""
        def run():
            with dependent_launches(self.dependent_launch):
                fn()
        return run

    def start(self, tokens, cache: KVCache, pos: int) -> StepState:
        """Check ``tokens`` int32 [B, T] at ``pos`` against the cache and embed them."""
        B, T = tokens.shape
        if B != cache.batch or pos < 0 or pos + T > cache.max_seq:
            raise ValueError(f"tokens {tokens.shape} at pos {pos} do not fit the cache "
                             f"(batch {cache.batch}, max_seq {cache.max_seq})")
        return StepState(self.embed.take(tokens.reshape(-1), axis=0), pos, T)  # [B*T, hidden]

    def forward(self, tokens, cache: KVCache, pos: int, backend: str, last_only: bool = True):
        """``tokens`` int32 [B, T] at positions ``pos .. pos+T-1`` (the cache holds 0 .. pos-1)."""
        from cupy.cuda import nvtx

        st = self.start(tokens, cache, pos)
        for index in range(len(self.layers)):
            for name, op in self.layer_ops(index, cache, st, backend):
                nvtx.RangePush(name)
                op()
                nvtx.RangePop()
        return self.logits(self.final_norm(st, last_only))

    def final_norm(self, st: StepState, last_only: bool = True):
        """The last residual add and the final RMSNorm: [B, hidden] (last token) or [B, T, hidden]."""
        import cupy

        B = st.h.shape[0] // st.T
        h, delta = st.h, st.delta
        if last_only and st.T > 1:
            h = cupy.ascontiguousarray(h.reshape(B, st.T, -1)[:, -1])
            delta = None if delta is None else cupy.ascontiguousarray(delta.reshape(B, st.T, -1)[:, -1])
        x = fused.add_rms_norm(h, self.norm, self.cfg.rms_eps, delta=delta)
        return x if last_only else x.reshape(B, st.T, -1)

    def logits(self, x):
        """LM head: ``x[..., hidden] @ lm_head`` (identity when the model has none)."""
        if self.lm_head is None:
            return x
        return matmul(x.reshape(-1, x.shape[-1]), self.lm_head).reshape(*x.shape[:-1], -1)
