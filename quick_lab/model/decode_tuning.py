"""In-graph choice of a model's decode GEMM configs (``quick-lab e2e`` does it for every model it builds).

The public op's dispatch table is timed by the tile sweep (L2 flushed before every launch, plain
launches); a decode step launches its GEMMs inside a CUDA graph as programmatic dependents, where a
launch's ramp overlaps the kernel before, and there other configs win (results/NOTES.md entry 27:
Mistral-7B's o and down at batch 1, 8x64x512_w1x8 at split 4 against the table's 8x64x256_w1x4 at split 8,
+2.5% tokens/s). So, per distinct (K, N, group size) of the model's QUICK linears and per decode batch:
the decode-kernel variants of the batch's tile height, at each split of :data:`SPLITS` their k-tiles
allow, plus the
table's own choice, is timed the way a step runs it (one CUDA graph of one launch per layer, each
layer's own weights, so nothing is served from L2 that a step reads from DRAM; dependent launches as
the model makes them; the writer epilogue the step uses for that GEMM,
:data:`quick_lab.model.decoder.DECODE_EPILOGUES`: a GEMM whose reader sums its split-K slices is timed
without a fix-up, and then with a reader after every launch, the residual norm over its [M, N] output,
since more slices cost the reader what they save the GEMM), and the fastest is pinned on every Linear
of that shape
(:attr:`quick_lab.model.decoder.Linear.decode_launch`)."""
from __future__ import annotations

from quick_lab.build.launch import dependent_launches
from quick_lab.core import configs, ops, registry
from quick_lab.model import fused
from quick_lab.model.decoder import DECODE_EPILOGUES, FP16_FALLBACK_M, GEMM_OPS, Model, writes_with
from quick_lab.model.graph_timing import graph_time_us

__all__ = ["MAX_DECODE_M", "SPLITS", "candidates", "tune_decode_gemms"]

SPLITS = (1, 2, 4, 8)
MAX_DECODE_M = max(c.tile_m for c in configs.QUICK_DECODE_VARIANTS)  # the decode kernel's largest batch
MAX_LAUNCHES = 32  # layers' weights per timed graph (rotating past L2 on every real model shape)


def candidates(M: int, K: int, N: int, group_size: int) -> list[tuple[configs.TileConfig, int]]:
    """The decode variants of the smallest batch tile that holds M (a taller tile pads rows: more
    registers, no fewer bytes) that run this problem, at each split of :data:`SPLITS` up to their
    k-tiles."""
    fitting = [c for c in configs.QUICK_DECODE_VARIANTS if registry.fits(c, N, group_size, K=K, M=M)]
    if not fitting:
        return []
    tile_m = min(c.tile_m for c in fitting)
    return [(cfg, split) for cfg in fitting if cfg.tile_m == tile_m for split in SPLITS if split <= K // cfg.tile_k]


def _linears_by_shape(model: Model) -> dict[tuple[int, int, int, str], list]:
    """The model's QUICK linears by (K, N, group size, decode writer epilogue)."""
    groups: dict = {}
    for layer in model.layers:
        for name in GEMM_OPS:
            lin = getattr(layer, name)
            if lin.quick is not None:
                groups.setdefault((lin.K, lin.N, lin.group_size, DECODE_EPILOGUES[name]), []).append(lin)
    return groups


def tune_decode_gemms(model: Model, batches, reps: int = 5, seed: int = 0) -> list[dict]:
    """Pin the fastest in-graph config per shape and batch (batches above :data:`MAX_DECODE_M` are left
    to the table) on the model's Linears; returns one row per (shape, batch): the pick and the table's
    choice, each with its time per launch (with its reader where the step's epilogue is "partials")."""
    import cupy

    bad = [b for b in batches if not isinstance(b, int) or b < 1]
    if bad:
        raise ValueError(f"batches must be positive ints, got {bad}")
    rows = []
    stream = cupy.cuda.Stream(non_blocking=True)
    rng = cupy.random.default_rng(seed)
    for (K, N, G, epilogue), lins in _linears_by_shape(model).items():
        weights = [lin.quick for lin in lins][:MAX_LAUNCHES]
        for M in sorted({b for b in batches if b <= MAX_DECODE_M and b < FP16_FALLBACK_M}):
            x = rng.standard_normal((M, K), dtype=cupy.float32).astype(cupy.float16)
            for lin in lins:
                lin.decode_launch.pop(M, None)
            table = lins[0].quick_launch(M)

            # A GEMM whose step leaves slices is timed with a reader summing its output (slices or y),
            # whatever the candidate writes: the residual norm, as after o and down (a proxy for the
            # attention after qkv, which reads a part of its row the same way).
            reader = epilogue == "partials" and N % 8 == 0 and N <= fused.NORM_MAX_FEATURES
            h, gamma = cupy.zeros((M, N), dtype=cupy.float16), cupy.ones(N, dtype=cupy.float16)
            normed = cupy.empty((M, N), dtype=cupy.float16)

            def time_us(cfg, split):
                ep = epilogue if writes_with("quick", epilogue, cfg, split) else "store"
                plans = [ops.plan_quick_gemm(x, w, config=cfg, split_k=split, epilogue=ep) for w in weights]

                def step():
                    with dependent_launches(model.dependent_launch):
                        for p in plans:
                            y = p.run()
                            if reader:
                                fused.add_rms_norm(h, gamma, 1e-5, delta=y, out=normed)
                return graph_time_us(step, stream, reps) / len(plans)

            table_us = time_us(table["config"], table["split_k"])
            best = (table_us, table["config"], table["split_k"])
            for cfg, split in candidates(M, K, N, G):
                if (cfg, split) != (table["config"], table["split_k"]):
                    best = min(best, (time_us(cfg, split), cfg, split), key=lambda t: t[0])
            for lin in lins:
                lin.decode_launch[M] = {"config": best[1], "split_k": best[2]}
            rows.append(dict(model=model.cfg.name, K=K, N=N, group_size=G, M=M, epilogue=epilogue, with_reader=reader,
                             config=best[1].name, split_k=best[2],
                             us=round(best[0], 3), table_config=table["config"].name, table_split_k=table["split_k"],
                             table_us=round(table_us, 3)))
    stream.synchronize()
    return rows
