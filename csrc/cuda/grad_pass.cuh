// Pieces shared by the passes over a 16-bit gradient (backward.cu, adapter_u.cu,
// grad_pass_hopper.cu): the CUDA types of an activation dtype, NaN-propagating packed maxima of
// 16-bit values, the cast of the adapter operand's u columns, the one-time shared-memory opt-in
// of a kernel and the launchers' dispatch (also adapter_y.cu's).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "common.cuh"

namespace falqon {
namespace cuda {

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) once per kernel, size and device
// (the attribute is a context's, i.e. a device's), not on every launch: a driver call that costs
// host time per layer (run 109).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, int device) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.emplace(reinterpret_cast<const void*>(kernel), bytes, device).second) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// `kernel` with `smem` bytes of dynamic shared memory (opted in once) by launch_dependent on the
// current stream: the Hopper passes' launch.
template <typename... Params, typename... Args>
void launch_with_smem(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                      const at::Device& device, Args&&... args) {
  allow_dynamic_smem(kernel, smem, device.index());
  launch_dependent(kernel, grid, block, smem, at::cuda::getCurrentCUDAStream(), device,
                   std::forward<Args>(args)...);
}

// f(TypeTag<at::BFloat16>{}) where bf16, else f(TypeTag<at::Half>{}): a launcher's dispatch over
// the two 16-bit activation dtypes.
template <typename F>
void with_half_type(bool bf16, F&& f) {
  if (bf16) {
    f(TypeTag<at::BFloat16>{});
  } else {
    f(TypeTag<at::Half>{});
  }
}

#ifdef __CUDACC__
// The CUDA types of a 16-bit activation dtype: one element (for the mma) and two (packed max).
template <typename T>
struct HalfTypes;
template <>
struct HalfTypes<at::BFloat16> {
  using type = __nv_bfloat16;
  using pair = __nv_bfloat162;
};
template <>
struct HalfTypes<at::Half> {
  using type = __half;
  using pair = __half2;
};

// max(m, |v|) for the 8 values of a vector, two per instruction, NaN-propagating (so that a NaN
// in g reaches the amax, as abs_bits orders it in the reference).
template <typename T>
__device__ __forceinline__ typename HalfTypes<T>::pair pack_abs_max(typename HalfTypes<T>::pair m,
                                                                    const Pack<T, 8>& v) {
  using Pair = typename HalfTypes<T>::pair;
  const Pair* p = reinterpret_cast<const Pair*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) m = __hmax2_nan(m, __habs2(p[k]));
  return m;
}

// The max of a pair's two magnitudes as abs_bits orders them (NaN above Inf).
template <typename Pair>
__device__ __forceinline__ uint32_t pair_abs_bits(Pair m) {
  return max(abs_bits(__low2float(m)), abs_bits(__high2float(m)));
}

// The adapter operand's columns [N, ld_q) of q: u (M x ru, fp32, contiguous, ru a multiple of 8)
// in [N, N + ru), zeros after, cast at d, 8 columns a step over the vectors [first, M r16 / 8)
// with the given stride (a grid-stride share). Returns the largest |u| cast, as abs_bits.
template <bool kE4M3>
__device__ __forceinline__ uint32_t cast_u_columns(const float* __restrict__ u, int64_t M,
                                                   int64_t ru, int64_t N, uint8_t* __restrict__ q,
                                                   int64_t ld_q, const Reciprocal& d, int64_t first,
                                                   int64_t stride) {
  uint32_t m_u = 0;
  const int64_t vecs_per_row = (ld_q - N) / 8;
  for (int64_t i = first; i < M * vecs_per_row; i += stride) {
    const int64_t row = i / vecs_per_row, c8 = (i - row * vecs_per_row) * 8;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c8 < ru) {
      const float4* src = reinterpret_cast<const float4*>(u + row * ru + c8);
      const float4 a = src[0], b = src[1];
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
#pragma unroll
      for (int k = 0; k < 8; ++k) m_u = max(m_u, abs_bits(x[k]));
    }
    *reinterpret_cast<uint2*>(q + row * ld_q + N + c8) = cast8_to_fp8<kE4M3>(x, d);
  }
  return m_u;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace falqon
