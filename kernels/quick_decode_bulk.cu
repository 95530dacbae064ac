// QUICK for decode on Hopper (sm_90): quick_decode.cu's split-K GEMV with the weight stream moved off
// the compute warps. quick_decode.cu keeps a warp's chunk in registers, so a warp has bytes in flight
// only between its loads and their use, and the registers cap how many warps (and so bytes) an SM
// holds: on an H100 its large shapes stop at ~70% of the DRAM floor with long-scoreboard stalls on
// top. Here one producer warp per block fills a STAGES-deep ring in shared memory with bulk
// asynchronous copies (cp.async.bulk, one instruction per 512-byte QUICK block, no per-lane copy
// work), counted on transaction mbarriers (bulk.cuh), so STAGES - 1 k-tiles stay in flight while the
// WARPS compute warps dequantize and multiply.
//
// Ring stage (DecodeBulkStage, bytes; quick_lab/core/registry.py mirrors it): the TILE_K / 16 packed
// (k16, n64) blocks of the strip, verbatim (a lane's 16 bytes at block * 512 + lane * 16: the global
// QUICK order, so an LDS.128 of 8 lanes reads 128 consecutive bytes, conflict free), then the
// scale records (128 bytes each) and zero records (32 bytes each) of the k-tile's groups (TILE_K / G
// of them, or 1 when the group is longer than the k-tile). Activations are not staged: they are a few
// KB read by every block, L1 / L2 hits, loaded by the compute warps before they wait on the stage.
//
// Per k-tile i (stage i % STAGES, phase parity (i / STAGES) & 1):
//   produce:  the producer waits until the compute warps have released the stage (empty barrier,
//             one arrival per compute lane), arms the full barrier with the stage's bytes and issues its copies.
//   consume:  each compute warp loads its activation pairs (global), waits on the full barrier, loads
//             its kSteps words and group records from the stage (LDS), releases the stage, then runs
//             quick_decode.cuh decode_matmul on registers as quick_decode.cu does.
//   write:    quick_decode.cuh decode_reduce_write: cross-warp reduction, split-K ticket, fp16 out.
// Grid = (1, N / 64, split), 32 (WARPS + 1) threads; the ring is dynamic shared memory, the mbarriers
// and the reduction buffer static.
#include "bulk.cuh"
#include "quick_decode.cuh"

using namespace ql;

template <int TILE_K>
struct DecodeBulkStage {
  static constexpr int kBlocks = TILE_K / 16;                             // (k16, n64) blocks per k-tile
  static constexpr int kMaxGroups = TILE_K / 32;                          // group sizes >= 32 (registry rule)
  static constexpr int kWeightBytes = kBlocks * QuickLayout::kBlockBytes;
  static constexpr int kScaleOffset = kWeightBytes;                       // [group][8 g] uint4
  static constexpr int kZeroOffset = kScaleOffset + kMaxGroups * QuickLayout::kScaleBytes;  // [group][8 g] u32
  static constexpr int kBytes = kZeroOffset + kMaxGroups * QuickLayout::kZeroBytes;
  static constexpr int kStride = (kBytes + 127) / 128 * 128;
};

template <int TILE_M, int TILE_K, int WARPS, int STAGES>
__global__ void __launch_bounds__(32 * (WARPS + 1))
    quick_decode_bulk(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                      const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                      int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  using Stage = DecodeBulkStage<TILE_K>;
  constexpr int kBatchTiles = TILE_M / 8;
  constexpr int kSteps = TILE_K / 16 / WARPS;  // k16 steps of one compute warp per k-tile
  static_assert(TILE_K % (16 * WARPS) == 0, "every compute warp gets whole k16 steps of a k-tile");
  static_assert(TILE_M == 8 || TILE_M == 16 || TILE_M == 32, "one, two or four n8 tiles of batch rows");
  static_assert(STAGES >= 2, "a ring needs two stages to overlap copies and compute");
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(16) float red[WARPS * TILE_M * kDecodeRedStride];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int strip = blockIdx.y;  // n64 block: output columns 64 strip .. 64 strip + 63
  const QuickLayout layout(N);
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);
  const int tiles = kt_end - kt_begin;
  const int groups = group_size < TILE_K ? TILE_K / group_size : 1;  // group records per k-tile
  const u32 ring_base = smem_addr(ring);
  const u32 full_base = smem_addr(full), empty_base = smem_addr(empty);
  if (threadIdx.x < STAGES) {
    mbar_init(full_base + 8 * threadIdx.x, 1);
    mbar_init(empty_base + 8 * threadIdx.x, 32 * WARPS);  // every compute lane releases its own loads
    mbar_fence_init();
  }
  __syncthreads();

  float acc[kBatchTiles][4][4] = {};  // [batch tile][word = n16 block][c]
  if (warp == WARPS) {
    // produce: lane c issues copies c, c + 32, ...: the k-tile's blocks, then its scale and zero records.
    const u32 stage_bytes = Stage::kWeightBytes + groups * (QuickLayout::kScaleBytes + QuickLayout::kZeroBytes);
    for (int i = 0; i < tiles; ++i) {
      const int st = i % STAGES, kt = kt_begin + i;
      const u32 stage = ring_base + st * Stage::kStride, bar = full_base + 8 * st;
      if (i >= STAGES) mbar_wait(empty_base + 8 * st, ((i / STAGES) - 1) & 1);
      if (lane == 0) mbar_arrive_expect_tx(bar, stage_bytes);
      __syncwarp();
      const int first_group = kt * TILE_K / group_size;
      for (int c = lane; c < Stage::kBlocks + 2 * groups; c += 32) {
        if (c < Stage::kBlocks) {
          bulk_copy_g2s(stage + c * QuickLayout::kBlockBytes, qweight + layout.word(kt * Stage::kBlocks + c, strip, 0),
                        QuickLayout::kBlockBytes, bar);
        } else if (c < Stage::kBlocks + groups) {
          const int gi = c - Stage::kBlocks;
          bulk_copy_g2s(stage + Stage::kScaleOffset + gi * QuickLayout::kScaleBytes,
                        scales + QuickLayout::scale(layout.group_block(first_group + gi, strip), 0),
                        QuickLayout::kScaleBytes, bar);
        } else {
          const int gi = c - Stage::kBlocks - groups;
          bulk_copy_g2s(stage + Stage::kZeroOffset + gi * QuickLayout::kZeroBytes,
                        qzeros + QuickLayout::zero(layout.group_block(first_group + gi, strip), 0),
                        QuickLayout::kZeroBytes, bar);
        }
      }
    }
  } else {
    // B operand: batch row 8 bt + g feeds n8 tile bt; a row past M is never read and stays 0.
    bool has_row[kBatchTiles];
    const u16* x_row[kBatchTiles];
#pragma unroll
    for (int bt = 0; bt < kBatchTiles; ++bt) {
      has_row[bt] = 8 * bt + g < M;
      x_row[bt] = x + (long long)(has_row[bt] ? 8 * bt + g : 0) * K + 2 * t;
    }
    for (int i = 0; i < tiles; ++i) {
      const int st = i % STAGES, kt = kt_begin + i;
      const u32 stage = ring_base + st * Stage::kStride;
      const int block0 = warp * kSteps;                      // this warp's first block of the stage
      const int k0 = (kt * Stage::kBlocks + block0) * 16;    // and its first k
      auto starts_group = [&](int ks) { return ks == 0 || (k0 + 16 * ks) % group_size == 0; };  // warp-uniform
      u32 b[kBatchTiles][kSteps][2];
#pragma unroll
      for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
          b[bt][ks][0] = has_row[bt] ? load_cached_u32(x_row[bt] + k0 + 16 * ks) : 0u;
          b[bt][ks][1] = has_row[bt] ? load_cached_u32(x_row[bt] + k0 + 16 * ks + 8) : 0u;
        }
      mbar_wait(full_base + 8 * st, (i / STAGES) & 1);
      uint4 w[kSteps], s[kSteps];
      u32 z[kSteps];
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        w[ks] = lds_u4(stage + (block0 + ks) * QuickLayout::kBlockBytes + 16 * lane);
        if (starts_group(ks)) {
          const int gi = group_size < TILE_K ? (16 * (block0 + ks)) / group_size : 0;
          s[ks] = lds_u4(stage + Stage::kScaleOffset + gi * QuickLayout::kScaleBytes + 16 * g);
          z[ks] = lds_u32(stage + Stage::kZeroOffset + gi * QuickLayout::kZeroBytes + 4 * g);
        }
      }
      mbar_arrive(empty_base + 8 * st);  // this lane's words are in registers: the stage may be refilled
      decode_matmul(acc, w, s, z, b, starts_group);
    }
  }
  decode_reduce_write<TILE_M, WARPS>(acc, red, out, workspace, tile_counters, M, N, strip, split);
}
