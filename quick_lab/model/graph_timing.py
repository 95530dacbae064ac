"""The model's timing path for CUDA graphs: capture a callable once, time its replays with CUDA events.
Used by the end-to-end sweep, the per-op breakdown and the decode GEMM tuning."""
from __future__ import annotations

import statistics

__all__ = ["capture", "graph_time_us"]


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


def graph_time_us(fn, stream, reps: int) -> float:
    """Median CUDA-event time of ``fn`` captured once into a graph (warmed up first, uncaptured)."""
    import cupy

    with stream:
        fn()
        graph, _ = capture(fn, stream)
        graph.launch(stream)
        times = []
        for _ in range(reps):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return statistics.median(times)
