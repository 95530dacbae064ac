// The decoder's non-GEMM work, fused so that a decode step is a few launches around the four GEMMs:
//   add_rms_norm       residual add + RMSNorm (fp32 statistics), one block per row
//   rope_kv            RoPE on q and k of the fused qkv output, k and v written straight into the cache
//   attention<D, R>    attention over the KV cache with an online softmax (flash-decoding): the key
//                      range split across blocks, one block serving all query heads of a KV group (and,
//                      in prefill, several tokens), causal; partials combined by the last block to
//                      arrive (the split-K ticket of common.cuh), so a step is one launch
//   silu_mul           SiLU(gate) * up from the fused gate_up output
// Layouts: activations are row-major [rows, features] fp16 (a row = one token of one sequence); the
// KV cache is [batch, n_kv_heads, max_seq, D] fp16; the RoPE tables are float32 [max_seq, D / 2]
// (rotate-half convention: element j pairs with j + D/2).
// An input another kernel writes (delta, gate_up, qkv, q) is not declared const __restrict__: that
// lets the compiler read it through the non-coherent path, which promises the data is read-only for
// the kernel's whole life (PTX ISA, ld.global.nc), and launched as a programmatic dependent
// (common.cuh) a kernel starts while the one writing its input still runs.
#include "common.cuh"

using namespace ql;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
#define QL_NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC compiles without math.h's INFINITY)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A GEMM output read as the fp32 split-K slices [n_parts][count] of the QUICK decode GEMM's "partials"
// epilogue (quick_decode.cu): summed in split order from +0 and rounded to fp16, the arithmetic of the
// GEMM's own fix-up block, so the reader sees the stored y bit for bit. At most kMaxPartials slices
// (quick_lab/model/fused.py MAX_PARTIALS). Every slice's load is issued at once as a predicated load
// (common.cuh load_l2_f4_if): a first form that branched on n_parts per element left the loads in
// round trips one after another (the decode attention ~3 us slower on an H100), one clamped to the last
// slice read 8 slices always (the batch-1 norm, one block, ~1.5 us slower). An absent slice adds the
// load's +0, which leaves a sum that starts at +0 unchanged (it is never -0).
constexpr int kMaxPartials = 8;
__device__ __forceinline__ float4 sum_partials4(const float* parts, int n_parts, long long count, long long i0) {
  float4 x[kMaxPartials];
#pragma unroll
  for (int p = 0; p < kMaxPartials; ++p) x[p] = load_l2_f4_if(parts + p * count + i0, p < n_parts);
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int p = 0; p < kMaxPartials; ++p) sum.x += x[p].x, sum.y += x[p].y, sum.z += x[p].z, sum.w += x[p].w;
  return sum;
}

// 8 fp16 (one 16-byte load) -> 8 floats.
__device__ __forceinline__ void halves8_to_float(const uint4& w, float (&f)[8]) {
  const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = half_to_float(static_cast<u16>(words[i] & 0xffffu));
    f[2 * i + 1] = half_to_float(static_cast<u16>(words[i] >> 16));
  }
}

}  // namespace

// ---------------------------------------------------------------- residual add + RMSNorm
// Row r: if delta: h[r] += delta[r] (rounded to fp16 and stored, as an unfused fp16 add would),
// then out[r] = h[r] / sqrt(mean(h[r]^2) + eps) * weight, statistics in fp32. Each thread keeps its
// 16-byte chunks in registers between the two passes. The block has one thread per chunk of 8 up to
// 1024 (quick_lab/model/fused.py picks blockDim.x, a multiple of 32), H <= 1024 * 8 * kNormMaxChunks:
// a thread's chunks load one after another (each behind the branch of its bound check), so a row of
// one chunk a thread is one round of loads (at 256 threads a 4096-wide row took two, and 5120 three:
// the batch-1 norm ~0.5 us slower each on an H100).
// delta may come as the fp32 split-K slices [delta_parts][rows][H] of the GEMM before (its "partials"
// epilogue) instead: summed as that GEMM's fix-up would (sum_partials4), the same fp16 delta.
constexpr int kNormMaxThreads = 1024, kNormMaxChunks = 2;

extern "C" __global__ void __launch_bounds__(kNormMaxThreads)
    add_rms_norm(u16* __restrict__ h, const u16* delta, const float* delta_parts, int n_parts,
                 const u16* __restrict__ weight, u16* __restrict__ out, int H, float eps) {
  __shared__ float warp_sums[kNormMaxThreads / 32];
  const int threads = blockDim.x;
  start_after_prior_grid();  // h and delta come from the kernels before
  const long long row = blockIdx.x;
  const int chunks = H / 8;
  uint4* h_row = reinterpret_cast<uint4*>(h + row * H);
  const uint4* d_row = delta ? reinterpret_cast<const uint4*>(delta + row * H) : nullptr;
  float vals[kNormMaxChunks][8];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kNormMaxChunks; ++i) {
    const int c = threadIdx.x + i * threads;
    if (c < chunks) {
      uint4 w = h_row[c];
      halves8_to_float(w, vals[i]);
      if (d_row || delta_parts) {
        float d[8];
        if (d_row) {
          halves8_to_float(d_row[c], d);
        } else {
          const long long count = (long long)gridDim.x * H, i0 = row * H + 8 * c;
          const float4 lo = sum_partials4(delta_parts, n_parts, count, i0), hi = sum_partials4(delta_parts, n_parts, count, i0 + 4);
          const float y[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) d[j] = half_to_float(float_to_half(y[j]));  // the fp16 delta
        }
        w = make_uint4(float2_to_half2(vals[i][0] + d[0], vals[i][1] + d[1]),
                       float2_to_half2(vals[i][2] + d[2], vals[i][3] + d[3]),
                       float2_to_half2(vals[i][4] + d[4], vals[i][5] + d[5]),
                       float2_to_half2(vals[i][6] + d[6], vals[i][7] + d[7]));
        h_row[c] = w;
        halves8_to_float(w, vals[i]);  // the rounded sum, as stored
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) sum_sq += vals[i][j] * vals[i][j];
    }
  }
  sum_sq = warp_sum(sum_sq);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum_sq;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < threads / 32; ++w) total += warp_sums[w];
  const float inv = rsqrtf(total / H + eps);
  const uint4* w_vec = reinterpret_cast<const uint4*>(weight);
  uint4* o_row = reinterpret_cast<uint4*>(out + row * H);
#pragma unroll
  for (int i = 0; i < kNormMaxChunks; ++i) {
    const int c = threadIdx.x + i * threads;
    if (c < chunks) {
      float g[8];
      halves8_to_float(w_vec[c], g);
      o_row[c] = make_uint4(float2_to_half2(vals[i][0] * inv * g[0], vals[i][1] * inv * g[1]),
                            float2_to_half2(vals[i][2] * inv * g[2], vals[i][3] * inv * g[3]),
                            float2_to_half2(vals[i][4] * inv * g[4], vals[i][5] * inv * g[5]),
                            float2_to_half2(vals[i][6] * inv * g[6], vals[i][7] * inv * g[7]));
    }
  }
}

// ---------------------------------------------------------------- RoPE + KV-cache write
// Grid (token rows of qkv [B*T, (Hq + 2 Hkv) D], heads Hq + 2 Hkv); block D/2 threads, one pair each
// (row = b * T + t, at position pos + t). q and k heads rotate the pair (j, j + D/2) with the table row
// of their position; q goes to q_out [B*T, Hq D], k and v to the caches [B, Hkv, max_seq, D]. One
// block per (row, head) rather than per row: a decode step has a single row, and a block looping
// over its 48 heads would wait on 48 dependent load latencies.
extern "C" __global__ void rope_kv(const u16* qkv, const float* __restrict__ cos_t,
                                   const float* __restrict__ sin_t, u16* __restrict__ q_out, u16* __restrict__ k_cache,
                                   u16* __restrict__ v_cache, int T, int Hq, int Hkv, int D, int pos, int max_seq) {
  start_after_prior_grid();  // qkv is the GEMM before's output
  const int row = blockIdx.x, head = blockIdx.y, j = threadIdx.x;
  const int b = row / T, t = row % T, half = D / 2, p = pos + t;
  const u16* src = qkv + (long long)row * (Hq + 2 * Hkv) * D + head * D;
  const u16 h1 = src[j], h2 = src[j + half];
  if (head < Hq + Hkv) {
    const float c = cos_t[(long long)p * half + j], s = sin_t[(long long)p * half + j];
    const float x1 = half_to_float(h1), x2 = half_to_float(h2);
    u16* dst = head < Hq ? q_out + (long long)row * Hq * D + head * D
                         : k_cache + (((long long)b * Hkv + (head - Hq)) * max_seq + p) * D;
    dst[j] = float_to_half(x1 * c - x2 * s);
    dst[j + half] = float_to_half(x2 * c + x1 * s);
  } else {
    u16* dst = v_cache + (((long long)b * Hkv + (head - Hq - Hkv)) * max_seq + p) * D;
    dst[j] = h1;
    dst[j + half] = h2;
  }
}

// ---------------------------------------------------------------- SiLU(gate) * up
// gate_up [rows, 2 I] in (gate, up) pairs of 32 columns (gate 32j .. 32j + 31, then up 32j .. 32j + 31:
// the layout that lets the decode GEMM apply it in its writer, quick_decode.cu) -> out [rows, I]; one
// thread per 8 outputs (16-byte loads).
extern "C" __global__ void silu_mul(const u16* gate_up, u16* __restrict__ out, int rows, int I) {
  start_after_prior_grid();  // gate_up is the GEMM before's output
  const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int per_row = I / 8;
  if (chunk >= (long long)rows * per_row) return;
  const long long r = chunk / per_row, c = chunk % per_row;  // outputs 8c .. 8c + 7 of row r
  const u16* pair = gate_up + r * 2 * I + 64 * (c / 4) + 8 * (c % 4);
  const uint4 g = *reinterpret_cast<const uint4*>(pair), u = *reinterpret_cast<const uint4*>(pair + 32);
  const u16* gh = reinterpret_cast<const u16*>(&g);
  const u16* uh = reinterpret_cast<const u16*>(&u);
  u32 y[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    y[j] = silu_mul_half(gh[2 * j], uh[2 * j]) | (u32)silu_mul_half(gh[2 * j + 1], uh[2 * j + 1]) << 16;
  reinterpret_cast<uint4*>(out + r * I)[c] = make_uint4(y[0], y[1], y[2], y[3]);
}

// ---------------------------------------------------------------- attention over the KV cache
// Template: D (head dim) and R, the query rows one block serves: R = G * QT, the G = Hq / Hkv query
// heads of one KV head times QT consecutive tokens (decode: QT = 1). Row r is token qt * QT + r / G,
// head kvh * G + r % G; it sees keys 0 .. pos + t (causal).
// Grid (splits, Hkv, B * q_tiles); block 4 warps. The keys a block's rows can see, [0, key_end), are cut
// into `splits` chunks of `chunk` keys (a multiple of 32); block `split` takes one, and its warps take
// turns at its 32-key tiles. Per tile, one warp does the whole head dim on the tensor cores
// (mma.sync m16n8k16, PTX ISA 9.7.14.5.8), FlashAttention-2 style: S = Q K^T with the R query rows
// padded to 16, an online softmax on S's accumulator fragments (running max m and sum l of each row
// in the lane quad that holds it), the probabilities repacked in registers as the A operand of
// O += P V. (A scalar version, one lane per key, was instruction-bound: ~900 warp-instructions per
// warp per tile, 4 warps a tile; this one issues ~64 mma and ~100 other instructions per tile.)
// Layout choices, made where the fragments are built below:
//  * K rows are read straight from global memory into B fragments: for S the head dim is the k index,
//    and any permutation of it applied to both Q and K leaves Q K^T unchanged, so lane (g, t) takes
//    the 16 bytes at dims 32j + 8t .. 32j + 8t + 7 of key g of an 8-key n-tile (one 16-byte load) as
//    its b0/b1 of k-steps 2j and 2j + 1; Q's A fragments are built in the same permuted order.
//  * V needs the key index down the fragment's k and the head dim across n, so a warp's V tile goes
//    through shared memory (cp.async, rows past the chunk zero-filled) and comes back transposed by
//    ldmatrix.trans (PTX ISA 9.7.14.5.15); rows padded by 16 bytes so the 8 rows of a matrix fall in
//    different banks.
//  * P is S's accumulator layout converted to fp16 pairs: the C fragments of n-tiles 2kk and 2kk + 1
//    are exactly the A fragment of k-step kk (keys 16kk .. 16kk + 15).
// The 4 warps then merge (m, l, O) in shared memory; with splits > 1 the block stores its
// unnormalised partial and takes a ticket on its (sequence, query tile, KV head), and the last block
// merges the splits in split order (deterministic) and writes fp16.
// With `qkv` non-null (decode, T = 1) RoPE and the KV-cache write are fused in and `q` is unused:
// one launch less per layer.
constexpr int kAttnWarps = 4;

template <int D, int R>
struct __align__(16) AttentionSmem {  // 16: cp.async and ldmatrix rows
  static_assert(D % 32 == 0 && D <= 128, "head dim: a multiple of 32, at most 128");
  static_assert(R >= 1 && R <= 16, "query rows: 1 .. 16 (one m16 tile)");
  static constexpr int kVStride = D + 8;  // halves per V row in shared memory: +16 bytes against bank conflicts
  float q[R][D];                          // pre-scaled by log2(e) / sqrt(D): scores in base 2
  u16 row[(R + 2) * D];                   // decode: this block's q heads, k and v of the qkv row, as read
  float rope[2][D / 2];                   // decode: cos, sin of position pos
  union {
    u16 v[kAttnWarps][32][kVStride];      // each warp's V tile
    float acc[kAttnWarps][R][D];          // the end: each warp's O rows, to merge
    float merge[2][64 * 16];              // the split merge: (m, l) per split and row, splits <= 64
  } u;
  float m[kAttnWarps][R], l[kAttnWarps][R];
};

template <int D, int R>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention(const u16* q, const u16* qkv, const float* qkv_parts, int n_parts, const float* __restrict__ cos_t,
              const float* __restrict__ sin_t, u16* __restrict__ k_cache, u16* __restrict__ v_cache,
              u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ tickets, int T, int Hq, int Hkv,
              int pos, int max_seq, int chunk, float scale) {
  using Smem = AttentionSmem<D, R>;
  constexpr int kKSteps = D / 16, kNd = D / 8, kVStride = Smem::kVStride;
  constexpr int kThreads = kAttnWarps * 32, kQIters = (R * D + kThreads - 1) / kThreads;
  __shared__ Smem sm;
  const int G = Hq / Hkv, QT = R / G;
  const int split = blockIdx.x, splits = gridDim.x, kvh = blockIdx.y;
  const int q_tiles = (T + QT - 1) / QT, b = blockIdx.z / q_tiles, qt = blockIdx.z % q_tiles;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int t0 = qt * QT, rows_t = min(QT, T - t0);
  const int key_end = pos + t0 + rows_t;  // keys 0 .. key_end - 1 are visible to some row
  const int k_begin = split * chunk, k_end = min(key_end, k_begin + chunk);
  const long long kv_base = ((long long)b * Hkv + kvh) * max_seq * D;

  // prologue: keys and values before `pos` were written by earlier steps, not by the kernels just
  // before, so the block loads its warps' first tiles of them (below) before it waits for q (and the
  // new k, v). Nothing more: a bulk L2 prefetch of the block's whole key range here (first built
  // that way) filled the memory system's queues while the kernel before finished, whose split merge
  // and ticket then waited behind it; without it a context-4096 batch-1 attention is ~0.6 us (5%)
  // shorter and the decode layer ~2 us (results/NOTES.md, entry 29).
  const int cached_end = min(k_end, pos);
  // Each warp's tiles: V rows -> its shared-memory tile (cp.async; rows past the chunk zero-filled, so
  // 0 * NaN never occurs), K rows -> B fragments (n-tile nt holds keys tile + 8nt .. +7, this lane
  // loads key tile + 8nt + g; .cg: another block or kernel may have written the row, never this SM's
  // L1). Both take the keys in [lo, hi) only, so a tile can be loaded in two parts.
  u16* v_s = &sm.u.v[warp][0][0];
  uint4 kb[4][D / 32];
  auto load_v = [&](int tile, int lo, int hi, bool zero_fill) {
#pragma unroll
    for (int c = lane; c < 32 * (D / 8); c += 32) {
      const int row = c / (D / 8), col = 8 * (c % (D / 8)), key = tile + row;
      if (key >= lo && key < hi)
        cp_async16(smem_addr(v_s + row * kVStride + col), v_cache + kv_base + (long long)key * D + col, 16);
      else if (zero_fill && key >= k_end)
        cp_async16(smem_addr(v_s + row * kVStride + col), v_cache + kv_base + (long long)k_begin * D, 0);
    }
    cp_async_commit();
  };
  auto load_k = [&](int tile, int lo, int hi, bool zero_fill) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int key = tile + 8 * nt + g;
      const uint4* k_row = reinterpret_cast<const uint4*>(k_cache + kv_base + (long long)key * D) + t4;
#pragma unroll
      for (int j = 0; j < D / 32; ++j) {
        if (key >= lo && key < hi) kb[nt][j] = load_l2_u4(k_row + 4 * j);
        else if (zero_fill) kb[nt][j] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  // The warp's first tile is asked for before the wait, as far as it holds keys before `pos` (written
  // by earlier steps; the kernel before writes keys from `pos` on, or this block does): in a decode
  // step these loads overlap the qkv GEMM, and with one tile a warp the whole KV range does. The asm
  // loads cannot move across the wait's memory clobber.
  const int tile0 = k_begin + 32 * warp;
  if (tile0 < k_end) {
    load_v(tile0, tile0, cached_end, true);
    load_k(tile0, tile0, cached_end, true);
  }
  wait_for_prior_grid();

  if (qkv == nullptr && qkv_parts == nullptr) {
#pragma unroll
    for (int e = 0; e < kQIters; ++e) {  // unrolled: the loads of all iterations in flight together
      const int i = threadIdx.x + e * kThreads, r = i / D, d = i % D, t = t0 + r / G;
      if (i < R * D)
        sm.q[r][d] = t < T ? half_to_float(q[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d]) *
                                 scale * kLog2e
                           : 0.f;
    }
  } else {
    // Decode with RoPE fused in (T = 1, rope_kv's work for this KV head; R = G): the block's part of
    // the qkv row (its G q heads, then k and v of its KV head) and the RoPE row of `pos` are staged in
    // shared memory in one round of loads, 4 elements a thread a step, then q is rotated from there and
    // the one block whose chunk holds key `pos` rotates k and copies v of the new token into the cache
    // before any of its warps reads them (__syncthreads below makes the block's global writes visible
    // to the whole block); no other block reads key `pos`. The qkv row is the GEMM's fp16 output or
    // its fp32 split-K slices [n_parts][B][row_width] (sum_partials4).
    const int half = D / 2, row_width = (Hq + 2 * Hkv) * D;
    const long long row0 = (long long)b * row_width, count = (long long)gridDim.z * row_width;
    constexpr int kQuads = (R + 2) * D / 4, kRopeQuads = D / 4;  // 4 halves of the row / 4 floats of cos, sin
    constexpr int kStageIters = (kQuads + kRopeQuads + kThreads - 1) / kThreads;
#pragma unroll
    for (int e = 0; e < kStageIters; ++e) {
      const int i = threadIdx.x + e * kThreads;
      if (i >= kQuads + kRopeQuads) break;
      if (i >= kQuads) {  // cos (first D / 8 quads), then sin
        const int c = i - kQuads, which = c / (D / 8), j = 4 * (c % (D / 8));
        const float* table = which ? sin_t : cos_t;
        *reinterpret_cast<float4*>(&sm.rope[which][j]) =
            *reinterpret_cast<const float4*>(table + (long long)pos * half + j);
        continue;
      }
      const int e0 = 4 * i;  // element of the staged row: q heads, k at R D, v at (R + 1) D
      const int col = e0 < R * D ? kvh * G * D + e0
                                 : (e0 < (R + 1) * D ? (Hq + kvh) * D + e0 - R * D : (Hq + Hkv + kvh) * D + e0 - (R + 1) * D);
      uint2 halves;
      if (qkv_parts) {
        const float4 sum = sum_partials4(qkv_parts, n_parts, count, row0 + col);
        halves = make_uint2(float2_to_half2(sum.x, sum.y), float2_to_half2(sum.z, sum.w));
      } else {
        halves = *reinterpret_cast<const uint2*>(qkv + row0 + col);
      }
      *reinterpret_cast<uint2*>(&sm.row[e0]) = halves;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kQIters; ++e) {
      const int i = threadIdx.x + e * kThreads, r = i / D, d = i % D, j = d % half;
      if (i >= R * D) continue;
      const float x = half_to_float(sm.row[r * D + d]);
      const float partner = half_to_float(sm.row[r * D + (d < half ? d + half : d - half)]);
      const float c = sm.rope[0][j], sn = sm.rope[1][j];
      sm.q[r][d] = (d < half ? x * c - partner * sn : x * c + partner * sn) * scale * kLog2e;
    }
    if (k_begin <= pos && pos < k_end) {
      for (int d = threadIdx.x; d < D; d += kThreads) {
        const int j = d % half;
        const float x = half_to_float(sm.row[R * D + d]);
        const float partner = half_to_float(sm.row[R * D + (d < half ? d + half : d - half)]);
        const float c = sm.rope[0][j], sn = sm.rope[1][j];
        k_cache[kv_base + (long long)pos * D + d] = float_to_half(d < half ? x * c - partner * sn : x * c + partner * sn);
        v_cache[kv_base + (long long)pos * D + d] = sm.row[(R + 1) * D + d];
      }
    }
  }
  __syncthreads();

  // Q's A fragments, once: rows g and g + 8 (zero past R), the head dim in the permuted order of the
  // K loads: k-step 2j takes dims 32j + 8t + {0,1} (a0/a1) and {2,3} (a2/a3), k-step 2j + 1 dims
  // 32j + 8t + {4,5} and {6,7}.
  u32 qa[kKSteps][4];
#pragma unroll
  for (int s = 0; s < kKSteps; ++s) {
    const int d0 = 32 * (s / 2) + 8 * t4 + 4 * (s % 2);
    const float* r0 = g < R ? sm.q[g] : nullptr;
    const float* r1 = g + 8 < R ? sm.q[g + 8] : nullptr;
    qa[s][0] = r0 ? float2_to_half2(r0[d0], r0[d0 + 1]) : 0u;
    qa[s][1] = r1 ? float2_to_half2(r1[d0], r1[d0 + 1]) : 0u;
    qa[s][2] = r0 ? float2_to_half2(r0[d0 + 2], r0[d0 + 3]) : 0u;
    qa[s][3] = r1 ? float2_to_half2(r1[d0 + 2], r1[d0 + 3]) : 0u;
  }
  // Rows g and g + 8: their token (causal limit) and whether they exist.
  const int t_lo = t0 + g / G, t_hi = t0 + (g + 8) / G;
  const bool row_lo = g < R && t_lo < T, row_hi = g + 8 < R && t_hi < T;

  float o[kNd][4];
#pragma unroll
  for (int nd = 0; nd < kNd; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_lo = QL_NEG_INF, m_hi = QL_NEG_INF, l_lo = 0.f, l_hi = 0.f;

  // The first tile's keys from `pos` on, now that they are written (the __syncthreads above makes
  // this block's own writes visible to it).
  if (tile0 < k_end && cached_end < min(k_end, tile0 + 32)) {
    load_v(tile0, max(tile0, cached_end), k_end, false);
    load_k(tile0, max(tile0, cached_end), k_end, false);
  }
  for (int tile = tile0; tile < k_end; tile += 32 * kAttnWarps) {
    const int next = tile + 32 * kAttnWarps;  // this warp's next tile: its K is asked for once S is done
    float sc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int j = 0; j < D / 32; ++j) {
        mma_m16n8k16(sc[nt], qa[2 * j], kb[nt][j].x, kb[nt][j].y);
        mma_m16n8k16(sc[nt], qa[2 * j + 1], kb[nt][j].z, kb[nt][j].w);
      }
    }
    if (next < k_end) load_k(next, next, k_end, true);  // kb is free: in flight during the softmax and P V
    // Online softmax on the fragments: lane holds rows g (c0, c1) and g + 8 (c2, c3) at keys
    // tile + 8nt + 2t4 + {0, 1}; a row's 32 keys live in its lane quad (shuffles over lanes ^1, ^2).
    float tmax_lo = QL_NEG_INF, tmax_hi = QL_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = tile + 8 * nt + 2 * t4 + e;
        const bool in = key < k_end;
        if (!(in && row_lo && key <= pos + t_lo)) sc[nt][e] = QL_NEG_INF;
        if (!(in && row_hi && key <= pos + t_hi)) sc[nt][2 + e] = QL_NEG_INF;
        tmax_lo = fmaxf(tmax_lo, sc[nt][e]);
        tmax_hi = fmaxf(tmax_hi, sc[nt][2 + e]);
      }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      tmax_lo = fmaxf(tmax_lo, __shfl_xor_sync(0xffffffffu, tmax_lo, o2));
      tmax_hi = fmaxf(tmax_hi, __shfl_xor_sync(0xffffffffu, tmax_hi, o2));
    }
    const float mn_lo = fmaxf(m_lo, tmax_lo), mn_hi = fmaxf(m_hi, tmax_hi);
    // A row that has seen no key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
    const float al_lo = mn_lo == QL_NEG_INF ? 1.f : exp2f(m_lo - mn_lo);
    const float al_hi = mn_hi == QL_NEG_INF ? 1.f : exp2f(m_hi - mn_hi);
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[nt][e] = mn_lo == QL_NEG_INF ? 0.f : exp2f(sc[nt][e] - mn_lo);
        sc[nt][2 + e] = mn_hi == QL_NEG_INF ? 0.f : exp2f(sc[nt][2 + e] - mn_hi);
        sum_lo += sc[nt][e];
        sum_hi += sc[nt][2 + e];
      }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, o2);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, o2);
    }
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
#pragma unroll
    for (int nd = 0; nd < kNd; ++nd) {
      o[nd][0] *= al_lo;
      o[nd][1] *= al_lo;
      o[nd][2] *= al_hi;
      o[nd][3] *= al_hi;
    }
    // P's A fragments: k-step kk (keys 16kk ..) = C fragments of n-tiles 2kk and 2kk + 1.
    u32 pa[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      pa[kk][0] = float2_to_half2(sc[2 * kk][0], sc[2 * kk][1]);
      pa[kk][1] = float2_to_half2(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = float2_to_half2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = float2_to_half2(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
    cp_async_wait<0>();
    __syncwarp();  // every lane's V rows have landed
    // O += P V: ldmatrix.trans of matrices (keys 16kk + 0..7 | 8..15) x (columns 8nd | 8nd + 8) gives
    // b0, b1 of n-tiles nd and nd + 1; lane 8i + r addresses row r of matrix i.
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int nd = 0; nd < kNd; nd += 2) {
        const int mat = lane >> 3, row = 16 * kk + 8 * (mat & 1) + (lane & 7), col = 8 * (nd + (mat >> 1));
        u32 vb[4];
        ldmatrix_x4_trans(vb, smem_addr(v_s + row * kVStride + col));
        mma_m16n8k16(o[nd], pa[kk], vb[0], vb[1]);
        mma_m16n8k16(o[nd + 1], pa[kk], vb[2], vb[3]);
      }
    __syncwarp();  // the V tile is consumed before the next cp.async overwrites it
    if (next < k_end) load_v(next, next, k_end, true);
  }

  allow_dependent_launch();  // the next kernel's blocks may be placed during the merge and the write
  // Merge the warps: (m, l) per warp and row, then the O rows through shared memory.
  __syncthreads();  // every warp is done with its V tile: the union's other member takes over
  if (t4 == 0) {
    if (g < R) {
      sm.m[warp][g] = m_lo;
      sm.l[warp][g] = l_lo;
    }
    if (g + 8 < R) {
      sm.m[warp][g + 8] = m_hi;
      sm.l[warp][g + 8] = l_hi;
    }
  }
#pragma unroll
  for (int nd = 0; nd < kNd; ++nd) {
    const int col = 8 * nd + 2 * t4;
    if (g < R) {
      sm.u.acc[warp][g][col] = o[nd][0];
      sm.u.acc[warp][g][col + 1] = o[nd][1];
    }
    if (g + 8 < R) {
      sm.u.acc[warp][g + 8][col] = o[nd][2];
      sm.u.acc[warp][g + 8][col + 1] = o[nd][3];
    }
  }
  __syncthreads();

  const long long slot = ((long long)blockIdx.z * Hkv + kvh);  // (sequence, query tile, KV head)
  float* my_partial = partial + (slot * splits + split) * R * (D + 2);
  for (int i = threadIdx.x; i < R * D; i += kThreads) {
    const int r = i / D, d = i % D, t = t0 + r / G;
    float m_max = QL_NEG_INF;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) m_max = fmaxf(m_max, sm.m[w][r]);
    float l_sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float wgt = sm.m[w][r] == QL_NEG_INF ? 0.f : exp2f(sm.m[w][r] - m_max);
      l_sum += sm.l[w][r] * wgt;
      acc += sm.u.acc[w][r][d] * wgt;
    }
    if (splits == 1) {
      if (t < T) out[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d] = float_to_half(acc / l_sum);
    } else {
      my_partial[r * (D + 2) + d] = acc;
      if (d == 0) {
        my_partial[r * (D + 2) + D] = m_max;
        my_partial[r * (D + 2) + D + 1] = l_sum;
      }
    }
  }
  if (splits == 1 || !take_ticket(tickets + slot, splits)) return;

  // The split merge: every split's (m, l) into shared memory, the
  // weights exp2(m_s - max) per split and row, then each thread's outputs from the splits' partials
  // with 8 splits' loads in flight (a split at a time would wait out an L2 latency per split).
  const float* slot_partials = partial + slot * splits * R * (D + 2);
  float* weight = sm.u.merge[0];     // [splits][R]: m_s, then its weight (splits <= 64, R <= 16)
  float* split_sum = sm.u.merge[1];  // [splits][R]: l_s
  float* row_sum = &sm.l[0][0];      // [R]: sum of l_s * weight (the warps' l are merged already)
  for (int i = threadIdx.x; i < splits * R; i += blockDim.x) {
    weight[i] = load_l2_f32(slot_partials + (long long)i * (D + 2) + D);
    split_sum[i] = load_l2_f32(slot_partials + (long long)i * (D + 2) + D + 1);
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    float m_max = QL_NEG_INF;
    for (int sp = 0; sp < splits; ++sp) m_max = fmaxf(m_max, weight[sp * R + r]);
    float l_sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float m_s = weight[sp * R + r];
      const float wgt = m_s == QL_NEG_INF ? 0.f : exp2f(m_s - m_max);
      weight[sp * R + r] = wgt;
      l_sum += split_sum[sp * R + r] * wgt;
    }
    row_sum[r] = l_sum;
  }
  __syncthreads();
  constexpr int kElems = (R * D + kThreads - 1) / kThreads;
  float merged[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) merged[e] = 0.f;
#pragma unroll 8
  for (int sp = 0; sp < splits; ++sp) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int i = threadIdx.x + e * kThreads, r = i / D;
      if (i < R * D)
        merged[e] += load_l2_f32(slot_partials + (long long)(sp * R + r) * (D + 2) + i % D) * weight[sp * R + r];
    }
  }
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const int i = threadIdx.x + e * kThreads, r = i / D, d = i % D, t = t0 + r / G;
    if (i < R * D && t < T)
      out[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d] = float_to_half(merged[e] / row_sum[r]);
  }
}
