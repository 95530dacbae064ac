// QUICK for decode (M <= 16): a split-K GEMV on the tensor core that streams the interleaved weights.
//
// At decode batch sizes the GEMM is a weight stream: every packed byte is read once and the arithmetic
// is tiny, so what matters is bytes in flight per SM (Little's law: ~3 TB/s x ~0.8 us of DRAM latency
// is ~2.4 MB in flight, ~18 KB per SM on an H100) and no work that waits on anything but DRAM. The
// tiled kernels keep one weight k-tile in flight per warp behind a cp.async activation pipeline; here
// a block owns one n64 strip of the output (64 columns, the QUICK layout's unit) and a contiguous K
// range, and each of its WARPS warps owns a quarter (an eighth) of every k-tile of that range:
//
//   1. fetch_weights:     each lane issues all kSteps of its 16-byte fragments of the k-tile at once
//                         (ld.global.nc.L1::no_allocate: read once, never re-read by this SM) and the
//                         zero / scale words of their group, so a warp has kSteps x 512 bytes in flight
//                         before it waits on anything. (Double-buffering a second k-tile in registers
//                         and shared memory measured slower on an H100: more registers, fewer blocks.)
//   2. fetch_activations: the block copies x[0..15][k-tile] (rows past M zero-filled) to shared memory
//                         with cp.async, behind the weight loads; x is tiny and L2-resident.
//   3. matmul:            per k16 step: the lane's fragment, dequantized with its group's zero / scale
//                         pair (quick_layout.cuh), IS its mma B operand for 8 n8 tiles; A comes from
//                         ldmatrix (rows >= M are zeros); 8 mma.m16n8k16 per step.
//   4. reduce:            the warps' partial 16 x 64 tiles are summed through shared memory, so a block
//                         writes one partial, not WARPS;
//   5. write_result:      split == 1: fp16 straight out; else the fp32 partial goes to
//                         workspace[split][M][N] and the block that takes the last ticket on its strip
//                         (common.cuh take_ticket) sums the slices in split order (deterministic) and
//                         writes fp16: one launch, no second pass.
//
// Grid = (1, N / 64, split), the tile-grid geometry of the other mma.sync kernels with a 16 x 64 tile.
// K must be a multiple of TILE_K (quick_lab/core/registry.py checks it); a step's group is
// k / group_size, so TILE_K may span several groups.
#include "quick_layout.cuh"

using namespace ql;

template <int TILE_K, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
    quick_decode(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                 const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                 int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  constexpr int kThreads = 32 * WARPS;
  constexpr int kSteps = TILE_K / 16 / WARPS;  // k16 steps of one warp per k-tile
  static_assert(TILE_K % (16 * WARPS) == 0, "every warp gets whole k16 steps of a k-tile");
  using ATile = ActivationTile<16, TILE_K>;
  // The activation tile, reused for the cross-warp reduction once every warp's mma are done. Reduction
  // rows are padded to 72 floats: the 8 row groups g of a float2 store land 8 banks apart.
  constexpr int kRedStride = 64 + 8;
  constexpr int kABytes = ATile::kHalves * 2, kRedBytes = WARPS * 16 * kRedStride * 4;
  __shared__ __align__(16) unsigned char smem[kABytes > kRedBytes ? kABytes : kRedBytes];
  u16* a_smem = reinterpret_cast<u16*>(smem);
  float* red = reinterpret_cast<float*>(smem);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int strip = blockIdx.y;  // n64 block: output columns 64 strip .. 64 strip + 63
  const QuickLayout layout(N);
  int kt_begin, kt_end;
  split_k_range(K / TILE_K, split, kt_begin, kt_end);

  float acc[8][4] = {};
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k16_0 = kt * (TILE_K / 16) + warp * kSteps;  // this warp's first k16 block
    // fetch_weights: the k-tile's fragments and the zero / scale words of its first group, all issued
    // before anything waits (the group of a chunk of kSteps x 16 rows is one group when G >= that).
    uint4 w[kSteps];
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) w[ks] = load_stream_u4(qweight + layout.word(k16_0 + ks, strip, lane));
    const long long gb0 = layout.group_block(k16_0 * 16 / group_size, strip);
    const uint4 s0 = load_cached_u4(scales + QuickLayout::scale(gb0, g));
    const u32 z0 = load_cached_u32(qzeros + QuickLayout::zero(gb0, g));
    // fetch_activations
    ATile::template load_async<kThreads>(a_smem, x, M, K, 0, kt * TILE_K);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    ZeroScale zs[4];
    auto split_pairs = [&](const uint4& s, u32 z) {
      u32 zero_pair[4];
      dequant_int4x8(z, zero_pair);
      zs[0] = zero_scale_of(zero_pair[0], s.x);
      zs[1] = zero_scale_of(zero_pair[1], s.y);
      zs[2] = zero_scale_of(zero_pair[2], s.z);
      zs[3] = zero_scale_of(zero_pair[3], s.w);
    };
    split_pairs(s0, z0);
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int k = (k16_0 + ks) * 16;
      if (ks > 0 && k % group_size == 0) {  // warp-uniform: a later group starts inside this chunk
        const long long gb = layout.group_block(k / group_size, strip);
        split_pairs(load_cached_u4(scales + QuickLayout::scale(gb, g)), load_cached_u32(qzeros + QuickLayout::zero(gb, g)));
      }
      u32 a[4];
      ATile::load_fragment(a, a_smem, 0, (warp * kSteps + ks) * 16, lane);
      const u32 words[4] = {w[ks].x, w[ks].y, w[ks].z, w[ks].w};
#pragma unroll
      for (int v = 0; v < 4; ++v) {  // word v: n8 tiles 2v (b[0], b[1]) and 2v + 1 (b[2], b[3])
        u32 b[4];
        dequant_quick_word(words[v], zs[v], b);
        mma_m16n8k16(acc[2 * v], a, b[0], b[1]);
        mma_m16n8k16(acc[2 * v + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the activation tile is the next k-tile's (or the reduction's) memory
  }

  // reduce: C fragment of tile j: c0, c1 -> row g, cols 8j + 2t, +1; c2, c3 -> row g + 8.
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(red + (warp * 16 + g + 8 * h) * kRedStride + 8 * j + 2 * t) =
          make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
  __syncthreads();

  // write_result: thread i of M x 64 sums the warps' partials of element (i / 64, i % 64).
  const int rows = min(M, 16);
  float* partial = split > 1 ? workspace + (long long)blockIdx.z * M * N : nullptr;
  for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
    const int r = i / 64, c = i % 64;
    float v = 0.f;
#pragma unroll
    for (int wp = 0; wp < WARPS; ++wp) v += red[(wp * 16 + r) * kRedStride + c];
    const long long idx = (long long)r * N + strip * 64 + c;
    if (partial) partial[idx] = v;
    else out[idx] = float_to_half(v);
  }
  if (split == 1 || !take_ticket(tile_counters + strip, split)) return;
  const long long mn = (long long)M * N;
  for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
    const long long idx = (long long)(i / 64) * N + strip * 64 + i % 64;
    float v = 0.f;
    for (int s = 0; s < split; ++s) v += load_l2_f32(workspace + s * mn + idx);
    out[idx] = float_to_half(v);
  }
}
