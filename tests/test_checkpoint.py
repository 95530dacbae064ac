"""AutoAWQ safetensors checkpoint loader (CPU only)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")

from quick_lab.core.format import dequantize, quantize_awq  # noqa: E402
from quick_lab.model.checkpoint import (CheckpointError, awq_tensors, fuse, load_awq_checkpoint,  # noqa: E402
                                        save_awq_checkpoint)
from quick_lab.model.config import ModelConfig  # noqa: E402
from quick_lab.model.reference import reference_forward  # noqa: E402

TINY = ModelConfig(hidden=128, intermediate=256, n_heads=4, n_kv_heads=2, n_layers=2, vocab=64, name="tiny")
PROJ = {"q": ("self_attn", 128, 128), "k": ("self_attn", 128, 64), "v": ("self_attn", 128, 64),
        "o": ("self_attn", 128, 128), "gate": ("mlp", 128, 256), "up": ("mlp", 128, 256), "down": ("mlp", 256, 128)}


def tiny_tensors(seed: int = 0, group_size: int = 128):
    """(checkpoint tensors, float weights by prefix) of a random TINY model."""
    rng = np.random.default_rng(seed)
    tensors, dense = {}, {}
    for i in range(TINY.n_layers):
        for name, (block, K, N) in PROJ.items():
            prefix = f"model.layers.{i}.{block}.{name}_proj"
            dense[prefix] = (0.02 * rng.standard_normal((K, N))).astype(np.float32)
            tensors.update(awq_tensors(prefix, quantize_awq(dense[prefix], group_size)))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = rng.uniform(0.8, 1.2, 128).astype(np.float16)
    tensors["model.embed_tokens.weight"] = rng.standard_normal((64, 128)).astype(np.float16)
    tensors["model.norm.weight"] = np.ones(128, dtype=np.float16)
    tensors["lm_head.weight"] = (0.02 * rng.standard_normal((64, 128))).astype(np.float16)
    return tensors, dense


@pytest.fixture
def tiny_checkpoint(tmp_path):
    tensors, dense = tiny_tensors()
    path = tmp_path / "model.safetensors"
    save_awq_checkpoint(path, tensors)
    return path, tensors, dense


def test_load_shapes_and_group_size(tiny_checkpoint):
    path, tensors, _ = tiny_checkpoint
    w = load_awq_checkpoint(path, TINY)
    assert len(w.layers) == 2 and w.cfg is TINY
    layer = w.layers[1]
    assert (layer.qkv.K, layer.qkv.N) == (128, 128 + 64 + 64)
    assert (layer.o.K, layer.o.N) == (128, 128)
    assert (layer.gate_up.K, layer.gate_up.N) == (128, 512)
    assert (layer.down.K, layer.down.N) == (256, 128)
    assert {lin.group_size for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)} == {128}
    assert w.embed.shape == (64, 128) and w.lm_head.shape == (128, 64)
    np.testing.assert_array_equal(w.lm_head, tensors["lm_head.weight"].T)
    np.testing.assert_array_equal(layer.attn_norm, tensors["model.layers.1.input_layernorm.weight"])


def test_fused_equals_parts_and_quantized_concatenation(tiny_checkpoint):
    path, tensors, dense = tiny_checkpoint
    w = load_awq_checkpoint(path, TINY)
    for i, layer in enumerate(w.layers):
        attn = f"model.layers.{i}.self_attn"
        fused = dequantize(layer.qkv)
        start = 0
        for name in "qkv":
            prefix = f"{attn}.{name}_proj"
            part = dequantize(quantize_awq(dense[prefix]))
            np.testing.assert_array_equal(fused[:, start:start + part.shape[1]], part)
            start += part.shape[1]
        # quantization is column-wise, so quantizing the concatenated float weight gives the same words
        whole = quantize_awq(np.concatenate([dense[f"{attn}.{n}_proj"] for n in "qkv"], axis=1))
        np.testing.assert_array_equal(layer.qkv.qweight, whole.qweight)
        np.testing.assert_array_equal(layer.qkv.qzeros, whole.qzeros)
        np.testing.assert_array_equal(layer.qkv.scales, whole.scales)
        mlp = f"model.layers.{i}.mlp"
        # gate_up holds (gate, up) pairs of 32 columns: columns 64j .. 64j + 31 are gate 32j .., the next 32 up's
        gate_up = dequantize(layer.gate_up)
        gate, up = (dequantize(quantize_awq(dense[f"{mlp}.{n}_proj"])) for n in ("gate", "up"))
        for j in range(256 // 32):
            np.testing.assert_array_equal(gate_up[:, 64 * j:64 * j + 32], gate[:, 32 * j:32 * j + 32])
            np.testing.assert_array_equal(gate_up[:, 64 * j + 32:64 * j + 64], up[:, 32 * j:32 * j + 32])


def test_group_size_64_is_inferred(tmp_path):
    tensors, _ = tiny_tensors(group_size=64)
    save_awq_checkpoint(tmp_path / "m.safetensors", tensors)
    w = load_awq_checkpoint(tmp_path / "m.safetensors", TINY)
    assert w.layers[0].down.group_size == 64 and w.layers[0].qkv.num_groups == 2


def test_directory_with_config_json_and_shards(tmp_path):
    tensors, _ = tiny_tensors()
    names = sorted(tensors)
    save_awq_checkpoint(tmp_path / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[::2]})
    save_awq_checkpoint(tmp_path / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[1::2]})
    hf = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=64, rope_theta=10000.0, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    w = load_awq_checkpoint(tmp_path)
    assert (w.cfg.hidden, w.cfg.n_kv_heads, w.cfg.n_layers) == (128, 2, 2)
    logits = reference_forward(w, np.arange(6).reshape(1, 6))
    assert logits.shape == (1, 6, 64) and np.isfinite(logits).all()


def test_missing_tensor_is_named(tmp_path):
    tensors, _ = tiny_tensors()
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_awq_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.scales"):
        load_awq_checkpoint(tmp_path / "m.safetensors", TINY)


def test_missing_norm_and_lm_head_are_named(tmp_path):
    tensors, _ = tiny_tensors()
    del tensors["model.norm.weight"]
    save_awq_checkpoint(tmp_path / "a.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_awq_checkpoint(tmp_path / "a.safetensors", TINY)
    tensors, _ = tiny_tensors()
    del tensors["lm_head.weight"]
    save_awq_checkpoint(tmp_path / "b.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_awq_checkpoint(tmp_path / "b.safetensors", TINY)
    tied = load_awq_checkpoint(tmp_path / "b.safetensors", TINY, tie_word_embeddings=True)
    np.testing.assert_array_equal(tied.lm_head, tied.embed.T)


def test_inconsistent_group_size_is_named(tmp_path):
    tensors, _ = tiny_tensors()
    rng = np.random.default_rng(7)
    tensors.update(awq_tensors("model.layers.1.mlp.down_proj", quantize_awq(rng.standard_normal((256, 128)), 64)))
    save_awq_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.qzeros.*64.*128"):
        load_awq_checkpoint(tmp_path / "m.safetensors", TINY)


def test_uninferable_group_size_is_named(tmp_path):
    tensors, _ = tiny_tensors()
    tensors["model.layers.0.self_attn.o_proj.qzeros"] = np.zeros((3, 16), dtype=np.int32)
    save_awq_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.qzeros"):
        load_awq_checkpoint(tmp_path / "m.safetensors", TINY)


def test_bad_shapes_are_named(tmp_path):
    tensors, _ = tiny_tensors()
    tensors["model.layers.0.self_attn.k_proj.scales"] = np.ones((1, 72), dtype=np.float16)
    save_awq_checkpoint(tmp_path / "m.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        load_awq_checkpoint(tmp_path / "m.safetensors", TINY)
    # a config that disagrees with the tensors
    tensors, _ = tiny_tensors()
    save_awq_checkpoint(tmp_path / "n.safetensors", tensors)
    wrong = ModelConfig(hidden=128, intermediate=384, n_heads=4, n_kv_heads=2, n_layers=2, vocab=64)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj.*expects"):
        load_awq_checkpoint(tmp_path / "n.safetensors", wrong)


def test_no_config_json_asks_for_cfg(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="config.json"):
        load_awq_checkpoint(path)


def test_fuse_rejects_mismatched_k():
    a = quantize_awq(np.ones((128, 64), dtype=np.float32))
    b = quantize_awq(np.ones((256, 64), dtype=np.float32))
    with pytest.raises(CheckpointError, match="second"):
        fuse([a, b], ["first", "second"])
