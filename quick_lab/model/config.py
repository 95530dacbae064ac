"""Model shapes: :class:`ModelConfig`, the three presets the paper measures (Fig. 4) and a GPU memory
estimate. No GPU needed.

``BACKENDS`` names the three ways a linear layer can run over the *same* int4 weights: ``fp16`` (cuBLAS
on the dequantized weight), ``awq`` (the AutoAWQ-style kernel) or ``quick`` (the QUICK kernel on the
interleaved weight); :mod:`quick_lab.model.decoder` implements them.
"""
from __future__ import annotations

from dataclasses import dataclass

from quick_lab.core.format import GATE_UP_PAIR

__all__ = ["BACKENDS", "GROUP_SIZE", "LLAMA2_13B", "LLAMA2_70B", "MISTRAL_7B", "PRESETS", "ModelConfig",
           "memory_estimate", "model_shapes", "preset"]

BACKENDS = ("fp16", "awq", "quick")
GROUP_SIZE = 128


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab: int = 32000
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: hidden must divide into n_heads and n_heads into n_kv_heads, got "
                             f"hidden={self.hidden}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")
        if self.n_layers < 1:
            raise ValueError(f"{self.name}: n_layers must be >= 1, got {self.n_layers}")
        if self.intermediate % GATE_UP_PAIR:
            raise ValueError(f"{self.name}: intermediate must be a multiple of {GATE_UP_PAIR} (the fused gate_up "
                             f"weight holds (gate, up) pairs of {GATE_UP_PAIR} columns), got {self.intermediate}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(K, N) of the four linears of a layer; q|k|v and gate/up (in pairs of GATE_UP_PAIR columns)
        are fused along N."""
        D = self.head_dim
        return {"qkv": (self.hidden, (self.n_heads + 2 * self.n_kv_heads) * D),
                "o": (self.n_heads * D, self.hidden),
                "gate_up": (self.hidden, 2 * self.intermediate),
                "down": (self.intermediate, self.hidden)}

    def params_per_layer(self) -> int:
        return sum(K * N for K, N in self.linear_shapes().values())


# From the models' Hugging Face config.json files.
MISTRAL_7B = ModelConfig(4096, 14336, 32, 8, 32, 32000, 1e6, 1e-5, "mistral-7b")
LLAMA2_13B = ModelConfig(5120, 13824, 40, 40, 40, 32000, 1e4, 1e-5, "llama2-13b")
LLAMA2_70B = ModelConfig(8192, 28672, 64, 8, 80, 32000, 1e4, 1e-5, "llama2-70b")
PRESETS = {c.name: c for c in (MISTRAL_7B, LLAMA2_13B, LLAMA2_70B)}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; have {', '.join(PRESETS)}") from None


def model_shapes(presets=None) -> tuple[tuple[int, int], ...]:
    """The (K, N) of every linear layer of the presets (default: all), each once, in preset order:
    the GEMMs a decode step of those models runs."""
    configs = PRESETS.values() if presets is None else [preset(p) if isinstance(p, str) else p for p in presets]
    return tuple(dict.fromkeys(s for cfg in configs for s in cfg.linear_shapes().values()))


def _int4_bytes(K: int, N: int, G: int) -> int:
    return K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2


def memory_estimate(cfg: ModelConfig, batch: int = 1, max_seq: int = 256, backends=BACKENDS,
                    group_size: int = GROUP_SIZE, lm_head: bool = True) -> dict[str, int]:
    """GPU bytes a :class:`Model` holds (the weight forms of the requested backends only, KV cache,
    embedding, LM head); activations and workspaces come on top."""
    shapes = cfg.linear_shapes().values()
    int4 = sum(_int4_bytes(K, N, group_size) for K, N in shapes)
    # a Linear holds only its backends' forms: AutoAWQ words, QUICK words, fp16
    per_layer = (int4 * (("awq" in backends) + ("quick" in backends))
                 + (2 * cfg.params_per_layer() if "fp16" in backends else 0))
    est = {"weights": per_layer * cfg.n_layers,
           "kv_cache": 2 * batch * cfg.n_kv_heads * max_seq * cfg.head_dim * 2 * cfg.n_layers,
           "embed_head": cfg.vocab * cfg.hidden * 2 * (1 + lm_head)}
    est["total"] = sum(est.values())
    return est
