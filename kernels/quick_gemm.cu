// QUICK W4A16 GEMM (the paper's Fig. 1b): dequantized weights go straight from registers into
// mma.sync, with no shared-memory write-back and no ldmatrix for weights. Activations keep the
// shared-memory path of common.cuh, pipelined STAGES deep with cp.async.
//
// It works because the weights were interleaved offline (quick_lab/core/interleave.py; the layout as
// code: quick_layout.cuh) so that the 128 bits lane L = 4g + t reads for one (k16, n64) block,
// dequantized, ARE its mma B fragments:
//   word w of the uint4 covers n8 tiles 2w and 2w+1 of the n64 block, and the dequantizer's pairs
//   (nibbles 0/4, 1/5, 2/6, 3/7; common.cuh) come out as
//     pair 0 = b0 of tile 2w   = W[2t, 2t+1][8(2w) + g]        pair 1 = b1 of tile 2w   (k + 8)
//     pair 2 = b0 of tile 2w+1 = W[2t, 2t+1][8(2w+1) + g]      pair 3 = b1 of tile 2w+1 (k + 8)
//   (B fragment of m16n8k16: b0 = rows 2t, 2t+1 of column g, b1 = rows 2t+8, 2t+9; PTX ISA 9.7.14.5.8)
// A warp's 32 lanes read one contiguous 512-byte block per (k16, n64).
// Scales and zeros are reordered the same way, so lane g reads the 8 values of its columns
// 8j + g (j = 0..7) of an n64 block with one 16-byte load (scales) and one 32-bit load (zeros).
//
// Two weight paths, chosen by ASYNC_W:
//   0 - the paper's: each lane loads its packed weights global -> registers itself, one k-tile ahead.
//   1 - packed (still int4, never dequantized) weights, scales and zeros ride the activation cp.async
//       pipeline into shared memory, STAGES tiles ahead, then each lane reads its 16 bytes with one
//       conflict-free LDS.128 (8 lanes of a phase read 128 consecutive bytes). Deeper latency hiding
//       for the same register budget, and warps stacked along M share one copy.
#include "quick_layout.cuh"

using namespace ql;

__device__ __forceinline__ u32 word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int TILE_M, int TILE_N, int TILE_K, int WARPS_M, int WARPS_N, int STAGES, int ASYNC_W>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    quick_gemm(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
               const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
               int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  using Shape = TileShape<TILE_M, TILE_N, TILE_K, WARPS_M, WARPS_N>;
  using ATile = ActivationTile<TILE_M, TILE_K>;
  constexpr int kThreads = Shape::kThreads, MMA_M = Shape::kMmaM, MMA_N = Shape::kMmaN;
  constexpr int kSteps = Shape::kSteps;
  constexpr int kBlocks = Shape::kWarpN / 64;     // n64 blocks per warp
  static_assert(Shape::kWarpN % 64 == 0, "a QUICK warp tile spans whole n64 blocks");
  static_assert(STAGES >= 2, "the activation pipeline needs at least two stages");
  // Shared-memory stage: the padded activation tile, then (ASYNC_W) packed weights [k16][n64][lane],
  // scales [n64][g] and zeros [n64][g] - the global QUICK order, copied verbatim (quick_layout.cuh).
  // Byte offsets from QuickStage; the kernel indexes it through a uint4 view (every part is 16-byte
  // aligned), so the LDS.128 / LDS.32 of load_shared stay plain typed loads.
  using Stage = QuickStage<ATile::kHalves * 2, TILE_N, TILE_K, ASYNC_W != 0>;
  constexpr int kStageUint4 = Stage::kStride / 16;
  // Direct path with warps stacked along M: they read the same weights, so let L1 serve repeats.
  constexpr bool kSharedWeights = WARPS_M > 1;

  extern __shared__ __align__(16) uint4 smem_u4[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const BlockCoord blk = block_coord<TILE_M, TILE_N>();
  const QuickLayout layout(N);
  const int tile_block0 = blk.n0 / 64;                         // first n64 block of the block tile
  const int warp_block0 = warp_n * kBlocks;                    // ... of this warp, within the tile
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);

  auto stage_ptr = [&](int kt) { return smem_u4 + ((kt - kt_begin) % STAGES) * kStageUint4; };

  // Everything of k-tile kt that goes through cp.async: activations, and with ASYNC_W the weights.
  auto issue_tile = [&](int kt) {
    uint4* stage = stage_ptr(kt);
    ATile::template load_async<kThreads>(reinterpret_cast<u16*>(stage), x, M, K, blk.m0, kt * TILE_K);
    if constexpr (ASYNC_W != 0) {
      stage_weights_async<kThreads, TILE_N, TILE_K>(stage + Stage::kWeightOffset / 16, qweight, layout, kt * kSteps,
                                                    tile_block0);
      stage_scales_zeros_async<kThreads, TILE_N>(stage + Stage::kScaleOffset / 16, scales, qzeros, layout,
                                                 kt * TILE_K / group_size, tile_block0);
    }
  };

  // One k-tile of this lane's weights, scales and zeros, in registers.
  struct Fragments {
    uint4 q[kSteps][kBlocks];
    uint4 s[kBlocks];
    u32 z[kBlocks];
  };
  auto load_global = [&](int kt, Fragments& f) {  // direct path: global -> registers
    const int group = kt * TILE_K / group_size;     // TILE_K divides group_size
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      const int block = tile_block0 + warp_block0 + b;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const uint4* p = qweight + layout.word(kt * kSteps + ks, block, lane);
        f.q[ks][b] = kSharedWeights ? load_cached_u4(p) : load_stream_u4(p);
      }
      const long long gb = layout.group_block(group, block);
      f.s[b] = load_cached_u4(scales + QuickLayout::scale(gb, g));
      f.z[b] = load_cached_u32(qzeros + QuickLayout::zero(gb, g));
    }
  };
  auto load_shared = [&](const uint4* stage, Fragments& f) {  // staged path: shared -> registers
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks)
        f.q[ks][b] = stage[Stage::kWeightOffset / 16 + Stage::weight_index(ks, warp_block0 + b, lane)];
      f.s[b] = stage[Stage::kScaleOffset / 16 + Stage::scale_index(warp_block0 + b, g)];
      f.z[b] = reinterpret_cast<const u32*>(stage + Stage::kZeroOffset / 16)[Stage::zero_index(warp_block0 + b, g)];
    }
  };

  // Prologue: STAGES-1 tiles in flight. Exactly one cp.async group is committed per tile slot, so
  // wait_group<STAGES-1> in the loop always means "the tile about to be used has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (kt_begin + s < kt_end) issue_tile(kt_begin + s);
    cp_async_commit();
  }
  Fragments cur, next;
  if constexpr (ASYNC_W == 0) {
    if (kt_begin < kt_end) load_global(kt_begin, cur);
  }

  float acc[MMA_M][MMA_N][4] = {};
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    if (kt + STAGES - 1 < kt_end) issue_tile(kt + STAGES - 1);
    cp_async_commit();
    if constexpr (ASYNC_W == 0) {
      if (kt + 1 < kt_end) load_global(kt + 1, next);  // in flight while this tile computes
    }
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const uint4* stage = stage_ptr(kt);
    if constexpr (ASYNC_W != 0) load_shared(stage, cur);

    // Zero points and scales of this tile's group, per n8 tile: pair (lo, hi) of word w serves
    // tiles 2w (lo) and 2w+1 (hi) of its n64 block.
    u32 zero_pair[kBlocks][4];
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) dequant_int4x8(cur.z[b], zero_pair[b]);

    // A fragments are double-buffered across k16 steps: the ldmatrix of step ks + 1 is issued before
    // the mma of step ks, so its shared-memory latency hides behind tensor-core work.
    auto load_a = [&](u32 (&a)[MMA_M][4], int ks) {
#pragma unroll
      for (int i = 0; i < MMA_M; ++i)
        ATile::load_fragment(a[i], reinterpret_cast<const u16*>(stage), warp_m * Shape::kWarpM + 16 * i, 16 * ks, lane);
    };
    u32 a_frag[2][MMA_M][4];
    load_a(a_frag[0], 0);
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks + 1 < kSteps) load_a(a_frag[(ks + 1) % 2], ks + 1);
      u32 bfrag[MMA_N][2];
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {  // word w -> (b0, b1) of n8 tiles 2w and 2w + 1
          u32 pairs[4];
          dequant_quick_word(word_of(cur.q[ks][b], w), zero_pair[b][w], word_of(cur.s[b], w), pairs);
          const int j = 8 * b + 2 * w;
          bfrag[j][0] = pairs[0];
          bfrag[j][1] = pairs[1];
          bfrag[j + 1][0] = pairs[2];
          bfrag[j + 1][1] = pairs[3];
        }
      }
      warp_mma(acc, a_frag[ks % 2], bfrag);
    }
    __syncthreads();  // the stage just read is the next one cp.async overwrites
    if constexpr (ASYNC_W == 0) cur = next;
  }
  finish_block<TILE_M, TILE_N, kThreads>(acc, out, workspace, tile_counters, split, M, N, blk,
                                          blk.m0 + warp_m * Shape::kWarpM, blk.n0 + warp_n * Shape::kWarpN, lane);
}
