"""End-to-end decoder: presets, memory estimates and the NumPy reference on the CPU; the CuPy model,
its three backends, the KV cache and the CUDA-graph timing path on the GPU (marked gpu)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quick_lab.core.format import dequantize, pair_gate_up, split_gate_up
from quick_lab.model.config import (BACKENDS, LLAMA2_13B, LLAMA2_70B, MISTRAL_7B, PRESETS, ModelConfig,
                                    memory_estimate, preset)
from quick_lab.model.cublas import matmul
from quick_lab.model.decoder import Model
from quick_lab.model.generate import decode, greedy
from quick_lab.model.reference import reference_forward
from quick_lab.model.sweep import E2E_BATCHES, capture, decode_throughput, e2e_sweep, summary_table
from quick_lab.model.weights import random_quantized_linear, random_weights

# Kernel limits: N a multiple of 64, K of the group size (128).
TINY = ModelConfig(hidden=256, intermediate=512, n_heads=4, n_kv_heads=2, n_layers=2, vocab=320,
                       rope_theta=1e4, name="tiny")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- CPU


def test_presets_match_the_published_configs():
    m, l13, l70 = MISTRAL_7B, LLAMA2_13B, LLAMA2_70B
    assert (m.hidden, m.intermediate, m.n_heads, m.n_kv_heads, m.n_layers, m.vocab, m.rope_theta) == \
        (4096, 14336, 32, 8, 32, 32000, 1e6)
    assert (l13.hidden, l13.intermediate, l13.n_heads, l13.n_kv_heads, l13.n_layers, l13.rope_theta) == \
        (5120, 13824, 40, 40, 40, 1e4)
    assert (l70.hidden, l70.intermediate, l70.n_heads, l70.n_kv_heads, l70.n_layers, l70.rope_theta) == \
        (8192, 28672, 64, 8, 80, 1e4)
    assert {c.head_dim for c in (m, l13, l70)} == {128}
    assert preset("llama2-70b") is l70
    with pytest.raises(ValueError, match="unknown model"):
        preset("gpt-2")
    assert dataclasses.replace(l70, n_layers=4).n_layers == 4


def test_linear_shapes_fit_the_kernels():
    assert MISTRAL_7B.linear_shapes() == {"qkv": (4096, 6144), "o": (4096, 4096),
                                              "gate_up": (4096, 28672), "down": (14336, 4096)}
    assert LLAMA2_70B.linear_shapes()["qkv"] == (8192, 10240)
    for cfg in (*PRESETS.values(), TINY):
        for K, N in cfg.linear_shapes().values():
            assert K % 128 == 0 and N % 64 == 0, (cfg.name, K, N)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(hidden=256, intermediate=512, n_heads=4, n_kv_heads=3, n_layers=1)
    with pytest.raises(ValueError, match="intermediate must be a multiple of 32"):
        ModelConfig(hidden=256, intermediate=520, n_heads=4, n_kv_heads=2, n_layers=1)


def test_gate_up_pairs_are_exact_and_split_back():
    gate, up = random_quantized_linear(256, 96, seed=1, group_size=64), random_quantized_linear(256, 96, seed=2,
                                                                                                group_size=64)
    paired = pair_gate_up(gate, up)
    assert (paired.K, paired.N, paired.group_size) == (256, 192, 64)
    dense, g, u = dequantize(paired), dequantize(gate), dequantize(up)
    for j in range(3):  # columns 64j .. 64j + 31 are gate's 32j .., the next 32 up's
        np.testing.assert_array_equal(dense[:, 64 * j:64 * j + 32], g[:, 32 * j:32 * j + 32])
        np.testing.assert_array_equal(dense[:, 64 * j + 32:64 * j + 64], u[:, 32 * j:32 * j + 32])
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    got_g, got_u = split_gate_up(x @ dense)
    np.testing.assert_allclose(got_g, x @ g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_u, x @ u, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must match"):
        pair_gate_up(gate, random_quantized_linear(256, 64, seed=3, group_size=64))
    with pytest.raises(ValueError, match="multiple of 32"):
        pair_gate_up(*(random_quantized_linear(256, 40, seed=s, group_size=64) for s in (4, 5)))


def test_memory_estimates():
    # ~0.86 G params per 70B layer: int4 ~0.44 GB per copy, fp16 1.7 GB.
    assert LLAMA2_70B.params_per_layer() == 8192 * 10240 + 8192 * 8192 + 8192 * 57344 + 28672 * 8192
    four = dataclasses.replace(LLAMA2_70B, n_layers=4)
    est = memory_estimate(four, batch=256, max_seq=256)
    assert 10.0e9 < est["weights"] < 11.0e9
    assert est["kv_cache"] == 2 * 256 * 8 * 256 * 128 * 2 * 4
    assert est["total"] < 20e9
    # the whole 70B model in fp16 does not fit an 80 GB GPU: the reason for n_layers
    assert memory_estimate(LLAMA2_70B, backends=("fp16",))["weights"] > 80e9
    int4 = memory_estimate(MISTRAL_7B, backends=("awq",))["weights"]
    assert 3.5e9 < int4 < 4.0e9
    # a model holds only its backends' forms: the QUICK words replace, not join, the AutoAWQ ones
    assert memory_estimate(MISTRAL_7B, backends=("quick",))["weights"] == int4
    assert memory_estimate(MISTRAL_7B, backends=("awq", "quick"))["weights"] == 2 * int4


def test_random_quantized_linear_is_small_and_valid():
    awq = random_quantized_linear(1024, 512, seed=3)
    w = dequantize(awq)
    assert 0.015 < np.sqrt((w * w).mean()) < 0.025
    again = random_quantized_linear(1024, 512, seed=3)
    np.testing.assert_array_equal(awq.scales, again.scales)
    np.testing.assert_array_equal(awq.qweight, again.qweight)


def test_random_weights_layers_distinct_or_shared():
    w = random_weights(TINY, seed=1)
    assert w.layers[0].qkv is not w.layers[1].qkv
    assert not np.array_equal(w.layers[0].qkv.qweight, w.layers[1].qkv.qweight)
    shared = random_weights(TINY, seed=1, distinct_layers=False)
    assert shared.layers[0] is shared.layers[1]
    assert w.embed.shape == (320, 256) and w.lm_head.shape == (256, 320)


def test_reference_forward_is_causal():
    w = random_weights(TINY, seed=2)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab, (2, 9))
    logits = reference_forward(w, tokens)
    assert logits.shape == (2, 9, 320) and np.isfinite(logits).all()
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab
    other = reference_forward(w, changed)
    np.testing.assert_allclose(other[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, -1], logits[:, -1])


def test_activations_stay_in_fp16_range_through_32_layers():
    # The residual stream grows ~linearly with depth and ~sqrt(K) with width: at full Mistral-7B size
    # the max |residual| measured 358 (32 layers), at Llama-2-70B size 2276 (80 layers); fp16 tops at
    # 65504. Here a narrower model (fast on a CPU) at full depth.
    cfg = dataclasses.replace(MISTRAL_7B, hidden=1024, intermediate=3584, n_heads=8, n_kv_heads=2,
                              vocab=512)
    w = random_weights(cfg, distinct_layers=False)
    stats: dict = {}
    logits = reference_forward(w, np.random.default_rng(0).integers(0, cfg.vocab, (1, 8)), stats=stats)
    assert np.isfinite(logits).all()
    assert 1.0 < stats["max_abs_residual"] < 2000


def test_linear_launch_asks_dispatch_without_fallback(monkeypatch):
    # The model handles large M itself (FP16_FALLBACK_M), so each linear asks quick_lab.core.dispatch
    # for a kernel with allow_fallback=False. CPU check of the call against dispatch.choose's signature.
    import inspect

    import cupy

    from quick_lab.core import configs, dispatch
    from quick_lab.model import decoder

    real, calls = dispatch.choose, []

    def choose(*args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)
        calls.append((args, kwargs))
        return dispatch.Choice("quick", configs.QUICK_DEFAULT, 2)

    monkeypatch.setattr(dispatch, "choose", choose)
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: type("D", (), {"id": 0})())
    decoder._launch.cache_clear()
    try:
        assert decoder._launch("quick", 16, 4096, 4096, 128) == {"config": configs.QUICK_DEFAULT, "split_k": 2}
    finally:
        decoder._launch.cache_clear()
    (args, kwargs), = calls
    bound = inspect.signature(real).bind(*args, **kwargs).arguments
    assert (bound["kind"], bound["M"], bound["K"], bound["N"], bound["group_size"]) == ("quick", 16, 4096, 4096, 128)
    assert bound["allow_fallback"] is False


def test_cli_defaults_and_validation():
    from quick_lab.cli import build_parser

    args = build_parser().parse_args(["e2e"])
    assert args.models == tuple(PRESETS) == ("mistral-7b", "llama2-13b", "llama2-70b")
    assert args.batches == E2E_BATCHES == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert args.backends == BACKENDS == ("fp16", "awq", "quick")
    assert (args.layers, args.prefill, args.decode) == (None, 128, 128)   # full depth where it fits
    assert (args.long_context, args.long_batches, args.breakdown) == (4096, (1, 16), False)
    args = build_parser().parse_args(["e2e", "--models", "mistral-7b", "--batches", "1,16", "--backends", "awq,quick"])
    assert args.models == ("mistral-7b",) and args.batches == (1, 16) and args.backends == ("awq", "quick")
    for bad in (["--models", "nope"], ["--models", "gpt2"], ["--backends", "int8"], ["--batches", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["e2e", *bad])


def test_model_shapes_are_the_presets_linears_and_the_cli_word_models():
    import argparse

    from quick_lab.cli import shape_list
    from quick_lab.lab.bench import SHAPES
    from quick_lab.model.config import model_shapes

    shapes = model_shapes()
    # the decode shapes issue 13 lists: fused qkv, o, fused gate_up, down of Mistral-7B, Llama-2-13B/70B
    for s in ((4096, 6144), (4096, 28672), (14336, 4096), (5120, 15360), (5120, 27648), (13824, 5120),
              (8192, 10240), (8192, 57344), (28672, 8192)):
        assert s in shapes
    assert len(shapes) == len(set(shapes)) == 12 and model_shapes(["mistral-7b"]) == shapes[:4]
    assert shape_list("models") == shapes
    assert shape_list("bench") == SHAPES
    mixed = shape_list("4096x4096,models,bench")
    assert mixed[0] == (4096, 4096) and len(mixed) == len(set(shapes) | set(SHAPES))  # each once, in order
    with pytest.raises(argparse.ArgumentTypeError, match="`models` or `bench`"):
        shape_list("modles")


def test_cli_without_gpu_exits_2(monkeypatch, capsys):
    import quick_lab.cli

    monkeypatch.setattr(quick_lab.cli, "cuda_device_status", lambda: (False, "no device (test)"))
    assert quick_lab.cli.main(["e2e", "--models", "mistral-7b"]) == 2
    err = capsys.readouterr().err
    assert "e2e measures on a GPU" in err and "no device (test)" in err


def test_e2e_sweep_signature_is_what_cli_passes():
    import inspect

    params = inspect.signature(e2e_sweep).parameters
    assert list(params)[:3] == ["models", "batches", "backends"]
    assert params["models"].default == tuple(PRESETS) and params["batches"].default == E2E_BATCHES
    for name in ("n_layers", "prefill", "decode_steps", "graph", "lm_head", "reps", "long_context", "long_batches",
                 "progress"):
        assert name in params, name


def test_a_prefill_that_does_not_fit_is_retried_with_the_cache_filled(monkeypatch):
    import cupy

    from quick_lab.model import sweep

    calls = []

    def fake(cfg, batch, backend, context, decode_steps, *, model, graph, reps, fill_cache):
        calls.append(fill_cache)
        if not fill_cache or batch == 512:
            raise cupy.cuda.memory.OutOfMemoryError(3 << 30, 1 << 30, 80 << 30)
        return dict(model=cfg.name, batch=batch, prefill_timed=False, tokens_per_s=1.0)

    monkeypatch.setattr(sweep, "decode_throughput", fake)
    monkeypatch.setattr(cupy, "get_default_memory_pool", lambda: type("P", (), {"free_all_blocks": lambda s: None})())
    row = sweep._run_case(LLAMA2_70B, 256, "quick", 128, 128, None, True, 1, False, 80)
    assert calls == [False, True] and row["prefill_timed"] is False and row["tokens_per_s"] == 1.0
    assert row["note"].startswith("prefill did not fit") and "cache filled instead" in row["note"]
    calls.clear()
    row = sweep._run_case(LLAMA2_70B, 512, "quick", 128, 128, None, True, 1, False, 80)  # decode does not fit
    assert calls == [False, True] and "error" in row and "tokens_per_s" not in row
    calls.clear()
    row = sweep._run_case(LLAMA2_70B, 16, "quick", 4096, 128, None, True, 1, True, 80)   # already filled: no retry
    assert calls == [True] and row["tokens_per_s"] == 1.0


def test_sweep_plan_is_full_depth_where_it_fits_an_80gb_gpu():
    from quick_lab.model.sweep import sweep_plan

    free = 79e9  # an H100 80GB after the CUDA context
    cases = [(b, 128, False) for b in E2E_BATCHES] + [(1, 4096, True), (16, 4096, True)]

    def depth(plan):  # (backend, case) -> layers built
        return {(b, c): n for group, n, runs in plan for b in group for c in runs}

    # Mistral-7B: one model, every backend, every case at full depth
    plan = sweep_plan(MISTRAL_7B, BACKENDS, cases, free, True, None)
    assert [(g, n) for g, n, _ in plan] == [(BACKENDS, 32)] and sorted(plan[0][2]) == sorted(cases)
    # Llama-2-13B: full depth for every backend and case, except fp16 where 26 GB of weights and its
    # MHA cache cannot share 80 GB (54 GB at batch 256 x 256, 55 GB at batch 16 x 4224)
    d = depth(sweep_plan(LLAMA2_13B, BACKENDS, cases, free, True, None))
    assert len(d) == len(BACKENDS) * len(cases)
    too_big = {("fp16", (256, 128, False)), ("fp16", (16, 4096, True))}
    assert all(n == 40 for key, n in d.items() if key not in too_big)
    assert all(1 <= d[key] < 40 for key in too_big)
    # Llama-2-70B: int4 backends at full depth, fp16 (140 GB of weights) a part, never 0 layers
    d = depth(sweep_plan(LLAMA2_70B, BACKENDS, cases, free, True, None))
    assert all(n == 80 for (b, _), n in d.items() if b != "fp16")
    assert all(1 <= n < 40 for (b, _), n in d.items() if b == "fp16")
    # a cap applies to every model
    assert {n for _, n, _ in sweep_plan(LLAMA2_70B, ("quick",), cases, free, True, 4)} == {4}


def test_model_package_imports_no_cupy_and_points_down():
    # The CPU-side modules must import without cupy, and nothing in quick_lab.model may import from
    # the layers above it (report, cli).
    import ast
    import pathlib
    import subprocess
    import sys

    code = ("import sys; import quick_lab.model, quick_lab.model.sweep, quick_lab.model.checkpoint; "
            "assert 'cupy' not in sys.modules, 'cupy imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)
    root = pathlib.Path(__file__).resolve().parents[1] / "quick_lab" / "model"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for mod in mods:
                assert not mod.startswith(("quick_lab.report", "quick_lab.cli")), (path.name, mod)
                assert getattr(node, "level", 0) == 0, (path.name, "relative import")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_ctypes_cublas_matmul_matches_cupy():
    import cupy

    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((33, 256)).astype(np.float16))
    w = cupy.asarray(rng.standard_normal((256, 320)).astype(np.float16))
    ref = cupy.matmul(x.astype(cupy.float32), w.astype(cupy.float32))
    assert rel(cupy.asnumpy(matmul(x, w)), cupy.asnumpy(ref)) < 2e-3
    # attention-shaped: a KV-cache slice [B, H, :L, D] read in place, transposed, fp32 out
    cache = cupy.asarray(rng.standard_normal((3, 2, 40, 64)).astype(np.float16))
    q = cupy.asarray(rng.standard_normal((3, 2, 5, 64)).astype(np.float16))
    k = cache[:, :, :17]
    s = matmul(q, k, transpose_b=True, out_dtype=cupy.float32)
    ref = cupy.matmul(q.astype(cupy.float32), k.astype(cupy.float32).swapaxes(2, 3))
    assert s.dtype == cupy.float32 and rel(cupy.asnumpy(s), cupy.asnumpy(ref)) < 2e-3
    p = cupy.asarray(rng.random((3, 2, 5, 17)).astype(np.float16))
    o = matmul(p, k)
    ref = cupy.matmul(p.astype(cupy.float32), k.astype(cupy.float32))
    assert o.shape == (3, 2, 5, 64) and rel(cupy.asnumpy(o), cupy.asnumpy(ref)) < 2e-3
    one_row = matmul(q[:, :, :1], k, transpose_b=True)  # decode with one query per kv head
    ref = cupy.matmul(q[:, :, :1].astype(cupy.float32), k.astype(cupy.float32).swapaxes(2, 3))
    assert rel(cupy.asnumpy(one_row), cupy.asnumpy(ref)) < 2e-3


@pytest.fixture(scope="module")
def tiny_model():
    weights = random_weights(TINY, seed=5)
    return weights, Model(weights)


def _tokens(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab, (B, T), dtype=np.int32)


@pytest.mark.gpu
def test_prefill_matches_numpy_reference(tiny_model):
    import cupy

    weights, model = tiny_model
    tokens = _tokens(3, 20)
    ref = reference_forward(weights, tokens)
    for backend in BACKENDS:
        cache = model.new_cache(3, 32)
        logits = cupy.asnumpy(model.forward(cupy.asarray(tokens), cache, 0, backend, last_only=False))
        assert np.isfinite(logits).all()
        assert rel(logits, ref) < 2e-2, backend


@pytest.mark.gpu
def test_backends_agree(tiny_model):
    import cupy

    _, model = tiny_model
    tokens = cupy.asarray(_tokens(4, 16, seed=1))
    out = {b: cupy.asnumpy(model.forward(tokens, model.new_cache(4, 16), 0, b, last_only=False))
           for b in BACKENDS}
    assert rel(out["quick"], out["awq"]) < 1e-2
    assert rel(out["awq"], out["fp16"]) < 2e-2


@pytest.mark.gpu
def test_decode_with_cache_matches_full_sequence(tiny_model):
    # Prefill 12 tokens, then feed tokens 12..19 one at a time through the KV cache: each step's logits
    # must equal the reference's logits at that position (checks cache writes and RoPE offsets).
    import cupy

    weights, model = tiny_model
    tokens = _tokens(2, 20, seed=2)
    ref = reference_forward(weights, tokens)
    for backend in ("fp16", "quick"):
        cache = model.new_cache(2, 24)
        first = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, :12]), cache, 0, backend))
        assert rel(first, ref[:, 11]) < 2e-2
        for t in range(12, 20):
            step = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, backend))
            assert rel(step, ref[:, t]) < 2e-2, (backend, t)


def _pin_decode_gemm(monkeypatch, config: str, split: int) -> None:
    """Every QUICK launch of at most 8 rows runs the decode kernel ``config`` at ``split``."""
    from quick_lab.core.configs import TileConfig
    from quick_lab.model import decoder

    pinned = {"config": TileConfig.parse(config), "split_k": split}
    real = decoder._launch
    monkeypatch.setattr(decoder, "_launch", lambda kind, M, K, N, G: pinned if kind == "quick" and M <= 8
                        else real(kind, M, K, N, G))


@pytest.mark.gpu
@pytest.mark.parametrize("config,split", [("8x64x256_w1x4_s1_dc", 1), ("32x64x128_w1x4_s1_dc", 2)])
def test_quick_decode_applies_silu_mul_in_the_gate_up_writer(tiny_model, monkeypatch, config, split):
    # The QUICK decode GEMM pinned for every decode-size launch: the layer then has no silu_mul op (the
    # gate_up GEMM's writer applies it to the paired columns) and decode steps still match the reference.
    import cupy

    weights, model = tiny_model
    _pin_decode_gemm(monkeypatch, config, split)
    tokens = _tokens(2, 14, seed=4)
    ref = reference_forward(weights, tokens)
    cache = model.new_cache(2, 16)
    model.forward(cupy.asarray(tokens[:, :10]), cache, 0, "quick")
    st = model.start(cupy.asarray(tokens[:, 10:11]), cache, 10)
    gate_up = model.layers[0].gate_up
    assert gate_up.applies("silu_mul", 2, "quick") and not gate_up.applies("silu_mul", 2, "awq")
    assert [n for n, _ in model.layer_ops(0, cache, st, "quick")].count("silu_mul") == 0
    assert [n for n, _ in model.layer_ops(0, cache, st, "awq")].count("silu_mul") == 1
    for t in range(10, 14):
        step = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, "quick"))
        assert np.isfinite(step).all() and rel(step, ref[:, t]) < 2e-2, t
    with pytest.raises(ValueError, match="runs only in the QUICK decode GEMM"):
        model.layers[0].gate_up(cupy.ones((2, TINY.hidden), cupy.float16), "fp16", epilogue="silu_mul")


@pytest.mark.gpu
@pytest.mark.parametrize("config,split", [("8x64x256_w1x4_s1_dc", 1), ("32x64x128_w1x4_s1_dc", 2)])
def test_decode_step_reads_split_slices_bit_for_bit_as_the_fixed_up_outputs(tiny_model, monkeypatch, config, split):
    # In a decode step the qkv, o and down GEMMs leave fp32 split-K slices that the attention and the norms
    # sum as they read them: the logits are the bits of the same step with every GEMM fixing up its own
    # output; prefill (T > 1) and the other backends store.
    import cupy

    from quick_lab.model import decoder

    weights, model = tiny_model
    _pin_decode_gemm(monkeypatch, config, split)
    tokens = _tokens(2, 14, seed=6)
    layer = model.layers[0]

    def decode(epilogues):
        monkeypatch.setattr(decoder, "DECODE_EPILOGUES", epilogues)
        cache = model.new_cache(2, 16)
        model.forward(cupy.asarray(tokens[:, :10]), cache, 0, "quick")
        step = model.start(cupy.asarray(tokens[:, 10:11]), cache, 10)
        used = {name: model.decode_epilogue(layer, name, step, "quick") for name in decoder.GEMM_OPS}
        return used, [cupy.asnumpy(model.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, "quick"))
                      for t in range(10, 14)]

    used, sliced = decode(dict(decoder.DECODE_EPILOGUES))
    assert used == {"qkv": "partials", "o": "partials", "gate_up": "silu_mul", "down": "partials"}
    prefill = model.start(cupy.asarray(tokens[:, :3]), model.new_cache(2, 16), 0)
    assert model.decode_epilogue(layer, "o", prefill, "quick") == "store"
    step = model.start(cupy.asarray(tokens[:, :1]), model.new_cache(2, 16), 0)
    assert model.decode_epilogue(layer, "o", step, "awq") == "store"
    stored, fixed = decode({**decoder.DECODE_EPILOGUES, "qkv": "store", "o": "store", "down": "store"})
    assert set(stored.values()) == {"store", "silu_mul"}
    ref = reference_forward(weights, tokens)
    for t, (a, b) in enumerate(zip(sliced, fixed)):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all() and rel(a, ref[:, 10 + t]) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_heads", [4, 1], ids=["mha", "gqa4"])
def test_long_context_decode_crosses_attention_splits(n_kv_heads):
    # A prompt past the attention kernel's split threshold (128 keys a split): prefill 520 tokens in
    # one forward (tiled, causal), then decode steps whose attention runs in 4 splits merged by the
    # ticket, with RoPE and the cache write inside; every step's logits equal the NumPy reference's.
    import cupy

    from quick_lab.model import fused

    cfg = dataclasses.replace(TINY, n_kv_heads=n_kv_heads, name=f"tiny-kv{n_kv_heads}")
    weights = random_weights(cfg, seed=11)
    model = Model(weights, backends=("quick", "fp16"))
    tokens = np.random.default_rng(12).integers(0, cfg.vocab, (2, 523), dtype=np.int32)
    ref = reference_forward(weights, tokens)
    assert fused.decode_splits(2 * n_kv_heads, 521, 132, 32) == 4  # the steps below are split
    for backend in ("quick", "fp16"):
        cache = model.new_cache(2, 528)
        first = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, :520]), cache, 0, backend))
        assert rel(first, ref[:, 519]) < 2e-2, backend
        for t in range(520, 523):
            step = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, backend))
            assert np.isfinite(step).all() and rel(step, ref[:, t]) < 2e-2, (backend, t)


@pytest.mark.gpu
def test_greedy_decode_no_nan_and_graph_replay_matches_eager(tiny_model):
    import cupy

    _, model = tiny_model
    prompt = cupy.asarray(_tokens(8, 16, seed=3))
    for backend in BACKENDS:
        cache = model.new_cache(8, 32)
        first = greedy(model.forward(prompt, cache, 0, backend))
        eager = decode(model, cache, first, 16, 8, backend)
        logits = model.forward(eager, cache, 24, backend)
        assert bool(cupy.isfinite(logits).all()), backend
        assert bool(cupy.isfinite(cache.k[-1][:, :, :25]).all())

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            decode(model, cache, first, 16, 1, backend)  # warm up outside the capture
            graph, replayed = capture(lambda: decode(model, cache, first, 16, 8, backend), stream)
            graph.launch(stream)
        stream.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(replayed), cupy.asnumpy(eager))


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [True, False])
def test_decode_throughput_tiny(graph):
    cfg = dataclasses.replace(TINY, n_layers=8)
    for backend in BACKENDS:
        r = decode_throughput(cfg, 2, backend, prefill=16, decode_steps=8, n_layers=1, graph=graph)
        assert r["layers"] == 1 and r["full_layers"] == 8 and r["backend"] == backend
        for key in ("prefill_ms", "decode_ms", "lm_head_ms", "tokens_per_s", "full_depth_tokens_per_s_estimate"):
            assert r[key] > 0, key
        assert r["full_depth_tokens_per_s_estimate"] < r["tokens_per_s"]


@pytest.mark.gpu
def test_sweep_rows():
    df = e2e_sweep([dataclasses.replace(TINY, n_layers=2)], batches=(1, 3), n_layers=1, prefill=8,
                       decode_steps=4, reps=1)
    assert len(df) == 6 and (df["tokens_per_s"] > 0).all()
    table = summary_table(df)
    assert "quick/awq" in table.columns


@pytest.mark.gpu
def test_full_depth_mistral_stays_finite():
    # Real Mistral-7B shapes, all 32 layers, int4 only (~8 GB with both layouts): no fp16 overflow.
    import cupy

    model = Model(random_weights(MISTRAL_7B, distinct_layers=False), backends=("awq", "quick"))
    prompt = cupy.asarray(np.random.default_rng(0).integers(0, 32000, (2, 32), dtype=np.int32))
    out = {}
    for backend in ("awq", "quick"):
        cache = model.new_cache(2, 40)
        first = greedy(model.forward(prompt, cache, 0, backend))
        tokens = decode(model, cache, first, 32, 4, backend)
        out[backend] = cupy.asnumpy(model.forward(tokens, cache, 36, backend))
        assert np.isfinite(out[backend]).all(), backend


# ---------------------------------------------------------------- in-graph decode GEMM configs


def test_decode_tuning_candidates_are_the_decode_variants_that_fit():
    from quick_lab.core import configs
    from quick_lab.model import decode_tuning

    one = decode_tuning.candidates(1, 4096, 4096, 128)  # the 8-row tiles, every one (each tile_k divides 4096)
    assert {c for c, _ in one} == {c for c in configs.QUICK_DECODE_VARIANTS if c.tile_m == 8}
    assert all(1 <= s <= 4096 // c.tile_k and s in decode_tuning.SPLITS for c, s in one)
    assert {c.tile_m for c, _ in decode_tuning.candidates(16, 4096, 4096, 128)} == {16}
    assert {c.tile_m for c, _ in decode_tuning.candidates(9, 4096, 4096, 128)} == {16}
    assert {c.tile_m for c, _ in decode_tuning.candidates(17, 4096, 4096, 128)} == {32}
    assert decode_tuning.candidates(33, 4096, 4096, 128) == []
    assert all(c.tile_k <= 256 for c, _ in decode_tuning.candidates(1, 256, 1024, 128))  # one k-tile at most
    assert decode_tuning.MAX_DECODE_M == 32
    with pytest.raises(ValueError, match="batches must be positive ints"):
        decode_tuning.tune_decode_gemms(None, [1, 0])


@pytest.mark.gpu
def test_decode_tuning_pins_a_fitting_config_and_decode_still_matches(monkeypatch):
    import cupy

    from quick_lab.core import ops, registry
    from quick_lab.model import decode_tuning

    weights = random_weights(TINY, seed=9)
    model = Model(weights, backends=("quick",))
    rows = decode_tuning.tune_decode_gemms(model, [2, 1, 64], reps=3)
    shapes = {(K, N) for K, N in TINY.linear_shapes().values()}
    assert {(r["K"], r["N"]) for r in rows} == shapes and sorted({r["M"] for r in rows}) == [1, 2]  # 64: the table's
    for r in rows:
        assert r["us"] <= r["table_us"] and np.isfinite(r["us"])
    # each GEMM timed with the writer its step uses; those leaving slices with a reader summing them
    assert {r["epilogue"] for r in rows} == {"partials", "silu_mul"}
    assert all(r["with_reader"] == (r["epilogue"] == "partials") for r in rows)
    for layer in model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            assert set(lin.decode_launch) == {1, 2}
            for M, pin in lin.decode_launch.items():
                assert registry.fits(pin["config"], lin.N, lin.group_size, K=lin.K, M=M)
                assert lin.quick_launch(M) is pin
    used = []
    real = ops.quick_gemm
    monkeypatch.setattr(ops, "quick_gemm", lambda *a, **kw: used.append((kw["config"], kw["split_k"])) or real(*a, **kw))
    tokens = _tokens(2, 12, seed=6)
    ref = reference_forward(weights, tokens)
    cache = model.new_cache(2, 16)
    model.forward(cupy.asarray(tokens[:, :9]), cache, 0, "quick")
    used.clear()
    for t in range(9, 12):
        step = cupy.asnumpy(model.forward(cupy.asarray(tokens[:, t:t + 1]), cache, t, "quick"))
        assert np.isfinite(step).all() and rel(step, ref[:, t]) < 2e-2, t
    pinned = {(lin.decode_launch[2]["config"], lin.decode_launch[2]["split_k"])
              for lin in (model.layers[0].qkv, model.layers[0].o, model.layers[0].gate_up, model.layers[0].down)}
    assert used and set(used) <= pinned
