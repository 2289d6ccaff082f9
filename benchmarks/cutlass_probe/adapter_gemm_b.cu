// Two of adapter_gemm.cuh's kernel configurations (a translation unit a pair, so that ninja
// compiles them in parallel).
#include "adapter_gemm.cuh"
#include "adapter_gemm_api.h"

torch::Tensor adapter_128x256_c1x2(FALQON_ADAPTER_GEMM_ARGS) {
  using Gemm = AdapterGemm<Shape<_128, _256, _128>, Shape<_1, _2, _1>>;
  return Gemm::run(xq, wq, xa, b16, alpha, swizzle, raster);
}

torch::Tensor adapter_128x256_c2x1(FALQON_ADAPTER_GEMM_ARGS) {
  using Gemm = AdapterGemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>>;
  return Gemm::run(xq, wq, xa, b16, alpha, swizzle, raster);
}
