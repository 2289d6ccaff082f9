// adapter_gemm.cuh's kernels as a Python module for adapter_probe.py.
#include <torch/extension.h>

torch::Tensor adapter_256x128_c2x1(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster);
torch::Tensor adapter_256x128_c1x2(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster);
torch::Tensor adapter_128x256_c1x2(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster);
torch::Tensor adapter_128x256_c2x1(const torch::Tensor& xq, const torch::Tensor& wq, const torch::Tensor& xa, const torch::Tensor& b16, const torch::Tensor& alpha, int64_t swizzle, int64_t raster);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adapter_256x128_c2x1", &adapter_256x128_c2x1, "y = alpha[m] (x_q W_q^T + xa' B^T), tile 256x128x128, cluster 2x1x1");
  m.def("adapter_256x128_c1x2", &adapter_256x128_c1x2, "y = alpha[m] (x_q W_q^T + xa' B^T), tile 256x128x128, cluster 1x2x1");
  m.def("adapter_128x256_c1x2", &adapter_128x256_c1x2, "y = alpha[m] (x_q W_q^T + xa' B^T), tile 128x256x128, cluster 1x2x1");
  m.def("adapter_128x256_c2x1", &adapter_128x256_c2x1, "y = alpha[m] (x_q W_q^T + xa' B^T), tile 128x256x128, cluster 2x1x1");
}
