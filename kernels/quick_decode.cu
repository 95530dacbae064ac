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
//                    Launched as a programmatic dependent (quick_lab.build.launch), a block waits for
//                    the kernel before only after the first chunk's weights are in flight, and lets
//                    the next kernel's blocks be placed once its loop is done.
//   2. matmul:       per k16 step, per word: dequantize with its group's pair, 1 mma.m16n8k16 per 8
//                    batch rows.
//   3. reduce:       the warps' partial 64 x TILE_M tiles are summed through shared memory, so a
//                    block writes one partial, not WARPS;
//   4. write_result: split == 1: fp16 straight out; else the fp32 partial goes to
//                    workspace[split][M][N] and the block that takes the last ticket on its strip
//                    (common.cuh take_ticket) sums the slices in split order (deterministic) and writes
//                    fp16: one launch, no second pass. EPILOGUE = kSiluMul: the weight's columns come
//                    in (gate, up) pairs of 32 (a fused gate_up projection, laid out so by
//                    quick_lab.core.format.pair_gate_up), so a strip holds both halves of 32 outputs
//                    and the writer stores silu(gate) * up [M, N / 2] instead of y: the MLP's
//                    activation needs no launch of its own. Each half is rounded to fp16 first, so it
//                    is bit for bit y followed by decoder.cu's silu_mul. A template parameter, not an
//                    argument: with a run-time flag the store path's main loop was scheduled
//                    differently and ran up to 6% slower on an H100 (results/NOTES.md).
//                    EPILOGUE = kPartials: every block stores its fp32 slice [split][M][N] and is
//                    done: no fence, ticket or fix-up block. The kernel that reads y sums the
//                    slices in split order and rounds to fp16, the very arithmetic of the fix-up,
//                    so it reads the same y bit for bit (decoder.cu's add_rms_norm and the decode
//                    attention do); what it saves is the fix-up's chain (store, fence, atomic,
//                    reload: ~1.7 us on an H100) at the end of every split GEMM of a decode step.
//
// Measured on an H100 and kept out (results/NOTES.md): a per-warp cp.async ring in shared memory
// instead of registers (more bytes in flight, but slower: issue-bound on the extra copies and shared
// loads at 25% occupancy), and a register double buffer of the next chunk (fewer resident warps).
// Grid = (1, N / 64, split). K must be a multiple of TILE_K (quick_lab/core/registry.py checks it); a
// step's group is k / group_size, so a chunk may span several groups.
#include "quick_layout.cuh"

using namespace ql;

// The writer's epilogue (quick_lab/core/registry.py EPILOGUES, in this order).
constexpr int kStore = 0, kSiluMul = 1, kPartials = 2;

template <int TILE_M, int TILE_K, int WARPS, int EPILOGUE>
__global__ void __launch_bounds__(32 * WARPS)
    quick_decode(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u32* __restrict__ qzeros,
                 const uint4* __restrict__ scales, u16* __restrict__ out, float* __restrict__ workspace,
                 int* __restrict__ tile_counters, int M, int K, int N, int group_size, int split) {
  constexpr int kThreads = 32 * WARPS, kBatchTiles = TILE_M / 8;
  constexpr int kSteps = TILE_K / 16 / WARPS;  // k16 steps of one warp per k-tile
  static_assert(TILE_K % (16 * WARPS) == 0, "every warp gets whole k16 steps of a k-tile");
  static_assert(TILE_M == 8 || TILE_M == 16 || TILE_M == 32, "one, two or four n8 tiles of batch rows");
  static_assert(EPILOGUE == kStore || EPILOGUE == kSiluMul || EPILOGUE == kPartials,
                "store y, silu(gate) * up of its column pairs, or the fp32 split slices");
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
  // One k-tile: fetch, then matmul. The block's first chunk waits for the kernel before
  // between its weight loads and its activation loads: launched as a programmatic dependent, the block
  // is placed while that kernel runs, and the weights depend on nothing it writes. The steady chunks
  // carry no wait, so nothing splits their instruction schedule.
  auto chunk = [&](const int kt, const bool first) {  // inlined: `first` is a constant at each call
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
    if (first) wait_for_prior_grid();  // the activations are its output
#pragma unroll
    for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const int k = (k16_0 + ks) * 16;
        b[bt][ks][0] = has_row[bt] ? load_activation_u32(x_row[bt] + k) : 0u;
        b[bt][ks][1] = has_row[bt] ? load_activation_u32(x_row[bt] + k + 8) : 0u;
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
  };
  if (kt_begin < kt_end) chunk(kt_begin, true);
  for (int kt = kt_begin + 1; kt < kt_end; ++kt) chunk(kt, false);

  wait_for_prior_grid();     // a block with no k-tiles waits here (a second wait returns at once)
  allow_dependent_launch();  // the next kernel's blocks may be placed during the reduction and the tail
  // reduce: acc[bt][v] c0, c1 -> batch rows 8 bt + 2t, + 1 at column 16 v + g; c2, c3 -> column + 8.
#pragma unroll
  for (int bt = 0; bt < kBatchTiles; ++bt)
#pragma unroll
    for (int v = 0; v < 4; ++v)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        red[(warp * TILE_M + 8 * bt + 2 * t + (c & 1)) * kRedStride + 16 * v + 8 * (c >> 1) + g] = acc[bt][v][c];
  __syncthreads();

  // write_result: thread i of M x 64 sums the warps' partials of element (i / 64, i % 64).
  // kPartials: the fp32 slice is the result (workspace = out [split][M][N]), at any split.
  float* partial = EPILOGUE == kPartials || split > 1 ? workspace + (long long)blockIdx.z * M * N : nullptr;
  if (EPILOGUE == kSiluMul && !partial) {  // silu(gate) * up of the 32 pairs: gate columns 0..31, up 32..63
    for (int i = threadIdx.x; i < rows * 32; i += kThreads) {
      const int r = i / 32, c = i % 32;
      float gate = 0.f, up = 0.f;
#pragma unroll
      for (int wp = 0; wp < WARPS; ++wp) {
        gate += red[(wp * TILE_M + r) * kRedStride + c];
        up += red[(wp * TILE_M + r) * kRedStride + c + 32];
      }
      out[(long long)r * (N / 2) + strip * 32 + c] = silu_mul_half(float_to_half(gate), float_to_half(up));
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
    const int r = i / 64, c = i % 64;
    float v = 0.f;
#pragma unroll
    for (int wp = 0; wp < WARPS; ++wp) v += red[(wp * TILE_M + r) * kRedStride + c];
    const long long idx = (long long)r * N + strip * 64 + c;
    if (partial) partial[idx] = v;
    else out[idx] = float_to_half(v);
  }
  if (EPILOGUE == kPartials || split == 1 || !take_ticket(tile_counters + strip, split)) return;
  const long long mn = (long long)M * N;
  if (EPILOGUE == kSiluMul) {
    for (int i = threadIdx.x; i < rows * 32; i += kThreads) {
      const long long idx = (long long)(i / 32) * N + strip * 64 + i % 32;
      float gate = 0.f, up = 0.f;
      for (int s = 0; s < split; ++s) {
        gate += load_l2_f32(workspace + s * mn + idx);
        up += load_l2_f32(workspace + s * mn + idx + 32);
      }
      out[(long long)(i / 32) * (N / 2) + strip * 32 + i % 32] = silu_mul_half(float_to_half(gate), float_to_half(up));
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * 64; i += kThreads) {
    const long long idx = (long long)(i / 64) * N + strip * 64 + i % 64;
    float v = 0.f;
    for (int s = 0; s < split; ++s) v += load_l2_f32(workspace + s * mn + idx);
    out[idx] = float_to_half(v);
  }
}
