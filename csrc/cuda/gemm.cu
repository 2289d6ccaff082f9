// FP8 GEMMs through cuBLASLt: per-tensor or outer-vector scales (one per row of each operand:
// cuBLASLt's OUTER_VEC_32F, Hopper) as device pointers (no host synchronisation), the bias fused
// in the epilogue, descriptors and the chosen algorithm cached per problem.
//
// cuBLASLt is column-major and its FP8 kernels want the "TN" form on Ada and Hopper: A
// transposed, B not, both with a contiguous k. Our row-major operands a (m x k) and b (n x k)
// are, read column-major, k x m and k x n matrices, so D[m x n] = A^T B with A = a, B = b is
// exactly (b a^T)^T: stored column-major with ld = ldo, it is the row-major n x m product.
//   forward: a = W' ((N + r16) x K), b = fp8(x) (M x K) -> (M, N + r16), ldo = N + r16
//   dgrad:   a = W_q^T (K x N),      b = fp8(g) (M x N) -> (M, K),      ldo = K
#include <cublasLt.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

#define FALQON_CUBLASLT_CHECK(EXPR)                                                           \
  do {                                                                                        \
    const cublasStatus_t status_ = (EXPR);                                                    \
    FALQON_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "falqon: cuBLASLt call ", #EXPR, " failed: ", \
                cublasLtGetStatusName(status_), " (", cublasLtGetStatusString(status_), ")"); \
  } while (0)

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat8_e4m3fn:
      return CUDA_R_8F_E4M3;
    case at::kFloat8_e5m2:
      return CUDA_R_8F_E5M2;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kFloat:
      return CUDA_R_32F;
    default:
      FALQON_CHECK(false, "falqon: no cuBLASLt type for ", t);
  }
}

// Everything the heuristic's choice depends on. Pointer alignments are part of it: cuBLASLt
// assumes 256-byte aligned buffers unless told otherwise (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*),
// and an operand taken at an offset may be less aligned.
struct GemmKey {
  int device;
  int64_t m, n, k, ldo;
  cudaDataType_t a_type, b_type, d_type;
  bool bias, fast_accum, outer_vec;
  int align_a, align_b, align_d, align_bias;

  bool operator==(const GemmKey& o) const { return std::memcmp(this, &o, sizeof(GemmKey)) == 0; }
};

// FNV-1a over a plan key's bytes: every key is zero-initialised before it is filled, padding
// included, and compared with memcmp.
template <typename Key>
struct BytewiseHash {
  size_t operator()(const Key& key) const {
    const auto* p = reinterpret_cast<const unsigned char*>(&key);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// A matmul descriptor, the three layouts and the algorithm for one GemmKey.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  bool found = false;

  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    // Destruction must not throw; these only free host memory.
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

template <typename V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  FALQON_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// Workspace for split-k and stream-k algorithms: 32 MiB on Hopper and later (what torch gives
// cuBLASLt there), 4 MiB before.
size_t workspace_limit(const at::Device& device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  return prop->major >= 9 ? (size_t{32} << 20) : (size_t{4} << 20);
}

// cuBLASLt's best algorithm for a plan's descriptor and layouts (C laid out as `c`), within the
// device's workspace limit and the pointer alignments of A, B, C and D (bytes): stored in the
// plan; false, with nothing stored, where the heuristic offers none.
bool find_algorithm(cublasLtHandle_t handle, GemmPlan& plan, cublasLtMatrixLayout_t c,
                    const std::array<int, 4>& align, const at::Device& device) {
  cublasLtMatmulPreference_t pref = nullptr;
  FALQON_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                        decltype(&cublasLtMatmulPreferenceDestroy)>
      pref_owner(pref, &cublasLtMatmulPreferenceDestroy);
  const uint64_t ws_limit = workspace_limit(device);
  FALQON_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_limit, sizeof(ws_limit)));
  const cublasLtMatmulPreferenceAttributes_t attrs[] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    const uint32_t value = static_cast<uint32_t>(align[i]);
    FALQON_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attrs[i], &value, sizeof(value)));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, c,
                                                               plan.d, pref, 1, &result, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  plan.algo = result.algo;
  plan.workspace = result.workspaceSize;
  return true;
}

std::unique_ptr<GemmPlan> make_plan(const GemmKey& key, cublasLtHandle_t handle, const void* a_scale,
                                    const void* b_scale, const void* bias, const at::Device& device) {
  auto plan = std::make_unique<GemmPlan>();
  FALQON_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, cublasOperation_t{CUBLAS_OP_T});
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, cublasOperation_t{CUBLAS_OP_N});
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t{key.fast_accum ? int8_t{1} : int8_t{0}});
  if (key.outer_vec) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode);
  }
  // The pointers are set again on every call; the heuristic reads them only for their alignment.
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale);
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale);
  if (key.bias) {
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, cublasLtEpilogue_t{CUBLASLT_EPILOGUE_BIAS});
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, key.d_type);
  }
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->a, key.a_type, key.k, key.m, key.k));
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->b, key.b_type, key.k, key.n, key.k));
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->d, key.d_type, key.m, key.n, key.ldo));

  plan->found = find_algorithm(handle, *plan, plan->d,
                               {key.align_a, key.align_b, key.align_d, key.align_d}, device);
  // Per-tensor scales: cuBLASLt has FP8 kernels for every problem scaled_gemm_tn accepts. Outer-
  // vector ones may lack an epilogue or output type (the caller falls back); say so if not even
  // the plain form exists.
  FALQON_CHECK(plan->found || key.outer_vec, "falqon: cuBLASLt has no FP8 GEMM algorithm for m=",
              key.m, " n=", key.n, " k=", key.k, " (", key.bias ? "with" : "without",
              " bias, alignments A ", key.align_a, " B ", key.align_b, " D ", key.align_d, ")");
  return plan;
}

// cuBLASLt's workspace for a plan: torch's own for the current stream where it is large enough
// (as torch's cuBLASLt calls take it; no allocation per call), else one from the caching
// allocator, kept alive by `owner` (so that CUDA-graph capture and stream semantics hold).
void* lt_workspace(size_t bytes, const at::Tensor& like, at::Tensor& owner) {
  if (bytes == 0) return nullptr;
  if (at::cuda::getCUDABlasLtWorkspaceSize() >= bytes) return at::cuda::getCUDABlasLtWorkspace();
  owner = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  return owner.data_ptr();
}

// ---- 16-bit GEMMs of the adapter mode (bf16/fp16 operands, fp32 accumulation) ---------------

// Everything a plan of lt_matmul depends on (zero-initialised, then filled: hashed as bytes).
struct LtKey {
  int device;
  int64_t m, n, k, lda, ldb, ldc, ldd;
  cudaDataType_t ab_type, cd_type;
  bool trans_a, trans_b, has_c;
  int align_a, align_b, align_c, align_d;

  bool operator==(const LtKey& o) const { return std::memcmp(this, &o, sizeof(LtKey)) == 0; }
};

struct LtPlan : GemmPlan {
  cublasLtMatrixLayout_t c = nullptr;
  ~LtPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

std::unique_ptr<LtPlan> make_lt_plan(const LtKey& key, cublasLtHandle_t handle,
                                     const at::Device& device) {
  auto plan = std::make_unique<LtPlan>();
  FALQON_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA,
           cublasOperation_t{key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N});
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB,
           cublasOperation_t{key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N});
  // Stored shapes (column-major): op(A) is m x k, op(B) is k x n.
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->a, key.ab_type, key.trans_a ? key.k : key.m,
                                                   key.trans_a ? key.m : key.k, key.lda));
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->b, key.ab_type, key.trans_b ? key.n : key.k,
                                                   key.trans_b ? key.k : key.n, key.ldb));
  FALQON_CUBLASLT_CHECK(
      cublasLtMatrixLayoutCreate(&plan->c, key.cd_type, key.m, key.n, key.has_c ? key.ldc : key.ldd));
  FALQON_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->d, key.cd_type, key.m, key.n, key.ldd));
  plan->found = find_algorithm(handle, *plan, plan->c,
                               {key.align_a, key.align_b, key.align_c, key.align_d}, device);
  return plan;
}

}  // namespace

bool matmul_16bit(const at::Tensor& a, bool a_k_major, const at::Tensor& b,
                  const std::optional<at::Tensor>& c, const at::Tensor& out, float alpha) {
  // Row-major out (n x m) = alpha * b (n x k) op(a) + c. In cuBLASLt's column-major terms that is
  // D (m x n) = alpha * op(A) B + C with A = a, B = b as stored: b row-major (n x k) is a
  // column-major k x n matrix (op N); a row-major (m x k) is column-major k x m (op T), and a
  // row-major (k x m) is column-major m x k (op N).
  FALQON_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.stride(1) == 1 &&
                  b.stride(1) == 1 && out.stride(1) == 1 && a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "falqon: matmul_16bit takes 2-D bf16/fp16 operands with contiguous rows");
  const int64_t n = b.size(0), k = b.size(1);
  const int64_t m = a_k_major ? a.size(1) : a.size(0);
  FALQON_CHECK((a_k_major ? a.size(0) : a.size(1)) == k && out.size(0) == n && out.size(1) == m,
              "falqon: matmul_16bit shapes do not match: a ", a.sizes(), ", b ", b.sizes(), ", out ",
              out.sizes());
  FALQON_CHECK(!c.has_value() || (c->dim() == 2 && c->size(0) == n && c->size(1) == m &&
                                  c->stride(1) == 1 && c->scalar_type() == out.scalar_type()),
              "falqon: matmul_16bit's C must be shaped and typed as its output");
  if (m == 0 || n == 0) return true;
  if (k == 0) {
    if (c.has_value()) {
      out.copy_(*c);
    } else {
      out.zero_();
    }
    return true;
  }
  const at::Device device = out.device();
  LtKey key;
  std::memset(&key, 0, sizeof(key));
  key.device = device.index();
  key.m = m;
  key.n = n;
  key.k = k;
  key.lda = row_stride(a);
  key.ldb = row_stride(b);
  key.ldc = c.has_value() ? row_stride(*c) : 0;
  key.ldd = row_stride(out);
  key.ab_type = cuda_dtype(a.scalar_type());
  key.cd_type = cuda_dtype(out.scalar_type());
  key.trans_a = !a_k_major;
  key.trans_b = false;
  key.has_c = c.has_value();
  key.align_a = pointer_alignment(a.const_data_ptr());
  key.align_b = pointer_alignment(b.const_data_ptr());
  key.align_c = c.has_value() ? pointer_alignment(c->const_data_ptr()) : 256;
  key.align_d = pointer_alignment(out.data_ptr());
  key.align_c = std::min(key.align_c, key.align_d);  // one preference covers both (see make_lt_plan)
  key.align_d = key.align_c;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  thread_local std::unordered_map<LtKey, std::unique_ptr<LtPlan>, BytewiseHash<LtKey>> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, make_lt_plan(key, handle, device)).first;
  LtPlan& plan = *it->second;
  if (!plan.found) return false;
  at::Tensor owner;
  void* workspace = lt_workspace(plan.workspace, out, owner);
  const float beta = c.has_value() ? 1.f : 0.f;
  const void* c_ptr = c.has_value() ? c->const_data_ptr() : out.data_ptr();
  FALQON_CUBLASLT_CHECK(cublasLtMatmul(handle, plan.desc, &alpha, a.const_data_ptr(), plan.a,
                                       b.const_data_ptr(), plan.b, &beta, c_ptr, plan.c,
                                       out.data_ptr(), plan.d, &plan.algo, workspace,
                                       plan.workspace, at::cuda::getCurrentCUDAStream()));
  return true;
}

bool fast_accum_forward() {
  static const bool value = env_flag("FALQON_FAST_ACCUM_FWD", true);
  return value;
}

// Fast accumulation in dgrad too: scripts/accum_error.py on an H100 measured its error at
// 2.0-2.8e-3 relative (1.7e-3 without, most of it the bf16 output's rounding) against 5.3e-2 from
// the gradient's own E5M2 rounding, which dgrad carries anyway; it saves 15 / 18 / 80 us at the
// LLaMA-7B shapes (M = 8192). benchmarks/NOTES.md has the table.
bool fast_accum_dgrad() {
  static const bool value = env_flag("FALQON_FAST_ACCUM_DGRAD", true);
  return value;
}

void scaled_gemm_tn(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                    const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                    const at::Tensor& out, bool fast_accum) {
  FALQON_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.stride(1) == 1 &&
                  b.stride(1) == 1 && a.stride(0) == a.size(1) && b.stride(0) == b.size(1),
              "falqon: scaled_gemm_tn takes contiguous (m, k) and (n, k) operands, got ", a.sizes(),
              " and ", b.sizes());
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  FALQON_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == m && out.stride(1) == 1 &&
                  out.stride(0) >= m,
              "falqon: scaled_gemm_tn writes a row-major (", n, ", ", m, ") output, got ",
              out.sizes(), " with strides ", out.strides());
  FALQON_CHECK(k % 16 == 0 && out.stride(0) % 16 == 0,
              "falqon: FP8 GEMMs need k and the output's leading dimension to be multiples of 16");
  // Per-tensor (one value each) or outer-vector (m values for a's rows, n for b's) scales.
  const bool outer_vec = a_scale.numel() != 1 || b_scale.numel() != 1;
  FALQON_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat &&
                  (!outer_vec || (a_scale.numel() == m && b_scale.numel() == n &&
                                  a_scale.is_contiguous() && b_scale.is_contiguous())),
              "falqon: the GEMM scales must be float32, a single value each or contiguous vectors "
              "of ", m, " and ", n, " values; got ", a_scale.numel(), " and ", b_scale.numel());
  FALQON_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->numel() == m && bias->is_contiguous() &&
                                    bias->scalar_type() == out.scalar_type() &&
                                    out.scalar_type() != at::kFloat),
              "falqon: the fused bias must be a contiguous vector of ", m, " values of the output "
              "dtype, and the output bf16 or fp16");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // cuBLASLt takes no empty reduction; the product is then zero (plus bias)
    out.zero_();
    if (bias.has_value()) out.add_(*bias);
    return;
  }
  const at::Device device = out.device();
  GemmKey key;
  std::memset(&key, 0, sizeof(key));  // padding bytes take part in hashing and comparing
  key.device = device.index();
  key.m = m;
  key.n = n;
  key.k = k;
  key.ldo = out.stride(0);
  key.a_type = cuda_dtype(a.scalar_type());
  key.b_type = cuda_dtype(b.scalar_type());
  key.d_type = cuda_dtype(out.scalar_type());
  key.bias = bias.has_value();
  key.fast_accum = fast_accum;
  key.outer_vec = outer_vec;
  key.align_a = pointer_alignment(a.const_data_ptr());
  key.align_b = pointer_alignment(b.const_data_ptr());
  key.align_d = pointer_alignment(out.data_ptr());
  key.align_bias = bias.has_value() ? pointer_alignment(bias->const_data_ptr()) : 0;

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const void* a_scale_ptr = a_scale.const_data_ptr();
  const void* b_scale_ptr = b_scale.const_data_ptr();
  const void* bias_ptr = bias.has_value() ? bias->const_data_ptr() : nullptr;
  // Per thread (autograd runs backward on its own threads): no locking, and the per-call pointer
  // attributes below never race with another call.
  thread_local std::unordered_map<GemmKey, std::unique_ptr<GemmPlan>, BytewiseHash<GemmKey>> plans;
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, make_plan(key, handle, a_scale_ptr, b_scale_ptr, bias_ptr, device)).first;
  }
  GemmPlan& plan = *it->second;
  if (!plan.found) {  // outer-vector scales only (make_plan refuses the rest)
    if (bias.has_value()) {  // without the fused bias, then the bias as torch's add
      scaled_gemm_tn(a, a_scale, b, b_scale, std::nullopt, out, fast_accum);
      out.add_(*bias);
      return;
    }
    // No outer-vector kernel for this output: unit scales, then the scales by rows and columns.
    const at::Tensor one = at::ones({}, a_scale.options());
    scaled_gemm_tn(a, one, b, one, std::nullopt, out, fast_accum);
    out.mul_(b_scale.view({n, 1})).mul_(a_scale.view({1, m}));
    return;
  }
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale_ptr);
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale_ptr);
  if (key.bias) set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr);

  at::Tensor owner;
  void* workspace = lt_workspace(plan.workspace, out, owner);
  const float alpha = 1.f, beta = 0.f;
  FALQON_CUBLASLT_CHECK(cublasLtMatmul(handle, plan.desc, &alpha, a.const_data_ptr(), plan.a,
                                       b.const_data_ptr(), plan.b, &beta, out.data_ptr(), plan.d,
                                       out.data_ptr(), plan.d, &plan.algo, workspace,
                                       plan.workspace, at::cuda::getCurrentCUDAStream()));
}

}  // namespace cuda
}  // namespace falqon
