// Building blocks shared by every quick_lab kernel: PTX wrappers for cp.async, ldmatrix, mma.sync and
// f16x2 arithmetic, the int4 -> fp16 dequantizer, the activation tile path (global -> shared -> A
// fragments) and the epilogue. Header-free on purpose: NVRTC compiles this without the CUDA toolkit's
// include directory, so the CPU-only CI can build every variant from the pip NVRTC wheel alone.
#pragma once
// And a classic guard: quick_lab/build/sources.py splices each #include as text, so a header reached
// twice (quick_wgmma.cu: wgmma.cuh and quick_layout.cuh both include this one) appears twice in one
// translation unit, where #pragma once cannot see it.
#ifndef QL_COMMON_CUH
#define QL_COMMON_CUH

typedef unsigned int u32;
typedef unsigned short u16;

namespace ql {

// ---------------------------------------------------------------- f16x2 arithmetic (PTX ISA 9.7.4)
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
// Broadcast the low / high fp16 of a pair to both halves (one PRMT each).
__device__ __forceinline__ u32 low_to_pair(u32 a) { return __byte_perm(a, 0, 0x1010); }
__device__ __forceinline__ u32 high_to_pair(u32 a) { return __byte_perm(a, 0, 0x3232); }
// cvt.rn.f16x2.f32 d, a, b puts a in the upper half and b in the lower (PTX ISA 9.7.9.21).
__device__ __forceinline__ u32 float2_to_half2(float lo, float hi) {
  u32 d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ u16 float_to_half(float v) {
  u16 d;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(v));
  return d;
}

__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// The MLP's activation, silu(gate) * up, of two fp16 values in fp32: the one copy used by both the
// silu_mul kernel (decoder.cu) and the decode GEMM's fused writer (quick_decode.cu), so the two agree bit
// for bit.
__device__ __forceinline__ u16 silu_mul_half(u16 gate, u16 up) {
  const float g = half_to_float(gate);
  return float_to_half(g / (1.f + __expf(-g)) * half_to_float(up));
}

// ---------------------------------------------------------------- int4 -> fp16 dequantizer
// The lop3 "magic number" trick: OR-ing a nibble into the mantissa of 0x6400 (fp16 1024.0) makes the
// fp16 number 1024 + nibble, with no integer-to-float conversion. One LOP3 handles two nibbles, one per
// 16-bit half, so a 32-bit word of eight nibbles n0..n7 (nibble i at bits 4i..4i+3) yields four
// fp16x2 pairs in the fixed order (n0,n4) (n1,n5) (n2,n6) (n3,n7). Every weight layout in quick_lab is
// built around that order: AutoAWQ's nibble order 0,2,4,6,1,3,5,7 turns the pairs into adjacent
// columns; the QUICK layout turns them into the (k, k+1) pairs of an mma B fragment.
// The result is biased: each half holds 1024 + q exactly (integers below 2048 are exact in fp16), and
// callers subtract a zero point dequantized by this same routine, so the bias cancels exactly.
__device__ __forceinline__ void dequant_int4x8(u32 packed, u32 (&pairs)[4]) {
  constexpr u32 kLowMask = 0x000f000f;   // nibbles 0 and 4 (after >> 8: 2 and 6)
  constexpr u32 kHighMask = 0x00f000f0;  // nibbles 1 and 5 (after >> 8: 3 and 7), still x16
  constexpr u32 kMagic = 0x64006400;     // fp16x2 (1024, 1024)
  constexpr u32 kLut = (0xf0 & 0xcc) | 0xaa;  // lop3 truth table for (a & b) | c
  constexpr u32 kOneSixteenth = 0x2c002c00;   // fp16x2 (1/16, 1/16)
  constexpr u32 kBias960 = 0x63806380;        // fp16x2 (960, 960): (1024 + 16q)/16 + 960 = 1024 + q
  const u32 shifted = packed >> 8;
  u32 p0, p1, p2, p3;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(p0) : "r"(packed), "n"(kLowMask), "n"(kMagic), "n"(kLut));
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(p1) : "r"(packed), "n"(kHighMask), "n"(kMagic), "n"(kLut));
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(p2) : "r"(shifted), "n"(kLowMask), "n"(kMagic), "n"(kLut));
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(p3) : "r"(shifted), "n"(kHighMask), "n"(kMagic), "n"(kLut));
  pairs[0] = p0;
  pairs[1] = hfma2(p1, kOneSixteenth, kBias960);
  pairs[2] = p2;
  pairs[3] = hfma2(p3, kOneSixteenth, kBias960);
}

// (q - z) * s on biased fp16 pairs, as AutoAWQ computes it: the subtraction is exact, so the only
// rounding is the product's, and both kernels (and the NumPy reference) agree bit for bit.
__device__ __forceinline__ u32 apply_zero_scale(u32 q_biased, u32 z_biased, u32 scale) {
  return hmul2(hsub2(q_biased, z_biased), scale);
}

// Eight AWQ-ordered weights of one row -> eight fp16 of adjacent columns (the baseline's write-back
// unit and the standalone dequantizer's output). zeros: the dequantized zero-point word of the same
// columns; scales: their 8 fp16 scales.
__device__ __forceinline__ uint4 dequant_awq_word(u32 packed, const u32 (&zeros)[4], const uint4& scales) {
  u32 q[4];
  dequant_int4x8(packed, q);
  uint4 w;
  w.x = apply_zero_scale(q[0], zeros[0], scales.x);
  w.y = apply_zero_scale(q[1], zeros[1], scales.y);
  w.z = apply_zero_scale(q[2], zeros[2], scales.z);
  w.w = apply_zero_scale(q[3], zeros[3], scales.w);
  return w;
}

// ---------------------------------------------------------------- memory movement
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}
// 16-byte asynchronous copy global -> shared; src_bytes = 0 zero-fills the destination (rows past M).
// .cg caches in L2 only: activations are re-read by other blocks, never by this one (PTX ISA 9.7.9.25).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Packed weights are read once per block: non-coherent path, no L1 allocation (PTX ISA 9.7.9.8).
__device__ __forceinline__ uint4 load_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 load_stream_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Scales and zeros are tiny and re-read by the 4 lanes of a quad and by later k-tiles: keep them in L1.
__device__ __forceinline__ uint4 load_cached_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 load_cached_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
// An activation is written by the kernel before, which a programmatic dependent launch lets run on
// while this one starts: not the non-coherent path (.nc promises data read-only for the kernel's
// whole life, PTX ISA ld), but a plain load issued after wait_for_prior_grid().
__device__ __forceinline__ u32 load_activation_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load_cached_u2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// ldmatrix: each of the 4 8x8 b16 matrices takes its 8 row addresses from lanes 8i..8i+7 and lands in
// register i of every lane, lane 4*r + c holding row r, columns 2c, 2c+1 (PTX ISA 9.7.14.5.15).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// .trans hands lane 4*r + c the column r, rows 2c, 2c+1: the B fragment of a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// ---------------------------------------------------------------- tensor core
// D = A * B + D, m16n8k16, fp16 inputs, fp32 accumulators (PTX ISA 9.7.14.5.8, fragments for
// m16n8k16). Lane = 4 * groupID + tig. A: a[0] row g cols 2t..2t+1, a[1] row g+8, a[2] row g cols +8,
// a[3] row g+8 cols +8. B: b0 = rows (k) 2t..2t+1 of column g, b1 = rows +8. C: c0,c1 row g cols
// 2t..2t+1; c2,c3 row g+8.
// Not volatile: a pure register operation, so the compiler may interleave it with the fragment
// loads and dequantization of the next k16 step (ldmatrix stays volatile: it reads shared memory).
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- activation tile path
// Shared-memory activation tile: TILE_M rows of TILE_K halves plus 8 halves (16 bytes) of padding.
// The padding shifts consecutive rows by 4 banks, so the 8 row addresses of one ldmatrix phase hit 8
// distinct 16-byte bank groups (conflict free) for TILE_K = 32 (80-byte rows) and 64 (144-byte rows).
template <int TILE_M, int TILE_K>
struct ActivationTile {
  static constexpr int kStride = TILE_K + 8;          // halves per shared row
  static constexpr int kHalves = TILE_M * kStride;    // halves per stage
  static constexpr int kChunksPerRow = TILE_K / 8;    // 16-byte chunks per row

  // Every thread issues cp.async for chunks tid, tid + THREADS, ...; rows past M are zero-filled.
  template <int THREADS>
  __device__ __forceinline__ static void load_async(u16* stage, const u16* x, int M, int K, int row0,
                                                    int k0) {
    constexpr int kChunks = TILE_M * kChunksPerRow;
#pragma unroll
    for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (kChunks % THREADS != 0 && c >= kChunks) break;
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const int row = row0 + r;
      const bool valid = row < M;
      const u16* src = x + (long long)(valid ? row : 0) * K + k0 + col;
      cp_async16(smem_addr(stage + r * kStride + col), src, valid ? 16 : 0);
    }
  }

  // A fragment of the m16 x k16 block at (m_off, k_off): lanes 0-15 address rows 0-15 at column 0,
  // lanes 16-31 the same rows at column 8, so ldmatrix registers 0..3 are exactly a[0..3].
  __device__ __forceinline__ static void load_fragment(u32 (&a)[4], const u16* stage, int m_off, int k_off,
                                                       int lane) {
    const u16* p = stage + (m_off + (lane & 15)) * kStride + k_off + (lane >> 4) * 8;
    ldmatrix_x4(a, smem_addr(p));
  }
};

// ---------------------------------------------------------------- tile levels (CUTLASS names)
// Block tile TILE_M x TILE_N x TILE_K, split over WARPS_M x WARPS_N warps; each warp owns a
// WARP_M x WARP_N tile made of MMA_M x MMA_N instruction tiles of m16 x n8 (x k16).
template <int TILE_M, int TILE_N, int TILE_K, int WARPS_M, int WARPS_N>
struct TileShape {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kWarpM = TILE_M / WARPS_M;
  static constexpr int kWarpN = TILE_N / WARPS_N;
  static constexpr int kMmaM = kWarpM / 16;
  static constexpr int kMmaN = kWarpN / 8;
  static constexpr int kSteps = TILE_K / 16;  // k16 steps per block tile
  static_assert(TILE_M % (16 * WARPS_M) == 0, "warp tile rows must be a multiple of 16");
  static_assert(TILE_N % (16 * WARPS_N) == 0, "warp tile columns must be a multiple of 16");
  static_assert(TILE_K % 32 == 0, "TILE_K must be a multiple of 32");
};

// Contiguous range of k-tiles for split blockIdx.z of `split`.
__device__ __forceinline__ void split_k_range(int k_tiles, int split, int& begin, int& end) {
  const int per = (k_tiles + split - 1) / split;
  begin = blockIdx.z * per;
  end = min(k_tiles, begin + per);
}

// One k16 step of a warp tile: every A fragment against every B fragment.
template <int MMA_M, int MMA_N>
__device__ __forceinline__ void warp_mma(float (&acc)[MMA_M][MMA_N][4], const u32 (&a)[MMA_M][4],
                                         const u32 (&b)[MMA_N][2]) {
#pragma unroll
  for (int i = 0; i < MMA_M; ++i)
#pragma unroll
    for (int j = 0; j < MMA_N; ++j) mma_m16n8k16(acc[i][j], a[i], b[j][0], b[j][1]);
}

// ---------------------------------------------------------------- block placement
// Grid = (row tiles, column tiles, split). Row tiles vary fastest, so blocks that run together share
// one weight tile (read from DRAM once, then from L2) while the small activation matrix stays in L2.
struct BlockCoord {
  int m0, n0;
};
template <int TILE_M, int TILE_N>
__device__ __forceinline__ BlockCoord block_coord() {
  return {static_cast<int>(blockIdx.x) * TILE_M, static_cast<int>(blockIdx.y) * TILE_N};
}

// ---------------------------------------------------------------- epilogue
__device__ __forceinline__ float load_l2_f32(const float* p) {  // bypass L1: written by other SMs
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 load_l2_u4(const void* p) {  // bypass L1: written by other SMs
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ float4 load_l2_f4(const float* p) {  // bypass L1: written by other SMs
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}

// The same 16 bytes only where `in` (else zeros), with no branch: a predicated load (PTX ISA, ld with a
// guard predicate), so a reader can issue every slot's load at once and skip the absent ones; `p` is
// not accessed when `in` is false.
__device__ __forceinline__ float4 load_l2_f4_if(const float* p, bool in) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];\n}"
      : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
      : "l"(p), "r"(static_cast<int>(in)));
  return v;
}

// Accumulator fragment (m16 x n8) at (row, col) -> fp16 output, or fp32 split-K partial.
// c0, c1 -> (row, col..col+1); c2, c3 -> (row + 8, col..col+1).
__device__ __forceinline__ void store_fragment(const float (&c)[4], u16* out_h, float* out_f, int M, int N,
                                               int row, int col) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row + 8 * h;
    if (r < M) {
      const long long idx = (long long)r * N + col;
      if (out_f) *reinterpret_cast<float2*>(out_f + idx) = make_float2(c[2 * h], c[2 * h + 1]);
      else *reinterpret_cast<u32*>(out_h + idx) = float2_to_half2(c[2 * h], c[2 * h + 1]);
    }
  }
}

// ---------------------------------------------------------------- programmatic dependent launch
// A kernel launched with the programmatic-stream-serialization attribute may start while the kernel
// before it on the stream is still running (CUDA C++ Programming Guide, programmatic dependent launch).
// Such a kernel may read only what no earlier kernel writes (weights, tables) before it calls
// wait_for_prior_grid(), which returns once the previous grid has completed and its writes are
// visible (PTX ISA, parallel synchronization instructions: griddepcontrol, sm_90); it writes nothing
// before that point. After its wait a kernel calls allow_dependent_launch(), so the next kernel's
// blocks are placed and run their own prologue while this one finishes: one kernel ahead, no further.
// The small kernels allow it at once; a GEMM or the attention only after its main loop (on an H100,
// blocks of the next kernel placed during the loop slowed it). Launched normally (or before sm_90)
// both are no-ops.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Both at once: the start of a small kernel, which reads its input first thing.
__device__ __forceinline__ void start_after_prior_grid() {
  wait_for_prior_grid();
  allow_dependent_launch();
}

// Split-K / stream-K ticket: `arrivals` blocks each publish a partial tile, then call this once; it
// returns true, in every thread, in the block that arrives last (the one that sums the partials),
// after resetting the counter to 0 for the next launch (no memset between launches).
// __threadfence before the ticket: this block's partial stores become visible device-wide before its
// atomicAdd can (PTX ISA 9.7.13.4, membar/fence); the one after it orders the last block's reads of
// the other partials after its ticket. The flag goes through shared memory so the whole block
// follows thread 0's atomic. Used by finish_block below and by quick_wgmma.cu's stream-K fix-up.
__device__ __forceinline__ bool take_ticket(int* counter, int arrivals) {
  __shared__ int last_arrival;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last_arrival = atomicAdd(counter, 1) == arrivals - 1;
    if (last_arrival) *counter = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!last_arrival) return false;
  __threadfence();
  return true;
}

// Writes the block's result. Without split-K: fp16 straight from the accumulators. With split-K, in
// one launch: every block stores its fp32 partial tile into workspace[blockIdx.z] ([split, M, N]),
// then takes a ticket on its output tile; the block drawing the last ticket sums the slices in split
// order (deterministic whatever the arrival order), writes fp16 and resets the ticket counter to 0
// for the next launch. The fence before the ticket publishes the partial device-wide.
template <int TILE_M, int TILE_N, int THREADS, int MMA_M, int MMA_N>
__device__ __forceinline__ void finish_block(const float (&acc)[MMA_M][MMA_N][4], u16* out, float* workspace,
                                             int* tile_counters, int split, int M, int N, BlockCoord blk,
                                             int warp_row0, int warp_col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  float* partial = split > 1 ? workspace + (long long)blockIdx.z * M * N : nullptr;
#pragma unroll
  for (int i = 0; i < MMA_M; ++i)
#pragma unroll
    for (int j = 0; j < MMA_N; ++j)
      store_fragment(acc[i][j], out, partial, M, N, warp_row0 + 16 * i + g, warp_col0 + 8 * j + 2 * t);
  if (split == 1) return;

  if (!take_ticket(tile_counters + blockIdx.y * gridDim.x + blockIdx.x, split)) return;
  const long long mn = (long long)M * N;
  for (int i = 4 * threadIdx.x; i < TILE_M * TILE_N; i += 4 * THREADS) {
    const int r = blk.m0 + i / TILE_N, c = blk.n0 + i % TILE_N;
    if (r >= M) break;  // i grows row by row
    const float* src = workspace + (long long)r * N + c;
    float4 sum = load_l2_f4(src);
    for (int s = 1; s < split; ++s) {
      const float4 v = load_l2_f4(src + s * mn);
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    *reinterpret_cast<uint2*>(out + (long long)r * N + c) =
        make_uint2(float2_to_half2(sum.x, sum.y), float2_to_half2(sum.z, sum.w));
  }
}

}  // namespace ql

#endif  // QL_COMMON_CUH
