// A CUTLASS 3 device-level GEMM's launch on torch's current stream, its workspace from torch's
// allocator: the probes' (fp8_gemm.cu, adapter_gemm.cuh) common last step.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "cutlass/cutlass.h"

template <class Gemm>
void launch(const typename Gemm::Arguments& args, const torch::TensorOptions& options,
            const char* what) {
  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, what,
              ": this configuration cannot run the problem");
  torch::Tensor workspace = torch::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                         options.dtype(torch::kUInt8));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
              what, ": initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, what, ": launch failed");
}
