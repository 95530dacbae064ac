// Standalone dequantizer: AutoAWQ GEMM format -> fp16 W[K, N]. Used by the reference path and by the
// dequantize + cuBLAS fallback at large batch. One thread per packed word: 8 weights, one 16-byte store.
#include "quick_layout.cuh"

using namespace ql;

extern "C" __global__ void dequantize_awq(const u32* __restrict__ qweight, const u32* __restrict__ qzeros,
                                          const u16* __restrict__ scales, u16* __restrict__ out, int K, int N,
                                          int group_size) {
  const int words_per_k = N / 8;
  const long long word = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (word >= (long long)K * words_per_k) return;
  const int k = static_cast<int>(word / words_per_k), c = static_cast<int>(word % words_per_k);
  const int group = k / group_size;
  u32 zeros[4];
  dequant_int4x8(qzeros[group * words_per_k + c], zeros);
  const uint4 s = *reinterpret_cast<const uint4*>(scales + (long long)group * N + 8 * c);
  *reinterpret_cast<uint4*>(out + word * 8) = dequant_awq_word(qweight[word], zeros, s);
}

// QUICK layout -> fp16 W^T [N, K] (row n holds column n of W), for the dequantize + cuBLAS path;
// cuBLAS consumes W^T as a transposed operand, with no copy. The interleaved order puts each
// dequantized pair on (k, k+1) of one column, so pairs land as aligned 32-bit words in a shared
// [64 n][128 k] tile (padded by 8 halves per row), which the block then writes out as 256-byte rows:
// coalesced 16-byte stores instead of 4-byte scatter. Block = 8 warps = 8 k16 blocks of one n64 block.
extern "C" __global__ void __launch_bounds__(256)
    dequantize_quick_t(const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                       const uint4* __restrict__ scales, u16* __restrict__ out_t, int K, int N, int group_size) {
  constexpr int kK = 128, kStride = kK + 8;  // k per block; +16 bytes per row keeps the u32 stores
                                             // of a quad's 8 rows (g) in distinct banks
  __shared__ __align__(16) u16 tile[64 * kStride];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const QuickLayout layout(N);
  const int nb = blockIdx.x, kb = blockIdx.y * (kK / 16) + warp;
  if (kb < K / 16) {
    const long long gb = layout.group_block(kb * 16 / group_size, nb);
    const uint4 packed = qweight[layout.word(kb, nb, lane)], s = scales[QuickLayout::scale(gb, g)];
    u32 zero_pair[4];
    dequant_int4x8(qzeros[QuickLayout::zero(gb, g)], zero_pair);
    const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
    const u32 scale_pairs[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      u32 pairs[4];
      dequant_quick_word(words[w], zero_pair[w], scale_pairs[w], pairs);
#pragma unroll
      for (int p = 0; p < 4; ++p) {  // pair p: n8 tile 2w + p / 2 (lo / hi of the scale pair), k + 8 (p % 2)
        const int n = 8 * (2 * w + p / 2) + g, k = 16 * warp + 2 * t + 8 * (p % 2);
        *reinterpret_cast<u32*>(tile + n * kStride + k) = pairs[p];
      }
    }
  }
  __syncthreads();
  const int k0 = blockIdx.y * kK, k_valid = min(kK, K - k0);
  for (int c = threadIdx.x; c < 64 * (kK / 8); c += 256) {  // 16-byte chunks: 16 per row
    const int n = c / (kK / 8), k = (c % (kK / 8)) * 8;
    if (k < k_valid)
      *reinterpret_cast<uint4*>(out_t + (long long)(nb * 64 + n) * K + k0 + k) =
          *reinterpret_cast<const uint4*>(tile + n * kStride + k);
  }
}
