// The proxy update on the device: row scores, top-k selection, the update of the selected FP8
// rows (and of their columns in weight_t), and the reset of lora_B, with no host
// synchronisation (at::topk on CUDA does not synchronise).
#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kUpdateThreads = 256;

// For each selected row t = rows[s] and column c:
//   v = float(W'[t, c]) + (sum_j B[t, j] * float(A_q[j, c])) * scaling
// in fp32, the product and the sum rounded separately as the reference's
// rows + mm(B_rows, A_q) * scaling; a NaN v keeps the old value; then clamp and a saturating
// round-to-nearest-even cast. One thread per column; B's row is read by every thread of the
// block at the same address (a broadcast), A_q's rows are read coalesced.
template <typename BT>
__global__ void __launch_bounds__(kUpdateThreads)
    topk_update_kernel(uint8_t* __restrict__ weight, int64_t N, int64_t K, int64_t r,
                       const BT* __restrict__ lora_B, const int64_t* __restrict__ rows, int64_t k,
                       float scaling, uint8_t* __restrict__ weight_t) {
  const uint8_t* A = weight + N * K;  // the adapter's rows [N, N + r), never written here
  for (int64_t s = blockIdx.y; s < k; s += gridDim.y) {
    const int64_t t = rows[s];
    const BT* b = lora_B + t * r;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < K;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) {
        acc = fmaf(static_cast<float>(b[j]), fp8_to_float(A[j * K + c], __NV_E4M3), acc);
      }
      const float old = fp8_to_float(weight[t * K + c], __NV_E4M3);
      const float v = __fadd_rn(old, __fmul_rn(acc, scaling));
      const uint8_t q = float_to_fp8<true>(isnan(v) ? old : v);
      weight[t * K + c] = q;
      if (weight_t != nullptr) weight_t[c * N + t] = q;
    }
  }
}

}  // namespace

void topk_update_fp8(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                     int64_t k, double scaling, bool keep_residual) {
  const int64_t N = lora_B.size(0), r = lora_B.size(1), K = weight.size(1);
  k = std::min(k, N);
  if (k == 0) {
    if (!keep_residual) lora_B.zero_();
    return;
  }
  const at::Tensor scores = lora_B.to(at::kFloat).abs().sum(1);
  const at::Tensor idx = std::get<1>(at::topk(scores, k, 0, /*largest=*/true, /*sorted=*/false));
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((K + kUpdateThreads - 1) / kUpdateThreads, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(k, 65535)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* w = static_cast<uint8_t*>(weight.data_ptr());
  auto* wt = weight_t.has_value() ? static_cast<uint8_t*>(weight_t->data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lora_B.scalar_type(), "falqon_topk_update", [&] {
    topk_update_kernel<scalar_t><<<grid, kUpdateThreads, 0, stream>>>(
        w, N, K, r, lora_B.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), k,
        static_cast<float>(scaling), wt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // After the kernel on the same stream: B's selected rows have been read.
  if (keep_residual) {
    lora_B.index_fill_(0, idx, 0);
  } else {
    lora_B.zero_();
  }
}

}  // namespace cuda
}  // namespace falqon
