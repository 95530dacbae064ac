"""End-to-end decode throughput (paper Fig. 4): time the GPU decoder per (model, batch, backend).

Measurement: prefill ``batch x prefill`` random tokens, then ``decode`` greedy steps of one token each
(KV cache preallocated for ``prefill + decode`` positions). Each phase runs once untimed, then
``reps`` timed runs (best reported); the LM head alone is timed the same way. By default each phase
is captured once into a CUDA graph and the graph launch is timed with CUDA events, so Python launch
overhead is not measured (vLLM, which the paper used, also replays CUDA graphs for decode);
``graph=False`` times the eager loop instead. (Capture works because the model's matmuls go through
:mod:`quick_lab.model.cublas`.)

Depth: 70B fp16 weights do not fit on one GPU, so a run may build fewer layers than the model has
(``n_layers``). ``tokens_per_s`` is what was measured for the layers built. The per-layer work is
identical in every layer, so ``full_depth_tokens_per_s_estimate`` scales the measured per-layer time
to the full depth: ``(decode - lm_head) * full_layers / layers + lm_head``. It is an estimate and is
labeled as one.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from quick_lab.model.config import BACKENDS, PRESETS, ModelConfig, preset
from quick_lab.model.decoder import Model
from quick_lab.model.generate import decode, greedy
from quick_lab.model.weights import random_weights

E2E_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["BACKENDS", "E2E_BATCHES", "capture", "decode_throughput", "e2e_sweep", "summary_table"]


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


def e2e_sweep(models=tuple(PRESETS), batches=E2E_BATCHES, backends=BACKENDS,
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
