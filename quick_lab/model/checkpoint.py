"""AutoAWQ-format safetensors checkpoints (Llama / Mistral) -> :class:`quick_lab.model.weights.ModelWeights`.

A checkpoint directory as AutoAWQ writes it holds ``config.json`` (the model's Hugging Face config with
a ``quantization_config``), ``*.safetensors`` shards and ``tokenizer.json``; :func:`load_awq_directory`
reads and validates all of it, :func:`load_tokenizer` the tokenizer.

Tensor names follow Hugging Face: ``model.layers.{i}.self_attn.{q,k,v,o}_proj.{qweight,qzeros,scales}``,
``model.layers.{i}.mlp.{gate,up,down}_proj.*``, ``model.layers.{i}.{input,post_attention}_layernorm.weight``,
``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``. NumPy only (no torch).

q/k/v are fused by concatenating along N, gate/up by interleaving (gate, up) pairs of 32 columns
(:func:`quick_lab.core.format.pair_gate_up`). In the AutoAWQ format both are exact: each packed int32
word holds 8 consecutive columns of one row, so whole words of each part line up, provided every
part's N is a multiple of 8 (checked; the config's intermediate size a multiple of 32).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quick_lab.core.format import VALID_GROUP_SIZES, AWQWeight, pair_gate_up
from quick_lab.model.config import ModelConfig
from quick_lab.model.weights import LayerWeights, ModelWeights

ATTN = "model.layers.{i}.self_attn.{name}_proj"
MLP = "model.layers.{i}.mlp.{name}_proj"


# The architectures ModelConfig describes exactly (no biases, plain RoPE, head_dim = hidden / n_heads).
MODEL_TYPES = ("llama", "mistral")
AWQ_CONFIG_EXAMPLE = ('"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, '
                      '"zero_point": true, "version": "gemm"}')


class CheckpointError(ValueError):
    """A checkpoint file, config entry or tensor is missing or inconsistent; the message names it."""


@dataclass(frozen=True)
class CheckpointConfig:
    """What an AutoAWQ checkpoint's ``config.json`` (and ``generation_config.json``) say, validated."""

    model: ModelConfig
    group_size: int                  # quantization_config.group_size
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]   # empty when neither file names one


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
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise CheckpointError("reading *.safetensors needs the safetensors package: pip install safetensors") from None

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def config_from_hf(hf: dict, name: str = "checkpoint") -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict (Llama / Mistral keys). CheckpointError for a
    missing key or a model ModelConfig would describe wrongly (another ``model_type``, RoPE scaling, a
    ``head_dim`` other than hidden / heads)."""
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CheckpointError(f"{name}: config.json model_type is {model_type!r}; only {', '.join(MODEL_TYPES)} "
                              f"(the Llama architecture) load")
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{name}: config.json sets rope_scaling = {hf['rope_scaling']!r}; only plain RoPE "
                              f"(rope_scaling null) is implemented")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                           "vocab_size") if k not in hf]
    if missing:
        raise CheckpointError(f"{name}: config.json lacks {', '.join(missing)}")
    try:
        cfg = ModelConfig(hidden=int(hf["hidden_size"]), intermediate=int(hf["intermediate_size"]),
                          n_heads=int(hf["num_attention_heads"]),
                          n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                          n_layers=int(hf["num_hidden_layers"]), vocab=int(hf["vocab_size"]),
                          rope_theta=float(hf.get("rope_theta", 10000.0)),
                          rms_eps=float(hf.get("rms_norm_eps", 1e-5)), name=name)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{name}: config.json does not describe a model: {exc}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"{name}: config.json head_dim = {hf['head_dim']} differs from hidden_size / "
                              f"num_attention_heads = {cfg.head_dim}; only the latter is implemented")
    return cfg


def awq_group_size(hf: dict, where: str = "config.json") -> int:
    """The group size of the AutoAWQ 4-bit GEMM ``quantization_config`` in a ``config.json`` dict;
    CheckpointError naming the entry for anything else (no quantization_config, another method, other
    bits, another packing than GEMM, no zero points, a group size the kernels do not take). Older
    AutoAWQ spellings ``w_bit`` / ``q_group_size`` are read too; a missing ``version`` means GEMM
    (the Hugging Face default)."""
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} has no quantization_config: not an AutoAWQ checkpoint (expected "
                              f"{AWQ_CONFIG_EXAMPLE})")
    method = qc.get("quant_method")
    if str(method).lower() != "awq":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}; only AutoAWQ "
                              f"checkpoints (\"awq\") load")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise CheckpointError(f"{where}: quantization_config.bits is {bits!r}; the kernels take 4-bit weights only")
    version = qc.get("version", "gemm")
    if str(version).lower() != "gemm":
        raise CheckpointError(f"{where}: quantization_config.version is {version!r}; only AutoAWQ's GEMM packing "
                              f"(\"gemm\") loads (GEMV, Marlin and ExLlama checkpoints pack their words differently)")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError(f"{where}: quantization_config.zero_point is {qc.get('zero_point')!r}; the kernels "
                              f"need zero points (zero_point: true)")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if isinstance(group_size, bool) or group_size not in VALID_GROUP_SIZES:
        raise CheckpointError(f"{where}: quantization_config.group_size is {group_size!r}; the kernels take "
                              f"{', '.join(map(str, VALID_GROUP_SIZES))}")
    return int(group_size)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_ids(value, where: str) -> tuple[int, ...]:
    """``eos_token_id`` as Hugging Face writes it: null, an int or a list of ints."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(values)


def checkpoint_directory(path) -> Path:
    """``path`` as an existing directory, or CheckpointError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint directory (config.json, "
                              f"*.safetensors, tokenizer.json)")
    return path


def read_checkpoint_config(path) -> CheckpointConfig:
    """The validated ``config.json`` of the AutoAWQ checkpoint directory ``path`` (see :func:`awq_group_size`,
    :func:`config_from_hf`), with the end-of-sequence ids of it and of ``generation_config.json``."""
    path = checkpoint_directory(path)
    config_json = path / "config.json"
    if not config_json.is_file():
        raise CheckpointError(f"{path} has no config.json (the model's Hugging Face config with its "
                              f"quantization_config)")
    hf = _read_json(config_json)
    group_size = awq_group_size(hf, str(config_json))
    cfg = config_from_hf(hf, name=path.name)
    eos = _token_ids(hf.get("eos_token_id"), str(config_json))
    generation_json = path / "generation_config.json"
    if generation_json.is_file():
        eos += _token_ids(_read_json(generation_json).get("eos_token_id"), str(generation_json))
    bad = [i for i in eos if i >= cfg.vocab]
    if bad:
        raise CheckpointError(f"{path}: eos_token_id {bad[0]} is not below vocab_size = {cfg.vocab}")
    return CheckpointConfig(cfg, group_size, bool(hf.get("tie_word_embeddings", False)), tuple(dict.fromkeys(eos)))


def load_awq_directory(path) -> tuple[ModelWeights, CheckpointConfig]:
    """An AutoAWQ checkpoint directory -> (host ModelWeights, its CheckpointConfig): config.json validated
    first, then every tensor against it (shapes, and the group size quantization_config states)."""
    config = read_checkpoint_config(path)
    weights = load_awq_checkpoint(path, config.model, tie_word_embeddings=config.tie_word_embeddings,
                                  group_size=config.group_size)
    return weights, config


def load_tokenizer(path):
    """The ``tokenizers.Tokenizer`` of ``<path>/tokenizer.json`` (the Hugging Face tokenizers library;
    only ``quick-lab generate`` needs it)."""
    path = checkpoint_directory(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json (the Hugging Face tokenizers file)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CheckpointError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own exception types for a malformed file
        raise CheckpointError(f"cannot read {file}: {exc}") from None


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


def _same_k(parts: list[AWQWeight], names: list[str]) -> list[AWQWeight]:
    """``parts`` once checked to share K and the group size, and to hold whole packed words."""
    first = parts[0]
    for awq, name in zip(parts, names):
        if awq.K != first.K or awq.group_size != first.group_size:
            raise CheckpointError(f"{name}: K = {awq.K}, group size {awq.group_size} differ from {names[0]}'s "
                                  f"K = {first.K}, group size {first.group_size}; cannot fuse")
        if awq.N % 8:
            raise CheckpointError(f"{name}: N = {awq.N} is not a multiple of 8; cannot fuse packed words")
    return parts


def fuse(parts: list[AWQWeight], names: list[str]) -> AWQWeight:
    """Concatenate AutoAWQ linears of equal K and group size along N (exact; see module doc)."""
    first = _same_k(parts, names)[0]
    cat = lambda field: np.concatenate([np.asarray(getattr(p, field)) for p in parts], axis=1)  # noqa: E731
    return AWQWeight(cat("qweight"), cat("qzeros"), cat("scales"), first.group_size)


def load_awq_checkpoint(path, cfg: ModelConfig | None = None, tie_word_embeddings: bool = False,
                        group_size: int | None = None) -> ModelWeights:
    """Read an AutoAWQ checkpoint (a file, or a directory of shards with its ``config.json``) into
    host :class:`ModelWeights` with fused qkv / gate_up. ``group_size``: the one the tensors must have
    (a config's quantization_config), else the first linear's. Build the GPU model with
    ``quick_lab.model.decoder.Model(weights, backends)``; :func:`load_awq_directory` also validates
    the directory's config.json."""
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
    first_linear = None if group_size is None else "quantization_config.group_size in config.json"
    layers = []
    for i in range(cfg.n_layers):
        lin = {}
        for name, (K, N) in expected.items():
            prefix = (MLP if name in ("gate", "up", "down") else ATTN).format(i=i, name=name)
            awq = load_linear(tensors, prefix)
            if (awq.K, awq.N) != (K, N):
                raise CheckpointError(f"{prefix}: shape (K, N) = {(awq.K, awq.N)}, config expects {(K, N)}")
            if first_linear is None:
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
            gate_up=pair_gate_up(*_same_k([lin["gate"], lin["up"]], [mlp.format(n) for n in ("gate", "up")])),
            down=lin["down"]))

    embed = _fp16(tensors, "model.embed_tokens.weight", (cfg.vocab, H))
    if "lm_head.weight" in tensors or not tie_word_embeddings:
        lm_head = _fp16(tensors, "lm_head.weight", (cfg.vocab, H))
    else:
        lm_head = embed
    # torch Linear stores [out, in]; the model computes x @ lm_head with lm_head [hidden, vocab].
    return ModelWeights(cfg, embed, layers, _fp16(tensors, "model.norm.weight", (H,)),
                        np.ascontiguousarray(lm_head.T))
