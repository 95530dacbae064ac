"""The target program ``quick-lab check --decoder`` runs under compute-sanitizer::

    python -m quick_lab.model.fused_check

Every fused decoder kernel (:mod:`quick_lab.model.fused`) on small cases that reach each code path:
add + RMSNorm with and without the residual, SiLU x up, RoPE + cache write (prefill), attention in
prefill tiles (a partial last tile, a start past 0) and decode (unsplit, split with the ticket merge,
more splits than keys), and the decode step with RoPE fused in; every case launched plainly and as a
programmatic dependent. Outputs and unused cache rows are
NaN first; each result is compared with a float64 NumPy reference. Same protocol as
:mod:`quick_lab.lab.sanitizer_target`: ``QL-CASE <i> <label>`` before each case, ``QL-MISMATCH <why>``,
``QL-DONE <n> cases, <m> mismatches``, exit 3 on a mismatch. CuPy's memory pool is off (each array
its own allocation), so memcheck sees every array's bounds.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from quick_lab.build.launch import dependent_launches
from quick_lab.core import ops
from quick_lab.core.format import split_gate_up
from quick_lab.lab.sanitizer_target import TARGET_MISMATCH_EXIT
from quick_lab.model import fused

MODULE = "quick_lab.model.fused_check"
KERNELS = ("add_rms_norm", "silu_mul", "rope_kv", "attention")
REL_TOL = 2e-3


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return math.inf
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tables(max_seq: int, D: int, theta: float = 1e4):
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv)
    return np.cos(ang), np.sin(ang)


def _rope(x, cos, sin, positions):
    """x [..., T, H, D] float64, rotate-half at ``positions`` (length T)."""
    D = x.shape[-1]
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attention(q, k, v, pos):
    """q [B, T, Hq, D], k/v [B, Hkv, L, D] float64; causal, GQA."""
    B, T, Hq, D = q.shape
    kk, vv = (np.repeat(a, Hq // k.shape[1], axis=1) for a in (k, v))
    s = np.einsum("bthd,bhld->bhtl", q, kk) / math.sqrt(D)
    s = np.where(np.arange(pos + T)[None, :] <= (pos + np.arange(T))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhtl,bhld->bthd", p / p.sum(-1, keepdims=True), vv)


def split_slices(rng, parts: int, shape: tuple):
    """GPU (fp32 split-K slices [parts, *shape] as a GEMM's "partials" epilogue leaves them, summing to
    ~N(0, 1); their fp16 sum in split order, ops.sum_partials: the y its fix-up would store)."""
    import cupy

    slices = cupy.asarray((rng.standard_normal((parts, *shape)) / math.sqrt(parts)).astype(np.float32))
    return slices, ops.sum_partials(slices)


def case_norm(rng, rows: int, H: int, with_delta: bool, parts: int = 0):
    """``parts`` > 0: the residual's delta comes as that many fp32 split-K slices."""
    import cupy

    h = rng.standard_normal((rows, H)).astype(np.float16)
    d = rng.standard_normal((rows, H)).astype(np.float16)
    delta = cupy.asarray(d) if with_delta else None
    if parts:
        delta, d = split_slices(rng, parts, (rows, H))
        d = cupy.asnumpy(d)
    w = rng.uniform(0.5, 1.5, H).astype(np.float16)
    out = cupy.full((rows, H), np.nan, dtype=cupy.float16)
    fused.add_rms_norm(cupy.asarray(h), cupy.asarray(w), 1e-5, delta=delta, out=out)
    x = (h.astype(np.float64) + d).astype(np.float16).astype(np.float64) if with_delta else h.astype(np.float64)
    return _rel(cupy.asnumpy(out), x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w)


def case_silu(rng, rows: int, inter: int):
    import cupy

    gu = rng.standard_normal((rows, 2 * inter)).astype(np.float16)
    g, u = (half.astype(np.float64) for half in split_gate_up(gu))
    return _rel(cupy.asnumpy(fused.silu_mul(cupy.asarray(gu))), g / (1 + np.exp(-g)) * u)


def poisoned_cache(rng, B, Hkv, filled, max_seq, D):
    """(k, v) float16 host [B, Hkv, filled, D] and GPU caches [B, Hkv, max_seq, D] holding them in rows
    0 .. filled - 1 and NaN beyond: a kernel that reads a row it should not poisons its output."""
    import cupy

    k = rng.standard_normal((B, Hkv, filled, D)).astype(np.float16)
    v = rng.standard_normal((B, Hkv, filled, D)).astype(np.float16)
    k_cache = cupy.full((B, Hkv, max_seq, D), np.nan, dtype=cupy.float16)
    v_cache = cupy.full((B, Hkv, max_seq, D), np.nan, dtype=cupy.float16)
    k_cache[:, :, :filled] = cupy.asarray(k)
    v_cache[:, :, :filled] = cupy.asarray(v)
    return k, v, k_cache, v_cache


def case_prefill(rng, B, T, pos, Hq, Hkv, D):
    """rope_kv then attention over a cache holding ``pos`` earlier tokens."""
    import cupy

    max_seq = pos + T + 5
    k_old, v_old, k_cache, v_cache = poisoned_cache(rng, B, Hkv, pos, max_seq, D)
    qkv = rng.standard_normal((B * T, (Hq + 2 * Hkv) * D)).astype(np.float16)
    cos, sin = _tables(max_seq, D)
    q = fused.rope_kv(cupy.asarray(qkv), cupy.asarray(cos.astype(np.float32)), cupy.asarray(sin.astype(np.float32)),
                      k_cache, v_cache, Hq, Hkv, pos, T)
    out = fused.attention(q, k_cache, v_cache, Hq, pos, T)
    x = qkv.astype(np.float64).reshape(B, T, Hq + 2 * Hkv, D)
    positions = np.arange(pos, pos + T)
    k = np.concatenate([k_old, _rope(x[:, :, Hq:Hq + Hkv], cos, sin, positions).transpose(0, 2, 1, 3)], axis=2)
    v = np.concatenate([v_old, x[:, :, Hq + Hkv:].transpose(0, 2, 1, 3)], axis=2)
    ref = _attention(_rope(x[:, :, :Hq], cos, sin, positions), k, v, pos)
    return _rel(cupy.asnumpy(out).reshape(ref.shape), ref)


def case_decode(rng, B, pos, Hq, Hkv, D, splits, fused_rope: bool, parts: int = 0):
    """One decode step at ``pos``: attention alone on a rotated q, or with RoPE and the write fused in
    (``parts`` > 0: reading qkv as that many fp32 split-K slices)."""
    import cupy

    max_seq = pos + 3
    k_old, v_old, k_cache, v_cache = poisoned_cache(rng, B, Hkv, pos, max_seq, D)
    qkv = rng.standard_normal((B, (Hq + 2 * Hkv) * D)).astype(np.float16)
    qkv_in = cupy.asarray(qkv)
    if parts:
        qkv_in, qkv = split_slices(rng, parts, qkv.shape)
        qkv = cupy.asnumpy(qkv)
    cos, sin = _tables(max_seq, D)
    ws = fused.AttentionWorkspace(B * Hkv, 32, Hq // Hkv, D)
    x = qkv.astype(np.float64).reshape(B, 1, Hq + 2 * Hkv, D)
    positions = np.array([pos])
    k_new = _rope(x[:, :, Hq:Hq + Hkv], cos, sin, positions).transpose(0, 2, 1, 3)
    v_new = x[:, :, Hq + Hkv:].transpose(0, 2, 1, 3)
    q = _rope(x[:, :, :Hq], cos, sin, positions)
    if fused_rope:
        out = fused.rope_attention(qkv_in, cupy.asarray(cos.astype(np.float32)),
                                   cupy.asarray(sin.astype(np.float32)), k_cache, v_cache, Hq, pos, ws, splits=splits)
    else:
        k_cache[:, :, pos:pos + 1] = cupy.asarray(k_new.astype(np.float16))
        v_cache[:, :, pos:pos + 1] = cupy.asarray(v_new.astype(np.float16))
        out = fused.attention(cupy.asarray(q.reshape(B, -1).astype(np.float16)), k_cache, v_cache, Hq, pos, 1, ws,
                              splits=splits)
    ref = _attention(q, np.concatenate([k_old, k_new], axis=2), np.concatenate([v_old, v_new], axis=2), pos)
    return _rel(cupy.asnumpy(out).reshape(ref.shape), ref)


def cases():
    """(label, fn(rng) -> relative error): each case launched plainly, then again as programmatic
    dependents (quick_lab.build.launch; the same as plain before compute capability 9.0)."""
    plain = _plain_cases()
    return plain + [(f"{label} (dependent launch)", _dependent(fn)) for label, fn in plain]


def _dependent(fn):
    def run(rng):
        with dependent_launches():
            return fn(rng)
    return run


def _plain_cases():
    return [
        ("add_rms_norm rows=7 H=4096 residual", lambda r: case_norm(r, 7, 4096, True)),
        ("add_rms_norm rows=1 H=5120", lambda r: case_norm(r, 1, 5120, False)),
        ("add_rms_norm rows=5 H=4096 residual from 3 split slices", lambda r: case_norm(r, 5, 4096, True, parts=3)),
        ("silu_mul rows=3 I=544", lambda r: case_silu(r, 3, 544)),
        ("rope_kv+attention prefill B=2 T=17 pos=0 GQA 4/2 D=64", lambda r: case_prefill(r, 2, 17, 0, 4, 2, 64)),
        ("rope_kv+attention prefill B=1 T=5 pos=9 GQA 32/8 D=128", lambda r: case_prefill(r, 1, 5, 9, 32, 8, 128)),
        ("attention decode B=2 pos=40 MHA 4/4 D=128 unsplit", lambda r: case_decode(r, 2, 40, 4, 4, 128, 1, False)),
        ("attention decode B=2 pos=200 GQA 8/2 D=128 split 3", lambda r: case_decode(r, 2, 200, 8, 2, 128, 3, False)),
        ("attention decode B=1 pos=5 GQA 16/2 D=64 split 32 (empty splits)",
         lambda r: case_decode(r, 1, 5, 16, 2, 64, 32, False)),
        ("rope_attention decode B=3 pos=100 GQA 32/8 D=128 default splits",
         lambda r: case_decode(r, 3, 100, 32, 8, 128, None, True)),
        ("rope_attention decode B=1 pos=0 GQA 8/1 D=128 split 2", lambda r: case_decode(r, 1, 0, 8, 1, 128, 2, True)),
        ("rope_attention decode B=2 pos=70 GQA 32/8 D=128 qkv from 8 split slices",
         lambda r: case_decode(r, 2, 70, 32, 8, 128, None, True, parts=8)),
    ]


def main(argv=None) -> int:
    import cupy

    cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: memcheck sees each one's bounds
    rng = np.random.default_rng(0)
    bad = 0
    todo = cases()
    for i, (label, fn) in enumerate(todo):
        print(f"QL-CASE {i} {label}", flush=True)
        err = fn(rng)
        cupy.cuda.Device().synchronize()
        if not err < REL_TOL:
            bad += 1
            print(f"QL-MISMATCH {label}: relative error {err:.3g} (tolerance {REL_TOL})", flush=True)
    print(f"QL-DONE {len(todo)} cases, {bad} mismatches", flush=True)
    return TARGET_MISMATCH_EXIT if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
