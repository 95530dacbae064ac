"""Throughput and tile-size sweeps: every kernel timed against cuBLAS fp16 (``cupy.matmul``) in the
same run, L2 flushed before each launch, tidy rows out (one per kernel x config x K x N x M)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from quick_lab.core import configs, ops, registry
from quick_lab.core.format import random_awq
from quick_lab.lab.timing import Timer, range_name

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GROUP_SIZE = 128


def weight_bytes(K: int, N: int, G: int) -> int:
    """Packed weights + fp16 scales + int4 zeros: what any W4A16 kernel must read at least once."""
    return K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2


def min_bytes(M: int, K: int, N: int, G: int) -> int:
    return weight_bytes(K, N, G) + M * K * 2 + M * N * 2


def copy_bandwidth(timer: Timer, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    t = np.median(timer.times_ms(lambda: cupy.copyto(dst, src), reps=20)) * 1e-3
    return 2 * nbytes / t


@dataclass
class Problem:
    """One (K, N) weight on the GPU in every form a kernel wants."""

    K: int
    N: int
    G: int
    awq: object
    quick: object
    fp16: object

    @classmethod
    def random(cls, K: int, N: int, G: int = GROUP_SIZE, seed: int = 0) -> "Problem":
        awq = ops.to_device(random_awq(K, N, G, seed=seed))
        # the GPU interleave (bit-exact with core.interleave, tested there): seconds, not minutes, for
        # the 70B shapes
        return cls(K, N, G, awq, ops.interleave_gpu(awq), ops.dequantize(awq))


def _row(kernel, config, split, p: Problem, M, t_ms, bandwidth):
    t = float(np.median(t_ms))
    floor_us = min_bytes(M, p.K, p.N, p.G) / bandwidth * 1e6
    return dict(kernel=kernel, config=config, split_k=split, K=p.K, N=p.N, M=M, group_size=p.G,
                time_us=t * 1e3, p10_us=float(np.percentile(t_ms, 10)) * 1e3,
                p90_us=float(np.percentile(t_ms, 90)) * 1e3,
                tflops=2 * M * p.K * p.N / (t * 1e-3) / 1e12,
                gbps=min_bytes(M, p.K, p.N, p.G) / (t * 1e-3) / 1e9,
                dram_floor_us=floor_us, pct_of_floor=100 * floor_us / (t * 1e3))


def measure_problem(p: Problem, M: int, plans: list, timer: Timer, bandwidth: float, reps: int) -> list[dict]:
    """Times cuBLAS fp16 and each plan (``(label, make)``: ``make(x)`` returns a GemmPlan or
    FallbackPlan) at batch M. A row is labelled ``label`` (the sweep's name for the path, e.g.
    "quick-paper") with the config and split-K of the plan it ran."""
    import cupy

    x = cupy.asarray(np.random.default_rng(M).standard_normal((M, p.K)).astype(np.float16))
    y = cupy.empty((M, p.N), dtype=cupy.float16)
    rows = [_row("fp16", "cublas", 1, p, M,
                 timer.times_ms(lambda: cupy.matmul(x, p.fp16, out=y), reps=reps,
                                nvtx=range_name("fp16", "cublas", p.K, p.N, M)), bandwidth)]
    for label, make in plans:
        plan = make(x)
        _, config, split = plan.label
        row = _row(label, config, split, p, M,
                   timer.times_ms(plan.run, reps=reps, nvtx=range_name(label, config, p.K, p.N, M)), bandwidth)
        rows.append({**row, **getattr(plan, "resources", {})})
    fp16_us = rows[0]["time_us"]
    for r in rows:
        r["ratio_to_fp16"] = r["time_us"] / fp16_us
    return rows


def default_plans(p: Problem, M: int) -> list:
    """The baseline in AutoAWQ's configuration, the paper's QUICK configuration, and QUICK as the
    public op runs it (the per-GPU dispatcher)."""
    awq_cfg, quick_cfg = configs.AWQ_DEFAULT, configs.QUICK_DEFAULT
    paper_split = min(configs.AWQ_DEFAULT_SPLIT_K, p.K // quick_cfg.tile_k)
    return [
        ("awq", lambda x: ops.plan_awq_gemm(x, p.awq, config=awq_cfg)),
        ("quick-paper", lambda x: ops.plan_quick_gemm(x, p.quick, config=quick_cfg, split_k=paper_split)),
        ("quick", lambda x: ops.plan_quick_gemm(x, p.quick)),
    ]


FALLBACK_FAMILY = "fallback"  # the name that selects dequantize + cuBLAS in a partial tile sweep


def tile_plans(p: Problem, M: int, splits=(1, 2, 4, 8), kinds=registry.KINDS, families=None) -> list:
    """Every registered variant of the chosen kernels (``families``: only these family names, and
    :data:`FALLBACK_FAMILY` for dequantize + cuBLAS) that fits the problem (on an sm_90 GPU the wgmma
    ones too, also with stream-K), at each split-K, and the dequantize + cuBLAS fallback."""
    import cupy

    hopper = cupy.cuda.Device().compute_capability == "90"
    plans = []
    for kind, weight, make in (("awq", p.awq, ops.plan_awq_gemm), ("quick", p.quick, ops.plan_quick_gemm)):
        if kind not in kinds:
            continue
        for fam in registry.families(kind, hopper=hopper):
            if families is not None and fam.name not in families:
                continue
            for cfg in fam.variants:
                if not registry.fits(cfg, p.N, p.G, K=p.K, M=M):
                    continue
                for split in ((configs.STREAM_K,) if fam.stream_k else ()) + tuple(splits):
                    if split <= p.K // cfg.tile_k:
                        plans.append((kind, lambda x, make=make, weight=weight, cfg=cfg, split=split:
                                      make(x, weight, config=cfg, split_k=split)))
    if families is None or FALLBACK_FAMILY in families:  # a partial sweep adds only its families' rows
        plans.append(("fallback", lambda x: ops.plan_fallback(x, p.quick)))
    return plans


def sweep(shapes, batches, plan_fn=default_plans, reps: int = 50, progress=None,
          group_sizes=(GROUP_SIZE,)) -> pd.DataFrame:
    """Rows for every shape x group size x batch, cuBLAS fp16 first in each group;
    ``progress(i, n, label)``."""
    timer = Timer()
    bandwidth = copy_bandwidth(timer)
    rows = []
    total, done = len(shapes) * len(group_sizes) * len(batches), 0
    for K, N in shapes:
        for G in group_sizes:
            p = Problem.random(K, N, G)
            for M in batches:
                rows += measure_problem(p, M, plan_fn(p, M), timer, bandwidth, reps)
                done += 1
                if progress:
                    progress(done, total, f"K={K} N={N} G={G} M={M}")
            del p
    df = pd.DataFrame(rows)
    df.attrs["copy_bandwidth_Bps"] = bandwidth
    return df
