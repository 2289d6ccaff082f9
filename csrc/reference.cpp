// Reference numerics of every falqon op, written with ATen ops only so that it runs on any device.
// It is the CPU kernel and the emulated path on GPUs without FP8, and the CUDA kernels are tested
// against it. FP8 is emulated by real casts to torch.float8_e4m3fn / float8_e5m2 (round to
// nearest even), after a clamp to the format's largest finite value (saturation).
#include <limits>

#include <c10/util/accumulate.h>

#include "falqon.h"

#include <ATen/core/Generator.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/CPUGeneratorImpl.h>

#include <vector>

namespace falqon {
namespace ref {

namespace {

std::vector<int64_t> leading_dims(const at::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - 1);
}

std::vector<int64_t> with_last(std::vector<int64_t> dims, int64_t last) {
  dims.push_back(last);
  return dims;
}

// Row gather/scatter on FP8 tensors through a byte view: ATen's index kernels do not all take
// float8 dtypes on every device, and a byte copy is exactly what they would do.
at::Tensor fp8_index_select(const at::Tensor& t, int64_t dim, const at::Tensor& idx) {
  return t.view(at::kByte).index_select(dim, idx).view(t.scalar_type());
}

void fp8_index_copy_(const at::Tensor& t, int64_t dim, const at::Tensor& idx, const at::Tensor& src) {
  t.view(at::kByte).index_copy_(dim, idx, src.view(at::kByte));
}

// amax of |x| over a float tensor; 0 for an empty one. NaN propagates.
at::Tensor amax_of(const at::Tensor& x) {
  return x.numel() ? x.abs().amax() : at::zeros({}, x.options());
}

// The per-tensor scale for a given amax: amax / fmax, 1 where that is 0.
at::Tensor scale_from_amax(const at::Tensor& amax, double fmax) {
  // Divide by a device scalar: with a host double, ATen's CUDA kernels multiply by the
  // reciprocal instead, which can round differently from the CPU's true division.
  at::Tensor scale = amax / at::scalar_tensor(fmax, amax.options());
  // amax == 0 (or so small that amax / fmax underflows): scale 1 keeps q = 0 and everything
  // finite. A NaN or Inf amax is left as it is so that non-finite inputs stay visible.
  return at::where(scale == 0, at::ones_like(scale), scale);
}

// q = fp8(clamp(x / scale, -fmax, fmax)) for a contiguous float32 x: the one cast of every
// quantiser (current and delayed scaling). x / scale is x times the reciprocal rounded once to
// fp32 (one multiply per element on the GPU), capped at FLT_MAX so that a subnormal scale
// saturates instead of giving 0 * Inf = NaN.
at::Tensor cast_at_scale(const at::Tensor& x, const at::Tensor& scale, at::ScalarType dtype) {
  const double fmax = fp8_max(dtype);
  at::Tensor inv = at::reciprocal(scale);
  inv = at::where(inv > std::numeric_limits<float>::max(),
                  at::full_like(inv, std::numeric_limits<float>::max()), inv);
  return (x * inv).clamp(-fmax, fmax).to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_with_amax(const at::Tensor& input,
                                                                  at::ScalarType dtype) {
  check_quantize_args(input, dtype);
  const at::Tensor x = input.to(at::kFloat).contiguous();
  at::Tensor amax = amax_of(x);
  at::Tensor scale = scale_from_amax(amax, fp8_max(dtype));
  return {cast_at_scale(x, scale, dtype).view(input.sizes()), scale, amax};
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& input, at::ScalarType dtype) {
  auto [q, scale, amax] = quantize_with_amax(input, dtype);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_with_amax(const at::Tensor& input,
                                                                       at::ScalarType dtype) {
  check_quantize_args(input, dtype);
  FALQON_CHECK(input.dim() >= 1, "falqon.quantize_rows: the input needs a last dimension");
  const std::vector<int64_t> lead = leading_dims(input);
  const int64_t K = input.size(-1), M = c10::multiply_integers(lead);
  const at::Tensor x = input.to(at::kFloat).contiguous().reshape({M, K});
  // amax over each row (NaN propagates); an empty row has amax 0, so scale 1.
  const at::Tensor amax =
      K == 0 ? at::zeros({M, 1}, x.options()) : x.abs().amax(1, /*keepdim=*/true);
  const at::Tensor scale = scale_from_amax(amax, fp8_max(dtype));
  return {cast_at_scale(x, scale, dtype).view(input.sizes()), scale.view(lead), amax.view(lead)};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& input, at::ScalarType dtype) {
  auto [q, scale, amax] = quantize_rows_with_amax(input, dtype);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_delayed(const at::Tensor& input,
                                                                at::ScalarType dtype,
                                                                const at::Tensor& amax_history) {
  check_quantize_args(input, dtype);
  check_amax_history("quantize_delayed", input, amax_history);
  const at::Tensor x = input.to(at::kFloat).contiguous();
  at::Tensor amax = amax_of(x);
  // An empty (all-zero) history, or one holding a NaN or Inf (record_amax_ never writes one, a
  // user may have), has nothing usable: then the input's own amax is used (the first call equals
  // current scaling). max() propagates a NaN, so one test covers both.
  const at::Tensor recorded = amax_history.max();
  const at::Tensor used = at::where(recorded > 0 & recorded.isfinite(), recorded, amax);
  at::Tensor scale = scale_from_amax(used, fp8_max(dtype));
  return {cast_at_scale(x, scale, dtype).view(input.sizes()), scale, amax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> /*grad_dtype*/, const std::optional<at::Tensor>& amax_history,
    bool adapter, const std::optional<at::Tensor>& input_fp8,
    const std::optional<at::Tensor>& input_scale) {
  check_melded_linear_args(input, weight, weight_scale, lora_B, bias, weight_t, adapter, scaling);
  check_layer_amax_history(input, amax_history);
  check_input_quantization(input, input_fp8, input_scale, amax_history);
  const int64_t N = lora_B.size(0), r = lora_B.size(1), rows = weight.size(0), K = weight.size(1);
  const at::Tensor x = input.reshape({-1, K});
  // x's quantisation: the caller's (shared by layers that read the same x; per tensor or per
  // row), or made here per tensor. sx is (M, 1) or 0-d.
  const bool per_row = input_fp8.has_value() && per_row_scale(input, *input_scale);
  auto [xq, sx, x_amax] =
      input_fp8.has_value()
          ? std::make_tuple(*input_fp8, *input_scale, *input_scale * fp8_max(at::kFloat8_e4m3fn))
      : amax_history.has_value()
          ? quantize_delayed(x, at::kFloat8_e4m3fn, amax_history->select(0, 0))
          : quantize_with_amax(x, at::kFloat8_e4m3fn);
  xq = xq.reshape({-1, K});
  sx = per_row ? sx.reshape({-1, 1}) : sx.reshape({});
  x_amax = per_row ? x_amax.reshape(leading_dims(input)) : x_amax.reshape({});
  // One product against all of W' = [W; A; 0]: columns [0, N) are y, [N, N + r) are x A^T.
  at::Tensor acc = at::mm(xq.to(at::kFloat), weight.to(at::kFloat).t());
  acc.mul_(sx * weight_scale.reshape({}));
  if (bias.has_value()) acc.narrow(1, 0, N).add_(bias->to(at::kFloat));
  at::Tensor out = acc.to(input.scalar_type());
  if (adapter) {
    const at::Tensor xa = out.narrow(1, N, r);
    const at::Tensor y = adapter_output(out.narrow(1, 0, N), xa, lora_B, scaling);
    return {y.view(with_last(leading_dims(input), N)),
            xa.contiguous().view(with_last(leading_dims(input), r)), x_amax};
  }
  out = out.view(with_last(leading_dims(input), rows));
  return {out.narrow(-1, 0, N), out.narrow(-1, N, r).contiguous(), x_amax};
}

at::Tensor adapter_output(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& lora_B,
                          double scaling) {
  const at::ScalarType dtype = y_base.scalar_type();
  const at::Tensor b = lora_B.to(dtype).to(at::kFloat);
  return at::addmm(y_base.to(at::kFloat), xa.to(at::kFloat), b.t(), /*beta=*/1, /*alpha=*/scaling)
      .to(dtype);
}

at::Tensor adapter_grad_operand(const at::Tensor& g, const at::Tensor& lora_B, double scaling,
                                int64_t rows) {
  const int64_t M = g.size(0), N = g.size(1), r = lora_B.size(1);
  const at::Tensor gf = g.to(at::kFloat);
  at::Tensor u = at::mm(gf, lora_B.to(g.scalar_type()).to(at::kFloat));
  u.mul_(static_cast<float>(scaling));
  return at::cat({gf, u, at::zeros({M, rows - N - r}, gf.options())}, 1);
}

std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, std::optional<at::ScalarType> grad_dtype,
    const std::optional<at::Tensor>& amax_history, const std::optional<at::Tensor>& lora_B,
    double scaling, std::optional<int64_t> rank) {
  const at::ScalarType gdt = grad_dtype_or_default(grad_dtype);
  const int64_t N = grad_output.dim() ? grad_output.size(-1) : 0;
  check_grad_input_args(grad_output, weight, weight_scale, N, weight_t, gdt, lora_B, scaling, rank);
  if (amax_history.has_value()) {
    check_amax_history("melded_linear_grad_input", grad_output, *amax_history);
  }
  const int64_t K = weight.size(1);
  at::Tensor g = grad_output.reshape({-1, N});
  // The adapter mode: one operand [g | scaling g B | 0] against every row of W'.
  if (lora_B.has_value()) g = adapter_grad_operand(g, *lora_B, scaling, weight.size(0));
  auto [gq, sg, g_amax] = amax_history.has_value() ? quantize_delayed(g, gdt, *amax_history)
                                                   : quantize_with_amax(g, gdt);
  const at::Tensor w = weight_t.has_value() ? weight_t->t() : weight.narrow(0, 0, g.size(1));
  at::Tensor dx = at::mm(gq.to(at::kFloat), w.to(at::kFloat));
  dx.mul_(sg * weight_scale.reshape({}));
  return {dx.to(grad_output.scalar_type()).view(with_last(leading_dims(grad_output), K)), g_amax};
}

void record_amax_(at::Tensor& amax_history, const at::Tensor& amax) {
  check_record_amax_args(amax_history, amax);
  const int64_t H = amax_history.numel();
  const at::Tensor a = amax.reshape({1}).to(at::kFloat);
  const at::Tensor shifted = at::cat({a, amax_history.narrow(0, 0, H - 1)});
  // A NaN or Inf amax is not recorded: decided on the device, no host synchronisation.
  amax_history.copy_(at::where(a.isfinite(), shifted, amax_history));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> grad_dtype, const std::optional<at::Tensor>& amax_history,
    std::optional<at::ScalarType> grad_B_dtype, const std::optional<at::Tensor>& lora_B) {
  const at::ScalarType bdt = grad_B_dtype.value_or(xa.scalar_type());
  check_backward_args(grad_output, xa, weight, weight_scale, weight_t,
                      grad_dtype_or_default(grad_dtype), bdt, lora_B, scaling);
  if (amax_history.has_value()) {
    check_amax_history("melded_linear_backward", grad_output, *amax_history);
  }
  // dx through the dispatcher, so that profiles (benchmarks/profile_step.py) see it as the
  // grad_input op it is.
  static const auto grad_input_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("falqon::melded_linear_grad_input", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, std::optional<at::ScalarType>,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
              std::optional<int64_t>)>();
  auto [dx, g_amax] = grad_input_op.call(grad_output, weight, weight_scale, weight_t, grad_dtype,
                                         amax_history, lora_B, scaling, xa.size(-1));
  const int64_t N = grad_output.size(-1), r = xa.size(-1);
  return {dx, lora_grad_B(grad_output.reshape({-1, N}), xa.reshape({-1, r}), scaling, bdt), g_amax};
}

at::Tensor lora_grad_B(const at::Tensor& g, const at::Tensor& xa, double scaling,
                       at::ScalarType dtype) {
  // fp32 products of fp16/bf16 values are exact; the sums are fp32, then one rounding.
  at::Tensor dB = at::mm(g.to(at::kFloat).t(), xa.to(at::kFloat));
  dB.mul_(static_cast<float>(scaling));
  return dB.to(dtype);
}

at::Tensor quantization_error(const at::Tensor& weight) {
  const at::Tensor w = weight.to(at::kFloat);
  auto [q, s] = quantize(w, at::kFloat8_e4m3fn);
  return w - q.to(at::kFloat) * s;
}

at::Tensor svd_sketch(int64_t cols, int64_t width, int64_t seed, const at::Device& device) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  return at::randn({cols, width}, gen, at::TensorOptions().dtype(at::kFloat)).to(device);
}

at::Tensor low_rank_factor(const at::Tensor& error, int64_t rank, const std::string& svd,
                           int64_t oversample, int64_t power_iters, int64_t seed) {
  at::Tensor S, Vh;
  if (svd == "exact") {
    // In float64: fp32 solvers (LAPACK's gesdd, cuSOLVER's) disagree by more than an FP8 step on
    // rows whose singular values are close; float64 makes "exact" the same on every device.
    std::tie(std::ignore, S, Vh) = at::linalg_svd(error.to(at::kDouble), /*full_matrices=*/false);
    S = S.to(at::kFloat);
    Vh = Vh.to(at::kFloat);
  } else {
    // Randomized range finder with power iterations (Halko, Martinsson, Tropp 2011, alg. 4.4):
    // the quantisation error has a flat spectrum, so the power iterations matter more than the
    // oversampling. Each pass re-orthonormalises to keep the small singular values.
    const int64_t width = std::min(rank + oversample, std::min(error.size(0), error.size(1)));
    const at::Tensor omega = svd_sketch(error.size(1), width, seed, error.device());
    at::Tensor Q = std::get<0>(at::linalg_qr(at::mm(error, omega)));
    for (int64_t i = 0; i < power_iters; ++i) {
      const at::Tensor Z = std::get<0>(at::linalg_qr(at::mm(error.t(), Q)));
      Q = std::get<0>(at::linalg_qr(at::mm(error, Z)));
    }
    std::tie(std::ignore, S, Vh) = at::linalg_svd(at::mm(Q.t(), error), /*full_matrices=*/false);
  }
  S = S.narrow(0, 0, rank);
  Vh = Vh.narrow(0, 0, rank);
  const at::Tensor pivot = Vh.gather(1, Vh.abs().argmax(1, /*keepdim=*/true));
  const at::Tensor sign = at::where(pivot < 0, -at::ones_like(pivot), at::ones_like(pivot));
  return S.sqrt().unsqueeze(1) * Vh * sign;
}

std::tuple<at::Tensor, at::Tensor> stack_and_quantize(const at::Tensor& weight, const at::Tensor& A) {
  const int64_t r = A.size(0), K = weight.size(1);
  const at::Tensor pad = at::zeros({padded_rank(r) - r, K}, weight.options().dtype(at::kFloat));
  return quantize(at::cat({weight.to(at::kFloat), A.to(at::kFloat), pad}, 0), at::kFloat8_e4m3fn);
}

at::Tensor scale_adapter(const at::Tensor& A, const at::Tensor& weight_amax, double row_norm) {
  if (row_norm <= 0) return A;
  const at::Tensor a = A.to(at::kFloat);
  const at::Tensor rms = a.square().sum(1).mean().sqrt();
  const at::Tensor a_amax = a.abs().amax();
  // Both limits as fp32 device scalars; a zero A (a weight FP8 represents exactly) stays zero.
  at::Tensor factor = at::minimum(at::scalar_tensor(row_norm, rms.options()) / rms,
                                  weight_amax.to(at::kFloat).reshape({}) / a_amax);
  factor = at::where(at::isfinite(factor), factor, at::ones_like(factor));
  // The product can round one ulp above amax(W): clamp, so that W' keeps exactly W's scale.
  const at::Tensor cap = weight_amax.to(at::kFloat).reshape({});
  return at::minimum(at::maximum(a * factor, -cap), cap);
}

std::tuple<at::Tensor, at::Tensor> meld_init(const at::Tensor& weight, int64_t rank,
                                             const std::string& svd, int64_t oversample,
                                             int64_t power_iters, int64_t seed,
                                             double adapter_row_norm) {
  check_meld_init_args(weight, rank, svd, oversample, power_iters, adapter_row_norm);
  at::Tensor A =
      low_rank_factor(quantization_error(weight), rank, svd, oversample, power_iters, seed);
  A = scale_adapter(A, amax_of(weight.to(at::kFloat)), adapter_row_norm);
  return stack_and_quantize(weight, A);
}

at::Tensor topk_row_scores(const at::Tensor& lora_B) {
  const at::Tensor abs_B = lora_B.to(at::kFloat).abs();
  at::Tensor scores = at::zeros({lora_B.size(0)}, abs_B.options());
  // One column at a time: every element's add is one IEEE fp32 rounding, the same on any device.
  for (int64_t j = 0; j < abs_B.size(1); ++j) scores.add_(abs_B.select(1, j));
  return scores;
}

at::Tensor topk_rows(const at::Tensor& scores, int64_t k) {
  // A stable descending sort ranks NaN first and keeps equal scores in row order: exactly the
  // order documented in falqon.h (at::topk leaves ties to its implementation, and on the CPU it
  // does not pick the lower indices).
  const at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0,
                                                /*descending=*/true));
  return order.narrow(0, 0, k);
}

namespace {

// topk_update_ of one layer; ok (a 0-d bool on the device, optional): where false the weights
// stay as they were and lora_B is zeroed whatever the policy (no host synchronisation).
void topk_update_one(const at::Tensor& weight, const at::Tensor& lora_B,
                     const std::optional<at::Tensor>& weight_t, int64_t k, double scaling,
                     bool keep_residual, const std::optional<at::Tensor>& ok) {
  const int64_t N = lora_B.size(0), r = lora_B.size(1);
  k = std::min(k, N);
  if (k > 0) {
    const double fmax = fp8_max(at::kFloat8_e4m3fn);
    const at::Tensor idx = topk_rows(topk_row_scores(lora_B), k);
    const at::Tensor B_rows = lora_B.index_select(0, idx).to(at::kFloat);  // k x r
    const at::Tensor A_q = weight.narrow(0, N, r).to(at::kFloat);            // r x K, scaled domain
    const at::Tensor rows = fp8_index_select(weight, 0, idx).to(at::kFloat);  // k x K
    // W'[T] / s + scaling * B[T] A_q, saturated to the E4M3 range; a NaN update leaves the row
    // as it was (the step that produced it carried no usable information).
    const at::Tensor updated = rows + at::mm(B_rows, A_q) * scaling;
    at::Tensor value = at::where(updated.isnan(), rows, updated.clamp(-fmax, fmax));
    if (ok.has_value()) value = at::where(*ok, value, rows);
    const at::Tensor q = value.to(at::kFloat8_e4m3fn);
    fp8_index_copy_(weight, 0, idx, q);
    if (weight_t.has_value()) fp8_index_copy_(*weight_t, 1, idx, q.t().contiguous());
    if (keep_residual) lora_B.index_fill_(0, idx, 0);
  }
  if (!keep_residual) lora_B.zero_();
  if (ok.has_value()) lora_B.masked_fill_(ok->logical_not(), 0);
}

}  // namespace

void topk_update_(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                  int64_t k, double scaling, bool keep_residual) {
  check_topk_update_args(weight, lora_B, weight_t, k, scaling);
  topk_update_one(weight, lora_B, weight_t, k, scaling, keep_residual, std::nullopt);
}

at::Tensor topk_update_many_(at::TensorList weights, at::TensorList lora_Bs,
                             at::TensorList weight_ts, at::IntArrayRef weight_t_layers,
                             at::IntArrayRef ks, at::ArrayRef<double> scalings,
                             const c10::List<bool>& keep_residuals, bool discard_nonfinite) {
  check_topk_update_many_args(weights, lora_Bs, weight_ts, weight_t_layers, ks, scalings,
                              keep_residuals);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> finite(L);
  for (int64_t i = 0; i < L; ++i) finite[i] = at::isfinite(lora_Bs[i]).all();
  at::Tensor all_finite = at::stack(finite);
  std::optional<at::Tensor> ok;
  if (discard_nonfinite) ok = all_finite.all();
  const std::vector<std::optional<at::Tensor>> wt = weight_t_by_layer(L, weight_ts, weight_t_layers);
  for (int64_t i = 0; i < L; ++i) {
    topk_update_one(weights[i], lora_Bs[i], wt[i], ks[i], scalings[i], keep_residuals.get(i), ok);
  }
  return all_finite;
}

}  // namespace ref
}  // namespace falqon
