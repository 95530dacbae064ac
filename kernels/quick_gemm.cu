// QUICK W4A16 GEMM (the paper's Fig. 1b): weights go global -> registers -> dequantize -> mma.sync,
// with no shared-memory write-back and no ldmatrix for weights. Activations keep the shared-memory
// path of common.cuh, pipelined STAGES deep with cp.async.
//
// It works because the weights were interleaved offline (quick_lab/interleave.py) so that the 128
// bits lane L = 4g + t loads for one (k16, n64) block, dequantized, ARE its mma B fragments:
//   word w of the uint4 covers n8 tiles 2w and 2w+1 of the n64 block, and the dequantizer's pairs
//   (nibbles 0/4, 1/5, 2/6, 3/7; common.cuh) come out as
//     pair 0 = b0 of tile 2w   = W[2t, 2t+1][8(2w) + g]        pair 1 = b1 of tile 2w   (k + 8)
//     pair 2 = b0 of tile 2w+1 = W[2t, 2t+1][8(2w+1) + g]      pair 3 = b1 of tile 2w+1 (k + 8)
//   (B fragment of m16n8k16: b0 = rows 2t, 2t+1 of column g, b1 = rows 2t+8, 2t+9; PTX ISA 9.7.14.5.8)
// A warp's 32 lanes read one contiguous 512-byte block per (k16, n64): fully coalesced.
// Scales and zeros are reordered the same way, so lane g reads the 8 values of its columns
// 8j + g (j = 0..7) of an n64 block with one 16-byte load (scales) and one 32-bit load (zeros).
#include "common.cuh"

using namespace ql;

__device__ __forceinline__ u32 word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int TILE_M, int TILE_N, int TILE_K, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    quick_gemm(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
               const uint4* __restrict__ scales, void* __restrict__ out, int M, int K, int N, int group_size,
               int split) {
  using Shape = TileShape<TILE_M, TILE_N, TILE_K, WARPS_M, WARPS_N>;
  using ATile = ActivationTile<TILE_M, TILE_K>;
  constexpr int kThreads = Shape::kThreads, MMA_M = Shape::kMmaM, MMA_N = Shape::kMmaN;
  constexpr int kSteps = Shape::kSteps;
  constexpr int kBlocks = Shape::kWarpN / 64;  // n64 blocks per warp
  static_assert(Shape::kWarpN % 64 == 0, "a QUICK warp tile spans whole n64 blocks");
  static_assert(STAGES >= 2, "the activation pipeline needs at least two stages");
  // Warps stacked along M read the same weights: let L1 serve the repeats.
  constexpr bool kSharedWeights = WARPS_M > 1;

  extern __shared__ __align__(16) u16 smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
  const int n64_per_k16 = N / 64;
  const int block0 = (n0 + warp_n * Shape::kWarpN) / 64;  // first n64 block of this warp
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);

  // One k-tile of this lane's weights, scales and zeros, held in registers (double-buffered).
  struct Fragments {
    uint4 q[kSteps][kBlocks];
    uint4 s[kBlocks];
    u32 z[kBlocks];
  };
  auto load_fragments = [&](int kt, Fragments& f) {
    const int group = kt * TILE_K / group_size;  // TILE_K divides group_size
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const uint4* p = qweight + ((long long)(kt * kSteps + ks) * n64_per_k16 + block0 + b) * 32 + lane;
        f.q[ks][b] = kSharedWeights ? load_cached_u4(p) : load_stream_u4(p);
      }
      const long long gb = (long long)group * n64_per_k16 + block0 + b;
      f.s[b] = load_cached_u4(scales + gb * 8 + g);
      f.z[b] = load_cached_u32(qzeros + gb * 8 + g);
    }
  };

  // Prologue: the first STAGES-1 activation tiles in flight, the first weight tile in registers.
  // Exactly one cp.async group is committed per tile slot, so wait_group<STAGES-1> below always
  // means "the tile about to be used has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (kt_begin + s < kt_end)
      ATile::template load_async<kThreads>(smem + s * ATile::kHalves, x, M, K, m0, (kt_begin + s) * TILE_K);
    cp_async_commit();
  }
  Fragments cur, next;
  if (kt_begin < kt_end) load_fragments(kt_begin, cur);

  float acc[MMA_M][MMA_N][4] = {};
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int fetch = kt + STAGES - 1;
    if (fetch < kt_end)
      ATile::template load_async<kThreads>(smem + ((fetch - kt_begin) % STAGES) * ATile::kHalves, x, M, K, m0,
                                           fetch * TILE_K);
    cp_async_commit();
    if (kt + 1 < kt_end) load_fragments(kt + 1, next);  // in flight while this tile computes

    // Zero points and scales of this tile's group, broadcast per n8 tile: pair (lo, hi) of word w
    // serves tiles 2w (lo) and 2w+1 (hi).
    u32 zero_pair[kBlocks][4];
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) dequant_int4x8(cur.z[b], zero_pair[b]);

    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const u16* a_stage = smem + ((kt - kt_begin) % STAGES) * ATile::kHalves;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      u32 a[MMA_M][4];
#pragma unroll
      for (int i = 0; i < MMA_M; ++i) ATile::load_fragment(a[i], a_stage, warp_m * Shape::kWarpM + 16 * i, 16 * ks, lane);
      u32 bfrag[MMA_N][2];
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          u32 q[4];
          dequant_int4x8(word_of(cur.q[ks][b], w), q);
          const u32 z_lo = low_to_pair(zero_pair[b][w]), z_hi = high_to_pair(zero_pair[b][w]);
          const u32 s_lo = low_to_pair(word_of(cur.s[b], w)), s_hi = high_to_pair(word_of(cur.s[b], w));
          const int j = 8 * b + 2 * w;
          bfrag[j][0] = apply_zero_scale(q[0], z_lo, s_lo);
          bfrag[j][1] = apply_zero_scale(q[1], z_lo, s_lo);
          bfrag[j + 1][0] = apply_zero_scale(q[2], z_hi, s_hi);
          bfrag[j + 1][1] = apply_zero_scale(q[3], z_hi, s_hi);
        }
      }
      warp_mma(acc, a, bfrag);
    }
    __syncthreads();  // the stage just read is the next one cp.async overwrites
    cur = next;
  }
  store_warp_tile(acc, out, split, M, N, m0 + warp_m * Shape::kWarpM, n0 + warp_n * Shape::kWarpN, lane);
}
