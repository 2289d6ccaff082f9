// The adapter mode's u = scaling g B (fp32 out, M x r) through each algorithm cuBLASLt's heuristic
// offers, in the layout falqon's matmul_16bit uses for it (csrc/cuda/gemm.cu: A = B stored N x r,
// op N; B = g stored M x N, op N; D = u, column-major r x M): is the heuristic's first choice (the
// one falqon takes) the fastest? For benchmarks/route_probe/u_algos.py.
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <vector>

namespace {

#define CHECK_LT(EXPR) \
  TORCH_CHECK((EXPR) == CUBLAS_STATUS_SUCCESS, "u_algos: cuBLASLt call failed: ", #EXPR)

struct Problem {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> results;

  Problem(int64_t M, int64_t N, int64_t r, int max_algos) {
    CHECK_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_n = CUBLAS_OP_N;
    for (const auto attr : {CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB}) {
      CHECK_LT(cublasLtMatmulDescSetAttribute(desc, attr, &op_n, sizeof(op_n)));
    }
    CHECK_LT(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, r, N, r));  // B^T, column-major r x N
    CHECK_LT(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, N, M, N));  // g^T, column-major N x M
    CHECK_LT(cublasLtMatrixLayoutCreate(&d, CUDA_R_32F, r, M, r));   // u^T, column-major r x M
    cublasLtMatmulPreference_t pref = nullptr;
    CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = uint64_t{32} << 20;
    CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &ws, sizeof(ws)));
    results.resize(max_algos);
    int found = 0;
    CHECK_LT(cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), desc, a, b, d,
                                            d, pref, max_algos, results.data(), &found));
    results.resize(found);
    cublasLtMatmulPreferenceDestroy(pref);
  }
  ~Problem() {
    cublasLtMatrixLayoutDestroy(d);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(desc);
  }
};

template <typename T>
T config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T value{};
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, sizeof(value), &written);
  return value;
}

// Each algorithm's (index, tile id, split-k count, stages id, workspace bytes).
std::vector<std::vector<int64_t>> algos(int64_t M, int64_t N, int64_t r, int64_t max_algos) {
  Problem p(M, N, r, static_cast<int>(max_algos));
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < p.results.size(); ++i) {
    const auto& algo = p.results[i].algo;
    out.push_back({static_cast<int64_t>(i), config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                   config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                   config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                   static_cast<int64_t>(p.results[i].workspaceSize)});
  }
  return out;
}

// u = scaling g B through the heuristic's algorithm `index`, `calls` times back to back.
void run(const torch::Tensor& g, const torch::Tensor& b, torch::Tensor& u, double scaling,
         int64_t index, int64_t calls) {
  TORCH_CHECK(g.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
                  u.scalar_type() == at::kFloat && g.is_contiguous() && b.is_contiguous() &&
                  u.is_contiguous(),
              "u_algos: contiguous bf16 g (M, N) and B (N, r), fp32 u (M, r)");
  const int64_t M = g.size(0), N = g.size(1), r = b.size(1);
  static thread_local std::unique_ptr<Problem> p;
  static thread_local std::vector<int64_t> key;
  const std::vector<int64_t> want{M, N, r};
  if (!p || key != want) {
    p = std::make_unique<Problem>(M, N, r, 16);
    key = want;
  }
  TORCH_CHECK(index < static_cast<int64_t>(p->results.size()), "u_algos: no algorithm ", index);
  const auto& result = p->results[index];
  torch::Tensor ws = torch::empty({static_cast<int64_t>(result.workspaceSize) + 1},
                                  g.options().dtype(torch::kUInt8));
  const float alpha = static_cast<float>(scaling), beta = 0.f;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t i = 0; i < calls; ++i) {
    CHECK_LT(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p->desc, &alpha,
                            b.data_ptr(), p->a, g.data_ptr(), p->b, &beta, u.data_ptr(), p->d,
                            u.data_ptr(), p->d, &result.algo, ws.data_ptr(), result.workspaceSize,
                            stream));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("algos", &algos, "the heuristic's algorithms: (index, tile id, split-k, stages id, ws)");
  m.def("run", &run, "u = scaling g B through algorithm `index`, `calls` times");
}
