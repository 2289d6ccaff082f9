// adapter_gemm.cuh's kernels as a Python module for adapter_probe.py.
#include "adapter_gemm_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  constexpr const char* doc =
      "y = alpha[m] (x_q W_q^T + xa' B^T) (x_q, w_q, xa', b16, alpha, swizzle, raster)";
  m.def("adapter_256x128_c2x1", &adapter_256x128_c2x1, doc);
  m.def("adapter_256x128_c1x2", &adapter_256x128_c1x2, doc);
  m.def("adapter_128x256_c1x2", &adapter_128x256_c1x2, doc);
  m.def("adapter_128x256_c2x1", &adapter_128x256_c2x1, doc);
  m.def("adapter_pp128x128_c1x2", &adapter_pp128x128_c1x2, doc);
  m.def("adapter_pp128x128_c2x1", &adapter_pp128x128_c2x1, doc);
  m.def("rowscale_pp128x128_c1x2", &rowscale_pp128x128_c1x2,
        "y = alpha[m] x_q W_q^T: adapter_pp128x128_c1x2 without the adapter's k-tiles");
}
