"""``quick-lab generate`` on AutoAWQ checkpoint directories the tests write (tests/checkpoint_files.py):
checkpoint validation and CLI errors, the tokenizer, streaming detokenization and the generation loop
on the CPU; end to end against the NumPy reference's greedy tokens on a GPU (marked gpu)."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import checkpoint_files as files  # noqa: E402
from quick_lab import cli  # noqa: E402
from quick_lab.model.checkpoint import (CheckpointError, awq_group_size, load_awq_checkpoint,  # noqa: E402
                                        load_awq_directory, read_checkpoint_config)
from quick_lab.model.config import BACKENDS  # noqa: E402
from quick_lab.model.generate import (TextStream, encode_prompt, greedy_stream,  # noqa: E402
                                      read_for_generation)
from quick_lab.model.reference import reference_forward  # noqa: E402

STEPS = 6
MIN_MARGIN = 0.25  # top-1 minus top-2 reference logit, in units of the logits' rms


@pytest.fixture(scope="module")
def tokenizer():
    return files.tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path, cfg = files.write_checkpoint(tmp_path_factory.mktemp("tiny-awq"), tokenizer=tokenizer)
    return path, cfg


def reference_greedy(weights, prompt_ids, steps):
    """Greedy ids from the float NumPy reference, the whole sequence recomputed every step, and each
    step's margin (top-1 minus top-2 logit over the logits' rms)."""
    seq, margins = list(prompt_ids), []
    for _ in range(steps):
        logits = reference_forward(weights, np.array([seq]))[0, -1]
        second, first = np.sort(logits)[-2:]
        margins.append(float((first - second) / np.sqrt(np.mean(logits ** 2))))
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt_ids):], margins


@pytest.fixture(scope="module")
def reference(checkpoint, tokenizer):
    path, _ = checkpoint
    weights, _ = load_awq_directory(path)
    prompt_ids = tokenizer.encode(files.PROMPT).ids
    ids, margins = reference_greedy(weights, prompt_ids, STEPS)
    return prompt_ids, ids, margins


# ---------------------------------------------------------------- the CLI's errors (CPU)


def _break(kind: str, path, cfg) -> str:
    """Turns the valid checkpoint directory ``path`` into one with a ``kind`` defect; returns the path to
    pass (some defects are about the path itself)."""
    hf = files.hf_config(cfg)
    qc = hf["quantization_config"]
    edits = {
        "not AWQ": lambda: hf.pop("quantization_config"),
        "GPTQ": lambda: qc.update(quant_method="gptq"),
        "8 bits": lambda: qc.update(bits=8),
        "GEMV packing": lambda: qc.update(version="gemv"),
        "no zero points": lambda: qc.update(zero_point=False),
        "group size 256": lambda: qc.update(group_size=256),
        "group size differs": lambda: qc.update(group_size=128),
        "shape": lambda: hf.update(intermediate_size=384),
        "vocab": lambda: hf.update(vocab_size=cfg.vocab + 64),
        "model type": lambda: hf.update(model_type="qwen2"),
        "rope scaling": lambda: hf.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "config key": lambda: hf.pop("hidden_size"),
    }
    if kind == "missing directory":
        return str(path / "nowhere")
    if kind == "a file":
        return str(path / "config.json")
    if kind == "no config.json":
        (path / "config.json").unlink()
    elif kind == "bad JSON":
        (path / "config.json").write_text("{not json")
    elif kind == "no tokenizer.json":
        (path / "tokenizer.json").unlink()
    elif kind == "no shards":
        for shard in path.glob("*.safetensors"):
            shard.unlink()
    elif kind == "missing tensor":
        files.write_checkpoint(path, tensors={"model.layers.1.mlp.up_proj.scales": None})
    else:
        edits[kind]()
        (path / "config.json").write_text(json.dumps(hf))
    return str(path)


ERRORS = {
    "missing directory": r"checkpoint directory .*nowhere does not exist",
    "a file": r"config\.json is not a directory",
    "no config.json": r"has no config\.json",
    "bad JSON": r"cannot read .*config\.json",
    "not AWQ": r"config\.json has no quantization_config: not an AutoAWQ checkpoint",
    "GPTQ": r"quantization_config\.quant_method is 'gptq'; only AutoAWQ",
    "8 bits": r"quantization_config\.bits is 8; the kernels take 4-bit",
    "GEMV packing": r"quantization_config\.version is 'gemv'; only AutoAWQ's GEMM packing",
    "no zero points": r"quantization_config\.zero_point is False",
    "group size 256": r"quantization_config\.group_size is 256; the kernels take 32, 64, 128",
    "group size differs": r"model\.layers\.0\.self_attn\.q_proj\.qzeros: group size 64 differs from 128 of "
                          r"quantization_config\.group_size",
    "shape": r"model\.layers\.0\.mlp\.gate_proj: shape \(K, N\) = \(256, 512\), config expects \(256, 384\)",
    "vocab": r"model\.embed_tokens\.weight must have shape",
    "model type": r"model_type is 'qwen2'; only llama, mistral",
    "rope scaling": r"rope_scaling",
    "config key": r"config\.json lacks hidden_size",
    "no tokenizer.json": r"has no tokenizer\.json",
    "no shards": r"no \*\.safetensors file",
    "missing tensor": r"model\.layers\.1\.mlp\.up_proj\.scales",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_bad_checkpoint_is_a_clear_message_and_exit_2(kind, tmp_path, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))  # the checks come before the GPU's
    path, cfg = files.write_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer)
    target = _break(kind, path, cfg)
    assert cli.main(["generate", target, "--prompt", files.PROMPT]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("quick-lab: generate: ") and err.count("\n") == 1, err
    assert re.search(ERRORS[kind], err), err


def test_a_prompt_with_no_tokens_is_refused_before_the_gpu(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    path, _ = checkpoint
    assert cli.main(["generate", str(path), "--prompt", ""]) == 2
    err = capsys.readouterr().err
    assert "prompt '' encodes to no tokens" in err and "Traceback" not in err


def test_a_valid_checkpoint_without_a_gpu_exits_2(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (False, "no device (test)"))
    path, _ = checkpoint
    assert cli.main(["generate", str(path), "--prompt", files.PROMPT]) == 2
    err = capsys.readouterr().err
    assert "generate runs the model on a GPU" in err and "no device (test)" in err


def test_parser_defaults_and_rules():
    args = cli.build_parser().parse_args(["generate", "ckpt", "--prompt", "hi"])
    assert (args.checkpoint, args.prompt, args.backend, args.max_new_tokens) == ("ckpt", "hi", "quick", 128)
    args = cli.build_parser().parse_args(["generate", "ckpt", "--prompt", "hi", "--backend", "awq",
                                          "--max-new-tokens", "7"])
    assert (args.backend, args.max_new_tokens) == ("awq", 7)
    for bad in (["--max-new-tokens", "0"], ["--max-new-tokens", "x"], ["--backend", "int8"], []):
        argv = ["generate", "ckpt"] + (bad + ["--prompt", "hi"] if bad else [])
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)


# ---------------------------------------------------------------- checkpoint reading (CPU)


def test_directory_loads_like_the_tensor_loader(checkpoint):
    path, cfg = checkpoint
    weights, config = load_awq_directory(path)
    assert config.model == dataclasses.replace(cfg, name=path.name)
    assert (config.group_size, config.tie_word_embeddings, config.eos_token_ids) == (files.GROUP_SIZE, False, ())
    direct = load_awq_checkpoint(path, config.model)
    for mine, theirs in zip(weights.layers, direct.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert a.group_size == b.group_size == files.GROUP_SIZE
            np.testing.assert_array_equal(a.qweight, b.qweight)
            np.testing.assert_array_equal(a.scales, b.scales)
    assert (weights.layers[0].qkv.N, weights.cfg.n_kv_heads) == (256 + 2 * 128, 2)  # GQA: 4 query, 2 kv heads


def test_awq_config_spellings():
    base = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert awq_group_size({"quantization_config": base}) == 128
    assert awq_group_size({"quantization_config": {**base, "version": "GEMM", "quant_method": "AWQ"}}) == 128
    legacy = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64}  # AutoAWQ's own names; no version: GEMM
    assert awq_group_size({"quantization_config": legacy}) == 64
    for bad in ({**base, "group_size": True}, {**base, "bits": "4"}, {**base, "version": "marlin"}):
        with pytest.raises(CheckpointError):
            awq_group_size({"quantization_config": bad})
    assert issubclass(CheckpointError, ValueError)


def test_end_of_sequence_ids(tmp_path, tokenizer):
    path, cfg = files.write_checkpoint(tmp_path / "a", tokenizer=tokenizer,
                                       config=files.hf_config(files.tiny_config(tokenizer.get_vocab_size()),
                                                              eos_token_id=1))
    assert read_checkpoint_config(path).eos_token_ids == (1,)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert read_checkpoint_config(path).eos_token_ids == (1, 7)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [cfg.vocab]}))
    with pytest.raises(CheckpointError, match="not below vocab_size"):
        read_checkpoint_config(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
        read_checkpoint_config(path)
    # no id in the configs: the tokenizer's eos_token, by name
    other, _ = files.write_checkpoint(tmp_path / "b", tokenizer=tokenizer)
    assert read_for_generation(other).eos_token_ids == ()
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": files.EOS}}))
    assert read_for_generation(other).eos_token_ids == (tokenizer.token_to_id(files.EOS),) == (1,)


def test_prompt_encoding_rules(tokenizer):
    ids = encode_prompt(tokenizer, files.PROMPT, tokenizer.get_vocab_size())
    assert ids == tokenizer.encode(files.PROMPT).ids and len(ids) > 3
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_prompt(tokenizer, "", 300)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        encode_prompt(tokenizer, "😀", 200)  # byte tokens sit high in this vocabulary
    with pytest.raises(TypeError, match="prompt must be a str"):
        encode_prompt(tokenizer, ids, 300)


def test_fixture_greedy_path_has_clear_margins(reference):
    # The GPU test below compares greedy ids with the reference's: fp16 logits agree with the float
    # reference to ~1e-2 of their rms (tests/test_e2e.py), so a pick is only stable where it wins by more.
    prompt_ids, ids, margins = reference
    assert min(margins) > MIN_MARGIN, margins
    assert len(set(ids)) >= 3, ids  # the continuation moves, it does not repeat one token


# ---------------------------------------------------------------- streaming and the loop (CPU)


def test_text_stream_holds_back_half_characters(tokenizer):
    text = "naïve café 😀 and ☃ fox"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text.split())  # several characters span more than one byte-level token
    stream = TextStream(tokenizer)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.finish())
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks), chunks
    assert "" in chunks[:-1]  # the emoji's first bytes produced nothing until its last byte came


class ScriptedModel:
    """A fake model for the loop: answers every forward with the next id of ``script`` and records
    what it was fed, at which position."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def __call__(self, ids, pos):
        self.calls.append((list(ids), pos))
        return self.script[len(self.calls) - 1]


def test_greedy_stream_feeds_each_id_at_the_next_position_and_streams_the_text(tokenizer):
    prompt = tokenizer.encode("the lazy").ids
    target = " dog 😀 jumps"
    script = tokenizer.encode(target).ids
    model = ScriptedModel(script)
    chunks = []
    out = greedy_stream(model, prompt, len(script), tokenizer, on_text=chunks.append)
    assert model.calls[0] == (prompt, 0)
    assert model.calls[1:] == [([t], len(prompt) + i) for i, t in enumerate(script[:-1])]
    assert out.token_ids == tuple(script) and out.prompt_ids == tuple(prompt) and not out.stopped_at_eos
    assert out.text == "".join(chunks) == target and all(chunks)
    assert out.decode_steps == len(script) - 1
    assert out.prefill_tokens_per_s > 0 and out.decode_tokens_per_s > 0


def test_greedy_stream_stops_at_eos_and_at_max_new_tokens(tokenizer):
    words = tokenizer.encode(" over the dog").ids
    eos = tokenizer.token_to_id(files.EOS)
    chunks = []
    out = greedy_stream(ScriptedModel(words + [eos] + words), [5], 50, tokenizer, eos_token_ids=[eos],
                        on_text=chunks.append)
    assert out.stopped_at_eos and out.token_ids == tuple(words + [eos])
    assert out.text == "".join(chunks) == " over the dog"
    short = greedy_stream(ScriptedModel(words), [5], 2, tokenizer)
    assert short.token_ids == tuple(words[:2]) and short.decode_steps == 1 and not short.stopped_at_eos
    one = greedy_stream(ScriptedModel(words), [5], 1, tokenizer)
    assert one.token_ids == tuple(words[:1]) and one.decode_steps == 0 and one.decode_tokens_per_s is None
    first = greedy_stream(ScriptedModel([eos]), [5], 9, tokenizer, eos_token_ids=(eos,))
    assert first.stopped_at_eos and first.text == "" and first.token_ids == (eos,)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
            greedy_stream(ScriptedModel(words), [5], bad, tokenizer)


# ---------------------------------------------------------------- end to end on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_generates_the_reference_greedy_tokens(backend, checkpoint, reference, tokenizer, capsys):
    path, _ = checkpoint
    prompt_ids, ids, _ = reference
    argv = ["generate", str(path), "--prompt", files.PROMPT, "--backend", backend, "--max-new-tokens", str(STEPS)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(ids) + "\n", (backend, out, tokenizer.decode(ids))
    assert f"prefill: {len(prompt_ids)} tokens in " in err and f"decode: {STEPS - 1} tokens in " in err, err
    rates = [float(line.split(", ")[-1].split()[0]) for line in err.splitlines() if line.endswith("tokens/s")]
    assert len(rates) == 2 and min(rates) > 0, err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_text_ids_equal_the_reference(backend, checkpoint, reference):
    from quick_lab.model.generate import generate_text, load_for_generation

    path, _ = checkpoint
    prompt_ids, ids, _ = reference
    model, host = load_for_generation(path, backend)
    assert host.weights is None and model.backends == (backend,)
    chunks = []
    out = generate_text(model, host.tokenizer, files.PROMPT, STEPS, backend, on_text=chunks.append)
    assert out.prompt_ids == tuple(prompt_ids)
    assert out.token_ids == tuple(ids), (backend, out.token_ids, ids)
    assert out.text == "".join(chunks) == host.tokenizer.decode(ids)
    assert out.decode_steps == STEPS - 1 and out.prefill_s > 0 and out.decode_s > 0


@pytest.mark.gpu
def test_generation_stops_at_the_configs_eos(tmp_path, tokenizer, reference):
    from quick_lab.model.generate import generate_text, load_for_generation

    _, ids, _ = reference
    eos = ids[2]
    stop = ids.index(eos) + 1
    cfg = files.tiny_config(tokenizer.get_vocab_size())
    path, _ = files.write_checkpoint(tmp_path / "eos", tokenizer=tokenizer,
                                     config=files.hf_config(cfg, eos_token_id=eos))
    model, host = load_for_generation(path, "quick")
    assert host.eos_token_ids == (eos,)
    out = generate_text(model, host.tokenizer, files.PROMPT, STEPS, "quick", eos_token_ids=host.eos_token_ids)
    assert out.stopped_at_eos and out.token_ids == tuple(ids[:stop])
    assert out.text == host.tokenizer.decode(ids[:stop - 1])
