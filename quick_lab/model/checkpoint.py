"""AutoAWQ-format safetensors checkpoints (Llama / Mistral) -> :class:`quick_lab.model.weights.ModelWeights`.

Tensor names follow Hugging Face: ``model.layers.{i}.self_attn.{q,k,v,o}_proj.{qweight,qzeros,scales}``,
``model.layers.{i}.mlp.{gate,up,down}_proj.*``, ``model.layers.{i}.{input,post_attention}_layernorm.weight``,
``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``. NumPy only (no torch).

q/k/v and gate/up are fused by concatenating along N. In the AutoAWQ format that is exact: each packed
int32 word holds 8 consecutive columns of one row, so whole words of each part line up, provided
every part's N is a multiple of 8 (checked).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quick_lab.core.format import VALID_GROUP_SIZES, AWQWeight
from quick_lab.model.config import ModelConfig
from quick_lab.model.weights import LayerWeights, ModelWeights

ATTN = "model.layers.{i}.self_attn.{name}_proj"
MLP = "model.layers.{i}.mlp.{name}_proj"


class CheckpointError(ValueError):
    """A tensor is missing or inconsistent; the message names it."""


def save_awq_checkpoint(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> NumPy array) to a safetensors file."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})


def awq_tensors(prefix: str, awq: AWQWeight) -> dict[str, np.ndarray]:
    """The three checkpoint tensors of one quantized linear."""
    return {f"{prefix}.qweight": np.asarray(awq.qweight), f"{prefix}.qzeros": np.asarray(awq.qzeros),
            f"{prefix}.scales": np.asarray(awq.scales)}


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file, or of every ``*.safetensors`` file in a directory."""
    from safetensors.numpy import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def config_from_hf(hf: dict, name: str = "checkpoint") -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict (Llama / Mistral keys)."""
    return ModelConfig(hidden=hf["hidden_size"], intermediate=hf["intermediate_size"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                       n_layers=hf["num_hidden_layers"], vocab=hf["vocab_size"],
                       rope_theta=float(hf.get("rope_theta", 10000.0)), rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
                       name=name)


def _get(tensors: dict, name: str) -> np.ndarray:
    try:
        return tensors[name]
    except KeyError:
        raise CheckpointError(f"checkpoint has no tensor {name!r}") from None


def _fp16(tensors: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _get(tensors, name)
    if tuple(arr.shape) != shape:
        raise CheckpointError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise CheckpointError(f"{name} must be floating point, got {arr.dtype}")
    return arr.astype(np.float16)


def load_linear(tensors: dict, prefix: str) -> AWQWeight:
    """One AutoAWQ linear, group size inferred as ``K / qzeros.shape[0]``."""
    qweight, qzeros, scales = (_get(tensors, f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales"))
    K, groups = qweight.shape[0], qzeros.shape[0] if qzeros.ndim == 2 else 0
    if groups < 1 or K % groups or K // groups not in VALID_GROUP_SIZES:
        raise CheckpointError(f"{prefix}.qzeros: cannot infer a group size from K = {K} (qweight rows) and "
                              f"{groups} qzeros rows; need K / rows in {VALID_GROUP_SIZES}")
    try:
        return AWQWeight(qweight, qzeros, scales, K // groups)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None


def fuse(parts: list[AWQWeight], names: list[str]) -> AWQWeight:
    """Concatenate AutoAWQ linears of equal K and group size along N (exact; see module doc)."""
    first = parts[0]
    for awq, name in zip(parts, names):
        if awq.K != first.K or awq.group_size != first.group_size:
            raise CheckpointError(f"{name}: K = {awq.K}, group size {awq.group_size} differ from {names[0]}'s "
                                  f"K = {first.K}, group size {first.group_size}; cannot fuse")
        if awq.N % 8:
            raise CheckpointError(f"{name}: N = {awq.N} is not a multiple of 8; cannot fuse packed words")
    cat = lambda field: np.concatenate([np.asarray(getattr(p, field)) for p in parts], axis=1)  # noqa: E731
    return AWQWeight(cat("qweight"), cat("qzeros"), cat("scales"), first.group_size)


def load_awq_checkpoint(path, cfg: ModelConfig | None = None, tie_word_embeddings: bool = False) -> ModelWeights:
    """Read an AutoAWQ checkpoint (a file, or a directory of shards with its ``config.json``) into
    host :class:`ModelWeights` with fused qkv / gate_up. Build the GPU model with
    ``quick_lab.model.decoder.Model(weights, backends)``."""
    path = Path(path)
    if cfg is None:
        config_json = (path if path.is_dir() else path.parent) / "config.json"
        if not config_json.exists():
            raise CheckpointError(f"no config.json beside {path}; pass cfg=ModelConfig(...)")
        cfg = config_from_hf(json.loads(config_json.read_text()), name=path.stem)
    tensors = read_tensors(path)
    D, H = cfg.head_dim, cfg.hidden

    expected = {"q": (H, cfg.n_heads * D), "k": (H, cfg.n_kv_heads * D), "v": (H, cfg.n_kv_heads * D),
                "o": (cfg.n_heads * D, H), "gate": (H, cfg.intermediate), "up": (H, cfg.intermediate),
                "down": (cfg.intermediate, H)}
    group_size, first_linear = None, None
    layers = []
    for i in range(cfg.n_layers):
        lin = {}
        for name, (K, N) in expected.items():
            prefix = (MLP if name in ("gate", "up", "down") else ATTN).format(i=i, name=name)
            awq = load_linear(tensors, prefix)
            if (awq.K, awq.N) != (K, N):
                raise CheckpointError(f"{prefix}: shape (K, N) = {(awq.K, awq.N)}, config expects {(K, N)}")
            if group_size is None:
                group_size, first_linear = awq.group_size, prefix
            elif awq.group_size != group_size:
                raise CheckpointError(f"{prefix}.qzeros: group size {awq.group_size} differs from "
                                      f"{group_size} of {first_linear}")
            lin[name] = awq
        attn = ATTN.format(i=i, name="{}")
        mlp = MLP.format(i=i, name="{}")
        layers.append(LayerWeights(
            attn_norm=_fp16(tensors, f"model.layers.{i}.input_layernorm.weight", (H,)),
            qkv=fuse([lin["q"], lin["k"], lin["v"]], [attn.format(n) for n in "qkv"]),
            o=lin["o"],
            mlp_norm=_fp16(tensors, f"model.layers.{i}.post_attention_layernorm.weight", (H,)),
            gate_up=fuse([lin["gate"], lin["up"]], [mlp.format(n) for n in ("gate", "up")]),
            down=lin["down"]))

    embed = _fp16(tensors, "model.embed_tokens.weight", (cfg.vocab, H))
    if "lm_head.weight" in tensors or not tie_word_embeddings:
        lm_head = _fp16(tensors, "lm_head.weight", (cfg.vocab, H))
    else:
        lm_head = embed
    # torch Linear stores [out, in]; the model computes x @ lm_head with lm_head [hidden, vocab].
    return ModelWeights(cfg, embed, layers, _fp16(tensors, "model.norm.weight", (H,)),
                        np.ascontiguousarray(lm_head.T))
