// AutoAWQ GEMM format -> the QUICK layout on the GPU: the same reordering as
// quick_lab/core/interleave.py's interleave() (the reference; this kernel must match it bit for bit),
// laid out as quick_layout.cuh describes. Loading a checkpoint then reorders its weights at memory speed
// instead of through NumPy (~35 MB/s: minutes for a 70B model).
//
// One block per (k16 block, 4 n64 blocks): the 16 AutoAWQ rows x 32 words of the tile are read row by
// row (128 contiguous bytes per row) into shared memory, then each thread assembles QUICK words from
// it; consecutive threads write consecutive words (the 4 n64 blocks of a k16 row are contiguous in the
// QUICK layout). The block whose k16 block starts a quantization group also writes that group's
// permuted scales and zeros for its n64 blocks.
#include "quick_layout.cuh"

using namespace ql;

namespace {
constexpr int kBlocksPerTile = 4;                 // n64 blocks per thread block; quick_lab/core/ops.py mirrors it
constexpr int kTileWords = kBlocksPerTile * 8;    // AutoAWQ words of one k row of the tile (8 per n64 block)
constexpr int kRowStride = kTileWords + 4;        // a 36-word row stride puts the 16 (t, w) words of a warp's
                                                  // gather in 16 distinct banks (8t + 2w + const mod 32)
constexpr int kThreads = 256;

// Nibble of column c (0..7 within its word) in AutoAWQ's packing order 0,2,4,6,1,3,5,7
// (quick_lab.core.format.AWQ_ORDER): even columns in nibbles 0-3, odd ones in 4-7.
__device__ __forceinline__ int awq_nibble(int c) { return (c >> 1) | ((c & 1) << 2); }
}  // namespace

// qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N] (AutoAWQ) -> out_qweight int32
// [K/16, 2N], out_qzeros int32 [K/G, N/8], out_scales fp16 [K/G, N] (QUICK). Grid (K/16, ceil(N/256)).
extern "C" __global__ void __launch_bounds__(kThreads)
    interleave_awq(const u32* __restrict__ qweight, const u32* __restrict__ qzeros, const u16* __restrict__ scales,
                   u32* __restrict__ out_qweight, u32* __restrict__ out_qzeros, uint4* __restrict__ out_scales,
                   int K, int N, int group_size) {
  __shared__ u32 tile[16 * kRowStride];
  const QuickLayout layout(N);
  const int kb = blockIdx.x, block0 = blockIdx.y * kBlocksPerTile;
  const int blocks = min(kBlocksPerTile, layout.n64_per_k16 - block0);  // the last tile may be narrower
  const int words_per_k = N / 8;

  for (int c = threadIdx.x; c < 16 * kTileWords; c += kThreads) {
    const int row = c / kTileWords, col = c % kTileWords;
    if (col < 8 * blocks)
      tile[row * kRowStride + col] = qweight[(long long)(16 * kb + row) * words_per_k + 8 * block0 + col];
  }
  __syncthreads();

  // QUICK word w of lane L = 4g + t in tile block b: nibble i is half h = i / 4 of pair p = i % 4, i.e.
  // register r = p % 2 of n8 tile j = 2w + p / 2, i.e. W[k 16 kb + 2t + 8r + h][n 64 nb + 8j + g]. Column
  // 8j + g of the block is column g of AutoAWQ word 8b + j of the tile.
  for (int o = threadIdx.x; o < blocks * 128; o += kThreads) {
    const int b = o / 128, lane = (o / 4) % 32, w = o % 4, g = lane >> 2, t = lane & 3;
    const int shift = 4 * awq_nibble(g);
    u32 word = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int p = i & 3, h = i >> 2;
      const int k = 2 * t + 8 * (p & 1) + h, j = 2 * w + (p >> 1);
      word |= ((tile[k * kRowStride + 8 * b + j] >> shift) & 0xFu) << (4 * i);
    }
    out_qweight[layout.word(kb, block0 + b, lane) * 4 + w] = word;
  }

  // Scales and zeros of the group this k16 block starts: record (group, n64 block nb, g) holds the 8
  // columns 64 nb + 8j + g, j = 0..7: the scales as 8 fp16 in j order, the zeros as one word with
  // j's zero in AutoAWQ nibble awq_nibble(j) (the pair order the dequantizer expects).
  if ((16 * kb) % group_size == 0) {
    const int group = 16 * kb / group_size;
    for (int r = threadIdx.x; r < blocks * 8; r += kThreads) {
      const int nb = block0 + r / 8, g = r % 8, shift = 4 * awq_nibble(g);
      const u32* zeros_in = qzeros + (long long)group * words_per_k + 8 * nb;
      const u16* scales_in = scales + (long long)group * N + 64 * nb + g;
      u32 zero = 0, s[4];
#pragma unroll
      for (int j = 0; j < 8; ++j) zero |= ((zeros_in[j] >> shift) & 0xFu) << (4 * awq_nibble(j));
#pragma unroll
      for (int w = 0; w < 4; ++w) s[w] = scales_in[8 * (2 * w)] | (u32(scales_in[8 * (2 * w + 1)]) << 16);
      const long long record = layout.group_block(group, nb);
      out_qzeros[QuickLayout::zero(record, g)] = zero;
      out_scales[QuickLayout::scale(record, g)] = make_uint4(s[0], s[1], s[2], s[3]);
    }
  }
}
