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
