"""Host (NumPy) weights of the decoder: :class:`LayerWeights`, :class:`ModelWeights`, and random
int4 weights for throughput runs. :mod:`quick_lab.model.checkpoint` fills the same classes from a
real AutoAWQ checkpoint."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from quick_lab.core.format import AWQWeight, random_awq
from quick_lab.model.config import GROUP_SIZE, ModelConfig

__all__ = ["LayerWeights", "ModelWeights", "random_quantized_linear", "random_weights"]

# rms of (q - z) for q, z independent uniform on 0..15: sqrt(2 * (16**2 - 1) / 12)
_RMS_Q_MINUS_Z = math.sqrt(2 * 255 / 12)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # fp16 [hidden]
    qkv: AWQWeight         # [hidden, (n_heads + 2 n_kv_heads) head_dim], columns q | k | v
    o: AWQWeight
    mlp_norm: np.ndarray
    gate_up: AWQWeight     # [hidden, 2 intermediate], (gate, up) column pairs of 32: format.pair_gate_up
    down: AWQWeight


@dataclass
class ModelWeights:
    cfg: ModelConfig
    embed: np.ndarray            # fp16 [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray             # fp16 [hidden]
    lm_head: np.ndarray | None   # fp16 [hidden, vocab] (x @ lm_head), None when absent


def random_quantized_linear(K: int, N: int, seed: int = 0, group_size: int = GROUP_SIZE,
                            std: float = 0.02) -> AWQWeight:
    """Random AutoAWQ weight (uniform nibbles and zeros in 0..15) whose dequantized values have rms
    ~ ``std``, like a trained linear; far faster than quantizing a random fp16 matrix."""
    awq = random_awq(K, N, group_size, seed)
    rng = np.random.default_rng([seed, 1])
    scales = rng.uniform(0.5, 1.5, size=awq.scales.shape) * (std / _RMS_Q_MINUS_Z)
    return dataclasses.replace(awq, scales=scales.astype(np.float16))


def _random_fp16(rng, shape, scale: float) -> np.ndarray:
    """Random sign, magnitude uniform in [scale, 2 scale) (scale a power of two), made from random bits:
    several times faster than normal samples for a 70B-size embedding."""
    n = math.prod(shape)
    bits = rng.integers(0, 1 << 32, size=(n + 1) // 2, dtype=np.uint32).view(np.uint16)[:n].reshape(shape)
    bits &= np.uint16(0x83FF)  # keep the sign and mantissa bits, then set the exponent of `scale`
    bits |= np.float16(scale).view(np.uint16)
    return bits.view(np.float16)


def random_weights(cfg: ModelConfig, seed: int = 0, group_size: int = GROUP_SIZE,
                   distinct_layers: bool = True) -> ModelWeights:
    """Random weights for ``cfg``. ``distinct_layers=False`` makes every layer the same host arrays
    (the model still copies them to separate GPU memory, so nothing is shared in L2): generating and
    interleaving a 70B layer takes ~20 s of CPU, and throughput does not depend on the values."""
    rng = np.random.default_rng([seed, 0])
    shapes = cfg.linear_shapes()

    def norm_weight() -> np.ndarray:
        return rng.uniform(0.8, 1.2, cfg.hidden).astype(np.float16)

    def layer(i: int) -> LayerWeights:
        lin = {name: random_quantized_linear(K, N, seed=seed * 100003 + 4 * i + j, group_size=group_size)
               for j, (name, (K, N)) in enumerate(shapes.items())}
        return LayerWeights(norm_weight(), lin["qkv"], lin["o"], norm_weight(), lin["gate_up"], lin["down"])

    if distinct_layers:
        layers = [layer(i) for i in range(cfg.n_layers)]
    else:
        layers = [layer(0)] * cfg.n_layers
    embed = _random_fp16(rng, (cfg.vocab, cfg.hidden), 1.0)
    lm_head = _random_fp16(rng, (cfg.hidden, cfg.vocab), 2.0 ** -6)
    return ModelWeights(cfg, embed, layers, norm_weight(), lm_head)
