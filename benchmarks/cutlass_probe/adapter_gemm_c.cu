// adapter_gemm.cuh's kernel on the ping-pong schedule (a translation unit of its own, so that ninja
// compiles it beside the others): the 128x128 tile cuBLASLt takes for the forward with row scales,
// and the same kernel without the adapter's k-tiles (the stock mainloop, the same epilogue).
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

torch::Tensor rowscale_pp128x128_c1x2(FALQON_ADAPTER_GEMM_ARGS) {
  using Gemm =
      AdapterGemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, Pingpong, PingpongEpi, false>;
  return Gemm::run(xq, wq, xa, b16, alpha, swizzle, raster);
}
