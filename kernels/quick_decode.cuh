// The steps the two decode kernels share (quick_decode.cu streams the weights into registers,
// quick_decode_bulk.cu through a shared-memory ring filled by bulk copies): the matmul of one warp's
// chunk and the cross-warp reduction with the split-K write. See quick_decode.cu for the product's
// orientation (out^T = W^T x^T: weights as the mma A operand, activations as B).
#pragma once
#ifndef QL_QUICK_DECODE_CUH  // guard as well: sources.py splices includes as text (see common.cuh)
#define QL_QUICK_DECODE_CUH

#include "quick_layout.cuh"

namespace ql {

// Reduction rows (one per batch row) padded to 68 floats: the stores of one (tile, word) put lane
// (g, t) at row 2t, column g, i.e. bank (8t + g) mod 32, all 32 banks distinct.
constexpr int kDecodeRedStride = 64 + 4;

// A chunk of one warp: K_STEPS k16 steps of a lane's packed words w, the group records (scales s,
// zeros z) valid at the steps where starts_group(ks) holds, and the activation pairs b of each
// batch tile. matmul: per k16 step, per word: dequantize with its group's pair, 1 mma.m16n8k16 per
// 8 batch rows.
template <int BATCH_TILES, int K_STEPS, typename StartsGroup>
__device__ __forceinline__ void decode_matmul(float (&acc)[BATCH_TILES][4][4], const uint4 (&w)[K_STEPS],
                                              const uint4 (&s)[K_STEPS], const u32 (&z)[K_STEPS],
                                              const u32 (&b)[BATCH_TILES][K_STEPS][2], StartsGroup starts_group) {
  ZeroScale zs[4];
#pragma unroll
  for (int ks = 0; ks < K_STEPS; ++ks) {
    if (starts_group(ks)) zero_scales_of(s[ks], z[ks], zs);
    const u32 words[4] = {w[ks].x, w[ks].y, w[ks].z, w[ks].w};
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      u32 q[4];
      dequant_quick_word(words[v], zs[v], q);
      const u32 a[4] = {q[0], q[2], q[1], q[3]};  // rows g: n8 tile 2v, rows g + 8: tile 2v + 1
#pragma unroll
      for (int bt = 0; bt < BATCH_TILES; ++bt) mma_m16n8k16(acc[bt][v], a, b[bt][ks][0], b[bt][ks][1]);
    }
  }
}

// Folded zero points and scales (configs named _fz): the per-weight zero subtraction and scale product
// leave the main loop. The four LOP3s of dequant_int4x8_unscaled give 1024 + q in the k-low pairs
// (a0, a1) and 1024 + 16 q in the k-high pairs (a2, a3); the 1/16 goes into B instead (b1, the k-high
// activations, times 1/16: exact in fp16 above the subnormals), so per word 5 instructions feed the
// mma instead of 15. The mma sums into per-group accumulators G[n][m] = sum_lo (1024 + q) x +
// sum_hi (64 + q) x, and one more mma per k16 step against a constant A (ones in rows g, k-low and
// rows g + 8, k-high) gives Rl[m] = sum_lo x and Rh[m] = sum_hi x / 16. When the group (or the chunk)
// ends, with zb = 1024 + z[n]:  y[m][n] += s[n] (G - zb (Rl + 16 Rh) + 15360 Rh) = s[n] sum (q - z) x,
// exact up to fp32 rounding (products of fp16 are exact in fp32; the bias cancels). It differs from
// the unfolded path only in where it rounds: that one rounds each (q - z) s to fp16 as AutoAWQ does.

// One word v's accumulators of one batch tile at a group's end: c0, c1 are row g = column g of n8
// tile 2v (low halves of the zero pair and scale word), batch rows 2t, 2t + 1; c2, c3 row g + 8 =
// tile 2v + 1 (high halves). rsum: c0, c1 = Rl of batch rows 2t, 2t + 1; c2, c3 = Rh of the same
// rows. grp is reset for the next group.
__device__ __forceinline__ void fold_group(float (&acc)[4], float (&grp)[4], const float (&rsum)[4], u32 zero_pair,
                                           u32 scale_pair) {
  const float z_lo = half_to_float(static_cast<u16>(zero_pair & 0xffff));
  const float z_hi = half_to_float(static_cast<u16>(zero_pair >> 16));
  const float s_lo = half_to_float(static_cast<u16>(scale_pair & 0xffff));
  const float s_hi = half_to_float(static_cast<u16>(scale_pair >> 16));
  const float total[2] = {fmaf(16.f, rsum[2], rsum[0]), fmaf(16.f, rsum[3], rsum[1])};  // Rl + 16 Rh = sum x
  const float bias[2] = {15360.f * rsum[2], 15360.f * rsum[3]};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float zb = c < 2 ? z_lo : z_hi, s = c < 2 ? s_lo : s_hi;
    acc[c] = fmaf(s, grp[c] - fmaf(zb, total[c & 1], -bias[c & 1]), acc[c]);
    grp[c] = 0.f;
  }
}

// decode_matmul with folded zero points and scales: the chunk's k16 steps start at k = k0; a group
// starts at step 0 and wherever k is a multiple of group_size (its record is s, z of that step).
template <int BATCH_TILES, int K_STEPS>
__device__ __forceinline__ void decode_matmul_folded(float (&acc)[BATCH_TILES][4][4], const uint4 (&w)[K_STEPS],
                                                     const uint4 (&s)[K_STEPS], const u32 (&z)[K_STEPS],
                                                     const u32 (&b)[BATCH_TILES][K_STEPS][2], int k0,
                                                     int group_size) {
  constexpr u32 kOneSixteenth = 0x2c002c00;                     // fp16x2 (1/16, 1/16)
  const u32 ones[4] = {0x3c003c00u, 0u, 0u, 0x3c003c00u};       // rows g: k-low, rows g + 8: k-high
  float grp[BATCH_TILES][4][4] = {}, rsum[BATCH_TILES][4] = {};
  uint4 group_scales = s[0];
  u32 group_zeros = z[0];
#pragma unroll
  for (int ks = 0; ks < K_STEPS; ++ks) {
    const int k = k0 + 16 * ks;
    if (ks > 0 && k % group_size == 0) { group_scales = s[ks]; group_zeros = z[ks]; }
    u32 b_hi[BATCH_TILES];
#pragma unroll
    for (int bt = 0; bt < BATCH_TILES; ++bt) {
      b_hi[bt] = hmul2(b[bt][ks][1], kOneSixteenth);
      mma_m16n8k16(rsum[bt], ones, b[bt][ks][0], b_hi[bt]);
    }
    const u32 words[4] = {w[ks].x, w[ks].y, w[ks].z, w[ks].w};
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      u32 q[4];
      dequant_int4x8_unscaled(words[v], q);
      const u32 a[4] = {q[0], q[2], q[1], q[3]};  // k-low pairs 0, 2 = a0, a1; k-high 1, 3 = a2, a3
#pragma unroll
      for (int bt = 0; bt < BATCH_TILES; ++bt) mma_m16n8k16(grp[bt][v], a, b[bt][ks][0], b_hi[bt]);
    }
    if (ks == K_STEPS - 1 || (k + 16) % group_size == 0) {  // the group (or the chunk) ends here
      u32 zero_pairs[4];
      dequant_int4x8(group_zeros, zero_pairs);  // biased 1024 + z: tile 2v low, 2v + 1 high
      const u32 scale_words[4] = {group_scales.x, group_scales.y, group_scales.z, group_scales.w};
#pragma unroll
      for (int bt = 0; bt < BATCH_TILES; ++bt) {
#pragma unroll
        for (int v = 0; v < 4; ++v) fold_group(acc[bt][v], grp[bt][v], rsum[bt], zero_pairs[v], scale_words[v]);
#pragma unroll
        for (int c = 0; c < 4; ++c) rsum[bt][c] = 0.f;
      }
    }
  }
}

// reduce: the compute warps' partial 64 x TILE_M tiles are summed through shared memory (red: WARPS x
// TILE_M x kDecodeRedStride floats), so a block writes one partial, not WARPS. The block's tile is
// STRIPS n64 strips (tile index blockIdx.y, columns 64 STRIPS tile ..); compute warp w works on strip
// w % STRIPS, and the WARPS / STRIPS warps of a strip split its K range.
// write_result: split == 1: fp16 straight out; else the fp32 partial goes to workspace[split][M][N]
// and the block that takes the last ticket on its tile (common.cuh take_ticket) sums the slices in
// split order (deterministic) and writes fp16: one launch, no second pass. Every thread of the block
// calls it (warps >= WARPS, e.g. a producer, pass no accumulators); it ends with a barrier.
template <int TILE_M, int WARPS, int STRIPS = 1>
__device__ __forceinline__ void decode_reduce_write(const float (&acc)[TILE_M / 8][4][4], float* red, u16* out,
                                                    float* workspace, int* tile_counters, int M, int N,
                                                    int tile, int split) {
  constexpr int kCols = 64 * STRIPS;
  static_assert(WARPS % STRIPS == 0, "every strip gets the same number of warps");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rows = min(M, TILE_M);
  // acc[bt][v] c0, c1 -> batch rows 8 bt + 2t, + 1 at column 16 v + g; c2, c3 -> column + 8.
  if (warp < WARPS) {
#pragma unroll
    for (int bt = 0; bt < TILE_M / 8; ++bt)
#pragma unroll
      for (int v = 0; v < 4; ++v)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          red[(warp * TILE_M + 8 * bt + 2 * t + (c & 1)) * kDecodeRedStride + 16 * v + 8 * (c >> 1) + g] =
              acc[bt][v][c];
  }
  __syncthreads();

  // thread i of M x kCols sums the partials of element (i / kCols, i % kCols) over its strip's warps.
  float* partial = split > 1 ? workspace + (long long)blockIdx.z * M * N : nullptr;
  for (int i = threadIdx.x; i < rows * kCols; i += blockDim.x) {
    const int r = i / kCols, col = i % kCols, strip = col / 64, c = col % 64;
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < WARPS / STRIPS; ++p) v += red[((p * STRIPS + strip) * TILE_M + r) * kDecodeRedStride + c];
    const long long idx = (long long)r * N + tile * kCols + col;
    if (partial) partial[idx] = v;
    else out[idx] = float_to_half(v);
  }
  if (split == 1 || !take_ticket(tile_counters + tile, split)) return;
  const long long mn = (long long)M * N;
  for (int i = threadIdx.x; i < rows * kCols; i += blockDim.x) {
    const long long idx = (long long)(i / kCols) * N + tile * kCols + i % kCols;
    float v = 0.f;
    for (int s = 0; s < split; ++s) v += load_l2_f32(workspace + s * mn + idx);
    out[idx] = float_to_half(v);
  }
}

}  // namespace ql

#endif  // QL_QUICK_DECODE_CUH
