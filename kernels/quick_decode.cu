// QUICK for decode (M <= 32): a split-K GEMV on the tensor core that streams the interleaved weights.
//
// At decode batch sizes the GEMM is a weight stream: every packed byte is read once and the arithmetic
// is tiny, so what matters is bytes in flight per SM (Little's law: ~3 TB/s x ~1 us of loaded DRAM
// latency over 132 SMs is ~23 KB per SM on an H100) and no work that waits on anything but DRAM. A block
// owns one n64 strip of the output (64 columns, the QUICK layout's unit) and a contiguous K range; warp
// w owns k16 steps [w kSteps, (w + 1) kSteps) of every k-tile of that range (its chunk) and never waits
// for another warp before the final reduction.
//
// The product is computed transposed, out^T = W^T x^T, so the weights are the mma A operand (16 rows
// of N) and the activations the B operand (n8 = 8 batch rows): TILE_M = 8 serves M <= 8 with no mma
// row of padding, TILE_M = 16 and 32 use two and four n8 tiles of batch rows. The QUICK layout gives this for free: a lane's
// dequantized word w holds b0, b1 of n8 tiles 2w and 2w + 1 (quick_layout.cuh), and in mma.m16n8k16's
// A fragment (PTX ISA 9.7.14.5.8) rows g and g + 8 of an m16 x k16 tile are exactly those two tiles'
// column g: a = {b0(2w), b0(2w+1), b1(2w), b1(2w+1)}. B is b0 = x[row g][k 2t, 2t+1] and b1 =
// x[row g][k 2t+8, 2t+9]: two 32-bit loads straight from global memory (x is tiny and stays in L1 /
// L2), so no shared memory, no ldmatrix and no barrier sit in the main loop.
//
//   1. fetch:        each lane issues all kSteps of its 16-byte fragments of the chunk at once
//                    (ld.global.nc.L1::no_allocate: read once, never re-read by this SM), the zero /
//                    scale words of every group that starts in the chunk and its activation pairs, so
//                    a warp has kSteps x 512 bytes of weights in flight before it waits on anything.
//                    With STAGES > 1 (names _s2, _s3) the lanes also prefetch the chunk STAGES - 1
//                    k-tiles ahead into L2 (one 128-byte line each): more DRAM requests in flight at
//                    no register cost, and the chunk's own loads then wait on L2, not DRAM.
//   2. matmul:       per k16 step, per word: dequantize with its group's pair, 1 mma.m16n8k16 per 8
//                    batch rows (quick_decode.cuh decode_matmul, shared with quick_decode_bulk.cu).
//   3. reduce:       the warps' partial 64 x TILE_M tiles are summed through shared memory, so a
//                    block writes one partial, not WARPS;
//   4. write_result: split == 1: fp16 straight out; else the fp32 partial goes to
//                    workspace[split][M][N] and the block that takes the last ticket on its strip
//                    (common.cuh take_ticket) sums the slices in split order (deterministic) and writes
//                    fp16: one launch, no second pass (3 and 4: quick_decode.cuh decode_reduce_write).
//
// Measured on an H100 and kept out (results/NOTES.md): a per-warp cp.async ring in shared memory
// instead of registers (more bytes in flight, but slower: issue-bound on the extra copies and shared
// loads at 25% occupancy), and a register double buffer of the next chunk (fewer resident warps).
// Grid = (1, N / 64, split). K must be a multiple of TILE_K (quick_lab/core/registry.py checks it); a
// step's group is k / group_size, so a chunk may span several groups.
#include "quick_decode.cuh"

using namespace ql;

template <int TILE_M, int TILE_K, int WARPS, int STAGES>
__global__ void __launch_bounds__(32 * WARPS)
    quick_decode(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                 const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                 int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  constexpr int kBatchTiles = TILE_M / 8;
  constexpr int kSteps = TILE_K / 16 / WARPS;  // k16 steps of one warp per k-tile
  constexpr int kAhead = STAGES - 1;            // k-tiles prefetched into L2 ahead of the one in registers
  static_assert(kSteps <= 8, "a lane prefetches one 128-byte line: at most 8 blocks of 512 bytes per chunk");
  static_assert(TILE_K % (16 * WARPS) == 0, "every warp gets whole k16 steps of a k-tile");
  static_assert(TILE_M == 8 || TILE_M == 16 || TILE_M == 32, "one, two or four n8 tiles of batch rows");
  __shared__ __align__(16) float red[WARPS * TILE_M * kDecodeRedStride];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int strip = blockIdx.y;  // n64 block: output columns 64 strip .. 64 strip + 63
  const QuickLayout layout(N);
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);

  // B operand: batch row 8 bt + g feeds n8 tile bt; a row past M is never read and stays 0.
  bool has_row[kBatchTiles];
  const u16* x_row[kBatchTiles];
#pragma unroll
  for (int bt = 0; bt < kBatchTiles; ++bt) {
    has_row[bt] = 8 * bt + g < M;
    x_row[bt] = x + (long long)(has_row[bt] ? 8 * bt + g : 0) * K + 2 * t;
  }
  auto starts_group = [&](int ks, int k) { return ks == 0 || k % group_size == 0; };  // warp-uniform

  float acc[kBatchTiles][4][4] = {};  // [batch tile][word = n16 block][c]
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k16_0 = kt * (TILE_K / 16) + warp * kSteps;  // this warp's first k16 block
    // fetch: weights, the group records that start here, activations; nothing waits yet.
    uint4 w[kSteps], s[kSteps];
    u32 z[kSteps], b[kBatchTiles][kSteps][2];
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) w[ks] = load_stream_u4(qweight + layout.word(k16_0 + ks, strip, lane));
    if (kAhead > 0 && kt + kAhead < kt_end && lane < 4 * kSteps)  // lane l: line l % 4 of block l / 4
      prefetch_l2(qweight + layout.word(k16_0 + kAhead * (TILE_K / 16) + lane / 4, strip, 8 * (lane % 4)));
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int k = (k16_0 + ks) * 16;
      if (starts_group(ks, k)) {
        const long long gb = layout.group_block(k / group_size, strip);
        s[ks] = load_cached_u4(scales + QuickLayout::scale(gb, g));
        z[ks] = load_cached_u32(qzeros + QuickLayout::zero(gb, g));
      }
    }
#pragma unroll
    for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const int k = (k16_0 + ks) * 16;
        b[bt][ks][0] = has_row[bt] ? load_cached_u32(x_row[bt] + k) : 0u;
        b[bt][ks][1] = has_row[bt] ? load_cached_u32(x_row[bt] + k + 8) : 0u;
      }

    decode_matmul(acc, w, s, z, b, [&](int ks) { return starts_group(ks, (k16_0 + ks) * 16); });
  }
  decode_reduce_write<TILE_M, WARPS>(acc, red, out, workspace, tile_counters, M, N, strip, split);
}
