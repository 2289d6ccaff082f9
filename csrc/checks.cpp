// Argument checks shared by the CPU reference and the CUDA kernels, so that a bad call fails
// with the same message whatever the device.
#include "falqon.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace falqon {

namespace {

bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

bool is_activation_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  FALQON_CHECK(t.device() == ref.device(), "falqon.", op, ": ", name, " is on ", t.device(),
              " but the weight is on ", ref.device());
}

void check_lora_B(const char* op, const at::Tensor& lora_B) {
  FALQON_CHECK(lora_B.dim() == 2 && lora_B.size(1) >= 1,
              "falqon.", op, ": lora_B must be (out_features, rank), got ", lora_B.sizes());
  FALQON_CHECK(is_activation_dtype(lora_B.scalar_type()), "falqon.", op,
              ": lora_B must be float32, float16 or bfloat16, got ", lora_B.scalar_type());
}

}  // namespace

double fp8_max(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat8_e4m3fn:
      return 448.0;
    case at::kFloat8_e5m2:
      return 57344.0;
    default:
      FALQON_CHECK(false, "falqon: expected torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype);
  }
}

void check_quantize_args(const at::Tensor& input, at::ScalarType dtype) {
  FALQON_CHECK(is_fp8(dtype), "falqon.quantize: dtype must be torch.float8_e4m3fn or "
              "torch.float8_e5m2, got ", dtype);
  FALQON_CHECK(is_activation_dtype(input.scalar_type()),
              "falqon.quantize: input must be float32, float16 or bfloat16, got ",
              input.scalar_type());
}

void check_amax_history(const char* op, const at::Tensor& input, const at::Tensor& amax_history) {
  FALQON_CHECK(amax_history.scalar_type() == at::kFloat && amax_history.numel() >= 1,
              "falqon.", op, ": amax_history must be a float32 tensor of at least one value, got ",
              amax_history.numel(), " values of ", amax_history.scalar_type());
  FALQON_CHECK(amax_history.device() == input.device(), "falqon.", op, ": amax_history is on ",
              amax_history.device(), " but the input is on ", input.device());
}

void check_layer_amax_history(const at::Tensor& input,
                              const std::optional<at::Tensor>& amax_history) {
  if (!amax_history.has_value()) return;
  const at::Tensor& h = *amax_history;
  FALQON_CHECK(h.dim() == 2 && h.size(0) == 2 && h.size(1) >= 1,
              "falqon.melded_linear: amax_history must be (2, H) with H >= 1 (row 0 for the "
              "input, row 1 for the gradient), got ", h.sizes());
  check_amax_history("melded_linear", input, h);
}

bool per_row_scale(const at::Tensor& input, const at::Tensor& input_scale) {
  return input.dim() >= 1 && input_scale.dim() >= 1 &&
         input_scale.sizes() == input.sizes().slice(0, input.dim() - 1);
}

void check_input_quantization(const at::Tensor& input, const std::optional<at::Tensor>& input_fp8,
                              const std::optional<at::Tensor>& input_scale,
                              const std::optional<at::Tensor>& amax_history) {
  if (!input_fp8.has_value() && !input_scale.has_value()) return;
  FALQON_CHECK(input_fp8.has_value() && input_scale.has_value(),
              "falqon.melded_linear: input_fp8 and input_scale go together (x's quantisation as "
              "falqon.quantize or falqon.quantize_rows returns it), got only ",
              input_fp8.has_value() ? "input_fp8" : "input_scale");
  FALQON_CHECK(!amax_history.has_value(), "falqon.melded_linear: input_fp8 and input_scale cannot "
              "be combined with amax_history (delayed scaling quantises x itself)");
  const at::Tensor& q = *input_fp8;
  const at::Tensor& s = *input_scale;
  FALQON_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && q.sizes() == input.sizes(),
              "falqon.melded_linear: input_fp8 must be a float8_e4m3fn tensor of the input's "
              "shape ", input.sizes(), ", got ", q.sizes(), " ", q.scalar_type());
  FALQON_CHECK(q.device() == input.device(), "falqon.melded_linear: input_fp8 is on ", q.device(),
              " but the input is on ", input.device());
  FALQON_CHECK(s.scalar_type() == at::kFloat && (s.numel() == 1 || per_row_scale(input, s)),
              "falqon.melded_linear: input_scale must be float32, a single value (quantize) or "
              "one per row of the input, shaped ", input.sizes().slice(0, input.dim() - 1),
              " (quantize_rows); got shape ", s.sizes(), " ", s.scalar_type());
  FALQON_CHECK(s.device() == input.device(), "falqon.melded_linear: input_scale is on ", s.device(),
              " but the input is on ", input.device());
}

void check_weight_scale(const at::Tensor& weight, const at::Tensor& weight_scale) {
  FALQON_CHECK(weight_scale.numel() == 1 && weight_scale.scalar_type() == at::kFloat,
              "falqon: weight_scale must be a single float32 value, got ", weight_scale.numel(),
              " values of ", weight_scale.scalar_type());
  check_same_device("melded_linear", weight, weight_scale, "weight_scale");
}

void check_melded_weight(const at::Tensor& weight, int64_t out_features, int64_t rank,
                         const std::optional<at::Tensor>& weight_t, bool adapter) {
  FALQON_CHECK(weight.dim() == 2, "falqon: the melded weight must be 2-D, got ", weight.dim(), "-D");
  FALQON_CHECK(weight.scalar_type() == at::kFloat8_e4m3fn,
              "falqon: the melded weight must be torch.float8_e4m3fn, got ", weight.scalar_type());
  FALQON_CHECK(weight.is_contiguous(), "falqon: the melded weight must be contiguous");
  const int64_t K = weight.size(1);
  FALQON_CHECK(K % 16 == 0, "falqon: in_features must be a multiple of 16 for FP8 GEMMs, got ", K);
  FALQON_CHECK(out_features > 0 && out_features % 16 == 0,
              "falqon: out_features must be a positive multiple of 16 for FP8 GEMMs, got ",
              out_features);
  if (rank >= 0) {
    FALQON_CHECK(weight.size(0) == out_features + padded_rank(rank), "falqon: a melded weight for ",
                out_features, " outputs and rank ", rank, " has ", out_features + padded_rank(rank),
                " rows (rank padded to a multiple of ", kRowAlign, "), got ", weight.size(0));
  } else {
    const int64_t extra = weight.size(0) - out_features;
    FALQON_CHECK(extra > 0 && extra % kRowAlign == 0, "falqon: gradient has ", out_features,
                " features but the melded weight has ", weight.size(0),
                " rows; expected out_features plus the padded rank");
  }
  if (weight_t.has_value()) {
    const auto& wt = *weight_t;
    // The adapter mode's dgrad runs over every row of W' ([W; A; 0]), the proxy mode's over W's.
    const int64_t cols = adapter ? weight.size(0) : out_features;
    FALQON_CHECK(wt.scalar_type() == at::kFloat8_e4m3fn && wt.dim() == 2 && wt.size(0) == K &&
                    wt.size(1) == cols && wt.is_contiguous(),
                "falqon: weight_t must be the contiguous (", K, ", ", cols,
                ") float8_e4m3fn transpose of ",
                adapter ? "every row of the melded weight (adapter mode)" : "the weight rows",
                ", got ", wt.sizes(), " ", wt.scalar_type());
    check_same_device("melded_linear", weight, wt, "weight_t");
  }
}

void check_scaling(const char* op, double scaling) {
  FALQON_CHECK(std::isfinite(scaling) && scaling > 0 &&
                  scaling <= std::numeric_limits<float>::max(),
              "falqon.", op, ": scaling (alpha / rank) must be a finite number > 0, got ", scaling);
}

void check_melded_linear_args(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& weight_scale, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& weight_t, bool adapter,
                              double scaling) {
  check_scaling("melded_linear", scaling);
  check_lora_B("melded_linear", lora_B);
  check_melded_weight(weight, lora_B.size(0), lora_B.size(1), weight_t, adapter);
  check_weight_scale(weight, weight_scale);
  FALQON_CHECK(is_activation_dtype(input.scalar_type()),
              "falqon.melded_linear: input must be float32, float16 or bfloat16, got ",
              input.scalar_type());
  FALQON_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "falqon.melded_linear: input has ",
              input.dim() ? input.size(-1) : 0, " features in its last dimension, the layer takes ",
              weight.size(1));
  check_same_device("melded_linear", weight, input, "input");
  check_same_device("melded_linear", weight, lora_B, "lora_B");
  if (bias.has_value()) {
    FALQON_CHECK(bias->dim() == 1 && bias->size(0) == lora_B.size(0) && bias->is_floating_point(),
                "falqon.melded_linear: bias must be a floating vector of ", lora_B.size(0),
                " values, got ", bias->sizes());
    check_same_device("melded_linear", weight, *bias, "bias");
  }
}

void check_grad_input_args(const at::Tensor& grad_output, const at::Tensor& weight,
                           const at::Tensor& weight_scale, int64_t out_features,
                           const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
                           const std::optional<at::Tensor>& lora_B, double scaling,
                           std::optional<int64_t> rank) {
  check_scaling("melded_linear_grad_input", scaling);
  FALQON_CHECK(is_fp8(grad_dtype), "falqon.melded_linear_grad_input: grad_dtype must be an FP8 "
              "dtype, got ", grad_dtype);
  FALQON_CHECK(is_activation_dtype(grad_output.scalar_type()),
              "falqon.melded_linear_grad_input: grad_output must be float32, float16 or bfloat16, "
              "got ", grad_output.scalar_type());
  if (lora_B.has_value()) {
    check_lora_B("melded_linear_grad_input", *lora_B);
    FALQON_CHECK(lora_B->size(0) == out_features, "falqon.melded_linear_grad_input: lora_B has ",
                lora_B->size(0), " rows but the gradient has ", out_features, " features");
    check_same_device("melded_linear_grad_input", weight, *lora_B, "lora_B");
  }
  int64_t r = lora_B.has_value() ? lora_B->size(1) : -1;
  if (rank.has_value()) {
    FALQON_CHECK(r < 0 || r == *rank, "falqon.melded_linear_grad_input: lora_B has rank ", r,
                " but rank is ", *rank);
    FALQON_CHECK(*rank >= 1, "falqon.melded_linear_grad_input: rank must be >= 1, got ", *rank);
    r = *rank;
  }
  FALQON_CHECK(r >= 1 || weight_t.has_value(), "falqon.melded_linear_grad_input: pass the "
              "adapter's rank (or lora_B, or weight_t): a melded weight of ", weight.dim() == 2 ?
              weight.size(0) : 0, " rows fits several (out_features, rank) pairs, and the "
              "gradient's ", out_features, " features alone do not say which rows are W");
  check_melded_weight(weight, out_features, r, weight_t, lora_B.has_value());
  check_weight_scale(weight, weight_scale);
  check_same_device("melded_linear_grad_input", weight, grad_output, "grad_output");
}

void check_record_amax_args(const at::Tensor& amax_history, const at::Tensor& amax) {
  FALQON_CHECK(amax_history.dim() == 1 && amax_history.numel() >= 1 &&
                  amax_history.scalar_type() == at::kFloat && amax_history.is_contiguous(),
              "falqon.record_amax_: amax_history must be a contiguous 1-D float32 tensor of at "
              "least one value, got ", amax_history.sizes(), " ", amax_history.scalar_type());
  FALQON_CHECK(amax.numel() == 1 && amax.scalar_type() == at::kFloat,
              "falqon.record_amax_: amax must be one float32 value, got ", amax.sizes(), " ",
              amax.scalar_type());
  FALQON_CHECK(amax.device() == amax_history.device(), "falqon.record_amax_: amax is on ",
              amax.device(), " but amax_history is on ", amax_history.device());
}

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& xa,
                         const at::Tensor& weight, const at::Tensor& weight_scale,
                         const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
                         at::ScalarType grad_B_dtype, const std::optional<at::Tensor>& lora_B,
                         double scaling) {
  check_scaling("melded_linear_backward", scaling);
  const int64_t N = grad_output.dim() ? grad_output.size(-1) : 0;
  FALQON_CHECK(!lora_B.has_value() || lora_B->dim() != 2 ||
                  lora_B->size(1) == (xa.dim() ? xa.size(-1) : 0),
              "falqon.melded_linear_backward: lora_B has rank ", lora_B.has_value() && lora_B->dim() == 2
                  ? lora_B->size(1) : 0, " but xa has ", xa.dim() ? xa.size(-1) : 0, " columns");
  FALQON_CHECK(xa.dim() >= 1 && xa.size(-1) >= 1 && xa.scalar_type() == grad_output.scalar_type(),
              "falqon.melded_linear_backward: xa must hold the rank's columns last, in the "
              "gradient's dtype ", grad_output.scalar_type(), ", got ", xa.sizes(), " ",
              xa.scalar_type());
  check_grad_input_args(grad_output, weight, weight_scale, N, weight_t, grad_dtype, lora_B,
                        scaling, xa.size(-1));
  const int64_t M = N ? grad_output.numel() / N : 0;
  FALQON_CHECK(xa.numel() == M * xa.size(-1), "falqon.melded_linear_backward: xa has ",
              xa.numel() / xa.size(-1), " rows, the gradient ", M);
  check_same_device("melded_linear_backward", weight, xa, "xa");
  check_melded_weight(weight, N, xa.size(-1), weight_t, lora_B.has_value());
  FALQON_CHECK(is_activation_dtype(grad_B_dtype), "falqon.melded_linear_backward: grad_B_dtype "
              "must be float32, float16 or bfloat16, got ", grad_B_dtype);
}

void check_meld_init_args(const at::Tensor& weight, int64_t rank, const std::string& svd,
                          int64_t oversample, int64_t power_iters, double adapter_row_norm) {
  FALQON_CHECK(adapter_row_norm >= 0 && adapter_row_norm < std::numeric_limits<double>::infinity(),
              "falqon.meld_init: adapter_row_norm must be a finite number >= 0 (0: A as the SVD "
              "gives it)");
  FALQON_CHECK(weight.dim() == 2, "falqon.meld_init: weight must be 2-D (out_features, "
              "in_features), got ", weight.dim(), "-D");
  FALQON_CHECK(is_activation_dtype(weight.scalar_type()),
              "falqon.meld_init: weight must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  FALQON_CHECK(N % 16 == 0 && K % 16 == 0, "falqon.meld_init: FP8 GEMMs need in_features and "
              "out_features to be multiples of 16, got a ", N, " x ", K, " weight");
  FALQON_CHECK(rank >= 1 && rank <= std::min(N, K), "falqon.meld_init: rank must be between 1 and "
              "min(out_features, in_features) = ", std::min(N, K), ", got ", rank);
  FALQON_CHECK(svd == "randomized" || svd == "exact", "falqon.meld_init: svd must be 'randomized' "
              "or 'exact', got '", svd, "'");
  FALQON_CHECK(oversample >= 0 && power_iters >= 0,
              "falqon.meld_init: oversample and power_iters must be >= 0");
}

void check_topk_update_args(const at::Tensor& weight, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& weight_t, int64_t k, double scaling) {
  check_scaling("topk_update_", scaling);
  FALQON_CHECK(lora_B.dim() == 2 && lora_B.is_floating_point(),
              "falqon.topk_update_: lora_B must be a floating (out_features, rank) matrix, got ",
              lora_B.sizes());
  FALQON_CHECK(lora_B.is_contiguous(), "falqon.topk_update_: lora_B must be contiguous");
  FALQON_CHECK(k >= 0, "falqon.topk_update_: k must be >= 0, got ", k);
  check_melded_weight(weight, lora_B.size(0), lora_B.size(1), weight_t);
  check_same_device("topk_update_", weight, lora_B, "lora_B");
}

namespace {

// A per-layer check's message without its "falqon.op: " or "falqon: " prefix.
std::string layer_message(const c10::Error& e) {
  std::string m = e.msg();
  if (m.rfind("falqon.topk_update_: ", 0) == 0) return m.substr(std::strlen("falqon.topk_update_: "));
  if (m.rfind("falqon: ", 0) == 0) return m.substr(std::strlen("falqon: "));
  return m;
}

void check_distinct(at::TensorList ts, const char* name) {
  std::vector<const void*> ptrs;
  for (const auto& t : ts) {
    if (t.has_storage() && t.numel() > 0) ptrs.push_back(t.data_ptr());
  }
  std::sort(ptrs.begin(), ptrs.end());
  FALQON_CHECK(std::adjacent_find(ptrs.begin(), ptrs.end()) == ptrs.end(),
              "falqon.topk_update_many_: two layers share one of their ", name,
              "; each layer must have its own tensors");
}

}  // namespace

std::vector<std::optional<at::Tensor>> weight_t_by_layer(int64_t layers, at::TensorList weight_ts,
                                                         at::IntArrayRef weight_t_layers) {
  std::vector<std::optional<at::Tensor>> out(layers);
  for (size_t j = 0; j < weight_ts.size(); ++j) out[weight_t_layers[j]] = weight_ts[j];
  return out;
}

void check_topk_update_many_args(at::TensorList weights, at::TensorList lora_Bs,
                                 at::TensorList weight_ts, at::IntArrayRef weight_t_layers,
                                 at::IntArrayRef ks, at::ArrayRef<double> scalings,
                                 const c10::List<bool>& keep_residuals) {
  const size_t L = weights.size();
  FALQON_CHECK(L >= 1, "falqon.topk_update_many_: no layers (weights is empty)");
  FALQON_CHECK(lora_Bs.size() == L && ks.size() == L && scalings.size() == L &&
                  keep_residuals.size() == L,
              "falqon.topk_update_many_: weights, lora_Bs, ks, scalings and keep_residuals must "
              "have one entry per layer, got ", L, ", ", lora_Bs.size(), ", ", ks.size(), ", ",
              scalings.size(), " and ", keep_residuals.size());
  FALQON_CHECK(weight_ts.size() == weight_t_layers.size(),
              "falqon.topk_update_many_: weight_ts and weight_t_layers must have the same length, "
              "got ", weight_ts.size(), " and ", weight_t_layers.size());
  std::vector<bool> seen(L, false);
  for (const int64_t l : weight_t_layers) {
    FALQON_CHECK(l >= 0 && l < static_cast<int64_t>(L) && !seen[l],
                "falqon.topk_update_many_: weight_t_layers must name distinct layers in [0, ", L,
                "), got ", weight_t_layers);
    seen[l] = true;
  }
  const auto wt = weight_t_by_layer(static_cast<int64_t>(L), weight_ts, weight_t_layers);
  for (size_t i = 0; i < L; ++i) {
    try {
      check_topk_update_args(weights[i], lora_Bs[i], wt[i], ks[i], scalings[i]);
    } catch (const c10::Error& e) {
      FALQON_CHECK(false, "falqon.topk_update_many_: layer ", i, ": ", layer_message(e));
    }
    FALQON_CHECK(weights[i].device() == weights[0].device(), "falqon.topk_update_many_: layer ",
                i, " is on ", weights[i].device(), " but layer 0 is on ", weights[0].device());
  }
  check_distinct(weights, "weights");
  check_distinct(lora_Bs, "lora_Bs");
  check_distinct(weight_ts, "weight_ts");
}

}  // namespace falqon
