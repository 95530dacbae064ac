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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
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

// N consecutive fp16 (N = 1, 2, 4 or 8; 2N-byte aligned) -> floats, in one load.
template <int N>
__device__ __forceinline__ void load_halves(const u16* p, float (&f)[N]) {
  if constexpr (N == 8) {
    halves8_to_float(*reinterpret_cast<const uint4*>(p), f);
  } else if constexpr (N == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    f[0] = half_to_float(static_cast<u16>(w.x & 0xffffu));
    f[1] = half_to_float(static_cast<u16>(w.x >> 16));
    f[2] = half_to_float(static_cast<u16>(w.y & 0xffffu));
    f[3] = half_to_float(static_cast<u16>(w.y >> 16));
  } else if constexpr (N == 2) {
    const u32 w = *reinterpret_cast<const u32*>(p);
    f[0] = half_to_float(static_cast<u16>(w & 0xffffu));
    f[1] = half_to_float(static_cast<u16>(w >> 16));
  } else {
    static_assert(N == 1, "1, 2, 4 or 8 halves");
    f[0] = half_to_float(*p);
  }
}

}  // namespace

// ---------------------------------------------------------------- residual add + RMSNorm
// Row r: if delta: h[r] += delta[r] (rounded to fp16 and stored, as an unfused fp16 add would),
// then out[r] = h[r] / sqrt(mean(h[r]^2) + eps) * weight, statistics in fp32. Block 256 threads, each
// thread keeps its 16-byte chunks in registers between the two passes: H <= 256 * 8 * kMaxChunks.
constexpr int kNormThreads = 256, kNormMaxChunks = 8;

extern "C" __global__ void __launch_bounds__(kNormThreads)
    add_rms_norm(u16* __restrict__ h, const u16* __restrict__ delta, const u16* __restrict__ weight,
                 u16* __restrict__ out, int H, float eps) {
  __shared__ float warp_sums[kNormThreads / 32];
  const long long row = blockIdx.x;
  const int chunks = H / 8;
  uint4* h_row = reinterpret_cast<uint4*>(h + row * H);
  const uint4* d_row = delta ? reinterpret_cast<const uint4*>(delta + row * H) : nullptr;
  float vals[kNormMaxChunks][8];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kNormMaxChunks; ++i) {
    const int c = threadIdx.x + i * kNormThreads;
    if (c < chunks) {
      uint4 w = h_row[c];
      halves8_to_float(w, vals[i]);
      if (d_row) {
        float d[8];
        halves8_to_float(d_row[c], d);
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
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
  const float inv = rsqrtf(total / H + eps);
  const uint4* w_vec = reinterpret_cast<const uint4*>(weight);
  uint4* o_row = reinterpret_cast<uint4*>(out + row * H);
#pragma unroll
  for (int i = 0; i < kNormMaxChunks; ++i) {
    const int c = threadIdx.x + i * kNormThreads;
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
extern "C" __global__ void rope_kv(const u16* __restrict__ qkv, const float* __restrict__ cos_t,
                                   const float* __restrict__ sin_t, u16* __restrict__ q_out, u16* __restrict__ k_cache,
                                   u16* __restrict__ v_cache, int T, int Hq, int Hkv, int D, int pos, int max_seq) {
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
// gate_up [rows, 2 I] (gate | up) -> out [rows, I]; one thread per 8 outputs (16-byte loads).
extern "C" __global__ void silu_mul(const u16* __restrict__ gate_up, u16* __restrict__ out, int rows, int I) {
  const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int per_row = I / 8;
  if (chunk >= (long long)rows * per_row) return;
  const long long r = chunk / per_row, c = chunk % per_row;
  float g[8], u[8];
  halves8_to_float(reinterpret_cast<const uint4*>(gate_up + r * 2 * I)[c], g);
  halves8_to_float(reinterpret_cast<const uint4*>(gate_up + r * 2 * I + I)[c], u);
  float y[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) y[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
  reinterpret_cast<uint4*>(out + r * I)[c] =
      make_uint4(float2_to_half2(y[0], y[1]), float2_to_half2(y[2], y[3]), float2_to_half2(y[4], y[5]),
                 float2_to_half2(y[6], y[7]));
}

// ---------------------------------------------------------------- attention over the KV cache
// Template: D (head dim) and R, the query rows one block serves: R = G * QT, the G = Hq / Hkv query
// heads of one KV head times QT consecutive tokens (decode: QT = 1). Row r is token qt * QT + r / G,
// head kvh * G + r % G; it sees keys 0 .. pos + t (causal).
// Grid (splits, Hkv, B * q_tiles); block 4 warps. The keys a block's rows can see, [0, key_end), are cut
// into `splits` chunks of `chunk` keys (a multiple of 32); block `split` takes one, 32 keys at a time,
// one key per lane, and the 4 warps share each 32-key tile by splitting the head dim: warp w forms
// partial scores over its D/4 dims (16-byte loads of its slice of the key's row) against q in shared
// memory, the partials meet in shared memory, the online softmax runs with the rows dealt over the
// warps (running max m and sum l per row), and every warp then weights the V rows' D/4 columns it
// owns (coalesced) with the probabilities from shared memory. Splitting D rather
// than keys over the warps cuts each warp's serial chain per tile by 4: in a decode step a block has
// only a few tiles, and one warp walking a whole 32 x D tile alone left the SM idle (latency-bound at
// ~10 cycles per instruction with 1 warp per scheduler). With splits > 1 the block stores its
// unnormalised partial and takes a ticket on its (sequence, query tile, KV head), and the last block
// merges the splits in split order (deterministic) and writes fp16.
// With `qkv` non-null (decode, T = 1) RoPE and the KV-cache write are fused in and `q` is unused:
// one launch less per layer.
constexpr int kAttnWarps = 4;

template <int D, int R>
struct __align__(16) AttentionSmem {  // 16: q is read as float4
  static_assert(D % (8 * kAttnWarps) == 0 && D <= 256, "head dim: a multiple of 32, at most 256");
  static_assert(R * D <= 2048, "query rows x head dim: at most 2048");
  // the merge reuses s as 2 x [splits][R] and p as [R]: splits <= kAttnWarps * 32 / 2 = 64
  float q[R][D];                     // pre-scaled by log2(e) / sqrt(D): scores in base 2
  float s[kAttnWarps][R][32];        // each warp's partial scores over its D / 4 dims
  float p[R][32];                    // the tile's probabilities
  float alpha[R];                    // each row's rescale factor for this tile
  float m[R], l[R];                  // each row's running max and sum, from the warp that owns it
};

template <int D, int R>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention(const u16* __restrict__ q, const u16* __restrict__ qkv, const float* __restrict__ cos_t,
              const float* __restrict__ sin_t, u16* __restrict__ k_cache, u16* __restrict__ v_cache,
              u16* __restrict__ out, float* __restrict__ partial, int* __restrict__ tickets, int T, int Hq, int Hkv,
              int pos, int max_seq, int chunk, float scale) {
  constexpr int kDims = D / kAttnWarps;                 // this warp's slice of the head dim
  constexpr int kCols = kDims >= 32 ? kDims / 32 : 1;   // V columns per lane
  constexpr int kLanes = kDims / kCols;                 // lanes that own columns (all 32 for D >= 128)
  constexpr int kQIters = (R * D + kAttnWarps * 32 - 1) / (kAttnWarps * 32);
  __shared__ AttentionSmem<D, R> sm;
  const int G = Hq / Hkv, QT = R / G;
  const int split = blockIdx.x, splits = gridDim.x, kvh = blockIdx.y;
  const int q_tiles = (T + QT - 1) / QT, b = blockIdx.z / q_tiles, qt = blockIdx.z % q_tiles;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, d_warp = warp * kDims;
  const int t0 = qt * QT, rows_t = min(QT, T - t0);
  const int key_end = pos + t0 + rows_t;  // keys 0 .. key_end - 1 are visible to some row
  const int k_begin = split * chunk, k_end = min(key_end, k_begin + chunk);
  const long long kv_base = ((long long)b * Hkv + kvh) * max_seq * D;

  // One tile's loads, in flight together: this warp's slice of key (tile + lane)'s row, and the D/4
  // columns it owns of the tile's V rows (up to 32). The next tile's loads are issued before the
  // current tile is consumed, so DRAM latency overlaps the softmax and the FMAs.
  struct TileLoads {
    uint4 k[kDims / 8];
    u32 v[16][kCols];  // V rows 2j (low half) and 2j + 1 (high half): two fp16 per register
  };
  const auto load_tile = [&](int tile, TileLoads& t) {
    const int key = tile + lane;
    const uint4* k_row = reinterpret_cast<const uint4*>(k_cache + kv_base + (long long)key * D + d_warp);
#pragma unroll
    for (int c = 0; c < kDims / 8; ++c) t.k[c] = key < k_end ? k_row[c] : make_uint4(0, 0, 0, 0);
    const u16* v_col = v_cache + kv_base + (long long)tile * D + d_warp + lane * kCols;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const u32 lo = (tile + 2 * j < k_end && lane < kLanes) ? v_col[(long long)(2 * j) * D + c] : 0;
        const u32 hi = (tile + 2 * j + 1 < k_end && lane < kLanes) ? v_col[(long long)(2 * j + 1) * D + c] : 0;
        t.v[j][c] = lo | (hi << 16);
      }
  };

  // The first tile's loads go out before q is staged, so their latency overlaps it. (In a fused
  // decode step the block holding key `pos` writes that row below and patches it in afterwards.)
  TileLoads cur;
  if (k_begin < k_end) load_tile(k_begin, cur);

  if (qkv == nullptr) {
#pragma unroll
    for (int e = 0; e < kQIters; ++e) {  // unrolled: the loads of all iterations in flight together
      const int i = threadIdx.x + e * kAttnWarps * 32, r = i / D, d = i % D, t = t0 + r / G;
      if (i < R * D)
        sm.q[r][d] = t < T ? half_to_float(q[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d]) *
                                 scale * kLog2e
                           : 0.f;
    }
  } else {
    // Decode with RoPE fused in (T = 1, rope_kv's work for this KV head): q is rotated as it is
    // loaded from the qkv row, and the one block whose chunk holds key `pos` rotates k and copies v
    // of the new token into the cache before any of its warps reads them (__syncthreads below makes
    // the block's global writes visible to the whole block); no other block reads key `pos`.
    const int half = D / 2, row_width = (Hq + 2 * Hkv) * D;
    const u16* src = qkv + (long long)b * row_width;
    const float* c_row = cos_t + (long long)pos * half;
    const float* s_row = sin_t + (long long)pos * half;
#pragma unroll
    for (int e = 0; e < kQIters; ++e) {
      const int i = threadIdx.x + e * kAttnWarps * 32, r = i / D, d = i % D, j = d % half, col = (kvh * G + r) * D;
      if (i >= R * D) continue;
      const float x = half_to_float(src[col + d]);
      const float partner = half_to_float(src[col + (d < half ? d + half : d - half)]);
      const float rotated = d < half ? x * c_row[j] - partner * s_row[j] : x * c_row[j] + partner * s_row[j];
      sm.q[r][d] = rotated * scale * kLog2e;
    }
    if (k_begin <= pos && pos < k_end) {
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const int j = d % half, k_col = (Hq + kvh) * D, v_col = (Hq + Hkv + kvh) * D;
        const float x = half_to_float(src[k_col + d]);
        const float partner = half_to_float(src[k_col + (d < half ? d + half : d - half)]);
        const float rotated = d < half ? x * c_row[j] - partner * s_row[j] : x * c_row[j] + partner * s_row[j];
        k_cache[kv_base + (long long)pos * D + d] = float_to_half(rotated);
        v_cache[kv_base + (long long)pos * D + d] = src[v_col + d];
      }
    }
  }
  __syncthreads();
  if (qkv != nullptr && k_begin <= pos && pos < k_end && pos < k_begin + 32) {
    // The new row was loaded before this block wrote it: read it again (visible after the barrier).
    const int j = pos - k_begin;
    if (lane == j) {
      const uint4* k_row = reinterpret_cast<const uint4*>(k_cache + kv_base + (long long)pos * D + d_warp);
#pragma unroll
      for (int c = 0; c < kDims / 8; ++c) cur.k[c] = k_row[c];
    }
    if (lane < kLanes) {
      const u16* v_new = v_cache + kv_base + (long long)pos * D + d_warp + lane * kCols;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        // Masks, not a branch on jj == j / 2: a branch lets the compiler index cur.v by j, which
        // moves the whole tile to local memory.
        const u32 half_mask = j % 2 ? 0xffff0000u : 0x0000ffffu;
        const u32 bits = j % 2 ? u32(v_new[c]) << 16 : u32(v_new[c]);
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const u32 hit = 0u - u32(jj == j / 2);
          cur.v[jj][c] = (cur.v[jj][c] & ~(hit & half_mask)) | (hit & bits);
        }
      }
    }
  }

  float m[R], l[R], acc[R][kCols];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = QL_NEG_INF;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  for (int tile = k_begin; tile < k_end; tile += 32) {
    TileLoads next;
    if (tile + 32 < k_end) load_tile(tile + 32, next);
    const int key = tile + lane;
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kDims / 8; ++c) {
      float kf[8];
      halves8_to_float(cur.k[c], kf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 qa = *reinterpret_cast<const float4*>(&sm.q[r][d_warp + 8 * c]);
        const float4 qb = *reinterpret_cast<const float4*>(&sm.q[r][d_warp + 8 * c + 4]);
        s[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                qb.z * kf[6] + qb.w * kf[7];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) sm.s[warp][r][lane] = s[r];
    __syncthreads();  // the four partial scores of every key are in

    // The online softmax, rows dealt round-robin over the warps (warp w owns rows w, w + 4, ...: its
    // running m and l live only there); the probabilities and each row's rescale factor go through
    // shared memory to every warp.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r % kAttnWarps != warp) continue;
      float score = sm.s[0][r][lane];
#pragma unroll
      for (int w = 1; w < kAttnWarps; ++w) score += sm.s[w][r][lane];
      const int t = t0 + r / G;
      if (key >= k_end || key > pos + t || t >= T) score = QL_NEG_INF;  // past the chunk, or causal
      const float m_new = fmaxf(m[r], warp_max(score));
      // A row that has seen no key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
      const float alpha = m_new == QL_NEG_INF ? 1.f : exp2f(m[r] - m_new);
      const float p = m_new == QL_NEG_INF ? 0.f : exp2f(score - m_new);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      sm.p[r][lane] = p;
      if (lane == 0) sm.alpha[r] = alpha;
    }
    __syncthreads();  // every row's probabilities and rescale factor are in

#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float alpha = sm.alpha[r];
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= alpha;
    }
    // Keys past the chunk have p = 0 and V = 0 (not loaded). Four keys' probabilities per load.
#pragma unroll
    for (int j4 = 0; j4 < 32; j4 += 4) {
      float v[4][kCols];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const u32 pair = cur.v[(j4 + j) / 2][c];
          v[j][c] = half_to_float(static_cast<u16>((j4 + j) % 2 ? pair >> 16 : pair & 0xffffu));
        }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 p = *reinterpret_cast<const float4*>(&sm.p[r][j4]);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += p.x * v[0][c] + p.y * v[1][c] + p.z * v[2][c] + p.w * v[3][c];
      }
    }
    cur = next;
    __syncthreads();  // every warp is done with this tile's partial scores before the next overwrites them
  }

  // Each row's m and l, from the warp that owns the row, for every warp's columns.
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r % kAttnWarps == warp && lane == 0) {
      sm.m[r] = m[r];
      sm.l[r] = l[r];
    }
  __syncthreads();
  // Each warp owns columns d_warp + lane * kCols + c.
  const long long slot = ((long long)blockIdx.z * Hkv + kvh);  // (sequence, query tile, KV head)
  float* my_partial = partial + (slot * splits + split) * R * (D + 2);
  if (lane < kLanes) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int t = t0 + r / G;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = d_warp + lane * kCols + c;
        if (splits == 1) {
          if (t < T) out[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d] =
                float_to_half(acc[r][c] / sm.l[r]);
        } else {
          my_partial[r * (D + 2) + d] = acc[r][c];
        }
      }
      if (splits > 1 && warp == 0 && lane == 0) {
        my_partial[r * (D + 2) + D] = sm.m[r];
        my_partial[r * (D + 2) + D + 1] = sm.l[r];
      }
    }
  }
  if (splits == 1 || !take_ticket(tickets + slot, splits)) return;

  // The merge: every split's (m, l) into shared memory (the partial-score array is free now), the
  // weights exp2(m_s - max) per split and row, then each thread's outputs from the splits' partials
  // with 8 splits' loads in flight (a split at a time would wait out an L2 latency per split).
  const float* slot_partials = partial + slot * splits * R * (D + 2);
  float* weight = &sm.s[0][0][0];                 // [splits][R]: m_s, then its weight
  float* split_sum = weight + splits * R;         // [splits][R]: l_s (splits <= 64: 2 x splits x R fit in s)
  float* row_sum = &sm.p[0][0];                   // [R]: sum of l_s * weight
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
  constexpr int kThreads = kAttnWarps * 32, kElems = (R * D + kThreads - 1) / kThreads;
  float o[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) o[e] = 0.f;
#pragma unroll 8
  for (int sp = 0; sp < splits; ++sp) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int i = threadIdx.x + e * kThreads, r = i / D;
      if (i < R * D)
        o[e] += load_l2_f32(slot_partials + (long long)(sp * R + r) * (D + 2) + i % D) * weight[sp * R + r];
    }
  }
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const int i = threadIdx.x + e * kThreads, r = i / D, d = i % D, t = t0 + r / G;
    if (i < R * D && t < T)
      out[((long long)b * T + t) * Hq * D + (kvh * G + r % G) * D + d] = float_to_half(o[e] / row_sum[r]);
  }
}
