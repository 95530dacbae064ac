"""Per-op time of one decode step (``quick-lab e2e --breakdown``): µs per op class per layer.

Method. A cache of ``context`` positions is filled with random K/V (attention time depends on the
length read, not the values) and one decode step's state is set up by running every layer once.
Then, for each op class of :meth:`quick_lab.model.decoder.Model.layer_ops` (norm, qkv, rope_kv,
attention, o, gate_up, silu_mul, down), the ops of that class in *every* layer run back to back in
one CUDA graph: each layer has its own weights and cache, so nothing is served from L2 that a real
step would read from DRAM. The graph launch is timed with CUDA events (median of ``reps``) and
divided by the number of layers. ``layer`` is the whole step (every op of every layer, one graph)
per layer; ``gemm`` the sum of the four GEMM classes; ``other`` = ``layer`` - ``gemm``, the non-GEMM
cost as it shows in the step (launch gaps included), which the per-class rows itemise. In a decode
step RoPE and the KV-cache write run inside the attention launch, so ``rope_kv`` is 0 there; on the
QUICK backend SiLU x up runs in the decode GEMM's writer, so ``silu_mul`` is 0 and ``gate_up`` holds it,
and the qkv, o and down GEMMs leave split-K slices (:data:`quick_lab.model.decoder.DECODE_EPILOGUES`):
their sum is in the ``attention`` and ``norm`` rows, not in theirs.
"""
from __future__ import annotations

from quick_lab.model.decoder import GEMM_OPS, Model
from quick_lab.model.graph_timing import graph_time_us

__all__ = ["OP_CLASSES", "breakdown"]

OP_CLASSES = ("norm", "qkv", "rope_kv", "attention", "o", "gate_up", "silu_mul", "down")


def breakdown(model: Model, batch: int, context: int, backend: str, reps: int = 20, seed: int = 0) -> list[dict]:
    """Rows (op, us_per_layer) for one decode step of ``batch`` sequences at position ``context``."""
    import cupy

    cfg, layers = model.cfg, len(model.layers)
    cache = model.new_cache(batch, context + 1)
    rng = cupy.random.default_rng(seed)
    for a in (*cache.k, *cache.v):
        a[...] = rng.standard_normal(a.shape, dtype=cupy.float32).astype(cupy.float16)
    tokens = cupy.asarray(rng.integers(0, cfg.vocab, (batch, 1)), dtype=cupy.int32)
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    try:
        with cupy.cuda.using_allocator(pool.malloc), stream:
            st = model.start(tokens, cache, context)
            ops = [model.layer_ops(i, cache, st, backend) for i in range(layers)]
            for layer_ops in ops:  # sets every intermediate in st, as a real step leaves them
                for _, op in layer_ops:
                    op()
            h0 = st.h.copy()

            def run(names=None):
                st.h[...] = h0  # the residual adds would otherwise grow it on every replay
                for layer_ops in ops:
                    for name, op in layer_ops:
                        if names is None or name in names:
                            op()

            times = {name: graph_time_us(lambda n=name: run((n,)), stream, reps) / layers for name in OP_CLASSES}
            times["layer"] = graph_time_us(run, stream, reps) / layers
            # the residual reset copy is in every graph above: time it alone and take it out
            reset = graph_time_us(lambda: run(()), stream, reps) / layers
    finally:
        stream.synchronize()
        pool.free_all_blocks()
    times = {k: max(v - reset, 0.0) for k, v in times.items()}
    times["gemm"] = sum(times[k] for k in GEMM_OPS)
    times["other"] = times["layer"] - times["gemm"]
    for op, us in times.items():
        rows.append(dict(model=cfg.name, layers=layers, backend=backend, batch=batch, context=context, op=op,
                         us_per_layer=us))
    return rows
