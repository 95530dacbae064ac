"""Greedy decoding with the GPU :class:`~quick_lab.model.decoder.Model` and its KV cache."""
from __future__ import annotations

from quick_lab.model.decoder import KVCache, Model

__all__ = ["decode", "greedy"]


def greedy(logits):
    """Next token ids int32 [B, 1] from logits [B, vocab], on the GPU (no host sync)."""
    import cupy

    return cupy.argmax(logits, axis=-1).astype(cupy.int32).reshape(-1, 1)


def decode(model: Model, cache: KVCache, tokens, pos: int, steps: int, backend: str):
    """``steps`` greedy decode steps from ``tokens`` [B, 1] at ``pos``; without an LM head the same
    tokens are fed every step. Returns the last tokens."""
    for i in range(steps):
        out = model.forward(tokens, cache, pos + i, backend)
        if model.lm_head is not None:
            tokens = greedy(out)
    return tokens
