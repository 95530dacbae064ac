"""The target program ``quick-lab check`` runs under compute-sanitizer (:mod:`quick_lab.lab.sanitizer`)::

    python -m quick_lab.lab.sanitizer_target CASES.json

``CASES.json`` is the case list :func:`quick_lab.lab.sanitizer.write_cases` writes: a JSON list of
objects with ``op``, ``kind``, ``M``, ``K``, ``N``, ``G``, ``config``, ``split_k`` and ``label``. Each
case is one op call (an explicit GEMM variant and split, the decode GEMM with its SiLU x up writer, the
default op, the dequantize + cuBLAS fallback, a standalone dequantizer, the GPU interleave or an empty
batch), printed as
``QL-CASE <i> <label>`` before it runs. Outputs are pre-filled with NaN, so an element the op does not
write fails; every GEMM result is compared with a float64 NumPy reference (relative Frobenius error
below :data:`REL_TOL`) and the dequantizers and the interleave must be bit-exact. A mismatch prints
``QL-MISMATCH <why>``; the run ends with ``QL-DONE <n> cases, <m> mismatches`` and exits
:data:`TARGET_MISMATCH_EXIT` when m > 0, so a clean sanitizer run is also a correct one.

Before anything touches the GPU the target disables CuPy's memory pool
(``cupy.cuda.set_allocator(None)``): every array is its own ``cudaMalloc`` of its exact size, so
memcheck (run with ``--padding``) sees each array's true bounds. That is done in :func:`main`, never
at import, so importing this module (the tests do) leaves the importer's allocator alone.

Without a usable GPU the first case fails with CuPy's CUDA error (a traceback, exit code 1), as the
generated target script this module replaces did; ``quick-lab check`` refuses to start without a GPU.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import quick_lab
from quick_lab.core import ops
from quick_lab.core.format import dequantize_fp16, random_awq, reference_gemm, split_gate_up
from quick_lab.lab import target_program
from quick_lab.core.interleave import interleave

MODULE = "quick_lab.lab.sanitizer_target"
REL_TOL = 2e-3
TARGET_MISMATCH_EXIT = 3
USAGE_EXIT = target_program.USAGE_EXIT
CASE_KEYS = ("op", "kind", "M", "K", "N", "G", "config", "split_k", "label")
OPS = ("gemm", "gemm_silu_mul", "gemm_partials", "default", "fallback", "dequantize", "dequantize_quick_t", "interleave", "empty")


# ---------------------------------------------------------------- how the parent runs it


def command(cases_path, python: str | None = None) -> list[str]:
    """``[python, "-m", "quick_lab.lab.sanitizer_target", CASES.json]`` (python: this interpreter)."""
    return [python or sys.executable, "-m", MODULE, str(cases_path)]


def environment(base=None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with unbuffered output and a PYTHONPATH that leads with the
    directory holding *this* ``quick_lab`` (a checkout's root or an installation's site-packages), so
    the target imports the same package as the parent."""
    env = dict(os.environ if base is None else base)
    root = str(Path(quick_lab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_cases(path) -> list[dict]:
    """The case list of a CASES.json; ValueError when it is not one."""
    cases = json.loads(Path(path).read_text())
    if not isinstance(cases, list):
        raise ValueError(f"{path}: expected a JSON list of cases")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or set(CASE_KEYS) - set(case):
            raise ValueError(f"{path}: case {i} lacks some of {', '.join(CASE_KEYS)}: {case!r}")
        if case["op"] not in OPS:
            raise ValueError(f"{path}: case {i} has unknown op {case['op']!r}")
    return cases


# ---------------------------------------------------------------- the cases

_weights: dict = {}


def weights(K, N, G):
    key = (K, N, G)
    if key not in _weights:
        host = random_awq(K, N, G, seed=K + 3 * N + 7 * G)
        _weights[key] = (host, ops.to_device(host), ops.to_device(interleave(host)))
    return _weights[key]


def poisoned_out(M, N):
    """fp16 output pre-filled with NaN (bytes 0xFF) by cudaMemset: an element the op does not write
    stays NaN and fails the check below. (It also marks the buffer initialized for initcheck, which
    does not track cuBLAS's TMA stores on Hopper and would otherwise flag the fallback's output.)"""
    import cupy

    out = cupy.empty((M, N), dtype=cupy.float16)
    if out.size:
        out.data.memset(0xFF, out.nbytes)
    return out


def check_gemm(y, x_host, host, label, silu_mul: bool = False):
    """None when ``y`` matches the float64 reference (``silu_mul``: silu(gate) * up of its (gate, up)
    column pairs), else why not."""
    import cupy

    y = cupy.asnumpy(y)
    ref = reference_gemm(x_host, host)
    if silu_mul:
        gate, up = split_gate_up(ref)
        ref = gate / (1 + np.exp(-gate)) * up
    if not np.isfinite(y).all():
        return f"{label}: NaN/Inf in the output"
    err = float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
    return None if err < REL_TOL else f"{label}: relative error {err:.2e}"


def run(case):
    """Runs one case; None when its result is right, else why not."""
    import cupy

    op, kind, M, K, N, G = (case[k] for k in ("op", "kind", "M", "K", "N", "G"))
    host, dev_awq, dev_quick = weights(K, N, G)
    weight = dev_awq if kind == "awq" else dev_quick
    gemm = ops.awq_gemm if kind == "awq" else ops.quick_gemm
    x_host = np.random.default_rng(M * 31 + K).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    label = case["label"]
    if op == "gemm":
        y = gemm(x, weight, config=case["config"], split_k=case["split_k"], out=poisoned_out(M, N))
        return check_gemm(y, x_host, host, label)
    if op == "gemm_silu_mul":
        y = gemm(x, weight, config=case["config"], split_k=case["split_k"], out=poisoned_out(M, N // 2),
                 epilogue="silu_mul")
        return check_gemm(y, x_host, host, label, silu_mul=True)
    if op == "gemm_partials":  # every slice poisoned first: a slice element never stored stays NaN
        split = case["split_k"]
        slices = cupy.full((split, M, N), np.nan, dtype=cupy.float32)
        y = gemm(x, weight, config=case["config"], split_k=split, out=slices, epilogue="partials")
        if not bool(cupy.isfinite(y).all()):
            return f"{label}: NaN/Inf in a split slice"
        return check_gemm(ops.sum_partials(y), x_host, host, label)
    if op == "default":
        return check_gemm(gemm(x, weight, out=poisoned_out(M, N)), x_host, host, label)
    if op == "fallback":
        return check_gemm(ops.plan_fallback(x, weight, out=poisoned_out(M, N)).run(), x_host, host, label)
    if op == "dequantize":
        got = cupy.asnumpy(ops.dequantize(dev_awq))
        return None if np.array_equal(got.view(np.uint16), dequantize_fp16(host).view(np.uint16)) else \
            f"{label}: not bit-exact"
    if op == "dequantize_quick_t":
        got = cupy.asnumpy(ops.dequantize_quick_t(dev_quick))
        return None if np.array_equal(got.T.view(np.uint16), dequantize_fp16(host).view(np.uint16)) else \
            f"{label}: not bit-exact"
    if op == "interleave":
        got, want = ops.interleave_gpu(dev_awq), interleave(host)
        same = all(np.array_equal(cupy.asnumpy(getattr(got, f)).view(np.uint8),
                                  np.asarray(getattr(want, f)).view(np.uint8)) for f in ("qweight", "qzeros", "scales"))
        return None if same else f"{label}: not bit-exact with interleave()"
    if op == "empty":
        y = gemm(cupy.empty((0, K), dtype=cupy.float16), weight)
        return None if y.shape == (0, N) else f"{label}: shape {y.shape}"
    raise ValueError(f"unknown op {op!r}")


def main(argv=None) -> int:
    cases, failed = target_program.read_case_argument(argv, MODULE, read_cases)
    if failed is not None:
        return failed

    import cupy

    # Exact-size cudaMalloc per array (no pool): memcheck then sees each array's true bounds.
    cupy.cuda.set_allocator(None)

    bad = []
    for i, case in enumerate(cases):
        print(f"QL-CASE {i} {case['label']}", flush=True)
        problem = run(case)
        cupy.cuda.Device().synchronize()  # errors of this case are reported before the next marker
        if problem:
            print(f"QL-MISMATCH {problem}", flush=True)
            bad.append(problem)
    print(f"QL-DONE {len(cases)} cases, {len(bad)} mismatches", flush=True)
    return TARGET_MISMATCH_EXIT if bad else 0


if __name__ == "__main__":
    sys.exit(main())
