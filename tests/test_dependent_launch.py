"""Programmatic dependent launches (quick_lab.build.launch): the driver structs, the argument packing,
the kernels' wait / allow points, and on the GPU that a chain of dependent launches, eager or replayed
from a CUDA graph, gives the plain launches' result bit for bit."""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from quick_lab.build import isa, launch
from quick_lab.core import registry

DEPENDENT_KERNELS = [("quick_decode.cu", "quick_decode<8, 256, 4, 0>"), ("quick_decode.cu", "quick_decode<8, 256, 4, 1>"),
                     ("decoder.cu", "add_rms_norm"),
                     ("decoder.cu", "silu_mul"), ("decoder.cu", "rope_kv"), ("decoder.cu", "attention<128, 4>")]


def test_driver_structs_have_the_cuda_h_layout():
    # cuda.h: CUlaunchAttribute = 4-byte id, 4 bytes of padding, 64-byte value union;
    # CUlaunchConfig = 7 unsigned ints, then the stream, the attribute pointer and their count.
    assert ctypes.sizeof(launch._LaunchAttribute) == 72
    assert launch._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(launch._LaunchConfig) == 56
    assert launch._LaunchConfig.stream.offset == 32
    assert launch._LaunchConfig.attrs.offset == 40
    assert launch._LaunchConfig.num_attrs.offset == 48


def test_kernel_arguments_pack_numpy_scalars_by_their_own_type():
    values = launch.kernel_arguments((np.int32(-7), np.uint64(1 << 40), np.float32(0.5), None))
    assert [type(v) for v in values] == [ctypes.c_int32, ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p]
    assert (values[0].value, values[1].value, values[2].value, values[3].value) == (-7, 1 << 40, 0.5, None)


@pytest.mark.parametrize("bad", [3, 2.0, np.int64(3), "x"])
def test_kernel_arguments_reject_what_the_kernels_do_not_take(bad):
    with pytest.raises(TypeError, match="kernel argument 1"):
        launch.kernel_arguments((np.int32(1), bad))


def test_dependent_launches_is_scoped_and_checks_its_argument():
    assert not getattr(launch._state, "enabled", False)
    with launch.dependent_launches():
        assert launch._state.enabled
        with launch.dependent_launches(False):
            assert not launch._state.enabled
        assert launch._state.enabled
    assert not getattr(launch._state, "enabled", False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with launch.dependent_launches("yes"):
            pass


def test_only_the_decode_family_launches_as_a_dependent():
    flagged = {f.name for f in registry.FAMILIES if f.waits_on_prior_grid}
    assert flagged == {"quick_decode"}


@pytest.mark.parametrize("filename,name", DEPENDENT_KERNELS)
def test_kernels_launched_as_dependents_wait_and_allow_on_sm90_only(filename, name):
    ptx90 = _kernel_ptx(isa.ptx(filename, name, "sm_90"), name)
    assert "griddepcontrol.wait" in ptx90 and "griddepcontrol.launch_dependents" in ptx90
    assert "griddepcontrol" not in _kernel_ptx(isa.ptx(filename, name, "sm_80"), name)


def test_the_decode_gemm_reads_activations_through_coherent_loads():
    # weights, scales, zeros: ld.global.nc (read-only for the kernel's life); the activations, which
    # the kernel before writes while a dependent launch already runs, must not take that path.
    body = _kernel_ptx(isa.ptx("quick_decode.cu", "quick_decode<8, 256, 4, 0>", "sm_90"), "quick_decode")
    # two copies of a chunk (a block's first, which waits, and the steady loop's), each 4 k16 steps
    assert len(re.findall(r"\bld\.global\.nc\.L1::no_allocate\.v4\.u32\b", body)) == 2 * 4  # weights
    assert len(re.findall(r"\bld\.global\.u32\b", body)) == 2 * 2 * 4  # x: two words per k16 step


def _kernel_ptx(ptx: str, name: str) -> str:
    """The body of the one .entry whose mangled name contains ``name``'s identifier."""
    ident = name.split("<")[0]
    entries = re.split(r"(?=\.visible \.entry|\.entry )", ptx)
    mine = [e for e in entries if re.match(r"(\.visible )?\.entry\s+\S*" + ident, e)]
    assert len(mine) == 1, f"{len(mine)} entries named like {ident}"
    return mine[0]


# ---------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 4])
def test_a_chain_of_dependent_decode_gemms_matches_plain_launches(split_k):
    """y_{i+1} = y_i @ W_i, eight times: each GEMM reads what the one before wrote, and with split-K
    all share the stream's ticket counters. Dependent launches, eager and replayed from a graph, give
    the plain launches' result exactly, with NaN-poisoned outputs."""
    import cupy

    import quick_lab.core.ops as ops
    from quick_lab.model.sweep import capture
    from quick_lab.model.weights import random_quantized_linear

    K = N = 1024
    layers = [ops.interleave_gpu(ops.to_device(random_quantized_linear(K, N, seed=s))) for s in range(8)]
    x = cupy.asarray(np.random.default_rng(3).standard_normal((3, K)).astype(np.float16))
    outs = [cupy.empty((3, N), dtype=cupy.float16) for _ in layers]

    def chain():
        y = x
        for w, out in zip(layers, outs):
            y = ops.quick_gemm(y, w, config="8x64x256_w1x4_s1_dc", split_k=split_k, out=out)
        return y

    plain = cupy.asnumpy(chain())
    assert np.isfinite(plain).all() and np.abs(plain).max() > 1e-3
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, launch.dependent_launches():
        for o in outs:
            o.fill(np.nan)
        eager = cupy.asnumpy(chain())
        graph, _ = capture(chain, stream)
        for o in outs:
            o.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
        replayed = cupy.asnumpy(outs[-1])
    np.testing.assert_array_equal(eager, plain)
    np.testing.assert_array_equal(replayed, plain)


@pytest.mark.gpu
def test_dependent_launch_decode_steps_match_plain_launches_bit_for_bit():
    """A tiny GQA model, prefill then 6 greedy steps, every backend: logits and the KV cache with
    dependent launches equal those of plain launches, eager and graph-replayed."""
    import cupy

    from quick_lab.model.config import ModelConfig
    from quick_lab.model.decoder import Model
    from quick_lab.model.generate import decode
    from quick_lab.model.sweep import capture
    from quick_lab.model.weights import random_weights

    cfg = ModelConfig(hidden=512, intermediate=1024, n_heads=8, n_kv_heads=2, n_layers=2, vocab=300,
                      rope_theta=1e4, name="tiny-gqa")
    model = Model(random_weights(cfg, seed=11))
    prompt = cupy.asarray(np.random.default_rng(5).integers(0, cfg.vocab, (3, 300), dtype=np.int32))
    for backend in ("fp16", "awq", "quick"):
        results = {}
        for dependent in (False, True):
            model.dependent_launch = dependent
            cache = model.new_cache(3, 320)
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                logits = model.forward(prompt, cache, 0, backend)
                first = logits.argmax(axis=-1).astype(cupy.int32).reshape(3, 1)
                eager = decode(model, cache, first, 300, 6, backend)
                graph, replayed = capture(lambda: decode(model, cache, first, 300, 6, backend), stream)
                graph.launch(stream)
                step = model.forward(replayed, cache, 306, backend)
            stream.synchronize()
            results[dependent] = [cupy.asnumpy(a) for a in (logits, eager, replayed, step, cache.k[-1], cache.v[0])]
            assert np.isfinite(results[dependent][3]).all(), backend
        for plain, dependent in zip(results[False], results[True]):
            np.testing.assert_array_equal(dependent, plain, err_msg=backend)
        np.testing.assert_array_equal(results[True][2], results[True][1], err_msg=backend)
