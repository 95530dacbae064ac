"""Shared checks for the GPU suites: fresh random inputs, NaN-poisoned outputs, float64 reference."""
from __future__ import annotations

import numpy as np

from quick_lab.core.format import random_awq, reference_gemm
from quick_lab.core.interleave import interleave

REL_TOL = 2e-3
_weights: dict = {}


def weights(K: int, N: int, G: int):
    """(host AWQWeight, device AWQWeight, device QuickWeight) for a shape, built once per session."""
    import quick_lab.core.ops as ops

    key = (K, N, G)
    if key not in _weights:
        awq = random_awq(K, N, G, seed=K * 7 + N * 13 + G)
        _weights[key] = (awq, ops.to_device(awq), ops.to_device(interleave(awq)))
    return _weights[key]


def relative_error(y, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def run_and_check(kind: str, M: int, K: int, N: int, G: int, config=None, split_k=None, seed: int = 0):
    """Runs one kernel on fresh random x with a NaN-poisoned output; asserts it matches float64."""
    import cupy
    import quick_lab.core.ops as ops

    host, dev_awq, dev_quick = weights(K, N, G)
    rng = np.random.default_rng(seed + 1000 * M)
    x_host = rng.standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    out = cupy.full((M, N), np.nan, dtype=cupy.float16)
    if kind == "awq":
        y = ops.awq_gemm(x, dev_awq, config=config, split_k=split_k, out=out)
    else:
        y = ops.quick_gemm(x, dev_quick, config=config, split_k=split_k, out=out)
    y_host = cupy.asnumpy(y)
    assert np.isfinite(y_host).all(), f"{kind} M={M} K={K} N={N}: NaN/Inf in output (unwritten elements?)"
    ref = reference_gemm(x_host, host)
    err = relative_error(y_host, ref)
    assert err < REL_TOL, f"{kind} {config} split={split_k} M={M} K={K} N={N} G={G}: rel err {err:.2e}"
    return y_host, err
