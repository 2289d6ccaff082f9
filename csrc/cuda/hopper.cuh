// Hopper (sm_90a) building blocks for the passes that stream tiles with TMA and multiply them
// with wgmma: 2-D tensor maps (host), mbarrier waits and arrivals, the TMA load and store, and
// the bf16/fp16 wgmma m64n64k16 with both operands K-major in 128-byte-swizzled shared memory.
//
// Everything device-side here compiles to real instructions only for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); the host decides whether a kernel built on it may run with
// hopper_kernels_built() (this build holds sm_90a code) and the device's compute capability.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "common.cuh"

namespace falqon {
namespace cuda {

// ---- host side --------------------------------------------------------------------------------

// True where this build compiled its kernels for sm_90a (setup.py / CMakeLists.txt define
// FALQON_SM90A when the architecture list holds 9.0a).
constexpr bool hopper_kernels_built() {
#ifdef FALQON_SM90A
  return true;
#else
  return false;
#endif
}

// True where `device` is a compute capability 9.0 GPU and this build holds sm_90a kernels.
bool hopper_kernels_run_on(const at::Device& device);

// A 2-D tensor map over a row-major 16-bit matrix (rows x cols, row stride ld elements, ld * 2
// bytes a multiple of 16, base 16-byte aligned) for boxes of box_rows x 64 elements (128 bytes
// a row: the 128-byte swizzle's width), 128-byte swizzled, zeros outside the matrix.
CUtensorMap tensor_map_16bit(const void* base, int64_t rows, int64_t cols, int64_t ld, int box_rows,
                             bool bf16);

}  // namespace cuda
}  // namespace falqon

#ifdef __CUDACC__
namespace falqon {
namespace cuda {
namespace hopper {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FALQON_HOPPER_DEVICE 1
#endif

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count));
#endif
}

// Makes the barriers' initialisation visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Arrives on `bar` and tells it `bytes` more are to come by TMA before the phase completes.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}

// Waits until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
#endif
}

// The box at (col, row) of `map` into shared memory at `dst` (1024-byte aligned), its bytes
// counted on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int col, int row,
                                            uint64_t* bar) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(smem_address(bar))
      : "memory");
#endif
}

// The box at (col, row) of `map` from shared memory at `src` (1024-byte aligned) to global
// memory (TMA clips what lies outside the matrix), in this thread's current bulk group.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, int col, int row, const void* src) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(col), "r"(row), "r"(smem_address(src))
      : "memory");
#endif
}

// Closes this thread's bulk group of TMA stores, and waits until every group's reads of shared
// memory are done (the global writes may still be under way): the block may then exit.
__device__ __forceinline__ void tma_store_commit_and_wait_read() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}

// Makes this thread's ordinary shared-memory writes visible to the async proxy (a TMA store or
// wgmma that reads them after a barrier).
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// A named barrier over `threads` threads (a multiple of 32) of the block; id 0 is __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The barriers of a warp-specialised pass's ring of kStages shared-memory slots: full[s] (the
// producer's one arrival plus TMA's bytes) and empty[s] (all kConsumers threads done with the
// slot). Thread 0 calls it; the block syncs before any thread uses them.
template <int kStages, int kConsumers>
__device__ __forceinline__ void init_stage_barriers(uint64_t* full, uint64_t* empty) {
  for (int s = 0; s < kStages; ++s) {
    mbarrier_init(&full[s], 1);
    mbarrier_init(&empty[s], kConsumers);
  }
  fence_barrier_init();
}

// The producer thread of such a pass: for stages t = 0 ... count - 1 in turn, waits until slot
// t % kStages is released (from the second round on), announces the slot's kStageBytes on its
// full barrier and calls issue(t, slot, full barrier) to start the slot's TMA loads. Every load
// counts its whole box, also one wholly past the tensor (TMA fills it with zeros).
template <int kStages, int kStageBytes, typename Issue>
__device__ __forceinline__ void produce_stages(unsigned char* smem, uint64_t* full,
                                               uint64_t* empty, int count, Issue issue) {
  for (int t = 0; t < count; ++t) {
    const int s = t % kStages;
    if (t >= kStages) mbarrier_wait(&empty[s], ((t / kStages) - 1) & 1);
    mbarrier_arrive_expect_tx(&full[s], kStageBytes);
    issue(t, smem + s * kStageBytes, &full[s]);
  }
}

// The maximum of m (a float's absolute-value bits) over threads [0, kConsumers) of a
// warp-specialised block once its producer warp has left (so __syncthreads would hang): warp
// maxima through shared memory, named barrier 1, then thread 0 reduces them. Every consumer
// thread must call it; the block's maximum is returned to thread 0 (the others get 0).
template <int kConsumers>
__device__ __forceinline__ uint32_t consumers_max(uint32_t m) {
  static_assert(kConsumers % 32 == 0, "consumers are whole warps");
  __shared__ uint32_t warp_max_bits[kConsumers / 32];
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_max_bits[threadIdx.x >> 5] = m;
  named_barrier_sync(1, kConsumers);
  uint32_t block = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kConsumers / 32; ++w) block = max(block, warp_max_bits[w]);
  }
  return block;
}

// The wgmma descriptor of an operand tile in shared memory written by TMA with the 128-byte
// swizzle: 64 rows of 64 16-bit elements (128 bytes), 8-row groups 1024 bytes apart (the stride
// byte offset), the leading byte offset unused for a tile one swizzle atom wide (1 by
// convention). The same numbers serve both majors (CUTLASS's canonical GMMA layouts):
//   - K-major (rows are the M or N index, the 64 elements K): the k-th 16-element step of K starts
//     32 bytes further, descriptor + 2 k;
//   - MN-major (rows are K, the 64 elements M or N; wgmma's transpose bit set): the k-th step of
//     16 rows starts two 8-row groups further, descriptor + 128 k.
__device__ __forceinline__ uint64_t sw128_descriptor(const void* tile) {
  const uint64_t address = smem_address(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed groups of wgmma are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FALQON_HOPPER_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// d (64 x 64, fp32, wgmma's accumulator layout) += A B^T for A: 64 rows x 16 (K) and B: 64 rows
// (the N dimension) x 16 (K), both K-major in shared memory, bf16 (kBf16) or fp16.
// Accumulator layout: warp w of the warpgroup holds rows 16 w + lane / 4 (d[4 i], d[4 i + 1]) and
// 16 w + lane / 4 + 8 (d[4 i + 2], d[4 i + 3]), columns 8 i + 2 (lane % 4) + {0, 1}.
// kTransposed: both operands MN-major instead (A stored as K rows of its 64 M values, B as K rows
// of its 64 N values), d += A B with A 64 x 16 and B 16 x 64.
template <bool kBf16, bool kTransposed = false>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b) {
#ifdef FALQON_HOPPER_DEVICE
// scale-d (a predicate: accumulate into d) from operand %34, which is always 1 here; the
// transpose bits of A and B from the immediate %35.
#define FALQON_WGMMA_ARGS                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %35;\n}\n"
#define FALQON_WGMMA_OUTS                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),     \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),   \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),   \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
  if constexpr (kBf16) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FALQON_WGMMA_ARGS
                 : FALQON_WGMMA_OUTS
                 : "l"(a), "l"(b), "r"(1), "n"(kTransposed ? 1 : 0));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FALQON_WGMMA_ARGS
                 : FALQON_WGMMA_OUTS
                 : "l"(a), "l"(b), "r"(1), "n"(kTransposed ? 1 : 0));
  }
#undef FALQON_WGMMA_ARGS
#undef FALQON_WGMMA_OUTS
#endif
}

}  // namespace hopper
}  // namespace cuda
}  // namespace falqon
#endif  // __CUDACC__
