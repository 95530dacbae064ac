// Standalone dequantizer: AutoAWQ GEMM format -> fp16 W[K, N]. Used by the reference path and by the
// dequantize + cuBLAS fallback at large batch. One thread per packed word: 8 weights, one 16-byte store.
#include "common.cuh"

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

// QUICK layout -> fp16 W^T [N, K] (row n holds column n of W). The interleaved order puts each
// dequantized pair on (k, k+1) of one column, so the transposed output takes every pair as one
// aligned 32-bit store, and the 4 lanes of a quad fill one 32-byte sector per n8 tile and register
// pair. cuBLAS then consumes W^T as a transposed operand, with no copy. One thread per 128-bit load.
extern "C" __global__ void dequantize_quick_t(const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                                              const uint4* __restrict__ scales, u16* __restrict__ out_t, int K,
                                              int N, int group_size) {
  const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (kb, nb, lane)
  const int n64_per_k16 = N / 64;
  if (chunk >= (long long)(K / 16) * n64_per_k16 * 32) return;
  const int lane = static_cast<int>(chunk % 32), g = lane >> 2, t = lane & 3;
  const int nb = static_cast<int>(chunk / 32 % n64_per_k16), kb = static_cast<int>(chunk / 32 / n64_per_k16);
  const long long gb = (long long)(kb * 16 / group_size) * n64_per_k16 + nb;
  const uint4 packed = qweight[chunk], s = scales[gb * 8 + g];
  u32 zero_pair[4];
  dequant_int4x8(qzeros[gb * 8 + g], zero_pair);
  const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
  const u32 scale_pairs[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    u32 q[4];
    dequant_int4x8(words[w], q);
#pragma unroll
    for (int p = 0; p < 4; ++p) {  // pair p: n8 tile 2w + p/2 (lo/hi half of the scale/zero pair), k + 8 * (p % 2)
      const bool hi = p >= 2;
      const u32 z = hi ? high_to_pair(zero_pair[w]) : low_to_pair(zero_pair[w]);
      const u32 sc = hi ? high_to_pair(scale_pairs[w]) : low_to_pair(scale_pairs[w]);
      const int n = nb * 64 + 8 * (2 * w + p / 2) + g, k = kb * 16 + 2 * t + 8 * (p % 2);
      *reinterpret_cast<u32*>(out_t + (long long)n * K + k) = apply_zero_scale(q[p], z, sc);
    }
  }
}
