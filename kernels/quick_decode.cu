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
//   2. matmul:       per k16 step, per word: dequantize with its group's pair, 1 mma.m16n8k16 per 8
//                    batch rows.
//   3. reduce:       the warps' partial 64 x TILE_M tiles are summed through shared memory, so a
//                    block writes one partial, not WARPS;
//   4. write_result: split == 1: fp16 straight out; else the fp32 partial goes to
//                    workspace[split][M][N] and the block that takes the last ticket on its strip
//                    (common.cuh take_ticket) sums the slices in split order (deterministic) and writes
//                    fp16: one launch, no second pass.
//
// Fused with the decoder's neighbouring ops (quick_decode_fused; quick_lab/model/fused_gemm.py): a small-
// batch decode step on the QUICK backend then runs a layer's non-GEMM work, except attention, in the
// tails of its GEMMs, a launch (~2 µs of graph time at batch 1) less for each. After write_result:
//   kStoreResidualNorm (o, down): instead of writing out, h[m][n] = fp16(h + fp16(result)) (the
//       residual add, rounded as decoder.cu add_rms_norm rounds it) and sum_sq[m] += the new row's
//       squares (a warp sum per 32 columns, one atomicAdd each); then the last strip to finish (a
//       second ticket over all N / 64 strips) writes norm_out = fp16(h * rsqrt(sum_sq / N + eps) *
//       gamma) for every row, add_rms_norm's arithmetic, and resets sum_sq to zero for the next launch.
//   kStoreSiluPair (gate_up, N = 2I): out as usual, then of the two strips holding gate columns
//       64p .. 64p + 63 and up columns I + 64p .., the second to finish (a ticket per pair) writes
//       act[m][64p + c] = fp16(silu(gate) * up), decoder.cu silu_mul's formula.
// Work done once per element, never per strip: a variant that applied the norm and SiLU x up as the
// next GEMM loaded its activations was slower than the launches it saved (every one of the N / 64
// strips redid them: results/NOTES.md).
//
// Measured on an H100 and kept out (results/NOTES.md): a per-warp cp.async ring in shared memory
// instead of registers (more bytes in flight, but slower: issue-bound on the extra copies and shared
// loads at 25% occupancy), a register double buffer of the next chunk (fewer resident warps), folded
// zero points and scales (fewer instructions, no faster), a bulk-copy ring filled by a producer warp
// and L2 prefetch ahead of the chunk (both slower).
// Grid = (1, N / 64, split). K must be a multiple of TILE_K (quick_lab/core/registry.py checks it); a
// step's group is k / group_size, so a chunk may span several groups.
#include "quick_layout.cuh"

using namespace ql;

enum DecodeStore { kStorePlain = 0, kStoreResidualNorm = 1, kStoreSiluPair = 2 };

// The fused tails' operands (unused ones null): kStoreResidualNorm the residual stream h [M, N], the
// row sums [M] (zero on entry, left zero), gamma [N], norm_out [M, N], eps; kStoreSiluPair act
// [M, N / 2]; both their second-level ticket counters (1 or N / 128, zero, left zero).
struct DecodeFusion {
  u16* residual;
  float* sum_sq;
  const u16* norm_weight;
  u16* norm_out;
  float eps;
  u16* act;
  int* counters;
};

__device__ __forceinline__ float warp_sum_f32(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int TILE_M, int TILE_K, int WARPS, int STORE>
__device__ __forceinline__ void quick_decode_body(const u16* __restrict__ x, const uint4* __restrict__ qweight,
                                                  const u32* __restrict__ qzeros, const uint4* __restrict__ scales,
                                                  u16* __restrict__ out, float* __restrict__ workspace,
                                                  int* __restrict__ tile_counters, int M, int K, int N,
                                                  int group_size, int split, const DecodeFusion& fuse) {
  constexpr int kThreads = 32 * WARPS, kBatchTiles = TILE_M / 8;
  constexpr int kSteps = TILE_K / 16 / WARPS;  // k16 steps of one warp per k-tile
  static_assert(TILE_K % (16 * WARPS) == 0, "every warp gets whole k16 steps of a k-tile");
  static_assert(TILE_M == 8 || TILE_M == 16 || TILE_M == 32, "one, two or four n8 tiles of batch rows");
  // Reduction rows (one per batch row) padded to 68 floats: the stores of one (tile, word) put lane
  // (g, t) at row 2t, column g, i.e. bank (8t + g) mod 32, all 32 banks distinct.
  constexpr int kRedStride = 64 + 4;
  __shared__ __align__(16) float red[WARPS * TILE_M * kRedStride];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int strip = blockIdx.y;  // n64 block: output columns 64 strip .. 64 strip + 63
  const int rows = min(M, TILE_M);
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

    // matmul
    ZeroScale zs[4];
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (starts_group(ks, (k16_0 + ks) * 16)) zero_scales_of(s[ks], z[ks], zs);
      const u32 words[4] = {w[ks].x, w[ks].y, w[ks].z, w[ks].w};
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        u32 q[4];
        dequant_quick_word(words[v], zs[v], q);
        const u32 a[4] = {q[0], q[2], q[1], q[3]};  // rows g: n8 tile 2v, rows g + 8: tile 2v + 1
#pragma unroll
        for (int bt = 0; bt < kBatchTiles; ++bt) mma_m16n8k16(acc[bt][v], a, b[bt][ks][0], b[bt][ks][1]);
      }
    }
  }

  // reduce: acc[bt][v] c0, c1 -> batch rows 8 bt + 2t, + 1 at column 16 v + g; c2, c3 -> column + 8.
#pragma unroll
  for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
    for (int v = 0; v < 4; ++v)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        red[(warp * TILE_M + 8 * bt + 2 * t + (c & 1)) * kRedStride + 16 * v + 8 * (c >> 1) + g] = acc[bt][v][c];
  __syncthreads();

  // write_result: thread i of M x 64 sums the warps' partials of element (i / 64, i % 64); a warp's 32
  // elements are always in one row (64 columns a row, blockDim a multiple of 32).
  auto store = [&](int r, long long idx, float v) {
    if constexpr (STORE == kStoreResidualNorm) {
      const u16 h_new = float_to_half(half_to_float(fuse.residual[idx]) + half_to_float(float_to_half(v)));
      fuse.residual[idx] = h_new;
      const float sq = warp_sum_f32(half_to_float(h_new) * half_to_float(h_new));
      if (lane == 0) atomicAdd(fuse.sum_sq + r, sq);
    } else {
      out[idx] = float_to_half(v);
    }
  };
  if (split == 1) {
    for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
      const int r = i / 64, c = i % 64;
      float v = 0.f;
#pragma unroll
      for (int wp = 0; wp < WARPS; ++wp) v += red[(wp * TILE_M + r) * kRedStride + c];
      store(r, (long long)r * N + strip * 64 + c, v);
    }
  } else {
    float* partial = workspace + (long long)blockIdx.z * M * N;
    for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
      const int r = i / 64, c = i % 64;
      float v = 0.f;
#pragma unroll
      for (int wp = 0; wp < WARPS; ++wp) v += red[(wp * TILE_M + r) * kRedStride + c];
      partial[(long long)r * N + strip * 64 + c] = v;
    }
    if (!take_ticket(tile_counters + strip, split)) return;
    const long long mn = (long long)M * N;
    for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
      const long long idx = (long long)(i / 64) * N + strip * 64 + i % 64;
      float v = 0.f;
      for (int s = 0; s < split; ++s) v += load_l2_f32(workspace + s * mn + idx);
      store(i / 64, idx, v);
    }
  }

  if constexpr (STORE == kStoreResidualNorm) {
    // the last strip: every row's RMSNorm, as decoder.cu add_rms_norm computes it (fp32, 8 at a time)
    if (!take_ticket(fuse.counters, gridDim.y)) return;
    float* inv = red;  // the reduction buffer is free again
    if (threadIdx.x < rows) inv[threadIdx.x] = rsqrtf(load_l2_f32(fuse.sum_sq + threadIdx.x) / N + fuse.eps);
    __syncthreads();
    if (threadIdx.x < rows) fuse.sum_sq[threadIdx.x] = 0.f;  // ready for the next launch
    const int chunks = N / 8;
    for (int i = threadIdx.x; i < rows * chunks; i += kThreads) {
      const int r = i / chunks, c = i % chunks;
      const uint4 hv = load_l2_u4(fuse.residual + (long long)r * N + 8 * c);
      const uint4 gv = reinterpret_cast<const uint4*>(fuse.norm_weight)[c];
      const u32 hw[4] = {hv.x, hv.y, hv.z, hv.w}, gw[4] = {gv.x, gv.y, gv.z, gv.w};
      u32 y[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        y[j] = float2_to_half2(half_to_float(static_cast<u16>(hw[j] & 0xffffu)) * inv[r] *
                                   half_to_float(static_cast<u16>(gw[j] & 0xffffu)),
                               half_to_float(static_cast<u16>(hw[j] >> 16)) * inv[r] *
                                   half_to_float(static_cast<u16>(gw[j] >> 16)));
      reinterpret_cast<uint4*>(fuse.norm_out + (long long)r * N)[c] = make_uint4(y[0], y[1], y[2], y[3]);
    }
  } else if constexpr (STORE == kStoreSiluPair) {
    // the second strip of its (gate, up) pair: SiLU(gate) * up of the pair's 64 columns
    const int pairs = N / 128, pair = strip % pairs, half = N / 2;
    if (!take_ticket(fuse.counters + pair, 2)) return;
    for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
      const int r = i / 64, col = 64 * pair + i % 64;
      const float g = half_to_float(load_l2_u16(out + (long long)r * N + col));
      const float u = half_to_float(load_l2_u16(out + (long long)r * N + half + col));
      fuse.act[(long long)r * half + col] = float_to_half(g / (1.f + __expf(-g)) * u);
    }
  }
}

template <int TILE_M, int TILE_K, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
    quick_decode(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                 const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                 int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  const DecodeFusion none{nullptr, nullptr, nullptr, nullptr, 0.f, nullptr, nullptr};
  quick_decode_body<TILE_M, TILE_K, WARPS, kStorePlain>(x, qweight, qzeros, scales, out, workspace, tile_counters,
                                                        M, K, N, group_size, split, none);
}

// The decode kernel with a fused tail (STORE above). kStoreResidualNorm does not write `out`.
template <int TILE_M, int TILE_K, int WARPS, int STORE>
__global__ void __launch_bounds__(32 * WARPS)
    quick_decode_fused(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                       const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                       int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split,
                       u16* __restrict__ residual, float* __restrict__ sum_sq, const u16* __restrict__ norm_weight,
                       u16* __restrict__ norm_out, float eps, u16* __restrict__ act, int* __restrict__ counters) {
  const DecodeFusion fuse{residual, sum_sq, norm_weight, norm_out, eps, act, counters};
  quick_decode_body<TILE_M, TILE_K, WARPS, STORE>(x, qweight, qzeros, scales, out, workspace, tile_counters,
                                                  M, K, N, group_size, split, fuse);
}
