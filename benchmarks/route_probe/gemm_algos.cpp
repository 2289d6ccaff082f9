// falqon's cuBLASLt GEMMs through each algorithm the heuristic offers, not only its first (the one
// csrc/cuda/gemm.cu takes): the descriptors and layouts are built as gemm.cu builds them, for an
// FP8 GEMM (scaled_gemm_tn: "TN", fast accumulation, per-tensor or outer-vector scales, no bias)
// and for a 16-bit one (matmul_16bit: fp32 accumulation, an optional C). For
// benchmarks/route_probe/gemm_algos.py.
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <memory>
#include <vector>

namespace {

#define CHECK_LT(EXPR) \
  TORCH_CHECK((EXPR) == CUBLAS_STATUS_SUCCESS, "gemm_algos: cuBLASLt call failed: ", #EXPR)

cudaDataType_t lt_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat8_e4m3fn: return CUDA_R_8F_E4M3;
    case at::kFloat8_e5m2: return CUDA_R_8F_E5M2;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "gemm_algos: no cuBLASLt type for ", t);
  }
}

int64_t row_stride(const torch::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

template <typename V>
void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// One problem: its descriptor, layouts, the heuristic's algorithms and the tensors it runs on.
struct Problem {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> results;
  torch::Tensor ta, tb, tc, tout;
  float alpha = 1.f, beta = 0.f;

  ~Problem() {
    for (auto layout : {d, c, b, a}) {
      if (layout) cublasLtMatrixLayoutDestroy(layout);
    }
    if (desc) cublasLtMatmulDescDestroy(desc);
  }

  void find(int max_algos) {
    cublasLtMatmulPreference_t pref = nullptr;
    CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = uint64_t{32} << 20;  // gemm.cu's limit on Hopper
    CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &ws, sizeof(ws)));
    results.resize(max_algos);
    int found = 0;
    CHECK_LT(cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), desc, a, b, c,
                                            d, pref, max_algos, results.data(), &found));
    results.resize(found);
    cublasLtMatmulPreferenceDestroy(pref);
  }
};

std::vector<std::unique_ptr<Problem>> problems;

// scaled_gemm_tn's GEMM: out (n x m, row stride ldo) = b (n x k) a^T (a: m x k), FP8 operands
// with their scales (one value each, or vectors of m and n values: outer-vector scaling), plus C
// where given (beta = 1: a route that adds the adapter's product in the GEMM's epilogue).
int64_t prepare_fp8(torch::Tensor a, torch::Tensor a_scale, torch::Tensor b, torch::Tensor b_scale,
                    std::optional<torch::Tensor> c, torch::Tensor out, bool fast_accum,
                    int64_t max_algos) {
  auto p = std::make_unique<Problem>();
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  CHECK_LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, cublasOperation_t{CUBLAS_OP_T});
  set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, cublasOperation_t{CUBLAS_OP_N});
  set(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t{fast_accum ? int8_t{1} : int8_t{0}});
  if (a_scale.numel() != 1 || b_scale.numel() != 1) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode);
    set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode);
  }
  set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale.const_data_ptr());
  set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale.const_data_ptr());
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->a, lt_type(a.scalar_type()), k, m, k));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->b, lt_type(b.scalar_type()), k, n, k));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->d, lt_type(out.scalar_type()), m, n, out.stride(0)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->c, lt_type(out.scalar_type()), m, n,
                                      c ? c->stride(0) : out.stride(0)));
  p->find(static_cast<int>(max_algos));
  p->ta = a, p->tb = b, p->tc = c ? *c : out, p->tout = out;
  p->beta = c ? 1.f : 0.f;  // with C: out = the scaled product + C (C in out's dtype)
  problems.push_back(std::move(p));
  return static_cast<int64_t>(problems.size()) - 1;
}

// matmul_16bit's GEMM: out (n x m) = alpha b (n x k) op(a) + c, a stored m x k (a_k_major false)
// or k x m (true), b and out row-major.
int64_t prepare_16bit(torch::Tensor a, bool a_k_major, torch::Tensor b,
                      std::optional<torch::Tensor> c, torch::Tensor out, double alpha,
                      int64_t max_algos) {
  auto p = std::make_unique<Problem>();
  const int64_t n = b.size(0), k = b.size(1), m = a_k_major ? a.size(1) : a.size(0);
  const bool trans_a = !a_k_major;
  CHECK_LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, cublasOperation_t{trans_a ? CUBLAS_OP_T : CUBLAS_OP_N});
  set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, cublasOperation_t{CUBLAS_OP_N});
  const cudaDataType_t ab = lt_type(a.scalar_type()), cd = lt_type(out.scalar_type());
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->a, ab, trans_a ? k : m, trans_a ? m : k, row_stride(a)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->b, ab, k, n, row_stride(b)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->c, cd, m, n, c ? row_stride(*c) : row_stride(out)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&p->d, cd, m, n, row_stride(out)));
  p->find(static_cast<int>(max_algos));
  p->ta = a, p->tb = b, p->tc = c ? *c : out, p->tout = out;
  p->alpha = static_cast<float>(alpha);
  p->beta = c ? 1.f : 0.f;
  problems.push_back(std::move(p));
  return static_cast<int64_t>(problems.size()) - 1;
}

template <typename T>
T config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T value{};
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, sizeof(value), &written);
  return value;
}

// Each algorithm's (index, algo id, tile id, split-k count, stages id, workspace bytes).
std::vector<std::vector<int64_t>> algos(int64_t handle) {
  const Problem& p = *problems.at(handle);
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < p.results.size(); ++i) {
    const auto& algo = p.results[i].algo;
    out.push_back({static_cast<int64_t>(i), config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID),
                   config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                   config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                   config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                   static_cast<int64_t>(p.results[i].workspaceSize)});
  }
  return out;
}

// The problem through the heuristic's algorithm `index`, `calls` times back to back.
void run(int64_t handle, int64_t index, int64_t calls) {
  Problem& p = *problems.at(handle);
  TORCH_CHECK(index < static_cast<int64_t>(p.results.size()), "gemm_algos: no algorithm ", index);
  const auto& result = p.results[index];
  torch::Tensor ws = torch::empty({static_cast<int64_t>(result.workspaceSize) + 1},
                                  p.tout.options().dtype(torch::kUInt8));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t i = 0; i < calls; ++i) {
    CHECK_LT(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, &p.alpha,
                            p.ta.const_data_ptr(), p.a, p.tb.const_data_ptr(), p.b, &p.beta,
                            p.tc.const_data_ptr(), p.c, p.tout.data_ptr(), p.d, &result.algo,
                            ws.data_ptr(), result.workspaceSize, stream));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prepare_fp8", &prepare_fp8, "scaled_gemm_tn's problem; returns a handle");
  m.def("prepare_16bit", &prepare_16bit, "matmul_16bit's problem; returns a handle");
  m.def("algos", &algos, "the heuristic's algorithms: (index, algo id, tile id, split-k, stages "
                         "id, workspace bytes)");
  m.def("run", &run, "the problem through algorithm `index`, `calls` times");
}
