"""The decoder's fused non-GEMM ops (``kernels/decoder.cu``) on CuPy arrays: residual add + RMSNorm,
RoPE with the KV-cache write, attention over the cache (flash-decoding split, online softmax, causal)
and SiLU x up (of the paired gate_up layout). Launch code only; the decoder
(:mod:`quick_lab.model.decoder`) decides what runs when.

A GEMM output these ops read (the norm's ``delta``, the decode attention's ``qkv``) may come as the QUICK
decode GEMM's fp32 split-K slices [split, rows, N] (its "partials" epilogue, :func:`is_partials`): the
kernels sum them in split order as they read, the arithmetic of the GEMM's own fix-up.

Every op launches on the current stream and allocates nothing that outlives the call except its
output, so a decode step is capturable in one CUDA graph. Shapes are checked here once per call
(cheap Python), the kernels assume them.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from quick_lab.build import device, loader
from quick_lab.build.launch import launch
from quick_lab.core.format import GATE_UP_PAIR

__all__ = ["ATTENTION_WARPS", "MAX_PARTIALS", "NORM_MAX_FEATURES", "AttentionWorkspace", "add_rms_norm", "attention",
           "attention_rows", "decode_splits", "is_partials", "rope_attention", "rope_kv", "silu_mul"]

ATTENTION_WARPS = 4          # kernels/decoder.cu kAttnWarps
_NORM_MAX_THREADS = 1024  # kernels/decoder.cu kNormMaxThreads
NORM_MAX_FEATURES = _NORM_MAX_THREADS * 8 * 2  # x 8 halves x kNormMaxChunks
_MAX_ROWS_X_DIM = 2048       # AttentionSmem: R * D <= 2048
_MIN_KEYS_PER_SPLIT = 128  # one 32-key tile for each of a block's 4 warps
_MAX_MERGE_PAIRS = 64 * 16    # AttentionSmem::merge: (split, row) pairs of the last block's merge
_NULL = np.uint64(0)         # a null pointer argument (the unused workspace of an unsplit launch)
# Most fp32 split-K slices a kernel here sums as it reads a GEMM output (kernels/decoder.cu kMaxPartials):
# the QUICK decode GEMM's "partials" epilogue (quick_lab.core.ops) leaves y as [split, rows, N].
MAX_PARTIALS = 8


def _check_fp16(arr, name: str, ndim: int) -> None:
    import cupy

    if not isinstance(arr, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != cupy.float16 or arr.ndim != ndim or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {ndim}-D float16 array, got {arr.dtype} "
                         f"{arr.ndim}-D{'' if arr.flags.c_contiguous else ' non-contiguous'}")


def is_partials(y) -> bool:
    """Whether ``y`` is a GEMM output left as fp32 split-K slices [split, rows, N] (3-D float32)."""
    import cupy

    return isinstance(y, cupy.ndarray) and y.dtype == cupy.float32 and y.ndim == 3


def _check_output(y, name: str, shape: tuple) -> tuple:
    """A GEMM output an op here reads: fp16 ``shape``, or its fp32 split-K slices [split, *shape] (at
    most MAX_PARTIALS, summed in split order as the GEMM's fix-up would). Returns (fp16 or null,
    slices or null, number of slices)."""
    if is_partials(y):
        if not y.flags.c_contiguous or y.shape[1:] != shape or not 1 <= y.shape[0] <= MAX_PARTIALS:
            raise ValueError(f"{name}: split-K slices must be a C-contiguous float32 [split, {shape[0]}, {shape[1]}] "
                             f"with 1 <= split <= {MAX_PARTIALS}, got {y.shape}")
        return _NULL, y, np.int32(y.shape[0])
    _check_fp16(y, name, 2)
    if y.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {y.shape}")
    return y, _NULL, np.int32(0)


def add_rms_norm(h, weight, eps: float, delta=None, out=None):
    """``h += delta`` (in place, fp16; skipped when ``delta`` is None), then
    ``out = h / sqrt(mean(h**2) + eps) * weight`` per row with fp32 statistics. h [rows, H]; ``delta``
    [rows, H] fp16, or a GEMM's fp32 split-K slices [split, rows, H] (epilogue 'partials'), read as
    the fp16 sum its fix-up would have stored."""
    import cupy

    _check_fp16(h, "h", 2)
    rows, H = h.shape
    if H % 8 or H > NORM_MAX_FEATURES:
        raise ValueError(f"h: features must be a multiple of 8 and at most {NORM_MAX_FEATURES}, got {H}")
    if weight.shape != (H,) or weight.dtype != cupy.float16:
        raise ValueError(f"weight must be float16 [{H}], got {weight.dtype} {weight.shape}")
    delta_h, delta_parts, n_parts = (_NULL, _NULL, np.int32(0)) if delta is None else _check_output(delta, "delta", h.shape)
    out = cupy.empty_like(h) if out is None else out
    if rows:
        args = (h, delta_h, delta_parts, n_parts, weight, out, np.int32(H), np.float32(eps))
        threads = min(_NORM_MAX_THREADS, -(-H // 256) * 32)  # one 8-wide chunk a thread, whole warps
        launch(loader.support_kernel("add_rms_norm"), (rows,), (threads,), args, waits_on_prior_grid=True)
    return out


def rope_kv(qkv, cos, sin, k_cache, v_cache, n_heads: int, n_kv_heads: int, pos: int, T: int):
    """RoPE on q and k of ``qkv`` [B*T, (Hq + 2 Hkv) D] at positions pos .. pos+T-1; returns q
    [B*T, Hq D]; k and v go to the caches [B, Hkv, max_seq, D] at those positions."""
    import cupy

    _check_fp16(qkv, "qkv", 2)
    B, Hkv, max_seq, D = k_cache.shape
    rows = qkv.shape[0]
    if rows != B * T or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * D or Hkv != n_kv_heads:
        raise ValueError(f"qkv {qkv.shape} does not match batch {B} x {T} tokens of "
                         f"({n_heads} + 2 x {n_kv_heads}) heads of {D}")
    if pos < 0 or pos + T > max_seq or cos.shape[0] < pos + T:
        raise ValueError(f"positions {pos} .. {pos + T - 1} do not fit the cache of {max_seq}")
    q = cupy.empty((rows, n_heads * D), dtype=cupy.float16)
    if rows:
        args = (qkv, cos, sin, q, k_cache, v_cache, np.int32(T), np.int32(n_heads), np.int32(n_kv_heads),
                np.int32(D), np.int32(pos), np.int32(max_seq))
        launch(loader.support_kernel("rope_kv"), (rows, n_heads + 2 * n_kv_heads), (D // 2,), args,
               waits_on_prior_grid=True)
    return q


def silu_mul(gate_up):
    """``SiLU(gate) * up`` of ``gate_up`` [rows, 2 I] in (gate, up) pairs of 32 columns
    (:func:`quick_lab.core.format.pair_gate_up`'s layout) -> [rows, I]."""
    import cupy

    _check_fp16(gate_up, "gate_up", 2)
    rows, two_i = gate_up.shape
    if two_i % (2 * GATE_UP_PAIR):
        raise ValueError(f"gate_up: width must be a multiple of {2 * GATE_UP_PAIR} ((gate, up) pairs of "
                         f"{GATE_UP_PAIR} columns), got {two_i}")
    inter = two_i // 2
    out = cupy.empty((rows, inter), dtype=cupy.float16)
    chunks = rows * inter // 8
    if chunks:
        launch(loader.support_kernel("silu_mul"), (-(-chunks // 256),), (256,),
               (gate_up, out, np.int32(rows), np.int32(inter)), waits_on_prior_grid=True)
    return out


def attention_rows(group: int, head_dim: int, tokens: int) -> int:
    """Query rows one attention block serves (the kernel's R): the ``group`` query heads of one KV head
    times as many tokens as fit R * D <= 2048 and R <= 16 (decode: one token)."""
    if group * head_dim > _MAX_ROWS_X_DIM or group > 16:
        raise ValueError(f"{group} query heads per KV head of dim {head_dim}: the attention kernel serves at most "
                         f"16 rows and rows x head_dim <= {_MAX_ROWS_X_DIM}")
    if tokens == 1:
        return group
    per_block = max(1, min(16, _MAX_ROWS_X_DIM // head_dim) // group)
    return group * min(per_block, tokens)


def decode_splits(blocks: int, keys: int, num_sms: int, max_splits: int) -> int:
    """Key-range splits for one decode step: one wave of about 1.5 blocks per SM (two fit: 240
    registers a thread), but only as many as leave each split 128 keys (a tile per warp), at most
    ``max_splits`` (the workspace's size). Measured on an H100 (results/NOTES.md, Mistral-7B's 8 KV
    heads, dependent launches): context 4096, batch 1, 24 splits 11.6 us against 16 12.8 and 32 12.3;
    batch 16 (128 blocks) unsplit 101.6 us against 2 splits 112 and 3 121; context 129 unsplit 4.6 us
    against 2 splits 6.8: a split merge costs more than a short range saves."""
    want = 3 * num_sms // (2 * max(blocks, 1))
    return max(1, min(want, keys // _MIN_KEYS_PER_SPLIT, max_splits))


class AttentionWorkspace:
    """Scratch for split attention: fp32 partials and the zeroed ticket counters (the last block of a
    slot resets its counter, so one buffer serves every launch on a stream)."""

    def __init__(self, slots: int, max_splits: int, rows: int, head_dim: int):
        import cupy

        self.slots, self.max_splits, self.rows, self.head_dim = slots, max_splits, rows, head_dim
        self.partial = cupy.empty(slots * max_splits * rows * (head_dim + 2), dtype=cupy.float32)
        self.tickets = cupy.zeros(max(slots, 1), dtype=cupy.int32)


@functools.lru_cache(maxsize=None)
def _attention_kernel(head_dim: int, rows: int):
    return loader.load_function("decoder.cu", f"attention<{head_dim}, {rows}>")


def _attention_splits(splits, T: int, slots: int, keys: int, workspace, rows: int, D: int) -> int:
    import cupy

    if splits is None:
        splits = 1 if T > 1 or workspace is None else decode_splits(
            slots, keys, device.num_sms(cupy.cuda.Device().id), workspace.max_splits)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if splits * rows > _MAX_MERGE_PAIRS:
        raise ValueError(f"splits = {splits} with {rows} query rows per block: the split merge holds at most "
                         f"{_MAX_MERGE_PAIRS} (split, row) pairs")
    if splits > 1 and (workspace is None or workspace.slots < slots or workspace.max_splits < splits
                       or workspace.rows * workspace.head_dim < rows * D):
        raise ValueError(f"splits = {splits} needs a workspace of >= {slots} slots x {splits} splits x {rows} rows "
                         f"x head dim {D}")
    return splits


def _check_cache(k_cache, v_cache, pos: int, T: int):
    _check_fp16(k_cache, "k_cache", 4)
    _check_fp16(v_cache, "v_cache", 4)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {v_cache.shape} must match k_cache {k_cache.shape}")
    B, Hkv, max_seq, D = k_cache.shape
    if D % 32 or D > 128:
        raise ValueError(f"head_dim must be a multiple of 32, at most 128 (the attention kernel's tiles), got {D}")
    if pos < 0 or pos + T > max_seq:
        raise ValueError(f"positions {pos} .. {pos + T - 1} do not fit the cache of {max_seq}")
    return B, Hkv, max_seq, D


def _launch_attention(q, qkv, cos, sin, k_cache, v_cache, n_heads: int, pos: int, T: int, workspace, splits):
    import cupy

    B, Hkv, max_seq, D = k_cache.shape
    group = n_heads // Hkv
    rows = attention_rows(group, D, T)
    q_tiles = -(-T // (rows // group))
    slots = B * q_tiles * Hkv
    keys = pos + T
    splits = _attention_splits(splits, T, slots, keys, workspace, rows, D)
    chunk = -(-keys // splits)
    chunk = -(-chunk // 32) * 32
    out = cupy.empty((B * T, n_heads * D), dtype=cupy.float16)
    partial, tickets = (workspace.partial, workspace.tickets) if splits > 1 else (_NULL, _NULL)
    qkv_h, qkv_parts, n_parts = (_NULL, _NULL, np.int32(0)) if qkv is None else qkv
    launch(_attention_kernel(D, rows), (splits, Hkv, B * q_tiles), (ATTENTION_WARPS * 32,),
           (_NULL if q is None else q, qkv_h, qkv_parts, n_parts,
            _NULL if cos is None else cos, _NULL if sin is None else sin, k_cache, v_cache, out,
            partial, tickets, np.int32(T), np.int32(n_heads), np.int32(Hkv), np.int32(pos),
            np.int32(max_seq), np.int32(chunk), np.float32(1.0 / math.sqrt(D))), waits_on_prior_grid=True)
    return out


def attention(q, k_cache, v_cache, n_heads: int, pos: int, T: int, workspace: AttentionWorkspace | None = None,
              splits: int | None = None):
    """Causal attention of q [B*T, Hq D] (tokens at pos .. pos+T-1) over the cache, which holds keys
    0 .. pos+T-1: returns [B*T, Hq D] fp16, heads in q's order (query head j uses KV head j // group).
    ``splits`` > 1 (decode) needs a ``workspace``; default: :func:`decode_splits` for T = 1, else 1."""
    _check_fp16(q, "q", 2)
    B, Hkv, max_seq, D = _check_cache(k_cache, v_cache, pos, T)
    if n_heads % Hkv or q.shape != (B * T, n_heads * D):
        raise ValueError(f"q {q.shape} does not match batch {B} x {T} tokens of {n_heads} heads of {D} "
                         f"over {Hkv} KV heads")
    return _launch_attention(q, None, None, None, k_cache, v_cache, n_heads, pos, T, workspace, splits)


def rope_attention(qkv, cos, sin, k_cache, v_cache, n_heads: int, pos: int,
                   workspace: AttentionWorkspace | None = None, splits: int | None = None):
    """One decode step (T = 1) of :func:`rope_kv` + :func:`attention` in one launch: q and k of
    ``qkv`` [B, (Hq + 2 Hkv) D] rotated at ``pos``, k and v written to the caches at ``pos``, then
    attention over keys 0 .. pos. Returns [B, Hq D] fp16. ``qkv`` may also be the qkv GEMM's fp32
    split-K slices [split, B, (Hq + 2 Hkv) D] (epilogue 'partials'), read as the fp16 sum its fix-up
    would have stored."""
    B, Hkv, max_seq, D = _check_cache(k_cache, v_cache, pos, 1)
    if n_heads % Hkv:
        raise ValueError(f"{n_heads} query heads do not divide into {Hkv} KV heads")
    qkv = _check_output(qkv, "qkv", (B, (n_heads + 2 * Hkv) * D))
    if cos.shape[0] <= pos or cos.shape != sin.shape or cos.shape[1] != D // 2:
        raise ValueError(f"cos/sin tables {cos.shape} must have a row for position {pos} and {D // 2} columns")
    return _launch_attention(None, qkv, cos, sin, k_cache, v_cache, n_heads, pos, 1, workspace, splits)
