"""The decoder's fused non-GEMM kernels (kernels/decoder.cu, quick_lab.model.fused) against float64
NumPy references: residual add + RMSNorm, RoPE + KV-cache write, attention over the cache (decode
splits and prefill tiles, GQA and MHA, contexts that cross the split and tile boundaries), SiLU x up.
Outputs and unused cache positions are poisoned with NaN first, so a read or a write out of range
fails. CPU: the split and row rules, and that the presets' instantiations are the prebuilt ones."""
from __future__ import annotations

import math

import numpy as np
import pytest

from quick_lab.build.sources import SUPPORT_TEMPLATES
from quick_lab.model import fused
from quick_lab.model.config import PRESETS
from quick_lab.model.fused_check import poisoned_cache, split_slices


# ---------------------------------------------------------------- CPU


def test_presets_launch_only_prebuilt_attention_instances():
    built = set(SUPPORT_TEMPLATES["decoder.cu"])
    for cfg in PRESETS.values():
        group = cfg.n_heads // cfg.n_kv_heads
        for tokens in (1, 128):
            rows = fused.attention_rows(group, cfg.head_dim, tokens)
            assert f"attention<{cfg.head_dim}, {rows}>" in built, (cfg.name, tokens)


def test_attention_rows_rules():
    assert fused.attention_rows(4, 128, 1) == 4            # decode: one token, the group's heads
    assert fused.attention_rows(4, 128, 100) == 16         # prefill: 4 tokens x 4 heads
    assert fused.attention_rows(1, 128, 3) == 3            # never more tokens than there are
    assert fused.attention_rows(8, 256, 50) == 8           # rows x head_dim <= 2048
    with pytest.raises(ValueError, match="at most 16 rows"):
        fused.attention_rows(32, 64, 1)


def test_decode_splits_fill_the_machine_within_limits():
    assert fused.decode_splits(blocks=8, keys=4096, num_sms=132, max_splits=32) == 24    # 1.5 blocks per SM
    assert fused.decode_splits(blocks=8, keys=2048, num_sms=132, max_splits=32) == 16    # 128 keys a split
    assert fused.decode_splits(blocks=8, keys=4096, num_sms=132, max_splits=8) == 8      # capped by workspace
    assert fused.decode_splits(blocks=8, keys=129, num_sms=132, max_splits=32) == 1      # short: unsplit
    assert fused.decode_splits(blocks=40, keys=4096, num_sms=132, max_splits=32) == 4    # MHA (13B), batch 1
    assert fused.decode_splits(blocks=128, keys=4096, num_sms=132, max_splits=32) == 1   # batch 16 fills a wave
    assert fused.decode_splits(blocks=2048, keys=4096, num_sms=132, max_splits=32) == 1  # batch fills it


# ---------------------------------------------------------------- GPU


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rope_ref(x, pos0, theta, D):
    """x [B, T, H, D] float64, rotate-half RoPE at positions pos0 + t."""
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(pos0, pos0 + x.shape[1]), inv)[None, :, None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,H", [(1, 4096), (7, 5120), (33, 256), (3, 8192), (2, 16384)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_reference(rows, H, with_delta):
    import cupy

    rng = np.random.default_rng(rows * H)
    h = rng.standard_normal((rows, H)).astype(np.float16)
    d = rng.standard_normal((rows, H)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, H).astype(np.float16)
    h_gpu = cupy.asarray(h)
    out = cupy.full((rows, H), np.nan, dtype=cupy.float16)
    fused.add_rms_norm(h_gpu, cupy.asarray(w), 1e-5, delta=cupy.asarray(d) if with_delta else None, out=out)
    hs = (h.astype(np.float64) + d.astype(np.float64)).astype(np.float16) if with_delta else h
    np.testing.assert_array_equal(cupy.asnumpy(h_gpu), hs)  # the residual, updated in place (or not)
    x = hs.astype(np.float64)
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    got = cupy.asnumpy(out)
    assert np.isfinite(got).all() and _rel(got, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inter", [(1, 14336), (7, 32), (33, 544)])
def test_silu_mul_matches_reference(rows, inter):
    import cupy

    gu = np.random.default_rng(inter).standard_normal((rows, 2 * inter)).astype(np.float16)
    got = cupy.asnumpy(fused.silu_mul(cupy.asarray(gu)))
    # (gate, up) pairs of 32 columns: output column 32j + c is gate column 64j + c times up 64j + 32 + c
    pairs = gu.astype(np.float64).reshape(rows, inter // 32, 2, 32)
    g, u = pairs[:, :, 0].reshape(rows, inter), pairs[:, :, 1].reshape(rows, inter)
    ref = g / (1 + np.exp(-g)) * u
    assert np.isfinite(got).all() and _rel(got, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,pos,Hq,Hkv,D", [(1, 1, 0, 32, 8, 128), (3, 5, 7, 4, 2, 64), (2, 17, 0, 40, 40, 128),
                                              (1, 1, 4094, 64, 8, 128)])
def test_rope_kv_rotates_q_and_k_and_fills_the_cache(B, T, pos, Hq, Hkv, D):
    import cupy

    max_seq, theta = pos + T + 3, 1e4
    rng = np.random.default_rng(B * T + pos)
    qkv = rng.standard_normal((B * T, (Hq + 2 * Hkv) * D)).astype(np.float16)
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv)
    cos, sin = cupy.asarray(np.cos(ang).astype(np.float32)), cupy.asarray(np.sin(ang).astype(np.float32))
    k_cache = cupy.full((B, Hkv, max_seq, D), np.nan, dtype=cupy.float16)
    v_cache = cupy.full((B, Hkv, max_seq, D), np.nan, dtype=cupy.float16)
    q = cupy.asnumpy(fused.rope_kv(cupy.asarray(qkv), cos, sin, k_cache, v_cache, Hq, Hkv, pos, T))
    x = qkv.astype(np.float64).reshape(B, T, Hq + 2 * Hkv, D)
    q_ref = _rope_ref(x[:, :, :Hq], pos, theta, D)
    k_ref = _rope_ref(x[:, :, Hq:Hq + Hkv], pos, theta, D).transpose(0, 2, 1, 3)
    v_ref = x[:, :, Hq + Hkv:].transpose(0, 2, 1, 3)
    k, v = cupy.asnumpy(k_cache), cupy.asnumpy(v_cache)
    assert _rel(q.reshape(B, T, Hq, D), q_ref) < 1e-3
    assert _rel(k[:, :, pos:pos + T], k_ref) < 1e-3
    np.testing.assert_array_equal(v[:, :, pos:pos + T], v_ref.astype(np.float16))
    outside = np.ones(max_seq, bool)
    outside[pos:pos + T] = False
    assert np.isnan(k[:, :, outside]).all() and np.isnan(v[:, :, outside]).all()  # nothing else written


def _attention_ref(q, k, v, pos):
    """q [B, T, Hq, D], k/v [B, Hkv, L, D] (L = pos + T) float64; causal, GQA."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    kk, vv = (np.repeat(a, Hq // Hkv, axis=1) for a in (k, v))   # [B, Hq, L, D]
    s = np.einsum("bthd,bhld->bhtl", q, kk) / math.sqrt(D)
    allowed = np.arange(pos + T)[None, :] <= (pos + np.arange(T))[:, None]
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhtl,bhld->bthd", p, vv)


def _run_attention(B, T, pos, Hq, Hkv, D, splits, seed=0):
    import cupy

    max_seq = pos + T + 40  # cache rows beyond pos + T stay NaN: reading one would poison the output
    rng = np.random.default_rng(seed)
    k, v, k_cache, v_cache = poisoned_cache(rng, B, Hkv, pos + T, max_seq, D)
    q = rng.standard_normal((B, T, Hq, D)).astype(np.float16)
    ws = fused.AttentionWorkspace(B * Hkv, 64, Hq // Hkv, D)
    out = fused.attention(cupy.asarray(q.reshape(B * T, Hq * D)), k_cache, v_cache, Hq, pos, T, ws, splits=splits)
    got = cupy.asnumpy(out).reshape(B, T, Hq, D)
    ref = _attention_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), pos)
    return got, ref, ws


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (40, 40, 128), (64, 8, 128), (4, 2, 64), (8, 1, 32)])
@pytest.mark.parametrize("L", [1, 31, 32, 33, 129, 1000])
@pytest.mark.parametrize("splits", [1, 3, 32, 48])  # 48: a merge of 48 partials, most of them empty
def test_decode_attention_matches_reference(Hq, Hkv, D, L, splits):
    got, ref, ws = _run_attention(3, 1, L - 1, Hq, Hkv, D, splits, seed=L * splits)
    assert np.isfinite(got).all() and _rel(got, ref) < 2e-3
    import cupy

    assert int(cupy.count_nonzero(ws.tickets)) == 0  # the last block of every slot reset its ticket


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (40, 40, 128), (64, 8, 128), (4, 2, 64)])
@pytest.mark.parametrize("T,pos", [(2, 0), (5, 0), (17, 0), (33, 9), (100, 0)])
def test_prefill_attention_is_causal_and_matches_reference(Hq, Hkv, D, T, pos):
    got, ref, _ = _run_attention(2, T, pos, Hq, Hkv, D, 1, seed=T + pos)
    assert np.isfinite(got).all() and _rel(got, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (40, 40, 128), (64, 8, 128), (4, 2, 64)])
@pytest.mark.parametrize("pos", [0, 31, 32, 200, 999])
@pytest.mark.parametrize("splits", [None, 1, 3, 32])
def test_rope_attention_fuses_rope_the_cache_write_and_decode_attention(Hq, Hkv, D, pos, splits):
    # One decode step: the new token's q, k rotated at pos, k and v written at pos (the cache holds NaN
    # there and beyond before the call), attention over keys 0 .. pos; against float64 NumPy.
    import cupy

    B, theta, max_seq = 3, 1e4, pos + 9
    rng = np.random.default_rng(pos * 7 + Hq)
    qkv = rng.standard_normal((B, (Hq + 2 * Hkv) * D)).astype(np.float16)
    old_k, old_v, k_cache, v_cache = poisoned_cache(rng, B, Hkv, pos, max_seq, D)
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv)
    cos, sin = cupy.asarray(np.cos(ang).astype(np.float32)), cupy.asarray(np.sin(ang).astype(np.float32))
    ws = fused.AttentionWorkspace(B * Hkv, 32, Hq // Hkv, D)
    out = cupy.asnumpy(fused.rope_attention(cupy.asarray(qkv), cos, sin, k_cache, v_cache, Hq, pos, ws, splits=splits))

    x = qkv.astype(np.float64).reshape(B, 1, Hq + 2 * Hkv, D)
    q = _rope_ref(x[:, :, :Hq], pos, theta, D)
    k_new = _rope_ref(x[:, :, Hq:Hq + Hkv], pos, theta, D).transpose(0, 2, 1, 3)
    v_new = x[:, :, Hq + Hkv:].transpose(0, 2, 1, 3)
    k_got, v_got = cupy.asnumpy(k_cache), cupy.asnumpy(v_cache)
    assert _rel(k_got[:, :, pos:pos + 1], k_new) < 1e-3
    np.testing.assert_array_equal(v_got[:, :, pos:pos + 1], v_new.astype(np.float16))
    assert np.isnan(k_got[:, :, pos + 1:]).all() and np.isnan(v_got[:, :, pos + 1:]).all()
    k = np.concatenate([old_k.astype(np.float64), k_new], axis=2)
    v = np.concatenate([old_v.astype(np.float64), v_new], axis=2)
    ref = _attention_ref(q, k, v, pos)
    assert np.isfinite(out).all() and _rel(out.reshape(ref.shape), ref) < 2e-3
    assert int(cupy.count_nonzero(ws.tickets)) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("rows,H", [(1, 4096), (7, 5120), (16, 8192)])
@pytest.mark.parametrize("parts", [1, 3, 8])
def test_add_rms_norm_reads_split_slices_as_their_fp16_sum(rows, H, parts):
    # delta as a GEMM's fp32 split-K slices: the residual and the output bit for bit those of the fp16 delta
    # its fix-up would have stored (the slices summed in split order, ops.sum_partials).
    import cupy

    rng = np.random.default_rng(rows * parts + H)
    h = cupy.asarray(rng.standard_normal((rows, H)).astype(np.float16))
    w = cupy.asarray(rng.uniform(0.5, 1.5, H).astype(np.float16))
    slices, y = split_slices(rng, parts, (rows, H))
    h_fp16, out_fp16 = h.copy(), cupy.full((rows, H), np.nan, dtype=cupy.float16)
    fused.add_rms_norm(h_fp16, w, 1e-5, delta=y, out=out_fp16)
    out = cupy.full((rows, H), np.nan, dtype=cupy.float16)
    fused.add_rms_norm(h, w, 1e-5, delta=slices, out=out)
    assert bool(cupy.isfinite(out).all())
    assert cupy.array_equal(h, h_fp16) and cupy.array_equal(out, out_fp16)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,pos,splits", [(32, 8, 128, None), (40, 40, 31, 3), (4, 2, 200, 1)])
@pytest.mark.parametrize("parts", [1, 4, 8])
def test_rope_attention_reads_split_slices_as_their_fp16_sum(Hq, Hkv, pos, splits, parts):
    # qkv as the qkv GEMM's split-K slices: output and cache writes bit for bit those of the fp16 qkv.
    import cupy

    B, D, max_seq = 2, 128 if Hq > 4 else 64, pos + 5
    rng = np.random.default_rng(pos + Hq + parts)
    slices, y = split_slices(rng, parts, (B, (Hq + 2 * Hkv) * D))
    inv = 1.0 / 1e4 ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv)
    cos, sin = cupy.asarray(np.cos(ang).astype(np.float32)), cupy.asarray(np.sin(ang).astype(np.float32))
    results = []
    for qkv in (y, slices):
        _, _, k_cache, v_cache = poisoned_cache(np.random.default_rng(5), B, Hkv, pos, max_seq, D)
        ws = fused.AttentionWorkspace(B * Hkv, 32, Hq // Hkv, D)
        out = fused.rope_attention(qkv, cos, sin, k_cache, v_cache, Hq, pos, ws, splits=splits)
        results.append((out, k_cache, v_cache))
    (out16, k16, v16), (out, k, v) = results
    assert bool(cupy.isfinite(out).all()) and cupy.array_equal(out, out16)
    assert cupy.array_equal(k[:, :, :pos + 1], k16[:, :, :pos + 1]) and cupy.array_equal(v[:, :, :pos + 1], v16[:, :, :pos + 1])


@pytest.mark.gpu
def test_decode_attention_default_splits_and_repeat_launches_agree():
    # Same inputs, default split choice, launched twice on one workspace: identical bits (the split
    # merge is in split order, and the tickets were left at zero by the first launch).
    import cupy

    B, Hq, Hkv, D, L = 1, 32, 8, 128, 4096
    rng = np.random.default_rng(1)
    k_cache = cupy.asarray(rng.standard_normal((B, Hkv, L, D)).astype(np.float16))
    v_cache = cupy.asarray(rng.standard_normal((B, Hkv, L, D)).astype(np.float16))
    q = cupy.asarray(rng.standard_normal((B, Hq * D)).astype(np.float16))
    ws = fused.AttentionWorkspace(B * Hkv, 32, Hq // Hkv, D)
    a = fused.attention(q, k_cache, v_cache, Hq, L - 1, 1, ws)
    b = fused.attention(q, k_cache, v_cache, Hq, L - 1, 1, ws)
    np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))
    ref = _attention_ref(cupy.asnumpy(q).astype(np.float64).reshape(B, 1, Hq, D),
                         cupy.asnumpy(k_cache).astype(np.float64), cupy.asnumpy(v_cache).astype(np.float64), L - 1)
    assert _rel(cupy.asnumpy(a).reshape(ref.shape), ref) < 2e-3


@pytest.mark.gpu
def test_fused_ops_reject_bad_input():
    import cupy

    h = cupy.ones((2, 100), dtype=cupy.float16)
    with pytest.raises(ValueError, match="multiple of 8"):
        fused.add_rms_norm(h, cupy.ones(100, dtype=cupy.float16), 1e-5)
    with pytest.raises(ValueError, match="float16"):
        fused.silu_mul(cupy.ones((2, 32), dtype=cupy.float32))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        fused.silu_mul(np.ones((2, 32), dtype=np.float16))
    with pytest.raises(ValueError, match="multiple of 64"):
        fused.silu_mul(cupy.ones((2, 96), dtype=cupy.float16))  # 48 outputs: not whole pairs of 32
    cache = cupy.zeros((1, 2, 8, 64), dtype=cupy.float16)
    q = cupy.ones((1, 4 * 64), dtype=cupy.float16)
    with pytest.raises(ValueError, match="do not fit the cache"):
        fused.attention(q, cache, cache, 4, 8, 1)
    with pytest.raises(ValueError, match="needs a workspace"):
        fused.attention(q, cache, cache, 4, 3, 1, splits=2)
    with pytest.raises(ValueError, match="1 <= split <= 8"):  # more slices than the kernels sum
        fused.add_rms_norm(cupy.ones((2, 64), cupy.float16), cupy.ones(64, cupy.float16), 1e-5,
                           delta=cupy.ones((9, 2, 64), cupy.float32))
    with pytest.raises(ValueError, match="split-K slices must be"):
        fused.add_rms_norm(cupy.ones((2, 64), cupy.float16), cupy.ones(64, cupy.float16), 1e-5,
                           delta=cupy.ones((2, 3, 64), cupy.float32))
    with pytest.raises(ValueError, match="delta must have shape"):
        fused.add_rms_norm(cupy.ones((2, 64), cupy.float16), cupy.ones(64, cupy.float16), 1e-5,
                           delta=cupy.ones((3, 64), cupy.float16))


def test_check_decoder_runs_the_fused_target_module(monkeypatch, tmp_path):
    # `quick-lab check --decoder` hands the sanitizer driver the model-level target program, its
    # report stem and the kernels it launches (the driver itself is tested in test_sanitizer.py).
    import quick_lab.cli
    from quick_lab.lab import sanitizer
    from quick_lab.model import fused_check

    seen = {}
    monkeypatch.setattr(quick_lab.cli, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: "/usr/bin/compute-sanitizer")
    monkeypatch.setattr(sanitizer, "check", lambda out_dir, **kw: seen.update(kw) or 0)
    assert quick_lab.cli.main(["check", "--decoder", "--out", str(tmp_path)]) == 0
    assert seen["module"] == "quick_lab.model.fused_check" == fused_check.MODULE
    assert seen["stem"] == "sanitizer_decoder" and set(seen["kernels"]) == {"add_rms_norm", "silu_mul", "rope_kv",
                                                                             "attention"}
    assert sanitizer._target(tmp_path, None, None, "py", fused_check.MODULE) == ["py", "-m", fused_check.MODULE]


@pytest.mark.gpu
def test_fused_check_target_passes_and_can_fail(monkeypatch, capsys):
    from quick_lab.lab.sanitizer_target import TARGET_MISMATCH_EXIT
    from quick_lab.model import fused_check

    import cupy

    allocator = cupy.cuda.get_allocator()
    try:
        assert fused_check.main([]) == 0
        out = capsys.readouterr().out
        assert f"QL-DONE {len(fused_check.cases())} cases, 0 mismatches" in out
        monkeypatch.setattr(fused_check, "REL_TOL", 0.0)  # no result is exact: every case must now fail
        assert fused_check.main([]) == TARGET_MISMATCH_EXIT
        assert capsys.readouterr().out.count("QL-MISMATCH") == len(fused_check.cases())
    finally:
        cupy.cuda.set_allocator(allocator)
