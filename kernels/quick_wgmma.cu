// QUICK on Hopper (sm_90a): the paper's idea carried from mma.sync to the warpgroup MMA.
//
// wgmma takes its A operand from registers but its B operand only from shared memory, and A is the
// 64-row side. So the kernel computes y^T = W^T x^T: the dequantized weights are A (64 output
// features per instruction), the activations are B (the batch is the instruction's N), and the
// weights still go DRAM -> registers -> dequantize -> tensor core with no shared-memory write-back.
//
// The interleaved layout needs no change: wgmma's per-warp A fragment is mma.m16n8k16's A fragment
// (wgmma.cuh), and lane 4g + t's word w of a (k16, n64) block holds, once dequantized (quick_gemm.cu),
//   pair 0 = W[k 2t, 2t+1][n 16w + g]     pair 1 = W[k 2t+8, 2t+9][n 16w + g]
//   pair 2 = W[k 2t, 2t+1][n 16w + 8 + g] pair 3 = W[k 2t+8, 2t+9][n 16w + 8 + g]
// i.e. exactly {a0, a2, a1, a3} of the 16 x 16 A tile whose rows are columns 16w .. 16w + 15 of W.
// One word per lane is one warp's share of one wgmma; a warpgroup's 4 warps hold 64 rows.
//
// Work split: each warpgroup owns WG_N = TILE_N / warpgroups columns, kWords = WG_N / 64 words per
// lane per k16 step (1, 2 or 4), and issues kWords wgmmas per k16 step. Warp v of a warpgroup reads
// words [first_word, first_word + kWords) of n64 block v / (4 / kWords); wgmma j's rows are then
// columns 64 * block + 16 * (first_word + j) + 0..15, 16 per warp.
//
// Activations: TILE_M rows x TILE_K halves per k-tile (one or two 64-half swizzle atoms), cp.async'd
// into the 128-byte-swizzled K-major layout the descriptor describes (wgmma.cuh), STAGES - 2 k-tiles
// ahead: two k16 steps of wgmmas stay in flight while the next is dequantized (wgmma.wait_group 2),
// so a stage is refilled only two k-tiles after it was read, when none of its wgmmas can be pending.
//
// Two weight paths, as in quick_gemm.cu (ASYNC_W): 0 - each lane loads its words global -> registers
// one k-tile ahead (the paper's); 1 - the still-packed weights, scales and zeros ride the cp.async
// pipeline with the activations, STAGES - 2 k-tiles ahead, and each lane reads its words with one LDS.
// The second keeps more bytes in flight per SM, which the DRAM latency at small and mid batch needs.
//
// FOLD (folded zero points; one group per k-tile, TILE_K == group size): the dequantizer's biased
// output 1024 + q goes into wgmma as is (4 LOP3 + 2 HFMA2 per packed word instead of 14
// instructions), into per-group accumulators G; one more wgmma against an all-ones A gives the group's
// activation row sums R[m] = sum_k x[m][k]. Per group: y[m][n] += s[n] (G[n][m] - (1024 + z[n]) R[m]),
// which is sum_k s (q - z) x exactly up to fp32 rounding (the 1024 bias cancels; products of fp16
// are exact in fp32). Costs a second accumulator set: a small-batch variant.
//
// Schedule: stream-K. The problem is tiles x k-tiles "units" (output tile major, k-tile minor) and
// block b of the P launched processes units [b U / P, (b + 1) U / P) with one pipeline that runs on
// across output tiles. With P = resident blocks (the host's default) every SM gets the same number
// of k-tiles whatever the tile count, and the pipeline fills once per block instead of once per tile;
// with P = tiles x s it is split-K by s. A tile one block covers completely is written as fp16; the
// blocks sharing a tile store fp32 partials (workspace [P][2][TILE_M x TILE_N]: a block shares at
// most its first and its last tile), and the last to arrive sums them in block order.
#include "wgmma.cuh"
#include "quick_layout.cuh"

using namespace ql;

// kWords words of a lane's 16-byte fragment. With fewer than 4, the warps of a warpgroup share the
// 512-byte block: an L1-allocating load lets the later warps hit L1 instead of re-reading L2.
template <int W>
__device__ __forceinline__ void load_words(const u32* p, u32 (&w)[W]) {
  if constexpr (W == 4) {
    const uint4 v = load_stream_u4(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (W == 2) {
    const uint2 v = load_cached_u2(p);
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = load_cached_u32(p);
  }
}

template <int W>
__device__ __forceinline__ void lds_words(u32 address, u32 (&w)[W]) {
  if constexpr (W == 4)
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(address));
  else if constexpr (W == 2)
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "r"(address));
  else
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w[0]) : "r"(address));
}
__device__ __forceinline__ uint4 lds_u4(u32 address) {
  uint4 v;
  lds_words<4>(address, reinterpret_cast<u32(&)[4]>(v));
  return v;
}
__device__ __forceinline__ u32 lds_u32(u32 address) {
  u32 w[1];
  lds_words<1>(address, w);
  return w[0];
}

// An empty asm that reads the registers: they stay allocated (unchanged) up to this point.
template <int W>
__device__ __forceinline__ void keep_alive(const u32 (&a)[W][4]) {
#pragma unroll
  for (int j = 0; j < W; ++j) asm volatile("" ::"r"(a[j][0]), "r"(a[j][1]), "r"(a[j][2]), "r"(a[j][3]) : "memory");
}

// v[i] for a warp-uniform i: selects, so the array stays in registers.
__device__ __forceinline__ u32 pick(const u32 (&v)[4], int i) {
  return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
}

// Units [b U / P, (b + 1) U / P) of block b, and which block holds a unit.
struct StreamK {
  int units, k_tiles, P;
  __device__ __forceinline__ int start(int b) const { return (int)((long long)b * units / P); }
  __device__ __forceinline__ int block_of(int u) const {
    return (int)(((long long)(u + 1) * P + units - 1) / units - 1);
  }
};

// Where a unit is: output tile (m fastest), its corner and the k-tile. Stepped one unit at a time so
// the mainloop divides only when it crosses into the next tile.
struct Unit {
  int tile, m0, n0, kt;
};
template <int TILE_M, int TILE_N>
__device__ __forceinline__ Unit unit_at(int u, int k_tiles, int tiles_m) {
  const int tile = u / k_tiles;
  return Unit{tile, (tile % tiles_m) * TILE_M, (tile / tiles_m) * TILE_N, u % k_tiles};
}
template <int TILE_M, int TILE_N>
__device__ __forceinline__ void step(Unit& w, int k_tiles, int tiles_m) {
  if (++w.kt == k_tiles) w = unit_at<TILE_M, TILE_N>((w.tile + 1) * k_tiles, k_tiles, tiles_m);
}

template <int TILE_M, int TILE_N, int TILE_K, int WARPS_M, int WARPS_N, int STAGES, int ASYNC_W, int FOLD>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    quick_wgmma(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                int* __restrict__ tile_counters, int M, int K, int N, int group_size, int /* blocks: gridDim.x */) {
  static_assert(TILE_K == 64 || TILE_K == 128, "a k-tile is one or two 128-byte swizzled activation rows");
  static_assert(WARPS_M == 1 && (WARPS_N == 4 || WARPS_N == 8), "one or two warpgroups side by side along N");
  static_assert(STAGES >= 3, "a stage is refilled two k-tiles after use: at least three stages");
  static_assert(!FOLD || TILE_K == 128, "folded zero points: one k-tile per group of 128");
  constexpr int kThreads = 32 * WARPS_N;
  constexpr int kWarpgroups = WARPS_N / 4;
  constexpr int kWords = TILE_N / kWarpgroups / 64;
  static_assert(kWords == 1 || kWords == 2 || kWords == 4, "a warpgroup spans 64, 128 or 256 columns");
  constexpr int kWarpsPerBlock = 4 / kWords;  // warps sharing one n64 block
  // wgmma's N is the batch: up to 128 per instruction (64 accumulators), larger tiles issue several.
  constexpr int kInstN = TILE_M < 128 ? TILE_M : 128;
  constexpr int kInstPerTile = TILE_M / kInstN;
  static_assert(TILE_M % 16 == 0 && TILE_M % kInstN == 0, "tile_m must be 16, 32, 64, 128 or 256");
  constexpr int kSteps = TILE_K / 16;
  // k16 steps (wgmma groups) in flight behind the one being dequantized; divides kSteps so that a
  // ring slot always holds the step that just retired, across k-tiles too.
  constexpr int kInFlight = 2;
  static_assert(kSteps % kInFlight == 0, "");
  constexpr int kAtoms = TILE_K / 64;       // 64-half swizzle atoms along K per stage
  // Stage: activations (kAtoms atoms of TILE_M x 128 bytes), then with ASYNC_W the packed weights
  // [k16][n64][lane], scales [n64][g] and zeros [n64][g]: the global QUICK order copied verbatim
  // (QuickStage, quick_layout.cuh). Stages are 1024 bytes apart: the 128-byte swizzle repeats every
  // 8 rows (1024 bytes) and the hardware applies it to address bits, so every atom must start
  // 1024-byte aligned (PTX ISA 9.7.15.5.1.2, matrix descriptor: swizzling modes).
  constexpr u32 kAtomBytes = TILE_M * 128;
  constexpr u32 kXBytes = kAtoms * kAtomBytes;
  using Stage = QuickStage<kXBytes, TILE_N, TILE_K, ASYNC_W != 0, 1024>;
  constexpr u32 kStageBytes = Stage::kStride;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 smem_base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp / 4, v = warp % 4;
  const int local_block = wg * kWords + v / kWarpsPerBlock;  // this warp's n64 block in the tile
  const int first_word = (v % kWarpsPerBlock) * kWords;
  const QuickLayout layout(N);
  const int tiles_m = (M + TILE_M - 1) / TILE_M;
  const StreamK sk{tiles_m * (N / TILE_N) * (K / TILE_K), K / TILE_K, (int)gridDim.x};
  const int u_begin = sk.start(blockIdx.x), u_end = sk.start(blockIdx.x + 1);
  auto stage_addr = [&](int u) { return smem_base + (u32)((u - u_begin) % STAGES) * kStageBytes; };

  auto issue_tile = [&](int u, const Unit& w) {  // everything of unit u (at w) that goes through cp.async
    const u32 stage = stage_addr(u);
    constexpr int kChunks = TILE_M * 8 * kAtoms;  // 16-byte chunks of activations
#pragma unroll
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (kChunks % kThreads != 0 && c >= kChunks) break;
      const int r = c / (8 * kAtoms), chunk = c % (8 * kAtoms);
      const int row = w.m0 + r;
      const bool valid = row < M;
      cp_async16(stage + (chunk / 8) * kAtomBytes + sw128_offset(r, chunk % 8),
                 x + (long long)(valid ? row : 0) * K + w.kt * TILE_K + chunk * 8, valid ? 16 : 0);
    }
    if constexpr (ASYNC_W != 0) {
      stage_weights_async<kThreads, TILE_N, TILE_K>(stage + Stage::kWeightOffset, qweight, layout, w.kt * kSteps,
                                                    w.n0 / 64);
      stage_scales_zeros_async<kThreads, TILE_N>(stage + Stage::kScaleOffset, scales, qzeros, layout,
                                                 w.kt * TILE_K / group_size, w.n0 / 64);
    }
  };

  struct Fragments {
    u32 q[kSteps][kWords];
    uint4 s;
    u32 z;
  };
  auto load_shared = [&](u32 stage, Fragments& f) {  // staged path: this lane's words of the stage
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) lds_words<kWords>(Stage::weight_addr(stage, ks, local_block, lane) + 4 * first_word, f.q[ks]);
    f.s = lds_u4(Stage::scale_addr(stage, local_block, g));
    f.z = lds_u32(Stage::zero_addr(stage, local_block, g));
  };
  auto load_global = [&](const Unit& w, Fragments& f) {  // direct path: global -> registers
    const int block = w.n0 / 64 + local_block;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const uint4* p = qweight + layout.word(w.kt * kSteps + ks, block, lane);
      load_words<kWords>(reinterpret_cast<const u32*>(p) + first_word, f.q[ks]);
    }
    const long long gb = layout.group_block(w.kt * TILE_K / group_size, block);  // TILE_K divides G
    f.s = load_cached_u4(scales + QuickLayout::scale(gb, g));
    f.z = load_cached_u32(qzeros + QuickLayout::zero(gb, g));
  };

  float acc[kWords][kInstPerTile][kInstN / 2];
  auto zero_acc = [&]() {
#pragma unroll
    for (int j = 0; j < kWords; ++j)
#pragma unroll
      for (int c = 0; c < kInstPerTile; ++c)
#pragma unroll
        for (int e = 0; e < kInstN / 2; ++e) acc[j][c][e] = 0.f;
  };
  // Stores the accumulators to dst (row stride ld) at (m0, n0), as fp16 or fp32, rows below M only.
  // wgmma rows are output columns, its columns batch rows (D fragment, wgmma.cuh).
  auto store_acc = [&](u16* dst_h, float* dst_f, long long ld, int m0, int n0) {
#pragma unroll
    for (int j = 0; j < kWords; ++j)
#pragma unroll
      for (int c = 0; c < kInstPerTile; ++c)
#pragma unroll
        for (int e = 0; e < kInstN / 2; ++e) {
          const int m = c * kInstN + 8 * (e / 4) + 2 * t + (e & 1);
          const int n = local_block * 64 + 16 * (first_word + j) + g + 8 * ((e >> 1) & 1);
          if (m0 + m < M) {
            const long long idx = (long long)m * ld + n;
            if (dst_f) dst_f[idx] = acc[j][c][e];
            else dst_h[idx] = float_to_half(acc[j][c][e]);
          }
        }
  };

  // The tile of unit u is finished for this block: write it, or its partial and the fix-up.
  auto finish_tile = [&](const Unit& w) {
    const int tile_first = w.tile * sk.k_tiles;
    const int b_first = sk.block_of(tile_first), b_last = sk.block_of(tile_first + sk.k_tiles - 1);
    if (b_first == b_last) {  // the whole k range is ours
      store_acc(out + (long long)w.m0 * N + w.n0, nullptr, N, w.m0, w.n0);
      return;
    }
    auto slot = [&](int b) {  // a block's first tile goes to slot 0, its last to slot 1
      return workspace + ((long long)b * 2 + (sk.start(b) / sk.k_tiles == w.tile ? 0 : 1)) * TILE_M * TILE_N;
    };
    store_acc(nullptr, slot(blockIdx.x), TILE_N, w.m0, w.n0);
    if (!take_ticket(tile_counters + w.tile, b_last - b_first + 1)) return;  // common.cuh
    const int rows = min(TILE_M, M - w.m0);
    for (int i = 4 * threadIdx.x; i < rows * TILE_N; i += 4 * kThreads) {
      float4 sum = load_l2_f4(slot(b_first) + i);
      for (int b = b_first + 1; b <= b_last; ++b) {  // block order: deterministic
        const float4 p = load_l2_f4(slot(b) + i);
        sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
      }
      *reinterpret_cast<uint2*>(out + (long long)(w.m0 + i / TILE_N) * N + w.n0 + i % TILE_N) =
          make_uint2(float2_to_half2(sum.x, sum.y), float2_to_half2(sum.z, sum.w));
    }
  };

  // Cursors: the next unit to issue through cp.async and (direct path) to load into registers.
  Unit issue_at = unit_at<TILE_M, TILE_N>(u_begin, sk.k_tiles, tiles_m), load_at = issue_at;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (u_begin + s < u_end) issue_tile(u_begin + s, issue_at);
    step<TILE_M, TILE_N>(issue_at, sk.k_tiles, tiles_m);
    cp_async_commit();
  }
  Fragments cur, next;
  if constexpr (ASYNC_W == 0) {
    if (u_begin < u_end) load_global(load_at, cur);
  }

  // Outer loop: the tiles this block touches; inner loop: its k-tiles of one tile. The pipeline runs
  // on across tiles; the epilogue sits between the loops, outside any branch, so ptxas keeps the
  // wgmma chain asynchronous (an accumulator read on a conditional path serializes it).
  zero_acc();
  u32 a_in_flight[kInFlight][kWords][4] = {};  // A fragments the tensor core may still be reading
  // FOLD: the current group's accumulators and activation row sums (every row of R is the same).
  float group_acc[FOLD ? kWords : 1][kInstPerTile][kInstN / 2] = {};
  float row_sum[kInstPerTile][kInstN / 2] = {};
  constexpr u32 kOnes[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};  // fp16x2 (1, 1)
  for (int u = u_begin; u < u_end;) {
    const Unit tile_at = unit_at<TILE_M, TILE_N>(u, sk.k_tiles, tiles_m);
    const int segment_end = min(u_end, (tile_at.tile + 1) * sk.k_tiles);
    for (; u < segment_end; ++u) {
      if constexpr (ASYNC_W == 0) {
        step<TILE_M, TILE_N>(load_at, sk.k_tiles, tiles_m);
        if (u + 1 < u_end) load_global(load_at, next);  // in flight while this unit computes
      }
      // One cp.async group per unit slot: STAGES - 3 younger groups may still be pending.
      cp_async_wait<STAGES - 3>();
      fence_proxy_async();
      __syncthreads();  // unit u has landed for all, and every warpgroup's unit u - 2 has retired
      if (u + STAGES - 2 < u_end) issue_tile(u + STAGES - 2, issue_at);  // into unit u - 2's stage
      step<TILE_M, TILE_N>(issue_at, sk.k_tiles, tiles_m);
      cp_async_commit();
      const u32 stage = stage_addr(u);
      if constexpr (ASYNC_W != 0) load_shared(stage, cur);

      // Zero points and scales of this k-tile's group for the words this warp feeds: pair (lo, hi)
      // of word w serves columns 16w + g (A rows g) and 16w + 8 + g (A rows g + 8).
      u32 zero_pairs[4];
      dequant_int4x8(cur.z, zero_pairs);
      const u32 scale_words[4] = {cur.s.x, cur.s.y, cur.s.z, cur.s.w};
      ZeroScale zs[kWords];  // hoisted out of the k16 loop: one split per word per k-tile
#pragma unroll
      for (int j = 0; j < kWords; ++j) zs[j] = zero_scale_of(pick(zero_pairs, first_word + j), pick(scale_words, first_word + j));

#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        u32 a[kWords][4];
#pragma unroll
        for (int j = 0; j < kWords; ++j) {
          u32 q[4];
          if constexpr (FOLD) dequant_int4x8(cur.q[ks][j], q);  // 1024 + q straight in
          else dequant_quick_word(cur.q[ks][j], zs[j], q);     // (q - z) * s
          // B-fragment order {b0, b1 of rows g, b0, b1 of rows g + 8} -> A-fragment order:
          a[j][0] = q[0];  // row g,     k 2t..2t+1
          a[j][1] = q[2];  // row g + 8, k 2t..2t+1
          a[j][2] = q[1];  // row g,     k 2t+8..2t+9
          a[j][3] = q[3];  // row g + 8, k 2t+8..2t+9
        }
        wgmma_fence();  // the A registers were just written (PTX ISA 9.7.15.5.2, wgmma.fence)
        // k16 step ks: atom ks / 4, 32 bytes per step into each 128-byte row
        const u32 b_base = stage + (ks / 4) * kAtomBytes + (ks % 4) * 32;
#pragma unroll
        for (int c = 0; c < kInstPerTile; ++c) {
          const unsigned long long desc = smem_desc_sw128(b_base + c * kInstN * 128);
          if constexpr (FOLD) {  // a group starts with every k-tile: its first step overwrites
#pragma unroll
            for (int j = 0; j < kWords; ++j) wgmma_rs<kInstN>(group_acc[j][c], a[j], desc, ks > 0);
            wgmma_rs<kInstN>(row_sum[c], kOnes, desc, ks > 0);
          } else {
#pragma unroll
            for (int j = 0; j < kWords; ++j) wgmma_rs<kInstN>(acc[j][c], a[j], desc, 1);
          }
        }
        wgmma_commit();
        // kInFlight k16 steps stay in flight while the next is dequantized. A retired step's A
        // registers are used "after" the wait, so the compiler cannot hand them to a later step's
        // dequantizer while the tensor core may still read them (wgmma reads its register operands
        // asynchronously, and register liveness ends at the last use the compiler sees).
        wgmma_wait<kInFlight>();
        keep_alive(a_in_flight[ks % kInFlight]);
#pragma unroll
        for (int j = 0; j < kWords; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) a_in_flight[ks % kInFlight][j][r] = a[j][r];
      }
      if constexpr (FOLD) {  // close the group: y += s (G - (1024 + z) R)
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) keep_alive(a_in_flight[i]);
        float s_row[kWords][2], zb_row[kWords][2];
#pragma unroll
        for (int j = 0; j < kWords; ++j) {
          const u32 zp = pick(zero_pairs, first_word + j), sw = pick(scale_words, first_word + j);
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // h = 0: rows g (low halves), 1: rows g + 8 (high)
            s_row[j][h] = half_to_float(static_cast<u16>(sw >> (16 * h)));
            zb_row[j][h] = half_to_float(static_cast<u16>(zp >> (16 * h)));
          }
        }
#pragma unroll
        for (int c = 0; c < kInstPerTile; ++c) {
          fence_operands(row_sum[c]);
#pragma unroll
          for (int j = 0; j < kWords; ++j) {
            fence_operands(group_acc[j][c]);
#pragma unroll
            for (int e = 0; e < kInstN / 2; ++e) {
              const int h = (e >> 1) & 1;
              acc[j][c][e] = fmaf(s_row[j][h], fmaf(-zb_row[j][h], row_sum[c][e], group_acc[j][c][e]), acc[j][c][e]);
            }
          }
        }
      }
      if constexpr (ASYNC_W == 0) cur = next;
    }
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < kWords; ++j)
#pragma unroll
      for (int c = 0; c < kInstPerTile; ++c) fence_operands(acc[j][c]);
    finish_tile(tile_at);
    zero_acc();
  }
}
