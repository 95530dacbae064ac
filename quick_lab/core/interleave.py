"""The QUICK weight layout: an offline reordering of AutoAWQ-format weights (pure NumPy).

Goal (paper, Sec. 3): the 128 bits a lane loads from DRAM, once run through the lop3 dequantizer,
must already be that lane's ``mma.m16n8k16`` B fragments, so the kernel never writes weights back to
shared memory and never reads them with ``ldmatrix``.

Layout of ``qweight`` (int32, shape ``[K/16, 2N]``, i.e. ``[K/16][N/64][32 lanes][4 words]``):
for the k16 block ``kb`` and the n64 block ``nb``, lane ``L = 4g + t`` owns 4 words; word ``w``
covers the n8 tiles ``2w`` and ``2w+1``. The dequantizer emits nibble pairs (0,4) (1,5) (2,6) (3,7)
(kernels/common.cuh), and each pair must be one fp16x2 B-fragment register: rows (k) ``2t, 2t+1``
(b0) or ``2t+8, 2t+9`` (b1) of column ``g`` of its n8 tile (PTX ISA, fragments for m16n8k16). So

    nibble i of word w  ->  pair p = i % 4, half h = i // 4
    n8 tile  j = 2w + p // 2,   register r = p % 2 (b0/b1)
    k = 16 kb + 2t + 8r + h,    n = 64 nb + 8j + g

The first reordering (fragment order) removes the write-back; the second (pair order 0/4, 1/5, ...)
removes any shuffle after dequantization. Scales and zeros are permuted so lane ``g`` finds the 8
columns ``64 nb + 8j + g`` (j = 0..7) of a group contiguous: scales ``[K/G][N/64][8 g][8 j]`` fp16
(one 16-byte load) and zeros one int32 per (group, nb, g) holding j = 0..7 in AWQ nibble order
(so the dequantizer's pairs are (j0, j1), (j2, j3), ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quick_lab.core.format import AWQWeight, VALID_GROUP_SIZES, pack_int4, unpack_int4, validate_awq

K_BLOCK = 16  # k rows per interleaved block (one mma k16 step)
N_BLOCK = 64  # columns per interleaved block (8 n8 tiles, one 128-bit load per lane)
LANES = 32
WORDS = 4
NIBBLES = 8


@dataclass(frozen=True)
class QuickWeight:
    """AWQ weights reordered for the QUICK kernel (same sizes, same values, other order)."""

    qweight: object  # int32 [K/16, 2N]
    qzeros: object   # int32 [K/G, N/8]
    scales: object   # float16 [K/G, N]
    group_size: int

    @property
    def K(self) -> int:
        return int(self.qweight.shape[0]) * K_BLOCK

    @property
    def N(self) -> int:
        return int(self.scales.shape[1])


def _fragment_offsets() -> tuple[np.ndarray, np.ndarray]:
    """(k, n) offsets inside a (k16, n64) block for every (lane, word, nibble): two [32, 4, 8] arrays."""
    lane, word, nibble = np.meshgrid(np.arange(LANES), np.arange(WORDS), np.arange(NIBBLES), indexing="ij")
    g, t = lane // 4, lane % 4
    pair, half = nibble % 4, nibble // 4
    tile, reg = 2 * word + pair // 2, pair % 2
    return 2 * t + 8 * reg + half, 8 * tile + g


K_OFFSET, N_OFFSET = _fragment_offsets()


def _column_permutation(N: int) -> np.ndarray:
    """Column order of the QUICK scales/zeros: position (nb, g, j) holds column 64 nb + 8 j + g."""
    nb, g, j = np.meshgrid(np.arange(N // N_BLOCK), np.arange(8), np.arange(8), indexing="ij")
    return (N_BLOCK * nb + 8 * j + g).reshape(-1)


def _check_quick_shape(K: int, N: int) -> None:
    if K % K_BLOCK:
        raise ValueError(f"K must be a multiple of {K_BLOCK} for the QUICK layout, got K={K}")
    if N % N_BLOCK:
        raise ValueError(f"N must be a multiple of {N_BLOCK} for the QUICK layout, got N={N}")


def interleave(awq: AWQWeight) -> QuickWeight:
    """AutoAWQ GEMM format -> QUICK layout (NumPy arrays in, NumPy arrays out)."""
    validate_awq(awq)
    K, N = awq.K, awq.N
    _check_quick_shape(K, N)
    q = unpack_int4(np.asarray(awq.qweight))                       # [K, N]
    blocks = q.reshape(K // K_BLOCK, K_BLOCK, N // N_BLOCK, N_BLOCK).transpose(0, 2, 1, 3)
    nibbles = blocks[:, :, K_OFFSET, N_OFFSET].astype(np.uint32)   # [K/16, N/64, 32, 4, 8]
    words = (nibbles << (4 * np.arange(NIBBLES, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    qweight = words.reshape(K // K_BLOCK, 2 * N).view(np.int32)

    perm = _column_permutation(N)
    scales = np.ascontiguousarray(np.asarray(awq.scales)[:, perm])
    zeros = unpack_int4(np.asarray(awq.qzeros))[:, perm]          # [K/G, N], 8 consecutive = j 0..7
    qzeros = pack_int4(zeros)
    return QuickWeight(np.ascontiguousarray(qweight), qzeros, scales, awq.group_size)


def deinterleave(quick: QuickWeight) -> AWQWeight:
    """QUICK layout -> AutoAWQ GEMM format: the exact inverse of :func:`interleave`."""
    qweight = np.asarray(quick.qweight)
    if qweight.ndim != 2 or qweight.dtype != np.int32:
        raise TypeError(f"qweight must be a 2-D int32 array [K/16, 2N], got {qweight.dtype} {qweight.shape}")
    K, N = qweight.shape[0] * K_BLOCK, qweight.shape[1] // 2
    _check_quick_shape(K, N)
    if quick.group_size not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {quick.group_size}")
    words = qweight.view(np.uint32).reshape(K // K_BLOCK, N // N_BLOCK, LANES, WORDS, 1)
    nibbles = (words >> (4 * np.arange(NIBBLES, dtype=np.uint32))) & 0xF
    blocks = np.empty((K // K_BLOCK, N // N_BLOCK, K_BLOCK, N_BLOCK), dtype=np.uint8)
    blocks[:, :, K_OFFSET, N_OFFSET] = nibbles
    q = blocks.transpose(0, 2, 1, 3).reshape(K, N)

    inverse = np.argsort(_column_permutation(N))
    scales = np.ascontiguousarray(np.asarray(quick.scales)[:, inverse])
    zeros = unpack_int4(np.asarray(quick.qzeros))[:, inverse]
    awq = AWQWeight(pack_int4(q), pack_int4(zeros), scales, quick.group_size)
    validate_awq(awq)
    return awq


def emulate_dequantizer(words: np.ndarray) -> np.ndarray:
    """Bit-level model of ``dequant_int4x8`` (kernels/common.cuh): uint32 words -> [..., 4 pairs, 2 halves].

    Pair 0 = (bits 0-3, 16-19), pair 1 = (4-7, 20-23) [the 0x00f000f0 mask], pair 2 and 3 the same
    on the word shifted right by 8.
    """
    w = np.asarray(words).astype(np.uint32)[..., None, None]
    shift = np.array([[0, 16], [4, 20], [8, 24], [12, 28]], dtype=np.uint32)
    return ((w >> shift) & 0xF).astype(np.uint8)


def lane_fragments(quick: QuickWeight, kb: int, nb: int) -> dict[str, np.ndarray]:
    """What every lane hands to mma for the (k16 block kb, n64 block nb), as the kernel computes it.

    Returns arrays indexed [lane, n8 tile j, register r (b0/b1), half h]: ``k`` and ``n``, the weight
    coordinates the PTX fragment definition assigns to that slot (b0 = rows 2t, 2t+1 of column g,
    b1 = rows +8), and ``value``, what the kernel's data path actually puts there: the lane's 128-bit
    load run through the dequantizer model, with the scale and zero the lane loads, (q - z) * s in
    fp16. The layout is right exactly when ``value == W[k, n]`` for every slot.
    """
    qweight = np.asarray(quick.qweight).view(np.uint32)
    N = quick.N
    lanes = qweight[kb].reshape(N // N_BLOCK, LANES, WORDS)[nb]               # [32, 4] words
    pairs = emulate_dequantizer(lanes)                                        # [32, 4 w, 4 p, 2 h]
    # pair p of word w is register p % 2 of tile 2w + p // 2
    q = pairs.reshape(LANES, WORDS, 2, 2, 2).reshape(LANES, 8, 2, 2)         # [lane, j, r, h]

    group = kb * K_BLOCK // quick.group_size
    lane = np.arange(LANES)[:, None, None, None]
    g, t = lane // 4, lane % 4
    j = np.arange(8)[None, :, None, None]
    r = np.arange(2)[None, None, :, None]
    h = np.arange(2)[None, None, None, :]
    # scales/zeros as the kernel reads them: lane g's 8 values of this n64 block, j = 0..7
    scales_row = np.asarray(quick.scales)[group].reshape(N // N_BLOCK, 8, 8)[nb]         # [g, j]
    zero_word = np.asarray(quick.qzeros)[group].view(np.uint32).reshape(N // N_BLOCK, 8)[nb]
    zero_pairs = emulate_dequantizer(zero_word)                                          # [g, 4, 2]
    zeros = zero_pairs.reshape(8, 8)                                                     # [g, j]
    s = scales_row[g, j].astype(np.float32)
    z = zeros[g, j].astype(np.float32)
    value = ((q.astype(np.float32) - z) * s).astype(np.float16)
    k = np.broadcast_to(kb * K_BLOCK + 2 * t + 8 * r + h, value.shape)
    n = np.broadcast_to(nb * N_BLOCK + 8 * j + g, value.shape)
    return {"k": k, "n": n, "value": value}
