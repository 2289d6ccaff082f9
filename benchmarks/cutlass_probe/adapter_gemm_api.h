// The adapter GEMM probe's entry points, one a kernel configuration (tile, cluster): defined in
// adapter_gemm_a.cu / _b.cu (cooperative) and _c.cu (ping-pong), bound in adapter_gemm_bind.cpp.
#pragma once
#include <torch/extension.h>

// y = alpha[m] (x_q W_q^T + xa' B^T); swizzle and raster set the persistent scheduler's tile order.
#define FALQON_ADAPTER_GEMM_ARGS                                                               \
  const torch::Tensor &xq, const torch::Tensor &wq, const torch::Tensor &xa,                  \
      const torch::Tensor &b16, const torch::Tensor &alpha, int64_t swizzle, int64_t raster

torch::Tensor adapter_256x128_c2x1(FALQON_ADAPTER_GEMM_ARGS);
torch::Tensor adapter_256x128_c1x2(FALQON_ADAPTER_GEMM_ARGS);
torch::Tensor adapter_128x256_c1x2(FALQON_ADAPTER_GEMM_ARGS);
torch::Tensor adapter_128x256_c2x1(FALQON_ADAPTER_GEMM_ARGS);
torch::Tensor adapter_pp128x128_c1x2(FALQON_ADAPTER_GEMM_ARGS);
torch::Tensor adapter_pp128x128_c2x1(FALQON_ADAPTER_GEMM_ARGS);
// Without the adapter's k-tiles: y = alpha[m] x_q W_q^T (xa' and B unread).
torch::Tensor rowscale_pp128x128_c1x2(FALQON_ADAPTER_GEMM_ARGS);
