// The CUDA kernels of torch.ops.falqon: argument checks (shared with the CPU reference), the
// FP8 path, or the reference implementation on GPUs without FP8 (compute capability < 8.9) and
// wherever FALQON_FORCE_EMULATION=1. Also torch.ops.falqon_bench: the variants and pieces the
// benchmarks and scripts/cuda_selfcheck.py time separately (not part of the falqon API).
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

// A kernel whose image tells whether this build has code for a device.
__global__ void probe_kernel() {}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

bool env_flag(const char* name, bool fallback) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  const std::string v = lower(raw);
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  FALQON_CHECK(false, "falqon: environment variable ", name, " must be 1 or 0, got '", raw, "'");
}

int sm_count(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
}

bool pdl_enabled(const at::Device& device) {
  static const bool allowed = env_flag("FALQON_PDL", true);
  return allowed && at::cuda::getDeviceProperties(device.index())->major >= 9;
}

bool use_emulation(const at::Device& device) {
  static const bool forced = env_flag("FALQON_FORCE_EMULATION", false);
  static std::mutex mutex;
  static std::unordered_map<int, bool> answers;
  bool emulate;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto it = answers.find(device.index());
    if (it == answers.end()) {
      const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
      const bool has_fp8 = prop->major * 10 + prop->minor >= 89;
      if (has_fp8 && !forced) {
        cudaFuncAttributes attr;
        const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
        if (err != cudaSuccess) (void)cudaGetLastError();  // clear it; we raise our own error
        FALQON_CHECK(err == cudaSuccess, "falqon: this build has no kernels for compute capability ",
                    prop->major, ".", prop->minor, " (", cudaGetErrorString(err),
                    "); rebuild with TORCH_CUDA_ARCH_LIST including ", prop->major, ".", prop->minor,
                    prop->major >= 9 ? "a" : "");
      }
      it = answers.emplace(device.index(), forced || !has_fp8).first;
    }
    emulate = it->second;
  }
  if (emulate) {
    static std::once_flag warned;
    std::call_once(warned, [] {
      warn_user(std::string("falqon: the FP8 path needs a GPU of compute capability >= 8.9") +
                (forced ? " and FALQON_FORCE_EMULATION=1 is set" : "") +
                "; this run emulates FP8 with the reference implementation (casts and fp32 "
                "GEMMs) and is slower than bf16.");
    });
  }
  return emulate;
}

namespace {

// ---- torch.ops.falqon on CUDA -----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_op(const at::Tensor& input, at::ScalarType dtype) {
  check_quantize_args(input, dtype);
  const c10::cuda::CUDAGuard guard(input.device());
  if (use_emulation(input.device())) return ref::quantize(input, dtype);
  auto [q, scale, amax] = quantize_fp8(input, dtype);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_op(const at::Tensor& input, at::ScalarType dtype) {
  check_quantize_args(input, dtype);
  const c10::cuda::CUDAGuard guard(input.device());
  if (use_emulation(input.device())) return ref::quantize_rows(input, dtype);
  auto [q, scale, amax] = quantize_rows_fp8(input, dtype);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_delayed_op(const at::Tensor& input,
                                                                   at::ScalarType dtype,
                                                                   const at::Tensor& amax_history) {
  check_quantize_args(input, dtype);
  check_amax_history("quantize_delayed", input, amax_history);
  const c10::cuda::CUDAGuard guard(input.device());
  if (use_emulation(input.device())) return ref::quantize_delayed(input, dtype, amax_history);
  return quantize_delayed_fp8(input, dtype, amax_history);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_op(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> grad_dtype, const std::optional<at::Tensor>& amax_history,
    bool adapter, const std::optional<at::Tensor>& input_fp8,
    const std::optional<at::Tensor>& input_scale) {
  check_melded_linear_args(input, weight, weight_scale, lora_B, bias, weight_t, adapter, scaling);
  check_layer_amax_history(input, amax_history);
  check_input_quantization(input, input_fp8, input_scale, amax_history);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (use_emulation(weight.device())) {
    return ref::melded_linear(input, weight, weight_scale, lora_B, bias, weight_t, scaling,
                              grad_dtype, amax_history, adapter, input_fp8, input_scale);
  }
  return melded_linear_fp8(input, weight, weight_scale, lora_B, bias, amax_history, adapter,
                           scaling, input_fp8, input_scale);
}

std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input_op(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, std::optional<at::ScalarType> grad_dtype,
    const std::optional<at::Tensor>& amax_history, const std::optional<at::Tensor>& lora_B,
    double scaling, std::optional<int64_t> rank) {
  const at::ScalarType gdt = grad_dtype_or_default(grad_dtype);
  check_grad_input_args(grad_output, weight, weight_scale, grad_output.dim() ? grad_output.size(-1) : 0,
                        weight_t, gdt, lora_B, scaling, rank);
  if (amax_history.has_value()) {
    check_amax_history("melded_linear_grad_input", grad_output, *amax_history);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  if (use_emulation(weight.device())) {
    return ref::melded_linear_grad_input(grad_output, weight, weight_scale, weight_t, grad_dtype,
                                         amax_history, lora_B, scaling, rank);
  }
  return melded_linear_grad_input_fp8(grad_output, weight, weight_scale, weight_t, gdt,
                                      amax_history, lora_B, scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_backward_op(
    const at::Tensor& grad_output, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& weight_t, double scaling,
    std::optional<at::ScalarType> grad_dtype, const std::optional<at::Tensor>& amax_history,
    std::optional<at::ScalarType> grad_B_dtype, const std::optional<at::Tensor>& lora_B) {
  const at::ScalarType gdt = grad_dtype_or_default(grad_dtype);
  const at::ScalarType bdt = grad_B_dtype.value_or(xa.scalar_type());
  check_backward_args(grad_output, xa, weight, weight_scale, weight_t, gdt, bdt, lora_B, scaling);
  if (amax_history.has_value()) {
    check_amax_history("melded_linear_backward", grad_output, *amax_history);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  if (use_emulation(weight.device())) {
    return ref::melded_linear_backward(grad_output, xa, weight, weight_scale, weight_t, scaling,
                                       grad_dtype, amax_history, grad_B_dtype, lora_B);
  }
  return melded_linear_backward_fp8(grad_output, xa, weight, weight_scale, weight_t, scaling, gdt,
                                    amax_history, bdt, lora_B);
}

void record_amax_op(at::Tensor& amax_history, const at::Tensor& amax) {
  check_record_amax_args(amax_history, amax);
  const c10::cuda::CUDAGuard guard(amax_history.device());
  record_amax_fp8(amax_history, amax);  // no FP8 arithmetic: the same kernel on every GPU
}

std::tuple<at::Tensor, at::Tensor> meld_init_op(const at::Tensor& weight, int64_t rank,
                                                const std::string& svd, int64_t oversample,
                                                int64_t power_iters, int64_t seed,
                                                double adapter_row_norm) {
  check_meld_init_args(weight, rank, svd, oversample, power_iters, adapter_row_norm);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (use_emulation(weight.device())) {
    return ref::meld_init(weight, rank, svd, oversample, power_iters, seed, adapter_row_norm);
  }
  return meld_init_fp8(weight, rank, svd, oversample, power_iters, seed, adapter_row_norm);
}

void topk_update_op(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                    int64_t k, double scaling, bool keep_residual) {
  check_topk_update_args(weight, lora_B, weight_t, k, scaling);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (use_emulation(weight.device())) {
    ref::topk_update_(weight, lora_B, weight_t, k, scaling, keep_residual);
    return;
  }
  topk_update_fp8(weight, lora_B, weight_t, k, scaling, keep_residual);
}

at::Tensor topk_update_many_op(at::TensorList weights, at::TensorList lora_Bs,
                              at::TensorList weight_ts, at::IntArrayRef weight_t_layers,
                              at::IntArrayRef ks, at::ArrayRef<double> scalings,
                              const c10::List<bool>& keep_residuals, bool discard_nonfinite) {
  check_topk_update_many_args(weights, lora_Bs, weight_ts, weight_t_layers, ks, scalings,
                              keep_residuals);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  if (use_emulation(weights[0].device())) {
    return ref::topk_update_many_(weights, lora_Bs, weight_ts, weight_t_layers, ks, scalings,
                                  keep_residuals, discard_nonfinite);
  }
  return topk_update_many_fp8(
      weights, lora_Bs,
      weight_t_by_layer(static_cast<int64_t>(weights.size()), weight_ts, weight_t_layers), ks,
      scalings, keep_residuals, discard_nonfinite);
}

// ---- torch.ops.falqon_bench -------------------------------------------------------------------

// b a^T * a_scale * b_scale for row-major FP8 a (m x k) and b (n x k): the forward GEMM
// (a = W', b = fp8(x)) or the dgrad GEMM (a = W_q^T, b = fp8(g)) alone.
at::Tensor scaled_gemm_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, at::ScalarType out_dtype, bool fast_accum) {
  FALQON_CHECK(a.dim() == 2 && b.dim() == 2, "falqon_bench.scaled_gemm takes 2-D operands");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({b.size(0), a.size(0)}, a.options().dtype(out_dtype));
  scaled_gemm_tn(a, a_scale, b, b_scale, std::nullopt, out, fast_accum);
  return out;
}

// The adapter mode's forward term y_base + scaling * xa b^T with the implementation named:
// "kernel" (adapter_y.cu, Hopper) or "gemm" (cuBLASLt's GEMM with y_base as C).
at::Tensor adapter_output_op(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b,
                             double scaling, const std::string& impl) {
  FALQON_CHECK(y_base.dim() == 2 && xa.dim() == 2 && b.dim() == 2,
              "falqon_bench.adapter_output takes 2-D operands");
  const c10::cuda::CUDAGuard guard(y_base.device());
  if (impl == "kernel") return adapter_y(y_base, xa, b, scaling);
  FALQON_CHECK(impl == "gemm", "falqon_bench.adapter_output: impl is \"kernel\" or \"gemm\", got ",
              impl);
  at::Tensor y = at::empty(y_base.sizes(), y_base.options().memory_format(at::MemoryFormat::Contiguous));
  FALQON_CHECK(matmul_16bit(b, /*a_is_k_by_m=*/false, xa, y_base, y, static_cast<float>(scaling)),
              "falqon_bench.adapter_output: cuBLASLt has no GEMM for these operands");
  return y;
}

}  // namespace

}  // namespace cuda
}  // namespace falqon

TORCH_LIBRARY_IMPL(falqon, CUDA, m) {
  m.impl("quantize", &falqon::cuda::quantize_op);
  m.impl("quantize_rows", &falqon::cuda::quantize_rows_op);
  m.impl("quantize_delayed", &falqon::cuda::quantize_delayed_op);
  m.impl("melded_linear", &falqon::cuda::melded_linear_op);
  m.impl("melded_linear_grad_input", &falqon::cuda::melded_linear_grad_input_op);
  m.impl("melded_linear_backward", &falqon::cuda::melded_linear_backward_op);
  m.impl("record_amax_", &falqon::cuda::record_amax_op);
  m.impl("meld_init", &falqon::cuda::meld_init_op);
  m.impl("topk_update_", &falqon::cuda::topk_update_op);
  m.impl("topk_update_many_", &falqon::cuda::topk_update_many_op);
}

TORCH_LIBRARY(falqon_bench, m) {
  // quantize with the implementation named ("twopass" or "fused"), whatever FALQON_QUANTIZE says.
  m.def("quantize(Tensor input, ScalarType dtype, str impl) -> (Tensor, Tensor)");
  // The (cols, rows) transpose of an FP8 matrix (the dgrad path without weight_t).
  m.def("transpose_fp8(Tensor weight) -> Tensor");
  // One FP8 GEMM: b a^T * a_scale * b_scale, a (m, k) and b (n, k) row-major FP8.
  m.def("scaled_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType out_dtype, "
        "bool fast_accum) -> Tensor");
  // t contiguous in an activation dtype, as the adapter's B reaches its GEMMs (operands.cu).
  m.def("in_dtype(Tensor t, ScalarType dtype) -> Tensor");
  // y_base + scaling * xa b^T (the adapter mode's forward term) by "kernel" or "gemm".
  m.def("adapter_output(Tensor y_base, Tensor xa, Tensor b, float scaling, str impl) -> Tensor");
}

TORCH_LIBRARY_IMPL(falqon_bench, CUDA, m) {
  m.impl("quantize", &falqon::cuda::quantize_impl);
  m.impl("transpose_fp8", &falqon::cuda::transpose_fp8);
  m.impl("scaled_gemm", &falqon::cuda::scaled_gemm_op);
  m.impl("in_dtype", &falqon::cuda::in_dtype);
  m.impl("adapter_output", &falqon::cuda::adapter_output_op);
}
