"""Turning ``kernels/`` into code: the bottom layer, which knows files and C++ name expressions but
not tile configs.

- ``paths``: where the kernel sources, results and shipped dispatch tables are (checkout or wheel).
- ``sources``: assembling a translation unit (local ``#include`` spliced in).
- ``nvrtc``: offline NVRTC compilation (no GPU): cubins and ptxas resource reports.
- ``loader``: run-time compilation and loading (``cupy.RawModule``; sm_90a cubins through ``nvrtc``).
- ``isa``: the PTX instruction mix of a compiled kernel.
- ``device``: the GPU at hand (usable?, name, slug, SM count), never importing cupy eagerly.
- ``launch``: kernel launches, plain or as programmatic dependents of the kernel before (``cuLaunchKernelEx``).
"""
