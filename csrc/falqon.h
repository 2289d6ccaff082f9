// Shared declarations of the falqon extension: argument checks used by every backend and the
// device-generic reference implementation (ATen ops only, FP8 emulated by real casts).
//
// Layout of a melded weight (see DESIGN.md): W' = [W ; A ; 0], FP8 E4M3, one per-tensor scale.
//   rows [0, N)            the frozen weight W (out_features = N)
//   rows [N, N + r)        the adapter A (rank r)
//   rows [N + r, N + r16)  zeros, r16 = r rounded up to a multiple of 16, so that the FP8 GEMM's
//                          row count and its bf16 output's leading dimension stay 16-aligned
//                          (cuBLASLt's FP8 kernels need 16-byte aligned leading dimensions).
//
// Two update modes share that layout (DESIGN.md, "the exact adapter mode"):
//   proxy    the paper's: B never enters the forward, y = x W^T; dx = g W; a top-k row update
//            folds B A into W after each optimizer step.
//   adapter  B is a real LoRA-FA adapter in the forward, y = x W^T + scaling (x A^T) B^T, and
//            dx = g W + scaling (g B) A, the latter from one FP8 GEMM over all rows of W' with
//            the operand [g | scaling g B | 0]; W' never changes during training.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace falqon {

// ---- error messages ---------------------------------------------------------------------------
// FALQON_CHECK(cond, parts...) is TORCH_CHECK with the message put together here, only when the
// check fails: numbers by std::to_string, shapes as "[3, 48]", dtypes and devices by name, then
// handed to TORCH_CHECK as one string. On the GPU machine's torch (2.11.0+cu130) a TORCH_CHECK
// whose message streamed an integer from this library crashed the process (SIGSEGV) instead of
// raising, while messages of strings and dtypes raised cleanly (benchmarks/NOTES.md, device run
// 6): the integer insertion of c10::str's ostringstream is the part this macro avoids.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, double v) {  // "%g": 0.5, 1e+30, inf, nan
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

#define FALQON_CHECK(cond, ...)                              \
  do {                                                       \
    if (C10_UNLIKELY(!(cond))) {                             \
      TORCH_CHECK(false, ::falqon::message(__VA_ARGS__));    \
    }                                                        \
  } while (0)

constexpr int64_t kRowAlign = 16;

inline int64_t padded_rank(int64_t rank) { return (rank + kRowAlign - 1) / kRowAlign * kRowAlign; }

// Largest finite value of an FP8 format; raises for any other dtype.
double fp8_max(at::ScalarType dtype);

// The gradient format used when the caller passes none.
inline at::ScalarType grad_dtype_or_default(std::optional<at::ScalarType> dtype) {
  return dtype.value_or(at::kFloat8_e5m2);
}

// A UserWarning in Python's warnings machinery (filters, logging, pytest) where Python runs this
// library, else a c10 warning. torch.ops calls install no Python warning handler, so a plain
// TORCH_WARN from an op would only be printed to stderr.
void warn_user(const std::string& message);

// ---- argument checks (the same messages on every backend) -------------------------------------
void check_quantize_args(const at::Tensor& input, at::ScalarType dtype);
// Whether a caller's input_scale for melded_linear is quantize_rows' (one per row of x, shaped
// input.shape[:-1], at least one dimension) rather than quantize's single value.
bool per_row_scale(const at::Tensor& input, const at::Tensor& input_scale);

// An amax history of delayed scaling: float32, at least one value, on `input`'s device. `op` names
// the op in the message.
void check_amax_history(const char* op, const at::Tensor& input, const at::Tensor& amax_history);
// melded_linear's history: (2, H) float32 with H >= 1, row 0 for x and row 1 for the gradient.
void check_layer_amax_history(const at::Tensor& input,
                              const std::optional<at::Tensor>& amax_history);
// melded_linear's caller-supplied quantisation of x: input_fp8 a float8_e4m3fn tensor of the
// input's shape and device, input_scale one float32 value on that device, both or neither, and
// neither together with amax_history (delayed scaling quantises x itself).
void check_input_quantization(const at::Tensor& input, const std::optional<at::Tensor>& input_fp8,
                              const std::optional<at::Tensor>& input_scale,
                              const std::optional<at::Tensor>& amax_history);
// A melded weight for `out_features` outputs and rank `rank` (rank < 0: any padded rank).
// weight_t: the transposed copy, (in_features, out_features) of the weight rows, or in the
// adapter mode (in_features, rows) of every row (the dgrad GEMM runs over A's rows too).
void check_melded_weight(const at::Tensor& weight, int64_t out_features, int64_t rank,
                         const std::optional<at::Tensor>& weight_t, bool adapter = false);
void check_weight_scale(const at::Tensor& weight, const at::Tensor& weight_scale);
// The adapter's scaling (alpha / rank) of every op that takes one: finite and > 0, as
// FalqonConfig's and MeldedLinear's alpha.
void check_scaling(const char* op, double scaling);
void check_melded_linear_args(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& weight_scale, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& weight_t, bool adapter,
                              double scaling);
// lora_B: the adapter mode's B (out_features, rank), which fixes the weight's row count; rank
// (the proxy mode's) does the same. One of lora_B, rank and weight_t is required: a melded
// weight of R rows fits several (out_features, rank) pairs, so the gradient's width alone does
// not say which rows are W.
void check_grad_input_args(const at::Tensor& grad_output, const at::Tensor& weight,
                           const at::Tensor& weight_scale, int64_t out_features,
                           const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
                           const std::optional<at::Tensor>& lora_B, double scaling,
                           std::optional<int64_t> rank);
// record_amax_: a 1-D contiguous float32 history of at least one value and one float32 amax on
// its device.
void check_record_amax_args(const at::Tensor& amax_history, const at::Tensor& amax);
// melded_linear_backward: the grad_input checks, xa (..., r) of the gradient's rows and dtype for
// a melded weight of that rank, and an activation dtype for dB.
void check_backward_args(const at::Tensor& grad_output, const at::Tensor& xa,
                         const at::Tensor& weight, const at::Tensor& weight_scale,
                         const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
                         at::ScalarType grad_B_dtype, const std::optional<at::Tensor>& lora_B,
                         double scaling);
void check_meld_init_args(const at::Tensor& weight, int64_t rank, const std::string& svd,
                          int64_t oversample, int64_t power_iters, double adapter_row_norm);
void check_topk_update_args(const at::Tensor& weight, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& weight_t, int64_t k, double scaling);
// topk_update_many_: one entry per layer in every list (at least one layer), each layer's
// arguments as topk_update_'s (the message names the layer), all on one device, no tensor shared
// by two layers; weight_t_layers names distinct layers, one per tensor of weight_ts.
void check_topk_update_many_args(at::TensorList weights, at::TensorList lora_Bs,
                                 at::TensorList weight_ts, at::IntArrayRef weight_t_layers,
                                 at::IntArrayRef ks, at::ArrayRef<double> scalings,
                                 const c10::List<bool>& keep_residuals);
// The transposed copy of each of `layers` layers (none where weight_t_layers names no tensor).
std::vector<std::optional<at::Tensor>> weight_t_by_layer(int64_t layers, at::TensorList weight_ts,
                                                         at::IntArrayRef weight_t_layers);

// ---- reference implementation (any device) ----------------------------------------------------
namespace ref {

// scale = amax / fmax (1 where amax == 0); q = fp8(clamp(x / scale, -fmax, fmax)).
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& input, at::ScalarType dtype);
// The same, also returning the amax of the input (float32 0-d; 0 for an empty input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_with_amax(const at::Tensor& input,
                                                                  at::ScalarType dtype);

// Row-wise: a scale per row of the last dimension, scale[i] = amax(row i) / fmax (1 where 0), q
// as quantize's cast at its row's scale. scale (and amax) are shaped input.shape[:-1].
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& input, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_with_amax(const at::Tensor& input,
                                                                       at::ScalarType dtype);

// Delayed scaling: the amax used is max(amax_history) where that is finite and > 0, else (nothing
// recorded yet, or a NaN or Inf in the history) the input's own amax; scale = amax / fmax (1 where 0);
// q = fp8(clamp(x / scale, -fmax, fmax)), so values above the recorded amax saturate. Returns
// (q, scale, the input's own amax) so that the caller can record it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_delayed(const at::Tensor& input,
                                                                at::ScalarType dtype,
                                                                const at::Tensor& amax_history);

// Returns (y, xa, amax of x): y = x W^T * s_x * s + b as a view of the (..., N + r16) product
// (row stride N + r16), xa = x A^T (contiguous). With amax_history (2, H), x's scale is the
// delayed one of row 0 (quantize_delayed). adapter: y = adapter_output(that y, xa, lora_B,
// scaling), a new contiguous tensor. input_fp8 and input_scale: x's quantisation already made
// (quantize or quantize_rows of input, float8_e4m3fn; per row where per_row_scale says so: then
// s_x and the amax returned are shaped input.shape[:-1]), used instead of quantising x; the amax
// returned is then input_scale * 448.
std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> grad_dtype, const std::optional<at::Tensor>& amax_history,
    bool adapter, const std::optional<at::Tensor>& input_fp8 = std::nullopt,
    const std::optional<at::Tensor>& input_scale = std::nullopt);

// The adapter mode's output for 2-D y_base (M, N) (any strides) and xa (M, r), in y_base's dtype
// T, contiguous: T(fp32(y_base) + scaling * (fp32(xa) @ fp32(T(lora_B))^T)), the products and
// their sum in fp32 (exact products of 16-bit values), B rounded to T first (PEFT's autocast
// does the same), one rounding at the end.
at::Tensor adapter_output(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& lora_B,
                          double scaling);

// The adapter mode's dgrad operand for 2-D g (M, N): [fp32(g) | u | 0] as an fp32 (M, rows)
// tensor, u = fp32 product fp32(g) @ fp32(T(lora_B)) (T = g's dtype) times scaling, rounded
// once to fp32; columns [N + r, rows) zero.
at::Tensor adapter_grad_operand(const at::Tensor& g, const at::Tensor& lora_B, double scaling,
                                int64_t rows);

// (dx, amax of g): dx = fp8(g) W_q * s_g * s, W_q = rows [0, N) of the melded weight. With
// amax_history (the gradient's H values), g's scale is the delayed one (quantize_delayed).
// lora_B (the adapter mode): dx = fp8(G) W'_q * s_G * s over every row of the melded weight with
// G = adapter_grad_operand(g, lora_B, scaling), quantised as one tensor (one scale; the amax
// returned and recorded is G's).
std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, std::optional<at::ScalarType> grad_dtype,
    const std::optional<at::Tensor>& amax_history, const std::optional<at::Tensor>& lora_B,
    double scaling, std::optional<int64_t> rank);

// Records amax as the newest value of a 1-D history, in place: history = [amax, history[:-1]];
// a NaN or Inf amax is not recorded (the history is left as it is), so that one non-finite
// tensor cannot poison the scales of the next H calls.
void record_amax_(at::Tensor& amax_history, const at::Tensor& amax);

// The layer's backward for both gradients, (dx, dB, amax of g): dx as melded_linear_grad_input,
// dB = fp32(g^T xa) * scaling (fp32 products and sums, the scaling multiplied once in fp32) rounded
// once to grad_B_dtype (None: xa's dtype). amax_history: the gradient's H values, as there.
// lora_B: the adapter mode, dx as melded_linear_grad_input's with lora_B.
std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> grad_dtype, const std::optional<at::Tensor>& amax_history,
    std::optional<at::ScalarType> grad_B_dtype, const std::optional<at::Tensor>& lora_B);

// dB = scaling * g^T xa for 2-D g (M, N) and xa (M, r): fp32 products and sums, the scaling
// multiplied once in fp32, one rounding to `dtype` (the numerics melded_linear_backward defines).
at::Tensor lora_grad_B(const at::Tensor& g, const at::Tensor& xa, double scaling,
                       at::ScalarType dtype);

// The quantisation error E = W - s0 fp8(W / s0) of a weight, in fp32.
at::Tensor quantization_error(const at::Tensor& weight);

// Gaussian test matrix of the randomized SVD: drawn on the CPU from `seed`, so that every
// backend sketches with the same matrix and their results can be compared.
at::Tensor svd_sketch(int64_t cols, int64_t width, int64_t seed, const at::Device& device);

// A = sqrt(S_r) V_r^T of the rank-r SVD of E, each row's sign fixed so that its entry of largest
// magnitude is positive (the SVD's sign is arbitrary; this makes A reproducible).
at::Tensor low_rank_factor(const at::Tensor& error, int64_t rank, const std::string& svd,
                           int64_t oversample, int64_t power_iters, int64_t seed);

// The adapter mode's A: A times one factor, min(row_norm / rms_row_norm(A), amax(W) / amax(A)),
// so that A's rows have the root-mean-square norm a LoRA A has (row_norm) without raising the
// scale that W' shares with W (A's amax stays at most W's). row_norm <= 0: A unchanged.
at::Tensor scale_adapter(const at::Tensor& A, const at::Tensor& weight_amax, double row_norm);

// Quantises [W ; A ; 0] with one scale.
std::tuple<at::Tensor, at::Tensor> stack_and_quantize(const at::Tensor& weight, const at::Tensor& A);

// adapter_row_norm > 0: A = scale_adapter(A, amax(W), adapter_row_norm) before it is stacked.
std::tuple<at::Tensor, at::Tensor> meld_init(const at::Tensor& weight, int64_t rank,
                                             const std::string& svd, int64_t oversample,
                                             int64_t power_iters, int64_t seed,
                                             double adapter_row_norm);

// The proxy update's row order. Scores c_t = |B_t0| + |B_t1| + ... + |B_t,r-1|, B in fp32,
// summed left to right with one fp32 rounding per add (so that every backend computes the same
// bits); the selected rows are the first k of the order "larger score first, NaN above every
// number, equal scores (and NaNs) by lower row index": deterministic, ties to the lower index.
at::Tensor topk_row_scores(const at::Tensor& lora_B);
at::Tensor topk_rows(const at::Tensor& scores, int64_t k);

void topk_update_(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                  int64_t k, double scaling, bool keep_residual);

// topk_update_ of every layer, in order; returns whether each lora_B was finite (bool (L,)),
// computed before anything is written. discard_nonfinite: if one is not, no weight changes and
// every lora_B is zeroed (decided on the device: no host synchronisation).
at::Tensor topk_update_many_(at::TensorList weights, at::TensorList lora_Bs,
                             at::TensorList weight_ts, at::IntArrayRef weight_t_layers,
                             at::IntArrayRef ks, at::ArrayRef<double> scalings,
                             const c10::List<bool>& keep_residuals, bool discard_nonfinite);

}  // namespace ref
}  // namespace falqon
