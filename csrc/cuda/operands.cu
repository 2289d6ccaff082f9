// The small operands around the melded layer's GEMMs, made by one kernel launch each instead of
// a chain of ATen ops: the scale vectors of the forward's outer-vector GEMM with x's amax, and
// xa's contiguous copy with the adapter's B in the activation dtype.
//
// Each ATen op costs a dispatch, an allocation and a launch on the host: run 109 profiled the
// adapter mode's fwd+bwd at M = 256 at ~230 us of host time in the five such ops (x's amax, W''s
// scale vector, xa's copy, B's two conversions), which at small M sets the step time (run 108).
// The values are those of the ATen ops they replace, bit for bit: one fp32 multiplication for the
// amax, a copy for the scale and xa, round-to-nearest-even conversions for B (as Tensor.to).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kOperandThreads = 256;
constexpr int kOperandMaxBlocks = 1024;

int blocks_for(int64_t count) {
  const int64_t blocks = (count + kOperandThreads - 1) / kOperandThreads;
  return static_cast<int>(std::clamp<int64_t>(blocks, 1, kOperandMaxBlocks));
}

// w_vec[i] = *w_scale for i < rows (rows = 0: none); x_amax[i] = x_scale[i] * fp8_max for i < m.
__global__ void __launch_bounds__(kOperandThreads)
    given_scales_kernel(const float* __restrict__ w_scale, float* __restrict__ w_vec, int64_t rows,
                        const float* __restrict__ x_scale, float* __restrict__ x_amax, int64_t m,
                        float fp8_max) {
  pdl_wait();  // launch_dependent (one wave: the next kernel may be scheduled now)
  pdl_launch_dependents();
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (rows > 0) {
    const float s = *w_scale;
    for (int64_t i = first; i < rows; i += stride) w_vec[i] = s;
  }
  for (int64_t i = first; i < m; i += stride) x_amax[i] = __fmul_rn(x_scale[i], fp8_max);
}

template <typename O, typename I>
__device__ __forceinline__ O to_element(I v) {
  if constexpr (std::is_same_v<O, I>) {
    return v;
  } else {
    return static_cast<O>(static_cast<float>(v));  // c10's conversions round to nearest even
  }
}

// xa[i][j] = product[i][n0 + j] (i < m, j < r), then b[k] = O(lora_B[k]) for k < b_count.
// vec_xa: r, ld and n0 multiples of 8 and both bases 16-byte aligned, so that each row is copied as
// r / 8 vectors of 8 elements; vec_b: both bases aligned for 4-element vectors, the last
// b_count % 4 elements one at a time. (One element a thread, both launches of a fwd+bwd took 7.3 us
// for ~3.5 MB at 4096 -> 4096, M = 8192: run 113.)
template <typename T, typename B>
__global__ void __launch_bounds__(kOperandThreads)
    adapter_operands_kernel(const T* __restrict__ product, int64_t ld, int64_t n0, int64_t m, int r,
                            bool vec_xa, T* __restrict__ xa, const B* __restrict__ lora_B,
                            int64_t b_count, bool vec_b, T* __restrict__ b) {
  pdl_wait();  // launch_dependent (one wave: the next kernel may be scheduled now)
  pdl_launch_dependents();
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (vec_xa) {
    using V = Pack<T, 8>;
    const int row_vectors = r / 8;
    const int64_t count = m * row_vectors;
    for (int64_t i = first; i < count; i += stride) {
      const int64_t row = i / row_vectors;
      reinterpret_cast<V*>(xa)[i] = *reinterpret_cast<const V*>(
          product + row * ld + n0 + (i - row * row_vectors) * 8);
    }
  } else {
    const int64_t count = m * r;
    for (int64_t i = first; i < count; i += stride) {
      const int64_t row = i / r;
      xa[i] = product[row * ld + n0 + (i - row * r)];
    }
  }
  const int64_t b_vectors = vec_b ? b_count / 4 : 0;
  for (int64_t k = first; k < b_vectors; k += stride) {
    const Pack<B, 4> in = reinterpret_cast<const Pack<B, 4>*>(lora_B)[k];
    Pack<T, 4> out;
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = to_element<T>(in.v[j]);
    reinterpret_cast<Pack<T, 4>*>(b)[k] = out;
  }
  for (int64_t k = b_vectors * 4 + first; k < b_count; k += stride) b[k] = to_element<T>(lora_B[k]);
}

// Blocks for the larger of xa's and B's loops, each in the units it steps through.
int operand_blocks(int64_t m, int r, bool vec_xa, int64_t b_count, bool vec_b) {
  return blocks_for(std::max(vec_xa ? m * (r / 8) : m * r, vec_b ? (b_count + 3) / 4 : b_count));
}

template <typename T, typename B>
bool b_vectors_aligned(const B* lora_B, const T* b) {
  return pointer_alignment(lora_B) >= static_cast<int>(sizeof(Pack<B, 4>)) &&
         pointer_alignment(b) >= static_cast<int>(sizeof(Pack<T, 4>));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> given_scales(const at::Tensor& weight_scale, int64_t weight_rows,
                                                bool per_row, const at::Tensor& x_scale) {
  const at::Tensor w_scale = weight_scale.contiguous();
  FALQON_CHECK(x_scale.is_contiguous() && x_scale.scalar_type() == at::kFloat &&
                  w_scale.scalar_type() == at::kFloat && w_scale.numel() == 1,
              "falqon: the GEMM's given scales must be float32, the weight's one value");
  at::Tensor x_amax = at::empty_like(x_scale);
  at::Tensor w_vec = per_row ? at::empty({weight_rows}, w_scale.options()) : w_scale;
  const int64_t rows = per_row ? weight_rows : 0, m = x_scale.numel();
  launch_dependent(given_scales_kernel, dim3(blocks_for(std::max(rows, m))), dim3(kOperandThreads),
                   0, at::cuda::getCurrentCUDAStream(), x_scale.device(),
                   w_scale.const_data_ptr<float>(), per_row ? w_vec.data_ptr<float>() : nullptr,
                   rows, x_scale.const_data_ptr<float>(), x_amax.data_ptr<float>(), m,
                   static_cast<float>(fp8_max(at::kFloat8_e4m3fn)));
  return {w_vec, x_amax};
}

std::tuple<at::Tensor, at::Tensor> product_operands(const at::Tensor& product, int64_t N,
                                                    int64_t r,
                                                    const std::optional<at::Tensor>& lora_B) {
  FALQON_CHECK(product.dim() == 2 && product.stride(1) == 1 && product.size(1) >= N + r &&
                  (!lora_B.has_value() || (lora_B->dim() == 2 && lora_B->size(1) == r)),
              "falqon: product_operands takes the forward's (M, N + r16) product and B (N, r)");
  const int64_t M = product.size(0);
  at::Tensor xa = at::empty({M, r}, product.options());
  const at::Tensor b_in = lora_B.has_value() ? lora_B->contiguous() : at::Tensor();
  at::Tensor b = lora_B.has_value() ? at::empty(lora_B->sizes(), product.options()) : at::Tensor();
  const int64_t b_count = lora_B.has_value() ? b.numel() : 0;
  if (M * r == 0 && b_count == 0) return {xa, b};
  FALQON_DISPATCH_ACTIVATION(product.scalar_type(), "falqon_product_operands", [&] {
    using T = scalar_t;
    // Without B its loop runs over nothing (float stands in for its type).
    FALQON_DISPATCH_ACTIVATION(b_count ? b_in.scalar_type() : at::kFloat, "falqon_product_operands",
                               [&] {
      using Bt = scalar_t;
      const T* src = product.const_data_ptr<T>();
      const Bt* b_src = b_count ? b_in.const_data_ptr<Bt>() : nullptr;
      T* b_dst = b_count ? b.data_ptr<T>() : nullptr;
      const bool vec_xa = r % 8 == 0 && product.stride(0) % 8 == 0 && N % 8 == 0 &&
                          pointer_alignment(src) >= 16 && pointer_alignment(xa.data_ptr()) >= 16;
      const bool vec_b = b_count > 0 && b_vectors_aligned(b_src, b_dst);
      launch_dependent(adapter_operands_kernel<T, Bt>,
                       dim3(operand_blocks(M, static_cast<int>(r), vec_xa, b_count, vec_b)),
                       dim3(kOperandThreads), 0, at::cuda::getCurrentCUDAStream(), product.device(),
                       src, product.stride(0), N, M, static_cast<int>(r), vec_xa, xa.data_ptr<T>(),
                       b_src, b_count, vec_b, b_dst);
    });
  });
  return {xa, b};
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor src = t.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(dtype));
  if (out.numel() == 0) return out;
  FALQON_DISPATCH_ACTIVATION(dtype, "falqon_in_dtype", [&] {
    using O = scalar_t;
    FALQON_DISPATCH_ACTIVATION(src.scalar_type(), "falqon_in_dtype", [&] {
      using I = scalar_t;
      // adapter_operands_kernel's second loop alone (no xa rows).
      const I* in = src.const_data_ptr<I>();
      O* dst = out.data_ptr<O>();
      const bool vec_b = b_vectors_aligned(in, dst);
      launch_dependent(adapter_operands_kernel<O, I>,
                       dim3(operand_blocks(0, 1, false, out.numel(), vec_b)), dim3(kOperandThreads),
                       0, at::cuda::getCurrentCUDAStream(), src.device(), nullptr, int64_t{0},
                       int64_t{0}, int64_t{0}, 1, false, static_cast<O*>(nullptr), in, out.numel(),
                       vec_b, dst);
    });
  });
  return out;
}

}  // namespace cuda
}  // namespace falqon
