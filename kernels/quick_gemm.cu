// QUICK W4A16 GEMM (the paper's Fig. 1b): dequantized weights go straight from registers into
// mma.sync, with no shared-memory write-back and no ldmatrix for weights. Activations keep the
// shared-memory path of common.cuh, pipelined STAGES deep with cp.async.
//
// It works because the weights were interleaved offline (quick_lab/interleave.py) so that the 128
// bits lane L = 4g + t reads for one (k16, n64) block, dequantized, ARE its mma B fragments:
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
#include "common.cuh"

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
  constexpr int kTileBlocks = TILE_N / 64;        // n64 blocks per block tile
  static_assert(Shape::kWarpN % 64 == 0, "a QUICK warp tile spans whole n64 blocks");
  static_assert(STAGES >= 2, "the activation pipeline needs at least two stages");
  // Shared-memory stage: activations, then (ASYNC_W) packed weights [k16][n64][lane] as uint4,
  // scales [n64][g] as uint4 and zeros [n64][g] as u32 - the global QUICK order, copied verbatim.
  constexpr int kAUint4 = ATile::kHalves / 8;
  constexpr int kWUint4 = ASYNC_W ? kSteps * kTileBlocks * 32 : 0;
  constexpr int kSUint4 = ASYNC_W ? kTileBlocks * 8 : 0;
  constexpr int kZUint4 = ASYNC_W ? kTileBlocks * 2 : 0;
  constexpr int kStageUint4 = kAUint4 + kWUint4 + kSUint4 + kZUint4;
  // Direct path with warps stacked along M: they read the same weights, so let L1 serve repeats.
  constexpr bool kSharedWeights = WARPS_M > 1;

  extern __shared__ __align__(16) uint4 smem_u4[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const BlockCoord blk = block_coord<TILE_M, TILE_N>();
  const int n64_per_k16 = N / 64;
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
      constexpr int kRow = kTileBlocks * 32;  // uint4 per k16 row of the tile: contiguous in global
#pragma unroll
      for (int i = 0; i < (kWUint4 + kThreads - 1) / kThreads; ++i) {
        const int c = threadIdx.x + i * kThreads;
        if (kWUint4 % kThreads == 0 || c < kWUint4) {
          const uint4* src = qweight + ((long long)(kt * kSteps + c / kRow) * n64_per_k16 + tile_block0) * 32 + c % kRow;
          cp_async16(smem_addr(stage + kAUint4 + c), src, 16);
        }
      }
      const long long group_block = (long long)(kt * TILE_K / group_size) * n64_per_k16 + tile_block0;
      for (int c = threadIdx.x; c < kSUint4 + kZUint4; c += kThreads) {
        const void* src = c < kSUint4 ? static_cast<const void*>(scales + group_block * 8 + c)
                                      : static_cast<const void*>(qzeros + group_block * 8 + 4 * (c - kSUint4));
        cp_async16(smem_addr(stage + kAUint4 + kWUint4 + c), src, 16);
      }
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
        const uint4* p = qweight + ((long long)(kt * kSteps + ks) * n64_per_k16 + block) * 32 + lane;
        f.q[ks][b] = kSharedWeights ? load_cached_u4(p) : load_stream_u4(p);
      }
      const long long gb = (long long)group * n64_per_k16 + block;
      f.s[b] = load_cached_u4(scales + gb * 8 + g);
      f.z[b] = load_cached_u32(qzeros + gb * 8 + g);
    }
  };
  auto load_shared = [&](const uint4* stage, Fragments& f) {  // staged path: shared -> registers
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) f.q[ks][b] = stage[kAUint4 + (ks * kTileBlocks + warp_block0 + b) * 32 + lane];
      f.s[b] = stage[kAUint4 + kWUint4 + (warp_block0 + b) * 8 + g];
      f.z[b] = reinterpret_cast<const u32*>(stage + kAUint4 + kWUint4 + kSUint4)[(warp_block0 + b) * 8 + g];
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
      warp_mma(acc, a_frag[ks % 2], bfrag);
    }
    __syncthreads();  // the stage just read is the next one cp.async overwrites
    if constexpr (ASYNC_W == 0) cur = next;
  }
  finish_block<TILE_M, TILE_N, kThreads>(acc, out, workspace, tile_counters, split, M, N, blk,
                                          blk.m0 + warp_m * Shape::kWarpM, blk.n0 + warp_n * Shape::kWarpN, lane);
}
