// meld_init on the GPU: the FP8 quantisation error of W in one fused pass, the reference's
// randomized (or exact) SVD of it with ATen's CUDA GEMMs and cuSOLVER, and one fused
// quantisation of [W; A; 0].
//
// This op synchronises with the host (linalg_qr / linalg_svd check cuSOLVER's info on the host).
// It is initialisation, run once per layer before training, never in the training graph.
#include "common.cuh"

namespace falqon {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> meld_init_fp8(const at::Tensor& weight, int64_t rank,
                                                 const std::string& svd, int64_t oversample,
                                                 int64_t power_iters, int64_t seed,
                                                 double adapter_row_norm) {
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), r16 = padded_rank(rank);
  // One read of W for its amax, one read of W and one fp32 write for E = W - s0 fp8(W / s0).
  const at::Tensor w_partials = amax_partials(w);
  // The same factorisation code as the CPU reference (and the same sketch: ref::svd_sketch draws
  // it on the CPU from `seed`), so that CPU and GPU results can be compared.
  at::Tensor A = ref::low_rank_factor(quantization_error_with_partials(w, w_partials), rank, svd,
                                      oversample, power_iters, seed)
                     .to(at::kFloat);
  // The adapter mode's LoRA-sized A (capped at W's amax, so the scale below stays W's).
  A = ref::scale_adapter(A, w_partials.amax().view(at::kFloat), adapter_row_norm).contiguous();
  // One scale for [W; A; 0]: the max over the partial maxima of W and of A (the zero rows
  // change nothing), then each part cast straight into its rows of the melded weight.
  const at::Tensor partials = at::cat({w_partials, amax_partials(A)});
  at::Tensor melded = at::empty({N + r16, K}, w.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty({}, w.options().dtype(at::kFloat));
  cast_with_partials(w, partials, melded.narrow(0, 0, N), scale);
  cast_with_partials(A, partials, melded.narrow(0, N, rank), scale);
  melded.narrow(0, N + rank, r16 - rank).view(at::kByte).zero_();
  return {melded, scale};
}

}  // namespace cuda
}  // namespace falqon
