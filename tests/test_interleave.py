"""The QUICK layout (CPU): exact inverse, and every lane's dequantized registers are exactly its
mma.m16n8k16 B fragments as the PTX ISA defines them."""
from __future__ import annotations

import numpy as np
import pytest

from quick_lab.core.format import dequantize_fp16, random_awq
from quick_lab.core.interleave import (K_OFFSET, N_OFFSET, QuickWeight, deinterleave, emulate_dequantizer,
                                  interleave, lane_fragments)

SHAPES = [(128, 64, 32), (256, 192, 64), (384, 128, 128), (1024, 512, 128)]


@pytest.mark.parametrize("K,N,G", SHAPES)
def test_interleave_then_deinterleave_is_identity(K, N, G):
    awq = random_awq(K, N, G, seed=K + N + G)
    back = deinterleave(interleave(awq))
    for name in ("qweight", "qzeros", "scales"):
        assert np.array_equal(getattr(back, name).view(np.uint8), getattr(awq, name).view(np.uint8)), name


@pytest.mark.parametrize("K,N,G", SHAPES)
def test_every_lane_register_holds_its_ptx_b_fragment(K, N, G):
    awq = random_awq(K, N, G, seed=3 * K + N)
    quick = interleave(awq)
    W = dequantize_fp16(awq)
    for kb in {0, K // 32, K // 16 - 1}:
        for nb in {0, N // 64 - 1}:
            f = lane_fragments(quick, kb, nb)
            lane = np.arange(32)[:, None, None, None]
            g, t = lane // 4, lane % 4
            # PTX ISA, m16n8k16 B fragment: b0,b1 -> k = 2t + {0,1}; b2,b3 -> k + 8; n = groupID
            r = np.arange(2)[None, None, :, None]
            h = np.arange(2)[None, None, None, :]
            j = np.arange(8)[None, :, None, None]
            assert np.array_equal(f["k"], np.broadcast_to(kb * 16 + 2 * t + 8 * r + h, f["k"].shape))
            assert np.array_equal(f["n"], np.broadcast_to(nb * 64 + 8 * j + g, f["n"].shape))
            assert np.array_equal(f["value"].view(np.uint16), W[f["k"], f["n"]].view(np.uint16))


def test_a_corrupted_layout_is_caught_by_the_fragment_model():
    awq = random_awq(128, 64, 128, seed=9)
    quick = interleave(awq)
    qweight = quick.qweight.copy()
    qweight[0, [0, 1]] = qweight[0, [1, 0]]  # swap two words of lane 0
    bad = QuickWeight(qweight, quick.qzeros, quick.scales, quick.group_size)
    f = lane_fragments(bad, 0, 0)
    assert not np.array_equal(f["value"], dequantize_fp16(awq)[f["k"], f["n"]])


def test_each_block_position_is_used_exactly_once():
    flat = (K_OFFSET * 64 + N_OFFSET).ravel()
    assert sorted(flat.tolist()) == list(range(16 * 64))


def test_dequantizer_model_pairs_nibbles_0_4_1_5_2_6_3_7():
    word = np.uint32(0x76543210)  # nibble i holds the value i
    assert emulate_dequantizer(word).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_n_not_a_multiple_of_64_is_rejected():
    with pytest.raises(ValueError, match="N must be a multiple of 64"):
        interleave(random_awq(128, 96, 32, seed=0))
