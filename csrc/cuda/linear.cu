// The melded layer on the FP8 path: forward (quantise x, one FP8 GEMM against W' = [W; A; 0]
// with the bias in the epilogue) and the input gradient (quantise g, one FP8 GEMM against W^T).
#include <vector>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

std::vector<int64_t> leading_dims_and(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> dims(t.sizes().begin(), t.sizes().end() - 1);
  dims.push_back(last);
  return dims;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_fp8(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& amax_history) {
  const int64_t N = lora_B.size(0), r = lora_B.size(1), rows = weight.size(0), K = weight.size(1);
  const at::Tensor x = input.reshape({-1, K});
  const auto [xq, sx, x_amax] =
      amax_history.has_value()
          ? quantize_delayed_fp8(x, at::kFloat8_e4m3fn, amax_history->select(0, 0))
          : quantize_fp8(x, at::kFloat8_e4m3fn);
  at::Tensor product = at::empty({x.size(0), rows}, input.options());
  const bool fp32_out = input.scalar_type() == at::kFloat;
  std::optional<at::Tensor> fused_bias;
  if (bias.has_value() && !fp32_out) {
    // The epilogue adds the bias in fp32 before the cast, like the reference, but takes it in the
    // output dtype (a bias of another dtype is rounded to it first) and over all N + r16 rows of
    // D: zeros for the adapter's columns.
    fused_bias = at::constant_pad_nd(bias->to(input.scalar_type()), {0, rows - N}, 0);
  }
  scaled_gemm_tn(weight, weight_scale, xq, sx, fused_bias, product, fast_accum_forward());
  if (bias.has_value() && fp32_out) {
    // cuBLASLt's FP8 kernels take no bias with an fp32 output. Adding it to the fp32 product is
    // the reference's order exactly (scaled product rounded to fp32, then + bias).
    product.narrow(1, 0, N).add_(bias->to(at::kFloat));
  }
  product = product.view(leading_dims_and(input, rows));
  return {product.narrow(-1, 0, N), product.narrow(-1, N, r).contiguous(), x_amax};
}

std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input_fp8(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
    const std::optional<at::Tensor>& amax_history) {
  const int64_t N = grad_output.size(-1);
  const at::Tensor g = grad_output.reshape({-1, N});
  const auto [gq, sg, g_amax] = amax_history.has_value()
                                    ? quantize_delayed_fp8(g, grad_dtype, *amax_history)
                                    : quantize_fp8(g, grad_dtype);
  return {dgrad_fp8(grad_output, gq, sg, weight, weight_scale, weight_t), g_amax};
}

at::Tensor dgrad_fp8(const at::Tensor& grad_output, const at::Tensor& gq, const at::Tensor& sg,
                     const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& weight_t) {
  const int64_t N = grad_output.size(-1), K = weight.size(1);
  // cuBLASLt's FP8 GEMMs take only the "TN" layout, so dx = g W_q needs W_q^T with a contiguous
  // N: the persistent copy when the layer keeps one, else a transpose of rows [0, N) now.
  const at::Tensor wt = weight_t.has_value() ? *weight_t : transpose_fp8(weight.narrow(0, 0, N));
  at::Tensor dx = at::empty({gq.numel() / N, K}, grad_output.options());
  scaled_gemm_tn(wt, weight_scale, gq.reshape({-1, N}), sg, std::nullopt, dx, fast_accum_dgrad());
  return dx.view(leading_dims_and(grad_output, K));
}

}  // namespace cuda
}  // namespace falqon
