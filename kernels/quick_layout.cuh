// The QUICK weight layout (QUICK, arXiv 2402.10076, Sec. 3), written once: where a lane's packed
// weights, scales and zero points live in global memory and in a cp.async stage, how a stage is
// copied, and how one packed word becomes mma fragments. Every kernel reading the QUICK format
// (quick_gemm.cu, quick_wgmma.cu, dequant.cu's dequantize_quick_t) goes through this header; the
// offline side is quick_lab/core/interleave.py, the Python carve-up quick_lab/core/registry.py.
// Header-free like common.cuh (NVRTC compiles it without the CUDA include directory).
//
// The layout, per k16 block kb (16 rows of K) and n64 block nb (64 columns of N):
//   * mma.m16n8k16's B fragment (PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16"): lane
//     L = 4g + t holds b0 = W[k 2t, 2t+1][n g] and b1 = W[k 2t+8, 2t+9][n g] of an n8 tile, one fp16x2
//     register each. An n64 block is 8 n8 tiles = 16 registers = 128 bits per lane.
//   * So lane L's 16 bytes of (kb, nb) are 4 words; word w holds n8 tiles 2w and 2w+1, and the
//     dequantizer's fixed pair order (n0,n4) (n1,n5) (n2,n6) (n3,n7) (dequant_int4x8, common.cuh)
//     comes out as b0, b1 of tile 2w, then b0, b1 of tile 2w+1: one 128-bit load, dequantized, IS the
//     lane's B fragments, with no shared-memory write-back and no ldmatrix (the paper's point).
//   * The 32 lanes' 16-byte chunks of one (kb, nb) are contiguous: 512 bytes, one fully coalesced warp
//     load, and 8 lanes of an LDS.128 phase read 128 consecutive bytes (conflict free).
//   * Scales and zeros of group gr are permuted so that lane g finds its 8 columns 64 nb + 8j + g
//     (j = 0..7) together: the scales as one uint4 (8 fp16, word w = tiles 2w (lo), 2w+1 (hi)) and the
//     zeros as one u32 (8 nibbles, which dequant_int4x8 turns into the same (lo, hi) pairs). The 4
//     lanes of a quad (same g) share them.
#pragma once
#ifndef QL_QUICK_LAYOUT_CUH  // guard as well: sources.py splices includes as text (see common.cuh)
#define QL_QUICK_LAYOUT_CUH

#include "common.cuh"

namespace ql {

// ---------------------------------------------------------------- global layout
// Element indices into the kernels' typed views: qweight as uint4 [K/16][N/64][32 lanes],
// scales as uint4 [K/G][N/64][8 g], qzeros as u32 [K/G][N/64][8 g].
struct QuickLayout {
  static constexpr int kLanes = 32;                           // a warp: one mma B fragment per lane
  static constexpr int kBlockBytes = kLanes * 16;             // packed weights of one (k16, n64) block
  static constexpr int kScaleBytes = 8 * 16;                  // scales of one (group, n64): 8 g x 8 fp16
  static constexpr int kZeroBytes = 8 * 4;                    // zeros of one (group, n64): 8 g x 8 nibbles
  int n64_per_k16;                                            // N / 64: n64 blocks per k16 row

  __device__ __forceinline__ explicit QuickLayout(int N) : n64_per_k16(N / 64) {}

  // uint4 of lane `lane` in (k16 block k16, n64 block block). The blocks of one k16 row are
  // contiguous, so lane may run past 31 into the next n64 blocks (the stage copy uses that).
  __device__ __forceinline__ long long word(int k16, int block, int lane) const {
    return ((long long)k16 * n64_per_k16 + block) * kLanes + lane;
  }
  // (group, n64 block) record: the 8 uint4 of scales / 8 u32 of zeros of that block.
  __device__ __forceinline__ long long group_block(int group, int block) const {
    return (long long)group * n64_per_k16 + block;
  }
  // uint4 of scales / u32 of zeros lane group g reads, of a record from group_block(); the same index
  // into both arrays (scales 16 bytes, zeros 4 bytes per g).
  __device__ __forceinline__ static long long scale(long long group_block, int g) { return group_block * 8 + g; }
  __device__ __forceinline__ static long long zero(long long group_block, int g) { return group_block * 8 + g; }
};

// ---------------------------------------------------------------- stage layout (bytes)
// One cp.async pipeline stage: A_BYTES of activations (each kernel lays those out itself), then, when
// the weights are staged (STAGED), the packed words of the k-tile [k16][n64][lane] (512 bytes per
// block), its scales [n64][g] (128 bytes per block) and zeros [n64][g] (32 bytes per block): the
// global QUICK order copied verbatim, so a lane reads its words with the same fragment mapping.
// Stages are ALIGN bytes apart. quick_lab/core/registry.py (StageLayout) mirrors these sizes.
template <int A_BYTES, int TILE_N, int TILE_K, bool STAGED, int ALIGN = 16>
struct QuickStage {
  static constexpr int kSteps = TILE_K / 16;       // k16 blocks per k-tile
  static constexpr int kTileBlocks = TILE_N / 64;  // n64 blocks per tile
  static constexpr int kActivationBytes = A_BYTES;
  static constexpr int kWeightBytes = STAGED ? kSteps * kTileBlocks * QuickLayout::kBlockBytes : 0;
  static constexpr int kScaleBytes = STAGED ? kTileBlocks * QuickLayout::kScaleBytes : 0;
  static constexpr int kZeroBytes = STAGED ? kTileBlocks * QuickLayout::kZeroBytes : 0;
  static constexpr int kWeightOffset = kActivationBytes;
  static constexpr int kScaleOffset = kWeightOffset + kWeightBytes;
  static constexpr int kZeroOffset = kScaleOffset + kScaleBytes;
  static constexpr int kBytes = kZeroOffset + kZeroBytes;
  static constexpr int kStride = (kBytes + ALIGN - 1) / ALIGN * ALIGN;  // bytes between stages
  static_assert(A_BYTES % 16 == 0 && ALIGN % 16 == 0, "cp.async 16-byte destinations must be 16-byte aligned");

  // Where lane `lane`'s 16 bytes of (k16 step ks, tile block b) are, and the scales (16 bytes) and
  // zeros (4 bytes) of lane group g of tile block b. *_index: element index within its region, for a
  // kernel that views the stage as uint4 (weights, scales) or u32 (zeros), e.g.
  // stage_u4[kScaleOffset / 16 + scale_index(b, g)]; *_addr: shared byte address in the stage at
  // shared address `stage`.
  __device__ __forceinline__ static int weight_index(int ks, int b, int lane) {
    return (ks * kTileBlocks + b) * QuickLayout::kLanes + lane;
  }
  __device__ __forceinline__ static int scale_index(int b, int g) { return b * 8 + g; }
  __device__ __forceinline__ static int zero_index(int b, int g) { return b * 8 + g; }
  __device__ __forceinline__ static u32 weight_addr(u32 stage, int ks, int b, int lane) {
    return stage + kWeightOffset + weight_index(ks, b, lane) * 16;
  }
  __device__ __forceinline__ static u32 scale_addr(u32 stage, int b, int g) {
    return stage + kScaleOffset + scale_index(b, g) * 16;
  }
  __device__ __forceinline__ static u32 zero_addr(u32 stage, int b, int g) {
    return stage + kZeroOffset + zero_index(b, g) * 4;
  }
};

// ---------------------------------------------------------------- staging copies (cp.async)
// A copy's destination: a shared-memory byte address (quick_wgmma.cu addresses its stages that way),
// or a generic uint4 pointer into shared memory (quick_gemm.cu's view: each chunk's address is then
// converted where it is formed, as that kernel always did; converting its base once instead moved
// ptxas's register allocation of the staged variants by up to +23 registers). 16-byte chunk c of it:
__device__ __forceinline__ u32 smem_chunk(u32 dst, int c) { return dst + 16 * c; }
__device__ __forceinline__ u32 smem_chunk(const uint4* dst, int c) { return smem_addr(dst + c); }

// Packed words of one k-tile (k16 blocks k16_0 .. k16_0 + TILE_K/16 - 1, n64 blocks block0 ..
// block0 + TILE_N/64 - 1), still int4, to the stage's weight region dst (see smem_chunk).
// Each k16 row of the tile is TILE_N/64 x 512 contiguous bytes in global; chunk c of the stage is
// 16-byte chunk c % row of k16 row c / row. THREADS threads issue chunks tid, tid + THREADS, ...
template <int THREADS, int TILE_N, int TILE_K, typename Dst>
__device__ __forceinline__ void stage_weights_async(Dst dst, const uint4* qweight, const QuickLayout& layout,
                                                    int k16_0, int block0) {
  constexpr int kRow = TILE_N / 64 * QuickLayout::kLanes;  // uint4 per k16 row of the tile
  constexpr int kChunks = TILE_K / 16 * kRow;
#pragma unroll
  for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    if (kChunks % THREADS == 0 || c < kChunks) {
      const uint4* src = qweight + layout.word(k16_0 + c / kRow, block0, 0) + c % kRow;
      cp_async16(smem_chunk(dst, c), src, 16);
    }
  }
}

// Scales then zeros of group `group`, n64 blocks block0 .. block0 + TILE_N/64 - 1, to the stage's
// scale region dst (see smem_chunk; the zero region follows it, as in QuickStage). Both are
// contiguous in global: TILE_N/64 x 128 bytes of scales, TILE_N/64 x 32 bytes of zeros.
template <int THREADS, int TILE_N, typename Dst>
__device__ __forceinline__ void stage_scales_zeros_async(Dst dst, const uint4* scales, const u32* qzeros,
                                                         const QuickLayout& layout, int group, int block0) {
  constexpr int kSChunks = TILE_N / 64 * QuickLayout::kScaleBytes / 16;
  constexpr int kZChunks = TILE_N / 64 * QuickLayout::kZeroBytes / 16;
  const long long group_block = layout.group_block(group, block0);
  for (int c = threadIdx.x; c < kSChunks + kZChunks; c += THREADS) {
    const void* src = c < kSChunks ? static_cast<const void*>(scales + QuickLayout::scale(group_block, 0) + c)
                                   : static_cast<const void*>(qzeros + QuickLayout::zero(group_block, 0) + 4 * (c - kSChunks));
    cp_async16(smem_chunk(dst, c), src, 16);
  }
}

// ---------------------------------------------------------------- dequantization of one word
// Zero points and scales of word w's two n8 tiles, broadcast to both halves of a pair: lo serves
// tile 2w (pairs 0, 1), hi tile 2w + 1 (pairs 2, 3). zero_pair: word w of dequant_int4x8 of the
// lane's zero word (biased 1024 + z, like the weights); scale_pair: word w of the lane's scales.
struct ZeroScale {
  u32 z_lo, z_hi, s_lo, s_hi;
};
__device__ __forceinline__ ZeroScale zero_scale_of(u32 zero_pair, u32 scale_pair) {
  return {low_to_pair(zero_pair), high_to_pair(zero_pair), low_to_pair(scale_pair), high_to_pair(scale_pair)};
}

// All four words' pairs of one lane's group record (its uint4 of scales, its u32 of zeros).
__device__ __forceinline__ void zero_scales_of(const uint4& scales, u32 zeros, ZeroScale (&zs)[4]) {
  u32 zero_pairs[4];
  dequant_int4x8(zeros, zero_pairs);
  zs[0] = zero_scale_of(zero_pairs[0], scales.x);
  zs[1] = zero_scale_of(zero_pairs[1], scales.y);
  zs[2] = zero_scale_of(zero_pairs[2], scales.z);
  zs[3] = zero_scale_of(zero_pairs[3], scales.w);
}

// One packed word -> its 4 fp16x2 pairs (q - z) * s, in B-fragment order: b[0], b[1] = b0, b1 of n8
// tile 2w; b[2], b[3] = b0, b1 of tile 2w + 1 (see the top of this file). The wgmma kernel, whose A
// fragment order is {a0, a2, a1, a3} of these, reorders at its call site. The first form takes the
// pairs already split (hoisted out of a k16 loop); the second splits them itself.
__device__ __forceinline__ void apply_zero_scale(const u32 (&q)[4], const ZeroScale& zs, u32 (&b)[4]) {
  b[0] = apply_zero_scale(q[0], zs.z_lo, zs.s_lo);
  b[1] = apply_zero_scale(q[1], zs.z_lo, zs.s_lo);
  b[2] = apply_zero_scale(q[2], zs.z_hi, zs.s_hi);
  b[3] = apply_zero_scale(q[3], zs.z_hi, zs.s_hi);
}
__device__ __forceinline__ void dequant_quick_word(u32 packed, const ZeroScale& zs, u32 (&b)[4]) {
  u32 q[4];
  dequant_int4x8(packed, q);
  apply_zero_scale(q, zs, b);
}
__device__ __forceinline__ void dequant_quick_word(u32 packed, u32 zero_pair, u32 scale_pair, u32 (&b)[4]) {
  u32 q[4];
  dequant_int4x8(packed, q);
  apply_zero_scale(q, zero_scale_of(zero_pair, scale_pair), b);
}

}  // namespace ql

#endif  // QL_QUICK_LAYOUT_CUH
