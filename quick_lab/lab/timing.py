"""Device-event timing with the L2 flushed before every launch: the one timing path of quick_lab.

Each repetition: overwrite a buffer larger than L2 (so weights and activations come from DRAM, as in
a real decode step where other layers evicted them), record a start event, run, record an end event.
The host only enqueues, so launch latency is hidden behind the flush. Median of many repetitions.
"""
from __future__ import annotations

import contextlib

import numpy as np

FLUSH_BYTES = 256 * 1024 * 1024  # > 5x the 50 MB L2 of an H100


class Timer:
    def __init__(self, flush_bytes: int = FLUSH_BYTES):
        import cupy

        self._cupy = cupy
        self._flush = cupy.empty(flush_bytes // 4, dtype=cupy.int32)

    def flush_l2(self) -> None:
        self._flush.fill(1)

    def times_ms(self, fn, reps: int = 50, warmup: int = 5, nvtx: str | None = None) -> np.ndarray:
        """Per-launch device times (ms) of ``fn()``, each after an L2 flush."""
        cupy = self._cupy
        for _ in range(warmup):
            fn()
        events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
        ctx = nvtx_range(nvtx) if nvtx else contextlib.nullcontext()
        with ctx:
            for start, end in events:
                self.flush_l2()
                start.record()
                fn()
                end.record()
        events[-1][1].synchronize()
        return np.array([cupy.cuda.get_elapsed_time(s, e) for s, e in events])


@contextlib.contextmanager
def nvtx_range(name: str):
    """NVTX push/pop around a region. Nsight Compute reads '/' in --nvtx-include as nesting, so names
    use ':' separators, e.g. 'quick:16x128x32_w1x2_s2:K8192:N8192:M256'."""
    if "/" in name:
        raise ValueError(f"NVTX range names must not contain '/', got {name!r}")
    from cupyx.profiler import time_range

    with time_range(name):
        yield


def range_name(kernel: str, config: str, K: int, N: int, M: int) -> str:
    return f"{kernel}:{config}:K{K}:N{N}:M{M}"
