"""End-to-end decode throughput (paper Fig. 4): time the GPU decoder per (model, batch, backend, context).

Measurement: prefill ``batch x prefill`` random tokens, then ``decode`` greedy steps of one token each
(KV cache preallocated for ``prefill + decode`` positions). Each phase runs once untimed, then
``reps`` timed runs (best reported); the LM head alone is timed the same way. By default each phase
is captured once into a CUDA graph and the graph launch is timed with CUDA events, so Python launch
overhead is not measured (vLLM, which the paper used, also replays CUDA graphs for decode);
``graph=False`` times the eager loop instead. (Capture works because the model's matmuls go through
:mod:`quick_lab.model.cublas`.) Long contexts (``fill_cache``) skip the prefill: the cache is filled
with random K/V up to the context (decode reads the same bytes whatever they hold) and
``prefill_ms`` is left empty.

Depth: :func:`e2e_sweep` builds every model at full depth where it fits the GPU, all backends in one
model when they fit together, else one model per backend; only a backend that cannot fit alone
(70B in fp16 on an 80 GB GPU) gets fewer layers. ``tokens_per_s`` is what was measured for the
layers built; ``full_depth_tokens_per_s_estimate`` scales the per-layer time to the full depth,
``(decode - lm_head) * full_layers / layers + lm_head`` (equal to the measurement at full depth),
and is labelled an estimate wherever ``layers < full_layers``.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from quick_lab.build import launch as launch_mode
from quick_lab.model import decode_tuning
from quick_lab.model.config import BACKENDS, PRESETS, ModelConfig, memory_estimate, preset
from quick_lab.model.decoder import Model
from quick_lab.model.generate import decode, greedy
from quick_lab.model.graph_timing import capture
from quick_lab.model.weights import random_weights

E2E_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["BACKENDS", "E2E_BATCHES", "capture", "decode_throughput", "e2e_sweep", "layers_that_fit", "summary_table",
           "sweep_plan"]


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
                      reps: int = 1, seed: int = 0, fill_cache: bool = False) -> dict:
    """Prefill ``batch x prefill`` random tokens (or, with ``fill_cache``, fill the cache with random
    K/V up to ``prefill``), then ``decode_steps`` greedy steps; times both.

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

    if fill_cache:
        fill = cupy.random.default_rng(seed)
        for a in (*cache.k, *cache.v):
            a[:, :, :prefill] = fill.standard_normal((*a.shape[:2], prefill, a.shape[3]),
                                                     dtype=cupy.float32).astype(cupy.float16)
        prefill_ms = float("nan")
    else:
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
                prefill=prefill, decode=decode_steps, context=prefill, prefill_timed=not fill_cache,
                cuda_graph=graph, lm_head=model.lm_head is not None,
                dependent_launch=model.dependent_launch and launch_mode.dependent_launches_supported(),
                prefill_ms=prefill_ms, decode_ms=decode_ms, lm_head_ms=head_ms,
                tokens_per_s=tokens / (decode_ms * 1e-3),
                full_depth_tokens_per_s_estimate=tokens / (full_ms * 1e-3))


def layers_that_fit(cfg: ModelConfig, backends, cases, free_bytes: int, lm_head: bool) -> int:
    """Most layers (<= cfg.n_layers, >= 1) whose weights for ``backends`` plus the largest case's KV
    cache and a working margin fit ``free_bytes``. ``cases``: (batch, max_seq) pairs."""
    margin = 4e9 + 0.1 * free_bytes  # activations at batch 256 x 128-token prefill, dequantized weights
    for layers in range(cfg.n_layers, 0, -1):
        run_cfg = dataclasses.replace(cfg, n_layers=layers)
        need = max(memory_estimate(run_cfg, batch, seq, backends, lm_head=lm_head)["total"] for batch, seq in cases)
        if need + margin <= free_bytes:
            return layers
    return 1


def _model_plan(cfg: ModelConfig, backends, cases, free_bytes: int, lm_head: bool, n_layers: int | None):
    """[(backends, layers)]: all backends in one model at full depth if that fits, else one model per
    backend with as many layers as fit; ``n_layers`` (if given) caps the depth."""
    cap = min(n_layers or cfg.n_layers, cfg.n_layers)
    together = layers_that_fit(cfg, tuple(backends), cases, free_bytes, lm_head)
    if together >= cap or len(backends) == 1:
        return [(tuple(backends), min(together, cap))]
    return [((b,), min(layers_that_fit(cfg, (b,), cases, free_bytes, lm_head), cap)) for b in backends]


def sweep_plan(cfg: ModelConfig, backends, cases, free_bytes: int, lm_head: bool, n_layers: int | None,
               decode_steps: int = 128) -> list[tuple[tuple[str, ...], int, list]]:
    """The models to build and what each runs: [(backends, layers, cases)], cases (batch, context, fill).
    First the :func:`_model_plan` models sized for the smallest case; a case runs on those where they
    still fit with its KV cache, else each backend joins (or starts) a model of the depth that backend
    can have with that cache: full depth wherever the GPU holds it."""
    def kv(cs):
        return [(b, ctx + decode_steps) for b, ctx, _ in cs]

    cap = min(n_layers or cfg.n_layers, cfg.n_layers)
    smallest = min(cases, key=lambda c: c[0] * (c[1] + decode_steps))
    plan = [(g, n, []) for g, n in _model_plan(cfg, backends, kv([smallest]), free_bytes, lm_head, n_layers)]
    for case in cases:
        for b in backends:
            layers = min(layers_that_fit(cfg, (b,), kv([case]), free_bytes, lm_head), cap)
            for group, n, runs in plan:
                if b in group and n == layers and layers_that_fit(cfg, group, kv([case]), free_bytes, lm_head) >= n:
                    if case not in runs:
                        runs.append(case)
                    break
            else:
                plan.append(((b,), layers, [case]))
    # A backend cut short for several cases gets one model at the least of those depths (its rows are
    # labelled estimates anyway; building 70B fp16 at four depths would only cost time).
    merged: list = []
    for g, n, runs in plan:
        if not runs:
            continue
        partial = next((e for e in merged if n < cap and e[1] < cap and e[0] == g), None)
        if partial is None:
            merged.append((g, n, runs))
        else:
            merged[merged.index(partial)] = (g, min(n, partial[1]), partial[2] + runs)
    return merged


def _oom_text(exc) -> str:
    return " ".join(str(exc).split())


def _run_case(cfg, batch, backend, context, decode_steps, model, graph, reps, fill, layers) -> dict:
    """One row; a prefill that runs out of GPU memory (the activations of batch x context tokens at
    once: 70B at batch 256) is retried with the cache filled instead, so decode is still measured,
    and the row says so (``prefill_timed`` False, ``note``); a decode that does not fit gets an
    ``error`` and NaN timings."""
    import cupy

    def failed(exc) -> dict:
        return dict(model=cfg.name, layers=layers, full_layers=cfg.n_layers, batch=batch, backend=backend,
                    prefill=context, decode=decode_steps, context=context, error=_oom_text(exc))

    try:
        return decode_throughput(cfg, batch, backend, context, decode_steps, model=model, graph=graph, reps=reps,
                                 fill_cache=fill)
    except cupy.cuda.memory.OutOfMemoryError as exc:
        if fill:
            return failed(exc)
        note = f"prefill did not fit ({_oom_text(exc)}); cache filled instead, prefill not timed"
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        row = decode_throughput(cfg, batch, backend, context, decode_steps, model=model, graph=graph, reps=reps,
                                fill_cache=True)
    except cupy.cuda.memory.OutOfMemoryError as exc:
        return failed(exc)
    return {**row, "note": note}


def e2e_sweep(models=tuple(PRESETS), batches=E2E_BATCHES, backends=BACKENDS,
              n_layers: int | None = None, prefill: int = 128, decode_steps: int = 128, graph: bool = True,
              lm_head: bool = True, reps: int = 1, long_context: int = 0, long_batches=(1, 16), progress=None,
              dependent_launch: bool = True, tune_decode: bool = True):
    """One row per (model, batch, backend[, long context]). Depth: full where it fits (see the module
    doc); ``n_layers`` caps it. ``long_context`` > 0 adds decode at that context for ``long_batches``
    (cache filled, prefill not timed). A case that runs out of GPU memory gets NaN timings and an
    ``error``. ``dependent_launch``: the models launch their decode ops as programmatic dependents
    (:class:`~quick_lab.model.decoder.Model`). ``tune_decode``: each model's QUICK decode GEMM configs
    are picked in-graph first (:mod:`quick_lab.model.decode_tuning`; the picks in
    ``df.attrs["decode_gemm_configs"]``)."""
    import cupy
    import pandas as pd

    cases = [(b, prefill, False) for b in batches]
    if long_context:
        cases += [(b, long_context, True) for b in long_batches]
    rows, tuned = [], []
    total = len(models) * len(cases) * len(backends)
    for name in models:
        cfg = preset(name) if isinstance(name, str) else name
        cupy.get_default_memory_pool().free_all_blocks()
        free = cupy.cuda.runtime.memGetInfo()[0]
        for group, layers, runs in sweep_plan(cfg, backends, cases, free, lm_head, n_layers, decode_steps):
            run_cfg = dataclasses.replace(cfg, n_layers=layers)
            model = Model(random_weights(run_cfg, distinct_layers=False), backends=group, lm_head=lm_head,
                          dependent_launch=dependent_launch)
            if tune_decode and "quick" in group:
                tuned += decode_tuning.tune_decode_gemms(model, [batch for batch, _, _ in runs])
            for batch, context, fill in runs:
                for backend in group:
                    if progress:
                        progress(len(rows), total, f"{cfg.name} x{layers} M={batch} ctx={context} {backend}")
                    rows.append(_run_case(cfg, batch, backend, context, decode_steps, model, graph, reps, fill,
                                          layers))
                    cupy.get_default_memory_pool().free_all_blocks()
            del model
            cupy.get_default_memory_pool().free_all_blocks()
    if progress:
        progress(total, total, "done")
    df = pd.DataFrame(rows)
    df.attrs["decode_gemm_configs"] = tuned
    return df


def summary_table(df):
    """tokens/s per (model, context, batch) x backend, with the QUICK / AWQ and QUICK / fp16 ratios."""
    index = ["model", "context", "batch"] if "context" in df else ["model", "batch"]
    # full depth: equal to tokens_per_s wherever the whole model was built, and the one comparable
    # number where a backend got fewer layers (70B fp16)
    table = df.pivot_table(index=index, columns="backend", values="full_depth_tokens_per_s_estimate")
    if {"awq", "quick"} <= set(table.columns):
        table["quick/awq"] = table["quick"] / table["awq"]
    if {"fp16", "quick"} <= set(table.columns):
        table["quick/fp16"] = table["quick"] / table["fp16"]
    return table
