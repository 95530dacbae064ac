"""The W4A16 GEMM itself, format to launch: format -> interleave -> configs / registry -> dispatch ->
validation -> ops.

- ``format``: the AutoAWQ GEMM int4 format (NumPy): pack, quantize, dequantize, the float64 reference.
- ``interleave``: the QUICK layout, its exact inverse and the per-lane fragment model.
- ``configs``: the TileConfig value and the instantiated variants of each kernel family.
- ``registry``: one record per kernel family (source, template signature, name rule, shared-memory
  carve-up, validity rules, launch geometry).
- ``variants``: registered variants built: loaded at run time, compiled offline, their PTX mix.
- ``dispatch``: which path runs a problem (committed table, tuned table, lazy tuning, heuristic, split-K).
- ``tables``: tuned dispatch tables in the user cache, keyed by GPU, driver, version and kernel sources.
- ``validation``: every input rule, checked once per call with a message naming the argument.
- ``ops``: the public ops (plan, launch).
"""
