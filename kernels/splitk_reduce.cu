// Split-K reduction: sums the fp32 partials [split, M, N] written by the GEMM kernels' epilogue
// (common.cuh, store_warp_tile) into fp16 [M, N]. Each thread handles 4 consecutive outputs.
#include "common.cuh"

extern "C" __global__ void splitk_reduce(const float* __restrict__ partial, u16* __restrict__ out, int split,
                                         long long mn) {
  const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (i >= mn) return;
  float4 acc = *reinterpret_cast<const float4*>(partial + i);
  for (int s = 1; s < split; ++s) {
    const float4 v = *reinterpret_cast<const float4*>(partial + s * mn + i);
    acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
  }
  uint2 packed;
  packed.x = ql::float2_to_half2(acc.x, acc.y);
  packed.y = ql::float2_to_half2(acc.z, acc.w);
  *reinterpret_cast<uint2*>(out + i) = packed;
}
