// CUTLASS's stock SM90 FP8 GEMMs (TMA, warp-specialised, FP8 fast accumulation) as torch ops, for
// benchmarks/cutlass_probe/probe.py: y = scale * x w^T (x: M x K E4M3 row-major, w: N x K E4M3
// row-major, bf16 y, scale a device scalar). The first step of the epilogue route for issue 12's
// layer bar (benchmarks/NOTES.md): is a CUTLASS kernel as fast as cuBLASLt's nvjet ones at the
// LLaMA-7B shapes, before one is given the adapter's k-steps after its K loop?
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "launch.cuh"

using namespace cute;

namespace {

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct Fp8Gemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;     // x: M x K, K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // w^T: K x N column-major = w: N x K row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // 16 bytes of FP8
  static constexpr int kAlignD = 8;    // 16 bytes of bf16

  // D = alpha * acc (+ beta * C, off: beta = 0, so C is never read), alpha from the device.
  using Fusion = cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementD, float>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, LayoutD, kAlignD,
      ElementD, LayoutD, kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB,
      LayoutB, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w,
                           const torch::Tensor& scale) {
    TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda(), "cutlass probe: CUDA tensors");
    TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn && w.scalar_type() == at::kFloat8_e4m3fn,
                "cutlass probe: E4M3 x and w");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.is_contiguous() &&
                    w.is_contiguous(),
                "cutlass probe: contiguous x (M, K) and w (N, K)");
    TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat,
                "cutlass probe: a float32 scalar scale");
    const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)),
              N = static_cast<int>(w.size(0));
    torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kBFloat16));
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    const auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    const auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    const auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    auto* a = reinterpret_cast<const ElementA*>(x.data_ptr());
    auto* b = reinterpret_cast<const ElementB*>(w.data_ptr());
    auto* d = reinterpret_cast<ElementD*>(y.data_ptr());
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {a, stride_a, b, stride_b},
                                  {{}, d, stride_d, d, stride_d}};
    args.epilogue.thread.alpha_ptr = scale.data_ptr<float>();
    args.epilogue.thread.beta = 0.f;
    launch<Gemm>(args, x.options(), "cutlass probe");
    return y;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;

using Coop128x256 = Fp8Gemm<Shape<_128, _256, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>;
using Coop256x128 = Fp8Gemm<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
using Pingpong64x256 = Fp8Gemm<Shape<_64, _256, _128>, Shape<_1, _2, _1>, Pingpong, PingpongEpi>;
// cuBLASLt's choice for the forward with row scales (nvjet ..._128x128_128x6_1x2_..._ovscale).
using Pingpong128x128 = Fp8Gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, Pingpong, PingpongEpi>;
using Pingpong128x128c2x1 =
    Fp8Gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, PingpongEpi>;

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("coop_128x256_c1x2", &Coop128x256::run, "cooperative, 128x256x128 tile, 1x2 cluster");
  m.def("coop_256x128_c2x1", &Coop256x128::run, "cooperative, 256x128x128 tile, 2x1 cluster");
  m.def("pingpong_64x256_c1x2", &Pingpong64x256::run, "ping-pong, 64x256x128 tile, 1x2 cluster");
  m.def("pingpong_128x128_c1x2", &Pingpong128x128::run, "ping-pong, 128x128x128 tile, 1x2 cluster");
  m.def("pingpong_128x128_c2x1", &Pingpong128x128c2x1::run,
        "ping-pong, 128x128x128 tile, 2x1 cluster");
}
