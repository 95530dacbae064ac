"""Tiny AutoAWQ checkpoint directories and tokenizers, written by the tests (nothing is downloaded): a
Llama-architecture model with GQA in the AutoAWQ GEMM format, sharded safetensors, a Hugging Face
config.json with its quantization_config, and a byte-level BPE tokenizer.json trained on a few lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quick_lab.model.checkpoint import awq_tensors, save_awq_checkpoint
from quick_lab.model.config import ModelConfig
from quick_lab.model.weights import random_quantized_linear

CORPUS = ["the quick brown fox jumps over the lazy dog", "a naïve café serves crème brûlée",
          "snow ☃ and 😀 smiles", "int4 weights, fp16 activations: the kernel interleaves them offline"] * 4
BOS, EOS = "<s>", "</s>"
GROUP_SIZE = 64
PROMPT = "the quick brown fox"


def tiny_tokenizer(vocab_size: int = 300):
    """Byte-level BPE (the GPT-2 / Llama-3 family's scheme: any text encodes, and a multi-byte character
    can span tokens) with ``<s>`` = 0 and ``</s>`` = 1 as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def tiny_config(vocab: int) -> ModelConfig:
    """hidden 256, 4 query heads sharing 2 KV heads (GQA), 2 layers: every linear fits the kernels
    (N a multiple of 64, K of the group size)."""
    return ModelConfig(hidden=256, intermediate=512, n_heads=4, n_kv_heads=2, n_layers=2, vocab=vocab,
                       rope_theta=10000.0, rms_eps=1e-5, name="tiny")


def hf_config(cfg: ModelConfig, group_size: int = GROUP_SIZE, **overrides) -> dict:
    """config.json as AutoAWQ writes it for a Llama model (``overrides`` replace or, as None, drop keys)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden,
          "intermediate_size": cfg.intermediate, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.vocab,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": False,
          "torch_dtype": "float16",
          "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                  "zero_point": True, "version": "gemm"}}
    for key, value in overrides.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


PROJECTIONS = ("self_attn", "q"), ("self_attn", "k"), ("self_attn", "v"), ("self_attn", "o"), \
    ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")


def tiny_tensors(cfg: ModelConfig, group_size: int = GROUP_SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """Checkpoint tensors (Hugging Face names, AutoAWQ GEMM linears) of a random model of ``cfg``. The
    linears' outputs have rms ~1 for rms-1 inputs, so every layer moves the logits, and the LM head's rows
    have log-normal norms, so greedy picks win by clear margins (tests check them)."""
    rng = np.random.default_rng([seed, 7])
    H, D, I = cfg.hidden, cfg.head_dim, cfg.intermediate
    shapes = {"q": (H, cfg.n_heads * D), "k": (H, cfg.n_kv_heads * D), "v": (H, cfg.n_kv_heads * D),
              "o": (cfg.n_heads * D, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
    tensors = {}
    for i in range(cfg.n_layers):
        for j, (block, name) in enumerate(PROJECTIONS):
            K, N = shapes[name]
            awq = random_quantized_linear(K, N, seed=seed * 1000 + 10 * i + j, group_size=group_size,
                                          std=1.0 / np.sqrt(K))
            tensors.update(awq_tensors(f"model.layers.{i}.{block}.{name}_proj", awq))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = rng.uniform(0.8, 1.2, H).astype(np.float16)
    tensors["model.embed_tokens.weight"] = rng.standard_normal((cfg.vocab, H)).astype(np.float16)
    tensors["model.norm.weight"] = np.ones(H, dtype=np.float16)
    row_norms = np.exp(rng.standard_normal((cfg.vocab, 1)))  # log-normal: a few tokens stand out
    tensors["lm_head.weight"] = (0.25 * rng.standard_normal((cfg.vocab, H)) * row_norms).astype(np.float16)
    return tensors


def write_checkpoint(directory, *, group_size: int = GROUP_SIZE, seed: int = 0, config: dict | None = None,
                     tensors: dict | None = None, tokenizer=None, shards: int = 2) -> tuple[Path, ModelConfig]:
    """Writes an AutoAWQ checkpoint directory: config.json (``config`` replaces :func:`hf_config`'s),
    ``shards`` safetensors files, tokenizer.json (``tokenizer`` or :func:`tiny_tokenizer`). ``tensors``
    replace the generated ones by name (a value of None drops that tensor). Returns (directory, cfg)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or tiny_tokenizer()
    cfg = tiny_config(tokenizer.get_vocab_size())
    data = tiny_tensors(cfg, group_size, seed)
    for name, value in (tensors or {}).items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    names = sorted(data)
    for s in range(shards):
        save_awq_checkpoint(directory / f"model-{s + 1:05d}-of-{shards:05d}.safetensors",
                            {n: data[n] for n in names[s::shards]})
    (directory / "config.json").write_text(json.dumps(config if config is not None else hf_config(cfg, group_size)))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, cfg
