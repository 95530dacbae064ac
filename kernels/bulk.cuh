// Hopper's bulk asynchronous copies and the transaction-counting mbarriers that track them (sm_90):
// a producer thread arms a barrier with the bytes it will receive (expect_tx), issues
// cp.async.bulk copies that count those bytes down as they land (complete_tx), and consumers wait on
// the barrier's phase parity. Only sm_90-only kernels include this header (quick_decode_bulk.cu).
#pragma once
#ifndef QL_BULK_CUH  // guard as well: sources.py splices includes as text (see common.cuh)
#define QL_BULK_CUH

#include "common.cuh"

namespace ql {

// PTX ISA, parallel synchronization instructions, mbarrier: init with the arrivals one phase needs; the init is made visible to
// the async proxy (the bulk copies' complete_tx) by fence.mbarrier_init before any copy uses it.
__device__ __forceinline__ void mbar_init(u32 bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// One arrival that also expects `bytes` more bytes of transactions in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// One arrival (release: this thread's earlier shared loads are done before the phase can complete).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Spin until the phase with this parity has completed (acquire: the copied bytes are visible).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n"
      "  .reg .pred done;\n"
      "WAIT:\n"
      "  mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "  @!done bra WAIT;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

// PTX ISA, data movement instructions, cp.async.bulk: `bytes` (a multiple of 16, both addresses 16-byte aligned)
// from global to this CTA's shared memory, counted down on barrier `bar` as they land.
__device__ __forceinline__ void bulk_copy_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

}  // namespace ql

#endif  // QL_BULK_CUH
