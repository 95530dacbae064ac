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
