"""Greedy decoding with the GPU :class:`~quick_lab.model.decoder.Model` and its KV cache: the decode loop
the sweeps time (:func:`decode`), and text generation from an AutoAWQ checkpoint directory with a
tokenizer (:func:`read_for_generation`, :func:`generate_text`; ``quick-lab generate``)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from quick_lab.model.checkpoint import CheckpointConfig, CheckpointError, load_awq_directory, load_tokenizer
from quick_lab.model.config import BACKENDS
from quick_lab.model.decoder import KVCache, Model
from quick_lab.model.weights import ModelWeights

__all__ = ["Generation", "HostCheckpoint", "TextStream", "build_model", "decode", "encode_prompt", "generate_text",
           "greedy", "greedy_stream", "load_for_generation", "read_for_generation"]


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


# ---------------------------------------------------------------- text generation from a checkpoint


@dataclass(frozen=True)
class HostCheckpoint:
    """An AutoAWQ checkpoint directory read and validated on the host (no GPU touched)."""

    path: Path
    weights: ModelWeights | None    # None once handed to the GPU model (build_model)
    config: CheckpointConfig
    tokenizer: object               # tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]  # config.json / generation_config.json, else tokenizer_config.json's eos_token


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation and its speed (model time: forwards and the argmax read back)."""

    text: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]      # generated ids, an end-of-sequence id included when it stopped there
    stopped_at_eos: bool
    prefill_s: float                # the prompt's forward, through its first generated token
    decode_s: float                 # the single-token forwards after it
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """None when nothing was decoded after the prefill (max_new_tokens 1, or eos at once)."""
        return self.decode_steps / self.decode_s if self.decode_steps else None


def _tokenizer_eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """The id of ``eos_token`` in tokenizer_config.json (a string or {"content": ...}), if both exist."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return ()
    try:
        token = json.loads(file.read_text()).get("eos_token")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if isinstance(token, dict):
        token = token.get("content")
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return () if token_id is None else (int(token_id),)


def read_for_generation(path) -> HostCheckpoint:
    """Reads and validates an AutoAWQ checkpoint directory for :func:`generate_text`: config.json, every
    tensor against it, tokenizer.json. CheckpointError (a ValueError) names whatever is wrong."""
    weights, config = load_awq_directory(path)
    path = Path(path)
    tokenizer = load_tokenizer(path)
    eos = config.eos_token_ids or _tokenizer_eos_ids(path, tokenizer)
    return HostCheckpoint(path, weights, config, tokenizer, eos)


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def build_model(host: HostCheckpoint, backend: str) -> tuple[Model, HostCheckpoint]:
    """The GPU model of a checkpoint read by :func:`read_for_generation`, holding ``backend``'s weights
    and the LM head, and the checkpoint without its host weights (so they can be freed)."""
    check_backend(backend)
    if host.weights is None:
        raise ValueError("this HostCheckpoint's weights were already handed to a model; read it again")
    return Model(host.weights, backends=(backend,), lm_head=True), replace(host, weights=None)


def load_for_generation(path, backend: str = "quick") -> tuple[Model, HostCheckpoint]:
    """(GPU model, checkpoint) of an AutoAWQ checkpoint directory: :func:`read_for_generation`, then
    :func:`build_model`."""
    check_backend(backend)
    return build_model(read_for_generation(path), backend)


def encode_prompt(tokenizer, prompt: str, vocab: int) -> list[int]:
    """The prompt's token ids (the tokenizer's own special tokens added, as its post-processor says);
    ValueError when there are none or one is outside the model's vocabulary."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = list(tokenizer.encode(prompt).ids)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"prompt token id {max(ids)} is outside the model's vocabulary (vocab_size = {vocab}); "
                         f"the tokenizer does not belong to this model")
    return ids


class TextStream:
    """Incremental detokenization for streaming: :meth:`push` a generated id, get the text it adds.

    BPE tokens are not characters: one token may hold half a UTF-8 character, and a decoder may merge
    or strip spaces at token boundaries. So each push decodes the whole generated list and returns what
    lies beyond the text already returned; while the decoded text ends in U+FFFD (an incomplete byte
    sequence) it returns nothing and waits for the rest. :meth:`finish` returns whatever is left.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.text
        if text.endswith("\ufffd"):
            return ""
        return self._new(text)

    def finish(self) -> str:
        return self._new(self.text)

    def _new(self, text: str) -> str:
        new = text[self.emitted:]
        self.emitted += len(new)
        return new


def greedy_stream(next_token, prompt_ids, max_new_tokens: int, tokenizer, *, eos_token_ids=(),
                  on_text=None) -> Generation:
    """The generation loop, apart from the device: ``next_token(ids, pos)`` feeds ``ids`` at positions
    ``pos ..`` (the prompt at 0, then each generated id at the next position) and returns the next id.
    Stops after ``max_new_tokens`` ids or an id in ``eos_token_ids`` (kept in ``token_ids``, not in the
    text); ``on_text(str)`` receives the text each id adds (:class:`TextStream`). Times the calls."""
    _check_max_new_tokens(max_new_tokens)
    prompt_ids = [int(i) for i in prompt_ids]
    eos = {int(i) for i in eos_token_ids}
    emit = on_text or (lambda text: None)
    stream = TextStream(tokenizer)

    start = time.perf_counter()
    token = int(next_token(prompt_ids, 0))
    prefill_s, decode_s = time.perf_counter() - start, 0.0
    generated = [token]
    while token not in eos and len(generated) < max_new_tokens:
        if text := stream.push(token):
            emit(text)
        start = time.perf_counter()
        token = int(next_token([token], len(prompt_ids) + len(generated) - 1))
        decode_s += time.perf_counter() - start
        generated.append(token)
    stopped = token in eos
    if not stopped and (text := stream.push(token)):
        emit(text)
    if text := stream.finish():
        emit(text)
    return Generation(stream.text, tuple(prompt_ids), tuple(generated), stopped, prefill_s, decode_s,
                      len(generated) - 1)


def generate_text(model: Model, tokenizer, prompt: str, max_new_tokens: int, backend: str, *,
                  eos_token_ids=(), on_text=None, warmup: bool = True) -> Generation:
    """Greedy continuation of ``prompt`` on the GPU model (batch 1, KV cache): :func:`greedy_stream`
    with the model's forward. ``warmup`` first runs one prefill-shaped and one decode-shaped forward
    into the same cache (the run overwrites those positions before it reads them), so the kernels'
    first-call compilation is not timed."""
    import cupy

    check_backend(backend)
    _check_max_new_tokens(max_new_tokens)
    ids = encode_prompt(tokenizer, prompt, model.cfg.vocab)
    cache = model.new_cache(1, len(ids) + max_new_tokens)

    def next_token(feed, pos):
        logits = model.forward(cupy.asarray([feed], dtype=cupy.int32), cache, pos, backend)
        return int(greedy(logits)[0, 0])  # reading the id back waits for the forward

    if warmup:
        next_token(ids, 0)
        next_token(ids[:1], len(ids))
    cupy.cuda.Device().synchronize()
    return greedy_stream(next_token, ids, max_new_tokens, tokenizer, eos_token_ids=eos_token_ids,
                         on_text=on_text)
