"""Measuring the kernels: timing, provenance, sweeps, the bank-conflict model and the profiler and
sanitizer runners.

- ``timing``: device-event timing with the L2 flushed (the one timing path).
- ``metadata``: provenance of a measurement (GPU, clocks, versions, commit, date).
- ``bench``: throughput and tile sweeps against cuBLAS fp16 in the same run.
- ``tune``: the dispatch table tuned within a time budget (and lazily, per first call); the heuristic's
  offline evaluation against a tile sweep.
- ``bank_model``: the analytic shared-memory bank model of both kernels.
- ``conflicts`` / ``conflicts_target``: Nsight Compute bank-conflict measurement and its target program.
- ``sanitizer`` / ``sanitizer_target``: compute-sanitizer over every variant and its target program.
"""
