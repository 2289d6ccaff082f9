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

// The adapter mode's y = y_base + scaling * xa B^T (ref::adapter_output's numerics) as a new
// contiguous (M, N) tensor, so the adapter costs one read and one write of y (and y leaves the op
// contiguous): on Hopper adapter_y's pass (adapter_y.cu), elsewhere one cuBLASLt GEMM that reads
// the strided y_base as its C and writes y.
// b: lora_B in y_base's dtype (N, r), for 16-bit activations (undefined for fp32 ones).
at::Tensor adapter_output_fp8(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b,
                              const at::Tensor& lora_B, double scaling) {
  if (y_base.scalar_type() != at::kFloat) {
    if (adapter_y_applies(y_base, xa, b)) return adapter_y(y_base, xa, b, scaling);
    at::Tensor y = at::empty(y_base.sizes(), y_base.options());
    if (matmul_16bit(b, /*a_is_k_by_m=*/false, xa, y_base, y, static_cast<float>(scaling))) {
      return y;
    }
  }
  return ref::adapter_output(y_base, xa, lora_B, scaling);  // fp32 activations: ATen's GEMM
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_fp8(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& amax_history, bool adapter, double scaling,
    const std::optional<at::Tensor>& input_fp8, const std::optional<at::Tensor>& input_scale) {
  const int64_t N = lora_B.size(0), r = lora_B.size(1), weight_rows = weight.size(0),
                K = weight.size(1);
  const at::Tensor x = input.reshape({-1, K});
  // x's quantisation: the caller's (per tensor, or per row: quantize_rows, which MeldedLinear
  // makes in the adapter mode on Hopper), or made here per tensor. A caller's: the amax of x is
  // then s_x * 448, without a pass over x.
  const bool per_row = input_fp8.has_value() && per_row_scale(input, *input_scale);
  const std::vector<int64_t> scale_shape = per_row ? std::vector<int64_t>{x.size(0)}
                                                : std::vector<int64_t>{};
  // Row scales of x go with outer-vector scaling of the GEMM, which takes a vector on both sides:
  // W''s one scale repeated over its rows (made in one launch with x's amax).
  at::Tensor xq, sx, x_amax, w_scale = weight_scale;
  if (input_fp8.has_value()) {
    xq = input_fp8->reshape({-1, K}).contiguous();
    sx = input_scale->reshape(scale_shape).contiguous();
    std::tie(w_scale, x_amax) = given_scales(weight_scale, weight_rows, per_row, sx);
  } else {
    std::tie(xq, sx, x_amax) =
        amax_history.has_value()
            ? quantize_delayed_fp8(x, at::kFloat8_e4m3fn, amax_history->select(0, 0))
            : quantize_fp8(x, at::kFloat8_e4m3fn);
  }
  const std::vector<int64_t> amax_shape =
      per_row ? std::vector<int64_t>(input.sizes().begin(), input.sizes().end() - 1) : scale_shape;
  at::Tensor product = at::empty({x.size(0), weight_rows}, input.options());
  const bool fp32_out = input.scalar_type() == at::kFloat;
  std::optional<at::Tensor> fused_bias;
  if (bias.has_value() && !fp32_out) {
    // The epilogue adds the bias in fp32 before the cast, like the reference, but takes it in the
    // output dtype (a bias of another dtype is rounded to it first) and over all N + r16 rows of
    // D: zeros for the adapter's columns.
    fused_bias = at::constant_pad_nd(bias->to(input.scalar_type()), {0, weight_rows - N}, 0);
  }
  scaled_gemm_tn(weight, w_scale, xq, sx, fused_bias, product, fast_accum_forward());
  if (bias.has_value() && fp32_out) {
    // cuBLASLt's FP8 kernels take no bias with an fp32 output. Adding it to the fp32 product is
    // the reference's order exactly (scaled product rounded to fp32, then + bias).
    product.narrow(1, 0, N).add_(bias->to(at::kFloat));
  }
  // B in the activation dtype only where the adapter's 16-bit GEMM takes it (fp32 activations
  // go through the reference's formula with lora_B itself).
  const bool b_16bit = adapter && !fp32_out;
  const auto [xa, b] =
      product_operands(product, N, r, b_16bit ? std::optional<at::Tensor>(lora_B) : std::nullopt);
  if (adapter) {
    return {adapter_output_fp8(product.narrow(1, 0, N), xa, b, lora_B, scaling)
                .view(leading_dims_and(input, N)),
            xa.view(leading_dims_and(input, r)), x_amax.view(amax_shape)};
  }
  product = product.view(leading_dims_and(input, weight_rows));
  return {product.narrow(-1, 0, N), xa.view(leading_dims_and(input, r)), x_amax.view(amax_shape)};
}

std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input_fp8(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
    const std::optional<at::Tensor>& amax_history, const std::optional<at::Tensor>& lora_B,
    double scaling) {
  const int64_t N = grad_output.size(-1);
  at::Tensor g = grad_output.reshape({-1, N});
  // The adapter mode without dB (or with fp32 activations): the operand [g | scaling g B | 0]
  // written out in fp32 and quantised as one tensor. melded_linear_backward_fp8 builds it without
  // the copy when dB is wanted too.
  if (lora_B.has_value()) g = ref::adapter_grad_operand(g, *lora_B, scaling, weight.size(0));
  const auto [gq, sg, g_amax] = amax_history.has_value()
                                    ? quantize_delayed_fp8(g, grad_dtype, *amax_history)
                                    : quantize_fp8(g, grad_dtype);
  return {dgrad_fp8(grad_output, gq, sg, weight, weight_scale, weight_t), g_amax};
}

at::Tensor dgrad_fp8(const at::Tensor& grad_output, const at::Tensor& gq, const at::Tensor& sg,
                     const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& weight_t) {
  const int64_t C = gq.size(-1), K = weight.size(1);
  // cuBLASLt's FP8 GEMMs take only the "TN" layout, so dx = g W_q needs W_q^T with a contiguous
  // C: the persistent copy when the layer keeps one, else a transpose of rows [0, C) now.
  const at::Tensor wt = weight_t.has_value() ? *weight_t : transpose_fp8(weight.narrow(0, 0, C));
  at::Tensor dx = at::empty({gq.numel() / C, K}, grad_output.options());
  scaled_gemm_tn(wt, weight_scale, gq.reshape({-1, C}), sg, std::nullopt, dx, fast_accum_dgrad());
  return dx.view(leading_dims_and(grad_output, K));
}

}  // namespace cuda
}  // namespace falqon
