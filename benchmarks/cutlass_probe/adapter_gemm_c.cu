// Two of adapter_gemm.cuh's kernel configurations on the ping-pong schedule (a translation unit a
// pair, so that ninja compiles them in parallel): the 128x128 tile cuBLASLt takes for the forward
// with row scales.
#include "adapter_gemm.cuh"
#include "adapter_gemm_api.h"

namespace {
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;
}  // namespace

torch::Tensor adapter_pp128x128_c1x2(FALQON_ADAPTER_GEMM_ARGS) {
  using Gemm = AdapterGemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, Pingpong, PingpongEpi>;
  return Gemm::run(xq, wq, xa, b16, alpha, swizzle, raster);
}

torch::Tensor adapter_pp128x128_c2x1(FALQON_ADAPTER_GEMM_ARGS) {
  using Gemm = AdapterGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, PingpongEpi>;
  return Gemm::run(xq, wq, xa, b16, alpha, swizzle, raster);
}
