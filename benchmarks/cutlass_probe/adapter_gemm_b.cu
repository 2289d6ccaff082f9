// Two of adapter_gemm.cuh's kernel configurations (one translation unit each pair, so that
// ninja compiles them in parallel).
#include "adapter_gemm.cuh"

torch::Tensor adapter_128x256_c1x2(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster) {
  return AdapterGemm<Shape<_128, _256, _128>, Shape<_1, _2, _1>>::run(xq, wq, xa, b16, alpha, swizzle, raster);
}

torch::Tensor adapter_128x256_c2x1(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster) {
  return AdapterGemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>>::run(xq, wq, xa, b16, alpha, swizzle, raster);
}

