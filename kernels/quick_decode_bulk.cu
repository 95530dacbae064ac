// QUICK for decode on Hopper (sm_90): quick_decode.cu's split-K GEMV with the weight stream moved off
// the compute warps. quick_decode.cu keeps a warp's chunk in registers, so a warp has bytes in flight
// only between its loads and their use, and the registers cap how many warps (and so bytes) an SM
// holds: on an H100 its large shapes stop at ~70% of the DRAM floor with long-scoreboard stalls on
// top. Here one producer warp per block fills a STAGES-deep ring in shared memory with bulk
// asynchronous copies (cp.async.bulk: one instruction per k16 row of the tile, no per-lane copy
// work), counted on transaction mbarriers (bulk.cuh), so STAGES - 1 k-tiles stay in flight while the
// WARPS compute warps dequantize and multiply.
//
// A block owns a tile of STRIPS adjacent n64 strips (TILE_N = 64 STRIPS columns): in the QUICK layout
// the strips of one k16 row are contiguous, so each copy is STRIPS x 512 bytes. Compute warp w works
// on strip w % STRIPS; the WARPS / STRIPS warps of a strip split each k-tile along K (kSteps k16
// steps each), in passes of up to 4 steps (a pass's words, group records and activations are loaded
// together, then multiplied).
//
// Ring stage (DecodeBulkStage, bytes; quick_lab/core/registry.py mirrors it): the tile's TILE_K / 16
// k16 rows verbatim (a lane's 16 bytes of strip j at row * STRIPS * 512 + j * 512 + lane * 16: the
// global QUICK order, so an LDS.128 of 8 lanes reads 128 consecutive bytes, conflict free), then the
// scale records (STRIPS x 128 bytes per group) and zero records (STRIPS x 32 bytes per group) of the
// k-tile's groups (TILE_K / G of them, or 1 when the group is longer than the k-tile). Activations
// are not staged: a few KB read by every block, L1 / L2 hits, loaded by the compute warps.
//
// Per k-tile i (stage i % STAGES, phase parity (i / STAGES) & 1):
//   produce:  the producer waits until the compute warps have released the stage (empty barrier,
//             one arrival per compute lane), arms the full barrier with the stage's bytes and issues
//             its copies.
//   consume:  each compute warp waits on the full barrier; per pass it loads its activation pairs
//             (global), its words and group records (LDS) and runs quick_decode.cuh decode_matmul;
//             then it releases the stage.
//             FOLD (_fz): decode_matmul_folded, zero points and scales applied once per group.
//   write:    quick_decode.cuh decode_reduce_write: cross-warp reduction, split-K ticket, fp16 out.
// Grid = (1, N / TILE_N, split), 32 (WARPS + 1) threads; the ring is dynamic shared memory, the
// mbarriers and the reduction buffer static.
#include "bulk.cuh"
#include "quick_decode.cuh"

using namespace ql;

template <int TILE_K, int STRIPS>
struct DecodeBulkStage {
  static constexpr int kRows = TILE_K / 16;                                    // k16 rows per k-tile
  static constexpr int kRowBytes = STRIPS * QuickLayout::kBlockBytes;          // one copy
  static constexpr int kMaxGroups = TILE_K >= 64 ? TILE_K / 32 : 1;            // group sizes >= 32
  static constexpr int kScaleBytes = STRIPS * QuickLayout::kScaleBytes;       // one group's scale records
  static constexpr int kZeroBytes = STRIPS * QuickLayout::kZeroBytes;         // one group's zero records
  static constexpr int kScaleOffset = kRows * kRowBytes;                       // [group][strip][8 g] uint4
  static constexpr int kZeroOffset = kScaleOffset + kMaxGroups * kScaleBytes;  // [group][strip][8 g] u32
  static constexpr int kBytes = kZeroOffset + kMaxGroups * kZeroBytes;
  static constexpr int kStride = (kBytes + 127) / 128 * 128;
};

template <int TILE_M, int TILE_N, int TILE_K, int WARPS, int STAGES, bool FOLD>
__global__ void __launch_bounds__(32 * (WARPS + 1))
    quick_decode_bulk(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                      const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                      int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  constexpr int kStrips = TILE_N / 64;
  using Stage = DecodeBulkStage<TILE_K, kStrips>;
  constexpr int kBatchTiles = TILE_M / 8;
  constexpr int kWarpsPerStrip = WARPS / kStrips;
  constexpr int kSteps = TILE_K / 16 / kWarpsPerStrip;  // k16 steps of one compute warp per k-tile
  constexpr int kPass = kSteps < 4 ? kSteps : 4;          // steps whose words are in registers at once
  static_assert(WARPS % kStrips == 0 && TILE_K % (16 * kWarpsPerStrip) == 0 && kSteps % kPass == 0,
                "every compute warp gets whole passes of k16 steps of one strip");
  static_assert(TILE_M == 8 || TILE_M == 16 || TILE_M == 32, "one, two or four n8 tiles of batch rows");
  static_assert(STAGES >= 2, "a ring needs two stages to overlap copies and compute");
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(16) float red[WARPS * TILE_M * kDecodeRedStride];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.y;  // columns TILE_N tile .. TILE_N tile + TILE_N - 1
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
    // produce: lane c issues copies c, c + 32, ...: the k-tile's k16 rows, then its scale and zero records.
    const u32 stage_bytes = Stage::kScaleOffset + groups * (Stage::kScaleBytes + Stage::kZeroBytes);
    for (int i = 0; i < tiles; ++i) {
      const int st = i % STAGES, kt = kt_begin + i;
      const u32 stage = ring_base + st * Stage::kStride, bar = full_base + 8 * st;
      if (i >= STAGES) mbar_wait(empty_base + 8 * st, ((i / STAGES) - 1) & 1);
      if (lane == 0) mbar_arrive_expect_tx(bar, stage_bytes);
      __syncwarp();
      const int first_group = kt * TILE_K / group_size;
      for (int c = lane; c < Stage::kRows + 2 * groups; c += 32) {
        if (c < Stage::kRows) {
          bulk_copy_g2s(stage + c * Stage::kRowBytes, qweight + layout.word(kt * Stage::kRows + c, kStrips * tile, 0),
                        Stage::kRowBytes, bar);
        } else if (c < Stage::kRows + groups) {
          const int gi = c - Stage::kRows;
          bulk_copy_g2s(stage + Stage::kScaleOffset + gi * Stage::kScaleBytes,
                        scales + QuickLayout::scale(layout.group_block(first_group + gi, kStrips * tile), 0),
                        Stage::kScaleBytes, bar);
        } else {
          const int gi = c - Stage::kRows - groups;
          bulk_copy_g2s(stage + Stage::kZeroOffset + gi * Stage::kZeroBytes,
                        qzeros + QuickLayout::zero(layout.group_block(first_group + gi, kStrips * tile), 0),
                        Stage::kZeroBytes, bar);
        }
      }
    }
  } else {
    const int strip = warp % kStrips, part = warp / kStrips;
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
      mbar_wait(full_base + 8 * st, (i / STAGES) & 1);
#pragma unroll
      for (int pass = 0; pass < kSteps; pass += kPass) {
        const int row0 = part * kSteps + pass;         // this pass's first k16 row of the stage
        const int k0 = kt * TILE_K + 16 * row0;        // and its first k
        auto starts_group = [&](int ks) { return ks == 0 || (k0 + 16 * ks) % group_size == 0; };  // warp-uniform
        u32 b[kBatchTiles][kPass][2];
#pragma unroll
        for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
          for (int ks = 0; ks < kPass; ++ks) {
            b[bt][ks][0] = has_row[bt] ? load_cached_u32(x_row[bt] + k0 + 16 * ks) : 0u;
            b[bt][ks][1] = has_row[bt] ? load_cached_u32(x_row[bt] + k0 + 16 * ks + 8) : 0u;
          }
        uint4 w[kPass], s[kPass];
        u32 z[kPass];
#pragma unroll
        for (int ks = 0; ks < kPass; ++ks) {
          w[ks] = lds_u4(stage + (row0 + ks) * Stage::kRowBytes + strip * QuickLayout::kBlockBytes + 16 * lane);
          if (starts_group(ks)) {
            const int gi = group_size < TILE_K ? 16 * (row0 + ks) / group_size : 0;
            s[ks] = lds_u4(stage + Stage::kScaleOffset + gi * Stage::kScaleBytes + strip * QuickLayout::kScaleBytes + 16 * g);
            z[ks] = lds_u32(stage + Stage::kZeroOffset + gi * Stage::kZeroBytes + strip * QuickLayout::kZeroBytes + 4 * g);
          }
        }
        if constexpr (FOLD) decode_matmul_folded(acc, w, s, z, b, k0, group_size);
        else decode_matmul(acc, w, s, z, b, starts_group);
      }
      mbar_arrive(empty_base + 8 * st);  // this lane's reads of the stage are done: it may be refilled
    }
  }
  decode_reduce_write<TILE_M, WARPS, kStrips>(acc, red, out, workspace, tile_counters, M, N, tile, split);
}
