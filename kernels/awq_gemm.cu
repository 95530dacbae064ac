// Baseline W4A16 GEMM in the AutoAWQ style (the paper's reference point, Fig. 1a).
//   y[M, N] = x[M, K] @ W[K, N],  W[k, n] = (q[k, n] - z[k / G, n]) * s[k / G, n]
// Per block tile: activations go global -> shared (cp.async) -> ldmatrix; packed weights go
// global -> registers -> dequantize -> **shared-memory write-back** -> ldmatrix.trans -> mma.sync.
// That write-back and the second trip through shared memory are what QUICK removes.
// Weights are in the AutoAWQ GEMM format: qweight int32 [K, N/8], nibble i of word j = column
// 8j + (0,2,4,6,1,3,5,7)[i], so the dequantizer's pairs (see common.cuh) are adjacent columns.
#include "common.cuh"

using namespace ql;

template <int TILE_M, int TILE_N, int TILE_K, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    awq_gemm(const u16* __restrict__ x, const u32* __restrict__ qweight, const u32* __restrict__ qzeros,
             const u16* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
             int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  using Shape = TileShape<TILE_M, TILE_N, TILE_K, WARPS_M, WARPS_N>;
  using ATile = ActivationTile<TILE_M, TILE_K>;
  constexpr int kThreads = Shape::kThreads, MMA_M = Shape::kMmaM, MMA_N = Shape::kMmaN;
  // Dequantized weights live as a row-major [TILE_K][TILE_N] fp16 tile padded by 8 halves (16 bytes)
  // per row, as in AutoAWQ: rows 4 banks apart keep the 8 row addresses of each ldmatrix.trans phase
  // in distinct bank groups.
  constexpr int kBStride = TILE_N + 8;
  // Write-back mapping (AutoAWQ's): a thread owns one 8-column chunk and walks down the rows, loading
  // one 32-bit word (8 weights) per row and storing 16 bytes of fp16.
  constexpr int kWordsPerRow = TILE_N / 8;
  constexpr int kRowsPerPass = kThreads / kWordsPerRow;
  static_assert(kThreads % kWordsPerRow == 0 && TILE_K % kRowsPerPass == 0, "write-back mapping");
  static_assert(MMA_N % 2 == 0, "ldmatrix.x4.trans loads two n8 tiles");

  extern __shared__ __align__(16) u16 smem[];
  u16* a_smem = smem;
  u16* b_smem = smem + ATile::kHalves;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const BlockCoord blk = block_coord<TILE_M, TILE_N>();
  const int m0 = blk.m0, n0 = blk.n0;
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);

  const int chunk = threadIdx.x % kWordsPerRow, row_in_pass = threadIdx.x / kWordsPerRow;
  const int col = n0 + chunk * 8;
  const int words_per_k = N / 8;

  float acc[MMA_M][MMA_N][4] = {};
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * TILE_K;
    ATile::template load_async<kThreads>(a_smem, x, M, K, m0, k0);
    cp_async_commit();

    // Dequantize this thread's share of the weight tile and write it back to shared memory.
    const int group = k0 / group_size;  // TILE_K divides group_size: one group per tile
    u32 zeros[4];
    dequant_int4x8(load_cached_u32(qzeros + group * words_per_k + col / 8), zeros);
    const uint4 s = load_cached_u4(scales + (long long)group * N + col);
#pragma unroll
    for (int p = 0; p < TILE_K / kRowsPerPass; ++p) {
      const int k = p * kRowsPerPass + row_in_pass;
      const u32 packed = load_stream_u32(qweight + (long long)(k0 + k) * words_per_k + col / 8);
      *reinterpret_cast<uint4*>(b_smem + k * kBStride + chunk * 8) = dequant_awq_word(packed, zeros, s);
    }
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll
    for (int ks = 0; ks < Shape::kSteps; ++ks) {
      u32 a[MMA_M][4];
#pragma unroll
      for (int i = 0; i < MMA_M; ++i) ATile::load_fragment(a[i], a_smem, warp_m * Shape::kWarpM + 16 * i, 16 * ks, lane);
      // ldmatrix.x4.trans over two n8 tiles: lanes 0-15 address k rows 0-15 of the first tile, lanes
      // 16-31 the same rows of the second; registers 0,1 = (b0, b1) of tile 2j, 2,3 = of tile 2j+1.
      u32 b[MMA_N][2];
#pragma unroll
      for (int j = 0; j < MMA_N / 2; ++j) {
        u32 r[4];
        const u16* p = b_smem + (16 * ks + (lane & 15)) * kBStride + warp_n * Shape::kWarpN + 16 * j + (lane >> 4) * 8;
        ldmatrix_x4_trans(r, smem_addr(p));
        b[2 * j][0] = r[0];
        b[2 * j][1] = r[1];
        b[2 * j + 1][0] = r[2];
        b[2 * j + 1][1] = r[3];
      }
      warp_mma(acc, a, b);
    }
    __syncthreads();
  }
  finish_block<TILE_M, TILE_N, kThreads>(acc, out, workspace, tile_counters, split, M, N, blk,
                                          m0 + warp_m * Shape::kWarpM, n0 + warp_n * Shape::kWarpN, lane);
}
